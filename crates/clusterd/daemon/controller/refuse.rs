//! StrictModes for manifests when the daemon runs as root.

use std::path::Path;

use clusterd_core::plan::AppName;

/// As root, a manifest decides what runs as root: like sshd's StrictModes, refuse one
/// that someone other than root could have written (the file or its directory owned by
/// another user, or writable by group or others). The app keeps its last good revision
/// (phase Invalid), exactly as for a manifest that does not parse.
pub(super) fn refuse_insecure(report: &mut clusterd_core::LoadReport, apps_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let problem = |path: &Path, what: &str| -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        let mode = meta.mode() & 0o7777;
        if meta.uid() != 0 {
            Some(format!(
                "refusing {what} {}: owned by uid {}, not root (fix: chown root {})",
                path.display(),
                meta.uid(),
                path.display()
            ))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "refusing {what} {}: writable by group or others (mode {mode:04o}; fix: chmod go-w {})",
                path.display(),
                path.display()
            ))
        } else {
            None
        }
    };
    let dir_problem = problem(apps_dir, "the apps dir");
    let names: Vec<AppName> = report.apps.keys().cloned().collect();
    for name in names {
        let source = report.apps[&name].source.clone();
        let Some(message) = dir_problem.clone().or_else(|| problem(&source, "manifest")) else {
            continue;
        };
        report.apps.remove(&name);
        report
            .errors
            .entry(name.0.clone())
            .or_default()
            .push(clusterd_core::Diagnostic {
                file: source,
                line: 1,
                column: 1,
                message,
            });
    }
}

//! What applying a set of manifests would change: the pure half of `clusterd diff`.
//!
//! [`diff`] compares the apps that are installed with the candidate apps, and says per app
//! whether it would be created, deleted, scaled, rolled over to a new revision, or only
//! have settings changed that touch no worker. [`Diff::render`] prints that the way
//! `kubectl diff` or `terraform plan` would, and [`Diff::exit_code`] gives the CLI's
//! status (0 = nothing would change, 1 = something would).
//!
//! The classification follows the daemon's own rules (DESIGN.md, "Revision"): a new
//! revision replaces workers one by one, a new instance count only scales, and rollout,
//! shutdown, restart, readiness, liveness and log settings touch no running worker. The
//! revision hash decides whether workers roll; the field comparison here only *explains*
//! it, so the diff can never promise less disruption than the daemon will cause.
//!
//! # Secrets
//! Environment values are never copied into a [`Diff`]: only the names of changed keys
//! (`env.API_KEY`) are kept, so printing a diff cannot leak a secret.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::model::{AppSpec, CommandLine, Limits, Liveness, Readiness};

/// One app as one side of the comparison sees it.
///
/// Borrowed so that the caller's loaded apps (name, source, normalized spec, resolved
/// replicas, revision) can be compared without copying them.
#[derive(Debug, Clone, Copy)]
pub struct AppView<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// The manifest file the app comes from; shown for created and deleted apps.
    pub source: &'a Path,
    /// The spec as loaded (command normalized, defaults resolved).
    pub spec: &'a AppSpec,
    /// The resolved instance count on this host.
    pub replicas: u32,
    /// The revision hash of `spec`: different revisions mean workers are replaced.
    pub revision: &'a str,
}

/// The outcome for every app on either side, ordered by app name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    /// One entry per app name found installed, in the candidates, or both.
    pub apps: Vec<AppDiff>,
}

/// What would happen to one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppDiff {
    /// `metadata.name`.
    pub name: String,
    /// The change.
    pub change: AppChange,
}

/// The kind of change for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppChange {
    /// Only among the candidates: workers will be started.
    Created {
        /// Workers that will be started.
        replicas: u32,
        /// Manifest the app comes from.
        source: PathBuf,
    },
    /// Only installed: its workers will drain and stop.
    Deleted {
        /// Workers that will be stopped.
        replicas: u32,
        /// Manifest the app came from.
        source: PathBuf,
    },
    /// On both sides and different. Scaling, a rolling replacement and settings changes
    /// combine freely, so they are fields of one value rather than separate variants.
    Updated(Update),
    /// On both sides and the same.
    Unchanged,
}

/// The parts of an update; at least one is present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// The resolved instance count changes.
    pub scaled: Option<Scale>,
    /// The revision changes: every worker is replaced, one by one.
    pub rolling: Option<Rolling>,
    /// Changes that touch no running worker (rollout, shutdown, readiness, ...).
    pub settings: Vec<FieldChange>,
}

/// A change of the resolved instance count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Instances now.
    pub from: u32,
    /// Instances after applying.
    pub to: u32,
}

/// A rolling replacement and the worker-shaping fields that cause it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rolling {
    /// May be empty when the revision hash covers something this comparison does not
    /// name; the replacement happens all the same.
    pub fields: Vec<FieldChange>,
}

/// One changed field, named by its manifest path (`command`, `env.API_KEY`,
/// `shutdown.timeout`). Never carries values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// Dotted path as the manifest spells it, below `spec`.
    pub path: String,
    /// Whether the field appeared, disappeared or changed.
    pub kind: ChangeKind,
}

/// How a field changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Set now, unset before.
    Added,
    /// Set before, unset now.
    Removed,
    /// Set on both sides, to different values.
    Modified,
}

impl ChangeKind {
    fn verb(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "changed",
        }
    }
}

/// Compares `installed` with `candidates` by app name.
///
/// Pass as `installed` exactly the apps that applying the candidates could replace or
/// remove: all installed apps when the candidates are the whole desired set, or only
/// those that share a name with a candidate when (like `kubectl apply -f` without
/// `--prune`) other apps are left alone. Names are expected to be unique on each side;
/// if one repeats, the last occurrence wins.
#[must_use]
pub fn diff(installed: &[AppView<'_>], candidates: &[AppView<'_>]) -> Diff {
    let mut sides: BTreeMap<&str, (Option<&AppView<'_>>, Option<&AppView<'_>>)> = BTreeMap::new();
    for app in installed {
        sides.entry(app.name).or_default().0 = Some(app);
    }
    for app in candidates {
        sides.entry(app.name).or_default().1 = Some(app);
    }
    let apps = sides
        .into_iter()
        .filter_map(|(name, pair)| {
            let change = match pair {
                (None, Some(new)) => AppChange::Created {
                    replicas: new.replicas,
                    source: new.source.to_path_buf(),
                },
                (Some(old), None) => AppChange::Deleted {
                    replicas: old.replicas,
                    source: old.source.to_path_buf(),
                },
                (Some(old), Some(new)) => compare(old, new),
                (None, None) => return None,
            };
            Some(AppDiff {
                name: name.to_string(),
                change,
            })
        })
        .collect();
    Diff { apps }
}

/// Classifies the differences of one app present on both sides.
fn compare(old: &AppView<'_>, new: &AppView<'_>) -> AppChange {
    let (worker, mut settings) = field_changes(old.spec, new.spec);
    let rolling = if old.revision == new.revision {
        // The daemon will not replace workers, so whatever differs is, as far as running
        // workers are concerned, a setting. Reporting it keeps the diff honest.
        settings.splice(0..0, worker);
        None
    } else {
        Some(Rolling { fields: worker })
    };
    let scaled = (old.replicas != new.replicas).then_some(Scale {
        from: old.replicas,
        to: new.replicas,
    });
    if scaled.is_none() && rolling.is_none() && settings.is_empty() {
        AppChange::Unchanged
    } else {
        AppChange::Updated(Update {
            scaled,
            rolling,
            settings,
        })
    }
}

/// Collects changed fields into (worker-shaping, settings).
///
/// The spec is destructured without `..` on purpose: adding a field to `AppSpec` fails to
/// compile here until someone decides whether it shapes workers.
fn field_changes(old: &AppSpec, new: &AppSpec) -> (Vec<FieldChange>, Vec<FieldChange>) {
    let AppSpec {
        command,
        working_dir,
        env,
        instances,
        listen,
        readiness,
        liveness,
        rollout,
        shutdown,
        restart,
        limits,
        user,
        group,
        logs,
    } = old;
    let mut worker = Fields::default();
    worker.value("command", &argv(command), &argv(&new.command));
    worker.option("workingDir", working_dir.as_ref(), new.working_dir.as_ref());
    for key in env
        .keys()
        .chain(new.env.keys().filter(|k| !env.contains_key(*k)))
    {
        worker.option(&format!("env.{key}"), env.get(key), new.env.get(key));
    }
    worker.option("user", user.as_ref(), new.user.as_ref());
    worker.option("group", group.as_ref(), new.group.as_ref());
    limit_changes(&mut worker, limits, &new.limits);
    worker.value("listen", listen, &new.listen);

    let mut settings = Fields::default();
    // `instances` as written may change while the resolved count stays (4 -> max on a
    // 4-CPU host); that is worth showing, and scaling is reported separately.
    settings.value("instances", instances, &new.instances);
    readiness_changes(&mut settings, readiness, &new.readiness);
    liveness_changes(&mut settings, liveness.as_ref(), new.liveness.as_ref());
    settings.value(
        "rollout.maxSurge",
        &rollout.max_surge,
        &new.rollout.max_surge,
    );
    settings.value(
        "rollout.maxUnavailable",
        &rollout.max_unavailable,
        &new.rollout.max_unavailable,
    );
    settings.value("shutdown.signal", &shutdown.signal, &new.shutdown.signal);
    settings.value("shutdown.timeout", &shutdown.timeout, &new.shutdown.timeout);
    settings.value("restart.policy", &restart.policy, &new.restart.policy);
    settings.value(
        "restart.backoff.initial",
        &restart.backoff.initial,
        &new.restart.backoff.initial,
    );
    settings.value(
        "restart.backoff.max",
        &restart.backoff.max,
        &new.restart.backoff.max,
    );
    settings.value("logs.maxSize", &logs.max_size, &new.logs.max_size);
    settings.value("logs.maxFiles", &logs.max_files, &new.logs.max_files);
    (worker.0, settings.0)
}

fn limit_changes(out: &mut Fields, old: &Limits, new: &Limits) {
    let Limits {
        memory,
        nofile,
        cpu,
        nproc,
        core,
    } = old;
    out.option("limits.memory", memory.as_ref(), new.memory.as_ref());
    out.option("limits.nofile", nofile.as_ref(), new.nofile.as_ref());
    out.option("limits.cpu", cpu.as_ref(), new.cpu.as_ref());
    out.option("limits.nproc", nproc.as_ref(), new.nproc.as_ref());
    out.option("limits.core", core.as_ref(), new.core.as_ref());
}

fn readiness_changes(out: &mut Fields, old: &Readiness, new: &Readiness) {
    let Readiness {
        kind,
        delay,
        path,
        timeout,
        period,
    } = old;
    out.option("readiness.type", kind.as_ref(), new.kind.as_ref());
    out.option("readiness.delay", delay.as_ref(), new.delay.as_ref());
    out.option("readiness.path", path.as_ref(), new.path.as_ref());
    out.value("readiness.timeout", timeout, &new.timeout);
    out.value("readiness.period", period, &new.period);
}

fn liveness_changes(out: &mut Fields, old: Option<&Liveness>, new: Option<&Liveness>) {
    let (Some(old), Some(new)) = (old, new) else {
        out.option("liveness", old, new);
        return;
    };
    let Liveness {
        kind,
        path,
        command,
        period,
        timeout,
        failure_threshold,
        initial_delay,
    } = old;
    out.value("liveness.type", kind, &new.kind);
    out.option("liveness.path", path.as_ref(), new.path.as_ref());
    out.option(
        "liveness.command",
        command.as_ref().map(argv).as_ref(),
        new.command.as_ref().map(argv).as_ref(),
    );
    out.value("liveness.period", period, &new.period);
    out.value("liveness.timeout", timeout, &new.timeout);
    out.value(
        "liveness.failureThreshold",
        failure_threshold,
        &new.failure_threshold,
    );
    out.value("liveness.initialDelay", initial_delay, &new.initial_delay);
}

/// The argv a command line stands for, so `"node server.js"` equals `[node, server.js]`.
/// A string that does not split (an open quote) is compared as written; validation
/// reports it elsewhere.
fn argv(command: &CommandLine) -> Vec<String> {
    match command {
        CommandLine::Argv(argv) => argv.clone(),
        CommandLine::Shell(line) => shell_words::split(line).unwrap_or_else(|_| vec![line.clone()]),
    }
}

/// Accumulates changed field paths in the order they are checked.
#[derive(Default)]
struct Fields(Vec<FieldChange>);

impl Fields {
    fn value<T: PartialEq>(&mut self, path: &str, old: &T, new: &T) {
        if old != new {
            self.push(path, ChangeKind::Modified);
        }
    }

    fn option<T: PartialEq>(&mut self, path: &str, old: Option<T>, new: Option<T>) {
        match (old, new) {
            (None, Some(_)) => self.push(path, ChangeKind::Added),
            (Some(_), None) => self.push(path, ChangeKind::Removed),
            (Some(old), Some(new)) if old != new => self.push(path, ChangeKind::Modified),
            _ => {}
        }
    }

    fn push(&mut self, path: &str, kind: ChangeKind) {
        self.0.push(FieldChange {
            path: path.to_string(),
            kind,
        });
    }
}

impl Diff {
    /// Whether applying would change anything at all.
    #[must_use]
    pub fn has_changes(&self) -> bool {
        self.apps
            .iter()
            .any(|app| app.change != AppChange::Unchanged)
    }

    /// The status `clusterd diff` exits with, like `kubectl diff`: 0 when nothing would
    /// change, 1 when something would. Errors (exit codes above 1) are the caller's.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        u8::from(self.has_changes())
    }

    /// Human-readable text: one line per changed app (`+` created, `-` deleted, `~`
    /// updated), then a summary line. Unchanged apps are only counted, as `terraform
    /// plan` does, so the output stays short on a host with many apps.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let (mut created, mut updated, mut deleted, mut unchanged) = (0, 0, 0, 0);
        for app in &self.apps {
            let name = &app.name;
            match &app.change {
                AppChange::Created { replicas, source } => {
                    created += 1;
                    let _ = writeln!(
                        out,
                        "+ {name}: created ({}) from {}",
                        instances(*replicas),
                        source.display()
                    );
                }
                AppChange::Deleted { replicas, .. } => {
                    deleted += 1;
                    let _ = writeln!(
                        out,
                        "- {name}: deleted ({} drained and stopped)",
                        instances(*replicas)
                    );
                }
                AppChange::Updated(update) => {
                    updated += 1;
                    let _ = writeln!(out, "~ {name}: {update}");
                }
                AppChange::Unchanged => unchanged += 1,
            }
        }
        if created + updated + deleted == 0 {
            let _ = writeln!(out, "no changes ({} unchanged)", apps(unchanged));
        } else {
            let _ = writeln!(
                out,
                "{created} to create, {updated} to update, {deleted} to delete, {unchanged} unchanged"
            );
        }
        out
    }
}

impl fmt::Display for Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(rolling) = &self.rolling {
            if rolling.fields.is_empty() {
                parts.push("rolling replacement (revision changed)".to_string());
            } else {
                parts.push(format!(
                    "rolling replacement ({})",
                    describe(&rolling.fields)
                ));
            }
        }
        if let Some(Scale { from, to }) = self.scaled {
            parts.push(format!("scaled {from} -> {to}"));
        }
        if !self.settings.is_empty() {
            let lead = if self.rolling.is_none() && self.scaled.is_none() {
                "settings only"
            } else {
                "settings"
            };
            parts.push(format!(
                "{lead} ({}), no worker restarted for them",
                describe(&self.settings)
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// `command, env.A changed; env.B added` — paths grouped by kind, in order of appearance.
fn describe(fields: &[FieldChange]) -> String {
    let mut groups: Vec<(ChangeKind, Vec<&str>)> = Vec::new();
    for field in fields {
        match groups.iter_mut().find(|(kind, _)| *kind == field.kind) {
            Some((_, paths)) => paths.push(&field.path),
            None => groups.push((field.kind, vec![&field.path])),
        }
    }
    groups.sort_by_key(|(kind, _)| std::cmp::Reverse(*kind == ChangeKind::Modified));
    groups
        .iter()
        .map(|(kind, paths)| format!("{} {}", paths.join(", "), kind.verb()))
        .collect::<Vec<_>>()
        .join("; ")
}

fn instances(n: u32) -> String {
    if n == 1 {
        "1 instance".to_string()
    } else {
        format!("{n} instances")
    }
}

fn apps(n: usize) -> String {
    if n == 1 {
        "1 app".to_string()
    } else {
        format!("{n} apps")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AppSpec {
        serde_saphyr::from_str(yaml).expect("test spec parses")
    }

    const BASE: &str = "command: [node, server.js]\nenv: {API_KEY: s3cret, MODE: prod}\n";

    fn view<'a>(name: &'a str, spec: &'a AppSpec, replicas: u32, revision: &'a str) -> AppView<'a> {
        AppView {
            name,
            source: Path::new("/etc/clusterd/apps/x.yaml"),
            spec,
            replicas,
            revision,
        }
    }

    fn modified(path: &str) -> FieldChange {
        FieldChange {
            path: path.to_string(),
            kind: ChangeKind::Modified,
        }
    }

    fn field(path: &str, kind: ChangeKind) -> FieldChange {
        FieldChange {
            path: path.to_string(),
            kind,
        }
    }

    /// One app on both sides: (case, old yaml, old replicas, old rev, new yaml, new
    /// replicas, new rev, expected change).
    #[test]
    #[allow(clippy::type_complexity)] // a flat tuple keeps each row of the table on one screen
    fn classifies_one_app() {
        let base = BASE.to_string();
        let cases: Vec<(&str, String, u32, &str, String, u32, &str, AppChange)> = vec![
            ("identical", base.clone(), 2, "r1", base.clone(), 2, "r1", AppChange::Unchanged),
            (
                "shell string equals argv",
                base.clone(),
                2,
                "r1",
                base.replace("[node, server.js]", "\"node server.js\""),
                2,
                "r1",
                AppChange::Unchanged,
            ),
            (
                "scaled only",
                base.clone(),
                2,
                "r1",
                format!("{base}instances: 4\n"),
                4,
                "r1",
                AppChange::Updated(Update {
                    scaled: Some(Scale { from: 2, to: 4 }),
                    settings: vec![modified("instances")],
                    ..Update::default()
                }),
            ),
            (
                "command and env value",
                base.clone(),
                2,
                "r1",
                "command: [node, app.js]\nenv: {API_KEY: other, MODE: prod}\n".to_string(),
                2,
                "r2",
                AppChange::Updated(Update {
                    rolling: Some(Rolling { fields: vec![modified("command"), modified("env.API_KEY")] }),
                    ..Update::default()
                }),
            ),
            (
                "env keys added and removed, listen changed, scaled",
                base.clone(),
                2,
                "r1",
                "command: [node, server.js]\nenv: {MODE: prod, DEBUG: '1'}\nlisten: [{port: 8080}]\n".to_string(),
                4,
                "r2",
                AppChange::Updated(Update {
                    scaled: Some(Scale { from: 2, to: 4 }),
                    rolling: Some(Rolling {
                        fields: vec![
                            field("env.API_KEY", ChangeKind::Removed),
                            field("env.DEBUG", ChangeKind::Added),
                            modified("listen"),
                        ],
                    }),
                    settings: vec![],
                }),
            ),
            (
                "settings only",
                base.clone(),
                2,
                "r1",
                format!(
                    "{base}rollout: {{maxSurge: 2}}\nshutdown: {{timeout: 30s}}\nreadiness: {{type: http, path: /healthz}}\nliveness: {{type: tcp}}\n"
                ),
                2,
                "r1",
                AppChange::Updated(Update {
                    settings: vec![
                        field("readiness.type", ChangeKind::Added),
                        field("readiness.path", ChangeKind::Added),
                        field("liveness", ChangeKind::Added),
                        modified("rollout.maxSurge"),
                        modified("shutdown.timeout"),
                    ],
                    ..Update::default()
                }),
            ),
            (
                "revision changed for a reason not named",
                base.clone(),
                1,
                "r1",
                base.clone(),
                1,
                "r2",
                AppChange::Updated(Update { rolling: Some(Rolling::default()), ..Update::default() }),
            ),
            (
                "limits roll, same revision reported as settings",
                base.clone(),
                1,
                "r1",
                format!("{base}limits: {{memory: 512Mi}}\n"),
                1,
                "r1",
                AppChange::Updated(Update {
                    settings: vec![field("limits.memory", ChangeKind::Added)],
                    ..Update::default()
                }),
            ),
            (
                "liveness fields",
                format!("{base}liveness: {{type: http, path: /a}}\n"),
                1,
                "r1",
                format!("{base}liveness: {{type: http, path: /b, failureThreshold: 5}}\n"),
                1,
                "r1",
                AppChange::Updated(Update {
                    settings: vec![modified("liveness.path"), modified("liveness.failureThreshold")],
                    ..Update::default()
                }),
            ),
        ];
        for (case, old_yaml, old_n, old_rev, new_yaml, new_n, new_rev, expected) in cases {
            let (old, new) = (spec(&old_yaml), spec(&new_yaml));
            let got = diff(
                &[view("web", &old, old_n, old_rev)],
                &[view("web", &new, new_n, new_rev)],
            );
            assert_eq!(
                got.apps,
                vec![AppDiff {
                    name: "web".into(),
                    change: expected
                }],
                "case: {case}"
            );
        }
    }

    #[test]
    fn created_deleted_and_order() {
        let s = spec(BASE);
        let installed = [view("web", &s, 2, "r1"), view("old", &s, 3, "r1")];
        let candidates = [view("web", &s, 2, "r1"), view("api", &s, 2, "r1")];
        let got = diff(&installed, &candidates);
        let names: Vec<_> = got.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["api", "old", "web"]);
        assert!(matches!(
            got.apps[0].change,
            AppChange::Created { replicas: 2, .. }
        ));
        assert!(matches!(
            got.apps[1].change,
            AppChange::Deleted { replicas: 3, .. }
        ));
        assert_eq!(got.apps[2].change, AppChange::Unchanged);
        assert!(got.has_changes());
        assert_eq!(got.exit_code(), 1);
    }

    #[test]
    fn exit_code_zero_when_nothing_changes() {
        let s = spec(BASE);
        let got = diff(&[view("web", &s, 2, "r1")], &[view("web", &s, 2, "r1")]);
        assert!(!got.has_changes());
        assert_eq!(got.exit_code(), 0);
        assert_eq!(got.render(), "no changes (1 app unchanged)\n");
        assert_eq!(diff(&[], &[]).exit_code(), 0);
    }

    #[test]
    fn renders_like_a_plan() {
        let (old, new) = (
            spec(BASE),
            spec("command: [node, app.js]\nenv: {API_KEY: rotated, MODE: prod, X: y}\n"),
        );
        let settings = spec(&format!("{BASE}shutdown: {{signal: SIGTERM}}\n"));
        let installed = [
            view("web", &old, 2, "r1"),
            view("old", &old, 3, "r1"),
            view("cfg", &old, 1, "r1"),
            view("same", &old, 1, "r1"),
        ];
        let candidates = [
            view("web", &new, 4, "r2"),
            AppView {
                source: Path::new("apps/api.yaml"),
                ..view("api", &old, 2, "r1")
            },
            view("cfg", &settings, 1, "r1"),
            view("same", &old, 1, "r1"),
        ];
        let text = diff(&installed, &candidates).render();
        assert_eq!(
            text,
            "+ api: created (2 instances) from apps/api.yaml\n\
             ~ cfg: settings only (shutdown.signal changed), no worker restarted for them\n\
             - old: deleted (3 instances drained and stopped)\n\
             ~ web: rolling replacement (command, env.API_KEY changed; env.X added); scaled 2 -> 4\n\
             1 to create, 2 to update, 1 to delete, 1 unchanged\n"
        );
    }

    #[test]
    fn never_prints_env_values() {
        let old = spec("command: [x]\nenv: {API_KEY: hunter2-old, TOKEN: tok-old}\n");
        let new = spec("command: [x]\nenv: {API_KEY: hunter2-new}\n");
        let got = diff(&[view("web", &old, 1, "r1")], &[view("web", &new, 1, "r2")]);
        let text = format!("{}{got:?}", got.render());
        for secret in ["hunter2-old", "hunter2-new", "tok-old"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(
            text.contains("env.API_KEY changed; env.TOKEN removed"),
            "{text}"
        );
    }
}

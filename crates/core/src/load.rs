//! Loading a set of manifest files into apps: parse, validate, check across apps.
//!
//! Pure: the caller reads the files (and the CPU count) and passes them in, so the daemon,
//! the CLI and tests share one code path and tests need no filesystem.
//!
//! # Guarantees
//! - Never panics and never stops at the first problem: every document of every file is
//!   read, and every problem is reported as a [`Diagnostic`].
//! - An app appears in exactly one of [`LoadReport::apps`] and [`LoadReport::errors`].
//! - Two documents naming one app: both are rejected, each error naming the other place.
//! - A listener conflict between a newcomer and an incumbent (an app already running from
//!   the same file) rejects only the newcomer: nobody's bad edit harms a running app.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::diagnostic::Diagnostic;
use crate::error::ManifestError;
use crate::model::{AppSpec, Listener};
use crate::plan::{AppName, Revision};
use crate::recover;
use crate::revision::revision;
use crate::validate::{
    self, host_issues, listener_label, listeners_overlap, validate_manifest, Issue,
};
use crate::yaml::{self, Chunk, Pos, PosIndex, MAX_FILE_BYTES};

/// One manifest file as read from disk. Bytes, not text: a file that is not UTF-8 is
/// reported as a problem of that file rather than failing the caller's read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// The path as it should appear in messages; its directory anchors a relative
    /// `workingDir`, so the daemon passes absolute paths.
    pub path: PathBuf,
    /// The file's content.
    pub bytes: Vec<u8>,
}

impl ManifestFile {
    /// A file from its path and content.
    pub fn new(path: impl Into<PathBuf>, bytes: impl Into<Vec<u8>>) -> Self {
        ManifestFile {
            path: path.into(),
            bytes: bytes.into(),
        }
    }
}

/// What loading needs to know about the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadContext {
    /// Usable CPUs (affinity and cgroup quota applied), for `instances: max` and `-K`.
    pub cpus: u32,
    /// Apps running now, and the file each came from.
    pub incumbents: BTreeMap<AppName, PathBuf>,
    /// Why `mode: shared` cannot work on this host (kernel too old, seccomp unavailable),
    /// as the runtime's probe words it; `None` when it can, or when unknown (an offline
    /// `clusterd validate` may run on another machine than the daemon).
    pub shared_mode_unavailable: Option<String>,
}

/// A valid app, normalized for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedApp {
    /// `metadata.name`.
    pub name: AppName,
    /// Normalized: `command` is `CommandLine::Argv`, `workingDir` is set (joined to the
    /// manifest's directory), `readiness.type` is set, signal names are `SIGTERM`-style.
    pub spec: AppSpec,
    /// The file it came from.
    pub source: PathBuf,
    /// Hash of the worker-shaping part of the spec.
    pub revision: Revision,
    /// `instances` resolved against the CPU count.
    pub replicas: u32,
}

impl LoadedApp {
    /// The worker's argv: load already split a string command (shell quoting rules, no
    /// shell), so no consumer ever splits again or handles a split error.
    #[must_use]
    pub fn argv(&self) -> &[String] {
        match &self.spec.command {
            crate::model::CommandLine::Argv(a) => a,
            // Unreachable after `load` (normalized); an empty argv fails the spawn with
            // a clear error instead of panicking.
            crate::model::CommandLine::Shell(_) => &[],
        }
    }
}

/// The file that marks an apps dir as managed by GitOps (`apply` refuses to write
/// there). One constant for the daemon, the sync and the CLI.
pub const GIT_MARKER: &str = ".clusterd-git";

/// Which files of the apps dir are manifests: `*.yaml`/`*.yml`, not hidden (editor swap
/// files, the GitOps marker, temp files of atomic writes), not an editor backup (`~`).
/// The one rule the daemon's intake, `apply`, `validate DIR` and the GitOps prune share,
/// so a sync never prunes what the daemon loads or the reverse.
#[must_use]
pub fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with('~')
        && !name.contains('/')
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// The outcome of [`load`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Valid apps by name.
    pub apps: BTreeMap<AppName, LoadedApp>,
    /// Rejected apps, by app name, or by the file's stem when no name could be read;
    /// each list sorted by file, line and column.
    pub errors: BTreeMap<String, Vec<Diagnostic>>,
    /// Problems that reject nothing but are likely mistakes (`$PORT` in an argv, which
    /// no shell expands), of valid and rejected apps alike; sorted by file, line, column.
    pub warnings: Vec<Diagnostic>,
}

impl LoadReport {
    /// Every diagnostic, in file order (as passed to [`load`]), then line and column.
    #[must_use]
    pub fn diagnostics(&self, files: &[ManifestFile]) -> Vec<&Diagnostic> {
        let order = |p: &Path| files.iter().position(|f| f.path == p).unwrap_or(usize::MAX);
        let mut all: Vec<&Diagnostic> = self.errors.values().flatten().collect();
        all.sort_by(|a, b| {
            (order(&a.file), a.line, a.column).cmp(&(order(&b.file), b.line, b.column))
        });
        all.dedup();
        all
    }
}

/// One document on its way through loading.
struct Doc {
    file: PathBuf,
    /// App name, or the file's stem when none could be read.
    key: String,
    /// Set when the document names an app (even an invalid one), for the duplicate check.
    named: Option<Pos>,
    index: PosIndex,
    outcome: Result<LoadedApp, Vec<Diagnostic>>,
    /// Problems that do not reject the app (`$PORT` that no shell will expand).
    warnings: Vec<Diagnostic>,
}

/// Loads manifests: parses every document, validates it, then checks across apps.
///
/// # Guarantees
/// See the module documentation. Deterministic: same input, same report.
#[must_use]
pub fn load(files: &[ManifestFile], ctx: &LoadContext) -> LoadReport {
    let mut docs: Vec<Doc> = files.iter().flat_map(|f| load_file(f, ctx)).collect();
    reject_duplicate_names(&mut docs);
    reject_listener_conflicts(&mut docs, ctx);

    let mut report = LoadReport::default();
    for doc in docs {
        report.warnings.extend(doc.warnings);
        match doc.outcome {
            Ok(app) => {
                report.apps.insert(app.name.clone(), app);
            }
            Err(diags) => report.errors.entry(doc.key).or_default().extend(diags),
        }
    }
    for diags in report.errors.values_mut() {
        diags.sort();
        diags.dedup();
    }
    report.warnings.sort();
    report.warnings.dedup();
    report
}

/// Checks files offline, for `clusterd validate FILE...`: every problem as a
/// `file:line:column: message` line, in the order the files were given. Empty means all
/// files are valid (exit 0); otherwise the CLI prints the lines and exits 1.
#[must_use]
pub fn validate_files(files: &[ManifestFile], cpus: u32) -> Vec<String> {
    let report = load(
        files,
        &LoadContext {
            cpus,
            incumbents: BTreeMap::new(),
            shared_mode_unavailable: None,
        },
    );
    report
        .diagnostics(files)
        .into_iter()
        .map(ToString::to_string)
        .collect()
}

/// What `clusterd validate` prints: errors and warnings as `file:line:column:` lines,
/// in the order the files were given, then by position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Every line to print; warnings read `file:line:column: warning: ...`.
    pub lines: Vec<String>,
    /// How many of them are errors (any error: exit 1; warnings alone: exit 0).
    pub errors: usize,
}

/// Like [`validate_files`], with the warnings interleaved in position order.
#[must_use]
pub fn check_files(files: &[ManifestFile], cpus: u32) -> Checked {
    let report = load(
        files,
        &LoadContext {
            cpus,
            ..LoadContext::default()
        },
    );
    let order = |p: &Path| files.iter().position(|f| f.path == p).unwrap_or(usize::MAX);
    let errors = report.diagnostics(files);
    let mut all: Vec<(&Diagnostic, bool)> = errors.iter().map(|d| (*d, false)).collect();
    all.extend(report.warnings.iter().map(|d| (d, true)));
    all.sort_by(|(a, aw), (b, bw)| {
        (order(&a.file), a.line, a.column, aw).cmp(&(order(&b.file), b.line, b.column, bw))
    });
    Checked {
        lines: all
            .into_iter()
            .map(|(d, warning)| {
                if warning {
                    d.warning_line()
                } else {
                    d.to_string()
                }
            })
            .collect(),
        errors: errors.len(),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

fn diag(file: &Path, pos: Pos, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: pos.line,
        column: pos.column,
        message: message.into(),
    }
}

fn load_file(file: &ManifestFile, ctx: &LoadContext) -> Vec<Doc> {
    let path = &file.path;
    let whole_file_error = |pos: Pos, e: ManifestError| {
        vec![Doc {
            file: path.clone(),
            key: stem(path),
            named: None,
            index: PosIndex::default(),
            outcome: Err(vec![diag(path, pos, e.to_string())]),
            warnings: Vec::new(),
        }]
    };
    let start = Pos { line: 1, column: 1 };
    if file.bytes.len() > MAX_FILE_BYTES {
        return whole_file_error(
            start,
            ManifestError::TooLarge {
                size: file.bytes.len(),
                max: MAX_FILE_BYTES,
            },
        );
    }
    let text = match std::str::from_utf8(&file.bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = &file.bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            return whole_file_error(Pos { line, column }, ManifestError::NotUtf8);
        }
    };
    let chunks = yaml::split_documents(text);
    if chunks.is_empty() {
        return whole_file_error(start, ManifestError::Empty);
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    chunks
        .into_iter()
        .map(|chunk| load_document(path, &dir, chunk, ctx))
        .collect()
}

fn load_document(path: &Path, dir: &Path, chunk: Chunk<'_>, ctx: &LoadContext) -> Doc {
    let fail = |index: PosIndex, diags: Vec<Diagnostic>, warnings: Vec<Diagnostic>| {
        let named = index.name_hint().map(|_| index.value("metadata.name"));
        let key = index.name_hint().map_or_else(|| stem(path), str::to_string);
        Doc {
            file: path.to_path_buf(),
            key,
            named,
            index,
            outcome: Err(diags),
            warnings,
        }
    };
    let index = match yaml::index(chunk) {
        Ok(index) => index,
        Err(p) => {
            return fail(
                PosIndex::default(),
                vec![diag(path, p.pos, p.message)],
                Vec::new(),
            )
        }
    };
    let recovered = recover::parse_typed_all(chunk, &index);
    let mut diags: Vec<Diagnostic> = recovered
        .problems
        .iter()
        .map(|p| diag(path, p.pos, p.message.clone()))
        .collect();
    let Some(manifest) = recovered.manifest else {
        return fail(index, diags, Vec::new());
    };
    let warnings = validate::warnings(&manifest.spec)
        .into_iter()
        .map(|i| diag(path, index.value(&i.path), i.message))
        .collect();
    let to_diag = |i: Issue| {
        let pos = if i.at_key {
            index.key(&i.path)
        } else {
            index.value(&i.path)
        };
        diag(path, pos, i.message)
    };
    let host = host_issues(&manifest.spec, ctx.shared_mode_unavailable.as_deref());
    let validated = match validate_manifest(&manifest, dir, ctx.cpus) {
        Ok(_) if !host.is_empty() => Err(host),
        Ok(ok) => Ok(ok),
        Err(mut issues) => {
            issues.extend(host);
            Err(issues)
        }
    };
    match validated {
        Ok((spec, replicas)) if diags.is_empty() => {
            let name = AppName(manifest.metadata.name.clone());
            let app = LoadedApp {
                revision: revision(&spec),
                name,
                spec,
                source: path.to_path_buf(),
                replicas,
            };
            Doc {
                file: path.to_path_buf(),
                key: manifest.metadata.name,
                named: Some(index.value("metadata.name")),
                index,
                outcome: Ok(app),
                warnings,
            }
        }
        Ok(_) => fail(index, diags, warnings),
        Err(issues) => {
            // After a structural error the manifest was read from an edited text: keep
            // only the issues the edits cannot have caused.
            let edited = &recovered.edited;
            diags.extend(
                issues
                    .into_iter()
                    .filter(|i| !edited.iter().any(|e| caused_by_edit(&i.path, e)))
                    .map(to_diag),
            );
            fail(index, diags, warnings)
        }
    }
}

/// Whether a validation issue at `issue` may only exist because recovery cut or
/// replaced `edit`: the same place, above or below it, a later item of a sequence whose
/// item was cut (indices moved), or a probe check that depends on the listeners.
fn caused_by_edit(issue: &str, edit: &str) -> bool {
    let seq = edit
        .ends_with(']')
        .then(|| yaml::parent(edit).unwrap_or(""));
    recover::is_within(issue, edit)
        || recover::is_within(edit, issue)
        || seq.is_some_and(|s| recover::is_within(issue, s))
        || (recover::is_within(edit, "spec.listen")
            && (issue == "spec.readiness.type" || issue == "spec.liveness.type"))
}

/// Adds `diag` to a document's errors, turning a loaded app into a rejected one.
fn reject(doc: &mut Doc, diag: Diagnostic) {
    match &mut doc.outcome {
        Ok(_) => doc.outcome = Err(vec![diag]),
        Err(diags) => diags.push(diag),
    }
}

fn reject_duplicate_names(docs: &mut [Doc]) {
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, doc) in docs.iter().enumerate() {
        if doc.named.is_some() {
            by_name.entry(doc.key.clone()).or_default().push(i);
        }
    }
    for (name, idxs) in by_name.into_iter().filter(|(_, v)| v.len() > 1) {
        let places: Vec<(PathBuf, Pos)> = idxs
            .iter()
            .map(|&i| {
                (
                    docs[i].file.clone(),
                    docs[i].named.unwrap_or(Pos { line: 1, column: 1 }),
                )
            })
            .collect();
        for (k, &i) in idxs.iter().enumerate() {
            let others: Vec<String> = places
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .map(|(_, (f, p))| format!("{}:{}:{}", f.display(), p.line, p.column))
                .collect();
            let (file, pos) = &places[k];
            let d = diag(
                file,
                *pos,
                format!(
                    "app `{name}` is also defined at {} (expected each app name in one manifest only; both are rejected)",
                    others.join(", ")
                ),
            );
            reject(&mut docs[i], d);
        }
    }
}

fn reject_listener_conflicts(docs: &mut [Doc], ctx: &LoadContext) {
    let valid: Vec<usize> = (0..docs.len())
        .filter(|&i| docs[i].outcome.is_ok())
        .collect();
    let mut rejections: Vec<(usize, Diagnostic)> = Vec::new();
    let listeners = |doc: &Doc| -> Vec<Listener> {
        doc.outcome
            .as_ref()
            .map(|a| a.spec.listen.clone())
            .unwrap_or_default()
    };
    let incumbent = |doc: &Doc| {
        doc.outcome.as_ref().is_ok_and(|a| {
            ctx.incumbents
                .get(&a.name)
                .is_some_and(|src| *src == doc.file)
        })
    };
    for (x, &a) in valid.iter().enumerate() {
        for &b in &valid[x + 1..] {
            let (la, lb) = (listeners(&docs[a]), listeners(&docs[b]));
            for (ia, l1) in la.iter().enumerate() {
                for (ib, l2) in lb.iter().enumerate() {
                    if !listeners_overlap(l1, l2) {
                        continue;
                    }
                    let (inc_a, inc_b) = (incumbent(&docs[a]), incumbent(&docs[b]));
                    // Only the newcomer loses when exactly one side is running from this
                    // very file; otherwise there is no telling who is right: both lose.
                    let losers: Vec<(usize, usize, usize, usize)> = match (inc_a, inc_b) {
                        (true, false) => vec![(b, ib, a, ia)],
                        (false, true) => vec![(a, ia, b, ib)],
                        _ => vec![(a, ia, b, ib), (b, ib, a, ia)],
                    };
                    for (loser, li, winner, wi) in losers {
                        let (ld, wd) = (&docs[loser], &docs[winner]);
                        let lpath = format!("spec.listen[{li}].port");
                        let wpos = wd.index.value(&format!("spec.listen[{wi}].port"));
                        let own = if loser == a { l1 } else { l2 };
                        let other = if loser == a { l2 } else { l1 };
                        let message = format!(
                            "{} overlaps {} of app `{}` at {}:{}:{} (expected a port no other app uses)",
                            listener_label(own),
                            listener_label(other),
                            wd.key,
                            wd.file.display(),
                            wpos.line,
                            wpos.column
                        );
                        rejections.push((loser, diag(&ld.file, ld.index.value(&lpath), message)));
                    }
                }
            }
        }
    }
    for (i, d) in rejections {
        reject(&mut docs[i], d);
    }
}

//! Reading the apps dir: which manifest files changed, which may be read now, and the
//! loaded result.
//!
//! A changed file is read under a read lease (`clusterd_runtime::quiet_read`): if nobody
//! has it open for writing, what is read is a whole version, taken at once (an atomic
//! rename or a closed write is picked up with no delay); if someone is writing it, it
//! waits for the writer's close (bounded). Where leases are unavailable, the pure rule
//! in `clusterd_core::intake` decides from the watcher's events and the file's age.
//!
//! Each file is known by its identity and timestamps (device, inode, size, mtime, ctime):
//! a file whose stat did not change is not read or parsed again, so a scan of an
//! unchanged dir costs a `readdir` and a `stat` per file, and the daemon's own reads
//! never look like changes. When nothing changed, a scan loads nothing at all.
//!
//! A file that exists but cannot be read (permissions, a symlink loop, a dangling
//! symlink) is not a deleted file: its app keeps its last good revision and shows the
//! reason as phase Invalid. Only a file that is gone from the directory removes its app.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clusterd_core::intake::{settle, Change, Verdict, WriteState};
use clusterd_core::load::{is_manifest_name, LoadContext, ManifestFile};
use clusterd_core::plan::AppName;
use clusterd_core::{Diagnostic, LoadReport};
use clusterd_runtime::quiet_read::{read_quiet, QuietRead};

/// The identity and timestamps of a file: equal means unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct FileEntry {
    /// The stat of the content in `bytes` (what was last read).
    read_key: Option<StatKey>,
    /// The content last read (and accepted by the hold-back rule).
    bytes: Option<Vec<u8>>,
    /// Since when a newer content has been held back.
    held_since: Option<Instant>,
    /// Why the file cannot be read now, if it cannot.
    unreadable: Option<String>,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The loaded apps and rejected files, when anything changed; `None` when nothing
    /// did (no load was done: the previous result stands).
    pub report: Option<LoadReport>,
    /// Every app named by a file that exists (including held-back and unreadable ones):
    /// an app not in this list is gone. `None` when the dir could not be read (then
    /// nothing is gone).
    pub present: Option<Vec<AppName>>,
    /// Look again by then: a file is held back.
    pub recheck_at: Option<Instant>,
    /// Manifest files read (not from the cache) in this scan.
    pub reads: usize,
}

/// The daemon's view of its apps dir, between scans.
#[derive(Debug)]
pub struct Intake {
    dir: PathBuf,
    cpus: u32,
    files: BTreeMap<PathBuf, FileEntry>,
    /// What the watcher saw last of each file, and for a close, the file's stat just
    /// after it: a later change with no close of its own is a new, unfinished write.
    writes: BTreeMap<PathBuf, (WriteState, Option<StatKey>)>,
    /// Names per file from the last load, for `present` and unreadable files.
    names: BTreeMap<PathBuf, Vec<AppName>>,
    /// The last scan found a change that was not loaded yet (it was held back).
    dirty: bool,
    /// Total manifest reads (for tests and the idle-cost check).
    pub reads_total: usize,
    /// Total loads (parses of every file), for the same.
    pub loads_total: usize,
}

impl Intake {
    /// An intake of `dir`, resolving `instances: max` against `cpus`.
    pub fn new(dir: PathBuf, cpus: u32) -> Self {
        Intake {
            dir,
            cpus,
            files: BTreeMap::new(),
            writes: BTreeMap::new(),
            names: BTreeMap::new(),
            dirty: true,
            reads_total: 0,
            loads_total: 0,
        }
    }

    /// What the watcher saw of a file (see [`WriteState`]).
    pub fn saw(&mut self, path: PathBuf, state: WriteState) {
        let key = (state == WriteState::Closed)
            .then(|| std::fs::metadata(&path).ok().map(|m| StatKey::of(&m)))
            .flatten();
        self.writes.insert(path, (state, key));
    }

    /// The write state of `path` now that its stat is `key`: a close only vouches for
    /// the content it closed.
    fn write_state(
        writes: &BTreeMap<PathBuf, (WriteState, Option<StatKey>)>,
        path: &Path,
        key: StatKey,
    ) -> WriteState {
        match writes.get(path) {
            Some((WriteState::Closed, Some(closed))) if *closed == key => WriteState::Closed,
            Some((WriteState::Closed, _)) | None => WriteState::Unknown,
            Some((state, _)) => *state,
        }
    }

    /// Scans the dir. `incumbents` are the apps running now and their files (a listener
    /// conflict then rejects only the newcomer); `refuse` may move apps to errors (the
    /// root-owned check).
    pub fn scan(
        &mut self,
        now: Instant,
        incumbents: BTreeMap<AppName, PathBuf>,
        refuse: impl Fn(&mut LoadReport, &Path),
    ) -> Scan {
        let mut scan = Scan::default();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot read the apps dir");
                return scan;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(is_manifest_name))
            .map(|e| e.path())
            .collect();
        paths.sort();
        let mut changed = self.dirty;
        // Files gone from the dir.
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        self.names.retain(|p, _| paths.contains(p));
        self.writes.retain(|p, _| paths.contains(p));
        changed |= self.files.len() != before;
        let mut hold_until: Option<Instant> = None;
        for path in &paths {
            let entry = self.files.entry(path.clone()).or_default();
            let meta = match std::fs::metadata(path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => {
                    set_unreadable(entry, "not a regular file".into(), &mut changed);
                    continue;
                }
                Err(e) => {
                    // Listed by readdir but not stat-able: a dangling symlink or a
                    // loop, or no permission. It exists: not a deletion.
                    set_unreadable(entry, describe_io(&e), &mut changed);
                    continue;
                }
            };
            let key = StatKey::of(&meta);
            if entry.read_key == Some(key) && entry.unreadable.is_none() {
                entry.held_since = None;
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            let held_since = *entry.held_since.get_or_insert(now);
            let held_for = now.saturating_duration_since(held_since);
            // Read under a lease: a whole version of the file, or "someone is writing
            // it" (then its close wakes us). Without leases, the watcher's events and
            // the file's age decide (clusterd_core::intake).
            let outcome = match read_quiet(path) {
                Ok(QuietRead::Whole(bytes)) => Ok(Some(bytes)),
                Ok(QuietRead::BeingWritten) => {
                    let verdict = settle(Change {
                        write: WriteState::Open,
                        age,
                        held_for,
                    });
                    match verdict {
                        Verdict::Read => std::fs::read(path).map(Some),
                        Verdict::Hold(d) => {
                            hold(&mut hold_until, now + d);
                            Ok(None)
                        }
                    }
                }
                Ok(QuietRead::Unchecked(bytes)) => {
                    let verdict = settle(Change {
                        write: Self::write_state(&self.writes, path, key),
                        age,
                        held_for,
                    });
                    match verdict {
                        Verdict::Read => Ok(Some(bytes)),
                        Verdict::Hold(d) => {
                            hold(&mut hold_until, now + d);
                            Ok(None)
                        }
                    }
                }
                Err(e) => Err(e),
            };
            tracing::debug!(file = %path.display(), held = ?held_for, read = matches!(outcome, Ok(Some(_))), "manifest changed");
            match outcome {
                Ok(None) => self.dirty = true,
                Ok(Some(bytes)) => {
                    entry.held_since = None;
                    scan.reads += 1;
                    self.reads_total += 1;
                    entry.read_key = Some(key);
                    entry.unreadable = None;
                    entry.bytes = Some(bytes);
                    changed = true;
                }
                Err(e) => {
                    entry.held_since = None;
                    entry.read_key = None;
                    entry.unreadable = Some(describe_io(&e));
                    changed = true;
                }
            }
        }
        scan.recheck_at = hold_until;
        if hold_until.is_none() {
            self.dirty = false;
        }
        if changed {
            self.loads_total += 1;
            let report = self.load(incumbents, &refuse);
            self.names.clear();
            for (name, app) in &report.apps {
                self.names
                    .entry(app.source.clone())
                    .or_default()
                    .push(name.clone());
            }
            for (key, diags) in &report.errors {
                for d in diags {
                    let names = self.names.entry(d.file.clone()).or_default();
                    let name = AppName(key.clone());
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            scan.report = Some(report);
        }
        // Present: every app a listed file names, and for files never read yet (held
        // back), their stem: such an app is not gone.
        let mut present: Vec<AppName> = self.names.values().flatten().cloned().collect();
        for path in &paths {
            if !self.names.contains_key(path) {
                present.extend(peek_names(path, self.cpus));
            }
        }
        present.sort();
        present.dedup();
        scan.present = Some(present);
        scan
    }

    fn load(
        &self,
        incumbents: BTreeMap<AppName, PathBuf>,
        refuse: &impl Fn(&mut LoadReport, &Path),
    ) -> LoadReport {
        let files: Vec<ManifestFile> = self
            .files
            .iter()
            .filter_map(|(p, e)| Some(ManifestFile::new(p.clone(), e.bytes.clone()?)))
            .collect();
        let mut report = clusterd_core::load::load(
            &files,
            &LoadContext {
                cpus: self.cpus,
                incumbents,
                shared_mode_unavailable: clusterd_runtime::seccomp::shared_mode_support().err(),
            },
        );
        refuse(&mut report, &self.dir);
        // A file that cannot be read keeps its apps at their last good revision, as
        // Invalid with the reason.
        for (path, entry) in &self.files {
            let Some(why) = &entry.unreadable else {
                continue;
            };
            let diagnostic = Diagnostic {
                file: path.clone(),
                line: 1,
                column: 1,
                message: format!("cannot read the manifest: {why}"),
            };
            let mut names: Vec<AppName> = report
                .apps
                .iter()
                .filter(|(_, a)| &a.source == path)
                .map(|(n, _)| n.clone())
                .collect();
            if names.is_empty() {
                names = self.names.get(path).cloned().unwrap_or_default();
            }
            if names.is_empty() {
                names.push(AppName(stem(path)));
            }
            for name in names {
                report.apps.remove(&name);
                report
                    .errors
                    .entry(name.0)
                    .or_default()
                    .push(diagnostic.clone());
            }
        }
        report
    }
}

/// The apps a held-back file names right now (parsed, not accepted), so that an app
/// whose new file is still being written is never taken as gone; the stem if the file
/// cannot tell.
fn peek_names(path: &Path, cpus: u32) -> Vec<AppName> {
    let Ok(bytes) = std::fs::read(path) else {
        return vec![AppName(stem(path))];
    };
    let report = clusterd_core::load::load(
        &[ManifestFile::new(path, bytes)],
        &LoadContext {
            cpus,
            incumbents: BTreeMap::new(),
            shared_mode_unavailable: None,
        },
    );
    let mut names: Vec<AppName> = report.apps.into_keys().collect();
    names.extend(report.errors.into_keys().map(AppName));
    if names.is_empty() {
        names.push(AppName(stem(path)));
    }
    names
}

fn hold(until: &mut Option<Instant>, at: Instant) {
    *until = Some(until.map_or(at, |u| u.min(at)));
}

fn set_unreadable(entry: &mut FileEntry, why: String, changed: &mut bool) {
    if entry.unreadable.as_deref() != Some(&why) {
        entry.unreadable = Some(why);
        entry.read_key = None;
        *changed = true;
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "too many levels of symbolic links (a symlink loop)".into(),
        Some(libc::ENOENT) => "it is a dangling symbolic link".into(),
        Some(libc::EACCES) => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

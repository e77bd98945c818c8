//! One sync: fetch, compare the commit's manifests with the apps dir, write and prune.
//!
//! # The "really deleted" rule
//!
//! A commit whose directory holds no manifest, applied to an apps dir that holds some,
//! would stop every app on the host. That is right when someone deleted the apps in the
//! repository and wrong when the configuration or the history is off (a typo in
//! `--git-path`, a force-push of an unrelated branch, a ref pointing somewhere else).
//! The sync prunes everything only when the deletion is proven to be a commit in the
//! history it has been following:
//!
//! 1. the directory still exists in the new commit (git has no empty directories, so this
//!    means some other file is left in it: a README, or the marker below), **and**
//! 2. one of:
//!    - the directory holds a `.clusterd-allow-empty` file (explicit opt-in), or
//!    - the last applied commit (recorded in the state dir, same repo and path) is the
//!      new commit itself or one of its ancestors: every manifest it had and the new one
//!      lacks was then deleted by commits between the two, on the line being followed.
//!
//! Otherwise the sync fails with "refusing to prune every app: ..." and touches no
//! manifest. A missing directory is always refused (when the apps dir has manifests) or
//! reported as an error (when it is empty), because it is a wrong path far more often
//! than a deliberate deletion.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::git::{CommitId, EntryKind, Git, TreeEntry};
use super::{is_manifest_name, normalize_git_path, GitOpsConfig, GitOpsError, SyncOutcome};

/// Marker in the apps dir saying "git owns this directory"; `clusterd apply` checks for
/// this exact name and refuses to write.
pub const MARKER_FILE: &str = clusterd_core::load::GIT_MARKER;

/// A file in the repository directory that allows a commit with no manifests to prune
/// every app (see the module docs).
pub const ALLOW_EMPTY_FILE: &str = ".clusterd-allow-empty";

/// Prefix of the sync's temp files. It starts with `.` so the daemon's loader (and its
/// watcher filter) never treats a half-written file as a manifest.
const TEMP_PREFIX: &str = ".clusterd-sync-";

/// The last applied commit, as recorded in `<state-dir>/git/applied.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    /// Repository URL, redacted.
    pub repo: String,
    /// The ref that was followed.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The normalized repository path.
    pub path: String,
    /// The commit the apps dir was made to match.
    pub commit: String,
}

fn applied_path(state_dir: &Path) -> PathBuf {
    state_dir.join("git").join("applied.json")
}

/// Reads the applied-commit record; `None` if there is none or it is unreadable (a
/// missing record only makes the safety rule stricter, never looser).
pub fn read_applied(state_dir: &Path) -> Option<AppliedRecord> {
    let bytes = fs::read(applied_path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Makes `cfg.apps_dir` hold exactly the manifests under `cfg.path` at the commit
/// `cfg.git_ref` names now.
///
/// Does not parse or validate manifests: bytes are copied as they are (binary junk
/// included) and the daemon's loader judges them, so a bad manifest only affects its own
/// app.
///
/// # Guarantees
/// - Every write is atomic (hidden temp file in the apps dir, fsync, rename): a reader
///   sees the old content or the new, never a mix. Files are written mode 0644 (the
///   daemon, as root, refuses group- or world-writable manifests).
/// - New and changed files are written before stale ones are removed, so renaming a file
///   in the repository never stops the app in between.
/// - Never prunes every manifest unless the "really deleted" rule (module docs) holds.
/// - Only `*.yaml`/`*.yml` names that are not hidden are ever written or removed; other
///   files in the apps dir are left alone.
/// - Idempotent: running it again on the same commit changes nothing.
/// - The `.clusterd-git` marker is written before anything is fetched, so `apply` refuses
///   the dir even while the first fetch is failing.
///
/// # Errors
/// Fetch and git failures, the safety rule, a bad `--git-path`, and file system errors.
/// On error after some writes, the files written are complete and the next sync finishes
/// the job (the operation is level-triggered, not transactional).
pub fn sync_once(git: &dyn Git, cfg: &GitOpsConfig) -> Result<SyncOutcome, GitOpsError> {
    let path = normalize_git_path(&cfg.path)?;
    let apps_dir = &cfg.apps_dir;
    fs::create_dir_all(apps_dir).map_err(|e| GitOpsError::io("create", apps_dir, e))?;
    write_marker(cfg, &path)?;
    sweep_temp_files(apps_dir);

    let commit = git.fetch(&cfg.repo, &cfg.git_ref)?;
    let entries = git.list_dir(&commit, &path)?;
    let desired = match &entries {
        Some(entries) => read_manifests(git, &commit, &path, entries)?,
        None => BTreeMap::new(),
    };
    let current = read_current(apps_dir)?;

    if desired.is_empty() {
        let shown_path = if path.is_empty() {
            ".".to_owned()
        } else {
            path.clone()
        };
        if !current.is_empty() {
            check_empty_allowed(git, cfg, &path, &commit, entries.as_deref()).map_err(|why| {
                GitOpsError::RefuseEmpty {
                    path: shown_path,
                    commit: commit.short().to_owned(),
                    why,
                }
            })?;
        } else if entries.is_none() {
            return Err(GitOpsError::PathMissing {
                path: shown_path,
                commit: commit.short().to_owned(),
            });
        }
    }

    let mut outcome = SyncOutcome {
        commit: commit.clone(),
        added: Vec::new(),
        changed: Vec::new(),
        removed: Vec::new(),
        unchanged: Vec::new(),
    };
    for (name, bytes) in &desired {
        match current.get(name) {
            Some(Some(old)) if old == bytes => {
                outcome.unchanged.push(name.clone());
                continue;
            }
            Some(_) => outcome.changed.push(name.clone()),
            None => outcome.added.push(name.clone()),
        }
        write_atomic(apps_dir, name, bytes)?;
        tracing::debug!(file = %name, commit = %commit.short(), "manifest written");
    }
    for name in current.keys().filter(|n| !desired.contains_key(*n)) {
        let file = apps_dir.join(name);
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(GitOpsError::io("remove", &file, e)),
        }
        tracing::debug!(file = %name, commit = %commit.short(), "manifest pruned");
        outcome.removed.push(name.clone());
    }
    if !outcome.is_noop() {
        sync_dir(apps_dir);
    }

    let record = AppliedRecord {
        repo: cfg.redacted_repo(),
        git_ref: cfg.git_ref.clone(),
        path,
        commit: commit.to_string(),
    };
    if read_applied(&cfg.state_dir).as_ref() != Some(&record) {
        let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let dir = super::private_git_dir(&cfg.state_dir)?;
        write_atomic(&dir, "applied.json", &bytes)?;
        sync_dir(&dir);
    }
    if let Err(e) = git.pin(&commit) {
        // Only costs the ancestry proof after a gc; not worth failing a good sync over.
        tracing::warn!(error = %e, commit = %commit.short(), "cannot pin the applied commit in the git cache");
    }
    Ok(outcome)
}

/// The "really deleted" rule (module docs). `Err` carries the reason for the message.
fn check_empty_allowed(
    git: &dyn Git,
    cfg: &GitOpsConfig,
    path: &str,
    commit: &CommitId,
    entries: Option<&[TreeEntry]>,
) -> Result<(), String> {
    let Some(entries) = entries else {
        return Err("the directory does not exist in that commit; to remove every app, keep the directory with a \
             .clusterd-allow-empty file in it"
            .to_owned());
    };
    if entries.iter().any(|e| e.name == ALLOW_EMPTY_FILE) {
        tracing::info!(commit = %commit.short(), "{ALLOW_EMPTY_FILE} present: pruning every app");
        return Ok(());
    }
    let Some(previous) =
        read_applied(&cfg.state_dir).filter(|r| r.repo == cfg.redacted_repo() && r.path == path)
    else {
        return Err(format!(
            "no commit of this repository was applied here before, so the deletion cannot be checked; add \
             {ALLOW_EMPTY_FILE} to the directory to allow it"
        ));
    };
    let previous = CommitId(previous.commit);
    if &previous == commit {
        return Ok(());
    }
    match git.is_ancestor(&previous, commit) {
        Ok(true) => {
            tracing::info!(from = %previous.short(), to = %commit.short(), "every manifest deleted in the followed history: pruning every app");
            Ok(())
        }
        Ok(false) => Err(format!(
            "the last applied commit {} is not an ancestor of it (history rewritten, or a different ref); add \
             {ALLOW_EMPTY_FILE} to the directory to allow it",
            previous.short()
        )),
        Err(e) => Err(format!("cannot compare with the last applied commit {}: {e}", previous.short())),
    }
}

/// The manifests directly under the directory: regular files with a manifest name.
fn read_manifests(
    git: &dyn Git,
    commit: &CommitId,
    path: &str,
    entries: &[TreeEntry],
) -> Result<BTreeMap<String, Vec<u8>>, GitOpsError> {
    let mut names = Vec::new();
    let mut ids = Vec::new();
    for entry in entries.iter().filter(|e| is_manifest_name(&e.name)) {
        match entry.kind {
            EntryKind::File => {
                names.push(entry.name.clone());
                ids.push(entry.id.clone());
            }
            EntryKind::Symlink | EntryKind::Other => {
                // A link could point anywhere on the host; the daemon only takes files.
                tracing::warn!(file = %entry.name, path, commit = %commit.short(), "skipping a manifest name that is not a regular file");
            }
            EntryKind::Dir => {}
        }
    }
    let blobs = git.read_blobs(&ids)?;
    Ok(names.into_iter().zip(blobs).collect())
}

/// Manifest files now in the apps dir; `None` content for one that cannot be read (it is
/// rewritten or removed, never trusted).
fn read_current(apps_dir: &Path) -> Result<BTreeMap<String, Option<Vec<u8>>>, GitOpsError> {
    let mut current = BTreeMap::new();
    let entries = fs::read_dir(apps_dir).map_err(|e| GitOpsError::io("read", apps_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| GitOpsError::io("read", apps_dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_manifest_name(&name) || entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        current.insert(name, fs::read(entry.path()).ok());
    }
    Ok(current)
}

fn write_marker(cfg: &GitOpsConfig, path: &str) -> Result<(), GitOpsError> {
    let shown = if path.is_empty() { "." } else { path };
    let content = format!(
        "# This directory is managed by clusterd's GitOps sync: change the repository, not these files.\n\
         # `clusterd apply` refuses to write here. Delete this file only after removing --git-repo.\n\
         repo: {}\nref: {}\npath: {}\n",
        cfg.redacted_repo(),
        cfg.git_ref,
        shown
    );
    let file = cfg.apps_dir.join(MARKER_FILE);
    if fs::read(&file).is_ok_and(|old| old == content.as_bytes()) {
        return Ok(());
    }
    write_atomic(&cfg.apps_dir, MARKER_FILE, content.as_bytes())
}

/// Removes temp files a crash left behind (they are hidden, so harmless, but they would
/// pile up).
fn sweep_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Temp file in the same directory (same file system, so `rename` is atomic), fsync,
/// rename over the target. The directory itself is fsynced by the caller once per sync.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), GitOpsError> {
    let target = dir.join(name);
    let temp = dir.join(format!("{TEMP_PREFIX}{}-{name}.tmp", std::process::id()));
    let _ = fs::remove_file(&temp);
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, &target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        GitOpsError::io("write", &target, e)
    })
}

/// Makes renames and removals durable; a failure only weakens durability across a power
/// cut, so it is logged, not returned.
fn sync_dir(dir: &Path) {
    if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot fsync directory");
    }
}

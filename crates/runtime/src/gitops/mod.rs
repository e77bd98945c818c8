//! GitOps sync: make the apps dir hold exactly the manifests that a git repository has
//! under one directory at one ref.
//!
//! This module owns three things and nothing else:
//! - the local git cache under `<state-dir>/git/` and the record of the last applied
//!   commit (`<state-dir>/git/applied.json`), so a restarted daemon knows where it was;
//! - the apps dir's manifest files while `--git-repo` is set (it writes and prunes them,
//!   each write atomic), plus the `.clusterd-git` marker that makes `clusterd apply`
//!   refuse to write there;
//! - the fetch timer and the on-demand trigger ([`run_sync_loop`]).
//!
//! It does not parse or validate manifests. It copies bytes; the daemon's loader judges
//! them, exactly as it judges a file dropped in by hand. That is what gives a bad commit
//! its per-app effect: the broken app stays on its last good revision (phase `Invalid`,
//! with file:line), every other app follows the commit.
//!
//! Git is reached through the [`Git`] trait. The one implementation, [`GitCli`], runs the
//! `git` command line, so every auth setup git knows (ssh agent, deploy keys through
//! `core.sshCommand`, credential helpers) works unchanged; a gix backend can replace it
//! without touching the sync logic.
//!
//! Credentials never leave this module in clear: every URL that reaches a message, a
//! log line, the status or the state dir goes through [`redact_url`], and git's own
//! stderr is scrubbed the same way before it becomes an error.

mod driver;
mod git;
mod sync;

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use driver::{run_sync_loop, run_sync_loop_with, SyncReply, SyncReport};
pub use git::{CommitId, EntryKind, Git, GitCli, ObjectId, TreeEntry};
pub use sync::{read_applied, sync_once, AppliedRecord, ALLOW_EMPTY_FILE, MARKER_FILE};

/// Where and what to follow. Built by the daemon from `--git-repo`, `--git-ref`,
/// `--git-path`, `--git-interval` and its own directories.
#[derive(Clone)]
pub struct GitOpsConfig {
    /// Repository URL as given by the user. May carry credentials (`user:token@`), so it
    /// is only ever handed to git; everything shown to a human uses [`redact_url`].
    pub repo: String,
    /// Branch, tag, full ref name, or full commit id to follow.
    pub git_ref: String,
    /// Directory inside the repository that holds the manifests (`.` or empty = root).
    pub path: PathBuf,
    /// Time between fetches when nobody asks for one.
    pub interval: Duration,
    /// The daemon's apps dir: the sync writes manifests here.
    pub apps_dir: PathBuf,
    /// The daemon's state dir: the git cache and the applied-commit record live under
    /// `<state_dir>/git/`.
    pub state_dir: PathBuf,
    /// Deadline for any single git command (a hung ssh or a stalled server must not
    /// stall the sync loop forever).
    pub git_timeout: Duration,
}

impl GitOpsConfig {
    /// A config with the defaults for the interval (1 minute, as Flux recommends) and the
    /// git timeout (2 minutes, generous for a first clone over a slow link).
    pub fn new(
        repo: impl Into<String>,
        git_ref: impl Into<String>,
        path: impl Into<PathBuf>,
        apps_dir: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        GitOpsConfig {
            repo: repo.into(),
            git_ref: git_ref.into(),
            path: path.into(),
            interval: Duration::from_secs(60),
            apps_dir: apps_dir.into(),
            state_dir: state_dir.into(),
            git_timeout: Duration::from_secs(120),
        }
    }

    /// The repository URL without credentials, for messages and status.
    pub fn redacted_repo(&self) -> String {
        redact_url(&self.repo)
    }
}

/// Hand-written so that `{:?}` of a config (in a panic, a trace) cannot leak a token.
impl fmt::Debug for GitOpsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitOpsConfig")
            .field("repo", &self.redacted_repo())
            .field("git_ref", &self.git_ref)
            .field("path", &self.path)
            .field("interval", &self.interval)
            .field("apps_dir", &self.apps_dir)
            .field("state_dir", &self.state_dir)
            .field("git_timeout", &self.git_timeout)
            .finish()
    }
}

/// What one successful sync did, for the daemon's events. File names are bare names in
/// the apps dir (`web.yaml`), each list sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The commit the apps dir now matches.
    pub commit: CommitId,
    /// Files that did not exist in the apps dir and were written.
    pub added: Vec<String>,
    /// Files whose content differed and were rewritten.
    pub changed: Vec<String>,
    /// Manifest files that the commit does not have and were deleted.
    pub removed: Vec<String>,
    /// Files that already matched the commit byte for byte.
    pub unchanged: Vec<String>,
}

impl SyncOutcome {
    /// True when the sync touched no manifest (the usual case on a timer tick).
    pub fn is_noop(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The `sync` block of the status JSON. `commit` is the last *applied* commit and stays
/// set when a later attempt fails, so `commit` + `error` together read "still on X,
/// because Y".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    /// Repository URL, credentials stripped.
    pub repo: String,
    /// The ref followed, as configured.
    pub git_ref: String,
    /// Directory inside the repository.
    pub path: String,
    /// Last applied commit (from the state dir after a restart, before the first fetch).
    pub commit: Option<String>,
    /// Why the last attempt failed; `None` after a successful one.
    pub error: Option<String>,
    /// When the last attempt finished.
    pub at: Option<SystemTime>,
}

impl SyncStatus {
    /// The status before any attempt in this process: the applied commit recorded in the
    /// state dir if it was for this same repo, ref and path, so a restarted daemon does
    /// not show `commit: null` for a minute.
    pub fn initial(cfg: &GitOpsConfig) -> Self {
        let path = normalize_git_path(&cfg.path).unwrap_or_else(|_| cfg.path.display().to_string());
        let commit = read_applied(&cfg.state_dir)
            .filter(|r| r.repo == cfg.redacted_repo() && r.git_ref == cfg.git_ref && r.path == path)
            .map(|r| r.commit);
        SyncStatus {
            repo: cfg.redacted_repo(),
            git_ref: cfg.git_ref.clone(),
            path,
            commit,
            error: None,
            at: None,
        }
    }

    /// Folds the result of one attempt into the status.
    pub fn record(&mut self, result: &Result<SyncOutcome, GitOpsError>, at: SystemTime) {
        self.at = Some(at);
        match result {
            Ok(outcome) => {
                self.commit = Some(outcome.commit.to_string());
                self.error = None;
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

/// Everything that can go wrong in a sync. Every string field is already redacted; the
/// `Display` text is what goes into the status JSON's `sync.error`, so it carries the
/// underlying cause inline rather than as a `source()`.
#[derive(Debug, thiserror::Error)]
pub enum GitOpsError {
    /// git could not be started at all (not installed, not on PATH).
    #[error("cannot run git: {error}")]
    Spawn {
        /// The exec error.
        error: std::io::Error,
    },
    /// A git command exited non-zero.
    #[error("git {op} failed for {repo}: {stderr}")]
    Git {
        /// Which operation (fetch, ls-tree, ...).
        op: &'static str,
        /// The repository, redacted.
        repo: String,
        /// git's stderr, redacted and trimmed.
        stderr: String,
    },
    /// A git command ran past the configured timeout and was killed.
    #[error("git {op} timed out after {timeout:?} for {repo}")]
    Timeout {
        /// Which operation.
        op: &'static str,
        /// The repository, redacted.
        repo: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// git produced output this module does not understand.
    #[error("unexpected output from git {op}: {detail}")]
    Protocol {
        /// Which operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// `--git-path` is absolute, climbs out with `..`, or is not UTF-8.
    #[error("invalid git path {path}: {why}")]
    BadPath {
        /// The path as given.
        path: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The directory does not exist at this commit and the apps dir is empty, so there is
    /// nothing to protect, but the configuration is almost certainly wrong.
    #[error("{path} does not exist at {commit}")]
    PathMissing {
        /// The repository path.
        path: String,
        /// The commit looked at.
        commit: String,
    },
    /// The safety rule: the commit would empty a non-empty apps dir and the deletion is not
    /// proven to be real (see `docs/gitops.md`, "Safety rules").
    #[error("refusing to prune every app: {path} at {commit} holds no manifests ({why})")]
    RefuseEmpty {
        /// The repository path.
        path: String,
        /// The commit looked at.
        commit: String,
        /// Which part of the rule was not met.
        why: String,
    },
    /// Reading or writing the apps dir or the state dir failed.
    #[error("cannot {action} {path}: {error}")]
    Io {
        /// What was being done (write, remove, read, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

impl GitOpsError {
    pub(crate) fn io(action: &'static str, path: &Path, error: std::io::Error) -> Self {
        GitOpsError::Io {
            action,
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Creates `<state_dir>/git` with mode 0700 (and fixes the mode if it exists). The state
/// dir itself must stay traversable (workers that run as another user reach the notify
/// socket there), but the cache holds the whole repository, which may include other
/// hosts' manifests and their environment: readable by root only.
pub(crate) fn private_git_dir(state_dir: &Path) -> Result<PathBuf, GitOpsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = state_dir.join("git");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| GitOpsError::io("create", &dir, e))?;
    let meta = std::fs::metadata(&dir).map_err(|e| GitOpsError::io("stat", &dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| GitOpsError::io("chmod", &dir, e))?;
    }
    Ok(dir)
}

/// Strips credentials from every URL in `text`: `https://user:token@host/x` becomes
/// `https://host/x`.
///
/// Works on a bare URL and on free text that contains URLs (git's stderr quotes them),
/// so one function serves messages, logs and status. The whole userinfo goes, not just
/// the password: with GitHub-style tokens the *user* part is the secret
/// (`https://ghp_xxx@github.com/...`). scp-like addresses (`git@host:repo`) have no
/// `://` and are left alone; their user is a login name, not a secret.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; userinfo is whatever
        // precedes its last '@' (a password may itself contain '@' when unencoded).
        let end = tail
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '\'' || c == '"'
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets inside a URL's userinfo, for scrubbing text that might quote them outside
/// a URL (some git versions echo the user name alone in prompts or errors).
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let Some(pos) = url.find("://") else {
        return Vec::new();
    };
    let tail = &url[pos + 3..];
    let end = tail.find('/').unwrap_or(tail.len());
    let Some(at) = tail[..end].rfind('@') else {
        return Vec::new();
    };
    let userinfo = &tail[..at];
    // `user:password` -> the password; a lone `token@` -> the token. A plain login name
    // next to a password is not secret, and scrubbing a short word like `git` everywhere
    // would mangle the message.
    let secret = userinfo
        .split_once(':')
        .map_or(userinfo, |(_, password)| password);
    if secret.len() >= 4 {
        vec![secret.to_owned()]
    } else {
        Vec::new()
    }
}

/// Redacts URLs and, additionally, any literal occurrence of the URL's credentials.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut out = redact_url(text);
    for secret in url_secrets(url) {
        out = out.replace(&secret, "***");
    }
    out
}

/// `--git-path` as a `/`-separated path relative to the repository root; `""` is the
/// root. `.` components vanish; absolute paths and `..` are refused so the path can never
/// name something outside the repository's tree.
///
/// # Errors
/// [`GitOpsError::BadPath`] for an absolute path, a `..`, or a non-UTF-8 component.
pub fn normalize_git_path(path: &Path) -> Result<String, GitOpsError> {
    let bad = |why| GitOpsError::BadPath {
        path: path.display().to_string(),
        why,
    };
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| bad("not UTF-8"))?),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("must be relative to the repository root"))
            }
            Component::ParentDir => return Err(bad("must not contain ..")),
        }
    }
    Ok(parts.join("/"))
}

pub use clusterd_core::load::is_manifest_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_in_urls_and_text() {
        assert_eq!(
            redact_url("https://u:p4ss@example.com/r.git"),
            "https://example.com/r.git"
        );
        assert_eq!(
            redact_url("https://ghp_tok@github.com/o/r"),
            "https://github.com/o/r"
        );
        assert_eq!(
            redact_url("git@github.com:o/r.git"),
            "git@github.com:o/r.git"
        );
        assert_eq!(redact_url("file:///srv/repo.git"), "file:///srv/repo.git");
        assert_eq!(
            redact_url("fatal: unable to access 'https://a:b@h:8443/x/': 403"),
            "fatal: unable to access 'https://h:8443/x/': 403"
        );
        assert_eq!(redact_url("https://a:b@c@h/x"), "https://h/x");
        assert_eq!(
            scrub("git s3cret-token said no", "https://git:s3cret-token@h/x"),
            "git *** said no"
        );
    }

    #[test]
    fn normalizes_git_paths() {
        assert_eq!(normalize_git_path(Path::new(".")).unwrap(), "");
        assert_eq!(
            normalize_git_path(Path::new("./hosts/web1/")).unwrap(),
            "hosts/web1"
        );
        assert!(normalize_git_path(Path::new("/etc")).is_err());
        assert!(normalize_git_path(Path::new("a/../b")).is_err());
    }

    #[test]
    fn manifest_names_match_the_loader() {
        assert!(is_manifest_name("web.yaml"));
        assert!(is_manifest_name("web.yml"));
        assert!(!is_manifest_name(".web.yaml"));
        assert!(!is_manifest_name("README.md"));
        assert!(!is_manifest_name(".clusterd-git"));
    }
}

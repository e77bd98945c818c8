//! The git seam: a small trait with exactly the operations the sync needs, and its
//! implementation on top of the `git` command line.
//!
//! Why plumbing (`ls-tree`, `cat-file --batch`) on a bare cache instead of a worktree
//! checkout: a checkout is a second copy of the files with its own state that can be left
//! half-done by a crash, can be dirtied by hand, and must be moved between commits;
//! reading blobs straight out of the object store has none of that. Any commit can be
//! read without touching `HEAD`, so "what did the previous commit have" (the safety rule)
//! is as cheap as "what does this one have". Symlinks and submodules are reported as such
//! and never followed, so a commit cannot point the sync at a file outside the repository.

use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use super::{redact_url, scrub, GitOpsError};

/// A full commit id (hex), as git prints it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(pub String);

impl CommitId {
    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blob or tree id (hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub String);

/// What a tree entry is; only [`EntryKind::File`] is ever copied into the apps dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (mode 100644 or 100755).
    File,
    /// A symbolic link (mode 120000): never followed.
    Symlink,
    /// A subdirectory.
    Dir,
    /// A submodule or anything else.
    Other,
}

/// One entry directly inside a directory of a commit's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// File name (entries whose name is not UTF-8 are skipped by the backend).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its object id.
    pub id: ObjectId,
}

/// The git operations the sync needs. Blocking: the driver calls them on a blocking
/// thread. Implementations own a local cache of one repository.
pub trait Git: Send + Sync {
    /// Fetches `git_ref` (branch, tag, full ref name, or full commit id) from `url` into
    /// the cache and returns the commit it names now.
    ///
    /// # Errors
    /// Network, auth, unknown ref, timeout; messages are redacted.
    fn fetch(&self, url: &str, git_ref: &str) -> Result<CommitId, GitOpsError>;

    /// The entries directly under `dir` (`/`-separated, `""` = root) at `commit`, or
    /// `None` if `dir` is not a directory in that commit.
    ///
    /// # Errors
    /// The commit is not in the cache, or git fails.
    fn list_dir(&self, commit: &CommitId, dir: &str)
        -> Result<Option<Vec<TreeEntry>>, GitOpsError>;

    /// The contents of these blobs, in order.
    ///
    /// # Errors
    /// A blob is missing, or git fails.
    fn read_blobs(&self, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>, GitOpsError>;

    /// True if `ancestor` is in the cache and is `descendant` or one of its ancestors.
    ///
    /// # Errors
    /// git fails for another reason than "not an ancestor".
    fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool, GitOpsError>;

    /// Keeps `commit` reachable in the cache (so `git gc` cannot drop the last applied
    /// commit, which the safety rule needs to compare against).
    ///
    /// # Errors
    /// git fails.
    fn pin(&self, commit: &CommitId) -> Result<(), GitOpsError>;
}

/// [`Git`] through the `git` executable, with a bare cache repository.
///
/// The URL is passed on every fetch and never stored in the cache's config, so a token in
/// the URL is not written to disk (it is visible in the process list while git runs;
/// `docs/gitops.md` recommends a credential helper instead).
#[derive(Debug, Clone)]
pub struct GitCli {
    /// The daemon's state dir (the cache lives in its private `git/` subdirectory).
    state_dir: PathBuf,
    /// The bare cache repository.
    dir: PathBuf,
    /// Deadline per git command.
    timeout: Duration,
    /// The URL with credentials stripped, for messages.
    repo: String,
    /// The raw URL, only to scrub its secrets out of git's stderr.
    raw_url: String,
    /// Extra environment for every git command.
    env: Vec<(String, String)>,
}

/// Local ref names in the cache: `fetched` is the tip of the last fetch, `applied` pins
/// the last applied commit.
const FETCHED_REF: &str = "refs/clusterd/fetched";
const APPLIED_REF: &str = "refs/clusterd/applied";

impl GitCli {
    /// A cache for `url` under `<state_dir>/git/cache-<hash>.git`. The hash is over the
    /// *redacted* URL: rotating a token keeps the cache, and the directory name cannot
    /// reveal anything.
    pub fn for_repo(state_dir: &Path, url: &str, timeout: Duration) -> Self {
        let repo = redact_url(url);
        let dir = state_dir
            .join("git")
            .join(format!("cache-{:016x}.git", fnv1a(repo.as_bytes())));
        GitCli {
            state_dir: state_dir.to_path_buf(),
            dir,
            timeout,
            repo,
            raw_url: url.to_owned(),
            env: Vec::new(),
        }
    }

    /// Sets an environment variable for every git command this backend runs, e.g.
    /// `GIT_SSH_COMMAND` for a deploy key, without changing the daemon's own environment
    /// (which every worker inherits).
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The bare cache repository's path.
    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_cache(&self) -> Result<(), GitOpsError> {
        if self.dir.join("HEAD").is_file() {
            return Ok(());
        }
        super::private_git_dir(&self.state_dir)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| GitOpsError::io("create", &self.dir, e))?;
        let mut cmd = self.command_without_dir();
        cmd.args(["init", "--bare", "--quiet"]).arg(&self.dir);
        self.run(cmd, "init", None).map(drop)
    }

    fn command_without_dir(&self) -> Command {
        let mut cmd = Command::new("git");
        // No prompt can ever be answered by a daemon: fail fast instead of hanging until
        // the timeout. C locale keeps messages stable for logs and tests.
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn command(&self) -> Command {
        let mut cmd = self.command_without_dir();
        cmd.arg("--git-dir").arg(&self.dir);
        cmd
    }

    /// Runs one git command under the timeout; returns stdout.
    ///
    /// git runs in its own process group so a timeout kills ssh and any helper it
    /// started, not just git itself.
    fn run(
        &self,
        mut cmd: Command,
        op: &'static str,
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, GitOpsError> {
        let output = self.run_status(&mut cmd, op, stdin)?;
        if output.0.success() {
            Ok(output.1)
        } else {
            Err(self.failure(op, &output.2))
        }
    }

    fn failure(&self, op: &'static str, stderr: &[u8]) -> GitOpsError {
        let text = String::from_utf8_lossy(stderr);
        let text = text.trim();
        let text = if text.is_empty() { "no message" } else { text };
        GitOpsError::Git {
            op,
            repo: self.repo.clone(),
            stderr: scrub(text, &self.raw_url),
        }
    }

    fn run_status(
        &self,
        cmd: &mut Command,
        op: &'static str,
        stdin: Option<&[u8]>,
    ) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), GitOpsError> {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd.spawn().map_err(|error| GitOpsError::Spawn { error })?;
        let pgid = child.id().cast_signed();
        let timed_out = AtomicBool::new(false);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let timeout = self.timeout;
        let mut child_in = child.stdin.take();
        let mut child_out = child.stdout.take();
        let mut child_err = child.stderr.take();
        let (status, out, err) = std::thread::scope(|s| {
            let timed_out = &timed_out;
            s.spawn(move || {
                // Fires only if git is still running at the deadline; `done_tx` being
                // dropped (git exited) ends the wait early.
                if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            });
            if let (Some(mut pipe), Some(bytes)) = (child_in.take(), stdin) {
                s.spawn(move || {
                    // A broken pipe here means git exited early; its status says why.
                    let _ = pipe.write_all(bytes);
                });
            }
            let out = s.spawn(move || {
                let mut buf = Vec::new();
                if let Some(p) = child_out.as_mut() {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            });
            let mut err = Vec::new();
            if let Some(p) = child_err.as_mut() {
                let _ = p.read_to_end(&mut err);
            }
            let status = child.wait();
            drop(done_tx);
            (status, out.join().unwrap_or_default(), err)
        });
        if timed_out.load(Ordering::SeqCst) {
            return Err(GitOpsError::Timeout {
                op,
                repo: self.repo.clone(),
                timeout: self.timeout,
            });
        }
        let status = status.map_err(|error| GitOpsError::Spawn { error })?;
        tracing::trace!(op, code = status.code(), "git finished");
        Ok((status, out, err))
    }

    fn rev_parse(&self, spec: &str) -> Result<Option<String>, GitOpsError> {
        let mut cmd = self.command();
        cmd.args(["rev-parse", "--verify", "--quiet", "--end-of-options", spec]);
        let (status, out, err) = self.run_status(&mut cmd, "rev-parse", None)?;
        if status.success() {
            Ok(Some(String::from_utf8_lossy(&out).trim().to_owned()))
        } else if status.code() == Some(1) {
            Ok(None)
        } else {
            Err(self.failure("rev-parse", &err))
        }
    }

    fn fetch_refspec(&self, url: &str, refspec: &str) -> Result<(), GitOpsError> {
        let mut cmd = self.command();
        cmd.args([
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--force",
        ])
        .arg("--end-of-options")
        .arg(OsString::from(url))
        .arg(refspec);
        self.run(cmd, "fetch", None).map(drop)
    }
}

impl Git for GitCli {
    fn fetch(&self, url: &str, git_ref: &str) -> Result<CommitId, GitOpsError> {
        self.ensure_cache()?;
        if git_ref.starts_with('-') || git_ref.contains(':') || git_ref.is_empty() {
            return Err(GitOpsError::Git {
                op: "fetch",
                repo: self.repo.clone(),
                stderr: format!("invalid ref {git_ref:?}"),
            });
        }
        if is_full_hex_id(git_ref) {
            // A commit id never moves: if it is already here there is nothing to fetch.
            if let Some(id) = self.rev_parse(&format!("{git_ref}^{{commit}}"))? {
                return Ok(CommitId(id));
            }
            // Servers differ in whether they let a client ask for a bare id; try that
            // first (cheap), then fall back to fetching every branch and tag.
            let direct = self.fetch_refspec(url, &format!("+{git_ref}:{FETCHED_REF}"));
            if direct.is_err() {
                self.fetch_refspec(url, "+refs/heads/*:refs/clusterd/heads/*")?;
                self.fetch_refspec(url, "+refs/tags/*:refs/clusterd/tags/*")?;
            }
            return self
                .rev_parse(&format!("{git_ref}^{{commit}}"))?
                .map(CommitId)
                .ok_or_else(|| GitOpsError::Git {
                    op: "fetch",
                    repo: self.repo.clone(),
                    stderr: format!("commit {git_ref} not found"),
                });
        }
        // git resolves a short name against the remote's refs (tags before branches,
        // like rev-parse); `refs/heads/x` or `refs/tags/x` disambiguates.
        self.fetch_refspec(url, &format!("+{git_ref}:{FETCHED_REF}"))?;
        self.rev_parse(&format!("{FETCHED_REF}^{{commit}}"))?
            .map(CommitId)
            .ok_or_else(|| GitOpsError::Protocol {
                op: "fetch",
                detail: format!("{git_ref} does not name a commit"),
            })
    }

    fn list_dir(
        &self,
        commit: &CommitId,
        dir: &str,
    ) -> Result<Option<Vec<TreeEntry>>, GitOpsError> {
        if self.rev_parse(&format!("{commit}^{{commit}}"))?.is_none() {
            return Err(GitOpsError::Protocol {
                op: "ls-tree",
                detail: format!("commit {commit} is not in the cache"),
            });
        }
        // `rev:path` takes everything after the colon as the path, so `^{tree}` cannot be
        // appended to it; resolve the id, then check it is a tree and not a file.
        let spec = if dir.is_empty() {
            format!("{commit}^{{tree}}")
        } else {
            format!("{commit}:{dir}")
        };
        let Some(tree) = self.rev_parse(&spec)? else {
            return Ok(None);
        };
        let mut cmd = self.command();
        cmd.args(["cat-file", "-t", &tree]);
        if self.run(cmd, "cat-file", None)?.trim_ascii() != b"tree" {
            return Ok(None);
        }
        let mut cmd = self.command();
        cmd.args(["ls-tree", "-z", &tree]);
        let out = self.run(cmd, "ls-tree", None)?;
        let mut entries = Vec::new();
        for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            // "<mode> SP <type> SP <id> TAB <name>"
            let bad = || GitOpsError::Protocol {
                op: "ls-tree",
                detail: String::from_utf8_lossy(record).into_owned(),
            };
            let tab = record.iter().position(|b| *b == b'\t').ok_or_else(bad)?;
            let meta = std::str::from_utf8(&record[..tab]).map_err(|_| bad())?;
            let mut fields = meta.split(' ');
            let (Some(mode), Some(_kind), Some(id)) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad());
            };
            let Ok(name) = std::str::from_utf8(&record[tab + 1..]) else {
                tracing::warn!(commit = %commit.short(), dir, "skipping a file whose name is not UTF-8");
                continue;
            };
            let kind = match mode {
                "100644" | "100755" | "100664" => EntryKind::File,
                "120000" => EntryKind::Symlink,
                "040000" => EntryKind::Dir,
                _ => EntryKind::Other,
            };
            entries.push(TreeEntry {
                name: name.to_owned(),
                kind,
                id: ObjectId(id.to_owned()),
            });
        }
        Ok(Some(entries))
    }

    fn read_blobs(&self, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>, GitOpsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::new();
        for id in ids {
            input.extend_from_slice(id.0.as_bytes());
            input.push(b'\n');
        }
        let mut cmd = self.command();
        cmd.args(["cat-file", "--batch"]);
        let out = self.run(cmd, "cat-file", Some(&input))?;
        parse_batch(&out, ids.len())
    }

    fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool, GitOpsError> {
        if self.rev_parse(&format!("{ancestor}^{{commit}}"))?.is_none() {
            return Ok(false);
        }
        let mut cmd = self.command();
        cmd.args(["merge-base", "--is-ancestor", &ancestor.0, &descendant.0]);
        let (status, _, err) = self.run_status(&mut cmd, "merge-base", None)?;
        match status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(self.failure("merge-base", &err)),
        }
    }

    fn pin(&self, commit: &CommitId) -> Result<(), GitOpsError> {
        let mut cmd = self.command();
        cmd.args(["update-ref", APPLIED_REF, &commit.0]);
        self.run(cmd, "update-ref", None).map(drop)
    }
}

/// Parses `git cat-file --batch` output: per object a header `<id> <type> <size>\n`, the
/// content, and a `\n`; a missing object is `<id> missing\n`.
fn parse_batch(mut out: &[u8], expected: usize) -> Result<Vec<Vec<u8>>, GitOpsError> {
    let bad = |detail: String| GitOpsError::Protocol {
        op: "cat-file",
        detail,
    };
    let mut blobs = Vec::with_capacity(expected);
    while blobs.len() < expected {
        let nl = out
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| bad("truncated header".into()))?;
        let header =
            std::str::from_utf8(&out[..nl]).map_err(|_| bad("header is not UTF-8".into()))?;
        let fields: Vec<&str> = header.split(' ').collect();
        let [_, kind, size] = fields.as_slice() else {
            return Err(bad(header.to_owned()));
        };
        if *kind != "blob" {
            return Err(bad(format!("expected a blob, got {header}")));
        }
        let size: usize = size.parse().map_err(|_| bad(header.to_owned()))?;
        let start = nl + 1;
        let end = start + size;
        if out.len() < end + 1 {
            return Err(bad("truncated content".into()));
        }
        blobs.push(out[start..end].to_vec());
        out = &out[end + 1..];
    }
    Ok(blobs)
}

fn is_full_hex_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// FNV-1a, 64 bit: a stable name for the cache dir (std's hasher is not guaranteed
/// stable across Rust releases, and a new name would mean a needless re-clone).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cat_file_batch() {
        let out = b"aa blob 3\nabc\nbb blob 0\n\n";
        let ids = [ObjectId("aa".into()), ObjectId("bb".into())];
        assert_eq!(
            parse_batch(out, ids.len()).unwrap(),
            vec![b"abc".to_vec(), Vec::new()]
        );
        assert!(parse_batch(b"aa missing\n", 1).is_err());
    }

    #[test]
    fn recognizes_full_ids() {
        assert!(is_full_hex_id(&"a".repeat(40)));
        assert!(!is_full_hex_id("abc1234"));
        assert!(!is_full_hex_id("main"));
    }
}

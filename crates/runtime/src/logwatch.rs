//! Log sizes checked as the files grow, not on a fixed timer.
//!
//! Workers write their log files directly, so the daemon sees no write. A periodic size
//! check lets a chatty worker overshoot by whatever it writes in one period (a 10 s
//! period let a file reach 2.4 MB against a 512 KiB limit). [`LogSizeWatch`] instead arms
//! a one-shot inotify watch (`IN_MODIFY | IN_ONESHOT`) on each tracked file: the first
//! write after arming wakes it, it checks the size (and rotates with
//! [`crate::logs::rotate_if_needed`] past the limit), then re-arms after a delay that
//! shrinks as the file nears its limit at the rate it has been growing:
//! half the time the file needs to reach the limit at that rate, between
//! [`MIN_REARM`] and [`MAX_REARM`]. So:
//! - an idle file costs nothing (no timer, no wake-up);
//! - a busy file far below its limit costs a wake-up every [`MAX_REARM`] at most;
//! - at a steady rate `r`, a file overshoots its limit by at most about `r * MIN_REARM`
//!   (plus what is written during the copy).
//!
//! A file that is replaced (renamed away by [`crate::logs::rotate_unshared`], deleted)
//! is followed by path: its watch fires `IN_MOVE_SELF`/`IN_DELETE_SELF`, and the watch is
//! re-armed on whatever file the path names then; if none, the next
//! [`LogSizeWatch::track`] of that path re-arms it.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::logs::{rotate_if_needed, LogPolicy, Rotation};

/// The shortest wait before a file is checked again after a check: bounds the checks of
/// a file written very fast near its limit to about 50 a second.
pub const MIN_REARM: Duration = Duration::from_millis(20);

/// The longest wait before a written file is checked again.
pub const MAX_REARM: Duration = Duration::from_secs(2);

/// [`Inotify`] with the `AsRawFd` that tokio's [`AsyncFd`] wants.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

enum Command {
    Track(PathBuf, LogPolicy),
    Untrack(PathBuf),
}

/// Watches tracked log files and rotates each past its limit soon after the write that
/// took it there. Cheap to clone; the task ends when the token is cancelled or every
/// handle is dropped.
#[derive(Clone, Debug)]
pub struct LogSizeWatch {
    tx: mpsc::UnboundedSender<Command>,
}

impl LogSizeWatch {
    /// Starts the watch task on the current tokio runtime.
    ///
    /// # Errors
    /// inotify is unavailable (no more instances for this user, ...).
    pub fn start(cancel: CancellationToken) -> Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| Error::io("create inotify instance for log sizes", e.into()))?;
        // SAFETY: the Inotify (and its fd) is moved into the AsyncFd, stays open for the
        // AsyncFd's whole life and always reports the same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|e| Error::io("register inotify instance for log sizes", e.into_parts().1))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(fd, rx, cancel));
        Ok(LogSizeWatch { tx })
    }

    /// Watches `path` with `policy` (again: call it after every spawn of a worker that
    /// writes `path`, and when the policy changes). Checks the size at once.
    pub fn track(&self, path: impl Into<PathBuf>, policy: LogPolicy) {
        let _ = self.tx.send(Command::Track(path.into(), policy));
    }

    /// Stops watching `path` (its app is gone).
    pub fn untrack(&self, path: impl Into<PathBuf>) {
        let _ = self.tx.send(Command::Untrack(path.into()));
    }
}

struct Tracked {
    policy: LogPolicy,
    /// The armed one-shot watch, if any.
    wd: Option<WatchDescriptor>,
    /// Size and time of the last check, for the growth rate.
    last: Option<(Instant, u64)>,
    /// When to check again (and re-arm), if waiting.
    due: Option<Instant>,
}

struct State {
    inotify: AsyncFd<InotifyFd>,
    files: HashMap<PathBuf, Tracked>,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
}

async fn run(
    inotify: AsyncFd<InotifyFd>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
) {
    let mut st = State {
        inotify,
        files: HashMap::new(),
        by_wd: HashMap::new(),
    };
    loop {
        let next_due = st.files.values().filter_map(|t| t.due).min();
        tokio::select! {
            () = cancel.cancelled() => return,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Track(path, policy)) => {
                    let t = st.files.entry(path.clone()).or_insert(Tracked {
                        policy,
                        wd: None,
                        last: None,
                        due: None,
                    });
                    t.policy = policy;
                    st.check(&path).await;
                }
                Some(Command::Untrack(path)) => {
                    if let Some(t) = st.files.remove(&path) {
                        if let Some(wd) = t.wd {
                            st.by_wd.remove(&wd);
                            let _ = st.inotify.get_ref().0.rm_watch(wd);
                        }
                    }
                }
            },
            guard = st.inotify.readable() => {
                let Ok(mut guard) = guard else { return };
                let events = match guard.get_inner().0.read_events() {
                    Ok(events) => events,
                    Err(Errno::EAGAIN) => {
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading log size events");
                        return;
                    }
                };
                drop(guard);
                let mut written: Vec<PathBuf> = Vec::new();
                for ev in events {
                    if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        written.extend(st.files.keys().cloned());
                        continue;
                    }
                    // A one-shot watch is gone after its event (IN_IGNORED follows).
                    if let Some(path) = st.by_wd.remove(&ev.wd) {
                        if let Some(t) = st.files.get_mut(&path) {
                            if t.wd == Some(ev.wd) {
                                t.wd = None;
                            }
                        }
                        if !ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                            written.push(path);
                        }
                    }
                }
                written.sort();
                written.dedup();
                for path in written {
                    st.check(&path).await;
                }
            }
            () = sleep_until_opt(next_due) => {
                let now = Instant::now();
                let due: Vec<PathBuf> = st
                    .files
                    .iter()
                    .filter(|(_, t)| t.due.is_some_and(|d| d <= now))
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in due {
                    st.check(&path).await;
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl State {
    /// Checks one file's size, rotates it past its limit, and re-arms its watch now or
    /// after the delay [`rearm_delay`] gives.
    async fn check(&mut self, path: &Path) {
        let Some(policy) = self.files.get(path).map(|t| t.policy) else {
            return;
        };
        let len = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            // Gone (renamed away, app removed): the next `track` re-arms it.
            Err(_) => {
                if let Some(t) = self.files.get_mut(path) {
                    t.due = None;
                    t.last = None;
                }
                return;
            }
        };
        let now = Instant::now();
        let mut after = len;
        if len > policy.max_size {
            let owned = path.to_path_buf();
            let result = tokio::task::spawn_blocking(move || rotate_if_needed(&owned, policy))
                .await
                .unwrap_or_else(|e| Err(Error::io("log rotation task", std::io::Error::other(e))));
            match result {
                Ok(Rotation::NotNeeded) => {}
                Ok(_) => after = std::fs::metadata(path).map_or(0, |m| m.len()),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "log rotation"),
            }
        }
        let Some(t) = self.files.get_mut(path) else {
            return;
        };
        let delay = rearm_delay(t.last, (now, len), policy.max_size.saturating_sub(after));
        t.last = Some((now, after));
        if delay.is_zero() {
            t.due = None;
            self.arm(path);
        } else {
            t.due = Some(now + delay);
        }
    }

    fn arm(&mut self, path: &Path) {
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_ONESHOT;
        match self.inotify.get_ref().0.add_watch(path, mask) {
            Ok(wd) => {
                self.by_wd.insert(wd, path.to_path_buf());
                if let Some(t) = self.files.get_mut(path) {
                    t.wd = Some(wd);
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "watching log size");
            }
        }
    }
}

/// How long to wait before checking (and re-arming the watch of) a file again, given the
/// previous check `(time, size after it)`, this one `(time, size before rotating)`, and
/// the room left below the limit now. Zero: arm at once (no growth seen yet, so the next
/// write is the next check). Otherwise half the time the room lasts at the rate seen,
/// within [`MIN_REARM`, `MAX_REARM`].
#[must_use]
pub fn rearm_delay(prev: Option<(Instant, u64)>, now: (Instant, u64), room: u64) -> Duration {
    let Some((then, before)) = prev else {
        return Duration::ZERO;
    };
    let grown = now.1.saturating_sub(before);
    let secs = now.0.saturating_duration_since(then).as_secs_f64();
    if grown == 0 || secs <= 0.0 {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_precision_loss)] // sizes far below 2^52 bytes
    let rate = grown as f64 / secs;
    #[allow(clippy::cast_precision_loss)]
    let half = room as f64 / rate / 2.0;
    Duration::from_secs_f64(half.clamp(MIN_REARM.as_secs_f64(), MAX_REARM.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    use super::*;
    use crate::logs::rotated_path;

    #[test]
    fn rearm_delay_shrinks_near_the_limit() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(rearm_delay(None, (t1, 100), 1000), Duration::ZERO);
        assert_eq!(
            rearm_delay(Some((t0, 100)), (t1, 100), 1000),
            Duration::ZERO
        );
        // 1 MB/s with 1 MB of room: half a second.
        let d = rearm_delay(Some((t0, 0)), (t1, 1_000_000), 1_000_000);
        assert_eq!(d, Duration::from_millis(500));
        // Almost full: the floor. Plenty of room at a trickle: the ceiling.
        assert_eq!(rearm_delay(Some((t0, 0)), (t1, 1_000_000), 10), MIN_REARM);
        assert_eq!(rearm_delay(Some((t0, 0)), (t1, 10), 1 << 30), MAX_REARM);
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_written_past_its_limit_is_rotated_without_a_periodic_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-0.log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let cancel = CancellationToken::new();
        let watch = LogSizeWatch::start(cancel.clone()).unwrap();
        let policy = LogPolicy {
            max_size: 64 * 1024,
            max_files: 3,
        };
        watch.track(&path, policy);
        // 100 KiB in 1 KiB lines, then silence: only the writes can trigger a check.
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..100 {
            f.write_all(line.as_bytes()).unwrap();
        }
        eventually("rotated", || rotated_path(&path, 1).exists()).await;
        eventually("current file within its limit", || {
            fs::metadata(&path).unwrap().len() <= policy.max_size
        })
        .await;
        // It keeps watching: the next 100 KiB rotate again.
        for _ in 0..100 {
            f.write_all(line.as_bytes()).unwrap();
        }
        eventually("rotated twice", || rotated_path(&path, 2).exists()).await;
        cancel.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_renamed_away_is_followed_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-0.log");
        fs::write(&path, "").unwrap();
        let cancel = CancellationToken::new();
        let watch = LogSizeWatch::start(cancel.clone()).unwrap();
        let policy = LogPolicy {
            max_size: 4096,
            max_files: 2,
        };
        watch.track(&path, policy);
        // A new worker's spawn rotated it by rename and created a fresh file.
        let small = LogPolicy {
            max_size: 0,
            max_files: 2,
        };
        fs::write(&path, "old\n").unwrap();
        crate::logs::rotate_unshared(&path, small).unwrap();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        watch.track(&path, policy);
        f.write_all(&vec![b'y'; 10_000]).unwrap();
        eventually("the new file rotated", || {
            fs::read(rotated_path(&path, 1)).is_ok_and(|b| b.len() == 10_000)
        })
        .await;
        cancel.cancel();
    }
}

//! The daemon as a child subreaper: orphans of worker trees come back to it, and it reaps
//! every one of them (and, as PID 1 in a container, every orphan of the container).
//!
//! Why: without `PR_SET_CHILD_SUBREAPER`, a process whose parent exits is reparented to
//! PID 1, out of sight: `sh -c "node app.js &"` leaves node under init the moment the
//! shell exits. As a subreaper the daemon stays an ancestor of everything its workers
//! start (see [`crate::tree`] for how each worker's tree is tracked), and it must then
//! reap those orphans or they stay zombies. As PID 1 the kernel already reparents every
//! orphan to the daemon, and nobody else will reap them.
//!
//! Reaping must not steal exit statuses that other code of the daemon waits for: worker
//! leaders (reaped by [`crate::spawn`] for their exit status), `git` children of gitops,
//! tokio exec probes. So the reaper never calls `waitpid(-1)`: it peeks with
//! `waitid(P_ALL, WEXITED | WNOWAIT)` and reaps a zombie child by its pid only when
//! nobody else owns it:
//! - pids claimed by [`crate::spawn`] (worker leaders) are never reaped here. A claim is
//!   taken under a lock held across the fork ([`fork_guard`]), so the reaper cannot see a
//!   fresh worker before it is claimed;
//! - a child in the daemon's own session whose process group is the daemon's or its own
//!   was started by the daemon itself (`Command` without `setsid`: git, probes): its
//!   owner reaps it. Only if it stays a zombie for [`UNOWNED_AFTER`] is it reaped here
//!   (its owner dropped it);
//! - everything else is an orphan: a worker's descendant (its own session, or a session
//!   of its own after `setsid`), a grandchild of git, or any orphan of a container.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::procfs;

/// How long a zombie child in the daemon's own session and group may wait for its owner
/// before the reaper takes it (tokio's orphan queue of dropped children reaps lazily).
const UNOWNED_AFTER: Duration = Duration::from_secs(10);

struct Reaper {
    /// Held for reading across fork + claim, for writing while the reaper decides.
    fork: RwLock<()>,
    /// Children whose exit status belongs to someone else (worker leaders).
    claimed: Mutex<HashSet<i32>>,
    /// Whether [`start`] ran (the reaper thread exists).
    running: OnceLock<()>,
    /// Counts claims: with no child at all, the reaper sleeps until one is spawned.
    spawned: Mutex<u64>,
    wake: Condvar,
}

fn reaper() -> &'static Reaper {
    static R: OnceLock<Reaper> = OnceLock::new();
    R.get_or_init(|| Reaper {
        fork: RwLock::new(()),
        claimed: Mutex::new(HashSet::new()),
        running: OnceLock::new(),
        spawned: Mutex::new(0),
        wake: Condvar::new(),
    })
}

/// Makes the calling process a child subreaper and starts the reaper thread. Call it once
/// at daemon start, before the first worker is spawned; later calls do nothing.
///
/// The reaper is a plain thread (not a tokio task), so this can be called before any
/// runtime exists.
///
/// # Errors
/// When `prctl(PR_SET_CHILD_SUBREAPER)` or the thread cannot be started.
pub fn start() -> Result<()> {
    let r = reaper();
    if r.running.get().is_some() {
        return Ok(());
    }
    set_subreaper()?;
    std::thread::Builder::new()
        .name("clusterd-reaper".into())
        .spawn(reap_loop)
        .map_err(|e| Error::io("start the reaper thread", e))?;
    let _ = r.running.set(());
    tracing::debug!(
        pid = std::process::id(),
        "child subreaper: orphans are reaped"
    );
    Ok(())
}

/// Whether [`start`] has run in this process.
pub fn is_running() -> bool {
    reaper().running.get().is_some()
}

fn set_subreaper() -> Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc < 0 {
        return Err(Error::io(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Held while forking a child whose exit status its spawner will collect; claim the pid
/// with [`claim`] before dropping it.
pub(crate) fn fork_guard() -> RwLockReadGuard<'static, ()> {
    reaper().fork.read().unwrap_or_else(|e| e.into_inner())
}

/// `pid` is a child whose status its spawner collects: the reaper leaves it alone.
pub(crate) fn claim(pid: i32) {
    let r = reaper();
    r.claimed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pid);
    *r.spawned.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    r.wake.notify_all();
}

/// The spawner reaped `pid` (or gave it up).
pub(crate) fn release(pid: i32) {
    reaper()
        .claimed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
}

fn reap_loop() {
    let me = std::process::id() as i32;
    let own = procfs::stat(me);
    // Zombies left to their owner, with when they were first seen.
    let mut waiting: HashMap<(i32, u64), Instant> = HashMap::new();
    loop {
        // Read before peeking: a worker spawned after an ECHILD then ends the wait at once.
        let generation = *reaper().spawned.lock().unwrap_or_else(|e| e.into_inner());
        // Blocks until some child is a zombie (or returns ECHILD at once: no children).
        let peeked = waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let pid = match peeked {
            Ok(status) => status.pid(),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => None,
        };
        let Some(pid) = pid else {
            wait_for_children(me, generation);
            continue;
        };
        if try_reap(pid.as_raw(), me, own.as_ref(), &mut waiting) {
            continue;
        }
        // The first zombie belongs to someone else: reap the others by scanning, and give
        // the owner a moment before peeking again (waitid would return the same one).
        reap_orphans_with(me, own.as_ref(), &mut waiting);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With no child at all, nothing can be orphaned to a subreaper (orphans come from its
/// descendants): sleep until a worker is spawned, instead of polling, so an idle daemon
/// costs nothing. Children started by other code (git) are noticed within the timeout. As
/// PID 1 any process of the namespace can be orphaned to us (`docker exec`'d ones), so
/// look every second.
fn wait_for_children(me: i32, generation: u64) {
    let r = reaper();
    let timeout = if me == 1 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let seen = r.spawned.lock().unwrap_or_else(|e| e.into_inner());
    let _ = r
        .wake
        .wait_timeout_while(seen, timeout, |n| *n == generation)
        .unwrap_or_else(|e| e.into_inner());
}

/// One pass over the daemon's zombie children, reaping every orphan. Returns how many
/// were reaped. The reaper thread does this by itself; exposed for tests.
pub fn reap_orphans() -> usize {
    let me = std::process::id() as i32;
    let own = procfs::stat(me);
    let mut waiting = HashMap::new();
    reap_orphans_with(me, own.as_ref(), &mut waiting)
}

fn reap_orphans_with(
    me: i32,
    own: Option<&procfs::ProcStat>,
    waiting: &mut HashMap<(i32, u64), Instant>,
) -> usize {
    let mut n = 0;
    for pid in children(me) {
        if try_reap(pid, me, own, waiting) {
            n += 1;
        }
    }
    // Forget owners' zombies that are gone.
    waiting.retain(|(pid, start), _| procfs::start_time(*pid) == Some(*start));
    n
}

/// Reaps `pid` if it is a zombie child of ours that nobody else owns.
fn try_reap(
    pid: i32,
    me: i32,
    own: Option<&procfs::ProcStat>,
    waiting: &mut HashMap<(i32, u64), Instant>,
) -> bool {
    let r = reaper();
    let _decide = r.fork.write().unwrap_or_else(|e| e.into_inner());
    if r.claimed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&pid)
    {
        return false;
    }
    let Some(st) = procfs::stat(pid) else {
        return false;
    };
    if st.state != 'Z' || st.ppid != me {
        return false;
    }
    let started_by_us =
        own.is_some_and(|o| st.sid == o.sid && (st.pgid == o.pgid || st.pgid == pid));
    if started_by_us {
        let first = *waiting
            .entry((pid, st.start_time))
            .or_insert_with(Instant::now);
        if first.elapsed() < UNOWNED_AFTER {
            return false;
        }
    }
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) | Err(_) => false,
        Ok(status) => {
            tracing::debug!(pid, ?status, "reaped an orphan");
            true
        }
    }
}

/// Children of `pid` (every thread's `children` file; a /proc scan where the kernel has
/// no such file).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let path = t.path().join("children");
            if let Ok(text) = std::fs::read_to_string(&path) {
                found_file = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|s| s.parse::<i32>().ok()),
                );
            }
        }
    }
    if !found_file {
        out = procfs::all_pids()
            .into_iter()
            .filter(|&p| procfs::stat(p).is_some_and(|s| s.ppid == pid))
            .collect();
    }
    out.sort_unstable();
    out.dedup();
    out
}

//! A worker's whole process tree: what is signalled on stop, killed after the timeout,
//! and must be empty before the worker counts as stopped.
//!
//! A worker is not only its first process: `sh -c "node app.js"` and `npm start` exit or
//! ignore signals while node runs on, `cmd &` backgrounds a server, and
//! `spawn(..., {detached: true})` calls `setsid`, leaving the worker's process group and
//! session. Membership is taken from, in order of strength:
//! - the worker's own cgroup v2 leaf ([`crate::limits::CgroupTree::membership`]): every
//!   descendant stays in it whatever it does (short of a root process moving itself out);
//!   `cgroup.kill` kills it all at once, forks included;
//! - without a cgroup: the process group and session of the leader, every process whose
//!   parent chain leads to a member, every member seen before (remembered with its start
//!   time), and every orphan reparented to the daemon (a child subreaper, see
//!   [`crate::reaper`]) whose environment carries the worker's [`TREE_ENV`] mark. Only a
//!   descendant that both leaves the session and clears its environment (`setsid env -i`)
//!   and whose parent exits before a scan escapes: the cgroup is the complete answer.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::procfs;

/// Environment variable that marks every process of one worker tree (inherited through
/// fork, exec and `setsid`): how an orphan that left the worker's session is recognised
/// without a cgroup.
pub const TREE_ENV: &str = "CLUSTERD_TREE";

/// How a worker's processes are found.
#[derive(Debug)]
pub struct ProcessTree {
    leader: i32,
    cgroup: Option<PathBuf>,
    /// Other leaves the worker joined (cgroup v1 pids), removed with it.
    extra_cgroups: Vec<PathBuf>,
    /// `TREE_ENV=<mark>` as it appears in /proc/PID/environ.
    mark: Option<Vec<u8>>,
    /// Members seen so far (pid -> start time), for the /proc fallback.
    known: Mutex<HashMap<i32, u64>>,
}

impl ProcessTree {
    /// The tree of `leader` (pid = pgid = sid of a worker), in `cgroup` when it has one;
    /// `mark` is the worker's [`TREE_ENV`] value, when it was given one.
    pub fn new(
        leader: i32,
        leader_start: u64,
        cgroup: Option<PathBuf>,
        mark: Option<&str>,
    ) -> Self {
        ProcessTree {
            leader,
            cgroup,
            extra_cgroups: Vec::new(),
            mark: mark.map(|m| format!("{TREE_ENV}={m}").into_bytes()),
            known: Mutex::new(HashMap::from([(leader, leader_start)])),
        }
    }

    /// Leaves of other hierarchies the worker joined, to remove with it.
    #[must_use]
    pub fn with_extra_cgroups(mut self, extra: Vec<PathBuf>) -> Self {
        self.extra_cgroups = extra;
        self
    }

    /// The worker's cgroup leaf, if it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Members from the cgroup alone; `None` without a readable cgroup.
    pub fn cgroup_members(&self) -> Option<Vec<i32>> {
        cgroup_procs(self.cgroup.as_deref()?)
    }

    /// Live (non-zombie) processes of the tree right now.
    pub fn members(&self) -> Vec<i32> {
        if let Some(cg) = &self.cgroup {
            if let Some(pids) = cgroup_procs(cg) {
                return pids;
            }
        }
        self.scan_proc()
    }

    /// Whether nothing of the tree is alive.
    pub fn is_empty(&self) -> bool {
        if let Some(cg) = &self.cgroup {
            if let Ok(events) = fs::read_to_string(cg.join("cgroup.events")) {
                return events.lines().any(|l| l.trim() == "populated 0");
            }
        }
        self.members().is_empty()
    }

    /// Sends `sig` to every member outside process group `skip_group` (the caller
    /// signalled that group with `killpg`: each process gets the signal once, which
    /// matters for apps where a second SIGINT means "quit now"). Returns how many were
    /// signalled.
    pub fn signal(&self, sig: Signal, skip_group: Option<i32>) -> usize {
        let mut n = 0;
        for pid in self.members() {
            if skip_group.is_some()
                && procfs::stat(pid).is_none_or(|st| Some(st.pgid) == skip_group)
            {
                continue;
            }
            if nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Kills everything: `cgroup.kill` where the kernel has it (atomic, forks included),
    /// else SIGKILL to each member outside `skip_group` (already `killpg`ed). Returns
    /// whether anything was there to kill.
    pub fn kill(&self, skip_group: Option<i32>) -> bool {
        if let Some(cg) = &self.cgroup {
            let populated = !self.is_empty();
            if populated && fs::write(cg.join("cgroup.kill"), "1").is_ok() {
                return true;
            }
        }
        self.signal(Signal::SIGKILL, skip_group) > 0
    }

    /// Removes the worker's cgroup leaves once the tree is empty. Missing is fine.
    pub fn remove_cgroup(&self) {
        for cg in self.cgroup.iter().chain(&self.extra_cgroups) {
            if let Err(e) = crate::limits::CgroupTree::remove_worker_cgroup(cg) {
                tracing::debug!(error = %e, "worker cgroup not removed");
            }
        }
    }

    /// The /proc fallback: group, session, remembered members and their descendants.
    fn scan_proc(&self) -> Vec<i32> {
        let mut stats = HashMap::new();
        for pid in procfs::all_pids() {
            if let Some(st) = procfs::stat(pid) {
                stats.insert(pid, st);
            }
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::process::id() as i32;
        let mut members: HashSet<i32> = stats
            .values()
            .filter(|st| {
                st.pgid == self.leader
                    || st.sid == self.leader
                    || known.get(&st.pid) == Some(&st.start_time)
                    || (st.ppid == me && st.pid != self.leader && self.marked(st.pid))
            })
            .map(|st| st.pid)
            .collect();
        // Descendants of members, to a fixpoint (a parent may come after its child).
        loop {
            let before = members.len();
            for st in stats.values() {
                if !members.contains(&st.pid) && members.contains(&st.ppid) {
                    members.insert(st.pid);
                }
            }
            if members.len() == before {
                break;
            }
        }
        members.retain(|pid| stats.get(pid).is_some_and(|st| st.state != 'Z'));
        known.retain(|pid, start| stats.get(pid).is_some_and(|st| st.start_time == *start));
        for pid in &members {
            known.insert(*pid, stats[pid].start_time);
        }
        let mut out: Vec<i32> = members.into_iter().collect();
        out.sort_unstable();
        out
    }
}

impl ProcessTree {
    /// Whether `pid`'s environment carries this tree's mark.
    fn marked(&self, pid: i32) -> bool {
        let Some(mark) = &self.mark else {
            return false;
        };
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == mark.as_slice()))
    }
}

/// Pids in a cgroup and its descendants; `None` when it cannot be read.
fn cgroup_procs(dir: &Path) -> Option<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let mut out: Vec<i32> = text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_procs(&e.path()).unwrap_or_default());
            }
        }
    }
    Some(out)
}

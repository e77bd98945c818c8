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
//!   parent chain leads to a member, and every member seen before (remembered with its
//!   start time). The daemon being a child subreaper ([`crate::reaper`]) keeps orphans
//!   under it, and members are remembered at each scan, so a `setsid` child is still
//!   found after its parent exits. A double fork with `setsid` that completes between two
//!   scans can escape: the cgroup is the complete answer.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::procfs;

/// How a worker's processes are found.
#[derive(Debug)]
pub struct ProcessTree {
    leader: i32,
    cgroup: Option<PathBuf>,
    /// Members seen so far (pid -> start time), for the /proc fallback.
    known: Mutex<HashMap<i32, u64>>,
}

impl ProcessTree {
    /// The tree of `leader` (pid = pgid = sid of a worker), in `cgroup` when it has one.
    pub fn new(leader: i32, leader_start: u64, cgroup: Option<PathBuf>) -> Self {
        ProcessTree {
            leader,
            cgroup,
            known: Mutex::new(HashMap::from([(leader, leader_start)])),
        }
    }

    /// The worker's cgroup leaf, if it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
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

    /// Sends `sig` to every member except `skip` (the caller signals that one itself).
    /// Returns how many were signalled.
    pub fn signal(&self, sig: Signal, skip: Option<i32>) -> usize {
        let mut n = 0;
        for pid in self.members() {
            if Some(pid) == skip {
                continue;
            }
            if nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Kills everything: `cgroup.kill` where the kernel has it (atomic, forks included),
    /// else SIGKILL to each member. Returns whether anything was there to kill.
    pub fn kill(&self, skip: Option<i32>) -> bool {
        if let Some(cg) = &self.cgroup {
            let populated = !self.is_empty();
            if populated && fs::write(cg.join("cgroup.kill"), "1").is_ok() {
                return true;
            }
        }
        self.signal(Signal::SIGKILL, skip) > 0
    }

    /// Removes the worker's cgroup leaf once the tree is empty. Missing is fine.
    pub fn remove_cgroup(&self) {
        if let Some(cg) = &self.cgroup {
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
        let mut members: HashSet<i32> = stats
            .values()
            .filter(|st| {
                st.pgid == self.leader
                    || st.sid == self.leader
                    || known.get(&st.pid) == Some(&st.start_time)
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

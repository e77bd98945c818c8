//! Reading `/proc`: process start times (to recognise a pid after a daemon restart) and
//! CPU time and RSS of a worker's whole process group (for `clusterd status` and the
//! memory limit: a worker is its group, so `npm start -> sh -> node` counts as one).

use std::fs;
use std::time::Duration;

/// The fields of `/proc/<pid>/stat` clusterd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// State letter (R, S, D, Z, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgid: i32,
    /// Session.
    pub sid: i32,
    /// User CPU time in clock ticks.
    pub utime: u64,
    /// System CPU time in clock ticks.
    pub stime: u64,
    /// Start time in clock ticks since boot: with the pid, it identifies a process
    /// across pid reuse.
    pub start_time: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Reads and parses `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the text of a stat file. The command name is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the *last* `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    let int = |n: usize| field(n)?.parse::<i32>().ok();
    Some(ProcStat {
        pid,
        state: field(3)?.chars().next()?,
        ppid: int(4)?,
        pgid: int(5)?,
        sid: int(6)?,
        utime: num(14)?,
        stime: num(15)?,
        start_time: num(22)?,
        rss_pages: num(24)?,
    })
}

/// Start time (clock ticks since boot) of `pid`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of CPU and start times.
pub fn clock_ticks() -> u64 {
    sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100)
}

/// Page size in bytes.
pub fn page_size() -> u64 {
    sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096)
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<u64> {
    nix::unistd::sysconf(var)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
}

/// Resource use of one process group at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// Live (non-zombie) processes in the group.
    pub processes: u32,
    /// user + system CPU time of the live processes, in clock ticks. Exited members'
    /// time is not counted, so the total can drop; [`cpu_percent`] saturates at 0.
    pub cpu_ticks: u64,
    /// Sum of RSS in bytes (shared pages are counted once per process, as `ps` does).
    pub rss_bytes: u64,
}

/// Sums CPU time and RSS over every process whose process group is `pgid`.
pub fn group_usage(pgid: i32) -> GroupUsage {
    usage_by_group().remove(&pgid).unwrap_or_default()
}

/// [`group_usage`] for every process group at once, from a single pass over /proc.
/// The daemon samples all its workers together: one pass per sample, instead of one
/// per worker (which grew with workers × processes and burned a CPU at 500 workers).
pub fn usage_by_group() -> std::collections::HashMap<i32, GroupUsage> {
    group_by_pgid(&usage_by_pid())
}

/// One pass over /proc: each live (non-zombie) process's own usage and process group.
/// Folded by group ([`group_by_pgid`]) or summed over a worker's cgroup members.
pub fn usage_by_pid() -> std::collections::HashMap<i32, (i32, GroupUsage)> {
    let mut out = std::collections::HashMap::new();
    let page = page_size();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(st) = stat(pid) else { continue };
        if st.state == 'Z' {
            continue;
        }
        let usage = GroupUsage {
            processes: 1,
            cpu_ticks: st.utime + st.stime,
            rss_bytes: st.rss_pages * page,
        };
        out.insert(pid, (st.pgid, usage));
    }
    out
}

/// [`usage_by_pid`] summed per process group.
pub fn group_by_pgid(
    by_pid: &std::collections::HashMap<i32, (i32, GroupUsage)>,
) -> std::collections::HashMap<i32, GroupUsage> {
    let mut out: std::collections::HashMap<i32, GroupUsage> = std::collections::HashMap::new();
    for (pgid, u) in by_pid.values() {
        out.entry(*pgid).or_default().add(u);
    }
    out
}

/// [`usage_by_pid`] summed over `pids` (a worker's tree).
pub fn sum_of(
    by_pid: &std::collections::HashMap<i32, (i32, GroupUsage)>,
    pids: &[i32],
) -> GroupUsage {
    let mut total = GroupUsage::default();
    for pid in pids {
        if let Some((_, u)) = by_pid.get(pid) {
            total.add(u);
        }
    }
    total
}

impl GroupUsage {
    /// Adds another sample (of other processes) to this one.
    pub fn add(&mut self, other: &GroupUsage) {
        self.processes += other.processes;
        self.cpu_ticks += other.cpu_ticks;
        self.rss_bytes += other.rss_bytes;
    }
}

/// Every pid in /proc (processes, not threads).
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Pids of the live members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat(pid).is_some_and(|s| s.pgid == pgid && s.state != 'Z'))
        .collect()
}

/// CPU% (100 = one full CPU) between two samples taken `elapsed` apart.
pub fn cpu_percent(before: &GroupUsage, after: &GroupUsage, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64;
    ticks / clock_ticks() as f64 / secs * 100.0
}

/// Who listens on `addr` (TCP, or UDP bound), from /proc/net and the fds in /proc: the
/// pid and command name of one holder, for an error that says more than "in use".
/// Best effort: `None` when it cannot tell (another user's process, a namespace).
pub fn port_holder(addr: std::net::SocketAddr) -> Option<(i32, String)> {
    let port = format!("{:04X}", addr.port());
    let tables: &[&str] = if addr.is_ipv4() {
        &["/proc/net/tcp", "/proc/net/udp"]
    } else {
        &["/proc/net/tcp6", "/proc/net/udp6"]
    };
    let inodes: Vec<String> = tables
        .iter()
        .filter_map(|t| fs::read_to_string(t).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let local_port = f.get(1)?.rsplit(':').next()?;
                    // 0A: TCP LISTEN; UDP sockets have no listen state (07: unconnected).
                    (local_port == port && matches!(*f.get(3)?, "0A" | "07"))
                        .then(|| f.get(9).map(|s| (*s).to_string()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                let name = fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, name));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_parens_and_spaces() {
        let text = "4242 (we ird) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 123456 1000000 250 18446744073709551615";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.pid, 4242);
        assert_eq!(st.state, 'S');
        assert_eq!((st.ppid, st.pgid, st.sid), (1, 4242, 4242));
        assert_eq!((st.utime, st.stime), (7, 3));
        assert_eq!(st.start_time, 123456);
        assert_eq!(st.rss_pages, 250);
    }

    #[test]
    fn self_is_plausible() {
        let me = std::process::id() as i32;
        let st = stat(me).unwrap();
        assert_eq!(st.pid, me);
        assert!(st.rss_pages > 0);
        let usage = group_usage(st.pgid);
        assert!(usage.processes >= 1);
        assert!(usage.rss_bytes >= st.rss_pages * page_size());
        assert!(group_members(st.pgid).contains(&me));
    }
}

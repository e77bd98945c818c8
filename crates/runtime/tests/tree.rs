//! A worker's whole process tree, and the process as child subreaper: what leaves the
//! worker's group or session is still signalled and killed with it, the worker is
//! stopped only when nothing of it runs, orphans are reaped without stealing anyone's
//! exit status, and `limits.nproc` is enforced or refused, never pretended.
//!
//! This test binary starts the reaper ([`reaper::start`]), as the daemon does.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use clusterd_core::plan::AppName;
use clusterd_runtime::spawn::{adopt, spawn_worker, ExitReason, WorkerSpec};
use clusterd_runtime::{procfs, reaper, Error};
use common::*;
use nix::sys::signal::Signal;

fn start_reaper() {
    reaper::start().expect("become a child subreaper");
}

fn alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.state != 'Z')
}

fn gone(pid: i32) -> bool {
    procfs::stat(pid).is_none()
}

/// Both ways of tracking a tree: the worker's own cgroup (where this host allows one) and
/// the process group / session / ancestry fallback.
fn both_modes(argv: &[&str]) -> Vec<(&'static str, WorkerSpec)> {
    let mut fallback = spec(1, argv);
    fallback.membership_cgroup = false;
    vec![("cgroup", spec(0, argv)), ("fallback", fallback)]
}

/// `sh -c "cmd &"`: the shell exits at once, its backgrounded children (one of them in a
/// session of its own) are still the worker. The worker is not over while they run, and
/// the stop signal reaches all of them.
#[tokio::test]
async fn a_wrapper_that_exits_leaves_a_running_worker_whose_tree_is_signalled() {
    start_reaper();
    for (mode, s) in both_modes(&["sh", "-c", "setsid sleep 1000 & sleep 1000 & exit 0"]) {
        let w = spawn_worker(s).await.unwrap();
        let _g = Guard(w.process.clone());
        let leader = w.process.pid();
        wait_until("the shell reaped and two sleeps in the tree", || {
            gone(leader) && w.process.tree_members().len() == 2
        })
        .await;
        let members = w.process.tree_members();
        assert!(!members.contains(&leader), "{mode}: {members:?}");
        let detached = members
            .iter()
            .copied()
            .find(|&p| procfs::stat(p).is_some_and(|s| s.sid == p))
            .unwrap_or_else(|| panic!("{mode}: a member in a session of its own: {members:?}"));
        assert_eq!(
            procfs::stat(detached).unwrap().ppid,
            std::process::id() as i32,
            "{mode}: the orphan came back to the subreaper"
        );
        assert_eq!(
            w.process.exit_reason(),
            None,
            "{mode}: the worker is not over while its tree runs"
        );
        assert!(w.process.signal(Signal::SIGTERM).unwrap(), "{mode}");
        assert_eq!(
            within("tree gone", w.process.wait()).await,
            ExitReason::Code(0),
            "{mode}: the leader's status"
        );
        for p in members {
            assert!(!alive(p), "{mode}: {p} outlived its worker");
        }
        if let Some(cg) = w.process.cgroup() {
            assert!(!cg.exists(), "{mode}: the leaf {} is removed", cg.display());
        }
    }
}

/// Node's `spawn(..., {detached: true})` in miniature: the leader ignores SIGTERM and
/// starts a child that calls `setsid` and ignores SIGTERM too. The stop signal reaches
/// both, SIGKILL takes both, and only then is the worker over.
#[tokio::test]
async fn a_detached_descendant_dies_with_its_worker() {
    start_reaper();
    let script = "
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    time.sleep(1000)
    os._exit(0)
time.sleep(1000)
";
    for (mode, s) in both_modes(&["python3", "-c", script]) {
        let w = spawn_worker(s).await.unwrap();
        let _g = Guard(w.process.clone());
        let leader = w.process.pid();
        let in_own_session = |p: i32| procfs::stat(p).is_some_and(|s| s.sid == p && s.pgid == p);
        wait_until("leader and detached child", || {
            let m = w.process.tree_members();
            m.len() == 2 && m.iter().any(|&p| p != leader && in_own_session(p))
        })
        .await;
        let child = *w
            .process
            .tree_members()
            .iter()
            .find(|&&p| p != leader)
            .unwrap();
        w.process.signal(Signal::SIGTERM).unwrap();
        // Both ignore it: still there.
        assert!(alive(leader) && alive(child), "{mode}");
        assert!(w.process.kill().unwrap(), "{mode}");
        assert_eq!(
            within("tree gone", w.process.wait()).await,
            ExitReason::Signal(libc::SIGKILL),
            "{mode}"
        );
        assert!(
            !alive(child),
            "{mode}: the detached child outlived its worker"
        );
    }
}

/// The leader dies first (SIGKILL of it alone, as a crash would); its detached child
/// lives on under the subreaper and still belongs to the worker.
#[tokio::test]
async fn a_crashed_leaders_orphan_still_belongs_to_the_worker() {
    start_reaper();
    let script = "
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(1000)
    os._exit(0)
time.sleep(1000)
";
    for (mode, s) in both_modes(&["python3", "-c", script]) {
        let w = spawn_worker(s).await.unwrap();
        let _g = Guard(w.process.clone());
        let leader = w.process.pid();
        let in_own_session = |p: i32| procfs::stat(p).is_some_and(|s| s.sid == p);
        wait_until("leader and detached child", || {
            let m = w.process.tree_members();
            m.len() == 2 && m.iter().any(|&p| p != leader && in_own_session(p))
        })
        .await;
        let child = *w
            .process
            .tree_members()
            .iter()
            .find(|&&p| p != leader)
            .unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(leader), Signal::SIGKILL).unwrap();
        wait_until("leader reaped", || gone(leader)).await;
        assert_eq!(w.process.tree_members(), vec![child], "{mode}");
        assert_eq!(w.process.exit_reason(), None, "{mode}");
        assert!(w.process.kill().unwrap(), "{mode}");
        assert_eq!(
            within("tree gone", w.process.wait()).await,
            ExitReason::Signal(libc::SIGKILL),
            "{mode}"
        );
        assert!(!alive(child), "{mode}");
    }
}

/// A process forking in a loop cannot outrun the kill: whatever appears after SIGKILL is
/// killed too, until the tree is empty.
#[tokio::test]
async fn a_fork_loop_is_killed_to_the_last_process() {
    start_reaper();
    let script = "trap '' TERM; while :; do sleep 1000 & done";
    for (mode, s) in both_modes(&["sh", "-c", script]) {
        let w = spawn_worker(s).await.unwrap();
        let _g = Guard(w.process.clone());
        wait_until("some children", || w.process.tree_members().len() > 5).await;
        w.process.kill().unwrap();
        within("tree gone", w.process.wait()).await;
        assert!(w.process.tree_members().is_empty(), "{mode}");
    }
}

/// An orphan (the child of a process that exited) is reparented to this process as child
/// subreaper, and reaped when it exits: no zombie stays behind.
#[tokio::test]
async fn orphans_come_back_and_are_reaped() {
    start_reaper();
    let mut sh = Command::new("sh")
        .args(["-c", "sleep 1000 >/dev/null & echo $!"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(sh.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(sh.wait().unwrap().success());
    let orphan: i32 = line.trim().parse().unwrap();
    wait_until("orphan reparented", || {
        procfs::stat(orphan).is_some_and(|s| s.ppid == std::process::id() as i32)
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(orphan), Signal::SIGKILL).unwrap();
    wait_until("orphan reaped (no zombie)", || gone(orphan)).await;
}

/// The reaper takes nobody's exit status: plain children of this process and worker
/// leaders report theirs while it runs.
#[tokio::test]
async fn the_reaper_steals_no_exit_status() {
    start_reaper();
    for _ in 0..20 {
        let status = Command::new("sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(status.code(), Some(7));
        let status = tokio::process::Command::new("sh")
            .args(["-c", "exit 5"])
            .status()
            .await
            .unwrap();
        assert_eq!(status.code(), Some(5));
    }
    for i in 0..5 {
        let w = spawn_worker(spec(i, &["sh", "-c", "exit 3"]))
            .await
            .unwrap();
        assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(3));
    }
}

/// An adopted worker's tree is found again from its cgroup.
#[tokio::test]
async fn adoption_finds_the_workers_cgroup() {
    start_reaper();
    let w = spawn_worker(spec(3, &["sh", "-c", "setsid sleep 1000 & wait"]))
        .await
        .unwrap();
    let _g = Guard(w.process.clone());
    let Some(cg) = w.process.cgroup().map(std::path::Path::to_path_buf) else {
        eprintln!("no cgroup v2 for worker trees on this host; skipping");
        return;
    };
    wait_until("two processes", || w.process.tree_members().len() == 2).await;
    let adopted = adopt(
        &AppName("t".into()),
        3,
        w.process.pid(),
        w.process.start_time(),
    )
    .unwrap();
    assert_eq!(adopted.cgroup(), Some(cg.as_path()));
    assert_eq!(adopted.tree_members(), w.process.tree_members());
    adopted.kill().unwrap();
    within("adopted tree gone", adopted.wait()).await;
    within("tree gone", w.process.wait()).await;
}

/// `limits.nproc` counts this worker's processes alone (`pids.max` of its cgroup) where
/// the host has the cgroup v2 pids controller; a root worker without one is refused
/// (RLIMIT_NPROC does not limit root), never started with a limit that does nothing.
#[tokio::test]
async fn nproc_is_enforced_per_worker_or_refused_for_root() {
    start_reaper();
    let script = "
import os, time
ok = 0
for i in range(30):
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        ok += 1
    except OSError:
        pass
print('forked=%d' % ok, flush=True)
time.sleep(1000)
";
    let dir = tempfile::tempdir().unwrap();
    // Not through a pyenv shim: its bash wrapper forks helpers of its own.
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut s = spec(4, &[python, "-c", script]);
    s.rlimits.nproc = Some(5);
    s.log_dir = Some(dir.path().to_path_buf());
    let root = nix::unistd::geteuid().is_root();
    match spawn_worker(s).await {
        Ok(w) => {
            let _g = Guard(w.process.clone());
            let log = w.log_path.clone().unwrap();
            wait_until("the fork count", || {
                std::fs::read_to_string(&log).is_ok_and(|t| t.contains("forked="))
            })
            .await;
            let text = std::fs::read_to_string(&log).unwrap();
            let forked: u32 = text
                .lines()
                .find_map(|l| l.strip_prefix("forked="))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // Root is never limited by RLIMIT_NPROC: a root worker that started must be
            // held by a pids controller (cgroup v2, or v1 on hybrid hosts), counting this
            // worker alone (the host has far more than 5 root processes).
            eprintln!("nproc 5: {forked} of 30 forks succeeded");
            if root {
                assert!(forked <= 4, "pids.max 5 let {forked} forks through");
            }
            if let Some(f) = w.process.cgroup().map(|c| c.join("pids.max")) {
                if f.exists() {
                    assert_eq!(std::fs::read_to_string(f).unwrap().trim(), "5");
                }
            }
            w.process.kill().unwrap();
            within("tree gone", w.process.wait()).await;
        }
        Err(e) => {
            assert!(root, "only a root worker is refused: {e}");
            assert!(matches!(e, Error::WorkerStart { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("limits.nproc cannot be enforced") && msg.contains("root"),
                "{msg}"
            );
        }
    }
}

/// CPU and memory of a worker count its whole tree where it has a cgroup: a `setsid`
/// child's 48 MiB is the worker's, though it left the process group.
#[tokio::test]
async fn usage_of_a_cgroup_tracked_worker_covers_its_detached_children() {
    start_reaper();
    let script = "
import os, time
if os.fork() == 0:
    os.setsid()
    b = bytearray(48 * 1024 * 1024)
    for i in range(0, len(b), 4096): b[i] = 1
    time.sleep(1000)
    os._exit(0)
time.sleep(1000)
";
    let w = spawn_worker(spec(5, &["python3", "-c", script]))
        .await
        .unwrap();
    let _g = Guard(w.process.clone());
    if w.process.cgroup().is_none() {
        eprintln!("no cgroup v2 for worker trees on this host; skipping");
        return;
    }
    let pid = w.process.pid();
    wait_until("48 MiB in the tree", || {
        let members = w.process.cgroup_members().unwrap_or_default();
        procfs::sum_of(&procfs::usage_by_pid(), &members).rss_bytes >= 48 << 20
    })
    .await;
    assert!(
        procfs::group_usage(pid).rss_bytes < 48 << 20,
        "the child left the process group"
    );
    w.process.kill().unwrap();
    within("tree gone", w.process.wait()).await;
}

//! Starting, watching and signalling worker processes.
//!
//! A worker is a process tree: the shim execs the app in a fresh session (`setsid`), so
//! the worker's pid is also its pgid and sid, and a terminal's Ctrl-C to the daemon does
//! not reach workers. Everything the worker starts belongs to it, also what leaves the
//! group or session (`cmd &` under a shell that exits, `setsid`, Node's
//! `{detached: true}`): [`crate::tree`] finds the whole tree (a cgroup v2 leaf per worker
//! where one can be made, else process group, session and ancestry). Signals and SIGKILL
//! go to the whole tree, and [`WorkerProcess::wait`] resolves only once the tree is
//! empty, so a worker counts as stopped only when nothing of it runs. Workers deliberately do not die with the daemon (no
//! `PR_SET_PDEATHSIG`): inherit-mode workers keep serving while the daemon restarts, and
//! the new daemon takes them back with [`adopt`].
//!
//! Exit is observed through a pidfd (poll readable = exited), then the child is reaped
//! under the same lock that [`WorkerProcess::signal`] takes, so a signal is never sent to
//! a pid that was already reaped and possibly reused.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterd_core::plan::{AppName, Revision};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::ipc::IpcChannel;
use crate::limits::CgroupTree;
use crate::procfs;
use crate::shim::{resolve_credentials, shim_args, Rlimits, ShimCommand, ShimConfig};
use crate::tree::ProcessTree;

/// Variables the daemon's own environment may carry (when it is itself socket-activated
/// or a Node child) that must never leak into a worker: they are set per worker or not
/// at all.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "NODE_UNIQUE_ID",
    crate::tree::TREE_ENV,
];

/// A listening socket passed to the worker (inherit mode), in order: the first is fd 3.
#[derive(Debug)]
pub struct InheritedListener {
    /// Name for `LISTEN_FDNAMES` (empty becomes `unknown`, as systemd does).
    pub name: String,
    /// A duplicate of the daemon's socket ([`crate::listener::BoundListener::inherit_fd`]);
    /// closed in the daemon once the worker is started.
    pub fd: OwnedFd,
}

/// Everything needed to start one worker.
#[derive(Debug)]
pub struct WorkerSpec {
    /// App name (`CLUSTERD_APP`, log path).
    pub app: AppName,
    /// Stable instance index (`CLUSTERD_INSTANCE`).
    pub index: u32,
    /// Revision (`CLUSTERD_REVISION`).
    pub revision: Revision,
    /// The command; `argv[0]` is looked up on `PATH`.
    pub argv: Vec<OsString>,
    /// Working directory (absolute; the caller resolves manifest-relative paths).
    pub cwd: Option<PathBuf>,
    /// The manifest's `env`. Added to the daemon's own environment.
    pub env: BTreeMap<String, String>,
    /// Variables computed by the caller (`PORT`, `PORT_<NAME>`, ...); they override `env`.
    pub extra_env: BTreeMap<String, String>,
    /// Inherit mode: sockets for fds 3, 4, ... with `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`.
    pub listeners: Vec<InheritedListener>,
    /// The daemon's sd_notify socket; set as `NOTIFY_SOCKET` whenever given (harmless to
    /// apps that ignore it).
    pub notify_socket: Option<PathBuf>,
    /// Open a Node IPC channel (`NODE_CHANNEL_FD`, json) for `readiness: ipc`.
    pub ipc: bool,
    /// Shared listener mode: the shim installs the bind filter ([`crate::seccomp`]) and
    /// the notification fd comes back in [`SpawnedWorker::seccomp_notif`], for
    /// [`crate::seccomp::SharedBind::start`]. The caller sets `PORT` to the public port.
    pub shared_bind: bool,
    /// Drop to this user (needs a root daemon).
    pub user: Option<String>,
    /// Primary group.
    pub group: Option<String>,
    /// rlimits applied by the shim. `nproc` is enforced with the pids controller
    /// (`pids.max` of the worker's own leaf: cgroup v2, or a cgroup v1 pids leaf on
    /// hybrid hosts) where there is one; otherwise with
    /// RLIMIT_NPROC, which counts every process of the worker's user on the host and
    /// does not apply to root: a root worker with `nproc` and no pids controller is
    /// refused.
    pub rlimits: Rlimits,
    /// cgroup directory to join (see [`crate::limits::CgroupTree`]). When `None` and
    /// `membership_cgroup` is set, the worker gets a leaf of its own anyway, for
    /// tracking its tree.
    pub cgroup: Option<PathBuf>,
    /// Put a worker without `cgroup` into a leaf of the membership tree
    /// ([`CgroupTree::shared_membership`]) where one exists. Default on.
    pub membership_cgroup: bool,
    /// Log directory: stdout+stderr go to `<log_dir>/<app>/<app>-<index>.log`; `None`
    /// sends them to /dev/null.
    pub log_dir: Option<PathBuf>,
    /// The app's log policy, given only when no other live worker of this index writes
    /// its log file: the file is then rotated by rename before the worker gets it (no
    /// copy, works on a full disk; see [`crate::logs::rotate_unshared`]). `None`: leave
    /// rotation to the periodic copytruncate.
    pub log_rotate_unshared: Option<crate::logs::LogPolicy>,
    /// Prefix each log line with the time it was written (through a timestamper process
    /// the shim starts; see [`crate::logs`]). On by default; only with a `log_dir`.
    pub log_timestamps: bool,
    /// How to run the exec shim.
    pub shim: ShimCommand,
}

impl WorkerSpec {
    /// A spec with the required fields and everything else empty.
    pub fn new(
        app: AppName,
        index: u32,
        revision: Revision,
        argv: Vec<OsString>,
        shim: ShimCommand,
    ) -> Self {
        WorkerSpec {
            app,
            index,
            revision,
            argv,
            cwd: None,
            env: BTreeMap::new(),
            extra_env: BTreeMap::new(),
            listeners: Vec::new(),
            notify_socket: None,
            ipc: false,
            shared_bind: false,
            user: None,
            group: None,
            rlimits: Rlimits::default(),
            cgroup: None,
            membership_cgroup: true,
            log_dir: None,
            log_rotate_unshared: None,
            log_timestamps: true,
            shim,
        }
    }
}

/// How a worker ended: the planner's type, with its one wording.
pub use clusterd_core::plan::ExitReason;

/// A started worker.
#[derive(Debug)]
pub struct SpawnedWorker {
    /// The process handle (cloneable).
    pub process: WorkerProcess,
    /// The Node IPC channel when `spec.ipc` was set.
    pub ipc: Option<IpcChannel>,
    /// Its log file, when logging.
    pub log_path: Option<PathBuf>,
    /// `spec.shared_bind`: the seccomp notification fd of the worker's bind filter. Hand it
    /// to [`crate::seccomp::SharedBind::start`] at once: until then the worker's
    /// `bind`/`listen` calls wait.
    pub seccomp_notif: Option<OwnedFd>,
    /// Whether that filter waits killably for the daemon's answer
    /// (`SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`, Linux 5.19+).
    pub seccomp_wait_killable: bool,
}

/// Handle of a worker's process tree: wait for it to be gone, signal all of it. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct WorkerProcess {
    inner: Arc<Inner>,
    exit: watch::Receiver<Option<ExitReason>>,
}

#[derive(Debug)]
struct Inner {
    pid: i32,
    start_time: u64,
    /// Our child (we reap it) or adopted (someone else does).
    child: bool,
    /// `Some` once the leader is gone (for a child: reaped). Held while signalling.
    gone: Mutex<Option<ExitReason>>,
    /// Everything the worker started.
    tree: ProcessTree,
    /// SIGKILL was asked for: whatever appears in the tree afterwards is killed too.
    killing: AtomicBool,
    /// The tree was seen empty: nothing may be signalled any more (pids get reused).
    finished: AtomicBool,
}

impl WorkerProcess {
    /// Pid of the leader, which is also the process group id.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// Start time in clock ticks since boot (save it with the pid for [`adopt`]).
    pub fn start_time(&self) -> u64 {
        self.inner.start_time
    }

    /// The worker's cgroup leaf, when its tree is tracked by one.
    pub fn cgroup(&self) -> Option<&std::path::Path> {
        self.inner.tree.cgroup()
    }

    /// Members of the worker's cgroup leaf right now, when its tree is tracked by one: a
    /// cheap read (no /proc scan), for sampling CPU and memory of the whole tree.
    pub fn cgroup_members(&self) -> Option<Vec<i32>> {
        if self.inner.finished.load(Ordering::SeqCst) {
            return Some(Vec::new());
        }
        self.inner.tree.cgroup_members()
    }

    /// Live processes of the worker's tree right now (the leader included while alive).
    pub fn tree_members(&self) -> Vec<i32> {
        if self.inner.finished.load(Ordering::SeqCst) {
            return Vec::new();
        }
        self.inner.tree.members()
    }

    /// Whether the worker was adopted from an earlier daemon.
    pub fn is_adopted(&self) -> bool {
        !self.inner.child
    }

    /// How it exited, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        *self.exit.borrow()
    }

    /// Waits until the whole tree is gone: the leader has exited (and, for a child, was
    /// reaped) and no process of the tree is left. Returns the leader's exit status.
    pub async fn wait(&self) -> ExitReason {
        let mut rx = self.exit.clone();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(ExitReason::Unknown),
            // The watcher task is gone (runtime shutting down).
            Err(_) => ExitReason::Unknown,
        };
        reason
    }

    /// Sends `sig` to the whole tree, each process once. Returns `false` when nothing was
    /// left to signal.
    ///
    /// While the leader lives, its process group gets `killpg` (race-free: an unreaped
    /// leader's pid, the pgid, cannot be reused) and the rest of the tree (processes that
    /// left the group) gets `kill`. After the leader is gone, every member left gets
    /// `kill`. SIGKILL uses `cgroup.kill` where the tree has a cgroup, and is repeated on
    /// anything that still appears in the tree until it is empty.
    pub fn signal(&self, sig: Signal) -> Result<bool> {
        let gone = self.inner.gone.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.finished.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let pgid = self.inner.pid;
        // Adopted: the leader counts only while it is still the recorded process.
        let leader_alive = gone.is_none()
            && (self.inner.child || procfs::start_time(pgid) == Some(self.inner.start_time));
        if sig == Signal::SIGKILL {
            self.inner.killing.store(true, Ordering::SeqCst);
        }
        let mut sent = false;
        if leader_alive {
            sent |= killpg(pgid, sig)?;
        }
        let group = leader_alive.then_some(pgid);
        let others = if sig == Signal::SIGKILL {
            usize::from(self.inner.tree.kill(group))
        } else {
            self.inner.tree.signal(sig, group)
        };
        sent |= others > 0;
        tracing::debug!(
            pgid,
            signal = sig.as_str(),
            sent,
            others,
            "signalled worker tree"
        );
        Ok(sent)
    }

    /// SIGKILL to the whole tree.
    pub fn kill(&self) -> Result<bool> {
        self.signal(Signal::SIGKILL)
    }

    fn start(
        pid: i32,
        start_time: u64,
        child: bool,
        cgroup: Option<PathBuf>,
        extra_cgroups: Vec<PathBuf>,
        mark: Option<&str>,
        span: tracing::Span,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            pid,
            start_time,
            child,
            gone: Mutex::new(None),
            tree: ProcessTree::new(pid, start_time, cgroup, mark).with_extra_cgroups(extra_cgroups),
            killing: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        let watcher = Arc::clone(&inner);
        tokio::spawn(
            async move {
                let reason = watch_exit(&watcher).await;
                if child {
                    crate::reaper::release(pid);
                }
                wait_tree_empty(&watcher).await;
                tracing::info!(pid, %reason, "worker exited");
                let _ = tx.send(Some(reason));
            }
            .instrument(span),
        );
        WorkerProcess { inner, exit: rx }
    }
}

/// After the leader: waits until nothing of the tree is left, killing again whatever
/// shows up once SIGKILL was asked for. Then removes the worker's cgroup leaf.
async fn wait_tree_empty(inner: &Inner) {
    let mut pause = Duration::from_millis(10);
    let mut logged = false;
    loop {
        if inner.tree.is_empty() {
            break;
        }
        if !logged {
            logged = true;
            tracing::info!(
                pid = inner.pid,
                remaining = inner.tree.members().len(),
                "worker's main process exited; waiting for the rest of its tree"
            );
        }
        if inner.killing.load(Ordering::SeqCst) {
            inner.tree.kill(None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    {
        // Under the signal lock: no signal can be on its way to a member that is gone.
        let _gone = inner.gone.lock().unwrap_or_else(|e| e.into_inner());
        inner.finished.store(true, Ordering::SeqCst);
    }
    inner.tree.remove_cgroup();
}

fn killpg(pgid: i32, sig: Signal) -> Result<bool> {
    match nix::sys::signal::killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(Error::io(
            format!("killpg({pgid}, {})", sig.as_str()),
            e.into(),
        )),
    }
}

/// Waits for the leader to exit: pidfd readiness where available, else polling.
async fn watch_exit(inner: &Inner) -> ExitReason {
    if let Some(pidfd) = pidfd_open(inner.pid) {
        // SAFETY: the OwnedFd is moved into the AsyncFd, stays open for its whole life and
        // always reports the same descriptor.
        match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(afd) => {
                let _ = afd.readable().await;
                if !inner.child {
                    return mark_gone(inner, ExitReason::Unknown);
                }
                // The child is a zombie now: reaping cannot block for long.
                loop {
                    if let Some(r) = try_reap(inner) {
                        return r;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "pidfd not pollable, polling instead"),
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if inner.child {
            if let Some(r) = try_reap(inner) {
                return r;
            }
        } else if procfs::stat(inner.pid)
            .is_none_or(|s| s.start_time != inner.start_time || s.state == 'Z')
        {
            return mark_gone(inner, ExitReason::Unknown);
        }
    }
}

fn mark_gone(inner: &Inner, reason: ExitReason) -> ExitReason {
    *inner.gone.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    reason
}

/// Reaps the child if it has exited, holding the signal lock.
fn try_reap(inner: &Inner) -> Option<ExitReason> {
    let mut gone = inner.gone.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = *gone {
        return Some(r);
    }
    let reason = match waitpid(Pid::from_raw(inner.pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => ExitReason::Code(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => ExitReason::Signal(sig as i32),
        Ok(_) => return None,
        // ECHILD: someone else reaped it (a stray waitpid(-1) in the process).
        Err(_) => ExitReason::Unknown,
    };
    *gone = Some(reason);
    Some(reason)
}

pub(crate) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Variables every worker gets unless the manifest's `env` sets them (they override the
/// daemon's own environment, which workers otherwise inherit).
///
/// `PYTHONUNBUFFERED=1`: Python block-buffers stdout when it is not a terminal, and a
/// worker's stdout is a log file, so `clusterd logs` would show nothing for minutes (or
/// lose the tail on SIGKILL). Other runtimes (Node, Ruby's `$stdout.sync` aside, Go) write
/// through already. `env: {PYTHONUNBUFFERED: ""}` restores Python's buffering.
pub const DEFAULT_ENV: &[(&str, &str)] = &[("PYTHONUNBUFFERED", "1")];

/// Starts a worker through the exec shim.
///
/// Returns once the shim has exec'd the app, or with [`Error::WorkerStart`] carrying the
/// shim's message when a step before exec failed ("exec of `foo` failed: No such file or
/// directory", a bad `user:`, chdir, rlimit or cgroup). The fork happens on tokio's
/// blocking pool, because waiting for the exec status blocks.
pub async fn spawn_worker(spec: WorkerSpec) -> Result<SpawnedWorker> {
    let span = tracing::info_span!("worker", app = %spec.app, instance = spec.index);
    if spec.argv.is_empty() {
        return Err(Error::InvalidSpec("empty command".into()));
    }
    let span2 = span.clone();
    let mark = tree_mark();
    let mark2 = mark.clone();
    let (pid, start_time, ipc_fd, log_path, seccomp_notif, (cgroup, extra_cgroups)) =
        tokio::task::spawn_blocking(move || span2.in_scope(|| spawn_blocking(spec, &mark2)))
            .await
            .map_err(|e| Error::io("spawn task", std::io::Error::other(e)))??;
    let process = WorkerProcess::start(
        pid,
        start_time,
        true,
        cgroup,
        extra_cgroups,
        Some(&mark),
        span.clone(),
    );
    let ipc = ipc_fd.map(IpcChannel::from_fd).transpose()?;
    span.in_scope(|| tracing::info!(pid, "worker started"));
    let (seccomp_notif, seccomp_wait_killable) = match seccomp_notif {
        Some((fd, killable)) => (Some(fd), killable),
        None => (None, false),
    };
    Ok(SpawnedWorker {
        process,
        ipc,
        log_path,
        seccomp_notif,
        seccomp_wait_killable,
    })
}

type Spawned = (
    i32,
    u64,
    Option<OwnedFd>,
    Option<PathBuf>,
    Option<(OwnedFd, bool)>,
    (Option<PathBuf>, Vec<PathBuf>),
);

/// A value unique to one worker for [`crate::tree::TREE_ENV`]: daemon pid, boot-relative
/// daemon start, and a counter.
fn tree_mark() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let me = std::process::id() as i32;
    format!(
        "{me}.{}.{}",
        procfs::start_time(me).unwrap_or(0),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn spawn_blocking(mut spec: WorkerSpec, mark: &str) -> Result<Spawned> {
    let start_err = |message: String| Error::WorkerStart {
        app: spec.app.0.clone(),
        index: spec.index,
        message,
    };
    // Fail early, with the daemon's wording, before forking.
    let creds = resolve_credentials(spec.user.as_deref(), spec.group.as_deref())?;
    let as_root = match &creds {
        Some(c) => c.uid == 0,
        None => nix::unistd::geteuid().is_root(),
    };
    // The worker's own cgroup leaf: given by the caller (limits), or made for membership.
    let membership = if spec.cgroup.is_none() && spec.membership_cgroup {
        CgroupTree::shared_membership().ok()
    } else {
        None
    };
    if let Some(tree) = membership {
        let leaf = format!("{}-{}", spec.index, spec.revision.0);
        match tree.create_worker_cgroup(&spec.app.0, &leaf, Default::default()) {
            Ok(path) => spec.cgroup = Some(path),
            Err(e) => {
                tracing::warn!(error = %e, "no cgroup for this worker; tracking its tree by process group and ancestry")
            }
        }
    }
    let cgroup_for_err = spec.cgroup.clone();
    let mut extra_cgroups: Vec<PathBuf> = Vec::new();
    if let Some(n) = spec.rlimits.nproc {
        let v2 = match &spec.cgroup {
            Some(cg) => CgroupTree::set_pids_max(cg, n).map_err(|e| e.to_string()),
            None => Err("the worker has no cgroup v2".to_string()),
        };
        // Hybrid hosts: the pids controller lives in cgroup v1.
        let pids = v2.or_else(|v2_reason| {
            let leaf = format!("{}-{}", spec.index, spec.revision.0);
            crate::limits::v1_pids_leaf(&spec.app.0, &leaf, n)
                .map(|dir| extra_cgroups.push(dir))
                .map_err(|v1| format!("{v2_reason}; {v1}"))
        });
        match pids {
            // The cgroup counts this worker's processes alone; RLIMIT_NPROC would count
            // every process of the user on the host.
            Ok(()) => spec.rlimits.nproc = None,
            Err(reason) if as_root => {
                if membership.is_some() {
                    if let Some(cg) = &cgroup_for_err {
                        let _ = CgroupTree::remove_worker_cgroup(cg);
                    }
                }
                return Err(start_err(format!(
                    "limits.nproc cannot be enforced: the worker runs as root, which RLIMIT_NPROC does not limit, and there is no cgroup v2 pids controller for it ({reason}); remove limits.nproc, run the worker as another user, or give clusterd a delegated cgroup v2 subtree with the pids controller"
                )));
            }
            Err(reason) => {
                tracing::debug!(%reason, "limits.nproc falls back to RLIMIT_NPROC (counts every process of the user)");
            }
        }
    }
    let fail_cleanup = |e: Error| {
        if membership.is_some() {
            if let Some(cg) = &cgroup_for_err {
                let _ = CgroupTree::remove_worker_cgroup(cg);
            }
        }
        for cg in &extra_cgroups {
            let _ = CgroupTree::remove_worker_cgroup(cg);
        }
        e
    };

    let (log, log_path) = match &spec.log_dir {
        Some(dir) => {
            let (f, p) = crate::logs::open_instance_log_rotated(
                dir,
                &spec.app.0,
                spec.index,
                spec.log_rotate_unshared,
            )?;
            (Some(f), Some(p))
        }
        None => (None, None),
    };

    // fds the child must keep: (fd here, fd in the worker).
    let mut pairs: Vec<(RawFd, RawFd)> = Vec::new();
    let mut next_target: RawFd = 3;
    for l in &spec.listeners {
        pairs.push((l.fd.as_raw_fd(), next_target));
        next_target += 1;
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let (ipc_parent, ipc_child) = if spec.ipc {
        let (a, b) = socketpair()?;
        pairs.push((b.as_raw_fd(), next_target));
        env.push(("NODE_CHANNEL_FD".into(), next_target.to_string()));
        env.push(("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()));
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("create status pipe", e.into()))?;
    let (seccomp_parent, seccomp_child) = if spec.shared_bind {
        let (a, b) = socketpair()?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };

    let n = spec.listeners.len();
    if n > 0 {
        env.push(("LISTEN_FDS".into(), n.to_string()));
        let names: Vec<&str> = spec
            .listeners
            .iter()
            .map(|l| {
                if l.name.is_empty() {
                    "unknown"
                } else {
                    l.name.as_str()
                }
            })
            .collect();
        env.push(("LISTEN_FDNAMES".into(), names.join(":")));
    }
    if let Some(sock) = &spec.notify_socket {
        env.push(("NOTIFY_SOCKET".into(), sock.display().to_string()));
    }
    env.push(("CLUSTERD_APP".into(), spec.app.0.clone()));
    env.push(("CLUSTERD_INSTANCE".into(), spec.index.to_string()));
    env.push(("CLUSTERD_REVISION".into(), spec.revision.0.clone()));
    env.push((crate::tree::TREE_ENV.into(), mark.to_string()));

    let config = ShimConfig {
        fds: pairs.clone(),
        status_fd: Some(status_w.as_raw_fd()),
        set_listen_pid: n > 0,
        rlimits: Rlimits {
            nofile_soft: crate::accept::original_nofile_soft(),
            ..spec.rlimits
        },
        cgroup: spec.cgroup.clone(),
        extra_cgroups: extra_cgroups.clone(),
        user: spec.user.clone(),
        group: spec.group.clone(),
        cwd: spec.cwd.clone(),
        seccomp_socket: seccomp_child.as_ref().map(AsRawFd::as_raw_fd),
        timestamps: spec.log_timestamps && log.is_some(),
    };
    let mut cmd = Command::new(&spec.shim.program);
    cmd.args(shim_args(&spec.shim, &config, &spec.argv)?);
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(DEFAULT_ENV.iter().copied())
        .envs(&spec.env)
        .envs(&spec.extra_env)
        .envs(env);
    cmd.stdin(Stdio::null());
    match &log {
        Some(f) => {
            let out = f.try_clone().map_err(|e| Error::io("dup log file", e))?;
            let err = f.try_clone().map_err(|e| Error::io("dup log file", e))?;
            cmd.stdout(out).stderr(err);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    // Allocated before the fork: the closure below must not allocate.
    let keep: Vec<RawFd> = pairs
        .iter()
        .map(|&(s, _)| s)
        .chain([status_w.as_raw_fd()])
        .chain(seccomp_child.as_ref().map(AsRawFd::as_raw_fd))
        .collect();
    // SAFETY: the closure runs between fork and exec in the child and only makes
    // async-signal-safe calls (setsid, fcntl) on descriptors that this spawn owns; it
    // reads a Vec allocated before the fork and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // Forked and claimed under the reaper's fork lock: the reaper never takes the exit
    // status that the watcher below collects.
    let fork_guard = crate::reaper::fork_guard();
    let child = cmd.spawn().map_err(|e| {
        fail_cleanup(start_err(format!(
            "cannot run the exec shim `{}`: {}",
            spec.shim.program.display(),
            crate::shim::errno_text(&e)
        )))
    })?;
    let pid = child.id() as i32;
    crate::reaper::claim(pid);
    drop(fork_guard);
    // Close our copies of what the child got, then read the status until the exec closes
    // the write end (EOF, success) or the shim reports an error.
    drop(status_w);
    drop(ipc_child);
    drop(seccomp_child);
    drop(spec.listeners);
    drop(log);
    let mut message = String::new();
    let _ = File::from(status_r).read_to_string(&mut message);
    if !message.is_empty() {
        // The shim exits 127 right after writing; reap it.
        let _ = waitpid(Pid::from_raw(pid), None);
        crate::reaper::release(pid);
        return Err(fail_cleanup(start_err(message)));
    }
    // The shim sent the notification fd before its exec, so it is queued by now.
    let seccomp_notif = match &seccomp_parent {
        Some(sock) => match crate::seccomp::recv_fd(sock.as_fd()) {
            Ok(Some(fd)) => Some(fd),
            Ok(None) => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid), None);
                return Err(start_err(
                    "the exec shim sent no seccomp notification fd".into(),
                ));
            }
            Err(e) => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid), None);
                return Err(start_err(format!(
                    "receiving the seccomp notification fd failed: {e}"
                )));
            }
        },
        None => None,
    };
    // Our unreaped child: its stat is there even if it already exited.
    let start_time = procfs::start_time(pid).unwrap_or(0);
    drop(child); // std's Child neither kills nor waits on drop; the watcher reaps.
    Ok((
        pid,
        start_time,
        ipc_parent,
        log_path,
        seccomp_notif,
        (spec.cgroup, extra_cgroups),
    ))
}

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("create ipc socketpair", e.into()))
}

/// Takes back a worker started by an earlier daemon (recorded pid and start time).
///
/// Refused when the pid is gone, belongs to another process (start time differs: the pid
/// was reused), or is not a process-group leader (every worker is one). Its exit is
/// observed with a pidfd; the exit status is unknown ([`ExitReason::Unknown`]) because
/// the worker is not our child. Its tree is found again from its cgroup
/// (`/proc/PID/cgroup`, when that is a worker leaf of a clusterd subtree), else by
/// process group, session and ancestry.
pub fn adopt(app: &AppName, index: u32, pid: i32, start_time: u64) -> Result<WorkerProcess> {
    let not = |reason: String| Error::NotAdoptable { pid, reason };
    let st = procfs::stat(pid).ok_or_else(|| not("no such process".into()))?;
    if st.start_time != start_time {
        return Err(not(format!(
            "start time {} differs from the recorded {start_time}: the pid was reused",
            st.start_time
        )));
    }
    if st.state == 'Z' {
        return Err(not("it has exited".into()));
    }
    if st.pgid != pid {
        return Err(not(format!(
            "it is not a process-group leader (pgid {})",
            st.pgid
        )));
    }
    let span = tracing::info_span!("worker", app = %app, instance = index);
    span.in_scope(|| tracing::info!(pid, "worker adopted"));
    // A child of ours (same daemon process) can be reaped; anything else cannot.
    let child = st.ppid == std::process::id() as i32;
    if child {
        crate::reaper::claim(pid);
    }
    let cgroup = crate::limits::worker_cgroup_of(pid);
    let mark = std::fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .and_then(|env| {
            let prefix = format!("{}=", crate::tree::TREE_ENV);
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(prefix.as_bytes()).map(<[u8]>::to_vec))
        })
        .and_then(|v| String::from_utf8(v).ok());
    // A cgroup v1 pids leaf of an adopted worker stays behind (empty) when it stops.
    Ok(WorkerProcess::start(
        pid,
        start_time,
        child,
        cgroup,
        Vec::new(),
        mark.as_deref(),
        span,
    ))
}

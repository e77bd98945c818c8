//! `shared` listener mode: an unmodified app's `bind(PORT)` is answered with the daemon's
//! own listening socket, through seccomp user notification.
//!
//! Two halves:
//! - In the worker, before exec ([`install_bind_filter`], called by the exec shim): set
//!   `no_new_privs` and install a filter that turns `bind(2)` and `listen(2)` into user
//!   notifications (`SECCOMP_RET_USER_NOTIF`, `SECCOMP_FILTER_FLAG_NEW_LISTENER`). The
//!   notification fd goes to the daemon over a unix socket ([`send_fd`]). The filter is
//!   inherited by every thread and child of the worker; every other syscall runs at full
//!   speed (the program is seven cBPF instructions).
//! - In the daemon ([`SharedBind::start`]): a tokio task answers each notification
//!   without blocking:
//!   - `bind` of a shared listener's port, with a socket of the listener's protocol and a
//!     compatible family (`0.0.0.0`, a specific address, or `::` dual-stack as Node binds
//!     by default): the daemon's socket is installed *on the app's own fd number*
//!     (`SECCOMP_IOCTL_NOTIF_ADDFD` + `SECCOMP_ADDFD_FLAG_SETFD`, which closes the app's
//!     unbound socket) and the call returns 0. The bind is emulated, never continued, so
//!     nothing the app does meanwhile can change what was decided.
//!   - `listen` on an fd that is (now) the shared socket: returns 0 without touching it,
//!     so an app's small backlog (Python's `http.server` asks for 5) never shrinks the
//!     shared queue.
//!   - everything else continues (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`): the kernel performs
//!     the call with the app's own credentials. Continuing is only unsafe when the
//!     decision protects something (seccomp(2) NOTES, TOCTOU); here it protects nothing the
//!     app could not do anyway: a thread that rewrites the address after our check can only
//!     bind what the app may bind itself, and the daemon's port is taken, so it gets
//!     `EADDRINUSE`. Emulating those binds in the daemon would be worse: a root daemon
//!     would bind privileged ports for an unprivileged app.
//!
//! Why `SECCOMP_ADDFD_FLAG_SEND` is not used: with it the *return value* of the
//! intercepted call is the new fd number, and `bind` must return 0 (libuv treats any
//! non-zero result as failure). ADDFD with SETFD followed by a separate reply is safe
//! here because the step is idempotent: if the reply is lost (the task was interrupted
//! and restarts the call), the repeated `bind` finds the fd already *is* the shared
//! socket and is answered 0 again. `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (5.19) is
//! used where available so that Go's preemption signals do not restart a bind that the
//! daemon is already answering (golang/go#37942).
//!
//! `O_NONBLOCK` lives on the open file description that the daemon and every worker share,
//! so an answered bind sets the shared socket's `O_NONBLOCK` to what the app asked of its
//! own socket (libuv and Go create non-blocking sockets, Python's `http.server` a blocking
//! one): all workers of an app run the same program, so they agree. With one exception:
//! a blocking bind never *clears* `O_NONBLOCK` while other workers of the app hold the
//! socket ([`Peers`]). Many event-loop servers create a blocking socket, bind it, and only
//! then make it non-blocking (Rust's `std::net::TcpListener::bind` + `set_nonblocking`,
//! Python's asyncio): clearing the flag for that moment made a running worker's event
//! loop call `accept()` on a blocking socket and sleep in the kernel, deaf to its
//! shutdown signal, until the stop timeout's SIGKILL reset its connections (seen as
//! connection resets during reloads). The flag the app asked for is applied as soon as
//! it is the only worker that holds the socket. `FD_CLOEXEC` is per fd and copied from
//! the app's socket.
//!
//! Consequence of `no_new_privs`: setuid/setgid programs started by a shared-mode worker
//! do not gain privileges (sudo, ping on old systems, ...). Needs Linux 5.9 (ADDFD);
//! [`shared_mode_support`] says whether this host qualifies.

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::listener::Protocol;

/// `AUDIT_ARCH_*` of the architecture the daemon (and so the shim) was built for: the
/// filter only intercepts native syscalls; other ABIs (x32, i386 `socketcall`) pass.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xC000_00F3; // AUDIT_ARCH_RISCV64

/// Linux version that has everything needed: pidfd_getfd (5.6) and NOTIF_ADDFD (5.9).
const MIN_KERNEL: (u32, u32) = (5, 9);

/// Whether `mode: shared` can work on this host; the error is the reason, worded for the
/// manifest check (`mode `shared` cannot work on this host: <reason> (expected ...)`),
/// naming the kernel. Probed once: the kernel version, then whether seccomp offers
/// `SECCOMP_RET_USER_NOTIF` (it may be compiled out, or blocked by a container's policy).
///
/// # Errors
/// The reason, as text for [`clusterd_core::load::LoadContext::shared_mode_unavailable`].
pub fn shared_mode_support() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_support).clone()
}

fn probe_support() -> std::result::Result<(), String> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    if let Some(version) = parse_kernel_version(&release) {
        if version < MIN_KERNEL {
            return Err(format!(
                "it needs Linux {}.{} or newer (seccomp user notification with ADDFD), this is Linux {release}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
    }
    let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from the pointer, which is valid for
    // the duration of the call; it changes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &raw const action,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "seccomp user notification is unavailable on Linux {release} ({})",
            crate::shim::errno_text(&e)
        ));
    }
    Ok(())
}

/// `6.18.44-fc` -> (6, 18). `None` when unparsable (then the syscall probe decides).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The filter: notify on native `bind` and `listen`, allow everything else.
fn filter_program() -> [libc::sock_filter; 7] {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    // Offsets in struct seccomp_data: nr at 0, arch at 4.
    [
        stmt(LD_W_ABS, 4),
        jump(AUDIT_ARCH, 0, 3), // foreign ABI -> allow
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_bind as u32, 2, 0),   // -> notify
        jump(libc::SYS_listen as u32, 1, 0), // -> notify
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_USER_NOTIF),
    ]
}

/// The installed filter: its notification fd (close-on-exec) for the daemon, and whether
/// the kernel took `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (5.19+).
#[derive(Debug)]
pub struct BindFilter {
    /// The notification fd.
    pub notif: OwnedFd,
    /// Once the daemon has received a bind, only a fatal signal interrupts the worker's
    /// wait for the answer (Go's preemption signals would otherwise restart the bind).
    pub wait_killable: bool,
}

/// Worker side (exec shim, single-threaded, right before exec): sets `no_new_privs` and
/// installs the bind/listen filter, with `WAIT_KILLABLE_RECV` where the kernel has it.
///
/// # Errors
/// The OS error of `prctl` or `seccomp`, e.g. `EINVAL`/`ENOSYS` on a kernel without
/// user notification.
pub fn install_bind_filter() -> std::io::Result<BindFilter> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut program = filter_program();
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    let flags = [
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
    ];
    let mut last = std::io::Error::from_raw_os_error(libc::EINVAL);
    for flag in flags {
        // SAFETY: `prog` points at `program`, alive across the call; the kernel copies the
        // filter and returns a new notification fd (O_CLOEXEC) or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flag,
                &raw const prog,
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just created this descriptor for us alone.
            let notif = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
            return Ok(BindFilter {
                notif,
                wait_killable: flag & libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV != 0,
            });
        }
        last = std::io::Error::last_os_error();
        // EINVAL: WAIT_KILLABLE_RECV unknown (before 5.19); retry without it.
        if last.raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    Err(last)
}

/// Whether `pid` is still the process a handed-over notification fd was made for: the
/// same start time (the name carries it, see [`crate::handover::seccomp_name`]) read
/// through a pidfd, so the answer cannot be about a process that took the pid meanwhile,
/// and the process runs under a seccomp filter (`Seccomp: 2` in its status).
#[must_use]
pub fn is_filtered_worker(pid: i32, start_time: u64) -> bool {
    // The pidfd pins the process: if the start time matches after opening it, the pidfd
    // (and so everything below) is about that very process, not a reuse of its pid.
    let Some(pidfd) = crate::spawn::pidfd_open(pid) else {
        return false;
    };
    if crate::procfs::start_time(pid) != Some(start_time) {
        return false;
    }
    let filtered = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .is_some_and(|v| v.trim() == "2")
    });
    // Still alive after the read (a pidfd polls readable once the process exited).
    filtered && !poll_now(pidfd.as_fd()).0
}

/// Sends the filter's notification fd over the unix socket `sock` (SCM_RIGHTS), with one
/// byte of payload: `K` when the filter waits killably, `n` otherwise.
///
/// # Errors
/// The OS error of `sendmsg`.
pub fn send_fd(sock: BorrowedFd<'_>, filter: &BindFilter) -> std::io::Result<()> {
    let fds = [filter.notif.as_raw_fd()];
    let payload: &[u8] = if filter.wait_killable { b"K" } else { b"n" };
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(payload)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one fd sent with [`send_fd`] and whether the filter waits killably, without
/// waiting: `Ok(None)` when nothing is queued (the peer exited without sending).
///
/// # Errors
/// The OS error of `recvmsg`.
pub fn recv_fd(sock: BorrowedFd<'_>) -> std::io::Result<Option<(OwnedFd, bool)>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = match nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: SCM_RIGHTS gave us these new descriptors; we are their only owner.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            let killable = msg.bytes == 1 && byte[0] == b'K';
            return Ok(owned.drain(..).next().map(|fd| (fd, killable)));
        }
    }
    Ok(None)
}

/// How many workers of one app have bound (hold) its shared sockets: an answered bind
/// only clears the shared socket's `O_NONBLOCK` when no other worker holds it (see the
/// module docs). Each [`SharedBind`] counts its worker once, from its first answered bind
/// (or from the start, for a worker adopted with its socket) until it is dropped.
#[derive(Debug, Default)]
pub struct Peers(AtomicUsize);

impl Peers {
    /// A new count, for one app.
    #[must_use]
    pub fn new() -> Arc<Peers> {
        Arc::new(Peers::default())
    }

    /// Workers holding the app's shared sockets now.
    #[must_use]
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts a worker that holds the sockets without a [`SharedBind`] (adopted after a
    /// crash that lost its notification fd) until the returned guard is dropped.
    #[must_use]
    pub fn hold(self: &Arc<Self>) -> PeerHold {
        self.0.fetch_add(1, Ordering::SeqCst);
        PeerHold(Arc::clone(self))
    }
}

/// One worker counted in [`Peers`] while it lives; see [`Peers::hold`].
#[derive(Debug)]
pub struct PeerHold(Arc<Peers>);

impl Drop for PeerHold {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One daemon socket a worker may bind in shared mode.
#[derive(Debug)]
pub struct SharedListener {
    /// The listener's address (its port is the worker's `PORT`).
    pub addr: SocketAddr,
    /// TCP or UDP: only a socket of that type is answered.
    pub protocol: Protocol,
    /// A duplicate of the daemon's socket
    /// ([`crate::listener::BoundListener::inherit_fd`]); installed into the worker.
    pub fd: OwnedFd,
}

/// A worker's bind that was answered with a shared listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundEvent {
    /// The process that bound (a thread's process id, not the thread id; a child of the
    /// worker, such as node under `sh -c`, reports its own pid).
    pub pid: i32,
    /// Index of the listener in the list given to [`SharedBind::start`].
    pub listener: usize,
    /// The listener's address.
    pub addr: SocketAddr,
    /// What the app asked to bind (e.g. `[::]:8080` for Node's default).
    pub requested: SocketAddr,
}

/// A bind of a port that is not a shared listener's, passed through to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayBind {
    /// The process that bound.
    pub pid: i32,
    /// The address it bound.
    pub addr: SocketAddr,
    /// TCP or UDP, when the socket is one of those.
    pub protocol: Option<Protocol>,
}

impl fmt::Display for StrayBind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Some(Protocol::Tcp) => "/tcp",
            Some(Protocol::Udp) => "/udp",
            None => "",
        };
        write!(
            f,
            "worker bound {}{proto} (pid {}), not the shared listener",
            self.addr, self.pid
        )
    }
}

/// What [`SharedBind`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindEvent {
    /// A bind answered with the shared socket: the worker listens now (readiness `bind`).
    Bound(BoundEvent),
    /// A bind elsewhere (port not 0), e.g. the app ignores `PORT`.
    Stray(StrayBind),
}

/// Answers one worker's bind/listen notifications; see the module docs.
///
/// Runs until every process of the worker has exited (the notification fd hangs up) or
/// until dropped. Dropping it closes the notification fd: from then on the worker's
/// `bind`/`listen` calls fail with `ENOSYS`, so keep it as long as the worker, and hand
/// it to the next daemon on an upgrade ([`SharedBind::duplicate`]).
#[derive(Debug)]
pub struct SharedBind {
    /// `None` while paused.
    task: Option<JoinHandle<()>>,
    first: watch::Receiver<Option<BoundEvent>>,
    supervisor: Arc<Supervisor>,
    /// The notification fd; the task polls a duplicate of it, so that pausing (which
    /// drops the task and its duplicate) keeps the notifications for whoever answers
    /// next.
    notif: OwnedFd,
}

struct Target {
    addr: SocketAddr,
    protocol: Protocol,
    fd: OwnedFd,
    /// (st_dev, st_ino) of the socket: how a later `listen` recognises it.
    id: (u64, u64),
}

impl SharedBind {
    /// Starts answering the notifications of `notif` (from [`install_bind_filter`], via
    /// [`crate::spawn::SpawnedWorker::seccomp_notif`]) with `listeners`. `on_event` runs on
    /// the supervisor task for each answered or stray bind; it must not block.
    ///
    /// # Errors
    /// When the fd cannot be registered with tokio or a listener cannot be inspected.
    pub fn start(
        notif: OwnedFd,
        listeners: Vec<SharedListener>,
        on_event: impl Fn(BindEvent) + Send + Sync + 'static,
    ) -> Result<SharedBind> {
        Self::start_among(notif, listeners, Peers::new(), false, on_event)
    }

    /// [`SharedBind::start`] for one of an app's workers, counted in `peers` (shared by
    /// the app's workers) once it binds, or from now when `holds` (an adopted worker that
    /// already holds the socket).
    ///
    /// # Errors
    /// As [`SharedBind::start`].
    pub fn start_among(
        notif: OwnedFd,
        listeners: Vec<SharedListener>,
        peers: Arc<Peers>,
        holds: bool,
        on_event: impl Fn(BindEvent) + Send + Sync + 'static,
    ) -> Result<SharedBind> {
        let mut targets = Vec::with_capacity(listeners.len());
        for l in listeners {
            let st = nix::sys::stat::fstat(l.fd.as_fd())
                .map_err(|e| Error::io(format!("fstat shared listener {}", l.addr), e.into()))?;
            targets.push(Target {
                addr: l.addr,
                protocol: l.protocol,
                fd: l.fd,
                #[allow(clippy::useless_conversion)] // dev_t/ino_t widths differ per target
                id: (u64::from(st.st_dev), u64::from(st.st_ino)),
            });
        }
        let (tx, first) = watch::channel(None);
        if holds {
            peers.0.fetch_add(1, Ordering::SeqCst);
        }
        let supervisor = Arc::new(Supervisor {
            targets,
            first: std::sync::Mutex::new(Some(tx)),
            on_event: Box::new(on_event),
            peers,
            counted: AtomicBool::new(holds),
        });
        let mut bind = SharedBind {
            task: None,
            first,
            supervisor,
            notif,
        };
        bind.resume()?;
        Ok(bind)
    }

    /// A duplicate of the notification fd, for the next daemon (upgrade) or systemd's fd
    /// store: whoever holds it can answer the worker's binds after this daemon is gone.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated (out of descriptors).
    pub fn duplicate(&self) -> std::io::Result<OwnedFd> {
        self.notif.try_clone()
    }

    /// Stops answering, and returns once the task is gone, so that another reader of the
    /// same notification fd (the next daemon) never races this one: `SECCOMP_IOCTL_NOTIF_RECV`
    /// blocks, and two readers polling one fd could leave one blocked on a tokio thread.
    /// Notifications meanwhile wait in the kernel (the worker's `bind` blocks).
    pub async fn pause(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Answers again after [`SharedBind::pause`] (an upgrade failed); a no-op when running.
    ///
    /// # Errors
    /// When the fd cannot be duplicated or registered with tokio.
    pub fn resume(&mut self) -> Result<()> {
        if self.task.is_some() {
            return Ok(());
        }
        let dup = self
            .notif
            .try_clone()
            .map_err(|e| Error::io("dup seccomp notification fd", e))?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open for its whole
        // life and always reports the same descriptor.
        let afd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
            .map_err(|e| Error::io("register seccomp notification fd", e.into()))?;
        let supervisor = Arc::clone(&self.supervisor);
        self.task = Some(tokio::spawn(async move {
            supervisor.run(afd).await;
        }));
        Ok(())
    }

    /// Waits for the first answered bind (readiness `bind`); `None` when the worker is gone
    /// without one.
    pub async fn first_bind(&self) -> Option<BoundEvent> {
        let mut rx = self.first.clone();
        let found = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        found.or_else(|| rx.borrow().clone())
    }

    /// The first answered bind, if any yet.
    pub fn bound(&self) -> Option<BoundEvent> {
        self.first.borrow().clone()
    }

    /// Whether the supervisor still runs (some process of the worker is alive).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for SharedBind {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if self.supervisor.counted.swap(false, Ordering::SeqCst) {
            self.supervisor.peers.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

type OnEvent = Box<dyn Fn(BindEvent) + Send + Sync + 'static>;

struct Supervisor {
    targets: Vec<Target>,
    /// Dropped (taken) when the worker is gone, so [`SharedBind::first_bind`] ends; kept
    /// across a pause.
    first: std::sync::Mutex<Option<watch::Sender<Option<BoundEvent>>>>,
    on_event: OnEvent,
    /// The app's workers holding its shared sockets.
    peers: Arc<Peers>,
    /// Whether this worker is counted in `peers`.
    counted: AtomicBool,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field(
                "listeners",
                &self.targets.iter().map(|t| t.addr).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What to tell the kernel about one notification.
enum Reply {
    /// Let the kernel run the call.
    Continue,
    /// The call returns 0 without running.
    Success,
    /// The call fails with this errno without running (installing the socket failed, e.g.
    /// `EMFILE`): the app sees a failed bind rather than waiting forever.
    Fail(i32),
    /// The notification went stale (the task died or was interrupted): say nothing.
    Nothing,
}

impl Supervisor {
    async fn run(&self, afd: AsyncFd<OwnedFd>) {
        self.supervise(afd).await;
        // Not reached when paused (the task is aborted at its await): the worker is gone.
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    async fn supervise(&self, afd: AsyncFd<OwnedFd>) {
        loop {
            let mut guard = match afd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "seccomp notification fd failed");
                    return;
                }
            };
            let (readable, hangup) = poll_now(afd.get_ref().as_fd());
            if readable {
                match recv_notification(afd.get_ref().as_fd()) {
                    Ok(Some(n)) => self.handle(afd.get_ref().as_fd(), &n),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "receiving a seccomp notification failed");
                        return;
                    }
                }
                continue;
            }
            if hangup {
                // No process is left under the filter: the worker is gone.
                tracing::debug!("shared bind supervisor done: worker gone");
                return;
            }
            guard.clear_ready();
        }
    }

    fn handle(&self, notif_fd: BorrowedFd<'_>, n: &libc::seccomp_notif) {
        let tid = n.pid as i32;
        let reply = if libc::c_long::from(n.data.nr) == libc::SYS_bind {
            self.on_bind(notif_fd, n, tid)
        } else if libc::c_long::from(n.data.nr) == libc::SYS_listen {
            self.on_listen(notif_fd, n, tid)
        } else {
            Reply::Continue
        };
        let (val, flags, error) = match reply {
            Reply::Nothing => return,
            Reply::Continue => (0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32, 0),
            Reply::Success => (0, 0, 0),
            Reply::Fail(errno) => (0, 0, -errno),
        };
        let mut resp = libc::seccomp_notif_resp {
            id: n.id,
            val,
            error,
            flags,
        };
        // SAFETY: NOTIF_SEND reads the response struct, alive across the call.
        let r = unsafe {
            libc::ioctl(
                notif_fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND as _,
                &raw mut resp,
            )
        };
        if r < 0 {
            // ENOENT: the task was killed or interrupted meanwhile; it retries or is gone.
            tracing::debug!(tid, error = %std::io::Error::last_os_error(), "seccomp reply not delivered");
        }
    }

    fn on_bind(&self, notif_fd: BorrowedFd<'_>, n: &libc::seccomp_notif, tid: i32) -> Reply {
        let fd = n.data.args[0] as RawFd;
        let len = (n.data.args[2] as usize).min(128);
        let Some(requested) = read_sockaddr(tid, n.data.args[1], len) else {
            // Not inet, or unreadable: the kernel judges the call as usual.
            return Reply::Continue;
        };
        if requested.port() == 0 {
            return Reply::Continue;
        }
        let Some(pid) = tgid_of(tid) else {
            return Reply::Continue;
        };
        let theirs = match crate::spawn::pidfd_open(pid)
            .ok_or_else(std::io::Error::last_os_error)
            .and_then(|pidfd| pidfd_getfd(pidfd.as_fd(), fd))
        {
            Ok(f) => f,
            Err(e) => {
                // EPERM here means no ptrace rights over the worker (Yama ptrace_scope 2
                // or 3, another user): its bind of the shared port will then fail with
                // EADDRINUSE, so say why.
                if self
                    .targets
                    .iter()
                    .any(|t| t.addr.port() == requested.port())
                {
                    tracing::warn!(pid, fd, error = %e, "cannot inspect the worker's socket; its bind of the shared port passes through");
                }
                return Reply::Continue;
            }
        };
        // The task is still the one that made the call, so `pid` and the memory read
        // belonged to it (a pid is not reused while its task waits here).
        if !id_valid(notif_fd, n.id) {
            return Reply::Nothing;
        }
        let sock = socket2::SockRef::from(&theirs);
        let protocol = match sock.r#type() {
            Ok(t) if t == socket2::Type::STREAM => Some(Protocol::Tcp),
            Ok(t) if t == socket2::Type::DGRAM => Some(Protocol::Udp),
            _ => None,
        };
        let domain = sock.domain().ok();
        let found = self.targets.iter().position(|t| {
            Some(t.protocol) == protocol
                && t.addr.port() == requested.port()
                && family_fits(t.addr, requested, domain)
        });
        let Some(index) = found else {
            // Not a socket (the kernel answers ENOTSOCK) or not TCP/UDP: nothing to report.
            if protocol.is_some() {
                (self.on_event)(BindEvent::Stray(StrayBind {
                    pid,
                    addr: requested,
                    protocol,
                }));
            }
            return Reply::Continue;
        };
        let target = &self.targets[index];
        if file_id(theirs.as_fd()) != Some(target.id) {
            let (nonblocking, cloexec) = fd_flags(pid, fd).unwrap_or((false, true));
            // Never clear O_NONBLOCK under other workers' event loops (module docs).
            let others = self.peers.count() > usize::from(self.counted.load(Ordering::SeqCst));
            if nonblocking || !others {
                if let Err(e) = set_nonblocking(target.fd.as_fd(), nonblocking) {
                    tracing::warn!(error = %e, "cannot set O_NONBLOCK on the shared listener");
                }
            } else {
                tracing::debug!(
                    pid,
                    "blocking bind: O_NONBLOCK of the shared listener kept, other workers hold it"
                );
            }
            let mut addfd = libc::seccomp_notif_addfd {
                id: n.id,
                flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
                srcfd: target.fd.as_raw_fd() as u32,
                newfd: fd as u32,
                newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
            };
            // SAFETY: NOTIF_ADDFD reads the struct, alive across the call; the kernel
            // duplicates our listener into the target at `newfd`.
            let r = unsafe {
                libc::ioctl(
                    notif_fd.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_ADDFD as _,
                    &raw mut addfd,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if errno == libc::ENOENT {
                    // The task is gone or was interrupted: nobody waits for a reply.
                    return Reply::Nothing;
                }
                tracing::warn!(pid, fd, error = %e, "installing the shared listener into the worker failed; its bind fails");
                return Reply::Fail(errno);
            }
        }
        let event = BoundEvent {
            pid,
            listener: index,
            addr: target.addr,
            requested,
        };
        if !self.counted.swap(true, Ordering::SeqCst) {
            self.peers.0.fetch_add(1, Ordering::SeqCst);
        }
        tracing::info!(pid, fd, listener = %target.addr, requested = %requested, "worker bound the shared listener");
        if let Some(tx) = self
            .first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            tx.send_if_modified(|v| {
                if v.is_none() {
                    *v = Some(event.clone());
                    true
                } else {
                    false
                }
            });
        }
        (self.on_event)(BindEvent::Bound(event));
        Reply::Success
    }

    fn on_listen(&self, notif_fd: BorrowedFd<'_>, n: &libc::seccomp_notif, tid: i32) -> Reply {
        let fd = n.data.args[0] as RawFd;
        let Some(pid) = tgid_of(tid) else {
            return Reply::Continue;
        };
        let Some(pidfd) = crate::spawn::pidfd_open(pid) else {
            return Reply::Continue;
        };
        let Ok(theirs) = pidfd_getfd(pidfd.as_fd(), fd) else {
            return Reply::Continue;
        };
        if !id_valid(notif_fd, n.id) {
            return Reply::Nothing;
        }
        let id = file_id(theirs.as_fd());
        if self.targets.iter().any(|t| Some(t.id) == id) {
            Reply::Success
        } else {
            Reply::Continue
        }
    }
}

/// Whether a bind of `requested` on a socket of `domain` may get `listener`: the same
/// family, or a wildcard across families (Node binds `::` dual-stack by default; a `::`
/// listener also takes IPv4 binds).
fn family_fits(
    listener: SocketAddr,
    requested: SocketAddr,
    domain: Option<socket2::Domain>,
) -> bool {
    let requested_v6 = requested.is_ipv6() || domain == Some(socket2::Domain::IPV6);
    match (listener.is_ipv6(), requested_v6) {
        (false, false) | (true, true) => true,
        // IPv4 listener, IPv6 socket: `::` or an IPv4-mapped address.
        (false, true) => match requested.ip() {
            IpAddr::V6(ip) => ip.is_unspecified() || ip.to_ipv4_mapped().is_some(),
            IpAddr::V4(_) => true,
        },
        // Dual-stack IPv6 listener, IPv4 bind.
        (true, false) => listener.ip().is_unspecified(),
    }
}

/// `(readable, hangup)` of the notification fd right now.
fn poll_now(fd: BorrowedFd<'_>) -> (bool, bool) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    if r <= 0 {
        return (false, false);
    }
    (
        pfd.revents & libc::POLLIN != 0,
        pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0,
    )
}

/// One notification; only called when poll says one is pending, because RECV blocks.
fn recv_notification(fd: BorrowedFd<'_>) -> std::io::Result<Option<libc::seccomp_notif>> {
    loop {
        // SAFETY: all-zero is a valid seccomp_notif (plain integers), and the kernel
        // requires the buffer zeroed.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: NOTIF_RECV writes one seccomp_notif into `n`.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV as _,
                &raw mut n,
            )
        };
        if r == 0 {
            return Ok(Some(n));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            // The waiting task went away before we took its notification.
            Some(libc::ENOENT) => return Ok(None),
            _ => return Err(e),
        }
    }
}

fn id_valid(notif_fd: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    // SAFETY: NOTIF_ID_VALID reads one u64.
    unsafe {
        libc::ioctl(
            notif_fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &raw mut id,
        ) == 0
    }
}

/// Reads a sockaddr of `len` bytes at `ptr` in task `tid`; `None` unless it is a
/// well-formed `AF_INET`/`AF_INET6` address.
fn read_sockaddr(tid: i32, ptr: u64, len: usize) -> Option<SocketAddr> {
    if ptr == 0 || len < 2 {
        return None;
    }
    let mut buf = [0u8; 128];
    let got = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(tid),
        &mut [IoSliceMut::new(&mut buf[..len])],
        &[nix::sys::uio::RemoteIoVec {
            base: usize::try_from(ptr).ok()?,
            len,
        }],
    )
    .ok()?;
    parse_sockaddr(&buf[..got])
}

/// Parses a raw `sockaddr_in`/`sockaddr_in6` (native-endian family, network-order port).
fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
    if family == libc::AF_INET && b.len() >= 8 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
        return Some(SocketAddr::V4(SocketAddrV4::new(ip, port)));
    }
    // The kernel accepts 24 bytes (RFC 2133, no scope id) or more.
    if family == libc::AF_INET6 && b.len() >= 24 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[8..24]);
        let scope = if b.len() >= 28 {
            u32::from_ne_bytes([b[24], b[25], b[26], b[27]])
        } else {
            0
        };
        return Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(octets),
            port,
            flow,
            scope,
        )));
    }
    None
}

/// The thread group (process) of a thread id, from `/proc/<tid>/status`.
fn tgid_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `(O_NONBLOCK, O_CLOEXEC)` of a process's fd, from `/proc/<pid>/fdinfo/<fd>` (octal
/// `flags:`); pidfd_getfd cannot tell, as its copy is always close-on-exec.
fn fd_flags(pid: i32, fd: RawFd) -> Option<(bool, bool)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| i64::from_str_radix(v.trim(), 8).ok())?;
    Some((
        flags & i64::from(libc::O_NONBLOCK) != 0,
        flags & i64::from(libc::O_CLOEXEC) != 0,
    ))
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let want = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    if want != flags {
        fcntl(fd, FcntlArg::F_SETFL(want))?;
    }
    Ok(())
}

#[allow(clippy::useless_conversion)] // dev_t/ino_t widths differ per target
fn file_id(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    Some((u64::from(st.st_dev), u64::from(st.st_ino)))
}

use crate::listener::pidfd_getfd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v857"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_kernel_version("5.4.0") < Some(MIN_KERNEL));
        assert!(parse_kernel_version("5.10.1") > Some(MIN_KERNEL));
        assert_eq!(parse_kernel_version("weird"), None);
    }

    #[test]
    fn this_host_supports_shared_mode() {
        // The CI kernel is 6.x; a failure here names the reason.
        shared_mode_support().unwrap();
    }

    #[test]
    fn sockaddr_parsing() {
        let v4: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let raw = socket2::SockAddr::from(v4);
        // SAFETY: as_ptr points at `len` initialised bytes of the SockAddr.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len() as usize) };
        assert_eq!(parse_sockaddr(bytes), Some(v4));
        let v6: SocketAddr = "[::]:8080".parse().unwrap();
        let raw = socket2::SockAddr::from(v6);
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len() as usize) };
        assert_eq!(parse_sockaddr(bytes), Some(v6));
        assert_eq!(parse_sockaddr(&[1, 0, b'/', b'x']), None, "AF_UNIX");
        assert_eq!(parse_sockaddr(&[2, 0, 0]), None, "short");
    }

    #[test]
    fn families() {
        let any4: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let any6: SocketAddr = "[::]:80".parse().unwrap();
        let lo6: SocketAddr = "[::1]:80".parse().unwrap();
        let lo4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let v6 = Some(socket2::Domain::IPV6);
        let v4 = Some(socket2::Domain::IPV4);
        assert!(family_fits(any4, lo4, v4));
        assert!(family_fits(any4, any6, v6), "Node's dual-stack bind");
        assert!(family_fits(any4, mapped, v6));
        assert!(!family_fits(any4, lo6, v6), "::1 is not an IPv4 address");
        assert!(family_fits(any6, any4, v4), "a :: listener is dual-stack");
        assert!(family_fits(any6, lo6, v6));
        let lo6_listener: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(!family_fits(lo6_listener, lo4, v4));
    }

    #[test]
    fn stray_bind_message() {
        let s = StrayBind {
            pid: 42,
            addr: "127.0.0.1:9999".parse().unwrap(),
            protocol: Some(Protocol::Tcp),
        };
        assert_eq!(
            s.to_string(),
            "worker bound 127.0.0.1:9999/tcp (pid 42), not the shared listener"
        );
    }
}

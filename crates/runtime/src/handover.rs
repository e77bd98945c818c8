//! Handing the daemon's sockets to the next daemon, so that neither an upgrade nor a
//! crash ever closes a public port.
//!
//! Two ways in, one shape out ([`Handover`]: named sockets the new daemon takes instead
//! of binding):
//!
//! - **Upgrade** (`clusterd upgrade`, SIGUSR2): the running daemon fork+execs the binary
//!   on disk with one end of a `SOCK_SEQPACKET` socketpair inherited (its number in
//!   `CLUSTERD_UPGRADE_FD`), and sends every socket over it with `SCM_RIGHTS`, one
//!   message per socket carrying its name ([`start_successor`]). The new daemon receives
//!   them before it starts its runtime ([`Handover::from_env`]), adopts the workers,
//!   claims the sockets, and answers `READY <pid>` on the same pair
//!   ([`Successor::took_over`]). A child that exits, or does not answer in time, leaves
//!   the old daemon in charge with the reason.
//! - **Crash, under systemd**: every public socket is also in systemd's fd store
//!   ([`crate::fdstore`]); a restarted daemon gets them as `LISTEN_FDS` from fd 3 with
//!   `LISTEN_FDNAMES` (checked against `LISTEN_PID`).
//!
//! Sockets are named by [`listener_name`]: the app and the listener's key, never a
//! position, so a restarted daemon whose manifests changed meanwhile takes exactly the
//! sockets it still needs. The names avoid `:`, the `LISTEN_FDNAMES` separator.

use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::effects::ListenKey;

/// The environment variable that carries the new daemon's end of the handover pair.
pub const UPGRADE_FD_ENV: &str = "CLUSTERD_UPGRADE_FD";
/// The name of the control socket in a handover.
pub const CONTROL: &str = "control";
/// The name of the workers' notify socket in a handover.
pub const NOTIFY: &str = "notify";

/// How long the new daemon waits for the old one's sockets (they are sent right after
/// the fork, so this only bounds a broken parent).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of an app's public socket in a handover and in systemd's fd store:
/// `app/mode/protocol/address/port`, with `:` (IPv6) written as `_` because `:`
/// separates `LISTEN_FDNAMES`.
#[must_use]
pub fn listener_name(app: &str, key: &ListenKey) -> String {
    let mode = match key.mode {
        clusterd_core::model::ListenMode::Inherit => "inherit",
        clusterd_core::model::ListenMode::Http => "http",
        clusterd_core::model::ListenMode::Tcp => "tcp",
        clusterd_core::model::ListenMode::Shared => "shared",
    };
    let protocol = match key.protocol {
        clusterd_core::model::Protocol::Tcp => "tcp",
        clusterd_core::model::Protocol::Udp => "udp",
    };
    format!(
        "{app}/{mode}/{protocol}/{}/{}",
        key.address.replace(':', "_"),
        key.port
    )
}

/// The name of a shared-mode worker's seccomp notification fd in a handover and in
/// systemd's fd store: `app/seccomp/pid/start_time`. The start time (clock ticks since
/// boot) ties it to one process: the next daemon only resumes answering it for the worker
/// it adopts under that pid with that start time
/// ([`crate::seccomp::is_filtered_worker`]).
#[must_use]
pub fn seccomp_name(app: &str, pid: i32, start_time: u64) -> String {
    format!("{app}/seccomp/{pid}/{start_time}")
}

/// Sockets a previous daemon left for this one, by name.
#[derive(Debug, Default)]
pub struct Handover {
    fds: Vec<(String, OwnedFd)>,
    /// The upgrade pair, when this daemon was started by `clusterd upgrade`.
    successor: Option<Successor>,
    /// Where the sockets came from (for logs).
    pub source: &'static str,
}

impl Handover {
    /// Takes whatever the environment hands over: an upgrade pair (`CLUSTERD_UPGRADE_FD`)
    /// or systemd's `LISTEN_FDS` (only when `LISTEN_PID` is this process). The variables
    /// are removed so no worker sees them. Call it before any thread starts.
    ///
    /// # Errors
    /// An upgrade pair that is not a socket, or whose sender fails mid-way: the new
    /// daemon must not start half-equipped (the old one keeps running).
    pub fn from_env() -> Result<Self, String> {
        if let Some(value) = std::env::var_os(UPGRADE_FD_ENV) {
            std::env::remove_var(UPGRADE_FD_ENV);
            let fd: RawFd = value
                .to_str()
                .and_then(|v| v.parse().ok())
                .filter(|fd| *fd > 2)
                .ok_or_else(|| format!("{UPGRADE_FD_ENV}={value:?} is not a descriptor"))?;
            set_cloexec(fd).map_err(|e| format!("{UPGRADE_FD_ENV}={fd}: {e}"))?;
            // SAFETY: the old daemon made `fd` for this process alone (inherited across
            // exec, its number in the variable we just removed); nothing else owns it.
            let pair = unsafe { OwnedFd::from_raw_fd(fd) };
            let fds = receive(&pair)?;
            return Ok(Handover {
                fds,
                successor: Some(Successor(pair)),
                source: "upgrade",
            });
        }
        let fds = take_listen_fds();
        Ok(Handover {
            source: if fds.is_empty() { "" } else { "LISTEN_FDS" },
            fds,
            successor: None,
        })
    }

    /// A handover of these sockets (tests).
    #[must_use]
    pub fn of(fds: Vec<(String, OwnedFd)>) -> Self {
        Handover {
            fds,
            successor: None,
            source: "test",
        }
    }

    /// Takes the socket named `name`, if it was handed over.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.swap_remove(i).1)
    }

    /// Returns a socket taken but not used after all (its app failed to bind another).
    pub fn put_back(&mut self, name: String, fd: OwnedFd) {
        self.fds.push((name, fd));
    }

    /// The upgrade pair, to answer the old daemon once this one has taken over.
    pub fn successor(&mut self) -> Option<Successor> {
        self.successor.take()
    }

    /// Names not taken yet.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.fds.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Everything not taken yet.
    pub fn drain(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.fds)
    }

    /// Nothing (left) to take.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// The new daemon's end of the upgrade pair.
#[derive(Debug)]
pub struct Successor(OwnedFd);

impl Successor {
    /// Tells the old daemon that this one serves now (control socket, workers adopted,
    /// sockets claimed): it stops accepting and exits without touching the workers.
    ///
    /// # Errors
    /// The old daemon is gone (it gave up waiting): the caller decides what that means.
    pub fn took_over(self) -> std::io::Result<()> {
        send(
            self.0.as_fd(),
            format!("READY {}", std::process::id()).as_bytes(),
            None,
        )
    }
}

/// `LISTEN_FDS` from fd 3 with `LISTEN_FDNAMES`, if `LISTEN_PID` is this process; the
/// variables are removed either way (a worker must never see them).
fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
    ] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Vec::new();
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        tracing::warn!(
            listen_pid = %pid,
            "LISTEN_FDS ignored: LISTEN_PID is another process"
        );
        return Vec::new();
    }
    let count: RawFd = count.trim().parse().unwrap_or(0);
    let names: Vec<&str> = names.split(':').collect();
    let mut out = Vec::new();
    for i in 0..count.max(0) {
        let fd = 3 + i;
        if set_cloexec(fd).is_err() {
            continue; // not open: nothing to own
        }
        // SAFETY: sd_listen_fds(3): descriptors 3..3+LISTEN_FDS belong to the process
        // LISTEN_PID names, which we just checked is us; each is wrapped exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or("unknown");
        out.push((name.to_string(), owned));
    }
    out
}

fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a number: at worst EBADF, no memory involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn send(fd: BorrowedFd<'_>, payload: &[u8], pass: Option<RawFd>) -> std::io::Result<()> {
    let iov = [IoSlice::new(payload)];
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match pass {
        Some(f) => {
            fds = [f];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// One message: its payload and the descriptor it carried. `Ok(None)` at end of file.
fn recv_one(fd: BorrowedFd<'_>) -> std::io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut passed = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel just installed this descriptor (close-on-exec) for
                // us; it is wrapped once, so it is closed if unused.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                passed.get_or_insert(owned);
            }
        }
    }
    let len = msg.bytes;
    if len == 0 && passed.is_none() {
        return Ok(None);
    }
    Ok(Some((
        String::from_utf8_lossy(&buf[..len]).into_owned(),
        passed,
    )))
}

fn set_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        ),
    )
    .map_err(std::io::Error::from)
}

/// The new daemon's side: every `FD <name>` message until `END`.
fn receive(pair: &OwnedFd) -> Result<Vec<(String, OwnedFd)>, String> {
    set_timeout(pair.as_fd(), RECEIVE_TIMEOUT).map_err(|e| format!("upgrade pair: {e}"))?;
    let mut fds = Vec::new();
    loop {
        match recv_one(pair.as_fd()) {
            Ok(Some((text, _))) if text == "END" => return Ok(fds),
            Ok(Some((text, Some(fd)))) => {
                let name = text.strip_prefix("FD ").unwrap_or(&text).to_string();
                fds.push((name, fd));
            }
            Ok(Some((text, None))) => {
                return Err(format!("upgrade pair: unexpected message {text:?}"))
            }
            Ok(None) => return Err("upgrade pair: the old daemon closed it mid-way".into()),
            Err(e) => return Err(format!("upgrade pair: {e}")),
        }
    }
}

/// What the old daemon starts and hands over.
#[derive(Debug)]
pub struct UpgradeRequest {
    /// The binary to run (the one now on disk).
    pub binary: PathBuf,
    /// Its arguments (the old daemon's own).
    pub args: Vec<OsString>,
    /// Every socket to hand over, by name (duplicates: the old daemon keeps serving on
    /// its own copies until the new one has taken over).
    pub fds: Vec<(String, OwnedFd)>,
    /// How long the new daemon may take to answer.
    pub timeout: Duration,
}

/// A new daemon that has taken over.
#[derive(Debug)]
pub struct TookOver {
    /// Its pid.
    pub pid: u32,
    /// How long it took from fork to its answer.
    pub elapsed: Duration,
    /// The process handle (never waited for: it outlives us).
    pub child: Child,
}

/// The old daemon's side: starts `req.binary` as the new daemon, sends it every socket,
/// and waits for `READY`. Blocking (run it on a blocking thread).
///
/// # Errors
/// Why there is no new daemon: it could not be started, it exited (with its status), or
/// it did not answer in time (it is then killed). The old daemon keeps running.
pub fn start_successor(req: UpgradeRequest) -> Result<TookOver, String> {
    let started = Instant::now();
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&req.binary);
    cmd.args(&req.args)
        .env(UPGRADE_FD_ENV, their_fd.to_string());
    // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, on a
    // descriptor number that is open in the child (inherited from the fork).
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(their_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(their_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", req.binary.display()))?;
    drop(theirs);
    let pid = child.id();
    let fail = |child: &mut Child, what: String| -> String {
        // Whatever it was doing, it is not the daemon: make sure it is gone.
        let status = match child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => wait_briefly(child),
        };
        let status = match status {
            Some(s) => describe_status(s),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                "killed".into()
            }
        };
        format!(
            "the new daemon ({}, pid {pid}) {what} ({status}); this daemon keeps running",
            req.binary.display()
        )
    };
    for (name, fd) in &req.fds {
        if let Err(e) = send(
            ours.as_fd(),
            format!("FD {name}").as_bytes(),
            Some(fd.as_raw_fd()),
        ) {
            return Err(fail(&mut child, format!("did not take the sockets: {e}")));
        }
    }
    if let Err(e) = send(ours.as_fd(), b"END", None) {
        return Err(fail(&mut child, format!("did not take the sockets: {e}")));
    }
    drop(req.fds);
    if let Err(e) = set_timeout(ours.as_fd(), req.timeout) {
        return Err(fail(&mut child, format!("upgrade pair: {e}")));
    }
    match recv_one(ours.as_fd()) {
        Ok(Some((text, _))) if text.starts_with("READY") => Ok(TookOver {
            pid,
            elapsed: started.elapsed(),
            child,
        }),
        Ok(Some((text, _))) => Err(fail(&mut child, format!("answered {text:?}"))),
        Ok(None) => Err(fail(&mut child, "exited before taking over".into())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            let _ = child.kill();
            Err(fail(
                &mut child,
                format!("did not take over within {:?}", req.timeout),
            ))
        }
        Err(e) => Err(fail(&mut child, format!("upgrade pair: {e}"))),
    }
}

/// A command that starts `program` the way systemd passes sockets: `fds` at 3, 4, ...
/// (`LISTEN_FDS`, `LISTEN_FDNAMES`) and `LISTEN_PID` set to the program's own pid, which
/// is only known after the fork, so `/bin/sh` sets it and execs `program` (same pid).
/// Add the program's arguments to the returned command. For tests and tools that stand
/// in for systemd (restarting a daemon with the sockets of its fd store).
///
/// # Errors
/// When the descriptors cannot be duplicated.
pub fn systemd_style_command(
    program: &std::path::Path,
    fds: &[(String, BorrowedFd<'_>)],
) -> std::io::Result<Command> {
    let n = RawFd::try_from(fds.len()).unwrap_or(RawFd::MAX - 3);
    // Copies above every target number (3..3+n), close-on-exec: dup2 onto the targets in
    // the child can then never overwrite a copy not yet placed.
    let mut high = Vec::with_capacity(fds.len());
    for (_, fd) in fds {
        let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3 + n))
            .map_err(std::io::Error::from)?;
        // SAFETY: fcntl just returned this new descriptor; it is owned once, here.
        high.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let names: Vec<&str> = fds.iter().map(|(name, _)| name.as_str()).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
        .arg(program)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    let raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure only calls dup2(2), async-signal-safe, on descriptors open in
    // the child (inherited copies of `high`, kept alive by the closure until the command
    // is dropped); `raw` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &high;
            for (i, fd) in raw.iter().enumerate() {
                let target = 3 + RawFd::try_from(i).unwrap_or(0);
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The child closed its end: it is exiting; give it a moment to be reaped.
fn wait_briefly(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!(
            "killed by {}",
            nix::sys::signal::Signal::try_from(sig)
                .map_or_else(|_| sig.to_string(), |s| s.to_string())
        ),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterd_core::model::{ListenMode, Protocol};

    #[test]
    fn names_have_no_colon() {
        let key = ListenKey {
            address: "::1".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            mode: ListenMode::Http,
        };
        let name = listener_name("web", &key);
        assert_eq!(name, "web/http/tcp/__1/8080");
        assert!(!name.contains(':'));
    }

    #[test]
    fn sockets_cross_a_pair_with_their_names() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send(
            a.as_fd(),
            b"FD web/http/tcp/127.0.0.1/0",
            Some(l.as_raw_fd()),
        )
        .unwrap();
        send(a.as_fd(), b"END", None).unwrap();
        drop(l);
        let mut got = receive(&b).unwrap();
        assert_eq!(got.len(), 1);
        let (name, fd) = got.pop().unwrap();
        assert_eq!(name, "web/http/tcp/127.0.0.1/0");
        // The very same listening socket: a connection to the address reaches it.
        let l = std::net::TcpListener::from(fd);
        assert_eq!(l.local_addr().unwrap(), addr);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn a_successor_that_exits_is_reported_with_its_status() {
        let err = start_successor(UpgradeRequest {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), "exit 3".into()],
            fds: Vec::new(),
            timeout: Duration::from_secs(10),
        })
        .unwrap_err();
        assert!(err.contains("exit code 3"), "{err}");
        assert!(err.contains("keeps running"), "{err}");
    }

    #[test]
    fn systemd_style_command_passes_fds_at_3_with_names_and_the_right_pid() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = [
            ("x/http".to_string(), a.as_fd()),
            ("y/tcp".to_string(), b.as_fd()),
        ];
        let out = systemd_style_command(std::path::Path::new("/bin/sh"), &fds)
            .unwrap()
            .arg("-c")
            .arg(r#"echo "$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES"; readlink /proc/$$/fd/3 /proc/$$/fd/4"#)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(
            first[0], first[1],
            "LISTEN_PID must be the program's pid: {text}"
        );
        assert_eq!(&first[2..], ["2", "x/http:y/tcp"], "{text}");
        assert!(lines.all(|l| l.starts_with("socket:[")), "{text}");
    }

    #[test]
    fn a_missing_binary_is_reported() {
        let err = start_successor(UpgradeRequest {
            binary: "/nonexistent/clusterd".into(),
            args: Vec::new(),
            fds: Vec::new(),
            timeout: Duration::from_secs(1),
        })
        .unwrap_err();
        assert!(err.contains("cannot start /nonexistent/clusterd"), "{err}");
    }

    #[test]
    fn a_silent_successor_times_out_and_is_killed() {
        let err = start_successor(UpgradeRequest {
            binary: "/bin/sleep".into(),
            args: vec!["30".into()],
            fds: Vec::new(),
            timeout: Duration::from_millis(200),
        })
        .unwrap_err();
        assert!(err.contains("did not take over"), "{err}");
        assert!(err.contains("SIGKILL"), "{err}");
    }
}

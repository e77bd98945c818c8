//! Public listening sockets owned by the daemon.
//!
//! The daemon binds every app's socket once and keeps it for the app's whole life, so no
//! worker restart ever closes the port. Two facts shape this module:
//!
//! - `O_NONBLOCK` lives on the *open file description*, which the daemon shares with every
//!   worker that inherits the socket. The daemon's copy therefore stays **blocking** (what
//!   most servers expect of an inherited socket) and the daemon never accepts on it in
//!   inherit mode. It is held as an [`OwnedFd`], never as a tokio listener, because
//!   `tokio::net::TcpListener::from_std` needs a non-blocking socket.
//! - Proxy modes (http/tcp) never share the socket with workers, so there the daemon may
//!   turn it non-blocking and accept on it: [`BoundListener::proxy_listener`].

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};

use crate::error::{Error, IoContext, Result};

pub use clusterd_core::model::Protocol;

/// Default accept backlog (the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: i32 = 1024;

/// A bound (and for TCP, listening) socket held by the daemon, in blocking mode.
#[derive(Debug)]
pub struct BoundListener {
    fd: OwnedFd,
    local_addr: SocketAddr,
    protocol: Protocol,
}

impl BoundListener {
    /// Binds `addr` (port 0 picks a free port; see [`BoundListener::local_addr`]).
    ///
    /// TCP: `SO_REUSEADDR` (a restarted daemon can rebind at once while old connections
    /// sit in TIME_WAIT), `listen(backlog)`. For an IPv6 address `IPV6_V6ONLY` is turned
    /// off, so `::` also accepts IPv4, as users of `0.0.0.0` expect. The socket is
    /// `FD_CLOEXEC` (socket2's default): it reaches a worker only through the spawn path.
    pub fn bind(addr: SocketAddr, protocol: Protocol, backlog: i32) -> Result<Self> {
        let proto_name = protocol_name(protocol);
        let map = |source| Error::Bind {
            addr,
            protocol: proto_name,
            source,
        };
        let (ty, sp) = match protocol {
            Protocol::Tcp => (Type::STREAM, SockProtocol::TCP),
            Protocol::Udp => (Type::DGRAM, SockProtocol::UDP),
        };
        let socket = Socket::new(Domain::for_address(addr), ty, Some(sp)).map_err(map)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).map_err(map)?;
        }
        socket.set_reuse_address(true).map_err(map)?;
        socket.bind(&SockAddr::from(addr)).map_err(map)?;
        if protocol == Protocol::Tcp {
            socket.listen(backlog).map_err(map)?;
        }
        // socket2 creates blocking sockets; state it explicitly, as it is the contract.
        socket.set_nonblocking(false).map_err(map)?;
        let local_addr = socket
            .local_addr()
            .map_err(map)?
            .as_socket()
            .ok_or_else(|| {
                map(std::io::Error::other(
                    "bound address is not an inet address",
                ))
            })?;
        tracing::debug!(%local_addr, protocol = proto_name, "listener bound");
        Ok(BoundListener {
            fd: socket.into(),
            local_addr,
            protocol,
        })
    }

    /// Binds a TCP listener with [`DEFAULT_BACKLOG`].
    pub fn bind_tcp(addr: SocketAddr) -> Result<Self> {
        Self::bind(addr, Protocol::Tcp, DEFAULT_BACKLOG)
    }

    /// Binds a UDP socket.
    pub fn bind_udp(addr: SocketAddr) -> Result<Self> {
        Self::bind(addr, Protocol::Udp, DEFAULT_BACKLOG)
    }

    /// Whether a TCP socket still listens (`SO_ACCEPTCONN`). A worker holding a copy of
    /// an inherit-mode socket can stop it for everyone with `shutdown(fd, SHUT_RD)`;
    /// `listen()` again does not bring it back, a new socket on the same address does.
    /// UDP sockets always count as listening.
    pub fn is_listening(&self) -> bool {
        if self.protocol != Protocol::Tcp {
            return true;
        }
        nix::sys::socket::getsockopt(&self.fd, nix::sys::socket::sockopt::AcceptConn)
            .unwrap_or(true)
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// TCP or UDP.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A fresh duplicate (`FD_CLOEXEC`) to hand to [`crate::spawn::spawn_worker`] for one
    /// worker; spawn closes it after the fork. The duplicate shares the open file
    /// description, so it stays blocking like the original.
    pub fn inherit_fd(&self) -> Result<OwnedFd> {
        self.fd
            .try_clone()
            .ctx(|| format!("dup listener {}", self.local_addr))
    }

    /// A non-blocking `std::net::TcpListener` for the proxy modes, ready for
    /// `tokio::net::TcpListener::from_std`.
    ///
    /// It is a duplicate of this socket, and `O_NONBLOCK` is shared with it: only call
    /// this for a listener that is never given to workers (http/tcp modes).
    pub fn proxy_listener(&self) -> Result<TcpListener> {
        if self.protocol != Protocol::Tcp {
            return Err(Error::InvalidSpec(format!(
                "{}: the proxy modes need a TCP listener",
                self.local_addr
            )));
        }
        let fd = self.inherit_fd()?;
        let listener = TcpListener::from(fd);
        listener
            .set_nonblocking(true)
            .ctx(|| format!("set O_NONBLOCK on {}", self.local_addr))?;
        Ok(listener)
    }

    /// Takes back the listening socket for `addr` from a worker adopted after a daemon
    /// restart, so the new daemon holds the very same socket (and its accept queue) as
    /// the workers: rebinding is impossible while they listen on it, and a new socket
    /// would split the queue.
    ///
    /// Each socket among the workers' fds (`/proc/<pid>/fd`) is copied with
    /// `pidfd_getfd(2)` (Linux 5.6; needs ptrace rights over the worker: the same user,
    /// or root) and asked what it is: a listening TCP socket (or a UDP socket) on
    /// `addr`'s port is the one. Matching by inode against `/proc/net/tcp` instead read
    /// every socket of the host: with tens of thousands in TIME_WAIT (a load test, a busy
    /// box) that file is ~10 MB and parsing it kept a restarted daemon from answering
    /// for over 30 s.
    ///
    /// Returns `Ok(None)` when none of `pids` holds such a socket.
    ///
    /// # Errors
    /// When nothing was found and the workers' sockets could not be copied for lack of
    /// rights over them.
    pub fn recover_from(
        pids: &[i32],
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<Option<Self>> {
        let mut last_error = None;
        for &pid in pids {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let Some(pidfd) = crate::spawn::pidfd_open(pid) else {
                continue;
            };
            for entry in dir.flatten() {
                let is_socket = std::fs::read_link(entry.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("socket:["));
                let fd_num = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<RawFd>().ok());
                let (true, Some(fd_num)) = (is_socket, fd_num) else {
                    continue;
                };
                let fd = match pidfd_getfd(pidfd.as_fd(), fd_num) {
                    Ok(fd) => fd,
                    // No rights over the worker; other failures (the fd closed
                    // meanwhile) only mean it was not this one.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        last_error = Some((pid, fd_num, e));
                        continue;
                    }
                    Err(_) => continue,
                };
                let socket = socket2::Socket::from(fd);
                let Some(local_addr) = socket.local_addr().ok().and_then(|a| a.as_socket()) else {
                    continue;
                };
                let kind_ok = match protocol {
                    Protocol::Tcp => {
                        socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
                            && socket.is_listener().unwrap_or(false)
                    }
                    Protocol::Udp => socket.r#type().is_ok_and(|t| t == socket2::Type::DGRAM),
                };
                if !kind_ok || local_addr.port() != addr.port() {
                    continue;
                }
                // Leave O_NONBLOCK alone: it belongs to the open file description the
                // workers use, and an event-loop worker set it for itself.
                tracing::info!(%local_addr, pid, fd = fd_num, "listener recovered from an adopted worker");
                return Ok(Some(BoundListener {
                    fd: socket.into(),
                    local_addr,
                    protocol,
                }));
            }
        }
        match last_error {
            Some((pid, fd_num, e)) => {
                Err(e).ctx(|| format!("pidfd_getfd({pid}, {fd_num}) for {addr}"))
            }
            None => Ok(None),
        }
    }

    /// Wraps a listening socket a previous daemon handed over (upgrade pair or systemd's
    /// fd store), leaving its flags alone: in inherit mode the workers share its open file
    /// description, in the proxy modes [`BoundListener::proxy_listener`] sets
    /// `O_NONBLOCK` as before.
    ///
    /// # Errors
    /// When `fd` is not a socket of `protocol` bound to an inet address.
    pub fn from_handover(fd: OwnedFd, protocol: Protocol) -> Result<Self> {
        let socket = socket2::Socket::from(fd);
        let wrong = |what: String| Error::io("handed-over socket", std::io::Error::other(what));
        let local_addr = socket
            .local_addr()
            .map_err(|e| Error::io("handed-over socket: getsockname", e))?
            .as_socket()
            .ok_or_else(|| wrong("not an inet socket".into()))?;
        let ty = socket
            .r#type()
            .map_err(|e| Error::io("handed-over socket: SO_TYPE", e))?;
        let expected = match protocol {
            Protocol::Tcp => Type::STREAM,
            Protocol::Udp => Type::DGRAM,
        };
        if ty != expected {
            return Err(wrong(format!(
                "{local_addr} is not a {} socket",
                protocol_name(protocol)
            )));
        }
        Ok(BoundListener {
            fd: socket.into(),
            local_addr,
            protocol,
        })
    }

    /// The socket itself (to keep it for a later handover).
    #[must_use]
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Whether the socket is currently in non-blocking mode (for checks and tests).
    pub fn is_nonblocking(&self) -> Result<bool> {
        fd_is_nonblocking(self.fd.as_fd())
    }
}

impl AsFd for BoundListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for BoundListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reads `O_NONBLOCK` of a file descriptor.
pub fn fd_is_nonblocking(fd: BorrowedFd<'_>) -> Result<bool> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| Error::io("fcntl(F_GETFL)", e.into()))?;
    Ok(flags & libc::O_NONBLOCK != 0)
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// A duplicate of another process's fd `target` (`pidfd_getfd(2)`, Linux 5.6+).
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes plain integers (an fd we own, an fd number in the target,
    // flags 0) and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this descriptor (close-on-exec) for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_port_zero_blocking() {
        let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(l.local_addr().port(), 0);
        assert!(!l.is_nonblocking().unwrap());
        let _c = std::net::TcpStream::connect(l.local_addr()).unwrap();
    }

    #[test]
    fn ipv6_any_accepts_ipv4() {
        let Ok(l) = BoundListener::bind_tcp("[::]:0".parse().unwrap()) else {
            return; // no IPv6 on this host
        };
        let port = l.local_addr().port();
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn udp_binds() {
        let l = BoundListener::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(l.protocol(), Protocol::Udp);
        assert_ne!(l.local_addr().port(), 0);
    }

    #[test]
    fn proxy_listener_is_nonblocking() {
        let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let p = l.proxy_listener().unwrap();
        assert!(p.accept().is_err()); // WouldBlock, not a hang
    }
}

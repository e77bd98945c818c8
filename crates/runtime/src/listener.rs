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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

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

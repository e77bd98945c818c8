//! systemd's file descriptor store: where the public sockets wait while no daemon runs.
//!
//! Under systemd (`NOTIFY_SOCKET` set, `FileDescriptorStoreMax=` in the unit) the daemon
//! pushes every public socket it binds with `FDSTORE=1` + `FDNAME=<name>` and the socket
//! attached (`SCM_RIGHTS`). If the daemon dies (SIGKILL, panic, OOM kill), systemd still
//! holds the sockets: connections keep queueing in the kernel instead of being refused,
//! and the restarted daemon gets them back as `LISTEN_FDS`/`LISTEN_FDNAMES`
//! ([`crate::handover::Handover::from_env`]). A socket closed for good (its app removed,
//! its port changed) is dropped from the store with `FDSTOREREMOVE=1`, or systemd would
//! keep the port bound and silently queue connections nobody serves.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// systemd's notify socket, used for the fd store.
#[derive(Debug)]
pub struct FdStore {
    addr: UnixAddr,
    socket: OwnedFd,
}

impl FdStore {
    /// The store behind `NOTIFY_SOCKET`, or `None` when not run by systemd (or a stand-in
    /// that speaks its protocol).
    #[must_use]
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = PathBuf::from(path);
        let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()).ok()?,
            None => UnixAddr::new(&path).ok()?,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .ok()?;
        Some(FdStore { addr, socket })
    }

    /// Stores `fd` under `name` (systemd keeps it until removed or the unit stops).
    ///
    /// # Errors
    /// The notify socket refused the datagram.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let text = format!("FDSTORE=1\nFDNAME={name}\n");
        let fds = [fd.as_raw_fd()];
        self.send(&text, &[ControlMessage::ScmRights(&fds)])
    }

    /// Drops every descriptor stored under `name`.
    ///
    /// # Errors
    /// The notify socket refused the datagram.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])
    }

    /// Any other `sd_notify` message (`MAINPID=`, `READY=1`...).
    ///
    /// # Errors
    /// The notify socket refused the datagram.
    pub fn notify(&self, text: &str) -> std::io::Result<()> {
        self.send(text, &[])
    }

    fn send(&self, text: &str, cmsgs: &[ControlMessage<'_>]) -> std::io::Result<()> {
        let iov = [IoSlice::new(text.as_bytes())];
        sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.addr),
        )
        .map(|_| ())
        .map_err(std::io::Error::from)
    }
}

/// Receives one `sd_notify` datagram and the descriptors it carried, as systemd does:
/// for tools and tests that stand in for systemd (keeping an fd store).
///
/// # Errors
/// The receive failed (including a timeout set on `socket`).
pub fn receive_notify(
    socket: &std::os::unix::net::UnixDatagram,
) -> std::io::Result<(String, Vec<OwnedFd>)> {
    use std::os::fd::{FromRawFd, RawFd};
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel installed this descriptor for us just now; it is
                // wrapped exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let len = msg.bytes;
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn stores_and_removes_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let store = FdStore {
            addr: UnixAddr::new(&path).unwrap(),
            socket: socket(
                AddressFamily::Unix,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap(),
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        store.store("web/http/tcp/127.0.0.1/0", l.as_fd()).unwrap();
        let (text, mut fds) = receive_notify(&server).unwrap();
        assert_eq!(text, "FDSTORE=1\nFDNAME=web/http/tcp/127.0.0.1/0\n");
        let got = std::net::TcpListener::from(fds.pop().expect("a descriptor"));
        assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
        let mut buf = [0u8; 256];
        store.remove("web/http/tcp/127.0.0.1/0").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"FDSTOREREMOVE=1\nFDNAME=web/http/tcp/127.0.0.1/0\n"
        );
    }
}

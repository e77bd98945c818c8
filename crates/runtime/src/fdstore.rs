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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::os::fd::{AsFd, FromRawFd, RawFd};

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
        let mut buf = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            server.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut got = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: installed for us by the kernel just now.
                got = Some(unsafe { OwnedFd::from_raw_fd(fds[0]) });
            }
        }
        let len = msg.bytes;
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "FDSTORE=1\nFDNAME=web/http/tcp/127.0.0.1/0\n"
        );
        let got = std::net::TcpListener::from(got.expect("a descriptor"));
        assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
        store.remove("web/http/tcp/127.0.0.1/0").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"FDSTOREREMOVE=1\nFDNAME=web/http/tcp/127.0.0.1/0\n"
        );
    }
}

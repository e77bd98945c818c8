//! The sd_notify receiver: one unix datagram socket for all workers (`NOTIFY_SOCKET`).
//!
//! Who sent a datagram is taken from the kernel (`SO_PASSCRED` / `SCM_CREDENTIALS`),
//! never from its content: the sender's pid is mapped to its process group, and a worker
//! *is* its process group (the shim calls `setsid`), so a worker can only speak for
//! itself — it cannot join another worker's group, which lives in another session.
//! Datagrams are accepted when the group leader is a child of this daemon or a group
//! registered with [`NotifySocket::registry`] (adopted workers); anything else is dropped.

use std::collections::HashSet;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

use crate::error::{Error, IoContext, Result};
use crate::procfs;

/// A message from a worker (sd_notify or Node IPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMessage {
    /// `READY=1` or `process.send('ready')`.
    Ready,
    /// `STOPPING=1`.
    Stopping,
    /// `RELOADING=1`.
    Reloading,
    /// `WATCHDOG=1`.
    Watchdog,
    /// `STATUS=...`.
    Status(String),
    /// Another IPC message.
    Ipc(serde_json::Value),
}

/// A message and the worker it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    /// Process group of the sender = the worker's pid.
    pub pgid: i32,
    /// The sending process (the worker or one of its children).
    pub pid: i32,
    /// What it said.
    pub message: WorkerMessage,
}

/// Process groups accepted besides the daemon's own children (adopted workers).
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Mutex<HashSet<i32>>>);

impl Registry {
    /// Accept datagrams from group `pgid`.
    pub fn insert(&self, pgid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pgid);
    }
    /// Stop accepting `pgid` (when the worker is gone).
    pub fn remove(&self, pgid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pgid);
    }
    fn contains(&self, pgid: i32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pgid)
    }
}

/// The bound notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    registry: Registry,
}

impl NotifySocket {
    /// Binds `path` (a stale socket file from an earlier daemon is replaced), enables
    /// `SO_PASSCRED` and makes the file writable by all (workers may run as other users;
    /// the credential check is what guards it). Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove stale {}", path.display()), e)),
        }
        let socket =
            UnixDatagram::bind(path).ctx(|| format!("bind notify socket {}", path.display()))?;
        setsockopt(&socket, sockopt::PassCred, &true)
            .map_err(|e| Error::io("set SO_PASSCRED on notify socket", e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .ctx(|| format!("chmod {}", path.display()))?;
        Ok(NotifySocket {
            socket,
            path: path.to_path_buf(),
            registry: Registry::default(),
        })
    }

    /// Wraps the notify socket a previous daemon handed over on upgrade (bound at `path`,
    /// `SO_PASSCRED` already on), so workers' `READY=1` keeps arriving at the same path.
    /// Needs a tokio runtime.
    ///
    /// # Errors
    /// When `fd` is not a datagram socket tokio can register.
    pub fn from_handover(fd: std::os::fd::OwnedFd, path: &Path) -> Result<Self> {
        let std_socket = std::os::unix::net::UnixDatagram::from(fd);
        std_socket
            .set_nonblocking(true)
            .ctx(|| format!("handed-over notify socket {}", path.display()))?;
        let socket = UnixDatagram::from_std(std_socket)
            .ctx(|| format!("handed-over notify socket {}", path.display()))?;
        setsockopt(&socket, sockopt::PassCred, &true)
            .map_err(|e| Error::io("set SO_PASSCRED on notify socket", e.into()))?;
        Ok(NotifySocket {
            socket,
            path: path.to_path_buf(),
            registry: Registry::default(),
        })
    }

    /// Shares `registry` (the adopted groups) instead of a fresh one: a reader started
    /// again on the same socket accepts the same workers.
    #[must_use]
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// A duplicate of the socket, to hand to the next daemon on upgrade.
    ///
    /// # Errors
    /// When `dup` fails (out of descriptors).
    pub fn duplicate(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.socket
            .as_fd()
            .try_clone_to_owned()
            .ctx(|| format!("dup notify socket {}", self.path.display()))
    }

    /// The path to put in `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The set of extra accepted groups (adopted workers).
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Receives the next accepted datagram's messages (unaccepted ones are skipped).
    pub async fn recv(&self) -> Result<Vec<WorkerReport>> {
        loop {
            let (pid, data) = self.recv_raw().await?;
            let Some(pgid) = self.accept(pid) else {
                tracing::debug!(pid, "notify datagram from a non-worker ignored");
                continue;
            };
            let msgs = parse_datagram(&data);
            if msgs.is_empty() {
                continue;
            }
            return Ok(msgs
                .into_iter()
                .map(|message| WorkerReport { pgid, pid, message })
                .collect());
        }
    }

    /// Runs the receiver, sending reports to `tx` until the receiver side is dropped.
    pub fn spawn(self, tx: mpsc::Sender<WorkerReport>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.recv().await {
                    Ok(reports) => {
                        for r in reports {
                            if tx.send(r).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "notify socket"),
                }
            }
        })
    }

    fn accept(&self, pid: i32) -> Option<i32> {
        if pid <= 0 {
            return None;
        }
        let pgid = procfs::stat(pid)?.pgid;
        if self.registry.contains(pgid) {
            return Some(pgid);
        }
        let leader = procfs::stat(pgid)?;
        (leader.ppid == std::process::id() as i32).then_some(pgid)
    }

    async fn recv_raw(&self) -> Result<(i32, Vec<u8>)> {
        loop {
            self.socket
                .readable()
                .await
                .map_err(|e| Error::io("notify socket", e))?;
            let res = self.socket.try_io(Interest::READABLE, || {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!(UnixCredentials);
                let (len, pid) = {
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let msg = recvmsg::<UnixAddr>(
                        self.socket.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
                    )
                    .map_err(std::io::Error::from)?;
                    let mut pid = 0;
                    for c in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmCredentials(cred) = c {
                            pid = cred.pid();
                        }
                    }
                    (msg.bytes, pid)
                };
                buf.truncate(len);
                Ok((pid, buf))
            });
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::io("notify socket: recvmsg", e)),
            }
        }
    }
}

/// Parses newline-separated `KEY=VALUE` lines; unknown keys are ignored.
pub fn parse_datagram(data: &[u8]) -> Vec<WorkerMessage> {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            Some(match (k, v) {
                ("READY", "1") => WorkerMessage::Ready,
                ("STOPPING", "1") => WorkerMessage::Stopping,
                ("RELOADING", "1") => WorkerMessage::Reloading,
                ("WATCHDOG", "1") => WorkerMessage::Watchdog,
                ("STATUS", s) => WorkerMessage::Status(s.to_owned()),
                _ => return None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys() {
        let m = parse_datagram(b"READY=1\nSTATUS=warming up\nMAINPID=5\nWATCHDOG=1\n");
        assert_eq!(
            m,
            vec![
                WorkerMessage::Ready,
                WorkerMessage::Status("warming up".into()),
                WorkerMessage::Watchdog
            ]
        );
        assert!(parse_datagram(b"READY=0").is_empty());
    }
}

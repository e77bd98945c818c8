//! Node's IPC channel, so that an unmodified PM2 app calling `process.send('ready')`
//! (PM2's `wait_ready`) becomes ready.
//!
//! The worker gets one end of a `socketpair(AF_UNIX, SOCK_STREAM)` as `NODE_CHANNEL_FD`
//! with `NODE_CHANNEL_SERIALIZATION_MODE=json`; Node then writes one JSON value per line.
//! Node's own bookkeeping (`{"cmd":"NODE_..."}`) is dropped. The daemon keeps its end
//! open for the worker's life: a closed channel emits `disconnect` in the app, which some
//! apps treat as "parent gone, exit".

use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::notify::{WorkerMessage, WorkerReport};

/// The daemon's end of a worker's IPC channel.
#[derive(Debug)]
pub struct IpcChannel {
    reader: BufReader<UnixStream>,
}

/// One message from the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpcMessage {
    /// `process.send('ready')`.
    Ready,
    /// Anything else the app sent (not Node-internal).
    Other(serde_json::Value),
}

impl IpcChannel {
    /// Wraps the daemon's end (needs a tokio runtime).
    pub(crate) fn from_fd(fd: OwnedFd) -> Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .map_err(|e| Error::io("ipc channel: set non-blocking", e))?;
        let stream =
            UnixStream::from_std(std).map_err(|e| Error::io("ipc channel: register", e))?;
        Ok(IpcChannel {
            reader: BufReader::new(stream),
        })
    }

    /// The next app message; `None` when the worker closed the channel (or exited).
    /// Lines that are not JSON are skipped.
    pub async fn recv(&mut self) -> Result<Option<IpcMessage>> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|e| Error::io("ipc channel: read", e))?;
            if n == 0 {
                return Ok(None);
            }
            if let Some(msg) = parse_line(&line) {
                return Ok(Some(msg));
            }
        }
    }

    /// Forwards messages as [`WorkerReport`]s for worker `pgid` until the channel closes.
    /// The task owns the channel, which keeps it open as long as the worker lives.
    pub fn forward(
        mut self,
        pgid: i32,
        tx: mpsc::Sender<WorkerReport>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some(msg)) = self.recv().await {
                let message = match msg {
                    IpcMessage::Ready => WorkerMessage::Ready,
                    IpcMessage::Other(v) => WorkerMessage::Ipc(v),
                };
                if tx
                    .send(WorkerReport {
                        pgid,
                        pid: pgid,
                        message,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    }
}

/// Parses one line; `None` for Node-internal messages and garbage.
pub fn parse_line(line: &str) -> Option<IpcMessage> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if value.as_str() == Some("ready") {
        return Some(IpcMessage::Ready);
    }
    if value
        .get("cmd")
        .and_then(|c| c.as_str())
        .is_some_and(|c| c.starts_with("NODE_"))
    {
        return None;
    }
    Some(IpcMessage::Other(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_and_filters_internal() {
        assert_eq!(parse_line("\"ready\"\n"), Some(IpcMessage::Ready));
        assert_eq!(parse_line(r#"{"cmd":"NODE_HANDLE_ACK"}"#), None);
        assert_eq!(parse_line("not json"), None);
        assert_eq!(
            parse_line(r#"{"a":1}"#),
            Some(IpcMessage::Other(serde_json::json!({"a":1})))
        );
    }
}

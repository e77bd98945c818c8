//! The CLI's side of the control API: HTTP/1.1 over the daemon's unix socket.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api_types::ApiError;

/// How long one request may take: `CLUSTERD_TIMEOUT` (`10s`, `1m`), default 30 s.
fn call_timeout() -> std::time::Duration {
    std::env::var("CLUSTERD_TIMEOUT")
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .unwrap_or(std::time::Duration::from_secs(30))
}

/// Receives each chunk of a streamed body; returning false stops the stream.
type ChunkSink<'a> = dyn FnMut(&[u8]) -> bool + 'a;

/// A connection target; each call opens its own connection (the CLI makes few calls).
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// GET and decode JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path)
    }

    /// POST (empty body) and decode JSON.
    pub fn post<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::POST, path)
    }

    fn call<T: DeserializeOwned>(&self, method: Method, path: &str) -> anyhow::Result<T> {
        let rt = runtime()?;
        let timeout = call_timeout();
        rt.block_on(async {
            // A stopped (SIGSTOP) or wedged daemon accepts the connection and never
            // answers: give up with a clear message instead of hanging forever.
            let (status, body) = tokio::time::timeout(timeout, self.request(method, path, None))
                .await
                .map_err(|_| {
                    anyhow!(
                        "clusterd at {} did not answer within {} (is it stopped or overloaded? CLUSTERD_TIMEOUT sets the limit)",
                        self.socket.display(),
                        humantime::format_duration(timeout)
                    )
                })??;
            decode(status, &body)
        })
    }

    /// Streams a newline-delimited response, calling `on_line` per line until it
    /// returns false or the daemon closes the stream.
    pub fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<()> {
        let rt = runtime()?;
        rt.block_on(async {
            let mut pending = Vec::new();
            let (status, rest) = self
                .request(
                    Method::GET,
                    path,
                    Some(&mut |chunk: &[u8]| {
                        pending.extend_from_slice(chunk);
                        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=pos).collect();
                            if !on_line(String::from_utf8_lossy(&line).trim_end()) {
                                return false;
                            }
                        }
                        true
                    }),
                )
                .await?;
            if !status.is_success() {
                return decode::<serde_json::Value>(status, &rest).map(|_| ());
            }
            Ok(())
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        mut on_chunk: Option<&mut ChunkSink<'_>>,
    ) -> anyhow::Result<(StatusCode, Vec<u8>)> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect_error(&self.socket, &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("control API handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "clusterd")
            .body(Empty::<Bytes>::new())?;
        let resp = sender
            .send_request(req)
            .await
            .context("control API request")?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut collected = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("control API response")?;
            if let Some(data) = frame.data_ref() {
                match on_chunk.as_mut() {
                    Some(cb) if status.is_success() => {
                        if !cb(data) {
                            break;
                        }
                    }
                    _ => collected.extend_from_slice(data),
                }
            }
        }
        Ok((status, collected))
    }
}

/// Says why the socket cannot be reached: "is the daemon running?" is the answer only
/// when nothing listens there; a daemon that runs but refuses us needs another fix.
fn connect_error(socket: &std::path::Path, e: &std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: the daemon runs as another user (run as that user or root, or join the `clusterd` group)",
            socket.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "cannot reach clusterd at {}: is the daemon running?",
            socket.display()
        ),
        _ => anyhow!("cannot reach clusterd at {}: {e}", socket.display()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> anyhow::Result<T> {
    if !status.is_success() {
        if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
            bail!("{}", e.error);
        }
        bail!("daemon answered {status}");
    }
    serde_json::from_slice(body).context("decoding the daemon's answer")
}

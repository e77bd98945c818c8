//! One plaintext client connection on the lean HTTP/1.1 path: a loop that reads a
//! request head, picks a worker, and relays the exchange, in the connection's own task.
//!
//! Each request is balanced anew, counted in flight from its assignment until its
//! response has been handed to the client in full ([`Lease`]), and retried by the same
//! rules as the hyper path ([`super::super::http`], module docs "Retries").

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use clusterd_core::plan::WorkerId;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::super::http::{Client, Ctx, MAX_ATTEMPTS};
use super::super::pool::RawConn;
use super::super::routes::{Backend, Lease};
use super::super::stop::Stop;
use super::super::timeouts::WriteIdle;
use super::chunked::{self, ChunkError, Decoder};
use super::head::{self, Asked, BadResponse, Framing, Parsed, RequestPlan, RequestRules};

/// What a client connection reads at a time; grown only for a head that needs more.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one client connection until it closes or `shutdown` finds it idle.
pub(crate) async fn serve<S: ClientIo>(mut client: S, ctx: &Ctx, who: &Client, shutdown: &Stop) {
    let mut conn = Conn {
        ctx,
        who,
        bufs: Bufs {
            client: BytesMut::new(),
            upstream: BytesMut::new(),
            request_head: Vec::with_capacity(1024),
            response_head: Vec::with_capacity(1024),
            scratch: Vec::new(),
        },
    };
    let idle_stop = shutdown.stopped();
    tokio::pin!(idle_stop);
    let mut fresh = true;
    loop {
        let Some(plan) = conn.next_head(&mut client, idle_stop.as_mut(), fresh).await else {
            return;
        };
        fresh = false;
        conn.bufs.client.advance(plan.head_len);
        match conn.exchange(&mut client, &plan, shutdown).await {
            Next::KeepAlive => {}
            Next::Close { linger } => {
                let _ = client.shutdown().await;
                if linger {
                    // Unread request body: reading (and dropping) it for a moment keeps
                    // the kernel from answering it with a reset that could destroy the
                    // response before the client has read it.
                    let mut sink = vec![0u8; READ_CHUNK];
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                }
                return;
            }
        }
    }
}

/// A client connection the lean path can serve: plain TCP, or TLS over it.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + Sync {
    /// Reads what has arrived, without waiting for the reactor; `false` if the client
    /// has closed. Done once, right after accepting.
    fn read_now(&self, _buf: &mut BytesMut) -> bool {
        true
    }

    /// The address the client connected to, when it has to be asked.
    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

impl ClientIo for WriteIdle<TcpStream> {
    fn read_now(&self, buf: &mut BytesMut) -> bool {
        speculative_read(self.get_ref(), buf)
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.get_ref().local_addr().ok()
    }
}

/// TLS: the handshake has already read from the socket, and the TLS listener knows
/// its local address up front.
impl ClientIo for tokio_rustls::server::TlsStream<WriteIdle<TcpStream>> {}

/// What follows an exchange on the client connection.
enum Next {
    KeepAlive,
    /// Close; `linger` when the client may still be sending a request body.
    Close {
        linger: bool,
    },
}

/// Buffers reused by every request of a connection.
struct Bufs {
    /// Bytes from the client not yet consumed (a head, a body, pipelined requests).
    client: BytesMut,
    /// Bytes from the worker not yet passed on.
    upstream: BytesMut,
    /// The head for the worker.
    request_head: Vec<u8>,
    /// The head for the client.
    response_head: Vec<u8>,
    /// Re-chunked body bytes on their way out.
    scratch: Vec<u8>,
}

struct Conn<'a> {
    ctx: &'a Ctx,
    who: &'a Client,
    bufs: Bufs,
}

/// Why the exchange with a worker failed.
enum Failure {
    /// Nothing came back (closed or reset before a response byte).
    Nothing(io::Error),
    /// The response head did not come in time.
    Timeout,
    /// The head came and is not HTTP.
    Bad(BadResponse),
    /// Reading the client's body failed: it timed out, went away, or is malformed.
    ClientBody(BodyError),
}

enum BodyError {
    Timeout,
    Gone,
    Malformed(ChunkError),
}

/// A read straight after accepting, before the socket's first readiness event: a
/// client sends its request with the connection, so under load it is usually there, and
/// reading it now saves a trip through the reactor and arming the header timer (whose
/// registration wakes the driver through its eventfd). HAProxy reads the same way.
/// `false`: the client has already closed or failed.
fn speculative_read(stream: &TcpStream, buf: &mut BytesMut) -> bool {
    use std::os::fd::AsRawFd;
    // Most request heads fit; a longer one is read on by the normal path.
    const FIRST_READ: usize = 4096;
    let start = buf.len();
    buf.resize(start + FIRST_READ, 0);
    let read = nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut buf[start..],
        nix::sys::socket::MsgFlags::empty(),
    );
    let n = read.unwrap_or(0);
    buf.truncate(start + n);
    match read {
        Ok(n) => n > 0,
        Err(e) => e == nix::errno::Errno::EAGAIN,
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

impl Conn<'_> {
    /// Reads until a request head is complete. `None`: the connection is done (closed,
    /// idle past the header timeout, refused, or idle at shutdown).
    async fn next_head<S: ClientIo>(
        &mut self,
        client: &mut S,
        mut idle_stop: std::pin::Pin<&mut super::super::stop::Stopped>,
        fresh: bool,
    ) -> Option<RequestPlan> {
        let cfg = &self.ctx.cfg;
        if fresh && !client.read_now(&mut self.bufs.client) {
            return None;
        }
        let deadline = Instant::now() + cfg.header_read_timeout;
        loop {
            let buf = &mut self.bufs.client;
            if !buf.is_empty() {
                let local = || self.who.local.or_else(|| client.local_addr());
                let rules = RequestRules {
                    max_header_bytes: cfg.max_header_bytes,
                    allowed_upgrades: &cfg.allowed_upgrades,
                    hop: &self.who.hop,
                    local: &local,
                };
                match head::plan_request(buf, &rules, &mut self.bufs.request_head) {
                    Ok(Some(plan)) => return Some(plan),
                    Ok(None) => {}
                    Err(reject) => {
                        tracing::debug!(status = %reject.status, reason = reject.reason.trim_end(), "request refused");
                        let out = &mut self.bufs.response_head;
                        let asked = Asked {
                            head: false,
                            upgrade: false,
                            http10: false,
                        };
                        head::error_response(out, reject.status, reject.reason, asked, true);
                        let _ = client.write_all(out).await;
                        let _ = client.shutdown().await;
                        return None;
                    }
                }
            }
            reserve(buf);
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout_at(deadline, client.read_buf(buf)) => r,
                () = idle_stop.as_mut(), if buf.is_empty() => return None,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, failed, or slow: hyper closed these without an answer too.
                _ => return None,
            }
        }
    }

    /// Forwards one request and its response.
    async fn exchange<S: ClientIo>(
        &mut self,
        client: &mut S,
        plan: &RequestPlan,
        shutdown: &Stop,
    ) -> Next {
        let ctx = self.ctx;
        let cfg = &ctx.cfg;
        let peer = self.who.peer;
        let deadline = Instant::now() + cfg.no_backend_wait;
        let mut failed: Vec<WorkerId> = Vec::new();
        // Set once a worker may have seen the request: it is replayed at most once,
        // then only on a fresh connection.
        let mut replayed = false;
        let asked = Asked {
            head: plan.head,
            upgrade: plan.upgrade,
            http10: plan.http10,
        };
        for _ in 0..MAX_ATTEMPTS {
            let Some(lease) = ctx.routes.acquire(Some(peer.ip()), &failed, deadline).await else {
                if !failed.is_empty() {
                    break;
                }
                tracing::warn!("no routable worker");
                // The body (if any) was not read: what follows on the connection is
                // not a request head, so it closes.
                let unread = plan.body != Framing::Empty;
                return self
                    .answer(
                        client,
                        plan,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no worker available\n",
                        unread,
                    )
                    .await;
            };
            let backend = Arc::clone(lease.backend());
            let span = tracing::debug_span!("request", worker = %backend.id);
            let pooled = if plan.upgrade || replayed {
                None
            } else {
                backend.raw.take(cfg.pool_idle_timeout, !plan.replayable)
            };
            let reused = pooled.is_some();
            let mut upstream = match pooled {
                Some(RawConn(s)) => s,
                None => match connect(backend.addr, cfg.connect_timeout).await {
                    Ok(s) => s,
                    Err(err) => {
                        backend.record_error();
                        span.in_scope(|| tracing::warn!(cause = %err, "connect failed; trying another worker"));
                        failed.push(backend.id);
                        continue;
                    }
                },
            };
            if let Err(err) = upstream.write_all(&self.bufs.request_head).await {
                // Nothing of the body has left the client's buffer: the request can go
                // elsewhere whole.
                if !reused {
                    backend.record_error();
                    failed.push(backend.id);
                }
                span.in_scope(|| tracing::debug!(cause = %err, "worker connection failed before the request; retrying"));
                continue;
            }
            let (head, body_done) = self
                .request_body_and_head(client, &mut upstream, plan, asked)
                .await;
            let resp = match head {
                Ok(r) => r,
                // Failed: the request stops counting in flight before the client hears
                // of it (and the worker connection, which is in an unknown state, closes).
                Err(failure) => {
                    drop(upstream);
                    drop(lease);
                    match self
                        .failed(
                            client,
                            plan,
                            failure,
                            (reused, body_done),
                            &mut replayed,
                            &mut failed,
                            &backend,
                            &span,
                        )
                        .await
                    {
                        Some(next) => return next,
                        None => continue,
                    }
                }
            };
            let closing = plan.close
                || !body_done
                || shutdown.is_stopped()
                || ctx.retire.is_stopped()
                || resp.to_client == Framing::UntilClose;
            if resp.status == 101 {
                return self.tunnel(client, upstream, lease).await;
            }
            let out = &mut self.bufs.response_head;
            if closing {
                out.extend_from_slice(b"connection: close\r\n");
            } else if plan.http10 {
                // HTTP/1.0 assumes close unless told otherwise.
                out.extend_from_slice(b"connection: keep-alive\r\n");
            }
            out.extend_from_slice(b"\r\n");
            let mut lease = Some(lease);
            let relayed = relay(
                client,
                &mut upstream,
                &mut self.bufs,
                (resp.body, resp.to_client),
                &mut lease,
            )
            .await;
            return match relayed {
                Ok(()) => {
                    // A connection that carried a body is not reused: a worker that
                    // answered without reading it (CL.0) would take the rest as the
                    // next request, and answer it to another client.
                    let reusable = resp.reusable
                        && plan.body == Framing::Empty
                        && !plan.upgrade
                        && self.bufs.upstream.is_empty();
                    if reusable {
                        backend.raw.put(RawConn(upstream), cfg.pool_max_idle, || {
                            backend.is_routable()
                        });
                    }
                    if closing || shutdown.is_stopped() {
                        Next::Close { linger: !body_done }
                    } else {
                        Next::KeepAlive
                    }
                }
                Err(RelayError::Worker(err)) => {
                    backend.record_error();
                    span.in_scope(|| tracing::warn!(cause = %err, "response body failed"));
                    Next::Close { linger: false }
                }
                Err(RelayError::Client(err)) => {
                    span.in_scope(
                        || tracing::debug!(cause = %err, "client went away during the response"),
                    );
                    Next::Close { linger: false }
                }
            };
        }
        // Every attempt failed, or every routable worker has.
        self.answer(
            client,
            plan,
            StatusCode::BAD_GATEWAY,
            "no worker reachable\n",
            plan.body != Framing::Empty,
        )
        .await
    }

    /// Handles a failed attempt: `None` to try again (a replay), or how the client was
    /// answered.
    #[allow(clippy::too_many_arguments)]
    async fn failed<S: ClientIo>(
        &mut self,
        client: &mut S,
        plan: &RequestPlan,
        failure: Failure,
        (reused, body_done): (bool, bool),
        replayed: &mut bool,
        failed: &mut Vec<WorkerId>,
        backend: &Backend,
        span: &tracing::Span,
    ) -> Option<Next> {
        let (status, reason, body_unread) = match failure {
            Failure::Nothing(err) if plan.replayable && !*replayed => {
                *replayed = true;
                if reused {
                    span.in_scope(
                        || tracing::debug!(cause = %err, "stale keep-alive connection; replaying"),
                    );
                } else {
                    backend.record_error();
                    failed.push(backend.id);
                    span.in_scope(|| tracing::warn!(cause = %err, "worker closed a fresh connection; replaying on another worker"));
                }
                return None;
            }
            Failure::Nothing(err) => {
                backend.record_error();
                span.in_scope(|| tracing::warn!(cause = %err, "worker failed the request"));
                (StatusCode::BAD_GATEWAY, "bad gateway\n", !body_done)
            }
            Failure::Bad(err) => {
                backend.record_error();
                span.in_scope(|| tracing::warn!(cause = %err, "worker failed the request"));
                (StatusCode::BAD_GATEWAY, "bad gateway\n", !body_done)
            }
            Failure::Timeout => {
                backend.record_error();
                span.in_scope(|| tracing::warn!("worker did not respond in time"));
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    "worker timed out\n",
                    !body_done,
                )
            }
            Failure::ClientBody(err) => {
                let (status, reason) = match err {
                    BodyError::Timeout => (StatusCode::REQUEST_TIMEOUT, "request body timed out\n"),
                    BodyError::Gone => (StatusCode::BAD_REQUEST, "request body incomplete\n"),
                    BodyError::Malformed(e) => {
                        span.in_scope(|| tracing::debug!(cause = %e, "client request body failed"));
                        (StatusCode::BAD_REQUEST, "request body incomplete\n")
                    }
                };
                (status, reason, true)
            }
        };
        Some(self.answer(client, plan, status, reason, body_unread).await)
    }

    /// Sends the request body (if any) while watching for the response head, which a
    /// worker may send before it has read the whole body. Returns the head (written to
    /// `bufs.response_head`, without its blank line) and whether the body went in full.
    async fn request_body_and_head<S: ClientIo>(
        &mut self,
        client: &mut S,
        upstream: &mut TcpStream,
        plan: &RequestPlan,
        asked: Asked,
    ) -> (Result<head::ResponsePlan, Failure>, bool) {
        let response_timeout = self.ctx.cfg.response_header_timeout;
        let Bufs {
            client: cbuf,
            upstream: ubuf,
            response_head,
            scratch,
            ..
        } = &mut self.bufs;
        ubuf.clear();
        if plan.body == Framing::Empty {
            let head = read_head(upstream, ubuf, asked, response_head);
            return match tokio::time::timeout(response_timeout, head).await {
                Ok(r) => (r, true),
                Err(_) => (Err(Failure::Timeout), true),
            };
        }
        let continue_first = plan.expect_continue && cbuf.is_empty();
        let idle = self.ctx.cfg.body_read_timeout;
        let (mut up_read, mut up_write) = upstream.split();
        let send = send_body(
            client,
            cbuf,
            &mut up_write,
            plan.body,
            scratch,
            idle,
            continue_first,
        );
        let head = read_head(&mut up_read, ubuf, asked, response_head);
        tokio::pin!(send, head);
        tokio::select! {
            biased;
            r = head.as_mut() => (r, false),
            sent = send.as_mut() => match sent {
                Ok(()) => match tokio::time::timeout(response_timeout, head).await {
                    Ok(r) => (r, true),
                    Err(_) => (Err(Failure::Timeout), true),
                },
                // The worker stopped reading: its answer may still come.
                Err(SendError::Worker) => match tokio::time::timeout(response_timeout, head).await {
                    Ok(r) => (r, false),
                    Err(_) => (Err(Failure::Timeout), false),
                },
                Err(SendError::Client(e)) => (Err(Failure::ClientBody(e)), false),
            },
        }
    }

    /// Answers the request from the proxy itself.
    async fn answer<S: ClientIo>(
        &mut self,
        client: &mut S,
        plan: &RequestPlan,
        status: StatusCode,
        reason: &str,
        body_unread: bool,
    ) -> Next {
        // An HTTP/1.0 client is not told `keep-alive` here: it gets the close it assumes.
        let close = plan.close || plan.http10 || body_unread || self.ctx.retire.is_stopped();
        let out = &mut self.bufs.response_head;
        let asked = Asked {
            head: plan.head,
            upgrade: false,
            http10: plan.http10,
        };
        head::error_response(out, status, reason, asked, close);
        if client.write_all(out).await.is_err() || close {
            return Next::Close {
                linger: body_unread,
            };
        }
        Next::KeepAlive
    }

    /// Answers an upgrade with the worker's `101` and joins the two connections until
    /// either side closes; the request counts in flight until then.
    async fn tunnel<S: ClientIo>(
        &mut self,
        client: &mut S,
        mut upstream: TcpStream,
        lease: Lease,
    ) -> Next {
        let Bufs {
            client: cbuf,
            upstream: ubuf,
            response_head: out,
            ..
        } = &mut self.bufs;
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(ubuf);
        ubuf.clear();
        if client.write_all(out).await.is_err() {
            return Next::Close { linger: false };
        }
        // What the client sent after its handshake belongs to the tunnel.
        if !cbuf.is_empty() {
            if upstream.write_all(cbuf).await.is_err() {
                return Next::Close { linger: false };
            }
            cbuf.clear();
        }
        match tokio::io::copy_bidirectional(client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
            Err(err) => tracing::debug!(cause = %err, "tunnel failed"),
        }
        drop(lease);
        Next::Close { linger: false }
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, super::super::ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // Latency matters more than packet count on loopback.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(super::super::ProxyError::Connect { addr, source }),
        Err(_) => Err(super::super::ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// Reads the worker's response head into `buf`, skipping interim (1xx) responses, and
/// writes the client's head to `out`. Leaves the bytes after the head in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    upstream: &mut R,
    buf: &mut BytesMut,
    asked: Asked,
    out: &mut Vec<u8>,
) -> Result<head::ResponsePlan, Failure> {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match head::plan_response(buf, asked, out) {
                Ok(Parsed::Final(plan)) => {
                    buf.advance(plan.head_len);
                    return Ok(plan);
                }
                Ok(Parsed::Interim(n)) => {
                    buf.advance(n);
                    continue;
                }
                Ok(Parsed::Partial) => {}
                Err(bad) => return Err(Failure::Bad(bad)),
            }
        }
        reserve(buf);
        match upstream.read_buf(buf).await {
            Ok(0) if received => {
                return Err(Failure::Bad(BadResponse(
                    "connection closed inside the response head",
                )));
            }
            Ok(0) => {
                return Err(Failure::Nothing(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                )));
            }
            Ok(_) => received = true,
            Err(err) if received => return Err(Failure::Bad(BadResponse(inside_head(&err)))),
            Err(err) => return Err(Failure::Nothing(err)),
        }
    }
}

/// What a read failure in the middle of a response head is called.
fn inside_head(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::ConnectionReset => "connection reset inside the response head",
        _ => "read failed inside the response head",
    }
}

enum SendError {
    /// Writing to the worker failed.
    Worker,
    Client(BodyError),
}

/// Forwards the request body: what is already buffered, then from the socket, each
/// read bounded by the body-read timeout. A chunked body is decoded and re-chunked.
async fn send_body<S: ClientIo, W: AsyncWrite + Unpin>(
    client: &mut S,
    cbuf: &mut BytesMut,
    up: &mut W,
    framing: Framing,
    scratch: &mut Vec<u8>,
    idle: Duration,
    continue_first: bool,
) -> Result<(), SendError> {
    if continue_first
        && client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return Err(SendError::Client(BodyError::Gone));
    }
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut decoder = Decoder::default();
    loop {
        if !cbuf.is_empty() {
            if framing == Framing::Chunked {
                scratch.clear();
                let used = decoder
                    .feed(cbuf, |data| chunked::encode(scratch, data))
                    .map_err(|e| SendError::Client(BodyError::Malformed(e)))?;
                cbuf.advance(used);
                if decoder.is_done() {
                    scratch.extend_from_slice(chunked::END);
                }
                if !scratch.is_empty() {
                    up.write_all(scratch).await.map_err(|_| SendError::Worker)?;
                }
                if decoder.is_done() {
                    return Ok(());
                }
            } else {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(cbuf.len());
                up.write_all(&cbuf[..take])
                    .await
                    .map_err(|_| SendError::Worker)?;
                cbuf.advance(take);
                left -= take as u64;
                if left == 0 {
                    return Ok(());
                }
            }
        }
        reserve(cbuf);
        match tokio::time::timeout(idle, client.read_buf(cbuf)).await {
            Err(_) => return Err(SendError::Client(BodyError::Timeout)),
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(SendError::Client(BodyError::Gone)),
        }
    }
}

enum RelayError {
    Worker(io::Error),
    Client(io::Error),
}

impl From<ChunkError> for RelayError {
    fn from(e: ChunkError) -> Self {
        RelayError::Worker(io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Passes the response head (`bufs.response_head`, complete) and body to the client.
/// Small bodies that came with the head go out in the same write. The request stops
/// counting in flight (`lease` is dropped) once the worker's side is complete, before
/// the last write to the client: the worker is done with it, and a client that has the
/// whole response then never sees it still counted.
async fn relay<S: ClientIo>(
    client: &mut S,
    upstream: &mut TcpStream,
    bufs: &mut Bufs,
    (from, to): (Framing, Framing),
    lease: &mut Option<Lease>,
) -> Result<(), RelayError> {
    let Bufs {
        upstream: ubuf,
        response_head: out,
        scratch,
        ..
    } = bufs;
    let rechunk = to == Framing::Chunked;
    let mut decoder = Decoder::default();
    let mut left = match from {
        Framing::Length(n) => n,
        _ => 0,
    };
    // `out` starts as the head; body bytes are appended and written with it.
    let mut pending_head = true;
    loop {
        let mut done = false;
        match from {
            Framing::Empty => {
                lease.take();
                done = true;
            }
            Framing::Length(_) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(ubuf.len());
                if left == take as u64 {
                    lease.take();
                }
                if pending_head && take <= READ_CHUNK {
                    out.extend_from_slice(&ubuf[..take]);
                } else {
                    write(client, out, &mut pending_head).await?;
                    client
                        .write_all(&ubuf[..take])
                        .await
                        .map_err(RelayError::Client)?;
                }
                ubuf.advance(take);
                left -= take as u64;
                done = left == 0;
            }
            Framing::Chunked => {
                let used = if rechunk {
                    scratch.clear();
                    let used = decoder.feed(ubuf, |d| chunked::encode(scratch, d))?;
                    if decoder.is_done() {
                        scratch.extend_from_slice(chunked::END);
                    }
                    used
                } else {
                    scratch.clear();
                    decoder.feed(ubuf, |d| scratch.extend_from_slice(d))?
                };
                ubuf.advance(used);
                done = decoder.is_done();
                if done {
                    lease.take();
                }
                flush_scratch(client, out, scratch, &mut pending_head).await?;
            }
            Framing::UntilClose => {
                scratch.clear();
                if rechunk {
                    chunked::encode(scratch, ubuf);
                } else {
                    scratch.extend_from_slice(ubuf);
                }
                ubuf.clear();
                flush_scratch(client, out, scratch, &mut pending_head).await?;
            }
        }
        if done {
            if pending_head {
                write(client, out, &mut pending_head).await?;
            }
            return Ok(());
        }
        if pending_head {
            // Send the head before waiting on the worker: the client may be waiting
            // for it (a stream of events).
            write(client, out, &mut pending_head).await?;
        }
        ubuf.clear();
        reserve(ubuf);
        match upstream.read_buf(ubuf).await {
            Ok(0) if from == Framing::UntilClose => {
                lease.take();
                if rechunk {
                    scratch.clear();
                    scratch.extend_from_slice(chunked::END);
                    client
                        .write_all(scratch)
                        .await
                        .map_err(RelayError::Client)?;
                }
                return Ok(());
            }
            Ok(0) => {
                return Err(RelayError::Worker(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "worker closed the connection inside the response body",
                )));
            }
            Ok(_) => {}
            Err(err) => return Err(RelayError::Worker(err)),
        }
    }
}

/// Writes `out` (the head, maybe with body bytes) once.
async fn write<S: ClientIo>(
    client: &mut S,
    out: &mut Vec<u8>,
    pending_head: &mut bool,
) -> Result<(), RelayError> {
    client.write_all(out).await.map_err(RelayError::Client)?;
    out.clear();
    *pending_head = false;
    Ok(())
}

/// Writes what the body produced in `scratch`, with the head if it is still pending.
async fn flush_scratch<S: ClientIo>(
    client: &mut S,
    out: &mut Vec<u8>,
    scratch: &[u8],
    pending_head: &mut bool,
) -> Result<(), RelayError> {
    if *pending_head {
        out.extend_from_slice(scratch);
        return write(client, out, pending_head).await;
    }
    if !scratch.is_empty() {
        client
            .write_all(scratch)
            .await
            .map_err(RelayError::Client)?;
    }
    Ok(())
}

//! `http` mode: an HTTP/1.1 reverse proxy on the public socket that assigns each
//! *request* to the least-busy routable worker.
//!
//! Client connections are not tied to a worker: a keep-alive client keeps its
//! connection to the proxy across reloads, and each of its requests is balanced anew.
//!
//! # In-flight accounting
//! A request counts against its worker from the moment it is assigned until its
//! response body has been handed to the client in full, or has failed (the [`Lease`]
//! is dropped with the body). So a drain also waits for streaming responses. An
//! upgraded connection (WebSocket) counts until the tunnel closes.
//!
//! # Retries
//! A request is sent again (to another worker, or on a fresh connection) only when the
//! worker cannot have seen it: the connect failed, hyper handed the request back
//! unsent, or — for a reused keep-alive connection that the worker closed while the
//! request was on its way — the request is idempotent and has no body, so nothing of
//! the client's was consumed. Everything else is a 502 (or 504 on timeout).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::net::Cidr;
use clusterd_core::plan::WorkerId;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::front::Front;
use super::pool::{connect, BoxError, UpstreamBody, UpstreamConn};
use super::routes::{Lease, RouteTable};
use super::stop::{Stop, StopOnDrop};
use super::timeouts::{BodyReadTimeout, Idle, WriteIdle};
use super::{guard, h1, headers, threads};
use crate::accept::{AcceptBackoff, ConnLimiter};
use crate::tls::TlsTerminator;

/// Bounds of the http proxy. The defaults suit a web app on the same host.
#[derive(Debug, Clone)]
pub struct HttpProxyConfig {
    /// How long a request waits for a routable worker before a 503. A rollout or a
    /// crash restart can leave a moment with no ready worker; waiting up to about the
    /// readiness timeout turns that moment into latency instead of errors.
    pub no_backend_wait: Duration,
    /// Bound on connecting to a worker's private port.
    pub connect_timeout: Duration,
    /// Largest request head (request line and headers) accepted; larger gets a 431.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head, counted from when the
    /// connection opens or its previous response completes. This is the slowloris
    /// bound, and in hyper it is also the keep-alive idle timeout of client
    /// connections (an idle client is closed when it passes).
    pub header_read_timeout: Duration,
    /// Time a worker has to start its response (the status line and headers),
    /// counted from when the request body has been sent to it; then 504.
    pub response_header_timeout: Duration,
    /// How long an idle pooled connection to a worker may be reused. Keep it below
    /// the workers' own keep-alive timeout (Node: 5 s) so the proxy closes first.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per worker.
    pub pool_max_idle: usize,
    /// After shutdown is requested: how long in-flight requests and tunnels may
    /// finish before they are cut.
    pub shutdown_grace: Duration,
    /// How long a client may send nothing of a request body the worker is waiting
    /// for; then 408 and the connection closes (nginx `client_body_timeout`).
    pub body_read_timeout: Duration,
    /// How long a client may read nothing of a response (or a tunnel) the proxy is
    /// writing; then the connection closes (nginx `send_timeout`). Either way the
    /// worker's in-flight slot is freed, so a stalled client cannot block a drain.
    pub response_write_timeout: Duration,
    /// Peers whose forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`...)
    /// are believed and appended to; from anyone else they are replaced or removed.
    /// Also exempt from the per-client connection cap (they carry many clients).
    pub trusted_proxies: TrustedProxies,
    /// Upgrade protocols passed through to workers (case-insensitive). Others, such
    /// as `h2c`, are stripped and the request is forwarded as a plain one.
    pub allowed_upgrades: Vec<String>,
    /// Connection caps, shared by every proxy of the daemon.
    pub limiter: Arc<ConnLimiter>,
    /// `listen[].tls`: terminate TLS (and offer HTTP/2) on this listener.
    pub tls: TlsTerminator,
    /// Serve HTTP/1.x (plain or over TLS) with the proxy's own lean path
    /// ([`super::h1`]) rather than hyper (which still serves HTTP/2). On by default;
    /// `CLUSTERD_PROXY_H1=hyper` turns it off (`lean` is the default; other values are
    /// warned about and ignored).
    pub lean_h1: bool,
}

impl Default for HttpProxyConfig {
    fn default() -> Self {
        Self {
            no_backend_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            response_header_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle: 64,
            shutdown_grace: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            response_write_timeout: Duration::from_secs(60),
            trusted_proxies: TrustedProxies::default(),
            allowed_upgrades: vec!["websocket".to_string()],
            limiter: ConnLimiter::global(),
            tls: TlsTerminator::default(),
            lean_h1: true,
        }
    }
}

impl HttpProxyConfig {
    /// These settings with the operator's overrides from the daemon's environment,
    /// each in milliseconds: `CLUSTERD_PROXY_HEADER_TIMEOUT_MS` (slowloris and
    /// keep-alive idle bound), `CLUSTERD_PROXY_NO_BACKEND_WAIT_MS`,
    /// `CLUSTERD_PROXY_RESPONSE_TIMEOUT_MS`, `CLUSTERD_PROXY_BODY_TIMEOUT_MS`,
    /// `CLUSTERD_PROXY_SEND_TIMEOUT_MS`. Connection caps are read by
    /// [`ConnLimiter::global`].
    #[must_use]
    pub fn with_env(mut self) -> Self {
        let ms = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        for (name, field) in [
            (
                "CLUSTERD_PROXY_HEADER_TIMEOUT_MS",
                &mut self.header_read_timeout,
            ),
            (
                "CLUSTERD_PROXY_NO_BACKEND_WAIT_MS",
                &mut self.no_backend_wait,
            ),
            (
                "CLUSTERD_PROXY_RESPONSE_TIMEOUT_MS",
                &mut self.response_header_timeout,
            ),
            (
                "CLUSTERD_PROXY_BODY_TIMEOUT_MS",
                &mut self.body_read_timeout,
            ),
            (
                "CLUSTERD_PROXY_SEND_TIMEOUT_MS",
                &mut self.response_write_timeout,
            ),
        ] {
            if let Some(d) = ms(name) {
                *field = d;
            }
        }
        if let Ok(engine) = std::env::var("CLUSTERD_PROXY_H1") {
            match engine.trim().to_ascii_lowercase().as_str() {
                "hyper" => self.lean_h1 = false,
                "lean" | "" => self.lean_h1 = true,
                other => tracing::warn!(
                    value = other,
                    "CLUSTERD_PROXY_H1: unknown HTTP/1.1 engine, expected `lean` or `hyper`; using `lean`"
                ),
            }
        }
        self
    }
}

/// `listen[].trustedProxies`, shared between the daemon and a running proxy so that a
/// manifest change applies to the next connection without rebinding the socket.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<RwLock<Arc<[Cidr]>>>);

impl TrustedProxies {
    /// A list of ranges.
    #[must_use]
    pub fn new(ranges: Vec<Cidr>) -> Self {
        Self(Arc::new(RwLock::new(ranges.into())))
    }

    /// Replaces the ranges; connections accepted from now on use the new ones.
    pub fn set(&self, ranges: Vec<Cidr>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ranges.into();
    }

    /// Whether `ip` is in one of the ranges (decided once per client connection).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|c| c.contains(ip))
    }
}

/// Attempts per request: connect failures and requests handed back unsent, plus at
/// most one replay of a request a worker may have seen.
pub(super) const MAX_ATTEMPTS: usize = 8;

pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// State shared by every connection of one `serve_http`.
pub(super) struct Ctx {
    pub(super) routes: Arc<RouteTable>,
    pub(super) cfg: HttpProxyConfig,
    /// Cut tunnels when the shutdown grace is over.
    pub(super) hard_stop: Stop,
    /// Retired for a daemon upgrade: responses ask clients to reconnect.
    pub(super) retire: Stop,
    tracker: TaskTracker,
}

/// Serves HTTP/1.1 on `listener`, forwarding each request to a worker in `routes`,
/// until `shutdown` is cancelled. Then it stops accepting, lets open connections
/// finish their current request (idle keep-alive connections close at once), cuts
/// whatever is left after `cfg.shutdown_grace`, and returns.
///
/// Run it inside a span that names the app; every connection task inherits it.
pub async fn serve_http(
    listener: TcpListener,
    routes: Arc<RouteTable>,
    cfg: HttpProxyConfig,
    shutdown: CancellationToken,
) {
    serve_http_retirable(listener, routes, cfg, shutdown, CancellationToken::new()).await;
}

/// [`serve_http`], plus a second way to stop for a daemon upgrade: when `retire` is
/// cancelled the proxy stops accepting (the next daemon accepts on the same socket), and
/// each open connection gets `Connection: close` on its next response instead of being
/// closed while idle, so a keep-alive client never has a request cut by the handover
/// (closing an idle connection races with the request the client is sending). Idle
/// connections end at the keep-alive bound, whatever is left at `cfg.shutdown_grace`.
pub async fn serve_http_retirable(
    listener: TcpListener,
    routes: Arc<RouteTable>,
    cfg: HttpProxyConfig,
    shutdown: CancellationToken,
    retire: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let shutdown = Stop::following(&shutdown);
    let retire = Stop::following(&retire);
    let ctx = Arc::new(Ctx {
        routes,
        cfg,
        hard_stop: Stop::default(),
        retire: retire.clone(),
        tracker: tracker.clone(),
    });
    let mut server = server_http1::Builder::new();
    server
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.cfg.header_read_timeout)
        .max_header_size(ctx.cfg.max_header_bytes)
        .max_buf_size(ctx.cfg.max_header_bytes.max(8192) * 2);
    let front = Front::new(
        server,
        ctx.cfg.max_header_bytes,
        ctx.cfg.header_read_timeout,
    );
    // Dropped (the caller gave up on this future): stop the accept loops and cut the
    // connections on the proxy threads, as dropping a task on the caller's own
    // runtime would have.
    let on_drop = StopOnDrop(vec![
        shutdown.clone(),
        retire.clone(),
        ctx.hard_stop.clone(),
    ]);
    match threads::accept_on_proxy_thread(listener, |listener| {
        accept_loop(listener, Arc::clone(&ctx), front, shutdown, retire)
    }) {
        Ok(accepting) => {
            let _ = accepting.await;
        }
        Err(err) => tracing::error!(cause = %err, "cannot serve on the proxy threads"),
    }
    drain_tasks(&tracker, &ctx.hard_stop, ctx.cfg.shutdown_grace).await;
    // Finished: nothing left to stop; the token followers end with their tokens.
    on_drop.disarm();
}

/// Accepts client connections on one proxy thread until `shutdown` or `retire`.
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    front: Front,
    shutdown: Stop,
    retire: Stop,
) {
    let mut backoff = AcceptBackoff::new("http proxy");
    // The public port, for X-Forwarded-Port: known once rather than asked per connection.
    let listen_addr = listener.local_addr().ok();
    loop {
        let slot = tokio::select! {
            () = shutdown.stopped() => break,
            slot = ctx.cfg.limiter.reserve() => slot,
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.stopped() => break,
            () = retire.stopped() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    backoff.failed(&err).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let trusted = ctx.cfg.trusted_proxies.contains(peer.ip());
        let Some(permit) = ctx.cfg.limiter.admit(slot, peer.ip(), trusted) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tls = ctx.cfg.tls.acceptor();
        // The address the client connected to is the Host of last resort; the lean path
        // asks for it only when a request lacks one (a `getsockname` per connection
        // otherwise, which HAProxy does not make).
        let lean = tls.is_none() && ctx.cfg.lean_h1;
        let local = if lean { None } else { stream.local_addr().ok() };
        let conn_ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        let front = front.clone();
        let client = Arc::new(Client {
            peer,
            local,
            hop: headers::ClientHop::new(peer, local.or(listen_addr), trusted, tls.is_some()),
        });
        threads::spawn_conn(
            &ctx.tracker,
            stream,
            tracing::debug_span!("client", %peer),
            move |stream| async move {
                let ctx = conn_ctx;
                let stream = WriteIdle::new(stream, ctx.cfg.response_write_timeout);
                // Retired: the connection runs on (see serve_http_retirable) until it
                // closes or the grace passes (`hard_stop`).
                // Each path's future is boxed: the task's future stays small, so moving it
                // into its task (several moves per connection) copies a few bytes rather
                // than both paths' largest states (measured: memmove 3 % of the CPU per
                // new connection).
                if lean {
                    tokio::select! {
                        biased;
                        () = ctx.hard_stop.stopped() => tracing::debug!("connection cut at shutdown"),
                        () = Box::pin(h1::serve(stream, &ctx, &client, &shutdown)) => {}
                    }
                } else {
                    let lean_client = Arc::clone(&client);
                    let service = service_fn({
                        let ctx = Arc::clone(&ctx);
                        move |req| {
                            let ctx = Arc::clone(&ctx);
                            let client = Arc::clone(&client);
                            async move {
                                let mut resp = proxy_request(req, &ctx, &client).await;
                                // Retired (daemon upgrade): HTTP/1.1 clients are asked to
                                // reconnect, to the new daemon. hyper drops the header on
                                // HTTP/2.
                                if ctx.retire.is_stopped()
                                    && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                                {
                                    resp.headers_mut().insert(
                                        header::CONNECTION,
                                        HeaderValue::from_static("close"),
                                    );
                                }
                                Ok::<_, Infallible>(resp)
                            }
                        }
                    });
                    let lean_h1 = ctx.cfg.lean_h1.then_some(|tls_stream| {
                        h1::serve(tls_stream, &ctx, &lean_client, &shutdown)
                    });
                    let result = Box::pin(front.serve(
                        stream,
                        tls,
                        service,
                        lean_h1,
                        &shutdown,
                        &ctx.hard_stop,
                    ))
                    .await;
                    if let Err(err) = result {
                        tracing::debug!(cause = %err, "client connection ended with error");
                    }
                }
                drop(permit);
            },
        );
    }
}

/// Waits for `tracker`'s tasks, cutting them after `grace`.
pub(crate) async fn drain_tasks(tracker: &TaskTracker, hard_stop: &Stop, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::info!(
            open = tracker.len(),
            "shutdown grace passed; closing connections"
        );
        hard_stop.stop();
        tracker.wait().await;
    }
}

/// What went wrong with one attempt to send a request.
enum SendFailure {
    /// The request never left: here it is back.
    NotSent(Box<Request<UpstreamBody>>),
    /// The worker did not start a response in time.
    Timeout,
    /// Reading the client's request body failed (the client went away).
    ClientBody(hyper::Error),
    /// Anything else from the worker's side.
    Upstream(hyper::Error),
}

/// Who sent a request: fixed for its client connection.
#[derive(Debug)]
pub(super) struct Client {
    pub(super) peer: SocketAddr,
    /// Known up front for TLS clients; the lean path looks it up when needed.
    pub(super) local: Option<SocketAddr>,
    /// Its forwarding headers, formatted once.
    pub(super) hop: headers::ClientHop,
}

async fn proxy_request(
    mut req: Request<Incoming>,
    ctx: &Ctx,
    client: &Client,
) -> Response<ProxyBody> {
    let Client { peer, local, hop } = client;
    let (peer, local) = (*peer, *local);
    if let Err(reject) = guard::check_request(req.method(), req.uri(), req.version(), req.headers())
    {
        tracing::debug!(status = %reject.status, reason = reject.reason.trim_end(), "request refused");
        return closing(error_response(reject.status, reject.reason));
    }
    let upgrade = guard::allowed_upgrade(req.headers(), &ctx.cfg.allowed_upgrades);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let body_empty = body.is_end_stream();
    // A replay needs nothing from the client beyond the head.
    let replayable = !upgrade && body_empty && method.is_idempotent();

    let mut headers = parts.headers;
    let client_host = headers::host_of(&parts.uri, &headers, local);
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut headers);
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(&mut headers);
    }
    if let (true, Some(to)) = (upgrade, upgrade_to) {
        // The one case where the hop-by-hop handshake must reach the worker.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, to);
    }
    if let Some(host) = &client_host {
        headers.insert(header::HOST, host.clone());
    }
    headers::forwarding(&mut headers, hop, client_host.as_ref());
    let uri = headers::origin_form(&parts.uri);

    // Only a request with a body needs to say when it is done (see `send`).
    let (done_tx, done_rx) = if body_empty {
        (None, None)
    } else {
        let (tx, rx) = watch::channel(false);
        (Some(tx), Some(rx))
    };
    let template = |body: UpstreamBody| {
        let mut r = Request::new(body);
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = headers.clone();
        r
    };
    let mut pending = Some(template(
        RequestBody {
            inner: body,
            done: done_tx,
            idle: Idle::new(ctx.cfg.body_read_timeout),
        }
        .boxed_unsync(),
    ));
    // Set once a worker may have seen the request: it is replayed at most once, and
    // then only on a fresh connection, so a request that crashes workers reaches at
    // most two of them.
    let mut replayed = false;

    let deadline = Instant::now() + ctx.cfg.no_backend_wait;
    let mut failed: Vec<WorkerId> = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let Some(lease) = ctx.routes.acquire(Some(peer.ip()), &failed, deadline).await else {
            return if failed.is_empty() {
                tracing::warn!(%method, "no routable worker");
                error_response(StatusCode::SERVICE_UNAVAILABLE, "no worker available\n")
            } else {
                error_response(StatusCode::BAD_GATEWAY, "no worker reachable\n")
            };
        };
        let backend = Arc::clone(lease.backend());
        let span = tracing::debug_span!("request", worker = %backend.id, %method);
        let pooled = if upgrade || replayed {
            None
        } else {
            backend.pool.take(ctx.cfg.pool_idle_timeout, false)
        };
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                match connect(backend.addr, ctx.cfg.connect_timeout, upgrade).await {
                    Ok(c) => c,
                    Err(err) => {
                        backend.record_error();
                        span.in_scope(|| tracing::warn!(cause = %err, "connect failed; trying another worker"));
                        failed.push(backend.id);
                        continue;
                    }
                }
            }
        };
        if conn.reused
            && !matches!(
                tokio::time::timeout(ctx.cfg.connect_timeout, conn.sender.ready()).await,
                Ok(Ok(()))
            )
        {
            continue;
        }
        let request = match pending.take() {
            Some(r) => r,
            None => template(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
        };
        match send(
            &mut conn,
            request,
            done_rx.clone(),
            ctx.cfg.response_header_timeout,
        )
        .instrument(span.clone())
        .await
        {
            Ok(resp) => {
                return if let (Some(on_client), StatusCode::SWITCHING_PROTOCOLS) =
                    (client_upgrade, resp.status())
                {
                    tunnel(resp, on_client, conn, lease, ctx, span)
                } else {
                    // A connection that carried a body is not reused: a worker that
                    // answered without reading it (CL.0) would take the rest as the
                    // next request, and answer it to another client.
                    relay(resp, conn, lease, ctx, !upgrade && body_empty)
                };
            }
            Err(SendFailure::NotSent(back)) => {
                pending = Some(*back);
            }
            // An idempotent request without a body whose connection closed before any
            // response came may be sent again (RFC 9110 §9.2.2): on a reused connection
            // that is the keep-alive race; on a fresh one the worker is going away, so
            // the replay goes to another worker.
            Err(SendFailure::Upstream(err))
                if replayable
                    && !replayed
                    && (err.is_incomplete_message() || err.is_closed() || err.is_canceled()) =>
            {
                replayed = true;
                if conn.reused {
                    span.in_scope(
                        || tracing::debug!(cause = %err, "stale keep-alive connection; replaying"),
                    );
                } else {
                    backend.record_error();
                    failed.push(backend.id);
                    span.in_scope(
                        || tracing::warn!(cause = %err, "worker closed a fresh connection; replaying on another worker"),
                    );
                }
            }
            Err(SendFailure::Timeout) => {
                backend.record_error();
                span.in_scope(|| tracing::warn!("worker did not respond in time"));
                return error_response(StatusCode::GATEWAY_TIMEOUT, "worker timed out\n");
            }
            Err(SendFailure::ClientBody(err)) => {
                span.in_scope(|| tracing::debug!(cause = %err, "client request body failed"));
                return closing(if has_source::<BodyReadTimeout>(&err) {
                    error_response(StatusCode::REQUEST_TIMEOUT, "request body timed out\n")
                } else {
                    error_response(StatusCode::BAD_REQUEST, "request body incomplete\n")
                });
            }
            Err(SendFailure::Upstream(err)) => {
                backend.record_error();
                span.in_scope(|| tracing::warn!(cause = %err, "worker failed the request"));
                return error_response(StatusCode::BAD_GATEWAY, "bad gateway\n");
            }
        }
    }
    error_response(StatusCode::BAD_GATEWAY, "no worker reachable\n")
}

/// Sends one request, bounding the wait for the response head by `timeout` counted
/// from when the request body is complete (a slow upload is not a slow worker).
async fn send(
    conn: &mut UpstreamConn,
    request: Request<UpstreamBody>,
    body_done: Option<watch::Receiver<bool>>,
    timeout: Duration,
) -> Result<Response<Incoming>, SendFailure> {
    let body_already_done = request.body().is_end_stream();
    let response = conn.sender.try_send_request(request);
    tokio::pin!(response);
    let outcome = if let (false, Some(mut body_done)) = (body_already_done, body_done) {
        let first = tokio::select! {
            r = response.as_mut() => Some(r),
            // The guard `wait_for` returns is not Send: drop it inside the branch.
            _ = async { body_done.wait_for(|done| *done).await.is_ok() } => None,
        };
        match first {
            Some(r) => Ok(r),
            None => tokio::time::timeout(timeout, response).await,
        }
    } else {
        tokio::time::timeout(timeout, response).await
    };
    match outcome {
        Err(_) => Err(SendFailure::Timeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(mut err)) => match err.take_message() {
            Some(req) => Err(SendFailure::NotSent(Box::new(req))),
            None => {
                let err = err.into_error();
                if err.is_user() {
                    Err(SendFailure::ClientBody(err))
                } else {
                    Err(SendFailure::Upstream(err))
                }
            }
        },
    }
}

/// Passes a worker's response to the client, streaming its body, and finishes the
/// request's accounting when the body ends.
fn relay(
    resp: Response<Incoming>,
    conn: UpstreamConn,
    lease: Lease,
    ctx: &Ctx,
    poolable: bool,
) -> Response<ProxyBody> {
    let keep_alive = poolable && response_keeps_alive(&resp);
    let (mut parts, body) = resp.into_parts();
    headers::response(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let body = ResponseBody {
        inner: body,
        finish: Some(Finish {
            conn,
            lease,
            keep_alive,
            pool_max: ctx.cfg.pool_max_idle,
        }),
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// Answers the client's upgrade with the worker's 101 and joins the two upgraded
/// connections in a task that holds the request's lease until either side closes.
fn tunnel(
    mut resp: Response<Incoming>,
    on_client: hyper::upgrade::OnUpgrade,
    conn: UpstreamConn,
    lease: Lease,
    ctx: &Ctx,
    span: tracing::Span,
) -> Response<ProxyBody> {
    let on_upstream = hyper::upgrade::on(&mut resp);
    let hard_stop = ctx.hard_stop.clone();
    ctx.tracker.spawn(
        async move {
            let (client, upstream) = match tokio::join!(on_client, on_upstream) {
                (Ok(c), Ok(u)) => (c, u),
                (c, u) => {
                    tracing::debug!(
                        client_ok = c.is_ok(),
                        upstream_ok = u.is_ok(),
                        "upgrade failed"
                    );
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
                    Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
                    Err(err) => tracing::debug!(cause = %err, "tunnel failed"),
                },
                () = hard_stop.stopped() => tracing::debug!("tunnel cut at shutdown"),
            }
            drop(conn);
            drop(lease);
        }
        .instrument(span),
    );
    let (mut parts, _) = resp.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(u) = upgrade_to {
        parts.headers.insert(header::UPGRADE, u);
    }
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, empty_body())
}

fn empty_body() -> UnsyncBoxBody<Bytes, hyper::Error> {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Asks hyper to close the client connection after this response: after a refused
/// or broken request, what follows on the connection cannot be trusted.
fn closing(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Whether `err` or one of its causes is an `E`.
fn has_source<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

fn error_response(status: StatusCode, msg: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Whether the worker will accept another request on this connection.
fn response_keeps_alive(resp: &Response<Incoming>) -> bool {
    let h = resp.headers();
    match resp.version() {
        Version::HTTP_11 => !headers::connection_has(h, "close"),
        Version::HTTP_10 => {
            headers::connection_has(h, "keep-alive") && !headers::connection_has(h, "close")
        }
        _ => false,
    }
}

/// The client's request body on its way to the worker; flags its own end so that the
/// response-head timer starts only once the upload is done, and fails when the client
/// stalls for the body-read timeout.
struct RequestBody {
    inner: Incoming,
    done: Option<watch::Sender<bool>>,
    idle: Idle,
}

/// A chunked body whose trailer section is present but empty: what hyper makes of a
/// bare LF after the last chunk, which swallows the client's next request as trailers.
#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body: empty trailer section (bare LF after the last chunk)")]
struct EmptyTrailers;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            if self.idle.expired(cx) {
                return Poll::Ready(Some(Err(BodyReadTimeout(self.idle.timeout()).into())));
            }
            return Poll::Pending;
        }
        self.idle.progressed();
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(done) = self.done.take() {
                let _ = done.send(true);
            }
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.trailers_ref().is_some_and(|t| t.is_empty()) {
                return Poll::Ready(Some(Err(EmptyTrailers.into())));
            }
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What completes a request once its response body has been passed on.
struct Finish {
    conn: UpstreamConn,
    lease: Lease,
    keep_alive: bool,
    pool_max: usize,
}

impl Finish {
    /// The whole response went through: the connection may serve another request.
    fn complete(self) {
        let Finish {
            conn,
            lease,
            keep_alive,
            pool_max,
        } = self;
        if keep_alive {
            let backend = Arc::clone(lease.backend());
            backend.pool.put(conn, pool_max, || backend.is_routable());
        }
        // Only now does the request stop counting as in flight.
        drop(lease);
    }
}

/// A worker's response body on its way to the client. Ends the request's accounting
/// when it ends or is dropped (client gone, error): a connection abandoned midway is
/// closed rather than pooled.
struct ResponseBody {
    inner: Incoming,
    finish: Option<Finish>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.complete();
                }
            }
            Poll::Ready(Some(Err(err))) => {
                if let Some(f) = self.finish.take() {
                    f.lease.backend().record_error();
                    tracing::warn!(worker = %f.lease.backend().id, cause = %err, "response body failed");
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            // hyper does not poll a body it knows is empty (HEAD, 204, 304, length 0).
            if self.inner.is_end_stream() {
                f.complete();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    #[test]
    fn method_idempotence_decides_replay() {
        assert!(Method::GET.is_idempotent());
        assert!(!Method::POST.is_idempotent());
    }
}

//! Keep-alive connections from the proxy to one worker.
//!
//! We keep our own small pool per backend instead of hyper-util's `Client` because a
//! drain must close exactly one worker's idle connections at once: a worker that is
//! signalled while the proxy still holds an idle socket to it may close that socket
//! just as the proxy sends a request on it. `stop_routing` empties the pool, and a
//! connection finishing its response on a draining backend is closed, not pooled.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::ProxyError;

/// The body type of requests sent to workers: the client's streamed body, or an empty
/// one when a body-less request is replayed.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// hyper's half of a connection to a worker: the state machine that owns the socket.
type UpstreamIo = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// Who drives the socket of an [`UpstreamConn`].
enum Driver {
    /// Polled by whichever task holds the connection (the client connection's task),
    /// in the same `poll` as the request it serves: no task, channel hop or cross-thread
    /// wake-up between the client side and the worker side of a request, which is what
    /// a spawned connection task costs (pingora drives both sides in one task too).
    /// `None` once hyper finished with it (closed, failed): it has been dropped, which
    /// fails any request still queued on `sender` back to us unsent.
    Inline(Option<Pin<Box<UpstreamIo>>>),
    /// A spawned task, for connections that may be upgraded (hyper hands the socket of
    /// an upgraded connection over only from `with_upgrades`, which then runs to the
    /// end of the tunnel on its own).
    Spawned(AbortHandle),
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Driver::Inline(c) => f.debug_tuple("Inline").field(&c.is_some()).finish(),
            Driver::Spawned(_) => f.write_str("Spawned"),
        }
    }
}

/// One HTTP/1.1 connection to a worker. Dropping it closes the socket at once (the
/// state machine is dropped, or its task aborted), which is what we want for a request
/// abandoned midway or a backend being drained.
///
/// An inline connection makes progress only while it is polled: every await on it goes
/// through [`UpstreamConn::drive`], and the response body polls it
/// ([`UpstreamConn::poll_io`]) before each frame. An idle pooled connection is not
/// polled at all; whatever happened to it meanwhile (the worker closed it) is noticed
/// when it is taken out.
#[derive(Debug)]
pub(crate) struct UpstreamConn {
    pub(crate) sender: http1::SendRequest<UpstreamBody>,
    driver: Driver,
    /// Taken from the pool rather than freshly connected: the worker may have closed
    /// it in the meantime, which is the one failure a replay can fix.
    pub(crate) reused: bool,
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        if let Driver::Spawned(task) = &self.driver {
            task.abort();
        }
    }
}

impl UpstreamConn {
    /// Lets hyper read and write the socket (a no-op for a spawned connection). When
    /// the connection is finished, its state machine is dropped.
    pub(crate) fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Driver::Inline(slot) = &mut self.driver {
            if let Some(io) = slot {
                if let Poll::Ready(result) = io.as_mut().poll(cx) {
                    if let Err(err) = result {
                        tracing::debug!(cause = %err, "upstream connection ended");
                    }
                    *slot = None;
                }
            }
        }
    }

    /// Awaits `fut` (a response, or readiness for the next request) while driving the
    /// connection in the same poll.
    pub(crate) async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            // Socket first: the response it reads completes `fut` in this same poll.
            self.poll_io(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Waits until the connection can take another request (its previous exchange is
    /// over), driving it meanwhile.
    pub(crate) async fn ready(&mut self) -> hyper::Result<()> {
        std::future::poll_fn(|cx| {
            self.poll_io(cx);
            self.sender.poll_ready(cx)
        })
        .await
    }

    /// Whether the connection is known to be unusable. Polls an inline connection once
    /// (without registering interest that matters: the next real poll re-registers) so
    /// that a close by the worker while it sat idle is seen here.
    fn is_closed(&mut self) -> bool {
        self.poll_io(&mut Context::from_waker(std::task::Waker::noop()));
        matches!(self.driver, Driver::Inline(None)) || self.sender.is_closed()
    }
}

/// Opens a connection to `addr` within `timeout`. With `upgrades`, the connection can
/// be handed over to a tunnel after a `101 Switching Protocols`.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    upgrades: bool,
) -> Result<UpstreamConn, ProxyError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
        Err(_) => return Err(ProxyError::ConnectTimeout { addr, timeout }),
    };
    // Latency matters more than packet count on loopback.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProxyError::Handshake { addr, source })?;
    let driver = if upgrades {
        let span = tracing::debug_span!("upstream_conn", %addr);
        let task = tokio::spawn(
            async move {
                if let Err(err) = conn.with_upgrades().await {
                    tracing::debug!(cause = %err, "upstream connection ended");
                }
            }
            .instrument(span),
        );
        Driver::Spawned(task.abort_handle())
    } else {
        Driver::Inline(Some(Box::pin(conn)))
    };
    Ok(UpstreamConn {
        sender,
        driver,
        reused: false,
    })
}

#[derive(Debug)]
struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// Idle connections of one backend, most recently used last.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used live connection not idle longer than `max_idle`.
    /// Reusing the newest one keeps the others ageing out, and the newest is the
    /// least likely to have been closed by the worker's own keep-alive timer.
    pub(crate) fn take(&self, max_idle: Duration) -> Option<UpstreamConn> {
        loop {
            let mut idle = self.lock();
            // Entries are in return order, so everything before the first fresh one is
            // stale.
            let now = Instant::now();
            let fresh_from = idle
                .iter()
                .position(|i| now.duration_since(i.since) < max_idle)
                .unwrap_or(idle.len());
            let stale: Vec<Idle> = idle.drain(..fresh_from).collect();
            let newest = idle.pop();
            drop(idle);
            drop(stale);
            // Looked at outside the lock: it may read the socket.
            let mut conn = newest?.conn;
            if !conn.is_closed() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Returns a connection whose last response completed. `routable` is evaluated
    /// under the pool lock, so a concurrent `close_idle` (from `stop_routing`) cannot
    /// miss a connection put back by a request that finished at the same moment.
    pub(crate) fn put(&self, mut conn: UpstreamConn, max: usize, routable: impl Fn() -> bool) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if routable() && idle.len() < max {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes every idle connection now.
    pub(crate) fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.lock());
        drop(idle);
    }
}

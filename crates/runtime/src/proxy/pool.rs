//! Keep-alive connections from the proxy to one worker.
//!
//! We keep our own small pool per backend instead of hyper-util's `Client` because a
//! drain must close exactly one worker's idle connections at once: a worker that is
//! signalled while the proxy still holds an idle socket to it may close that socket
//! just as the proxy sends a request on it. `stop_routing` empties the pool, and a
//! connection finishing its response on a draining backend is closed, not pooled.

use std::net::SocketAddr;
use std::sync::Mutex;
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

/// An error from a request body: hyper's, or the proxy's own verdict on the client
/// (body-read timeout, malformed chunking).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of requests sent to workers: the client's streamed body, or an empty
/// one when a body-less request is replayed.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// One HTTP/1.1 connection to a worker. Dropping it closes the socket at once (the
/// connection task is aborted), which is what we want for a request abandoned midway
/// or a backend being drained.
#[derive(Debug)]
pub(crate) struct UpstreamConn {
    pub(crate) sender: http1::SendRequest<UpstreamBody>,
    task: AbortHandle,
    /// Taken from the pool rather than freshly connected: the worker may have closed
    /// it in the meantime, which is the one failure a replay can fix.
    pub(crate) reused: bool,
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        self.task.abort();
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
    let span = tracing::debug_span!("upstream_conn", %addr);
    let task = if upgrades {
        tokio::spawn(
            async move {
                if let Err(err) = conn.with_upgrades().await {
                    tracing::debug!(cause = %err, "upstream connection ended");
                }
            }
            .instrument(span),
        )
    } else {
        tokio::spawn(
            async move {
                if let Err(err) = conn.await {
                    tracing::debug!(cause = %err, "upstream connection ended");
                }
            }
            .instrument(span),
        )
    };
    Ok(UpstreamConn {
        sender,
        task: task.abort_handle(),
        reused: false,
    })
}

/// A connection that can wait in a [`Pool`].
pub(crate) trait Pooled {
    /// Whether the worker has closed it (or sent something unasked). With `strict`,
    /// look even when the reactor has not reported the socket readable: for a request
    /// that cannot be replayed, a syscall is cheaper than a lost request.
    fn is_closed(&self, strict: bool) -> bool;
    /// Marks it as taken from the pool.
    fn set_reused(&mut self);
}

impl Pooled for UpstreamConn {
    fn is_closed(&self, _strict: bool) -> bool {
        self.sender.is_closed()
    }

    fn set_reused(&mut self) {
        self.reused = true;
    }
}

/// An idle connection of the lean HTTP/1.1 path ([`super::h1`]): just the socket,
/// since the connection task that uses it owns both sides.
#[derive(Debug)]
pub(crate) struct RawConn(pub(crate) TcpStream);

impl Pooled for RawConn {
    fn is_closed(&self, strict: bool) -> bool {
        if !strict {
            // No readiness reported since the last read: nothing (no FIN) arrived.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if self.0.poll_read_ready(&mut cx).is_pending() {
                return false;
            }
        }
        let mut byte = [0u8; 1];
        !matches!(self.0.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    fn set_reused(&mut self) {}
}

#[derive(Debug)]
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Idle connections of one backend, most recently used last, one list per proxy
/// thread ([`super::threads`]): a connection's hyper task runs on the thread that
/// opened it, so a request must only reuse connections of its own thread, or every
/// exchange would hop between threads. A slot's lock is only ever contended by a
/// drain (`close_idle`), never by another thread's requests.
#[derive(Debug)]
pub(crate) struct Pool<C = UpstreamConn> {
    slots: Box<[Mutex<Vec<Idle<C>>>]>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            slots: (0..super::threads::slots().max(1))
                .map(|_| Mutex::default())
                .collect(),
        }
    }
}

impl<C: Pooled> Pool<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<C>>> {
        let slot = super::threads::current() % self.slots.len();
        Self::lock_slot(&self.slots[slot])
    }

    fn lock_slot(slot: &Mutex<Vec<Idle<C>>>) -> std::sync::MutexGuard<'_, Vec<Idle<C>>> {
        slot.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used live connection not idle longer than `max_idle`.
    /// Reusing the newest one keeps the others ageing out, and the newest is the
    /// least likely to have been closed by the worker's own keep-alive timer.
    pub(crate) fn take(&self, max_idle: Duration, strict: bool) -> Option<C> {
        let mut idle = self.lock();
        // Entries are in return order, so everything before the first fresh one is stale.
        let now = Instant::now();
        let fresh_from = idle
            .iter()
            .position(|i| now.duration_since(i.since) < max_idle)
            .unwrap_or(idle.len());
        let stale: Vec<Idle<C>> = idle.drain(..fresh_from).collect();
        let mut found = None;
        while let Some(i) = idle.pop() {
            if !i.conn.is_closed(strict) {
                found = Some(i.conn);
                break;
            }
        }
        drop(idle);
        drop(stale);
        found.map(|mut c| {
            c.set_reused();
            c
        })
    }

    /// Returns a connection whose last response completed. `routable` is evaluated
    /// under the pool lock, so a concurrent `close_idle` (from `stop_routing`) cannot
    /// miss a connection put back by a request that finished at the same moment.
    pub(crate) fn put(&self, conn: C, max: usize, routable: impl Fn() -> bool) {
        if conn.is_closed(false) {
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

    /// Closes every idle connection now, on every thread.
    pub(crate) fn close_idle(&self) {
        for slot in &self.slots {
            let idle = std::mem::take(&mut *Self::lock_slot(slot));
            drop(idle);
        }
    }
}

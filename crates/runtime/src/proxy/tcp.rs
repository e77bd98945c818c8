//! `tcp` mode: an L4 proxy on the public socket that assigns each *connection* to the
//! routable worker with the fewest open connections.
//!
//! A connection counts against its worker until both directions have closed, so a
//! drain waits for long-lived connections (up to the daemon's shutdown timeout).
//! Half-close is passed through: when one side shuts down its write half, the other
//! side's write half is shut down and the opposite direction keeps flowing
//! (`copy_bidirectional` does exactly this).

use std::sync::Arc;
use std::time::Duration;

use clusterd_core::plan::WorkerId;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::drain_tasks;
use super::routes::RouteTable;
use super::stop::{Stop, StopOnDrop};
use super::threads;
use crate::accept::{AcceptBackoff, ConnLimiter};

/// Bounds of the tcp proxy.
#[derive(Debug, Clone)]
pub struct TcpProxyConfig {
    /// How long a new connection waits for a routable worker before it is closed.
    pub no_backend_wait: Duration,
    /// Bound on connecting to a worker's private port.
    pub connect_timeout: Duration,
    /// After shutdown is requested: how long open connections may continue before
    /// they are cut.
    pub shutdown_grace: Duration,
    /// Connection caps, shared by every proxy of the daemon.
    pub limiter: Arc<ConnLimiter>,
}

impl Default for TcpProxyConfig {
    fn default() -> Self {
        Self {
            no_backend_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            limiter: ConnLimiter::global(),
        }
    }
}

/// Serves `listener`, joining each accepted connection to a worker in `routes`, until
/// `shutdown` is cancelled. Then it stops accepting, lets open connections run for up
/// to `cfg.shutdown_grace`, cuts the rest, and returns.
///
/// Run it inside a span that names the app; every connection task inherits it.
pub async fn serve_tcp(
    listener: TcpListener,
    routes: Arc<RouteTable>,
    cfg: TcpProxyConfig,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let hard_stop = Stop::default();
    let cfg = Arc::new(cfg);
    // Dropped (the caller gave up on this future): stop the accept loops and cut the
    // connections on the proxy threads.
    let shutdown = Stop::following(&shutdown);
    let on_drop = StopOnDrop(vec![shutdown.clone(), hard_stop.clone()]);
    match threads::accept_on_proxy_thread(listener, |listener| {
        accept_loop(
            listener,
            Arc::clone(&routes),
            Arc::clone(&cfg),
            tracker.clone(),
            hard_stop.clone(),
            shutdown,
        )
    }) {
        Ok(accepting) => {
            let _ = accepting.await;
        }
        Err(err) => tracing::error!(cause = %err, "cannot serve on the proxy threads"),
    }
    drain_tasks(&tracker, &hard_stop, cfg.shutdown_grace).await;
    on_drop.disarm();
}

/// Accepts client connections on one proxy thread until `shutdown`.
async fn accept_loop(
    listener: TcpListener,
    routes: Arc<RouteTable>,
    cfg: Arc<TcpProxyConfig>,
    tracker: TaskTracker,
    hard_stop: Stop,
    shutdown: Stop,
) {
    let mut backoff = AcceptBackoff::new("tcp proxy");
    loop {
        let slot = tokio::select! {
            () = shutdown.stopped() => break,
            slot = cfg.limiter.reserve() => slot,
        };
        let (client, peer) = tokio::select! {
            () = shutdown.stopped() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    backoff.failed(&err).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Some(permit) = cfg.limiter.admit(slot, peer.ip(), false) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let routes = Arc::clone(&routes);
        let cfg = Arc::clone(&cfg);
        let hard_stop = hard_stop.clone();
        threads::spawn_conn(
            &tracker,
            client,
            tracing::debug_span!("client", %peer),
            move |client| async move {
                tokio::select! {
                    () = forward(client, peer.ip(), &routes, &cfg) => {}
                    () = hard_stop.stopped() => tracing::debug!("connection cut at shutdown"),
                }
                drop(permit);
            },
        );
    }
}

async fn forward(
    mut client: TcpStream,
    peer: std::net::IpAddr,
    routes: &RouteTable,
    cfg: &TcpProxyConfig,
) {
    let deadline = Instant::now() + cfg.no_backend_wait;
    let mut failed: Vec<WorkerId> = Vec::new();
    let (lease, mut upstream) = loop {
        let Some(lease) = routes.acquire(Some(peer), &failed, deadline).await else {
            tracing::warn!(tried = failed.len(), "no worker for connection; closing it");
            return;
        };
        let backend = lease.backend();
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => break (lease, s),
            Ok(Err(err)) => {
                tracing::warn!(worker = %backend.id, cause = %err, "connect failed; trying another worker");
            }
            Err(_) => {
                tracing::warn!(worker = %backend.id, "connect timed out; trying another worker")
            }
        }
        backend.record_error();
        failed.push(backend.id);
    };
    let _ = upstream.set_nodelay(true);
    let worker = lease.backend().id;
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(%worker, up, down, "connection closed"),
        Err(err) => tracing::debug!(%worker, cause = %err, "connection failed"),
    }
    drop(lease);
}

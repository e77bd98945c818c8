//! The route table: which workers of one app may receive traffic, and how much they
//! are serving right now.
//!
//! The reconcile loop writes it (`add`, `stop_routing`, `remove`) and waits on it
//! (`drained`); the proxy tasks read it on every request (http) or connection (tcp).
//! One short `std::sync::Mutex` guards the set of backends; per-backend counters are
//! atomics so that finishing a request never takes the table lock.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use clusterd_core::plan::WorkerId;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::pool::{Pool, RawConn};

/// Per-backend numbers for `clusterd status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendStats {
    /// The worker behind this backend.
    pub id: WorkerId,
    /// Its private address (127.0.0.1:PORT).
    pub addr: SocketAddr,
    /// Whether new requests/connections may be sent to it (false while draining).
    pub routable: bool,
    /// Requests (http) or connections (tcp) assigned to it and not yet finished.
    pub inflight: u64,
    /// Requests or connections ever assigned to it.
    pub total: u64,
    /// Failures attributed to it: connect errors, garbage responses, timeouts.
    pub errors: u64,
}

/// One worker as seen by the proxy.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) id: WorkerId,
    pub(crate) addr: SocketAddr,
    /// Written under the table lock (so that `pick` and `stop_routing` are ordered),
    /// read without it by the pool.
    routable: AtomicBool,
    inflight: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
    /// Woken whenever `inflight` drops to zero.
    idle: Notify,
    /// Idle keep-alive connections (http mode only): hyper's, for TLS clients...
    pub(crate) pool: Pool,
    /// ...and plain sockets, for the lean HTTP/1.1 path.
    pub(crate) raw: Pool<RawConn>,
}

impl Backend {
    pub(crate) fn is_routable(&self) -> bool {
        self.routable.load(Ordering::Acquire)
    }

    /// Counts a failure against this backend (shown in `snapshot`).
    pub(crate) fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            id: self.id,
            addr: self.addr,
            routable: self.is_routable(),
            inflight: self.inflight.load(Ordering::Acquire),
            total: self.total.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A unit of work assigned to a backend: while it lives, the backend's `inflight`
/// count includes it. Dropping it is the only way to finish the work, so a request
/// that fails, is cancelled or whose client vanishes is still accounted for.
#[derive(Debug)]
pub(crate) struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.backend.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.backend.idle.notify_waiters();
        }
    }
}

/// The rendezvous score of `worker` for `client`. SipHash with fixed keys: the same
/// on every run, so a daemon restart keeps clients where they were.
fn affinity_score(client: IpAddr, worker: WorkerId) -> u64 {
    #[allow(deprecated)] // SipHasher is the one std hasher with fixed, stable keys.
    let mut h = std::hash::SipHasher::new_with_keys(0x636c_7573_7465_7264, 0x6166_6669_6e69_7479);
    client.to_canonical().hash(&mut h);
    worker.0.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct Inner {
    backends: BTreeMap<WorkerId, Arc<Backend>>,
    /// Rotating start index of the least-loaded search, so that ties go round-robin.
    cursor: usize,
}

/// The backends of one app, shared (`Arc`) between the reconcile loop and the proxy.
///
/// # Guarantees
/// - After `stop_routing(id)` or `remove(id)` returns, no new request or connection is
///   assigned to `id`; work assigned before keeps running and keeps counting in
///   `inflight(id)` until it finishes.
/// - `drained(id)` resolves only when `inflight(id)` is 0 (or `id` is unknown).
#[derive(Debug, Default)]
pub struct RouteTable {
    inner: Mutex<Inner>,
    /// `listen[].affinity: clientIP`: a client address keeps its worker.
    affinity: AtomicBool,
    /// Woken when a backend becomes routable, for requests waiting for one.
    routable_added: Notify,
}

impl RouteTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only counters and a map behind,
        // which are still consistent enough to keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A ready worker: starts receiving traffic. Adding a known id again makes it
    /// routable again (undoing `stop_routing`) and updates its address.
    pub fn add(&self, id: WorkerId, addr: SocketAddr) {
        {
            let mut inner = self.lock();
            match inner.backends.get(&id) {
                Some(b) if b.addr == addr => b.routable.store(true, Ordering::Release),
                _ => {
                    let backend = Arc::new(Backend {
                        id,
                        addr,
                        routable: AtomicBool::new(true),
                        inflight: AtomicU64::new(0),
                        total: AtomicU64::new(0),
                        errors: AtomicU64::new(0),
                        idle: Notify::new(),
                        pool: Pool::default(),
                        raw: Pool::default(),
                    });
                    if let Some(old) = inner.backends.insert(id, backend) {
                        old.routable.store(false, Ordering::Release);
                        old.pool.close_idle();
                        old.raw.close_idle();
                    }
                }
            }
        }
        tracing::debug!(worker = %id, %addr, "backend routable");
        self.routable_added.notify_waiters();
    }

    /// Draining: the worker gets no new requests or connections, and its idle pooled
    /// connections are closed now (so that the worker sees no open idle sockets when
    /// it is signalled). Work in flight continues.
    pub fn stop_routing(&self, id: WorkerId) {
        let backend = {
            let inner = self.lock();
            let Some(b) = inner.backends.get(&id) else {
                return;
            };
            b.routable.store(false, Ordering::Release);
            Arc::clone(b)
        };
        backend.pool.close_idle();
        backend.raw.close_idle();
        tracing::debug!(worker = %id, inflight = backend.inflight.load(Ordering::Acquire), "backend draining");
    }

    /// The worker is gone: forget it. Work still in flight holds its own reference
    /// and finishes (or fails) on its own.
    pub fn remove(&self, id: WorkerId) {
        let removed = self.lock().backends.remove(&id);
        if let Some(b) = removed {
            b.routable.store(false, Ordering::Release);
            b.pool.close_idle();
            b.raw.close_idle();
            tracing::debug!(worker = %id, "backend removed");
        }
    }

    /// Turns sticky sessions (`affinity: clientIP`) on or off, for work assigned from
    /// now on.
    pub fn set_affinity(&self, client_ip: bool) {
        self.affinity.store(client_ip, Ordering::Relaxed);
    }

    /// Requests (http) or connections (tcp) in flight on `id`; 0 if unknown.
    #[must_use]
    pub fn inflight(&self, id: WorkerId) -> u64 {
        self.lock()
            .backends
            .get(&id)
            .map_or(0, |b| b.inflight.load(Ordering::Acquire))
    }

    /// Resolves once `id` has nothing in flight (at once if it is unknown). The daemon
    /// calls this after `stop_routing` and signals the worker when it resolves, under
    /// its own shutdown timeout.
    pub async fn drained(&self, id: WorkerId) {
        let Some(backend) = self.lock().backends.get(&id).cloned() else {
            return;
        };
        loop {
            let notified = backend.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a drop to zero in between is not missed.
            notified.as_mut().enable();
            if backend.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Every backend's numbers, ordered by worker id.
    #[must_use]
    pub fn snapshot(&self) -> Vec<BackendStats> {
        self.lock().backends.values().map(|b| b.stats()).collect()
    }

    /// Assigns one unit of work from `client` to a routable backend not in `exclude`,
    /// counting it in flight before the lock is released so that concurrent picks see
    /// each other.
    ///
    /// Without affinity: the least-loaded backend (ties go round-robin). With
    /// affinity: the backend that ranks highest for this client by rendezvous
    /// (highest-random-weight) hashing. Each (client, worker) pair has a fixed score, so
    /// a client stays on its worker while that worker is routable, and a change in
    /// the set moves only the clients whose top worker left or arrived.
    pub(crate) fn pick(&self, client: Option<IpAddr>, exclude: &[WorkerId]) -> Option<Lease> {
        let mut inner = self.lock();
        let n = inner.backends.len();
        if n == 0 {
            return None;
        }
        let candidates = || {
            inner
                .backends
                .values()
                .filter(|b| b.is_routable() && !exclude.contains(&b.id))
        };
        let mut best: Option<(&Arc<Backend>, u64)> = None;
        match client {
            Some(ip) if self.affinity.load(Ordering::Relaxed) => {
                best = candidates()
                    .map(|b| (b, affinity_score(ip, b.id)))
                    .max_by_key(|&(_, score)| score);
            }
            _ => {
                let start = inner.cursor % n;
                for b in inner
                    .backends
                    .values()
                    .cycle()
                    .skip(start)
                    .take(n)
                    .filter(|b| b.is_routable() && !exclude.contains(&b.id))
                {
                    let load = b.inflight.load(Ordering::Acquire);
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((b, load));
                    }
                }
            }
        }
        let backend = Arc::clone(best?.0);
        // Inside the lock: once `stop_routing` has returned, no pick that saw the
        // backend as routable can still be about to raise its count.
        backend.inflight.fetch_add(1, Ordering::AcqRel);
        backend.total.fetch_add(1, Ordering::Relaxed);
        inner.cursor = inner.cursor.wrapping_add(1);
        drop(inner);
        Some(Lease { backend })
    }

    /// Like `pick`, but if nothing is routable, waits until `deadline` for a backend
    /// to appear: during a rollout or restart there can be a moment with no ready
    /// worker, and a short wait beats an error.
    pub(crate) async fn acquire(
        &self,
        client: Option<IpAddr>,
        exclude: &[WorkerId],
        deadline: Instant,
    ) -> Option<Lease> {
        loop {
            let notified = self.routable_added.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.pick(client, exclude) {
                return Some(lease);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use clusterd_core::plan::WorkerId;

    use super::RouteTable;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn clients() -> Vec<IpAddr> {
        (0..400u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919)))
            .collect()
    }

    /// Where each client goes now (leases dropped at once).
    fn placement(t: &RouteTable) -> BTreeMap<IpAddr, WorkerId> {
        clients()
            .into_iter()
            .map(|ip| (ip, t.pick(Some(ip), &[]).unwrap().backend().id))
            .collect()
    }

    #[test]
    fn affinity_keeps_clients_and_moves_only_those_of_changed_workers() {
        let t = RouteTable::new();
        t.set_affinity(true);
        for i in 1..=4 {
            t.add(WorkerId(i), addr(1000 + i as u16));
        }
        let before = placement(&t);
        assert_eq!(placement(&t), before, "same client, same worker");
        // Every worker gets a share (400 clients over 4 workers).
        for i in 1..=4 {
            let n = before.values().filter(|w| **w == WorkerId(i)).count();
            assert!(n > 40, "worker {i} got only {n} of 400 clients");
        }

        // A draining worker's clients move; nobody else does.
        t.stop_routing(WorkerId(2));
        let drained = placement(&t);
        for (ip, w) in &before {
            if *w == WorkerId(2) {
                assert_ne!(drained[ip], WorkerId(2));
            } else {
                assert_eq!(drained[ip], *w, "{ip} moved though its worker stayed");
            }
        }

        // A new worker takes clients only for itself; nobody else moves.
        t.add(WorkerId(5), addr(1005));
        let scaled = placement(&t);
        let mut gained = 0;
        for (ip, w) in &drained {
            if scaled[ip] != *w {
                assert_eq!(
                    scaled[ip],
                    WorkerId(5),
                    "{ip} moved to a worker that did not change"
                );
                gained += 1;
            }
        }
        assert!(gained > 0);

        // An excluded (unreachable) worker sends the client to its next choice.
        let ip = clients()[0];
        let first = scaled[&ip];
        let next = t.pick(Some(ip), &[first]).unwrap().backend().id;
        assert_ne!(next, first);
        assert_eq!(t.pick(Some(ip), &[first]).unwrap().backend().id, next);
    }

    #[test]
    fn without_affinity_the_least_loaded_worker_wins() {
        let t = RouteTable::new();
        t.add(WorkerId(1), addr(1001));
        t.add(WorkerId(2), addr(1002));
        let ip = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let a = t.pick(ip, &[]).unwrap();
        let b = t.pick(ip, &[]).unwrap();
        assert_ne!(a.backend().id, b.backend().id, "busy worker skipped");
    }
}

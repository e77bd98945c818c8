//! Staying alive when connections pile up: accept-error backoff, connection caps below
//! the file-descriptor limit, and the daemon's own `RLIMIT_NOFILE`.
//!
//! At the fd limit `accept` fails with `EMFILE` while the connection stays queued, so a
//! loop that retries at once spins: one core at 100 %, a warning per iteration, and the
//! daemon's own work (spawning workers, the control socket) starved of fds. Three
//! defences, as HAProxy (`maxconn`) and nginx (`worker_connections`) have:
//! - [`AcceptBackoff`]: every accept loop pauses after an error, doubling up to 1 s, and
//!   logs at most once a second.
//! - [`ConnLimiter`]: a daemon-wide cap on proxied connections, set below the fd limit
//!   with a reserve for the daemon itself, and a per-client-address cap so one address
//!   cannot take them all. At the global cap the proxies stop accepting (connections
//!   wait in the kernel's backlog, like HAProxy at `maxconn`); over the per-address cap
//!   a connection is closed at once.
//! - [`raise_nofile_limit`]: the daemon raises its soft limit to the hard one at start
//!   (workers get the original soft limit back, see [`original_nofile_soft`]).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// First pause after an accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while errors continue.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one accept-error log line per this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Paces one accept loop through errors. Call [`failed`](Self::failed) on each error
/// (it sleeps) and [`succeeded`](Self::succeeded) on each accepted connection.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    unlogged: u64,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    /// `what` names the socket in logs ("proxy", "control socket").
    #[must_use]
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            delay: Duration::ZERO,
            unlogged: 0,
            last_log: None,
        }
    }

    /// The pause the next error will cause.
    #[must_use]
    pub fn next_delay(&self) -> Duration {
        (self.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
    }

    /// Logs (rate-limited) and sleeps after an accept error.
    pub async fn failed(&mut self, err: &io::Error) {
        self.delay = self.next_delay();
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            let fd_exhausted = matches!(
                err.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            );
            tracing::warn!(
                socket = self.what,
                cause = %err,
                errors = self.unlogged,
                pause_ms = u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
                fd_exhausted,
                "accept failed; pausing before the next attempt"
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        tokio::time::sleep(self.delay).await;
    }

    /// A connection was accepted: errors are over.
    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// The daemon's soft `RLIMIT_NOFILE` before [`raise_nofile_limit`] raised it.
static ORIGINAL_NOFILE_SOFT: OnceLock<u64> = OnceLock::new();

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, as nginx and HAProxy
/// do: the default soft limit (often 1024) is a few hundred proxied connections. The
/// daemon calls it once at start, before anything reads [`ConnLimiter::global`].
/// Returns `(old soft, new soft)`.
///
/// # Errors
/// The limit cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let _ = ORIGINAL_NOFILE_SOFT.set(soft);
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
        tracing::debug!(from = soft, to = hard, "raised RLIMIT_NOFILE");
    }
    Ok((soft, hard))
}

/// The soft `RLIMIT_NOFILE` the daemon started with, if [`raise_nofile_limit`] changed
/// it. Workers get it back (unless their manifest sets `limits.nofile`): a program
/// using `select()` breaks on fds above 1024, which is why 1024 is the usual default.
#[must_use]
pub fn original_nofile_soft() -> Option<u64> {
    let now = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    ORIGINAL_NOFILE_SOFT
        .get()
        .copied()
        .filter(|orig| Some(*orig) != now)
}

/// Caps on proxied connections, shared by every proxy of the daemon.
#[derive(Debug)]
pub struct ConnLimiter {
    total: Arc<Semaphore>,
    max_total: usize,
    per_client: usize,
    clients: Mutex<HashMap<IpAddr, usize>>,
    last_full_log: Mutex<Option<Instant>>,
}

impl ConnLimiter {
    /// At most `max_total` connections in all (at least 1), and at most `per_client`
    /// from one client address (at least 1).
    #[must_use]
    pub fn new(max_total: usize, per_client: usize) -> Arc<Self> {
        let max_total = max_total.max(1);
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_client: per_client.max(1),
            clients: Mutex::new(HashMap::new()),
            last_full_log: Mutex::new(None),
        })
    }

    /// Caps derived from an fd limit: each proxied connection holds two fds (client and
    /// worker side); a reserve of an eighth (at least 64) stays for the daemon's own
    /// work, pooled connections, listeners, logs and spawns. At most 32,768 in all, so
    /// memory rather than fds is not the next thing to run out. One address may hold an
    /// eighth of the total (at least 16).
    #[must_use]
    pub fn caps_for_nofile(nofile: u64) -> (usize, usize) {
        let reserve = (nofile / 8).max(64);
        let total = usize::try_from(nofile.saturating_sub(reserve) / 2)
            .unwrap_or(usize::MAX)
            .clamp(1, 32_768);
        (total, (total / 8).max(16).min(total))
    }

    /// The daemon-wide limiter: caps from the current soft `RLIMIT_NOFILE` (read on
    /// first use), overridden by `CLUSTERD_PROXY_MAX_CONNECTIONS` and
    /// `CLUSTERD_PROXY_MAX_CONNECTIONS_PER_CLIENT`.
    #[must_use]
    pub fn global() -> Arc<Self> {
        static GLOBAL: OnceLock<Arc<ConnLimiter>> = OnceLock::new();
        Arc::clone(GLOBAL.get_or_init(|| {
            let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft);
            let (mut total, mut per_client) = Self::caps_for_nofile(nofile);
            let env = |name: &str| {
                std::env::var(name)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
            };
            if let Some(n) = env("CLUSTERD_PROXY_MAX_CONNECTIONS") {
                total = n;
            }
            if let Some(n) = env("CLUSTERD_PROXY_MAX_CONNECTIONS_PER_CLIENT") {
                per_client = n;
            }
            tracing::debug!(nofile, total, per_client, "proxy connection caps");
            Self::new(total, per_client)
        }))
    }

    /// The cap on connections in all.
    #[must_use]
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Waits for room under the global cap. Called before `accept`, so that at the cap
    /// new connections wait in the kernel's backlog instead of using fds.
    pub async fn reserve(&self) -> OwnedSemaphorePermit {
        if self.total.available_permits() == 0 {
            let mut last = self
                .last_full_log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                tracing::warn!(
                    max = self.max_total,
                    "proxy connection cap reached; new connections wait in the backlog"
                );
                *last = Some(now);
            }
        }
        // The semaphore is never closed.
        Arc::clone(&self.total)
            .acquire_owned()
            .await
            .expect("connection semaphore is never closed")
    }

    /// Admits a connection from `ip` into the `slot` [`reserve`](Self::reserve) gave,
    /// unless `ip` already holds its share. `exempt` (a trusted proxy, which carries
    /// many clients) skips the per-address cap.
    #[must_use]
    pub fn admit(
        self: &Arc<Self>,
        slot: OwnedSemaphorePermit,
        ip: IpAddr,
        exempt: bool,
    ) -> Option<ConnPermit> {
        let ip = ip.to_canonical();
        if !exempt {
            let mut clients = self.lock();
            let n = clients.entry(ip).or_insert(0);
            if *n >= self.per_client {
                drop(clients);
                tracing::debug!(%ip, cap = self.per_client, "per-client connection cap reached; closing");
                return None;
            }
            *n += 1;
        }
        Some(ConnPermit {
            _slot: slot,
            limiter: Arc::clone(self),
            ip: (!exempt).then_some(ip),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections currently held by `ip` (for tests and status).
    #[must_use]
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    _slot: OwnedSemaphorePermit,
    limiter: Arc<ConnLimiter>,
    ip: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut clients = self.limiter.lock();
            if let Some(n) = clients.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    clients.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_doubling_to_a_second_and_reset() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let before = Instant::now();
            b.failed(&emfile).await;
            pauses.push(Instant::now().duration_since(before).as_millis());
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
        // A per-connection error pauses too (the minimum), so no loop can spin.
        let before = Instant::now();
        b.failed(&io::Error::from_raw_os_error(libc::ECONNABORTED))
            .await;
        assert_eq!(Instant::now().duration_since(before), BACKOFF_MIN);
    }

    #[test]
    fn caps_leave_a_reserve_below_the_fd_limit() {
        assert_eq!(ConnLimiter::caps_for_nofile(1024), (448, 56));
        assert_eq!(ConnLimiter::caps_for_nofile(256), (96, 16));
        assert_eq!(ConnLimiter::caps_for_nofile(10), (1, 1));
        assert_eq!(ConnLimiter::caps_for_nofile(1 << 20), (32_768, 4096));
        for n in [64, 100, 1024, 4096, 65_536] {
            let (total, per) = ConnLimiter::caps_for_nofile(n);
            assert!((total as u64) * 2 < n, "{n}");
            assert!(per <= total);
        }
    }

    #[tokio::test]
    async fn per_client_cap_counts_and_frees() {
        let l = ConnLimiter::new(10, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let p1 = l.admit(l.reserve().await, a, false).unwrap();
        let _p2 = l.admit(l.reserve().await, a, false).unwrap();
        assert!(l.admit(l.reserve().await, a, false).is_none());
        assert!(l.admit(l.reserve().await, a, true).is_some(), "exempt");
        let _b1 = l.admit(l.reserve().await, b, false).unwrap();
        assert_eq!(l.held_by("192.0.2.2".parse().unwrap()), 1);
        drop(p1);
        assert_eq!(l.held_by(a), 1);
        assert!(l.admit(l.reserve().await, a, false).is_some());
    }

    #[tokio::test]
    async fn global_cap_waits_for_a_free_place() {
        let l = ConnLimiter::new(1, 5);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held = l.admit(l.reserve().await, ip, false).unwrap();
        let waiting = tokio::spawn({
            let l = Arc::clone(&l);
            async move { l.reserve().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        let _slot = waiting.await.unwrap();
    }

    #[test]
    fn raising_nofile_keeps_the_original_for_workers() {
        let (old, new) = raise_nofile_limit().unwrap();
        assert!(new >= old);
        if new > old {
            assert_eq!(original_nofile_soft(), Some(old));
        } else {
            assert_eq!(original_nofile_soft(), None);
        }
    }
}

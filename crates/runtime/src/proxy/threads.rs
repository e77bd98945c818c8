//! The proxy's own threads: one single-threaded tokio runtime per CPU, each accepting
//! from the same listening socket and keeping every connection it accepts.
//!
//! Why not the daemon's multi-threaded runtime: profiles of the http proxy under
//! keep-alive load (docs/performance.md) spent ~16 % of the daemon's samples in
//! context switches against HAProxy's ~5 %: tokio's work-stealing workers park and
//! unpark each other on a futex, a request's task and its worker connection's task
//! run on different threads, and both wake through the shared injection queue. Here a
//! client connection, the worker connections it uses (the pool is per thread, see
//! [`current`]) and every timer they arm live on one thread that sleeps only in
//! `epoll_wait`, the way HAProxy's and nginx's event loops do.
//!
//! A listener is accepted from on one of the threads (listeners are spread over them),
//! which places each new connection on the thread with the fewest open connections,
//! itself on a tie. Accepting on every thread instead (each registering the socket in
//! its own epoll) measured ~6 µs more CPU per new connection on 2 CPUs: the kernel wakes
//! every thread for every connection and all but one find nothing to accept. Handing a
//! connection over costs two `epoll_ctl` calls and a wake-up of a thread that would
//! have to wake for the connection's first request anyway.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Handles of the proxy threads' runtimes, started on first use.
#[derive(Debug)]
pub struct ProxyThreads {
    handles: Vec<Handle>,
    /// Open client connections per thread, for placing new ones.
    open: Vec<AtomicUsize>,
    /// Where the next listener's accept loop goes.
    next_listener: AtomicUsize,
}

thread_local! {
    /// The index of the proxy thread this is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

static GLOBAL: OnceLock<ProxyThreads> = OnceLock::new();

/// Default thread count: `CLUSTERD_PROXY_THREADS`, else one per usable CPU (at most 16).
fn default_count() -> usize {
    std::env::var("CLUSTERD_PROXY_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(16)
        })
}

/// Never ends; wakes once a second, to keep the thread's timer wheel from ever being
/// empty. Every request arms a timer (the header, response or body bound, 30-60 s), and
/// tokio wakes its driver through an eventfd `write` whenever a timer is armed while no
/// earlier one is pending: on a proxy thread between connections that was nearly every
/// new connection (strace: one `write` per connection). With a timer always due within
/// the second, a 30-60 s bound never is the earliest, and arming it costs no syscall.
async fn tick_forever() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl ProxyThreads {
    /// The process's proxy threads. Started on first call; they live as long as the
    /// process (an idle current-thread runtime costs nothing but its stack).
    ///
    /// # Panics
    /// If the OS refuses to create a thread or an epoll instance at start-up, which
    /// leaves the daemon unable to serve any proxied listener.
    pub fn global() -> &'static Self {
        GLOBAL.get_or_init(|| Self::start(default_count()).expect("starting the proxy threads"))
    }

    fn start(count: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(err) => {
                            let _ = tx.send(Err(err));
                            return;
                        }
                    };
                    INDEX.with(|i| i.set(Some(index)));
                    let _ = tx.send(Ok(rt.handle().clone()));
                    // Runs the tasks spawned on this runtime, for ever.
                    rt.block_on(tick_forever());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("proxy thread exited at start"))??;
            handles.push(handle);
        }
        Ok(Self {
            open: handles.iter().map(|_| AtomicUsize::new(0)).collect(),
            handles,
            next_listener: AtomicUsize::new(0),
        })
    }

    /// The thread for a new connection accepted on the current thread.
    fn place(&self) -> usize {
        let here = current().min(self.handles.len() - 1);
        let mut best = here;
        let mut least = self.open[here].load(Ordering::Relaxed);
        for (i, n) in self.open.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n < least {
                best = i;
                least = n;
            }
        }
        best
    }

    /// Runs `serve` for a connection just accepted on this (proxy) thread, on the
    /// thread with the fewest open connections, tracked by `tracker`.
    fn spawn_conn<F, Fut>(
        &self,
        tracker: &TaskTracker,
        stream: TcpStream,
        span: tracing::Span,
        serve: F,
    ) where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let target = self.place();
        self.open[target].fetch_add(1, Ordering::Relaxed);
        let open = OpenConn(target);
        if target == current() {
            tracker.spawn(
                async move {
                    let _open = open;
                    serve(stream).await;
                }
                .instrument(span),
            );
            return;
        }
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(cause = %err, "cannot hand a connection to another thread");
                return;
            }
        };
        self.handles[target].spawn(
            tracker.track_future(
                async move {
                    let _open = open;
                    match TcpStream::from_std(stream) {
                        Ok(s) => serve(s).await,
                        Err(err) => {
                            tracing::warn!(cause = %err, "cannot register a handed-over connection")
                        }
                    }
                }
                .instrument(span),
            ),
        );
    }

    /// How many threads there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one thread.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `make(i)` on each thread `i`.
    #[cfg(test)]
    fn spawn_each<F, Fut>(&self, make: F) -> Vec<JoinHandle<Fut::Output>>
    where
        F: Fn(usize) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        self.handles
            .iter()
            .enumerate()
            .map(|(i, h)| h.spawn(make(i)))
            .collect()
    }
}

/// Runs `accept(listener)` on one of the proxy threads (the next in turn), in the
/// caller's span, registering `listener`'s socket with that thread's reactor.
///
/// # Errors
/// The socket cannot be registered (out of file descriptors or memory).
pub(crate) fn accept_on_proxy_thread<F, Fut>(
    listener: TcpListener,
    accept: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let threads = ProxyThreads::global();
    let socket = listener.into_std()?;
    let i = threads.next_listener.fetch_add(1, Ordering::Relaxed) % threads.handles.len();
    let handle = &threads.handles[i];
    let listener = {
        let _in = handle.enter();
        TcpListener::from_std(socket)?
    };
    Ok(handle.spawn(accept(listener).instrument(tracing::Span::current())))
}

/// Runs `serve` for a connection just accepted on a proxy thread, on the proxy thread
/// with the fewest open connections, tracked by `tracker` and inside `span`.
pub(crate) fn spawn_conn<F, Fut>(
    tracker: &TaskTracker,
    stream: TcpStream,
    span: tracing::Span,
    serve: F,
) where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    ProxyThreads::global().spawn_conn(tracker, stream, span, serve);
}

/// Counts one open connection on a thread until dropped.
struct OpenConn(usize);

impl Drop for OpenConn {
    fn drop(&mut self) {
        ProxyThreads::global().open[self.0].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which proxy thread the caller runs on (0 on any other thread). Per-thread state,
/// such as a backend's idle connections, is indexed by it.
pub(crate) fn current() -> usize {
    INDEX.with(Cell::get).unwrap_or(0)
}

/// How many per-thread slots per-thread state needs: [`current`] is always below it.
pub(crate) fn slots() -> usize {
    ProxyThreads::global().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_knows_its_index_and_runs_its_tasks() {
        let threads = ProxyThreads::start(3).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seen: Vec<usize> = rt.block_on(async {
            let mut out = Vec::new();
            for h in threads.spawn_each(|_| async { current() }) {
                out.push(h.await.unwrap());
            }
            out
        });
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!(current(), 0, "a non-proxy thread counts as slot 0");
    }

    #[test]
    fn new_connections_go_to_the_least_busy_thread_and_stay_home_on_a_tie() {
        let threads = ProxyThreads::start(3).unwrap();
        assert_eq!(
            threads.place(),
            0,
            "a tie keeps the connection where it was accepted"
        );
        threads.open[0].store(4, Ordering::Relaxed);
        threads.open[1].store(2, Ordering::Relaxed);
        threads.open[2].store(3, Ordering::Relaxed);
        assert_eq!(threads.place(), 1);
        threads.open[1].store(4, Ordering::Relaxed);
        assert_eq!(threads.place(), 2);
    }
}

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
//! All threads register the same listening socket in their own epoll; the kernel wakes
//! them all on a new connection and one `accept` wins (the others see `EAGAIN`). That
//! thundering herd costs a wasted wake-up per connection on the idle threads, and buys
//! what a dispatcher thread could not: a busy thread simply accepts less.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Handles of the proxy threads' runtimes, started on first use.
#[derive(Debug)]
pub struct ProxyThreads {
    handles: Vec<Handle>,
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
                    rt.block_on(std::future::pending::<()>());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("proxy thread exited at start"))??;
            handles.push(handle);
        }
        Ok(Self { handles })
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

/// Runs `serve(listener)` on every proxy thread, each with its own registration of
/// `listener`'s socket (the same open file, duplicated), inside the caller's span.
///
/// # Errors
/// The socket cannot be duplicated or registered (out of file descriptors).
pub(crate) fn on_proxy_threads<F, Fut>(
    listener: TcpListener,
    serve: F,
) -> std::io::Result<Vec<JoinHandle<()>>>
where
    F: Fn(TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let threads = ProxyThreads::global();
    let socket = listener.into_std()?;
    let span = tracing::Span::current();
    let mut loops = Vec::with_capacity(threads.len());
    for handle in &threads.handles {
        let own = socket.try_clone()?;
        // Registered with this thread's reactor, not the caller's.
        let own = {
            let _in = handle.enter();
            TcpListener::from_std(own)?
        };
        loops.push(handle.spawn(serve(own).instrument(span.clone())));
    }
    Ok(loops)
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
}

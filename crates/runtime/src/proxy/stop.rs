//! A stop signal that costs one atomic load to poll.
//!
//! Every client connection waits on "shut down gracefully" and "cut now" next to its
//! hyper connection, so the wait is polled on every wake-up of every connection task —
//! twice per proxied request. `CancellationToken::cancelled()` takes the token's mutex
//! and re-registers with a `Notify` (another mutex) on each of those polls, and the
//! token is shared by all connections on all proxy threads, so those cache lines
//! bounce between CPUs. Profiles put it at ~1 % of the proxy's time. A [`Stopped`]
//! future takes a lock only when it first registers (or its task's waker changes).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::CancellationToken;

/// A one-way signal: once [`Stop::stop`] is called, every [`Stopped`] future resolves.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    stopped: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// Registered wakers; a slot is reused once its future is dropped.
#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Inner {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Stop {
    /// Signals; wakes every waiting future. Idempotent.
    pub(crate) fn stop(&self) {
        // Set before taking the lock: a future registering concurrently re-checks the
        // flag under the lock, so it either is woken here or sees the flag.
        self.0.stopped.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self
            .0
            .waiters()
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Whether [`Stop::stop`] has been called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Resolves once stopped.
    pub(crate) fn stopped(&self) -> Stopped {
        Stopped {
            stop: self.clone(),
            slot: None,
        }
    }

    /// A signal that follows `token` (and stops when it is cancelled), forwarded by a
    /// task on the current runtime that ends with it.
    pub(crate) fn following(token: &CancellationToken) -> Self {
        let stop = Self::default();
        let token = token.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => s.stop(),
                () = s.stopped() => {}
            }
        });
        stop
    }
}

/// Stops its signals when dropped: a proxy whose future is dropped (instead of being
/// shut down) must not leave connections running on the proxy threads.
pub(crate) struct StopOnDrop(pub(crate) Vec<Stop>);

impl StopOnDrop {
    /// Ends the guard without stopping anything.
    pub(crate) fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for s in &self.0 {
            s.stop();
        }
    }
}

/// The future of [`Stop::stopped`].
#[derive(Debug)]
pub(crate) struct Stopped {
    stop: Stop,
    /// Registered slot and the waker it holds.
    slot: Option<(usize, Waker)>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stop.is_stopped() {
            return Poll::Ready(());
        }
        if let Some((_, w)) = &self.slot {
            if w.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        let inner = Arc::clone(&self.stop.0);
        let mut waiters = inner.waiters();
        if inner.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let waker = cx.waker().clone();
        let index = match self.slot {
            Some((i, _)) => i,
            None => waiters.free.pop().unwrap_or_else(|| {
                waiters.slots.push(None);
                waiters.slots.len() - 1
            }),
        };
        waiters.slots[index] = Some(waker.clone());
        drop(waiters);
        self.slot = Some((index, waker));
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some((i, _)) = self.slot.take() {
            let mut waiters = self.stop.0.waiters();
            waiters.slots[i] = None;
            waiters.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_resolves_once_stopped_and_later_ones_at_once() {
        let stop = Stop::default();
        let waiters: Vec<_> = (0..5)
            .map(|_| tokio::spawn(stop.clone().stopped()))
            .collect();
        tokio::task::yield_now().await;
        assert!(!stop.is_stopped());
        stop.stop();
        for w in waiters {
            w.await.unwrap();
        }
        stop.stopped().await;
    }

    #[tokio::test]
    async fn dropped_waiters_free_their_slot() {
        let stop = Stop::default();
        for _ in 0..10 {
            let mut f = Box::pin(stop.stopped());
            assert!(futures_poll(&mut f).is_pending());
        }
        assert_eq!(stop.0.waiters().slots.len(), 1);
        assert_eq!(stop.0.waiters().free.len(), 1);
    }

    #[tokio::test]
    async fn follows_a_cancellation_token() {
        let token = CancellationToken::new();
        let stop = Stop::following(&token);
        assert!(!stop.is_stopped());
        token.cancel();
        stop.stopped().await;
        assert!(stop.is_stopped());
    }

    fn futures_poll(f: &mut Pin<Box<Stopped>>) -> Poll<()> {
        let waker = Waker::noop();
        f.as_mut().poll(&mut Context::from_waker(waker))
    }
}

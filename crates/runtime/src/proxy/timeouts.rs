//! Inactivity bounds on the two transfers a client controls the pace of: its request
//! body (nginx `client_body_timeout`, HAProxy `timeout client`: 60 s) and its reading of
//! the response (nginx `send_timeout`: 60 s). Without them a client that sends
//! `Content-Length: 1000` and two bytes, or stops reading a large response, holds a
//! worker's in-flight slot (and so its drain) forever.
//!
//! Both measure *inactivity*, not total time: a slow but moving transfer is fine.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The client sent nothing of its request body for the body-read timeout.
#[derive(Debug, thiserror::Error)]
#[error("client sent no request body data for {0:?}")]
pub(crate) struct BodyReadTimeout(pub(crate) Duration);

/// An inactivity timer: armed when an operation first has to wait, disarmed when it
/// makes progress, fires when the wait lasts `timeout`. The timer is allocated on the
/// first wait and re-armed in place after that, so a streaming transfer that waits on
/// every chunk costs no allocation per chunk.
#[derive(Debug)]
pub(crate) struct Idle {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Idle {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: None,
            armed: false,
        }
    }

    /// After an operation returned `Pending`: true once the wait has lasted `timeout`
    /// (the timer is registered with `cx`, so the task is woken then).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let deadline = Instant::now() + self.timeout;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }

    /// The operation made progress.
    pub(crate) fn progressed(&mut self) {
        self.armed = false;
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A client connection whose writes fail with `TimedOut` when the peer has not taken a
/// byte for `timeout` (its receive window stayed full). Reads pass through: idle
/// keep-alive and slow request heads have their own bounds.
#[derive(Debug)]
pub(crate) struct WriteIdle<S> {
    inner: S,
    idle: Idle,
}

impl<S> WriteIdle<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            idle: Idle::new(timeout),
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    fn check<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => {
                if self.idle.expired(cx) {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "client read nothing of the response for {:?}",
                            self.idle.timeout()
                        ),
                    )))
                } else {
                    Poll::Pending
                }
            }
            ready => {
                self.idle.progressed();
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteIdle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteIdle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn write_fails_only_after_the_peer_stalls_for_the_timeout() {
        // A 64-byte pipe that nobody reads: writes block once it is full.
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteIdle::new(a, Duration::from_secs(60));
        w.write_all(&[0; 64]).await.unwrap();
        let started = Instant::now();
        let err = w.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - started, Duration::from_secs(60));
        // Progress resets the timer.
        let mut w = WriteIdle::new(w.inner, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                tokio::io::AsyncReadExt::read_exact(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
            b
        });
        w.write_all(&[0; 64]).await.unwrap();
        let _b = reader.await.unwrap();
    }
}

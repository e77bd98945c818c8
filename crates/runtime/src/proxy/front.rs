//! The client side of one http-mode connection: an optional TLS handshake, then
//! HTTP/1.1, or HTTP/2 when TLS negotiated `h2` by ALPN.
//!
//! Kept apart from `http.rs` (which forwards requests) so that the protocol choice is
//! one call there. Plaintext HTTP/1.x does not come here (the lean path, `h1`, serves
//! it); HTTP/1.1 over TLS is handed to the lean path too when the caller passes it. Cleartext HTTP/2 (h2c, by prior knowledge or upgrade) is not
//! offered: a plain connection is always HTTP/1.1.
//!
//! Every HTTP/2 stream is one call of the same service as an HTTP/1.1 request, so it
//! is balanced and counted in flight (drain-before-signal) on its own. On shutdown,
//! `graceful_shutdown` sends HTTP/2 clients a `GOAWAY` (and closes idle HTTP/1.1 ones);
//! streams already open finish, within the proxy's shutdown grace.
//!
//! An HTTP/2 connection with no open stream for the keep-alive idle bound (the same
//! `header_read_timeout` that closes idle HTTP/1.1 clients) is sent a `GOAWAY` too, so
//! idle clients cannot hold connection slots forever.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service as _;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::http::ProxyBody;
use super::stop::Stop;
use super::timeouts::WriteIdle;
use crate::tls::{ALPN_ACME_TLS, ALPN_H2};

/// Protocol settings for client connections, built once per listener.
#[derive(Clone)]
pub(crate) struct Front {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Bound on the TLS handshake (the slowloris bound of the TLS layer), and how long
    /// an HTTP/2 connection may stay without a stream.
    handshake_timeout: Duration,
}

impl Front {
    pub(crate) fn new(
        h1: http1::Builder,
        max_header_bytes: usize,
        handshake_timeout: Duration,
    ) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            // Dead peers are noticed, so their streams (and leases) do not linger.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Self {
            h1,
            h2,
            handshake_timeout,
        }
    }

    /// Serves one accepted connection until it closes, `shutdown` has been honoured,
    /// or `hard_stop` cuts it.
    pub(crate) async fn serve<S, L, LF>(
        &self,
        stream: WriteIdle<TcpStream>,
        tls: Option<crate::tls::Handshake>,
        service: S,
        lean_h1: Option<L>,
        shutdown: &Stop,
        hard_stop: &Stop,
    ) -> Result<(), hyper::Error>
    where
        L: FnOnce(TlsStream<WriteIdle<TcpStream>>) -> LF,
        LF: std::future::Future<Output = ()>,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        /// Runs a hyper connection future, shutting it down gracefully when `stop`
        /// resolves (by default: on `shutdown`).
        macro_rules! drive {
            ($conn:expr) => {
                drive!($conn, shutdown.stopped())
            };
            ($conn:expr, $stop:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = $stop => {
                        conn.as_mut().graceful_shutdown();
                        tokio::select! {
                            r = conn.as_mut() => r,
                            () = hard_stop.stopped() => Ok(()),
                        }
                    }
                    // A retired proxy (daemon upgrade) cuts what is left at its grace.
                    () = hard_stop.stopped() => Ok(()),
                }
            }};
        }
        let Some(acceptor) = tls else {
            return drive!(self
                .h1
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades());
        };
        let handshake = tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)) => r,
            () = shutdown.stopped() => return Ok(()),
        };
        let stream = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                tracing::debug!(cause = %err, "TLS handshake failed");
                return Ok(());
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return Ok(());
            }
        };
        // An ACME server validating a TLS-ALPN-01 challenge: the handshake (with the
        // challenge certificate) was the whole answer; it sends no request.
        if stream.get_ref().1.alpn_protocol() == Some(ALPN_ACME_TLS) {
            return Ok(());
        }
        if stream.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
            let streams = Arc::new(Streams::default());
            let service = Arc::new(service);
            let counted = hyper::service::service_fn({
                let streams = Arc::clone(&streams);
                move |req| {
                    let open = StreamOpen::new(Arc::clone(&streams));
                    let call = service.call(req);
                    async move {
                        let resp = call.await?;
                        Ok::<_, Infallible>(
                            resp.map(|body| Counted { body, _open: open }.boxed_unsync()),
                        )
                    }
                }
            });
            let idle = self.handshake_timeout;
            let stop = async {
                tokio::select! {
                    () = shutdown.stopped() => {}
                    () = streams.idle_for(idle) => tracing::debug!("idle HTTP/2 connection; sending GOAWAY"),
                }
            };
            drive!(
                self.h2.serve_connection(TokioIo::new(stream), counted),
                stop
            )
        } else if let Some(lean) = lean_h1 {
            // HTTP/1.1 over TLS on the lean path, which honours `shutdown` itself.
            tokio::select! {
                () = lean(stream) => {}
                () = hard_stop.stopped() => {}
            }
            Ok(())
        } else {
            drive!(self
                .h1
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades())
        }
    }
}

/// Open streams of one HTTP/2 connection.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    changed: Notify,
}

impl Streams {
    /// Resolves once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                if tokio::time::timeout(idle, changed).await.is_err() {
                    return;
                }
            } else {
                changed.await;
            }
        }
    }
}

/// One stream counted open from its request until its response body is dropped.
struct StreamOpen(Arc<Streams>);

impl StreamOpen {
    fn new(streams: Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        streams.changed.notify_waiters();
        Self(streams)
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body that keeps its stream counted open.
struct Counted {
    body: ProxyBody,
    _open: StreamOpen,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

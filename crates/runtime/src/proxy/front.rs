//! The client side of one http-mode connection: an optional TLS handshake, then
//! HTTP/1.1, or HTTP/2 when TLS negotiated `h2` by ALPN.
//!
//! Kept apart from `http.rs` (which forwards requests) so that the protocol choice is
//! one call there. Cleartext HTTP/2 (h2c, by prior knowledge or upgrade) is not
//! offered: a plain connection is always HTTP/1.1.
//!
//! Every HTTP/2 stream is one call of the same service as an HTTP/1.1 request, so it
//! is balanced and counted in flight (drain-before-signal) on its own. On shutdown,
//! `graceful_shutdown` sends HTTP/2 clients a `GOAWAY` (and closes idle HTTP/1.1 ones);
//! streams already open finish, within the proxy's shutdown grace.

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::ProxyBody;
use super::timeouts::WriteIdle;
use crate::tls::ALPN_H2;

/// Protocol settings for client connections, built once per listener.
#[derive(Clone)]
pub(crate) struct Front {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Bound on the TLS handshake (the slowloris bound of the TLS layer).
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
    pub(crate) async fn serve<S>(
        &self,
        stream: WriteIdle<TcpStream>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        service: S,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), hyper::Error>
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        /// Runs a hyper connection future, shutting it down gracefully on `shutdown`.
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        tokio::select! {
                            r = conn.as_mut() => r,
                            () = hard_stop.cancelled() => Ok(()),
                        }
                    }
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
            () = shutdown.cancelled() => return Ok(()),
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
        if stream.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
            drive!(self.h2.serve_connection(TokioIo::new(stream), service))
        } else {
            drive!(self
                .h1
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades())
        }
    }
}

//! The lean HTTP/1.1 path: HTTP/1.x client connections, plain or over TLS, served by
//! the proxy's own code instead of hyper's server and client.
//!
//! Why: with hyper on both sides every request was parsed into two `HeaderMap`s,
//! crossed a channel to a separately spawned client-connection task and back, and its
//! response body crossed another; per request that was twice the user-space CPU of
//! HAProxy for the same work (docs/performance.md). Here one task owns both sockets:
//! it parses the request head in place (httparse, the parser hyper uses), writes the
//! rewritten head straight into the worker's buffer, and passes the response head and
//! body through the same way, reusing its buffers for every request.
//!
//! What it keeps from the hyper path, by sharing its rules: the request guard
//! (`guard.rs`), the header rewriting (`headers.rs`), retries only when the worker
//! cannot have seen the request, in-flight accounting until the response is through,
//! the per-thread pools, and every timeout. What it adds is HTTP/1.1 framing, decided
//! strictly ([`head`], [`chunked`]). HTTP/2 (TLS with ALPN `h2`) stays on hyper.

mod chunked;
mod conn;
mod head;

pub(crate) use conn::serve;

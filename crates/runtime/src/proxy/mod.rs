//! The daemon's data path for the `http` and `tcp` listener modes.
//!
//! The daemon owns the public socket; each worker listens on a private 127.0.0.1 port.
//! This module forwards traffic from one to the others and owns the piece of state
//! that makes reloads lossless: which workers are routable and how much work each
//! has in flight ([`RouteTable`]). The reconcile loop drains a worker by calling
//! [`RouteTable::stop_routing`], awaiting [`RouteTable::drained`] (under its shutdown
//! timeout), and only then signalling the worker.
//!
//! - [`serve_http`]: HTTP/1.1 reverse proxy, balancing *requests*; with TLS
//!   (`listen[].tls`, [`crate::tls`]) also HTTP/2 to clients, by ALPN.
//! - [`serve_tcp`]: L4 proxy, balancing *connections*.

mod front;
mod guard;
mod h1;
mod headers;
mod http;
mod pool;
mod routes;
mod stop;
mod tcp;
mod threads;
mod timeouts;

use std::net::SocketAddr;
use std::time::Duration;

pub use http::{serve_http, serve_http_retirable, HttpProxyConfig, TrustedProxies};
pub use routes::{BackendStats, RouteTable};
pub use tcp::{serve_tcp, TcpProxyConfig};
pub use threads::ProxyThreads;

/// Why the proxy could not reach a worker. Logged and counted per backend; clients see
/// a status code (http) or a closed connection (tcp), never this type.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The worker's port refused or reset the connection.
    #[error("failed to connect to worker at {addr}")]
    Connect {
        /// Worker address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The worker did not accept the connection in time.
    #[error("timed out after {timeout:?} connecting to worker at {addr}")]
    ConnectTimeout {
        /// Worker address.
        addr: SocketAddr,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The HTTP/1.1 connection could not be set up.
    #[error("failed to start http/1.1 with worker at {addr}")]
    Handshake {
        /// Worker address.
        addr: SocketAddr,
        /// hyper's reason.
        #[source]
        source: hyper::Error,
    },
}

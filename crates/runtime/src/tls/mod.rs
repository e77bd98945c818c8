//! TLS termination for `http`-mode listeners (`listen[].tls`).
//!
//! rustls 0.23 with the *ring* crypto provider: ring builds with nothing but a C
//! compiler, whereas aws-lc-rs (rustls' default) needs cmake and a much longer build of
//! a vendored C library; clusterd's CI and packagers should not need either. TLS 1.2
//! and 1.3 only, rustls' default (AEAD, forward-secret) cipher suites, no client
//! authentication, ALPN `h2` then `http/1.1`.
//!
//! Certificates live in a [`certs::CertStore`], which is also the rustls certificate
//! resolver: it picks a certificate by SNI and re-checks the files (a `stat` each) at
//! most once a second as handshakes arrive, so a renewed certificate is served to new
//! connections within about a second, without a reload, while open connections keep
//! the session they have. A pair that fails to load never replaces a good one.
//!
//! [`TlsTerminator`] is the handle the daemon keeps per listener: a manifest change
//! swaps the certificate list in place (no rebind), and the proxy asks it for an
//! acceptor per connection.

pub mod acme;
mod certs;

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use clusterd_core::model::Tls;
use rustls::server::ServerConfig;

pub use certs::CertError;
use certs::{AcmeCerts, CertStore};

/// ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// ALPN protocol id of TLS-ALPN-01 validation (RFC 8737).
pub(crate) const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// One listener's TLS settings, shared between the daemon and its running proxy.
/// Disabled (plain HTTP) when built from `None`.
#[derive(Debug, Clone, Default)]
pub struct TlsTerminator {
    active: Arc<RwLock<Option<Active>>>,
    /// `tls.acme`: what the listener's ACME task obtained.
    acme: Arc<AcmeCerts>,
}

#[derive(Debug, Clone)]
struct Active {
    store: Arc<CertStore>,
    config: Arc<ServerConfig>,
}

impl TlsTerminator {
    /// Terminates TLS with `tls`'s certificates (paths already resolved by validation),
    /// or not at all. The files are read now, so a broken pair is reported when the
    /// manifest is applied rather than at the first connection.
    #[must_use]
    pub fn new(tls: Option<&Tls>) -> Self {
        let this = Self::default();
        this.set(tls);
        this
    }

    /// Applies a new manifest's `tls` to connections accepted from now on. Pairs whose
    /// paths did not change keep their loaded certificate.
    pub fn set(&self, tls: Option<&Tls>) {
        let mut cur = self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (tls, cur.as_ref()) {
            (None, _) => *cur = None,
            (Some(tls), Some(active)) => active.store.set_pairs(pairs(tls)),
            (Some(tls), None) => {
                let store = Arc::new(CertStore::new(pairs(tls), Arc::clone(&self.acme)));
                *cur = Some(Active {
                    config: Arc::new(server_config(&store)),
                    store,
                });
            }
        }
    }

    /// The acceptor for a new connection, if TLS is on.
    pub(crate) fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|a| tokio_rustls::TlsAcceptor::from(Arc::clone(&a.config)))
    }

    /// Whether TLS is on.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.acceptor().is_some()
    }

    /// Stops serving the ACME certificate (the manifest no longer has `tls.acme`).
    pub(crate) fn clear_acme(&self) {
        self.acme.set_cert(None);
    }

    /// When the certificate `tls.acme` obtained expires (`None`: no ACME certificate
    /// is served yet).
    #[must_use]
    pub fn acme_expiry(&self) -> Option<SystemTime> {
        self.acme.expiry()
    }
}

fn pairs(tls: &Tls) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    tls.certificates
        .iter()
        .map(|c| (c.cert.clone(), c.key.clone()))
        .collect()
}

/// rustls' server settings around `store`.
fn server_config(store: &Arc<CertStore>) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    #[allow(clippy::expect_used)]
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // Not input-dependent: ring's provider implements both versions.
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let mut cfg = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(store) as Arc<dyn rustls::server::ResolvesServerCert>);
    // `acme-tls/1` last: only a TLS-ALPN-01 validator offers it (and nothing else), and
    // the resolver answers it with a challenge certificate or not at all.
    cfg.alpn_protocols = vec![
        ALPN_H2.to_vec(),
        b"http/1.1".to_vec(),
        ALPN_ACME_TLS.to_vec(),
    ];
    // Stateless resumption (rotating keys, in memory) makes returning clients cheap.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        cfg.ticketer = ticketer;
    }
    cfg
}

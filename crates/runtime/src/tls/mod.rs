//! TLS termination for `http`-mode listeners (`listen[].tls`).
//!
//! rustls 0.23 with the *ring* crypto provider: ring builds with nothing but a C
//! compiler, whereas aws-lc-rs (rustls' default) needs cmake and a much longer build of
//! a vendored C library; clusterd's CI and packagers should not need either. TLS 1.2
//! and 1.3 only, rustls' default (AEAD, forward-secret) cipher suites, no client
//! authentication, ALPN `h2` then `http/1.1`.
//!
//! Cipher suite choice: AES-128-GCM first, then AES-256-GCM, then ChaCha20-Poly1305,
//! whatever the client's order, unless the client lists ChaCha20 first among the
//! suites clusterd has (a client without AES hardware says so that way), whose order is
//! then followed: Go's `crypto/tls` server rule. OpenSSL-based and rustls clients list
//! AES-256-GCM-SHA384 first; its key schedule (HKDF with SHA-384) has no hardware SHA-512
//! on most CPUs and cost about 15 % of a new connection's CPU in the proxy (measured:
//! 190 → 165 µs per resumed TLS 1.3 connection; docs/performance.md). AES-128-GCM is
//! what browsers pick first anyway and is in every current recommendation.
//!
//! Certificates live in a [`certs::CertStore`], which is also the rustls certificate
//! resolver: it picks a certificate by SNI and re-checks the files (a `stat` each) at
//! most once a second as handshakes arrive, so a renewed certificate is served to new
//! connections within about a second, without a reload, while open connections keep
//! the session they have. A pair that fails to load never replaces a good one.
//!
//! Every load and every distinct refusal is also sent to the listener's [`CertReporter`]
//! (the daemon turns them into `certificate-loaded` / `certificate-refused` events), so
//! an operator sees a broken renewal in `clusterd events`, not only in the daemon's log.
//! Files are checked on handshakes, so a change is noticed (and reported) at the first
//! connection at least a second after the last check.
//!
//! [`TlsTerminator`] is the handle the daemon keeps per listener: a manifest change
//! swaps the certificate list in place (no rebind), and the proxy asks it for an
//! acceptor per connection.

pub mod acme;
mod certs;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use clusterd_core::model::Tls;
use rustls::server::ServerConfig;
use rustls::CipherSuite;
use tokio::io::{AsyncRead, AsyncWrite};

pub use certs::CertError;
use certs::{AcmeCerts, CertStore};

/// ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// What became of a certificate/key pair, for the daemon's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertEvent {
    /// The pair loaded: at start, renewed, or good again after a refusal. New
    /// connections get it.
    Loaded {
        /// The certificate file.
        cert: PathBuf,
        /// Its key file.
        key: PathBuf,
        /// An earlier certificate of these files was in use and is replaced.
        replaced: bool,
    },
    /// The pair was refused (reported once per distinct reason).
    Refused {
        /// The certificate file.
        cert: PathBuf,
        /// `file: what is wrong, expected what`.
        reason: String,
        /// The last good certificate of these files stays in use (otherwise there is
        /// none to serve for it).
        kept: bool,
    },
}

impl fmt::Display for CertEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertEvent::Loaded {
                cert,
                key,
                replaced,
            } => write!(
                f,
                "{} (key {}) {}; new connections get it",
                cert.display(),
                key.display(),
                if *replaced { "reloaded" } else { "loaded" }
            ),
            CertEvent::Refused { reason, kept, .. } => write!(
                f,
                "{reason}; {}",
                if *kept {
                    "still serving the previous certificate"
                } else {
                    "no certificate to serve for it"
                }
            ),
        }
    }
}

/// Receives a listener's [`CertEvent`]s. Called on a handshake or a manifest change,
/// so it must not block (the daemon's sends a message on an unbounded channel).
#[derive(Clone)]
pub struct CertReporter(Arc<dyn Fn(CertEvent) + Send + Sync>);

impl CertReporter {
    /// Reports through `f`.
    pub fn new(f: impl Fn(CertEvent) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    fn send(&self, event: CertEvent) {
        (self.0)(event);
    }
}

impl fmt::Debug for CertReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertReporter")
    }
}

/// ALPN protocol id of TLS-ALPN-01 validation (RFC 8737).
pub(crate) const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// One listener's TLS settings, shared between the daemon and its running proxy.
/// Disabled (plain HTTP) when built from `None`.
#[derive(Debug, Clone, Default)]
pub struct TlsTerminator {
    active: Arc<RwLock<Option<Active>>>,
    report: Option<CertReporter>,
    /// `tls.acme`: what the listener's ACME task obtained.
    acme: Arc<AcmeCerts>,
}

#[derive(Debug, Clone)]
struct Active {
    store: Arc<CertStore>,
    handshake: Handshake,
}

/// Runs the server side of a TLS handshake for one connection of a listener.
#[derive(Debug, Clone)]
pub(crate) struct Handshake {
    /// Our suite order (AES-128-GCM first).
    server_order: Arc<ServerConfig>,
    /// The client's suite order, for clients that put ChaCha20 first. Shares the
    /// certificates, session cache and ticket keys with `server_order`.
    client_order: Arc<ServerConfig>,
}

impl Handshake {
    /// Reads the ClientHello, picks the settings for it, and completes the handshake.
    pub(crate) async fn accept<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let config = if prefers_chacha(
            start.client_hello().cipher_suites(),
            &self.server_order.crypto_provider().cipher_suites,
        ) {
            &self.client_order
        } else {
            &self.server_order
        };
        start.into_stream(Arc::clone(config)).await
    }
}

fn is_chacha(s: CipherSuite) -> bool {
    matches!(
        s,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

/// Whether the first of the client's suites that we support is a ChaCha20 one.
fn prefers_chacha(client: &[CipherSuite], ours: &[rustls::SupportedCipherSuite]) -> bool {
    client
        .iter()
        .find(|c| ours.iter().any(|o| o.suite() == **c))
        .is_some_and(|c| is_chacha(*c))
}

/// Our preference: AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 (see the module docs).
fn rank(s: CipherSuite) -> u8 {
    match s {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        s if is_chacha(s) => 2,
        _ => 1,
    }
}

impl TlsTerminator {
    /// Terminates TLS with `tls`'s certificates (paths already resolved by validation),
    /// or not at all. The files are read now, so a broken pair is reported when the
    /// manifest is applied rather than at the first connection.
    #[must_use]
    pub fn new(tls: Option<&Tls>) -> Self {
        Self::with_reporter(tls, None)
    }

    /// [`TlsTerminator::new`], with every load and refusal of a certificate pair (now
    /// and later, on renewals) sent to `report`.
    #[must_use]
    pub fn with_reporter(tls: Option<&Tls>, report: Option<CertReporter>) -> Self {
        let this = Self {
            active: Arc::default(),
            report,
            acme: Arc::default(),
        };
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
                let store = Arc::new(CertStore::new(
                    pairs(tls),
                    Arc::clone(&self.acme),
                    self.report.clone(),
                ));
                *cur = Some(Active {
                    handshake: handshake(&store),
                    store,
                });
            }
        }
    }

    /// The handshake for a new connection, if TLS is on.
    pub(crate) fn acceptor(&self) -> Option<Handshake> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|a| a.handshake.clone())
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

/// rustls' server settings around `store`, in our suite order and in the client's.
fn handshake(store: &Arc<CertStore>) -> Handshake {
    let mut ours = server_config(store);
    ours.ignore_client_order = true;
    // A clone shares the resolver, session cache and ticketer: a session resumes
    // whichever order its first connection used.
    let mut theirs = ours.clone();
    theirs.ignore_client_order = false;
    Handshake {
        server_order: Arc::new(ours),
        client_order: Arc::new(theirs),
    }
}

/// rustls' server settings around `store`.
fn server_config(store: &Arc<CertStore>) -> ServerConfig {
    let mut provider = rustls::crypto::ring::default_provider();
    // Stable: within a rank, ring's order (TLS 1.3 before 1.2, ECDSA before RSA) stays.
    provider.cipher_suites.sort_by_key(|s| rank(s.suite()));
    let provider = Arc::new(provider);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_first_unless_the_client_puts_chacha_first() {
        let ours = rustls::crypto::ring::default_provider().cipher_suites;
        use CipherSuite::*;
        // OpenSSL's and rustls' client order.
        assert!(!prefers_chacha(
            &[
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_128_GCM_SHA256
            ],
            &ours
        ));
        // A client without AES hardware; unknown suites (GREASE) are skipped.
        assert!(prefers_chacha(
            &[
                CipherSuite::Unknown(0x0a0a),
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_128_GCM_SHA256
            ],
            &ours
        ));
        assert!(prefers_chacha(
            &[TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256],
            &ours
        ));
        assert!(!prefers_chacha(&[], &ours));
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| rank(s.suite()));
        let names: Vec<CipherSuite> = sorted.iter().map(|s| s.suite()).collect();
        assert_eq!(names[0], TLS13_AES_128_GCM_SHA256);
        let chacha = names.iter().position(|s| is_chacha(*s)).unwrap();
        assert!(names[..chacha].iter().all(|s| !is_chacha(*s)), "{names:?}");
    }
}

//! The certificates of one TLS listener: loading, SNI choice and renewal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{CertEvent, CertReporter};

/// How often, at most, the files are checked for a change (on a handshake).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Why a certificate/key pair was refused. The previous good pair, if any, stays.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("{path}: cannot read ({source}), expected a readable PEM file")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM `CERTIFICATE` block.
    #[error("{path}: no PEM certificate found, expected a -----BEGIN CERTIFICATE----- block")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable PEM private key.
    #[error("{path}: no PEM private key found ({reason}), expected a PKCS#8, RSA or EC PRIVATE KEY block")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// The key is of a kind rustls cannot sign with.
    #[error("{path}: unsupported private key ({reason}), expected an RSA, ECDSA or Ed25519 key")]
    Key {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("{key}: the private key does not match the certificate in {cert} ({reason}), expected that certificate's key")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// The leaf certificate is not a parsable X.509 certificate.
    #[error("{path}: invalid certificate ({reason}), expected an X.509 certificate")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
}

/// Reads and checks one pair: a chain (leaf first) and the leaf's private key.
pub(crate) fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: cert.to_path_buf(),
        });
    };
    webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadCertificate {
        path: cert.to_path_buf(),
        reason: format!("{e:?}"),
    })?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::NoKey {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| CertError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| CertError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(certified))
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks: certbot's live/ files are links into archive/.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

#[derive(Debug)]
struct Slot {
    cert: PathBuf,
    key: PathBuf,
    /// The files as they were at the last load attempt (`None`: a file was missing).
    seen: Option<Option<(Stamp, Stamp)>>,
    /// The last pair that loaded.
    good: Option<Arc<CertifiedKey>>,
    /// The last refusal, so that a file that stays broken is reported once.
    last_error: Option<String>,
}

impl Slot {
    fn new(cert: PathBuf, key: PathBuf) -> Self {
        Self {
            cert,
            key,
            seen: None,
            good: None,
            last_error: None,
        }
    }

    /// Reloads the pair if either file changed since the last attempt, and reports what
    /// came of it: every load, and each distinct refusal once.
    fn refresh(&mut self, provider: &CryptoProvider, report: Option<&CertReporter>) {
        let now = stamp(&self.cert).zip(stamp(&self.key));
        if self.seen == Some(now) {
            return;
        }
        self.seen = Some(now);
        match load_pair(&self.cert, &self.key, provider) {
            Ok(ck) => {
                let replaced = self.good.is_some();
                if replaced {
                    tracing::info!(cert = %self.cert.display(), "certificate reloaded; new connections get it");
                } else {
                    tracing::info!(cert = %self.cert.display(), "certificate loaded");
                }
                self.good = Some(ck);
                self.last_error = None;
                if let Some(report) = report {
                    report.send(CertEvent::Loaded {
                        cert: self.cert.clone(),
                        key: self.key.clone(),
                        replaced,
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if self.last_error.as_deref() != Some(&msg) {
                    let kept = self.good.is_some();
                    if kept {
                        tracing::error!(cert = %self.cert.display(), key = %self.key.display(), error = %msg, "certificate refused; still serving the previous one");
                    } else {
                        tracing::error!(cert = %self.cert.display(), key = %self.key.display(), error = %msg, "certificate refused; no certificate to serve for it yet");
                    }
                    if let Some(report) = report {
                        report.send(CertEvent::Refused {
                            cert: self.cert.clone(),
                            reason: msg.clone(),
                            kept,
                        });
                    }
                }
                self.last_error = Some(msg);
            }
        }
    }

    /// Whether this slot's certificate covers `name`.
    fn covers(&self, name: &ServerName<'_>) -> bool {
        self.good.as_ref().is_some_and(|ck| covers(ck, name))
    }
}

/// Whether `ck`'s leaf covers `name` (wildcards per RFC 6125, as a client would check
/// it).
pub(crate) fn covers(ck: &CertifiedKey, name: &ServerName<'_>) -> bool {
    ck.end_entity_cert()
        .ok()
        .and_then(|leaf| webpki::EndEntityCert::try_from(leaf).ok())
        .is_some_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
}

/// What the listener's ACME task gives it: the ordered certificate (with its expiry,
/// for status) and, while an order is validated, the TLS-ALPN-01 challenge
/// certificates by domain. Kept apart from the [`CertStore`] so that they survive a
/// manifest that turns TLS off and on again.
#[derive(Debug, Default)]
pub(crate) struct AcmeCerts {
    cert: Mutex<Option<(Arc<CertifiedKey>, SystemTime)>>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl AcmeCerts {
    /// Serves `ck` (valid until `not_after`) to new connections from now on; open
    /// connections keep the certificate they were handed.
    pub(crate) fn set_cert(&self, ck: Option<(Arc<CertifiedKey>, SystemTime)>) {
        *lock(&self.cert) = ck;
    }

    /// The certificate served for the ACME domains.
    pub(crate) fn cert(&self) -> Option<Arc<CertifiedKey>> {
        lock(&self.cert).as_ref().map(|(ck, _)| Arc::clone(ck))
    }

    /// When the served ACME certificate expires.
    pub(crate) fn expiry(&self) -> Option<SystemTime> {
        lock(&self.cert).as_ref().map(|(_, t)| *t)
    }

    /// Answers TLS-ALPN-01 for `domain` with `ck` (or stops answering).
    pub(crate) fn set_challenge(&self, domain: &str, ck: Option<Arc<CertifiedKey>>) {
        let mut map = lock(&self.challenges);
        match ck {
            Some(ck) => map.insert(domain.to_ascii_lowercase(), ck),
            None => map.remove(&domain.to_ascii_lowercase()),
        };
    }

    fn challenge(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.challenges)
            .get(&domain.to_ascii_lowercase())
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The pairs of one listener, in manifest order.
#[derive(Debug)]
pub(crate) struct CertStore {
    slots: Mutex<Vec<Slot>>,
    last_check: Mutex<Option<Instant>>,
    provider: Arc<CryptoProvider>,
    /// Where loads and refusals go (the daemon's event log), besides the daemon's log.
    report: Option<CertReporter>,
    acme: Arc<AcmeCerts>,
}

impl CertStore {
    /// Loads `pairs` now (loads and refusals are logged and sent to `report`); `acme`
    /// holds the listener's ACME certificates, if it has any.
    pub(crate) fn new(
        pairs: Vec<(PathBuf, PathBuf)>,
        acme: Arc<AcmeCerts>,
        report: Option<CertReporter>,
    ) -> Self {
        let store = Self {
            slots: Mutex::new(Vec::new()),
            last_check: Mutex::new(None),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            report,
            acme,
        };
        store.set_pairs(pairs);
        store
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the list; pairs with the same paths keep what they loaded.
    pub(crate) fn set_pairs(&self, pairs: Vec<(PathBuf, PathBuf)>) {
        let mut slots = self.slots();
        let mut old: Vec<Slot> = std::mem::take(&mut *slots);
        for (cert, key) in pairs {
            let slot = match old.iter().position(|s| s.cert == cert && s.key == key) {
                Some(i) => old.swap_remove(i),
                None => Slot::new(cert, key),
            };
            slots.push(slot);
        }
        for s in slots.iter_mut() {
            s.refresh(&self.provider, self.report.as_ref());
        }
        *self
            .last_check
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// Re-checks the files if the last check is older than [`CHECK_EVERY`].
    fn refresh_if_due(&self) {
        {
            let mut last = self
                .last_check
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        for s in self.slots().iter_mut() {
            s.refresh(&self.provider, self.report.as_ref());
        }
    }

    /// Checks the files at the next handshake, as if the last check were long ago.
    #[cfg(test)]
    fn forget_last_check(&self) {
        *self
            .last_check
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The certificate for a client that asked for `sni`: the ACME certificate if it
    /// covers it, else the first file (in manifest order) that covers it, else the first
    /// file that loaded, else the ACME certificate.
    pub(crate) fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.refresh_if_due();
        let acme = self.acme.cert();
        let name = sni.and_then(|n| ServerName::try_from(n).ok());
        if let (Some(name), Some(ck)) = (&name, &acme) {
            if covers(ck, name) {
                return acme;
            }
        }
        let slots = self.slots();
        if let Some(name) = &name {
            if let Some(s) = slots.iter().find(|s| s.covers(name)) {
                return s.good.clone();
            }
        }
        slots.iter().find_map(|s| s.good.clone()).or(acme)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // RFC 8737: the validator offers `acme-tls/1` alone and names the domain.
        if hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == super::ALPN_ACME_TLS))
        {
            let challenge = hello
                .server_name()
                .and_then(|name| self.acme.challenge(name));
            if challenge.is_none() {
                tracing::debug!(sni = ?hello.server_name(), "acme-tls/1 handshake with no challenge pending; refused");
            }
            return challenge;
        }
        let chosen = self.choose(hello.server_name());
        if chosen.is_none() {
            tracing::warn!(sni = ?hello.server_name(), "TLS handshake refused: no certificate loaded");
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn bad_pairs_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let (a_cert, a_key) = write_pair(dir.path(), "a", &["a.test"]);
        let (_, b_key) = write_pair(dir.path(), "b", &["b.test"]);
        assert!(load_pair(&a_cert, &a_key, &provider).is_ok());
        let err = load_pair(&a_cert, &b_key, &provider).unwrap_err();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a pem file\n").unwrap();
        let err = load_pair(&garbage, &a_key, &provider).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");
        let err = load_pair(&a_cert, &garbage, &provider).unwrap_err();
        assert!(matches!(err, CertError::NoKey { .. }), "{err}");
        let err = load_pair(&dir.path().join("missing.pem"), &a_key, &provider).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn sni_exact_then_wildcard_then_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a", &["a.test"]);
        let w = write_pair(dir.path(), "w", &["*.wild.test"]);
        let store = CertStore::new(vec![a, w], Arc::default(), None);
        let leaf = |sni: Option<&str>| {
            store
                .choose(sni)
                .unwrap()
                .end_entity_cert()
                .unwrap()
                .clone()
                .into_owned()
        };
        let a_leaf = leaf(None);
        let w_leaf = leaf(Some("x.wild.test"));
        assert_ne!(a_leaf, w_leaf);
        assert_eq!(leaf(Some("a.test")), a_leaf);
        assert_eq!(leaf(Some("X.Wild.Test")), w_leaf);
        assert_eq!(
            leaf(Some("wild.test")),
            a_leaf,
            "a wildcard does not cover the apex"
        );
        assert_eq!(leaf(Some("a.b.wild.test")), a_leaf, "nor two labels");
        assert_eq!(leaf(Some("other.test")), a_leaf);
    }

    #[test]
    fn loads_and_refusals_are_reported_once_and_the_good_pair_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a", &["a.test"]);
        let seen: Arc<Mutex<Vec<CertEvent>>> = Arc::default();
        let report = CertReporter::new({
            let seen = Arc::clone(&seen);
            move |e| seen.lock().unwrap().push(e)
        });
        let store = CertStore::new(
            vec![(cert.clone(), key.clone())],
            Arc::default(),
            Some(report),
        );
        let take = || std::mem::take(&mut *seen.lock().unwrap());
        let leaf = |store: &CertStore| store.choose(Some("a.test")).unwrap().cert[0].clone();
        assert_eq!(
            take(),
            [CertEvent::Loaded {
                cert: cert.clone(),
                key: key.clone(),
                replaced: false
            }]
        );
        let first = leaf(&store);

        // A renewal that breaks the key: refused once, with the file and what was
        // expected; the loaded certificate stays.
        std::fs::write(&key, "garbage\n").unwrap();
        store.forget_last_check();
        assert_eq!(leaf(&store), first);
        let events = take();
        let [CertEvent::Refused {
            cert: c,
            reason,
            kept: true,
        }] = events.as_slice()
        else {
            panic!("{events:?}");
        };
        assert_eq!(c, &cert);
        assert!(
            reason.starts_with(&format!("{}: no PEM private key found", key.display())),
            "{reason}"
        );
        assert!(reason.contains("expected a PKCS#8"), "{reason}");
        let shown = events[0].to_string();
        assert!(
            shown.ends_with("; still serving the previous certificate"),
            "{shown}"
        );

        // Broken in the same way again (rewritten): not reported again.
        std::fs::write(&key, "garbage, longer\n").unwrap();
        store.forget_last_check();
        assert_eq!(leaf(&store), first);
        assert_eq!(take(), []);

        // A key of another certificate: a new reason, reported.
        let (_, other_key) = write_pair(dir.path(), "b", &["b.test"]);
        std::fs::copy(&other_key, &key).unwrap();
        store.forget_last_check();
        assert_eq!(leaf(&store), first);
        let events = take();
        assert!(
            matches!(events.as_slice(), [CertEvent::Refused { reason, kept: true, .. }]
                if reason.contains("does not match the certificate in")),
            "{events:?}"
        );

        // A good pair again: loaded, replacing the old one.
        let (new_cert, new_key) = write_pair(dir.path(), "n", &["a.test"]);
        std::fs::rename(&new_cert, &cert).unwrap();
        std::fs::rename(&new_key, &key).unwrap();
        store.forget_last_check();
        assert_ne!(leaf(&store), first);
        assert_eq!(
            take(),
            [CertEvent::Loaded {
                cert,
                key,
                replaced: true
            }]
        );
    }

    #[test]
    fn the_acme_certificate_serves_its_names_and_files_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let a = write_pair(dir.path(), "a", &["a.test"]);
        let b = write_pair(dir.path(), "b", &["b.test"]);
        let acme_ck = load_pair(&b.0, &b.1, &provider).unwrap();
        let acme = Arc::new(AcmeCerts::default());
        let leaf = |store: &CertStore, sni: Option<&str>| {
            store
                .choose(sni)
                .map(|ck| ck.end_entity_cert().unwrap().clone().into_owned())
        };
        let b_leaf = acme_ck.end_entity_cert().unwrap().clone().into_owned();
        // ACME alone: nothing to serve until it arrives, then the default.
        let alone = CertStore::new(vec![], Arc::clone(&acme), None);
        assert!(leaf(&alone, Some("b.test")).is_none());
        acme.set_cert(Some((Arc::clone(&acme_ck), SystemTime::now())));
        assert_eq!(leaf(&alone, None), Some(b_leaf.clone()));
        // With files: the files stay the default.
        let both = CertStore::new(vec![a], Arc::clone(&acme), None);
        let a_leaf = leaf(&both, None).unwrap();
        assert_ne!(a_leaf, b_leaf);
        assert_eq!(leaf(&both, Some("b.test")), Some(b_leaf));
        assert_eq!(leaf(&both, Some("a.test")), Some(a_leaf.clone()));
        assert_eq!(leaf(&both, Some("c.test")), Some(a_leaf));
        acme.set_cert(None);
        assert!(leaf(&alone, Some("b.test")).is_none());
    }
}

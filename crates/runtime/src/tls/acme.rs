//! `listen[].tls.acme`: obtains and renews one certificate per listener from an ACME
//! server (RFC 8555) and hands it to the listener's [`TlsTerminator`].
//!
//! The challenge is TLS-ALPN-01 (RFC 8737), answered by the listener itself: while an
//! order is validated, a handshake that offers ALPN `acme-tls/1` for one of the domains
//! gets a self-signed certificate carrying the key authorization's digest (see
//! [`super::certs::CertStore`]'s resolver). No other port and no change to the routing
//! of requests are needed, and the ACME server must reach the listener on port 443 of
//! the domain (directly or through a port forward).
//!
//! Files (layout in [`clusterd_core::acme::listener_dir`]): the chain and its key, and
//! the account's credentials. A daemon restart loads the stored certificate and orders
//! nothing while it is valid for the manifest's domains and not yet due for renewal.
//! The pure rules (renewal time, backoff) are in `clusterd_core::acme`.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterd_core::acme::{self as rules, ACCOUNT_FILE, CERT_FILE, KEY_FILE};
use clusterd_core::model::Acme;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::certs::{covers, load_pair, AcmeCerts};
use super::TlsTerminator;
use crate::error::{Error, IoContext as _, Result};

/// How long one order may wait for validation or for the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest whole attempt (account, order, validation, certificate).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest single sleep, so that a clock change is noticed within the hour.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// What happened to a listener's certificate, for the daemon's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeEventKind {
    /// A first certificate (none stored, or the stored one does not cover the domains).
    Obtained,
    /// The stored certificate was replaced before its expiry.
    Renewed,
    /// An attempt failed; the next one is scheduled (the message says when).
    Failed,
}

/// One report of an ACME task.
#[derive(Debug, Clone)]
pub struct AcmeEvent {
    /// What happened.
    pub kind: AcmeEventKind,
    /// For an operator: the domains, the expiry, or the reason of a failure.
    pub message: String,
}

/// Everything one listener's ACME task needs.
#[derive(Debug, Clone)]
pub struct AcmeJob {
    /// The manifest's `tls.acme` (validated: paths resolved, names checked).
    pub acme: Acme,
    /// Where the files live ([`clusterd_core::acme::listener_dir`]).
    pub dir: PathBuf,
    /// The listener to serve the certificate and the challenges on.
    pub tls: TlsTerminator,
    /// Renew once a certificate has been served this long (tests only; see
    /// [`clusterd_core::acme::renew_at`]): `CLUSTERD_ACME_RENEW_AFTER`.
    pub renew_after: Option<Duration>,
    /// The first wait after a failure: `CLUSTERD_ACME_RETRY_FIRST`, default
    /// [`clusterd_core::acme::RETRY_FIRST`].
    pub retry_first: Duration,
}

impl AcmeJob {
    /// A job with the daemon's test knobs read from its environment
    /// (`CLUSTERD_ACME_RENEW_AFTER`, `CLUSTERD_ACME_RETRY_FIRST`, durations like `5s`).
    #[must_use]
    pub fn new(acme: Acme, dir: PathBuf, tls: TlsTerminator) -> Self {
        let env = |name: &str| {
            let v = std::env::var(name).ok()?;
            humantime::parse_duration(&v)
                .inspect_err(|e| tracing::warn!(variable = name, value = %v, error = %e, "ignored (expected a duration like 5s)"))
                .ok()
        };
        Self {
            acme,
            dir,
            tls,
            renew_after: env("CLUSTERD_ACME_RENEW_AFTER"),
            retry_first: env("CLUSTERD_ACME_RETRY_FIRST").unwrap_or(rules::RETRY_FIRST),
        }
    }

    fn directory(&self) -> &str {
        self.acme
            .directory
            .as_deref()
            .unwrap_or(rules::DEFAULT_DIRECTORY)
    }

    fn certs(&self) -> &AcmeCerts {
        &self.tls.acme
    }
}

/// The certificate being served.
#[derive(Debug, Clone, Copy)]
struct Current {
    not_before: SystemTime,
    not_after: SystemTime,
    /// When this daemon started serving it (for the test knob).
    loaded: SystemTime,
}

/// Runs until `cancel`: serves the stored certificate if it is still good, orders one
/// when there is none or it is due, and retries failures with backoff. Every outcome
/// is passed to `report`.
pub async fn run(job: AcmeJob, cancel: CancellationToken, report: impl Fn(AcmeEvent) + Send) {
    let mut current = match load_stored(&job) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dir = %job.dir.display(), error = %e, "stored ACME certificate not used; ordering a new one");
            None
        }
    };
    if let Some(c) = &current {
        tracing::info!(domains = ?job.acme.domains, expires = %humantime::format_rfc3339_seconds(c.not_after), "serving the stored ACME certificate");
    }
    let mut failures = 0u32;
    loop {
        let now = SystemTime::now();
        let due = current.map_or(now, |c| {
            rules::renew_at(c.not_before, c.not_after, c.loaded, job.renew_after)
        });
        if let Ok(wait) = due.duration_since(now) {
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait.min(MAX_SLEEP)) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        }
        let attempt = tokio::select! {
            // instant-acme's HTTP client has no timeout of its own: a server that stops
            // answering must not stall renewals forever.
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, order(&job)) => r.unwrap_or_else(|_| {
                Err(Error::AcmeOrder(format!(
                    "no answer from {} within {}",
                    job.directory(),
                    humantime::format_duration(ATTEMPT_TIMEOUT)
                )))
            }),
            () = cancel.cancelled() => {
                clear_challenges(&job);
                return;
            }
        };
        match attempt {
            Ok(new) => {
                failures = 0;
                let kind = if current.is_some() {
                    AcmeEventKind::Renewed
                } else {
                    AcmeEventKind::Obtained
                };
                report(AcmeEvent {
                    message: format!(
                        "certificate for {} {} from {}, valid until {}; new connections get it",
                        job.acme.domains.join(", "),
                        if kind == AcmeEventKind::Renewed {
                            "renewed"
                        } else {
                            "obtained"
                        },
                        job.directory(),
                        humantime::format_rfc3339_seconds(new.not_after),
                    ),
                    kind,
                });
                current = Some(new);
            }
            Err(e) => {
                // An attempt cut short (timeout) leaves its challenges behind.
                clear_challenges(&job);
                failures += 1;
                let now = SystemTime::now();
                let delay = rules::retry_delay(
                    failures,
                    job.retry_first,
                    now,
                    current.map(|c| c.not_after),
                );
                let still = match current {
                    Some(c) => format!(
                        "; still serving the current certificate (valid until {})",
                        humantime::format_rfc3339_seconds(c.not_after)
                    ),
                    None => "; no certificate to serve for these names yet".to_string(),
                };
                report(AcmeEvent {
                    kind: AcmeEventKind::Failed,
                    message: format!(
                        "certificate for {}: {e}{still}; next attempt in {}",
                        job.acme.domains.join(", "),
                        humantime::format_duration(delay)
                    ),
                });
                // Then `due` (already past) makes the loop try again at once.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Serves the stored certificate if it loads, covers every domain and has not expired.
fn load_stored(job: &AcmeJob) -> Result<Option<Current>> {
    let cert = job.dir.join(CERT_FILE);
    let key = job.dir.join(KEY_FILE);
    if !cert.exists() {
        return Ok(None);
    }
    let provider = rustls::crypto::ring::default_provider();
    let ck = load_pair(&cert, &key, &provider).map_err(|e| Error::AcmeOrder(e.to_string()))?;
    let (not_before, not_after) = leaf_validity(&ck)
        .ok_or_else(|| Error::AcmeOrder(format!("{}: unreadable validity", cert.display())))?;
    if let Some(d) = uncovered(&ck, &job.acme.domains) {
        tracing::info!(domain = %d, "the stored ACME certificate does not cover this domain; ordering a new one");
        return Ok(None);
    }
    if not_after <= SystemTime::now() {
        tracing::info!(cert = %cert.display(), "the stored ACME certificate has expired; ordering a new one");
        return Ok(None);
    }
    job.certs().set_cert(Some((ck, not_after)));
    Ok(Some(Current {
        not_before,
        not_after,
        loaded: SystemTime::now(),
    }))
}

/// The first of `domains` that `ck` does not cover.
fn uncovered<'a>(ck: &CertifiedKey, domains: &'a [String]) -> Option<&'a str> {
    domains
        .iter()
        .map(String::as_str)
        .find(|d| !ServerName::try_from(*d).is_ok_and(|name| covers(ck, &name)))
}

/// One order: account, TLS-ALPN-01 for each pending authorization, CSR, certificate,
/// files, then served.
async fn order(job: &AcmeJob) -> Result<Current> {
    let account = account(job).await?;
    let ids: Vec<Identifier> = job
        .acme
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(acme_err(format!("placing an order at {}", job.directory())))?;
    let validated = validate(job, &mut order).await;
    clear_challenges(job);
    validated?;

    let key = rcgen::KeyPair::generate().map_err(|source| Error::AcmeKey {
        what: "the certificate's key",
        source,
    })?;
    let mut params = rcgen::CertificateParams::new(job.acme.domains.clone()).map_err(|source| {
        Error::AcmeKey {
            what: "the certificate request",
            source,
        }
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|source| Error::AcmeKey {
            what: "the certificate request",
            source,
        })?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(acme_err("finalizing the order".into()))?;
    let chain = order
        .poll_certificate(&retry_policy())
        .await
        .map_err(acme_err("downloading the certificate".into()))?;

    store_files(&job.dir, &chain, &key.serialize_pem())?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = load_pair(&job.dir.join(CERT_FILE), &job.dir.join(KEY_FILE), &provider)
        .map_err(|e| Error::AcmeOrder(format!("the issued certificate: {e}")))?;
    let (not_before, not_after) = leaf_validity(&ck).ok_or_else(|| {
        Error::AcmeOrder("the issued certificate has no readable validity".into())
    })?;
    if let Some(d) = uncovered(&ck, &job.acme.domains) {
        return Err(Error::AcmeOrder(format!(
            "the issued certificate does not cover {d}"
        )));
    }
    job.certs().set_cert(Some((ck, not_after)));
    Ok(Current {
        not_before,
        not_after,
        loaded: SystemTime::now(),
    })
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(ORDER_TIMEOUT)
}

/// Answers each pending authorization's TLS-ALPN-01 challenge and waits for the order
/// to become ready.
async fn validate(job: &AcmeJob, order: &mut instant_acme::Order) -> Result<()> {
    let provider = rustls::crypto::ring::default_provider();
    {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(acme_err("reading an authorization".into()))?;
            let domain = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Error::AcmeOrder(format!(
                        "the authorization for {domain} is {other:?}"
                    )))
                }
            }
            let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| {
                Error::AcmeOrder(format!(
                    "the ACME server offers no tls-alpn-01 challenge for {domain} (clusterd answers TLS-ALPN-01 only)"
                ))
            })?;
            let digest = challenge.key_authorization().digest();
            let ck = challenge_cert(&domain, digest.as_ref(), &provider)?;
            job.certs().set_challenge(&domain, Some(ck));
            challenge
                .set_ready()
                .await
                .map_err(acme_err(format!("answering the challenge for {domain}")))?;
        }
    }
    let status = order
        .poll_ready(&retry_policy())
        .await
        .map_err(acme_err("waiting for validation".into()))?;
    if status == OrderStatus::Ready {
        return Ok(());
    }
    // Why: the challenges' problem documents.
    let mut reasons = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(authz)) = authzs.next().await {
        for c in &authz.challenges {
            if let Some(p) = &c.error {
                reasons.push(format!("{}: {p}", authz.identifier()));
            }
        }
    }
    Err(Error::AcmeOrder(format!(
        "the order is {status:?}{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join("; "))
        }
    )))
}

fn clear_challenges(job: &AcmeJob) {
    for d in &job.acme.domains {
        job.certs().set_challenge(d, None);
    }
}

/// The TLS-ALPN-01 answer for `domain`: a self-signed certificate for the name alone,
/// with the critical `acmeIdentifier` extension holding `digest` (RFC 8737 §3).
fn challenge_cert(
    domain: &str,
    digest: &[u8],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>> {
    let gen = |source| Error::AcmeKey {
        what: "the challenge certificate",
        source,
    };
    let key = rcgen::KeyPair::generate().map_err(gen)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(gen)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(gen)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| Error::AcmeOrder(format!("loading the challenge key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// The account file: the credentials with the directory they belong to, so that a
/// changed `directory` registers anew instead of presenting a foreign account.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The stored account if it belongs to the directory, else a new one (saved).
async fn account(job: &AcmeJob) -> Result<Account> {
    let directory = job.directory().to_string();
    let builder = || {
        match &job.acme.ca_bundle {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        }
        .map_err(acme_err(match &job.acme.ca_bundle {
            Some(ca) => format!("the HTTP client trusting {}", ca.display()),
            None => "the HTTP client".to_string(),
        }))
    };
    let path = job.dir.join(ACCOUNT_FILE);
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<SavedAccount>(&bytes) {
            Ok(saved) if saved.directory == directory => {
                match builder()?.from_credentials(saved.credentials).await {
                    Ok(account) => return Ok(account),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "stored ACME account not usable; registering a new one");
                    }
                }
            }
            Ok(_) => {
                tracing::info!(file = %path.display(), "stored ACME account is for another directory; registering a new one");
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable ACME account file; registering a new one");
            }
        }
    }
    let contact = job.acme.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                // Configuring `tls.acme` is the operator's agreement (docs/manifest.md).
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            directory.clone(),
            None,
        )
        .await
        .map_err(acme_err(format!("creating an account at {directory}")))?;
    let saved = serde_json::to_vec_pretty(&SavedAccount {
        directory,
        credentials,
    })
    .map_err(|e| Error::AcmeOrder(format!("serializing the account: {e}")))?;
    make_dir(&job.dir)?;
    write_file(&path, &saved, 0o600)?;
    Ok(account)
}

fn acme_err(what: String) -> impl FnOnce(instant_acme::Error) -> Error {
    move |source| Error::Acme { what, source }
}

fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(|| format!("creating {}", dir.display()))
}

/// Writes the key (mode 0600) then the chain, each through a temporary file and a
/// rename. A crash between the two renames leaves the new key with the old chain:
/// [`load_stored`] refuses that pair as a mismatch, and the next start orders anew.
fn store_files(dir: &Path, chain: &str, key_pem: &str) -> Result<()> {
    make_dir(dir)?;
    write_file(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(CERT_FILE), chain.as_bytes(), 0o644)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The leaf's validity period.
fn leaf_validity(ck: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    validity(ck.end_entity_cert().ok()?.as_ref())
}

/// `notBefore` and `notAfter` of a DER X.509 certificate: a few steps of DER rather than
/// a whole X.509 parser for two fields.
fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let mut skipped = 0;
    loop {
        let (tag, body, rest) = tlv(tbs)?;
        if tag == 0xa0 && skipped == 0 {
            tbs = rest;
            continue;
        }
        if skipped == 3 {
            if tag != 0x30 {
                return None;
            }
            let (t1, a, rest) = tlv(body)?;
            let (t2, b, _) = tlv(rest)?;
            return Some((asn1_time(t1, a)?, asn1_time(t2, b)?));
        }
        skipped += 1;
        tbs = rest;
    }
}

/// One DER tag-length-value: `(tag, value, rest)`.
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *d.first()?;
    let first = *d.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in d.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let value = d.get(head..head.checked_add(len)?)?;
    Some((tag, value, &d[head + len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, 0x18).
fn asn1_time(tag: u8, v: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    let days = days_from_civil(year, month, day);
    let secs = days * 86400 + h * 3600 + m * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_http_client_builds_with_the_system_roots() {
        // ring is rustls' only provider in this build, so no provider has to be
        // installed by the daemon first.
        assert!(Account::builder().is_ok());
    }

    #[test]
    fn validity_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (nb, na) = validity(cert.der()).unwrap();
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        // 2024-02-29T00:00:00Z (UTCTime) and 2051-01-01T00:00:00Z (GeneralizedTime).
        assert_eq!(secs(nb), 1_709_164_800);
        assert_eq!(secs(na), 2_556_144_000);
        assert!(validity(b"\x30\x03\x02\x01\x01").is_none());
        assert!(validity(&[]).is_none());
    }

    #[test]
    fn a_challenge_certificate_carries_the_digest_and_the_name() {
        let provider = rustls::crypto::ring::default_provider();
        let ck = challenge_cert("a.test", &[7u8; 32], &provider).unwrap();
        let der = ck.end_entity_cert().unwrap().as_ref().to_vec();
        // id-pe-acmeIdentifier 1.3.6.1.5.5.7.1.31, then the OCTET STRING of the digest.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(der.windows(oid.len()).any(|w| w == oid));
        assert!(der
            .windows(34)
            .any(|w| w[..2] == [0x04, 0x20] && w[2..] == [7u8; 32]));
        // (webpki refuses to parse it: the extension is critical and unknown to it,
        // which is why `covers` is never asked about a challenge certificate.)
        assert!(!covers(&ck, &ServerName::try_from("a.test").unwrap()));
    }

    #[test]
    fn stored_files_are_private_and_reloaded_when_they_cover_the_domains() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("acme/web/0.0.0.0-443");
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        store_files(&d, &ck.cert.pem(), &ck.key_pair.serialize_pem()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&d), 0o700);
        let job = |domains: &[&str]| {
            AcmeJob::new(
                Acme {
                    domains: domains.iter().map(|s| (*s).to_string()).collect(),
                    email: None,
                    directory: None,
                    ca_bundle: None,
                },
                d.clone(),
                TlsTerminator::default(),
            )
        };
        let j = job(&["a.test"]);
        assert!(load_stored(&j).unwrap().is_some());
        assert!(j.tls.acme_expiry().is_some());
        let j = job(&["a.test", "b.test"]);
        assert!(load_stored(&j).unwrap().is_none(), "b.test is not covered");
        assert!(j.tls.acme_expiry().is_none());
    }
}

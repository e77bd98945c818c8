//! The pure rules of `listen[].tls.acme`: what a valid block is, when a certificate is
//! renewed, how long to wait after a failure, and where a listener's certificate lives
//! in the state dir. The ACME client itself (network, files, clocks) is in the runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The directory used when `tls.acme.directory` is left out: Let's Encrypt's
/// production server.
pub const DEFAULT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The first wait after a failed order; doubled on each further failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(60);

/// The longest wait between two attempts after failures.
pub const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// Why a domain cannot be in `tls.acme.domains`, if it cannot.
#[must_use]
pub fn domain_problem(name: &str) -> Option<String> {
    if name.starts_with("*.") {
        return Some(format!(
            "`{name}` is a wildcard, which ACME grants only through DNS-01 challenges, and clusterd answers TLS-ALPN-01 on its own listener (expected plain names like example.com, or a wildcard certificate in tls.certificates)"
        ));
    }
    let bad = |why: &str| {
        Some(format!(
            "`{name}` is not a valid DNS name: {why} (expected a name like example.com: labels of a-z, 0-9 and `-`, separated by dots)"
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Some(format!(
            "`{name}` is an IP address (expected a DNS name: this release orders certificates for names only)"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("an empty label");
        }
        if label.len() > 63 {
            return bad("a label longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with `-`");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(if label.bytes().any(|b| b.is_ascii_uppercase()) {
                "upper-case letters (write it in lower case)"
            } else {
                "a character other than a-z, 0-9 and `-` (internationalized names go in their xn-- form)"
            });
        }
    }
    None
}

/// Why `email` is not an address an ACME server takes as a contact, if it is not.
#[must_use]
pub fn email_problem(email: &str) -> Option<String> {
    let expected = "expected an address like ops@example.com";
    let Some((local, host)) = email.split_once('@') else {
        return Some(format!("`{email}` has no `@` ({expected})"));
    };
    if local.is_empty() || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("`{email}` is not an e-mail address ({expected})"));
    }
    if host.contains('@') || domain_problem(host).is_some() || !host.contains('.') {
        return Some(format!(
            "`{email}`: `{host}` is not a mail domain ({expected})"
        ));
    }
    None
}

/// Why `url` cannot be an ACME directory, if it cannot: RFC 8555 requires HTTPS.
#[must_use]
pub fn directory_problem(url: &str) -> Option<String> {
    let expected = "expected the https:// URL of the ACME server's directory, like https://acme-v02.api.letsencrypt.org/directory";
    let Some(rest) = url.strip_prefix("https://") else {
        return Some(format!("`{url}` is not an https:// URL ({expected})"));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || url.chars().any(char::is_whitespace) {
        return Some(format!("`{url}` has no host ({expected})"));
    }
    None
}

/// When to replace a certificate valid from `not_before` to `not_after`: once a third
/// of its lifetime remains (Let's Encrypt's advice: 30 days before the end of a 90-day
/// certificate), or `renew_after` past `loaded` when set (a knob for tests, which
/// cannot wait weeks). A certificate already expired or not yet valid is due now.
#[must_use]
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    loaded: SystemTime,
    renew_after: Option<Duration>,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let normal = not_after - lifetime / 3;
    match renew_after.and_then(|d| loaded.checked_add(d)) {
        Some(t) => normal.min(t),
        None => normal,
    }
}

/// How long to wait after the `failures`-th failed attempt in a row (1-based):
/// [`RETRY_FIRST`] doubled each time, at most [`RETRY_MAX`], and never past the
/// point where the current certificate (if any) would expire, less a minute.
#[must_use]
pub fn retry_delay(
    failures: u32,
    first: Duration,
    now: SystemTime,
    expires: Option<SystemTime>,
) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let backoff = first.saturating_mul(1u32 << exp).min(RETRY_MAX.max(first));
    match expires.and_then(|e| e.duration_since(now).ok()) {
        Some(left) if left > Duration::from_secs(120) => {
            backoff.min(left - Duration::from_secs(60))
        }
        _ => backoff,
    }
}

/// Where one listener's ACME files live: `STATE_DIR/acme/APP/ADDRESS-PORT/`, holding
/// `cert.pem` (the chain), `key.pem` (mode 0600) and `account.json` (the ACME
/// account's credentials, mode 0600). Per listener because two listeners of one app may
/// ask for different names; the account is kept so a restart does not register anew.
#[must_use]
pub fn listener_dir(state_dir: &Path, app: &str, address: &str, port: u32) -> PathBuf {
    // An IPv6 address has `:`, fine in a file name but awkward in a shell.
    let address: String = address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir
        .join("acme")
        .join(app)
        .join(format!("{address}-{port}"))
}

/// The files of [`listener_dir`].
pub const CERT_FILE: &str = "cert.pem";
/// The private key, mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// The account credentials, mode 0600.
pub const ACCOUNT_FILE: &str = "account.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in [
            "example.com",
            "localhost",
            "a-b.c0.example",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(domain_problem(ok), None, "{ok}");
        }
        for (bad, part) in [
            ("*.example.com", "wildcard"),
            ("", "empty"),
            ("a..b", "empty label"),
            ("-a.com", "starts or ends"),
            ("Example.com", "lower case"),
            ("exa_mple.com", "other than"),
            ("127.0.0.1", "IP address"),
            (&"a".repeat(64), "63"),
        ] {
            let got = domain_problem(bad).unwrap_or_default();
            assert!(got.contains(part), "{bad}: {got}");
        }
    }

    #[test]
    fn emails() {
        assert_eq!(email_problem("ops@example.com"), None);
        assert!(email_problem("ops").unwrap().contains("no `@`"));
        assert!(email_problem("@example.com").is_some());
        assert!(email_problem("ops@localhost")
            .unwrap()
            .contains("mail domain"));
        assert!(email_problem("o ps@example.com").is_some());
        assert!(email_problem("a@b@example.com").is_some());
    }

    #[test]
    fn directories() {
        assert_eq!(directory_problem(DEFAULT_DIRECTORY), None);
        assert_eq!(directory_problem("https://127.0.0.1:14000/dir"), None);
        assert!(directory_problem("http://example.com/dir")
            .unwrap()
            .contains("not an https:// URL"));
        assert!(directory_problem("https:///dir")
            .unwrap()
            .contains("no host"));
    }

    #[test]
    fn renewal_at_two_thirds_of_the_lifetime_or_the_test_knob() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86400);
        let at = renew_at(t0, t0 + 90 * day, t0 + day, None);
        assert_eq!(at, t0 + 60 * day);
        assert_eq!(
            renew_at(t0, t0 + 90 * day, t0 + day, Some(Duration::from_secs(5))),
            t0 + day + Duration::from_secs(5)
        );
        // The knob never delays past the normal time, nor overflows.
        assert_eq!(renew_at(t0, t0 + 90 * day, t0, Some(100 * day)), at);
        assert_eq!(renew_at(t0, t0 + 90 * day, t0, Some(Duration::MAX)), at);
        // Nonsense validity: due at its end (which is already past for a caller).
        assert_eq!(renew_at(t0 + day, t0, t0, None), t0);
    }

    #[test]
    fn retries_back_off_but_not_past_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m = Duration::from_secs(60);
        assert_eq!(retry_delay(1, RETRY_FIRST, now, None), m);
        assert_eq!(retry_delay(2, RETRY_FIRST, now, None), 2 * m);
        assert_eq!(retry_delay(4, RETRY_FIRST, now, None), 8 * m);
        assert_eq!(retry_delay(40, RETRY_FIRST, now, None), RETRY_MAX);
        assert_eq!(
            retry_delay(40, RETRY_FIRST, now, Some(now + 30 * m)),
            29 * m
        );
        // Expired or nearly: the plain backoff.
        assert_eq!(retry_delay(3, RETRY_FIRST, now, Some(now)), 4 * m);
    }

    #[test]
    fn files_per_app_and_listener() {
        let d = listener_dir(Path::new("/var/lib/clusterd"), "web", "0.0.0.0", 443);
        assert_eq!(d, Path::new("/var/lib/clusterd/acme/web/0.0.0.0-443"));
        let d = listener_dir(Path::new("/s"), "web", "::", 443);
        assert_eq!(d, Path::new("/s/acme/web/__-443"));
    }
}

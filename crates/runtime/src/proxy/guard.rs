//! What the http proxy refuses to forward, decided from the request head alone.
//!
//! hyper already rejects what it cannot parse (bad request line, conflicting
//! `Content-Length`s, a `Transfer-Encoding` not ending in `chunked`). This module adds the
//! rules where hyper is lenient but a proxy must not be, because the worker behind it may
//! read the same bytes differently (RFC 9112 §3.2, §3.2.3, §6.1; RFC 9110 §9.3.6):
//!
//! | Request | Answer | Why |
//! |---|---|---|
//! | `CONNECT` | 405 | the proxy is not a tunnel to arbitrary hosts |
//! | authority-form target on another method (`GET evil.example HTTP/1.1`) | 400 | only CONNECT may use it; it would rewrite Host and Forwarded |
//! | absolute-form with userinfo (`http://a@b/`), or a scheme other than http(s) | 400 | forbidden by RFC 9110 §4.2.4 |
//! | `*` target on another method than OPTIONS | 400 | RFC 9112 §3.2.4 |
//! | two or more `Host` lines; no `Host` in HTTP/1.1 | 400 | RFC 9112 §3.2: MUST answer 400 |
//! | `Host` (or target authority) with a comma, space, slash or other stray byte, or a non-numeric port | 400 | host-header confusion between the proxy and the worker |
//! | `Transfer-Encoding` other than exactly `chunked` (`gzip, chunked`) | 501 | the proxy would silently drop the other codings |
//!
//! Everything here is pure: head in, `Ok` or a [`Reject`] with its status.

use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode, Uri, Version};

/// Why a request is refused before it reaches any worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reject {
    /// What the client gets.
    pub(crate) status: StatusCode,
    /// The body of the answer (one line, ends with `\n`).
    pub(crate) reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// Checks one request head. See the module table for the rules.
pub(crate) fn check_request(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), Reject> {
    check_method(method)?;
    check_target(method, uri)?;
    check_hosts(
        version == Version::HTTP_11 && uri.authority().is_none(),
        headers.get_all(header::HOST).iter().map(|v| v.as_bytes()),
    )?;
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if te.peek().is_some() {
        check_transfer_encoding(te.map(|v| v.as_bytes()))?;
    }
    Ok(())
}

/// `CONNECT` is refused: the proxy is not a tunnel to arbitrary hosts.
pub(crate) fn check_method(method: &Method) -> Result<(), Reject> {
    if method == Method::CONNECT {
        return Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        ));
    }
    Ok(())
}

/// The `Host` lines of a request: at most one, a valid authority, and present when
/// `required` (HTTP/1.1 without an absolute-form target).
pub(crate) fn check_hosts<'a>(
    required: bool,
    mut hosts: impl Iterator<Item = &'a [u8]>,
) -> Result<(), Reject> {
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(reject(
            StatusCode::BAD_REQUEST,
            "more than one Host header\n",
        )),
        (Some(host), None) => {
            let visible = host.iter().all(|b| (0x20..0x7f).contains(b));
            if visible && std::str::from_utf8(host).is_ok_and(valid_authority) {
                Ok(())
            } else {
                Err(reject(StatusCode::BAD_REQUEST, "invalid Host header\n"))
            }
        }
        (None, None) if required => Err(reject(StatusCode::BAD_REQUEST, "missing Host header\n")),
        (None, None) => Ok(()),
    }
}

/// The values of a request's `Transfer-Encoding` lines (present at least once): exactly
/// one `chunked`, since the proxy re-frames the body and would drop any other coding.
pub(crate) fn check_transfer_encoding<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<(), Reject> {
    let mut codings = values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(reject(
            StatusCode::NOT_IMPLEMENTED,
            "only Transfer-Encoding: chunked is supported\n",
        )),
    }
}

/// The request target: origin-form (`/path`), absolute-form (`http://host/path`), or
/// `*` for OPTIONS. Authority-form belongs to CONNECT, which is refused earlier.
pub(crate) fn check_target(method: &Method, uri: &Uri) -> Result<(), Reject> {
    let bad = |reason| Err(reject(StatusCode::BAD_REQUEST, reason));
    match (uri.scheme_str(), uri.authority()) {
        (None, None) => {
            if uri.path() == "*" && method != Method::OPTIONS {
                return bad("`*` is only a target for OPTIONS\n");
            }
            Ok(())
        }
        (None, Some(_)) => bad("authority-form target is only for CONNECT\n"),
        (Some(scheme), Some(auth)) => {
            if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
                return bad("unsupported scheme in request target\n");
            }
            if auth.as_str().contains('@') {
                return bad("userinfo in request target\n");
            }
            if !valid_authority(auth.as_str()) {
                return bad("invalid authority in request target\n");
            }
            Ok(())
        }
        (Some(_), None) => bad("request target without authority\n"),
    }
}

/// `host [":" port]` with host a DNS-ish name, an IPv4 address or a bracketed IPv6
/// literal. Stricter than RFC 3986's reg-name (no sub-delims such as `,` `;` `!`): what
/// no real client sends and what parsers disagree on is refused.
pub(crate) fn valid_authority(text: &str) -> bool {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("x", Some(port)),
                None => return false,
            },
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%'));
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// Whether the request asks to upgrade to a protocol the proxy may pass through
/// (`allowed`, compared case-insensitively; `websocket` by default). Any other upgrade
/// (notably `h2c`, which would hand the client a raw HTTP/2 connection to the worker
/// past the proxy) is forwarded as a plain request with the upgrade removed.
pub(crate) fn allowed_upgrade(headers: &HeaderMap, allowed: &[String]) -> bool {
    super::headers::connection_has(headers, "upgrade")
        && upgrade_allowed(
            headers
                .get_all(header::UPGRADE)
                .iter()
                .map(|v| v.as_bytes()),
            allowed,
        )
}

/// [`allowed_upgrade`] once `Connection: upgrade` is known to be there: whether the
/// `Upgrade` values name at least one protocol, and only allowed ones.
pub(crate) fn upgrade_allowed<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    allowed: &[String],
) -> bool {
    let mut protocols = values
        .filter(|v| v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t'))
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .peekable();
    protocols.peek().is_some()
        && protocols.all(|p| {
            let name = p.split(|b| *b == b'/').next().unwrap_or(p);
            allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn head(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Method, target, version, header lines, the refusal's status (None: accepted).
    type Case<'a> = (
        &'a str,
        &'a str,
        Version,
        &'a [(&'a str, &'a str)],
        Option<u16>,
    );

    #[test]
    fn request_heads_table() {
        let ok = None;
        let cases: &[Case<'_>] = &[
            ("GET", "/", Version::HTTP_11, &[("host", "app.example")], ok),
            (
                "GET",
                "/a?b",
                Version::HTTP_11,
                &[("host", "app.example:8080")],
                ok,
            ),
            (
                "GET",
                "/",
                Version::HTTP_11,
                &[("host", "127.0.0.1:80")],
                ok,
            ),
            ("GET", "/", Version::HTTP_11, &[("host", "[::1]:8080")], ok),
            ("GET", "/", Version::HTTP_11, &[("host", "[::1]")], ok),
            ("GET", "/", Version::HTTP_10, &[], ok),
            ("GET", "http://app.example/x", Version::HTTP_11, &[], ok),
            (
                "GET",
                "https://app.example:443/x",
                Version::HTTP_11,
                &[("host", "other")],
                ok,
            ),
            ("OPTIONS", "*", Version::HTTP_11, &[("host", "a")], ok),
            (
                "POST",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("transfer-encoding", "chunked")],
                ok,
            ),
            (
                "POST",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("transfer-encoding", "Chunked ")],
                ok,
            ),
            // Refused.
            (
                "CONNECT",
                "app.example:443",
                Version::HTTP_11,
                &[("host", "app.example:443")],
                Some(405),
            ),
            (
                "GET",
                "evil.example:80",
                Version::HTTP_11,
                &[("host", "app")],
                Some(400),
            ),
            (
                "GET",
                "http://user:pw@app.example/",
                Version::HTTP_11,
                &[("host", "app")],
                Some(400),
            ),
            (
                "GET",
                "ftp://app.example/",
                Version::HTTP_11,
                &[("host", "app")],
                Some(400),
            ),
            ("GET", "*", Version::HTTP_11, &[("host", "a")], Some(400)),
            ("GET", "/", Version::HTTP_11, &[], Some(400)),
            (
                "GET",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("host", "b")],
                Some(400),
            ),
            (
                "GET",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("host", "a")],
                Some(400),
            ),
            ("GET", "/", Version::HTTP_11, &[("host", "a,b")], Some(400)),
            ("GET", "/", Version::HTTP_11, &[("host", "a b")], Some(400)),
            ("GET", "/", Version::HTTP_11, &[("host", "a/b")], Some(400)),
            ("GET", "/", Version::HTTP_11, &[("host", "a@b")], Some(400)),
            ("GET", "/", Version::HTTP_11, &[("host", "")], Some(400)),
            (
                "GET",
                "/",
                Version::HTTP_11,
                &[("host", "a:80x")],
                Some(400),
            ),
            ("GET", "/", Version::HTTP_11, &[("host", "[::1")], Some(400)),
            (
                "GET",
                "/",
                Version::HTTP_11,
                &[("host", "[nope]:80")],
                Some(400),
            ),
            (
                "POST",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                Some(501),
            ),
            (
                "POST",
                "/",
                Version::HTTP_11,
                &[
                    ("host", "a"),
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                Some(501),
            ),
            (
                "POST",
                "/",
                Version::HTTP_11,
                &[("host", "a"), ("transfer-encoding", "chunked, chunked")],
                Some(501),
            ),
        ];
        for (method, target, version, lines, want) in cases {
            let method: Method = method.parse().unwrap();
            let uri: Uri = target.parse().unwrap();
            let got = check_request(&method, &uri, *version, &head(lines))
                .err()
                .map(|r| r.status.as_u16());
            assert_eq!(got, *want, "{method} {target} {lines:?}");
        }
    }

    #[test]
    fn only_allowed_upgrades_pass() {
        let ws = vec!["websocket".to_string()];
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], true),
            (
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "WebSocket"),
                ],
                true,
            ),
            (
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                ],
                false,
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "websocket, h2c")],
                false,
            ),
            (&[("upgrade", "websocket")], false),
            (&[("connection", "upgrade"), ("upgrade", "")], false),
            (&[("connection", "upgrade")], false),
        ];
        for (lines, want) in cases {
            assert_eq!(allowed_upgrade(&head(lines), &ws), *want, "{lines:?}");
        }
        let h2c = vec!["websocket".to_string(), "h2c".to_string()];
        assert!(allowed_upgrade(
            &head(&[("connection", "upgrade"), ("upgrade", "h2c")]),
            &h2c
        ));
    }
}

//! Header rewriting between the client and the worker, both ways.
//!
//! # What a worker receives (documented in docs/manifest.md, "Headers the workers get")
//! - `Host`: the client's, or the authority of an absolute-form target; for an HTTP/1.0
//!   client without one, the address it connected to.
//! - `X-Forwarded-For`: the client's address. From a trusted proxy
//!   (`listen[].trustedProxies`), appended to the list it sent.
//! - `X-Forwarded-Proto`: `http`, or `https` on a TLS listener; `X-Forwarded-Host`: the Host; `X-Forwarded-Port`: the
//!   public port. From a trusted proxy, its own values are kept when present.
//! - `Forwarded` (RFC 7239): one element `for=...;proto=http;host="..."` for this hop;
//!   from a trusted proxy, appended after the elements it sent.
//! - Headers some frameworks read as the client's address (`X-Real-IP`,
//!   `True-Client-IP`, ...: [`CLIENT_IP_HEADERS`]) reach the worker only from a trusted
//!   proxy; from anyone else they are removed, so a client cannot pose as another.
//! - Hop-by-hop headers (`Connection` and what it lists, `Keep-Alive`, `TE` except
//!   `trailers`, `Transfer-Encoding`, `Upgrade` except an allowed upgrade,
//!   `Proxy-Connection`, `HTTP2-Settings`) are removed.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;

/// Headers that carry "the client's address" or the original request's scheme, host
/// or port in some framework's convention; only a trusted proxy may set them.
pub(crate) static CLIENT_IP_HEADERS: [HeaderName; 15] = [
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-original-forwarded-for"),
    HeaderName::from_static("x-forwarded"),
    HeaderName::from_static("forwarded-for"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-forwarded-prefix"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// What this hop sets, and an untrusted client may therefore not send.
static FORWARDING_HEADERS: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_FORWARDED_PORT,
    header::FORWARDED,
];

/// Hop-by-hop headers that are always removed (RFC 9110 §7.6.1), besides those a
/// `Connection` header names.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes every header whose name `doomed` picks, in one pass over the (few) names
/// present. Removing a list of candidates one by one instead would hash every
/// candidate, present or not: dozens of lookups per request, the largest user-space
/// item of the proxy's profile.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether `Connection` lists `token` (case-insensitive, comma-separated).
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the headers that describe one connection rather than the message
/// (RFC 9110 §7.6.1): those named in `Connection`, and the well-known ones. `TE` is
/// kept only as `TE: trailers`, the one value meaningful end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    remove_where(headers, |n| HOP_BY_HOP.contains(n) || listed.contains(n));
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A worker's response head on its way to the client. A response with both
/// `Transfer-Encoding` and `Content-Length` is framed by the former and the latter must
/// go (RFC 9112 §6.3): the body is re-framed for the client, and a stale length would
/// truncate or desynchronize it.
pub(crate) fn response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers);
}

/// The host the client asked for: the authority of an absolute-form target wins over
/// `Host` (RFC 9112 §3.2.2); an HTTP/1.0 client may send neither, and the worker
/// still needs one, so fall back to the address the client connected to.
pub(crate) fn host_of(
    uri: &Uri,
    headers: &HeaderMap,
    local: Option<SocketAddr>,
) -> Option<HeaderValue> {
    if let Some(auth) = uri.authority() {
        if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
            return Some(v);
        }
    }
    if let Some(h) = headers.get(header::HOST) {
        return Some(h.clone());
    }
    local.and_then(|a| HeaderValue::from_str(&a.to_string()).ok())
}

/// HTTP/2 lets a client split `Cookie` into one field per cookie (RFC 9113 §8.2.3);
/// an HTTP/1.1 worker expects one line, so they are joined with `"; "`.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// The request target as a worker expects it from a proxy: origin-form.
pub(crate) fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if uri.authority().is_some() => Uri::from(pq.clone()),
        _ => uri.clone(),
    }
}

/// Who is on the other end of a client connection, for [`forwarding`]: the parts of
/// the forwarding headers that depend only on the connection, formatted once when it
/// is accepted rather than for every request on it.
#[derive(Debug, Clone)]
pub(crate) struct ClientHop {
    /// Whether the peer is in `trustedProxies`: its forwarding headers are believed.
    trusted: bool,
    /// `X-Forwarded-Proto`: whether the client connection is TLS.
    proto: HeaderValue,
    /// The client's address (canonical: no IPv4-mapped IPv6), for `X-Forwarded-For`.
    ip: HeaderValue,
    /// `X-Forwarded-Port`: the public port it connected to.
    port: Option<HeaderValue>,
    /// This hop's `Forwarded` element without its host: `for=...;proto=...`.
    element: String,
}

impl ClientHop {
    /// Whether the peer is a trusted proxy.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted
    }

    /// `peer` connected to `local` (over TLS if `https`); `trusted` if it is in
    /// `trustedProxies`.
    pub(crate) fn new(
        peer: SocketAddr,
        local: Option<SocketAddr>,
        trusted: bool,
        https: bool,
    ) -> Self {
        let ip = peer.ip().to_canonical();
        let proto = if https { "https" } else { "http" };
        let element = if ip.is_ipv6() {
            format!("for=\"[{ip}]\";proto={proto}")
        } else {
            format!("for={ip};proto={proto}")
        };
        Self {
            trusted,
            proto: HeaderValue::from_static(proto),
            ip: HeaderValue::try_from(ip.to_string())
                .expect("an IP address is a valid header value"),
            port: local.map(|l| HeaderValue::from(l.port())),
            element,
        }
    }
}

/// Sets the forwarding headers for this hop: `X-Forwarded-For/Proto/Host/Port` and an
/// RFC 7239 `Forwarded` element. From an untrusted peer every such header it sent is
/// replaced (and [`CLIENT_IP_HEADERS`] removed); from a trusted proxy its values are
/// kept and this hop is appended to the lists. `host` is the host the request asked
/// for ([`host_of`]).
pub(crate) fn forwarding(headers: &mut HeaderMap, hop: &ClientHop, host: Option<&HeaderValue>) {
    if !hop.trusted {
        remove_where(headers, |n| {
            CLIENT_IP_HEADERS.contains(n) || FORWARDING_HEADERS.contains(n)
        });
    }
    // From an untrusted peer nothing of these is left: skip the lookups.
    let kept = |headers: &HeaderMap, name: &HeaderName| hop.trusted && headers.contains_key(name);
    let mut prior = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    let xff = if prior.peek().is_none() {
        Some(hop.ip.clone())
    } else {
        let mut joined = prior.collect::<Vec<_>>().join(", ");
        joined.push_str(", ");
        joined.push_str(hop.ip.to_str().unwrap_or_default());
        HeaderValue::try_from(joined).ok()
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !kept(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, hop.proto.clone());
    }
    if let Some(h) = host {
        if !kept(headers, &X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
    }
    if let Some(port) = &hop.port {
        if !kept(headers, &X_FORWARDED_PORT) {
            headers.insert(X_FORWARDED_PORT, port.clone());
        }
    }
    let element = match host.and_then(|h| h.to_str().ok()) {
        Some(h) if !h.contains(['"', '\\']) => {
            let mut e = String::with_capacity(hop.element.len() + h.len() + 8);
            e.push_str(&hop.element);
            e.push_str(";host=\"");
            e.push_str(h);
            e.push('"');
            HeaderValue::try_from(e).ok()
        }
        _ => HeaderValue::try_from(hop.element.as_str()).ok(),
    };
    if let Some(v) = element {
        headers.append(header::FORWARDED, v);
    }
}

/// How a header name matters to the proxy, for the lean HTTP/1.1 path
/// ([`super::h1`]), which rewrites heads as bytes: the same sets as above, matched
/// case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `Host`.
    Host,
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding` (hop-by-hop: the proxy re-frames).
    TransferEncoding,
    /// `Connection` (hop-by-hop; lists more hop-by-hop names).
    Connection,
    /// `Upgrade` (hop-by-hop unless an allowed upgrade).
    Upgrade,
    /// `TE` (hop-by-hop, kept only as `trailers`).
    Te,
    /// `Expect`.
    Expect,
    /// The other [`HOP_BY_HOP`] names.
    HopByHop,
    /// `X-Forwarded-For`.
    XForwardedFor,
    /// `X-Forwarded-Proto`.
    XForwardedProto,
    /// `X-Forwarded-Host`.
    XForwardedHost,
    /// `X-Forwarded-Port`.
    XForwardedPort,
    /// `Forwarded`.
    Forwarded,
    /// One of [`CLIENT_IP_HEADERS`].
    ClientIp,
    /// An end-to-end header.
    Other,
}

/// The [`Role`] of a header name.
pub(crate) fn role(name: &[u8]) -> Role {
    let is = |h: &HeaderName| h.as_str().as_bytes().eq_ignore_ascii_case(name);
    // Most names are none of these: the lengths below rule them out without a compare.
    match name.len() {
        4 if is(&header::HOST) => Role::Host,
        14 if is(&header::CONTENT_LENGTH) => Role::ContentLength,
        17 if is(&header::TRANSFER_ENCODING) => Role::TransferEncoding,
        10 if is(&header::CONNECTION) => Role::Connection,
        7 if is(&header::UPGRADE) => Role::Upgrade,
        2 if is(&header::TE) => Role::Te,
        6 if is(&header::EXPECT) => Role::Expect,
        15 if is(&X_FORWARDED_FOR) => Role::XForwardedFor,
        17 if is(&X_FORWARDED_PROTO) => Role::XForwardedProto,
        16 if is(&X_FORWARDED_HOST) => Role::XForwardedHost,
        16 if is(&X_FORWARDED_PORT) => Role::XForwardedPort,
        9 if is(&header::FORWARDED) => Role::Forwarded,
        _ if HOP_BY_HOP.iter().any(is) => Role::HopByHop,
        _ if CLIENT_IP_HEADERS.iter().any(is) => Role::ClientIp,
        _ => Role::Other,
    }
}

/// The comma-separated tokens of header values, trimmed, empty ones skipped.
pub(crate) fn tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `TE` token asks for trailers (`trailers`, maybe with parameters).
pub(crate) fn te_is_trailers(token: &[u8]) -> bool {
    token
        .split(|b| *b == b';')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// What a trusted peer sent of this hop's forwarding headers, for [`write_forwarding`].
#[derive(Debug, Default)]
pub(crate) struct PriorForwarding<'a> {
    /// Its `X-Forwarded-For` values, in order.
    pub(crate) xff: Vec<&'a [u8]>,
    /// Whether it sent `X-Forwarded-Proto`, `-Host`, `-Port` (those are then kept).
    pub(crate) proto: bool,
    pub(crate) host: bool,
    pub(crate) port: bool,
}

/// [`forwarding`] for a head written as bytes: appends this hop's header lines to
/// `out`. The caller has dropped what an untrusted peer sent of them (and, from a
/// trusted one, its `X-Forwarded-For` lines, joined here into one) and kept its
/// `Forwarded` lines, after which this hop's element follows.
pub(crate) fn write_forwarding(
    out: &mut Vec<u8>,
    hop: &ClientHop,
    host: Option<&[u8]>,
    prior: &PriorForwarding<'_>,
) {
    out.extend_from_slice(b"x-forwarded-for: ");
    if hop.trusted {
        for v in &prior.xff {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(hop.ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !(hop.trusted && prior.proto) {
        line(out, b"x-forwarded-proto", hop.proto.as_bytes());
    }
    if let Some(h) = host {
        if !(hop.trusted && prior.host) {
            line(out, b"x-forwarded-host", h);
        }
    }
    if let Some(port) = &hop.port {
        if !(hop.trusted && prior.port) {
            line(out, b"x-forwarded-port", port.as_bytes());
        }
    }
    out.extend_from_slice(b"forwarded: ");
    out.extend_from_slice(hop.element.as_bytes());
    if let Some(h) = host.filter(|h| !h.iter().any(|b| matches!(b, b'"' | b'\\'))) {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(h);
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one `name: value` line.
pub(crate) fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn lines(h: &HeaderMap) -> Vec<String> {
        let mut out: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, trailers;q=1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(lines(&h), ["te: trailers", "x-kept: yes"]);
    }

    #[test]
    fn response_with_length_and_chunked_loses_the_length() {
        let mut h = map(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("x-app", "1"),
        ]);
        response(&mut h);
        assert_eq!(lines(&h), ["x-app: 1"]);
        let mut h = map(&[("content-length", "5")]);
        response(&mut h);
        assert_eq!(lines(&h), ["content-length: 5"]);
    }

    const SPOOFED: &[(&str, &str)] = &[
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "443"),
        ("forwarded", "for=10.0.0.1;proto=https"),
        ("x-real-ip", "10.0.0.1"),
        ("true-client-ip", "10.0.0.1"),
        ("cf-connecting-ip", "10.0.0.1"),
        ("x-kept", "yes"),
    ];

    #[test]
    fn untrusted_client_cannot_set_forwarding_headers() {
        let mut h = map(SPOOFED);
        let host = HeaderValue::from_static("app.example:8080");
        forwarding(
            &mut h,
            &ClientHop::new(
                "203.0.113.9:5000".parse().unwrap(),
                Some("192.0.2.1:8080".parse().unwrap()),
                false,
                false,
            ),
            Some(&host),
        );
        assert_eq!(
            lines(&h),
            [
                "forwarded: for=203.0.113.9;proto=http;host=\"app.example:8080\"",
                "x-forwarded-for: 203.0.113.9",
                "x-forwarded-host: app.example:8080",
                "x-forwarded-port: 8080",
                "x-forwarded-proto: http",
                "x-kept: yes",
            ]
        );
    }

    #[test]
    fn trusted_proxy_headers_are_kept_and_appended_to() {
        let mut h = map(SPOOFED);
        let host = HeaderValue::from_static("app.example");
        forwarding(
            &mut h,
            &ClientHop::new(
                "[::ffff:10.9.9.9]:5000".parse().unwrap(),
                Some("192.0.2.1:8080".parse().unwrap()),
                true,
                false,
            ),
            Some(&host),
        );
        assert_eq!(
            lines(&h),
            [
                "cf-connecting-ip: 10.0.0.1",
                "forwarded: for=10.0.0.1;proto=https",
                "forwarded: for=10.9.9.9;proto=http;host=\"app.example\"",
                "true-client-ip: 10.0.0.1",
                "x-forwarded-for: 10.0.0.1, 10.9.9.9",
                "x-forwarded-host: evil.example",
                "x-forwarded-port: 443",
                "x-forwarded-proto: https",
                "x-kept: yes",
                "x-real-ip: 10.0.0.1",
            ]
        );
    }

    #[test]
    fn ipv6_peer_is_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        forwarding(
            &mut h,
            &ClientHop::new("[::1]:5000".parse().unwrap(), None, false, false),
            None,
        );
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let uri: Uri = "http://example.com/a?b=1".parse().unwrap();
        assert_eq!(origin_form(&uri), "/a?b=1");
        let h = host_of(&uri, &HeaderMap::new(), None).unwrap();
        assert_eq!(h, "example.com");
    }
}

//! Message heads of the lean HTTP/1.1 path: parsed with httparse (hyper's own parser),
//! checked, and rewritten as bytes straight into the head the other side gets.
//!
//! Pure: bytes in, a plan and the rewritten head out. The rules are the ones the hyper
//! path applies to a `HeaderMap` ([`super::super::guard`], [`super::super::headers`]),
//! shared where they are decisions, plus HTTP/1.1's framing rules (RFC 9112 §6), which
//! hyper applied for us before:
//!
//! | Request | Answer |
//! |---|---|
//! | `Content-Length` that is not digits, or two different ones | 400 |
//! | `Content-Length` and `Transfer-Encoding` together (RFC 9112 §6.1: "ought to be handled as an error") | 400 |
//! | `Transfer-Encoding` in an HTTP/1.0 request | 400 |
//! | a head over `max_header_bytes`, or over [`MAX_HEADERS`] fields | 431 |
//!
//! A worker's response with a bad `Content-Length` or an unparsable head is a 502.

use std::net::SocketAddr;

use hyper::{Method, StatusCode, Uri};

use super::super::guard::{self, Reject};
use super::super::headers::{self, ClientHop, PriorForwarding, Role};

/// Most header fields in one head (hyper's default too).
pub(crate) const MAX_HEADERS: usize = 100;

/// Largest response head accepted from a worker.
pub(crate) const MAX_RESPONSE_HEAD: usize = 256 * 1024;

/// Where a message body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// What the connection loop needs to know of a request, once its head is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestPlan {
    /// Bytes of the head in the buffer (the body, if any, follows).
    pub(crate) head_len: usize,
    pub(crate) body: Framing,
    /// An HTTP/1.0 client: no chunked responses; the connection stays open only when it
    /// asked for keep-alive and says so in each response.
    pub(crate) http10: bool,
    /// The client asked to close after this response (`Connection: close`, or 1.0
    /// without `Connection: keep-alive`).
    pub(crate) close: bool,
    /// `HEAD`: a response never has a body.
    pub(crate) head: bool,
    /// Safe to send again when a worker may have seen it (idempotent, no body, no upgrade).
    pub(crate) replayable: bool,
    /// An allowed upgrade (WebSocket): the worker got `Connection: upgrade`.
    pub(crate) upgrade: bool,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` before its body.
    pub(crate) expect_continue: bool,
}

/// The per-listener and per-connection inputs of [`plan_request`].
pub(crate) struct RequestRules<'a> {
    pub(crate) max_header_bytes: usize,
    pub(crate) allowed_upgrades: &'a [String],
    pub(crate) hop: &'a ClientHop,
    /// The address the client connected to (the Host of last resort), asked for only
    /// when a request has no Host.
    pub(crate) local: &'a (dyn Fn() -> Option<SocketAddr> + Sync),
}

const fn refuse(status: StatusCode, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more.
/// `Ok(Some)`: `out` holds the head to send to a worker (replacing what it held).
/// `Err`: answer with the [`Reject`] and close the connection.
pub(crate) fn plan_request(
    buf: &[u8],
    rules: &RequestRules<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<RequestPlan>, Reject> {
    let too_large = || {
        refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large\n",
        )
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > rules.max_header_bytes {
                Err(too_large())
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(too_large()),
        Err(_) => return Err(refuse(StatusCode::BAD_REQUEST, "malformed request\n")),
    };
    if head_len > rules.max_header_bytes {
        return Err(too_large());
    }
    let bad = |reason| refuse(StatusCode::BAD_REQUEST, reason);
    let http10 = req.version == Some(0);
    let method_text = req.method.unwrap_or_default();
    let method =
        Method::from_bytes(method_text.as_bytes()).map_err(|_| bad("malformed request\n"))?;
    guard::check_method(&method)?;
    let target = req.path.unwrap_or_default();
    // Origin-form (`/path`) is all real clients send to a server; anything else is
    // parsed and checked as the hyper path does.
    let absolute: (String, String);
    let (path, authority): (&str, Option<&str>) = if target.starts_with('/') {
        (target, None)
    } else {
        let uri: Uri = target
            .parse()
            .map_err(|_| bad("malformed request target\n"))?;
        guard::check_target(&method, &uri)?;
        match uri.authority() {
            Some(auth) => {
                let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
                let pq = if pq.is_empty() { "/" } else { pq };
                absolute = (pq.to_string(), auth.as_str().to_string());
                (absolute.0.as_str(), Some(absolute.1.as_str()))
            }
            None => (target, None),
        }
    };
    let fields = Fields::new(req.headers);

    // First pass: what the head says about itself.
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_10 = false;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    let mut te_trailers = false;
    let mut prior = PriorForwarding::default();
    let trusted = rules.hop.trusted();
    for (f, role) in fields.iter() {
        match role {
            Role::ContentLength => {
                let n = content_length(f.value).ok_or(bad("invalid Content-Length\n"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("conflicting Content-Length\n"));
                }
                length = Some(n);
            }
            Role::TransferEncoding => chunked = true,
            Role::Connection => {
                for t in headers::tokens(std::iter::once(f.value)) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                        keep_alive_10 = false;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    } else if http10 && t.eq_ignore_ascii_case(b"keep-alive") && !close {
                        // HTTP/1.0 keep-alive (what `ab -k` sends): kept while the
                        // response can be length-framed.
                        keep_alive_10 = true;
                    }
                }
            }
            Role::Te => {
                te_trailers |=
                    headers::tokens(std::iter::once(f.value)).any(headers::te_is_trailers);
            }
            Role::Expect => {
                expect_continue |= f.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            Role::XForwardedFor if trusted => prior.xff.push(f.value),
            Role::XForwardedProto => prior.proto = true,
            Role::XForwardedHost => prior.host = true,
            Role::XForwardedPort => prior.port = true,
            _ => {}
        }
    }
    let close = close || (http10 && !keep_alive_10);
    guard::check_hosts(!http10 && authority.is_none(), fields.with(Role::Host))?;
    if chunked {
        if http10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request\n"));
        }
        guard::check_transfer_encoding(fields.with(Role::TransferEncoding))?;
        if length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding\n"));
        }
    }
    let upgrade = connection_upgrade
        && guard::upgrade_allowed(fields.with(Role::Upgrade), rules.allowed_upgrades);
    let body = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(0) | None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    // Second pass: the head the worker gets.
    out.clear();
    out.extend_from_slice(method_text.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host: Option<&[u8]> = authority
        .map(str::as_bytes)
        .or_else(|| fields.with(Role::Host).next());
    let local_host;
    let host = match (host, host.is_none().then(rules.local).flatten()) {
        (Some(h), _) => Some(h),
        (None, Some(local)) => {
            local_host = local.to_string();
            Some(local_host.as_bytes())
        }
        (None, None) => None,
    };
    for (f, role) in fields.iter() {
        let name = f.name.as_bytes();
        let keep = match role {
            Role::Other | Role::Expect => !fields.listed(name),
            // Written once below, as the number it was read as (`5, 5` becomes `5`).
            Role::ContentLength => false,
            Role::Forwarded => trusted,
            Role::ClientIp
            | Role::XForwardedProto
            | Role::XForwardedHost
            | Role::XForwardedPort => trusted && !fields.listed(name),
            Role::Host
            | Role::TransferEncoding
            | Role::Connection
            | Role::Upgrade
            | Role::Te
            | Role::HopByHop
            | Role::XForwardedFor => false,
        };
        if keep {
            lowercase_line(out, name, f.value);
        }
    }
    if let Some(h) = host {
        headers::line(out, b"host", h);
    }
    if te_trailers {
        headers::line(out, b"te", b"trailers");
    }
    if let (false, Some(n)) = (chunked, length) {
        content_length_line(out, n);
    }
    if upgrade {
        headers::line(out, b"connection", b"upgrade");
        for v in fields.with(Role::Upgrade) {
            headers::line(out, b"upgrade", v);
        }
    }
    if body == Framing::Chunked {
        headers::line(out, b"transfer-encoding", b"chunked");
    }
    headers::write_forwarding(out, rules.hop, host, &prior);
    out.extend_from_slice(b"\r\n");
    Ok(Some(RequestPlan {
        head_len,
        body,
        http10,
        close,
        head: method == Method::HEAD,
        replayable: !upgrade && body == Framing::Empty && method.is_idempotent(),
        upgrade,
        expect_continue: expect_continue && !http10,
    }))
}

/// `Content-Length`: digits only (RFC 9110 §8.6; no sign, no spaces inside), and a
/// list of the same number (`5, 5`) as some clients send after merging lines.
fn content_length(value: &[u8]) -> Option<u64> {
    let mut n = None;
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = std::str::from_utf8(part).ok()?.parse::<u64>().ok()?;
        if n.is_some_and(|n| n != v) {
            return None;
        }
        n = Some(v);
    }
    n
}

fn content_length_line(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// A parsed head's fields with their [`Role`]s, computed once per head.
struct Fields<'h, 'b> {
    fields: &'h [httparse::Header<'b>],
    roles: [Role; MAX_HEADERS],
    /// Whether a `Connection` header names fields besides its keywords (rare: only
    /// then is [`Fields::listed`] worth looking).
    names_listed: bool,
}

impl<'h, 'b> Fields<'h, 'b> {
    fn new(fields: &'h [httparse::Header<'b>]) -> Self {
        let mut roles = [Role::Other; MAX_HEADERS];
        for (r, f) in roles.iter_mut().zip(fields) {
            *r = headers::role(f.name.as_bytes());
        }
        let mut this = Self {
            fields,
            roles,
            names_listed: false,
        };
        let names_listed = headers::tokens(this.with(Role::Connection)).any(|t| {
            !(t.eq_ignore_ascii_case(b"close")
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"upgrade"))
        });
        this.names_listed = names_listed;
        this
    }

    fn iter(&self) -> impl Iterator<Item = (&'h httparse::Header<'b>, Role)> + '_ {
        self.fields.iter().zip(self.roles.iter().copied())
    }

    /// The values of the fields with `role`, in order.
    fn with(&self, role: Role) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.iter()
            .filter(move |(_, r)| *r == role)
            .map(|(f, _)| f.value)
    }

    /// Whether a `Connection` header names `name` (which makes it hop-by-hop).
    fn listed(&self, name: &[u8]) -> bool {
        self.names_listed
            && headers::tokens(self.with(Role::Connection)).any(|t| t.eq_ignore_ascii_case(name))
    }
}

fn lowercase_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the connection loop needs to know of a worker's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponsePlan {
    /// Bytes of the head in the buffer.
    pub(crate) head_len: usize,
    pub(crate) status: u16,
    /// How the worker frames the body.
    pub(crate) body: Framing,
    /// How the client gets it: [`Framing::Chunked`] when the proxy re-chunks (worker's
    /// chunked, or until-close, to an HTTP/1.1 client), [`Framing::UntilClose`] for an
    /// HTTP/1.0 client, else as the worker framed it.
    pub(crate) to_client: Framing,
    /// The worker will take another request on this connection.
    pub(crate) reusable: bool,
}

/// A response head that cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid response from worker: {0}")]
pub(crate) struct BadResponse(pub(crate) &'static str);

/// What one parse of the worker's output found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The head is incomplete: read more.
    Partial,
    /// An interim (1xx) response of this many bytes: drop it and parse what follows.
    /// The client's `100 Continue` is the proxy's own.
    Interim(usize),
    /// A final response; `out` holds the client's head, without its blank line.
    Final(ResponsePlan),
}

/// The request a response answers, as far as framing the response depends on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub(crate) head: bool,
    pub(crate) upgrade: bool,
    pub(crate) http10: bool,
}

/// Parses the worker's response head at the start of `buf` and writes the client's
/// head to `out` (without the blank line, so that the caller can add
/// `Connection: close`): status line, the end-to-end headers, and the framing the
/// client gets.
pub(crate) fn plan_response(
    buf: &[u8],
    asked: Asked,
    out: &mut Vec<u8>,
) -> Result<Parsed, BadResponse> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_RESPONSE_HEAD {
                Err(BadResponse("response head too large"))
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(_) => return Err(BadResponse("unparsable response head")),
    };
    let status = resp.code.unwrap_or_default();
    if status == 101 && !asked.upgrade {
        return Err(BadResponse("101 to a request that did not upgrade"));
    }
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Interim(head_len));
    }
    let http10 = resp.version == Some(0);
    let fields = Fields::new(resp.headers);
    let mut length = None;
    let mut transfer = false;
    let mut chunked_last = false;
    // Codings besides chunked (`gzip, chunked`): passed on by name, since the proxy
    // re-chunks but does not decode them.
    let mut other_codings = false;
    let mut close = false;
    let mut keep_alive = false;
    for (f, role) in fields.iter() {
        match role {
            Role::ContentLength => {
                let n = content_length(f.value).ok_or(BadResponse("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse("conflicting Content-Length"));
                }
                length = Some(n);
            }
            Role::TransferEncoding => {
                transfer = true;
                for c in headers::tokens(std::iter::once(f.value)) {
                    chunked_last = c.eq_ignore_ascii_case(b"chunked");
                    other_codings |= !chunked_last;
                }
            }
            Role::Connection => {
                for t in headers::tokens(std::iter::once(f.value)) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
    let body = if asked.head || status == 101 || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer {
        if chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if other_codings && asked.http10 && body != Framing::Empty {
        return Err(BadResponse(
            "a transfer coding an HTTP/1.0 client cannot take",
        ));
    }
    let to_client = match body {
        Framing::Chunked | Framing::UntilClose if asked.http10 => Framing::UntilClose,
        Framing::Chunked | Framing::UntilClose => Framing::Chunked,
        other => other,
    };
    let reusable =
        body != Framing::UntilClose && status != 101 && !close && (!http10 || keep_alive);

    out.clear();
    // An HTTP/1.0 client gets its own version back, as hyper answered it.
    out.extend_from_slice(if asked.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (f, role) in fields.iter() {
        let name = f.name.as_bytes();
        let keep = match role {
            Role::Connection
            | Role::TransferEncoding
            | Role::Upgrade
            | Role::Te
            | Role::HopByHop => false,
            // Framed by Transfer-Encoding, a stale length would desynchronize the
            // client; otherwise written once below, as the number it was read as.
            Role::ContentLength => false,
            _ => !fields.listed(name),
        };
        if keep {
            lowercase_line(out, name, f.value);
        }
    }
    if let (false, Some(n)) = (transfer, length) {
        content_length_line(out, n);
    }
    if status == 101 {
        headers::line(out, b"connection", b"upgrade");
        for v in fields.with(Role::Upgrade) {
            headers::line(out, b"upgrade", v);
        }
    }
    if to_client == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: ");
        if other_codings {
            for c in headers::tokens(fields.with(Role::TransferEncoding)) {
                if !c.eq_ignore_ascii_case(b"chunked") {
                    out.extend_from_slice(c);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(b"chunked\r\n");
    }
    Ok(Parsed::Final(ResponsePlan {
        head_len,
        status,
        body,
        to_client,
        reusable,
    }))
}

/// A status code's three digits (httparse guarantees 100..=999).
fn itoa3(n: u16) -> [u8; 3] {
    let n = n.clamp(100, 999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// The whole response for a request the proxy answers itself.
pub(crate) fn error_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    body: &str,
    asked: Asked,
    close: bool,
) {
    out.clear();
    out.extend_from_slice(if asked.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !asked.head {
        out.extend_from_slice(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(hop: &ClientHop) -> RequestRules<'_> {
        RequestRules {
            max_header_bytes: 1024,
            allowed_upgrades: &[],
            hop,
            local: &|| Some("127.0.0.1:8080".parse().unwrap()),
        }
    }

    fn hop(trusted: bool) -> ClientHop {
        ClientHop::new(
            "10.0.0.9:5555".parse().unwrap(),
            Some("127.0.0.1:8080".parse().unwrap()),
            trusted,
            false,
        )
    }

    fn plan(req: &str, trusted: bool) -> Result<(RequestPlan, String), u16> {
        let hop = hop(trusted);
        let mut out = Vec::new();
        match plan_request(req.as_bytes(), &rules(&hop), &mut out) {
            Ok(Some(p)) => Ok((p, String::from_utf8(out).unwrap())),
            Ok(None) => Err(0),
            Err(r) => Err(r.status.as_u16()),
        }
    }

    #[test]
    fn a_plain_get_is_rewritten_for_the_worker() {
        let (p, head) = plan(
            "GET /a?b HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Real-IP: 1.2.3.4\r\nX-Forwarded-For: 6.6.6.6\r\nTE: trailers, gzip\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(p.body, Framing::Empty);
        assert!(p.replayable && !p.close && !p.http10 && !p.head);
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\naccept: */*\r\nhost: example.com\r\nte: trailers\r\n\
             x-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\nx-forwarded-host: example.com\r\n\
             x-forwarded-port: 8080\r\nforwarded: for=10.0.0.9;proto=http;host=\"example.com\"\r\n\r\n"
        );
    }

    #[test]
    fn a_trusted_proxy_keeps_and_extends_its_forwarding_headers() {
        let (_, head) = plan(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\nForwarded: for=1.1.1.1\r\nX-Real-IP: 1.1.1.1\r\n\r\n",
            true,
        )
        .unwrap();
        assert!(
            head.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-proto: https\r\n") && !head.contains("proto: http\r\n"));
        assert!(head.contains("\nforwarded: for=1.1.1.1\r\n"), "{head}");
        assert!(head.contains("forwarded: for=10.0.0.9;proto=http;host=\"h\"\r\n"));
        assert!(head.contains("x-real-ip: 1.1.1.1\r\n"));
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let (_, head) = plan(
            "GET http://example.com:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(head.starts_with("GET /x?y HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("host: example.com:81\r\n"));
        let (_, head) = plan("OPTIONS http://example.com HTTP/1.1\r\n\r\n", false).unwrap();
        assert!(head.starts_with("OPTIONS / HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn http10_without_host_gets_the_local_address() {
        let (p, head) = plan("GET / HTTP/1.0\r\n\r\n", false).unwrap();
        assert!(p.http10 && p.close);
        assert!(head.contains("host: 127.0.0.1:8080\r\n"));
        let (p, _) = plan("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", false).unwrap();
        assert!(p.http10 && !p.close, "HTTP/1.0 keep-alive");
        let (p, _) = plan(
            "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(p.close);
    }

    #[test]
    fn framing_rules() {
        let ok = |r: &str| plan(r, false).map(|(p, _)| p.body);
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for (bad, status) in [
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            ("GET a.example HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        ] {
            assert_eq!(ok(bad), Err(status), "{bad:?}");
        }
    }

    #[test]
    fn oversized_heads_get_431_and_partial_ones_wait() {
        let hop = hop(false);
        let mut out = Vec::new();
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(2000)
        );
        assert_eq!(
            plan_request(big.as_bytes(), &rules(&hop), &mut out)
                .unwrap_err()
                .status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let many: String = (0..150).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n");
        let r = RequestRules {
            max_header_bytes: 64 * 1024,
            ..rules(&hop)
        };
        assert_eq!(
            plan_request(many.as_bytes(), &r, &mut out)
                .unwrap_err()
                .status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            plan_request(b"GET / HTTP/1.1\r\nHo", &rules(&hop), &mut out),
            Ok(None)
        );
    }

    #[test]
    fn only_allowed_upgrades_reach_the_worker() {
        let hop = hop(false);
        let allowed = vec!["websocket".to_string()];
        let r = RequestRules {
            allowed_upgrades: &allowed,
            ..rules(&hop)
        };
        let mut out = Vec::new();
        let p = plan_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            &r,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert!(p.upgrade && !p.replayable);
        let head = String::from_utf8(out.clone()).unwrap();
        assert!(
            head.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{head}"
        );
        let p = plan_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n",
            &r,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert!(!p.upgrade);
        let head = String::from_utf8(out).unwrap();
        assert!(
            !head.contains("upgrade") && !head.contains("http2-settings"),
            "{head}"
        );
    }

    fn respond(resp: &str, asked: Asked) -> Result<(ResponsePlan, String), BadResponse> {
        let mut out = Vec::new();
        match plan_response(resp.as_bytes(), asked, &mut out)? {
            Parsed::Final(p) => Ok((p, String::from_utf8(out).unwrap())),
            other => panic!("{other:?}"),
        }
    }

    const GET: Asked = Asked {
        head: false,
        upgrade: false,
        http10: false,
    };

    #[test]
    fn response_framing_and_rewriting() {
        let (p, head) = respond(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello",
            GET,
        )
        .unwrap();
        assert_eq!(
            (p.body, p.to_client, p.reusable),
            (Framing::Length(5), Framing::Length(5), true)
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nset-cookie: b=2\r\ncontent-length: 5\r\n"
        );
        let (p, head) = respond(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            GET,
        )
        .unwrap();
        assert_eq!((p.body, p.to_client), (Framing::Chunked, Framing::Chunked));
        assert_eq!(head, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n");
        let (p, _) = respond("HTTP/1.1 200 OK\r\n\r\n", GET).unwrap();
        assert_eq!(
            (p.body, p.to_client, p.reusable),
            (Framing::UntilClose, Framing::Chunked, false)
        );
        let (p, head) = respond(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Asked {
                http10: true,
                ..GET
            },
        )
        .unwrap();
        assert_eq!(p.to_client, Framing::UntilClose);
        assert!(!head.contains("chunked"));
        let (p, head) = respond(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            Asked { head: true, ..GET },
        )
        .unwrap();
        assert_eq!((p.body, p.reusable), (Framing::Empty, true));
        assert!(head.contains("content-length: 9"));
        for s in ["204 No Content", "304 Not Modified"] {
            let (p, _) =
                respond(&format!("HTTP/1.1 {s}\r\nContent-Length: 9\r\n\r\n"), GET).unwrap();
            assert_eq!(p.body, Framing::Empty);
        }
        let (p, _) = respond("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", GET).unwrap();
        assert!(!p.reusable);
        let (p, _) = respond(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            GET,
        )
        .unwrap();
        assert!(!p.reusable);
    }

    #[test]
    fn bad_and_interim_responses() {
        let mut out = Vec::new();
        assert_eq!(
            plan_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", GET, &mut out),
            Ok(Parsed::Interim(25))
        );
        assert_eq!(
            plan_response(b"HTTP/1.1 200 OK\r\nA", GET, &mut out),
            Ok(Parsed::Partial)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                plan_response(bad.as_bytes(), GET, &mut out).is_err(),
                "{bad:?}"
            );
        }
        let (p, head) = respond(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            Asked {
                upgrade: true,
                ..GET
            },
        )
        .unwrap();
        assert_eq!((p.status, p.body, p.reusable), (101, Framing::Empty, false));
        assert!(
            head.ends_with("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{head}"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Header lines a client may send, hostile ones included.
        fn field() -> impl Strategy<Value = (String, String)> {
            let names = prop::sample::select(vec![
                "Host",
                "Content-Length",
                "Transfer-Encoding",
                "Connection",
                "Keep-Alive",
                "TE",
                "Upgrade",
                "X-Forwarded-For",
                "X-Forwarded-Proto",
                "Forwarded",
                "X-Real-IP",
                "Proxy-Connection",
                "Expect",
                "Accept",
                "X-Custom",
                "Cookie",
            ]);
            let values = prop::sample::select(vec![
                "a",
                "example.com",
                "5",
                "0",
                "5, 5",
                "chunked",
                "gzip, chunked",
                "close",
                "keep-alive, X-Custom",
                "upgrade",
                "websocket",
                "trailers",
                "1.2.3.4",
                "100-continue",
                "x=1; y=2",
                "",
            ]);
            (names, values).prop_map(|(n, v)| (n.to_string(), v.to_string()))
        }

        proptest! {
            /// Arbitrary bytes never panic either head parser.
            #[test]
            fn arbitrary_heads_never_panic(input in proptest::collection::vec(any::<u8>(), 0..600)) {
                let hop = hop(false);
                let mut out = Vec::new();
                let _ = plan_request(&input, &rules(&hop), &mut out);
                for asked in [GET, Asked { head: true, upgrade: true, http10: true }] {
                    let _ = plan_response(&input, asked, &mut out);
                }
            }

            /// Whatever head the worker gets is one well-formed request: one Host, at most
            /// one framing header and the one the plan says, no hop-by-hop header but an
            /// upgrade's, one X-Forwarded-For, and no client-IP header from an untrusted peer.
            #[test]
            fn the_workers_head_is_unambiguous(
                method in prop::sample::select(vec!["GET", "POST", "HEAD", "PUT", "OPTIONS"]),
                version in prop::sample::select(vec!["1.0", "1.1"]),
                fields in proptest::collection::vec(field(), 0..10),
                trusted in any::<bool>(),
            ) {
                let mut req = format!("{method} /p HTTP/{version}\r\n");
                for (n, v) in &fields {
                    req.push_str(&format!("{n}: {v}\r\n"));
                }
                req.push_str("\r\n");
                let hop = hop(trusted);
                let allowed = vec!["websocket".to_string()];
                let r = RequestRules { allowed_upgrades: &allowed, ..rules(&hop) };
                let mut out = Vec::new();
                let Ok(Some(plan)) = plan_request(req.as_bytes(), &r, &mut out) else {
                    return Ok(());
                };
                let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut again = httparse::Request::new(&mut parsed);
                prop_assert_eq!(again.parse(&out).unwrap(), httparse::Status::Complete(out.len()));
                let count = |name: &str| {
                    again.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count()
                };
                prop_assert_eq!(count("host"), 1);
                prop_assert_eq!(count("x-forwarded-for"), 1);
                let (cl, te) = (count("content-length"), count("transfer-encoding"));
                match plan.body {
                    Framing::Empty => prop_assert!(te == 0 && cl <= 1),
                    Framing::Length(_) => prop_assert!(cl == 1 && te == 0),
                    Framing::Chunked => prop_assert!(cl == 0 && te == 1),
                    Framing::UntilClose => prop_assert!(false, "a request is never until-close"),
                }
                for name in ["keep-alive", "proxy-connection"] {
                    prop_assert_eq!(count(name), 0);
                }
                let listed = fields.iter().any(|(n, v)| {
                    n.eq_ignore_ascii_case("connection") && v.to_ascii_lowercase().contains("x-custom")
                });
                if listed {
                    prop_assert_eq!(count("x-custom"), 0, "a header the client's Connection lists");
                }
                prop_assert_eq!(count("connection"), usize::from(plan.upgrade));
                if !trusted {
                    prop_assert_eq!(count("x-real-ip"), 0);
                }
            }

            /// The client's head parses as one response with at most one framing header.
            #[test]
            fn the_clients_head_is_unambiguous(
                status in prop::sample::select(vec![200u16, 204, 301, 304, 404, 500]),
                fields in proptest::collection::vec(field(), 0..10),
                http10 in any::<bool>(),
            ) {
                let mut resp = format!("HTTP/1.1 {status} X\r\n");
                for (n, v) in &fields {
                    resp.push_str(&format!("{n}: {v}\r\n"));
                }
                resp.push_str("\r\n");
                let mut out = Vec::new();
                let Ok(Parsed::Final(plan)) =
                    plan_response(resp.as_bytes(), Asked { http10, ..GET }, &mut out)
                else {
                    return Ok(());
                };
                out.extend_from_slice(b"\r\n");
                let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut again = httparse::Response::new(&mut parsed);
                prop_assert_eq!(again.parse(&out).unwrap(), httparse::Status::Complete(out.len()));
                let count = |name: &str| {
                    again.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count()
                };
                let (cl, te) = (count("content-length"), count("transfer-encoding"));
                prop_assert!(cl + te <= 1);
                prop_assert_eq!(te == 1, plan.to_client == Framing::Chunked);
                prop_assert_eq!(count("connection") + count("keep-alive"), 0);
            }
        }
    }
}

//! The http proxy under abuse (issue 16, items 4 to 10): each test is one attack or
//! malformed input from the issue, run against the in-process proxy with raw TCP
//! clients, and fails on the proxy as it was before the fix.
#![allow(missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::plan::WorkerId;
use clusterd_runtime::accept::ConnLimiter;
use clusterd_runtime::proxy::{HttpProxyConfig, TrustedProxies};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::*;

const W1: WorkerId = WorkerId(1);

fn fast_http() -> HttpProxyConfig {
    HttpProxyConfig {
        no_backend_wait: Duration::from_millis(200),
        response_header_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
        // Each test its own caps, so tests do not share the process-wide limiter.
        limiter: ConnLimiter::new(1000, 1000),
        ..HttpProxyConfig::default()
    }
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_all(&mut s).await
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("proxy closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend that answers every request with its head, one header per line, sorted.
async fn echo_head_backend() -> Backend {
    Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        lines.sort();
        Response::new(full(format!(
            "{} {}\n{}\n",
            req.method(),
            req.uri(),
            lines.join("\n")
        )))
    })
    .await
}

/// Connects from a chosen loopback address (all of 127/8 is local on Linux).
async fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
    sock.connect(to).await.unwrap()
}

async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

// ---------------------------------------------------------------- 4: connection caps

#[tokio::test]
async fn per_client_connection_cap_closes_the_extra_connection_only_for_that_client() {
    let limiter = ConnLimiter::new(100, 2);
    let proxy = Proxy::http(HttpProxyConfig {
        limiter: Arc::clone(&limiter),
        ..fast_http()
    })
    .await;
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let mut a1 = connect_from([127, 0, 0, 1], proxy.addr).await;
    let mut a2 = connect_from([127, 0, 0, 1], proxy.addr).await;
    assert!(get_on(&mut a1).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut a2).await.starts_with("HTTP/1.1 200"));
    // The third from the same address is closed without an answer.
    let mut a3 = connect_from([127, 0, 0, 1], proxy.addr).await;
    let _ = a3.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(read_all(&mut a3).await, "");
    // Another address is served.
    let mut other = connect_from([127, 0, 0, 2], proxy.addr).await;
    assert!(get_on(&mut other).await.starts_with("HTTP/1.1 200"));
    // A closed connection frees its place.
    drop(a1);
    let ip = "127.0.0.1".parse().unwrap();
    eventually(Duration::from_secs(5), "place freed", || {
        let limiter = Arc::clone(&limiter);
        async move { limiter.held_by(ip) == 1 }
    })
    .await;
    let mut a4 = connect_from([127, 0, 0, 1], proxy.addr).await;
    assert!(get_on(&mut a4).await.starts_with("HTTP/1.1 200"));
    drop((a2, a4, other));
    proxy.stop().await;
}

#[tokio::test]
async fn global_connection_cap_holds_new_connections_until_one_closes() {
    let proxy = Proxy::http(HttpProxyConfig {
        limiter: ConnLimiter::new(2, 100),
        ..fast_http()
    })
    .await;
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let mut c1 = connect_from([127, 0, 0, 1], proxy.addr).await;
    let mut c2 = connect_from([127, 0, 0, 2], proxy.addr).await;
    assert!(get_on(&mut c1).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut c2).await.starts_with("HTTP/1.1 200"));
    // The kernel completes the handshake, but the proxy does not accept it yet.
    let mut c3 = connect_from([127, 0, 0, 3], proxy.addr).await;
    c3.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c3.read(&mut buf))
            .await
            .is_err(),
        "served over the cap"
    );
    drop(c1);
    let n = tokio::time::timeout(Duration::from_secs(10), c3.read(&mut buf))
        .await
        .expect("served once a place is free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(c2);
    proxy.stop().await;
}

// ---------------------------------------------------------------- 5: inactivity timeouts

#[tokio::test]
async fn stalled_request_body_gets_408_and_frees_the_worker() {
    let proxy = Proxy::http(HttpProxyConfig {
        body_read_timeout: Duration::from_millis(300),
        ..fast_http()
    })
    .await;
    let sink = Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        let _ = req.into_body().collect().await;
        Response::new(full("read"))
    })
    .await;
    proxy.routes.add(W1, sink.addr);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        .await
        .unwrap();
    // The client stays connected and silent; the proxy answers and closes.
    let out = read_all(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(W1))
        .await
        .expect("worker slot freed");
    drop(s);
    proxy.stop().await;
}

#[tokio::test]
async fn client_that_stops_reading_is_cut_and_frees_the_worker() {
    let proxy = Proxy::http(HttpProxyConfig {
        response_write_timeout: Duration::from_millis(300),
        ..fast_http()
    })
    .await;
    // An endless response: 64 KiB chunks for as long as anyone takes them.
    let firehose = Backend::spawn(|_req| async move {
        let (tx, body) = chan_body(4);
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            while tx.send(chunk.clone()).await.is_ok() {}
        });
        Response::new(body)
    })
    .await;
    proxy.routes.add(W1, firehose.addr);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let routes = Arc::clone(&proxy.routes);
    eventually(Duration::from_secs(5), "response in flight", || {
        let routes = Arc::clone(&routes);
        async move { routes.inflight(W1) == 1 }
    })
    .await;
    // Never read: buffers fill, then the proxy gives up on this client.
    tokio::time::timeout(Duration::from_secs(20), proxy.routes.drained(W1))
        .await
        .expect("a client that reads nothing does not hold the worker");
    drop(s);
    proxy.stop().await;
}

// ---------------------------------------------------------------- 6: forwarding headers

const SPOOF: &str = "GET / HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.6.6.6\r\n\
X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 443\r\n\
Forwarded: for=10.6.6.6;proto=https\r\nX-Real-IP: 10.6.6.6\r\nTrue-Client-IP: 10.6.6.6\r\n\
Connection: close\r\n\r\n";

#[tokio::test]
async fn client_cannot_spoof_forwarding_headers() {
    let proxy = Proxy::http(fast_http()).await;
    let echo = echo_head_backend().await;
    proxy.routes.add(W1, echo.addr);
    let out = raw_exchange(proxy.addr, SPOOF.as_bytes()).await;
    let port = proxy.addr.port();
    for want in [
        "\nx-forwarded-for: 127.0.0.1\n".to_string(),
        "\nx-forwarded-proto: http\n".to_string(),
        "\nx-forwarded-host: app.example\n".to_string(),
        format!("\nx-forwarded-port: {port}\n"),
        "\nforwarded: for=127.0.0.1;proto=http;host=\"app.example\"\n".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in {out}");
    }
    for gone in [
        "10.6.6.6",
        "evil.example",
        "https",
        "x-real-ip",
        "true-client-ip",
    ] {
        assert!(!out.contains(gone), "{gone} reached the worker: {out}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn trusted_proxy_forwarding_headers_are_kept() {
    let proxy = Proxy::http(HttpProxyConfig {
        trusted_proxies: TrustedProxies::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..fast_http()
    })
    .await;
    let echo = echo_head_backend().await;
    proxy.routes.add(W1, echo.addr);
    let out = raw_exchange(proxy.addr, SPOOF.as_bytes()).await;
    for want in [
        "\nx-forwarded-for: 10.6.6.6, 127.0.0.1\n",
        "\nx-forwarded-proto: https\n",
        "\nx-forwarded-host: evil.example\n",
        "\nx-forwarded-port: 443\n",
        "\nx-real-ip: 10.6.6.6\n",
        "\nforwarded: for=10.6.6.6;proto=https\nforwarded: for=127.0.0.1;proto=http;host=\"app.example\"\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------- 7: h2c smuggling

#[tokio::test]
async fn h2c_upgrade_is_not_forwarded_but_websocket_is() {
    let proxy = Proxy::http(fast_http()).await;
    // Switches to whatever protocol is asked, like an h2c-capable server would.
    let switcher = Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        match req.headers().get("upgrade") {
            Some(to) => Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", to)
                .body(empty())
                .unwrap(),
            None => Response::new(full("plain")),
        }
    })
    .await;
    proxy.routes.add(W1, switcher.addr);
    let h2c = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    let h2c = tokio::time::timeout(Duration::from_secs(2), h2c).await;
    // Before: a 101 and an open tunnel (the read never ends). Now: a plain answer.
    let h2c = h2c.unwrap_or_else(|_| "tunnel left open".into());
    assert!(h2c.starts_with("HTTP/1.1 200"), "{h2c}");
    assert!(h2c.ends_with("plain"), "{h2c}");
    let mut ws = TcpStream::connect(proxy.addr).await.unwrap();
    ws.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = ws.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    drop(ws);
    proxy.stop().await;
}

// ---------------------------------------------------------------- 8: replay amplification

#[tokio::test]
async fn request_that_kills_workers_is_replayed_once_at_most() {
    let proxy = Proxy::http(fast_http()).await;
    // "Crashes" on every request: reads it, then closes without a response.
    let received = Arc::new(AtomicU64::new(0));
    let crasher = RawBackend::spawn({
        let received = Arc::clone(&received);
        move |mut s| {
            let received = Arc::clone(&received);
            async move {
                let mut buf = [0u8; 4096];
                if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
    .await;
    // Eight workers (as after eight crash restarts, each with a new id).
    for i in 1..=8 {
        proxy.routes.add(WorkerId(i), crasher.addr);
    }
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let (status, _) = client.get("/boom").await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(received.load(Ordering::SeqCst), 2, "original + one replay");
    proxy.stop().await;
}

// ---------------------------------------------------------------- 9: CL.0 reuse

#[tokio::test]
async fn body_ignored_by_the_worker_never_answers_another_client() {
    let proxy = Proxy::http(fast_http()).await;
    // Ignores Content-Length (CL.0) and answers pipelined requests lazily: each read
    // answers the oldest request not yet answered, echoing its request line.
    let cl0 = RawBackend::spawn(|mut s| async move {
        let mut buf = Vec::new();
        let mut queue: std::collections::VecDeque<String> = Default::default();
        let mut chunk = [0u8; 4096];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                queue.push_back(head.lines().next().unwrap_or("").to_string());
            }
            if let Some(line) = queue.pop_front() {
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
                    line.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    proxy.routes.add(W1, cl0.addr);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let attack = format!(
        "POST /attacker HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let out = raw_exchange(proxy.addr, attack.as_bytes()).await;
    assert!(out.ends_with("POST /attacker HTTP/1.1"), "{out}");
    let mut victim = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..3 {
        let (status, body) = victim.get("/victim").await.unwrap();
        assert_eq!(
            (status, body),
            (200, Bytes::from("GET /victim HTTP/1.1")),
            "another client's smuggled request was answered to the victim"
        );
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------- 10: framing and authority

#[tokio::test]
async fn lenient_framing_and_authority_are_refused() {
    let proxy = Proxy::http(fast_http()).await;
    let echo = echo_head_backend().await;
    proxy.routes.add(W1, echo.addr);
    let cases: &[(&str, &str)] = &[
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 501",
        ),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", "HTTP/1.1 400"),
        ("GET evil.example HTTP/1.1\r\nHost: app\r\n\r\n", "HTTP/1.1 400"),
        ("GET evil.example:80 HTTP/1.1\r\nHost: app\r\n\r\n", "HTTP/1.1 400"),
        ("GET http://user:pw@app.example/ HTTP/1.1\r\nHost: app\r\n\r\n", "HTTP/1.1 400"),
        ("GET / HTTP/1.1\r\nHost: app.example,evil.example\r\n\r\n", "HTTP/1.1 400"),
        ("GET / HTTP/1.1\r\nHost: app.example evil\r\n\r\n", "HTTP/1.1 400"),
        ("GET / HTTP/1.1\r\nHost: app.example/evil\r\n\r\n", "HTTP/1.1 400"),
        ("CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n", "HTTP/1.1 405"),
    ];
    for (request, want) in cases {
        let out = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(out.starts_with(want), "{request:?} -> {out:?}");
    }
    assert_eq!(
        proxy.routes.snapshot()[0].total,
        0,
        "nothing reached a worker"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn bare_lf_after_the_last_chunk_is_400_and_swallows_nothing() {
    let proxy = Proxy::http(fast_http()).await;
    let echo = echo_head_backend().await;
    proxy.routes.add(W1, echo.addr);
    let out = raw_exchange(
        proxy.addr,
        b"POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(!out.contains("/first") && !out.contains("/second"), "{out}");
    proxy.stop().await;
}

#[tokio::test]
async fn response_with_length_and_chunked_is_framed_by_chunked() {
    let proxy = Proxy::http(fast_http()).await;
    let both = RawBackend::spawn(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            )
            .await;
        let _ = s.read(&mut buf).await;
    })
    .await;
    proxy.routes.add(W1, both.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let req = Request::get("/").header("host", "x").body(empty()).unwrap();
    let resp = client.send(req).await.unwrap();
    assert!(resp.headers().get("content-length").is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello world");
    // The client connection is still in step.
    let b = Backend::ok().await;
    proxy.routes.remove(W1);
    proxy.routes.add(WorkerId(2), b.addr);
    assert_eq!(client.get("/").await.unwrap(), (200, Bytes::from("ok")));
    proxy.stop().await;
}

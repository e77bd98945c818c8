//! The proxy in-process against real sockets and real worker processes (python3,
//! node): reloads under load, WebSocket tunnels, tcp mode, and bad input.
#![allow(missing_docs)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::plan::WorkerId;
use clusterd_runtime::proxy::{HttpProxyConfig, TcpProxyConfig};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use support::*;

const W1: WorkerId = WorkerId(1);
const W2: WorkerId = WorkerId(2);
const W3: WorkerId = WorkerId(3);

fn fast_http() -> HttpProxyConfig {
    HttpProxyConfig {
        no_backend_wait: Duration::from_millis(200),
        response_header_timeout: Duration::from_millis(300),
        header_read_timeout: Duration::from_millis(500),
        max_header_bytes: 16 * 1024,
        shutdown_grace: Duration::from_secs(1),
        ..HttpProxyConfig::default()
    }
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("proxy closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- worker processes

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// python3 -m http.server: HTTP/1.0, closes every connection.
    Python,
    /// Unmodified node http server: keep-alive, exits at once on SIGINT.
    Node,
}

struct Worker {
    id: WorkerId,
    addr: SocketAddr,
    child: Child,
}

async fn spawn_worker(kind: Kind, id: WorkerId, docroot: &std::path::Path) -> Worker {
    let port = free_port();
    let mut cmd = match kind {
        Kind::Python => {
            let mut c = Command::new("python3");
            c.args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(docroot);
            c
        }
        Kind::Node => {
            let mut c = Command::new("node");
            c.args(["-e", "require('http').createServer((q,s)=>s.end('ok')).listen(process.env.PORT, '127.0.0.1')"])
                .env("PORT", port.to_string());
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn worker");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_accepting(addr).await;
    Worker { id, addr, child }
}

async fn sigint_and_reap(mut w: Worker) {
    let pid = nix::unistd::Pid::from_raw(w.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.child.wait())
        .await
        .expect("worker exits on SIGINT")
        .unwrap();
}

#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    non_2xx: AtomicU64,
    failed: AtomicU64,
}

/// `conns` keep-alive clients sending GET / back to back until `stop`.
fn start_load(
    addr: SocketAddr,
    conns: usize,
    stop: CancellationToken,
) -> (Arc<LoadStats>, Vec<tokio::task::JoinHandle<()>>) {
    let stats = Arc::new(LoadStats::default());
    let tasks = (0..conns)
        .map(|_| {
            let stats = Arc::clone(&stats);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = None;
                while !stop.is_cancelled() {
                    if client.is_none() {
                        match Client::connect(addr).await {
                            Ok(c) => client = Some(c),
                            Err(_) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    match client.as_mut().unwrap().get("/").await {
                        Ok((s, _)) if (200..300).contains(&s) => {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((s, body)) => {
                            eprintln!("non-2xx {s}: {body:?}");
                            stats.non_2xx.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            eprintln!("request failed: {err}");
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            client = None;
                        }
                    }
                }
            })
        })
        .collect();
    (stats, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_reloads_under_keepalive_load_lose_nothing() {
    let docroot = tempfile::tempdir().unwrap();
    std::fs::write(docroot.path().join("index.html"), "hello").unwrap();
    let proxy = Proxy::http(HttpProxyConfig::default()).await;
    let mut next_id = 1;
    let mut workers = Vec::new();
    for kind in [Kind::Python, Kind::Node] {
        let w = spawn_worker(kind, WorkerId(next_id), docroot.path()).await;
        next_id += 1;
        proxy.routes.add(w.id, w.addr);
        workers.push((kind, w));
    }
    let stop = CancellationToken::new();
    let (stats, tasks) = start_load(proxy.addr, 4, stop.clone());

    for _reload in 0..3 {
        for (kind, slot) in &mut workers {
            let before = stats.ok.load(Ordering::Relaxed);
            eventually(Duration::from_secs(20), "load makes progress", || {
                let stats = Arc::clone(&stats);
                async move { stats.ok.load(Ordering::Relaxed) >= before + 50 }
            })
            .await;
            let new = spawn_worker(*kind, WorkerId(next_id), docroot.path()).await;
            next_id += 1;
            proxy.routes.add(new.id, new.addr);
            let old = std::mem::replace(slot, new);
            proxy.routes.stop_routing(old.id);
            tokio::time::timeout(Duration::from_secs(10), proxy.routes.drained(old.id))
                .await
                .expect("old worker drains");
            assert_eq!(proxy.routes.inflight(old.id), 0);
            let old_id = old.id;
            sigint_and_reap(old).await;
            proxy.routes.remove(old_id);
        }
    }
    let before = stats.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(20),
        "load continues after reloads",
        || {
            let stats = Arc::clone(&stats);
            async move { stats.ok.load(Ordering::Relaxed) >= before + 50 }
        },
    )
    .await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let ok = stats.ok.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    let non_2xx = stats.non_2xx.load(Ordering::Relaxed);
    eprintln!("reload test: ok={ok} failed={failed} non_2xx={non_2xx}");
    assert_eq!((failed, non_2xx), (0, 0));
    let snap = proxy.routes.snapshot();
    assert_eq!(snap.len(), 2);
    assert!(
        snap.iter().all(|b| b.total > 0 && b.errors == 0),
        "{snap:?}"
    );
    for (_, w) in workers {
        sigint_and_reap(w).await;
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------- websocket

async fn upgrade_echo_backend() -> Backend {
    Backend::spawn(|mut req: Request<hyper::body::Incoming>| async move {
        if req.headers().contains_key("upgrade") {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(empty())
                .unwrap()
        } else {
            Response::new(full("ok"))
        }
    })
    .await
}

async fn read_head(s: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            s.read_line(&mut line).await.unwrap() > 0,
            "eof in head: {head}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

async fn echo_roundtrip(s: &mut BufReader<TcpStream>, msg: &str) {
    s.get_mut().write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(buf, msg.as_bytes());
}

#[tokio::test]
async fn websocket_tunnel_survives_reload_of_other_workers() {
    let proxy = Proxy::http(fast_http()).await;
    let a = upgrade_echo_backend().await;
    let b = upgrade_echo_backend().await;
    proxy.routes.add(W1, a.addr);
    proxy.routes.add(W2, b.addr);

    let mut ws = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    ws.get_mut()
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    echo_roundtrip(&mut ws, "ping 1\n").await;

    let snap = proxy.routes.snapshot();
    let tunnel_worker = snap
        .iter()
        .find(|s| s.inflight == 1)
        .expect("tunnel counted")
        .id;
    let other = if tunnel_worker == W1 { W2 } else { W1 };

    // Reload the other worker: a replacement arrives, the old one drains and goes.
    let c = upgrade_echo_backend().await;
    proxy.routes.add(W3, c.addr);
    proxy.routes.stop_routing(other);
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(other))
        .await
        .unwrap();
    proxy.routes.remove(other);
    echo_roundtrip(&mut ws, "ping 2\n").await;

    // Plain requests still flow beside the tunnel.
    let mut client = Client::connect(proxy.addr).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().0, 200);
    echo_roundtrip(&mut ws, "ping 3\n").await;

    // The tunnel holds its own worker in flight until it closes.
    proxy.routes.stop_routing(tunnel_worker);
    assert_eq!(proxy.routes.inflight(tunnel_worker), 1);
    echo_roundtrip(&mut ws, "ping 4\n").await;
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(tunnel_worker))
        .await
        .expect("tunnel close ends the in-flight count");
    drop(client);
    proxy.stop().await;
}

// ---------------------------------------------------------------- http behaviour

#[tokio::test]
async fn forwarded_headers_added_and_hop_by_hop_removed() {
    let proxy = Proxy::http(fast_http()).await;
    let echo = Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        lines.sort();
        Response::new(full(lines.join("\n")))
    })
    .await;
    proxy.routes.add(W1, echo.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let req = Request::get("/h")
        .header("host", "app.example:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&body);
    // 127.0.0.1 is not a trusted proxy: its X-Forwarded-For is replaced, not extended.
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
    assert!(
        seen.contains("x-forwarded-host: app.example:8080"),
        "{seen}"
    );
    assert!(
        seen.contains("forwarded: for=127.0.0.1;proto=http;host=\"app.example:8080\""),
        "{seen}"
    );
    assert!(seen.contains("host: app.example:8080"), "{seen}");
    assert!(seen.contains("te: trailers"), "{seen}");
    assert!(
        !seen.contains("x-private") && !seen.contains("keep-alive"),
        "{seen}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn http10_client_is_served_and_closed() {
    let proxy = Proxy::http(fast_http()).await;
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let out = raw_exchange(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.ends_with("ok"), "{out}");
    proxy.stop().await;
}

#[tokio::test]
async fn connect_failure_retries_on_another_worker_with_body_intact() {
    let proxy = Proxy::http(fast_http()).await;
    let echo = Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(body))
    })
    .await;
    proxy.routes.add(W1, dead_addr());
    proxy.routes.add(W2, echo.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for i in 0..10 {
        let payload = format!("payload {i}");
        let req = Request::post("/")
            .header("host", "x")
            .body(full(payload.clone()))
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, payload.as_bytes());
    }
    let snap = proxy.routes.snapshot();
    assert!(snap[0].errors > 0, "{snap:?}");
    assert_eq!(snap[1].total, 10);
    proxy.stop().await;
}

#[tokio::test]
async fn least_outstanding_requests_wins() {
    let proxy = Proxy::http(fast_http()).await;
    // W1 holds its responses open until released; W2 answers at once.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let slow = Backend::spawn(move |_req| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|go| *go).await;
            Response::new(full("slow"))
        }
    })
    .await;
    let fast = Backend::ok().await;
    proxy.routes.add(W1, slow.addr);
    proxy.routes.add(W2, fast.addr);
    let held = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let mut c = Client::connect(addr).await.unwrap();
            c.get("/").await.unwrap()
        }
    });
    let routes = Arc::clone(&proxy.routes);
    eventually(Duration::from_secs(5), "one request in flight", || {
        let routes = Arc::clone(&routes);
        async move { routes.inflight(W1) + routes.inflight(W2) == 1 }
    })
    .await;
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let busy = if proxy.routes.inflight(W1) == 1 {
        W1
    } else {
        W2
    };
    if busy == W1 {
        // Every later request avoids the busy worker.
        for _ in 0..5 {
            assert_eq!(client.get("/").await.unwrap(), (200, Bytes::from("ok")));
        }
    }
    tx.send(true).unwrap();
    assert_eq!(held.await.unwrap().0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn streaming_response_counts_in_flight_until_its_end() {
    let proxy = Proxy::http(fast_http()).await;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(1);
    let body_rx = Arc::new(tokio::sync::Mutex::new(Some(body_rx)));
    let streamer = Backend::spawn(move |_req| {
        let body_rx = Arc::clone(&body_rx);
        async move {
            let (tx, body) = chan_body(1);
            let mut rx: tokio::sync::mpsc::Receiver<Option<Bytes>> =
                body_rx.lock().await.take().unwrap();
            tokio::spawn(async move {
                while let Some(Some(chunk)) = rx.recv().await {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
            });
            Response::new(body)
        }
    })
    .await;
    proxy.routes.add(W1, streamer.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let req = Request::get("/stream")
        .header("host", "x")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let mut body = resp.into_body();
    body_tx.send(Some(Bytes::from("part 1"))).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "part 1");
    proxy.routes.stop_routing(W1);
    assert_eq!(
        proxy.routes.inflight(W1),
        1,
        "a streaming response is still in flight"
    );
    let drained = tokio::spawn({
        let routes = Arc::clone(&proxy.routes);
        async move { routes.drained(W1).await }
    });
    assert!(!drained.is_finished());
    body_tx.send(None).await.unwrap();
    assert!(body.frame().await.is_none());
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .unwrap()
        .unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn get_on_a_keepalive_connection_the_worker_closed_is_replayed() {
    let proxy = Proxy::http(fast_http()).await;
    // Claims keep-alive, then closes right after each response: the pooled
    // connection is dead by the time the next request takes it.
    let rude = RawBackend::spawn(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await;
    proxy.routes.add(W1, rude.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap(), (200, Bytes::from("ok")));
    }
    assert_eq!(proxy.routes.snapshot()[0].errors, 0);
    proxy.stop().await;
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn malformed_request_line_gets_400() {
    let proxy = Proxy::http(fast_http()).await;
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let out = raw_exchange(proxy.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert_eq!(proxy.routes.snapshot()[0].total, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_or_close() {
    let proxy = Proxy::http(fast_http()).await;
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let big = "a".repeat(64 * 1024);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The proxy may close before reading everything; a failed write is fine.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(proxy.routes.snapshot()[0].total, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn slowloris_is_closed_and_others_are_served() {
    let proxy = Proxy::http(fast_http()).await; // header_read_timeout 500ms
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let (mut rd, mut wr) = slow.split();
    let drip = async {
        // Far longer in total than the header timeout (about 100 x 50ms).
        for byte in head {
            if wr.write_all(&[*byte]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    };
    let closed = async {
        let mut buf = Vec::new();
        let _ = rd.read_to_end(&mut buf).await;
        buf
    };
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let others = async {
        for _ in 0..5 {
            assert_eq!(client.get("/").await.unwrap().0, 200);
        }
    };
    let ((), outcome) = tokio::join!(others, async {
        tokio::select! {
            finished = drip => panic!("slow client was never cut off (drip finished: {finished})"),
            buf = closed => buf,
        }
    });
    // Closed without a response (hyper sends none on a header timeout) or with 408.
    let text = String::from_utf8_lossy(&outcome);
    assert!(
        outcome.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(proxy.routes.snapshot()[0].total, 5);
    proxy.stop().await;
}

#[tokio::test]
async fn garbage_from_worker_is_502() {
    let proxy = Proxy::http(fast_http()).await;
    let garbage = RawBackend::spawn(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"SPAM SPAM SPAM\r\n\r\n").await;
    })
    .await;
    proxy.routes.add(W1, garbage.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let (status, body) = client.get("/").await.unwrap();
    assert_eq!(status, 502);
    assert!(!body.is_empty());
    // The client's connection is still good for the next request.
    let ok = Backend::ok().await;
    proxy.routes.remove(W1);
    proxy.routes.add(W2, ok.addr);
    assert_eq!(client.get("/").await.unwrap().0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn hanging_worker_is_504_after_the_timeout() {
    let proxy = Proxy::http(fast_http()).await; // response_header_timeout 300ms
    let (_hold_tx, hold_rx) = tokio::sync::watch::channel(());
    let hang = RawBackend::spawn(move |mut s| {
        let mut hold = hold_rx.clone();
        async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = hold.changed().await;
        }
    })
    .await;
    proxy.routes.add(W1, hang.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().0, 504);
    let snap = proxy.routes.snapshot();
    assert_eq!((snap[0].errors, snap[0].inflight), (1, 0));
    proxy.stop().await;
}

#[tokio::test]
async fn no_worker_waits_then_503() {
    let proxy = Proxy::http(fast_http()).await; // no_backend_wait 200ms
    let mut client = Client::connect(proxy.addr).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().0, 503);
    proxy.stop().await;
}

#[tokio::test]
async fn request_waits_for_a_worker_to_become_ready() {
    let proxy = Proxy::http(HttpProxyConfig::default()).await; // waits up to 10s
    let pending = tokio::spawn({
        let addr = proxy.addr;
        async move {
            Client::connect(addr)
                .await
                .unwrap()
                .get("/")
                .await
                .unwrap()
                .0
        }
    });
    let b = Backend::ok().await;
    proxy.routes.add(W1, b.addr);
    assert_eq!(pending.await.unwrap(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_body_aborts_only_its_request() {
    let proxy = Proxy::http(fast_http()).await;
    let sink = Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        match req.into_body().collect().await {
            Ok(b) => Response::new(full(b.to_bytes().len().to_string())),
            Err(_) => Response::new(full("aborted")),
        }
    })
    .await;
    proxy.routes.add(W1, sink.addr);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
        .await
        .unwrap();
    let routes = Arc::clone(&proxy.routes);
    eventually(Duration::from_secs(5), "upload in flight", || {
        let routes = Arc::clone(&routes);
        async move { routes.inflight(W1) == 1 }
    })
    .await;
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(W1))
        .await
        .unwrap();
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let req = Request::post("/up")
        .header("host", "x")
        .body(full("12345"))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "5");
    assert_eq!(proxy.routes.snapshot()[0].errors, 0);
    proxy.stop().await;
}

// ---------------------------------------------------------------- tcp mode

async fn echo_backend() -> RawBackend {
    RawBackend::spawn(|s| async move {
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

fn fast_tcp() -> TcpProxyConfig {
    TcpProxyConfig {
        no_backend_wait: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(1),
        ..TcpProxyConfig::default()
    }
}

#[tokio::test]
async fn tcp_half_close_still_delivers_the_echo() {
    let proxy = Proxy::tcp(fast_tcp()).await;
    let e = echo_backend().await;
    proxy.routes.add(W1, e.addr);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"line one\nline two\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "line one\nline two\n");
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(W1))
        .await
        .unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn tcp_balances_connections_retries_and_drains() {
    let proxy = Proxy::tcp(fast_tcp()).await;
    let a = echo_backend().await;
    let b = echo_backend().await;
    proxy.routes.add(W1, a.addr);
    proxy.routes.add(W2, b.addr);
    proxy.routes.add(W3, dead_addr());
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut s = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
        echo_roundtrip(&mut s, &format!("hello {i}\n")).await;
        conns.push(s);
    }
    let snap = proxy.routes.snapshot();
    assert_eq!(
        (snap[0].inflight, snap[1].inflight, snap[2].inflight),
        (2, 2, 0),
        "{snap:?}"
    );
    assert!(snap[2].errors > 0);

    // Drain W1: its connections keep working, new ones go elsewhere.
    proxy.routes.stop_routing(W1);
    let mut extra = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    echo_roundtrip(&mut extra, "new\n").await;
    assert_eq!(proxy.routes.inflight(W2), 3);
    for c in &mut conns {
        echo_roundtrip(c, "still here\n").await;
    }
    drop(conns);
    tokio::time::timeout(Duration::from_secs(5), proxy.routes.drained(W1))
        .await
        .unwrap();
    drop(extra);
    proxy.stop().await;
}

#[tokio::test]
async fn tcp_without_worker_closes_after_the_wait() {
    let proxy = Proxy::tcp(fast_tcp()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    proxy.stop().await;
}

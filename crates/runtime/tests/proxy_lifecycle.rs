//! How plain HTTP/1.1 client connections end when the proxy stops: a shutdown closes
//! idle keep-alive connections at once and lets a request in flight finish (then
//! closes), a retired proxy (daemon upgrade) asks each keep-alive client to reconnect on
//! its next response, and a tunnel lives through the shutdown grace and is then cut.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clusterd_core::plan::WorkerId;
use clusterd_runtime::accept::ConnLimiter;
use clusterd_runtime::proxy::{serve_http, serve_http_retirable, HttpProxyConfig, RouteTable};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(10);
const W1: WorkerId = WorkerId(1);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn cfg(grace: Duration) -> HttpProxyConfig {
    HttpProxyConfig {
        shutdown_grace: grace,
        limiter: ConnLimiter::new(1000, 1000),
        ..HttpProxyConfig::default()
    }
}

/// A worker: `/` answers at once, `/slow` once `release` is notified (reporting on
/// `seen` that it has the request), and an upgrade gets a 101 and then an echo.
async fn worker(release: Arc<Notify>, seen: mpsc::UnboundedSender<String>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (release, seen) = (Arc::clone(&release), seen.clone());
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let target = head.split(' ').nth(1).unwrap_or("").to_string();
                    let _ = seen.send(target.clone());
                    if head.to_ascii_lowercase().contains("upgrade: websocket") {
                        let _ = s
                            .get_mut()
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                            .await;
                        let (mut r, mut w) = s.into_inner().into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                    if target == "/slow" {
                        release.notified().await;
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{target}",
                        target.len()
                    );
                    if s.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one response (Content-Length framed): its head, lower-cased, and its body.
async fn response(r: &mut BufReader<TcpStream>) -> (String, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).await.unwrap() > 0,
            "closed inside a head: {head}"
        );
        head.push_str(&line.to_ascii_lowercase());
        if line == "\r\n" {
            break;
        }
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

async fn expect_eof(r: &mut BufReader<TcpStream>, what: &str) {
    let mut rest = Vec::new();
    within(what, r.read_to_end(&mut rest)).await.ok();
    assert!(
        rest.is_empty(),
        "{what}: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

async fn client(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

async fn get(c: &mut BufReader<TcpStream>, target: &str) {
    c.get_mut()
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
}

struct Setup {
    addr: SocketAddr,
    routes: Arc<RouteTable>,
    release: Arc<Notify>,
    seen: mpsc::UnboundedReceiver<String>,
}

async fn setup() -> (Setup, TcpListener) {
    let release = Arc::new(Notify::new());
    let (tx, seen) = mpsc::unbounded_channel();
    let w = worker(Arc::clone(&release), tx).await;
    let routes = RouteTable::new();
    routes.add(W1, w);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        Setup {
            addr,
            routes,
            release,
            seen,
        },
        listener,
    )
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_the_request_in_flight() {
    let (mut s, listener) = setup().await;
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(serve_http(
        listener,
        Arc::clone(&s.routes),
        cfg(PATIENCE),
        shutdown.clone(),
    ));
    let mut idle = client(s.addr).await;
    get(&mut idle, "/").await;
    let (head, body) = within("first answer", response(&mut idle)).await;
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "/");
    let mut busy = client(s.addr).await;
    get(&mut busy, "/slow").await;
    while within("the worker has /slow", s.seen.recv()).await.unwrap() != "/slow" {}

    shutdown.cancel();
    expect_eof(
        &mut idle,
        "an idle keep-alive connection closes at shutdown",
    )
    .await;
    assert_eq!(
        s.routes.inflight(W1),
        1,
        "the slow request is still in flight"
    );
    s.release.notify_one();
    let (head, body) = within("the slow answer", response(&mut busy)).await;
    assert_eq!(body, "/slow");
    assert!(head.contains("connection: close"), "asked to close: {head}");
    expect_eof(&mut busy, "closed after the last response").await;
    within("the proxy returns", proxy).await.unwrap();
    assert_eq!(s.routes.inflight(W1), 0);
}

#[tokio::test]
async fn a_retired_proxy_asks_each_keepalive_client_to_reconnect() {
    let (s, listener) = setup().await;
    let (shutdown, retire) = (CancellationToken::new(), CancellationToken::new());
    let proxy = tokio::spawn(serve_http_retirable(
        listener,
        Arc::clone(&s.routes),
        cfg(PATIENCE),
        shutdown.clone(),
        retire.clone(),
    ));
    let mut c = client(s.addr).await;
    get(&mut c, "/").await;
    let (head, _) = within("before", response(&mut c)).await;
    assert!(!head.contains("connection: close"), "{head}");
    retire.cancel();
    // The idle connection is not closed under the client (it may be sending): its next
    // request is served, with the request to reconnect.
    get(&mut c, "/again").await;
    let (head, body) = within("after retiring", response(&mut c)).await;
    assert_eq!(body, "/again");
    assert!(head.contains("connection: close"), "{head}");
    expect_eof(&mut c, "closed after that response").await;
    shutdown.cancel();
    within("the proxy returns", proxy).await.unwrap();
}

#[tokio::test]
async fn a_tunnel_lives_through_the_shutdown_grace_and_is_then_cut() {
    let (s, listener) = setup().await;
    let shutdown = CancellationToken::new();
    let grace = Duration::from_secs(2);
    let proxy = tokio::spawn(serve_http(
        listener,
        Arc::clone(&s.routes),
        cfg(grace),
        shutdown.clone(),
    ));
    let mut c = client(s.addr).await;
    // The first frame rides with the handshake: it must reach the worker after the 101.
    c.get_mut()
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nping",
        )
        .await
        .unwrap();
    let mut status = String::new();
    within("101", c.read_line(&mut status)).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        within("101 head", c.read_line(&mut line)).await.unwrap();
    }
    let mut echo = [0u8; 4];
    within("echo", c.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo, b"ping");
    assert_eq!(s.routes.inflight(W1), 1, "a tunnel counts in flight");

    let stopped_at = tokio::time::Instant::now();
    shutdown.cancel();
    c.get_mut().write_all(b"pong").await.unwrap();
    within("echo during the grace", c.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"pong");
    expect_eof(&mut c, "the tunnel is cut after the grace").await;
    assert!(
        stopped_at.elapsed() >= grace,
        "cut only once the grace has passed"
    );
    within("the proxy returns", proxy).await.unwrap();
    assert_eq!(s.routes.inflight(W1), 0);
}

#[tokio::test]
async fn a_body_the_proxy_never_read_is_not_taken_for_the_next_request() {
    // No worker at all: the POST is answered 503 without its body being read. That body
    // is a request head; served as one, it would reach a worker as a request nobody sent.
    let routes = RouteTable::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut cfg = cfg(PATIENCE);
    cfg.no_backend_wait = Duration::from_millis(100);
    let proxy = tokio::spawn(serve_http(listener, routes, cfg, shutdown.clone()));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut c = client(addr).await;
    c.get_mut()
        .write_all(
            format!(
                "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (head, _) = within("503", response(&mut c)).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    expect_eof(&mut c, "nothing answers the body as a request").await;
    shutdown.cancel();
    within("the proxy returns", proxy).await.unwrap();
}

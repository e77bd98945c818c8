//! The http proxy's upstream dispatch: the client connection's task drives its worker
//! connection itself (no spawned connection task), so these check what that must keep:
//! keep-alive reuse of one worker connection, noticing a pooled connection the worker
//! closed while it sat idle, and a worker that answers an upload before reading it.
#![allow(missing_docs)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::plan::WorkerId;
use clusterd_runtime::proxy::HttpProxyConfig;
use http_body_util::BodyExt;
use hyper::Request;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use support::*;

const W1: WorkerId = WorkerId(1);

fn cfg() -> HttpProxyConfig {
    HttpProxyConfig {
        no_backend_wait: Duration::from_millis(200),
        response_header_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
        ..HttpProxyConfig::default()
    }
}

/// `fut`, or a panic naming `what` after 10 s.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

/// Reads one request head; returns its Content-Length (0 if none), or None at EOF.
async fn read_head(r: &mut BufReader<TcpStream>) -> Option<usize> {
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(len);
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
}

/// A keep-alive worker that counts the connections it accepted and answers each
/// request with the body length it read.
async fn counting_backend(accepted: Arc<AtomicUsize>) -> RawBackend {
    RawBackend::spawn(move |s| {
        accepted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = BufReader::new(s);
            while let Some(len) = read_head(&mut r).await {
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = len.to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    answer.len()
                );
                if r.get_mut()
                    .write_all(format!("{head}{answer}").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn keepalive_requests_reuse_one_worker_connection() {
    let proxy = Proxy::http(cfg()).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let b = counting_backend(Arc::clone(&accepted)).await;
    proxy.routes.add(W1, b.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for i in 0..50 {
        let body = "x".repeat(i);
        let req = Request::post("/echo")
            .header("host", "t")
            .body(full(body))
            .unwrap();
        let resp = client.send(req).await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, Bytes::from(i.to_string()));
        assert_eq!(client.get("/").await.unwrap(), (200, Bytes::from("0")));
    }
    // Sequential requests reuse pooled connections, except that a connection which
    // carried a request body is never pooled again (the CL.0 defence of issue 16): the
    // empty-bodied first POST and every GET reuse one, each of the 49 uploads costs one.
    assert_eq!(accepted.load(Ordering::SeqCst), 50);
    let s = &proxy.routes.snapshot()[0];
    assert_eq!((s.total, s.errors, s.inflight), (100, 0, 0));
    proxy.stop().await;
}

#[tokio::test]
async fn pooled_connection_closed_by_the_worker_is_not_used_for_a_post() {
    let proxy = Proxy::http(cfg()).await;
    // Answers one request per connection while claiming keep-alive, then closes and
    // says so.
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<()>();
    let b = RawBackend::spawn(move |s| {
        let closed_tx = closed_tx.clone();
        async move {
            let mut r = BufReader::new(s);
            if let Some(len) = read_head(&mut r).await {
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body).await;
                let _ = r
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            }
            drop(r);
            let _ = closed_tx.send(());
        }
    })
    .await;
    proxy.routes.add(W1, b.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..10 {
        assert_eq!(client.get("/").await.unwrap(), (200, Bytes::from("ok")));
        within("worker closes", closed_rx.recv()).await;
        // A POST is never replayed, so it must not be sent on the dead pooled
        // connection in the first place.
        let req = Request::post("/p")
            .header("host", "t")
            .body(full("data"))
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        within("worker closes", closed_rx.recv()).await;
    }
    assert_eq!(proxy.routes.snapshot()[0].errors, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn worker_answering_an_upload_early_keeps_the_next_request_right() {
    let proxy = Proxy::http(cfg()).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    // Answers as soon as it has the head, then reads (and discards) the body, then
    // serves the next request on the same connection.
    let b = RawBackend::spawn({
        let accepted = Arc::clone(&accepted);
        move |s| {
            accepted.fetch_add(1, Ordering::SeqCst);
            let accepted = Arc::clone(&accepted);
            async move {
                let mut r = BufReader::new(s);
                while let Some(len) = read_head(&mut r).await {
                    let answer = format!("early {len}");
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        answer.len()
                    );
                    if r.get_mut()
                        .write_all(format!("{head}{answer}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if len > 0 {
                        accepted.fetch_add(1000, Ordering::SeqCst);
                    }
                }
            }
        }
    })
    .await;
    proxy.routes.add(W1, b.addr);
    let mut client = Client::connect(proxy.addr).await.unwrap();
    // Far more than the socket buffers hold: the answer comes while the proxy is still
    // sending the upload to the worker.
    const UPLOAD: usize = 4 << 20;
    let req = Request::post("/up")
        .header("host", "t")
        .body(full(vec![b'u'; UPLOAD]))
        .unwrap();
    let resp = within("early answer", client.send(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = within("early body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(got, format!("early {UPLOAD}"));
    // The proxy may close the client connection after an early answer (the rest of the
    // upload cannot be told from a next request); the next requests then come on a new
    // one, and must be answered right.
    for _ in 0..3 {
        let answer = match within("next request", client.get("/")).await {
            Ok(a) => a,
            Err(_) => {
                client = Client::connect(proxy.addr).await.unwrap();
                within("next request", client.get("/")).await.unwrap()
            }
        };
        assert_eq!(answer, (200, Bytes::from("early 0")));
    }
    eventually(Duration::from_secs(5), "nothing in flight", || {
        let routes = Arc::clone(&proxy.routes);
        async move { routes.inflight(W1) == 0 }
    })
    .await;
    assert_eq!(proxy.routes.snapshot()[0].errors, 0);
    // The rest of the upload is not forced on a worker that already answered: its
    // connection carried a body and is closed, never pooled (issue 16, CL.0).
    proxy.stop().await;
}

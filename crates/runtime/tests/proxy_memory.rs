//! 100 MB up and down through the http proxy without buffering: the proxy, the
//! backend and the client all run in this process, so its RSS bounds all three.
//! A separate test binary, so that no other test's allocations blur the number.
#![allow(missing_docs)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::plan::WorkerId;
use clusterd_runtime::proxy::HttpProxyConfig;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

use support::*;

const TOTAL: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const BOUND_KIB: u64 = 32 * 1024;

/// A body of `TOTAL` bytes produced chunk by chunk with backpressure.
fn generated_body() -> TestBody {
    let (tx, body) = chan_body(2);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let mut sent = 0;
        while sent < TOTAL {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
            sent += CHUNK as u64;
        }
    });
    body
}

/// Reads a body to its end, counting bytes without keeping them.
async fn drain(mut body: Incoming) -> u64 {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_stream_without_buffering() {
    let proxy = Proxy::http(HttpProxyConfig::default()).await;
    let backend = Backend::spawn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/upload" {
            let n = drain(req.into_body()).await;
            Response::new(full(n.to_string()))
        } else if req.uri().path() == "/warm" {
            Response::new(full("ok"))
        } else {
            let mut resp = Response::new(generated_body());
            resp.headers_mut()
                .insert("content-length", TOTAL.to_string().parse().unwrap());
            resp
        }
    })
    .await;
    proxy.routes.add(WorkerId(1), backend.addr);

    // Warm up allocator and connections so the baseline is honest.
    let mut client = Client::connect(proxy.addr).await.unwrap();
    assert_eq!(client.get("/warm").await.unwrap().0, 200);
    let baseline = rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = tokio::spawn({
        let peak = Arc::clone(&peak);
        async move {
            loop {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let req = Request::post("/upload")
        .header("host", "x")
        .header("content-length", TOTAL.to_string())
        .body(generated_body())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, TOTAL.to_string());

    let req = Request::get("/download")
        .header("host", "x")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(drain(resp.into_body()).await, TOTAL);

    sampler.abort();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!("rss baseline {baseline} KiB, peak growth {growth} KiB");
    assert!(
        growth < BOUND_KIB,
        "rss grew by {growth} KiB streaming 2 x 100 MB"
    );
    drop(client);
    proxy.stop().await;
}

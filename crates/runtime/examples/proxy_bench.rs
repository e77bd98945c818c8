//! Manual benchmark helper: runs the http or tcp proxy in front of the given worker
//! addresses until Ctrl-C, so a load tool (wrk, oha) can compare direct vs proxied.
//!
//! `cargo run --release -p clusterd-runtime --example proxy_bench -- http 127.0.0.1:0 127.0.0.1:3001 127.0.0.1:3002`

use clusterd_core::plan::WorkerId;
use clusterd_runtime::proxy::{serve_http, serve_tcp, HttpProxyConfig, RouteTable, TcpProxyConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().expect("mode: http | tcp");
    let listen = args.next().expect("listen address");
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    println!("listening on {}", listener.local_addr().unwrap());
    let routes = RouteTable::new();
    for (i, addr) in args.enumerate() {
        routes.add(WorkerId(i as u64), addr.parse().expect("worker address"));
    }
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    match mode.as_str() {
        "http" => serve_http(listener, routes, HttpProxyConfig::default(), shutdown).await,
        "tcp" => serve_tcp(listener, routes, TcpProxyConfig::default(), shutdown).await,
        other => panic!("unknown mode {other}"),
    }
}

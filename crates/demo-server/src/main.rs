//! demo-server: a small, fast hyper server for clusterd's examples, tests and benchmarks.
//!
//! Listens on, in order of preference: an inherited socket (fd 3, `LISTEN_FDS` with
//! `LISTEN_PID` = its own pid, as clusterd's inherit mode passes it), `PORT` on
//! 127.0.0.1 (http/tcp modes), or `--port N` (0 = any; the address is printed).
//! Sends `READY=1` when `NOTIFY_SOCKET` is set. On SIGINT/SIGTERM it stops accepting,
//! answers each keep-alive connection's next request with `Connection: close`, closes
//! connections that stay idle for `DEMO_LINGER_MS` (default 1000), and exits 0. Closing
//! an idle keep-alive connection at once would race with a client already sending on it
//! (the client sees EPIPE/ECONNRESET); letting busy connections end after a response is
//! how a well-behaved server drains.
//!
//! Endpoints: `/` (pid and instance), `/slow?ms=N`, `/healthz` (200, or 500 after
//! `/fail-health`; `/heal` undoes it), `/grow?mb=N` (allocates and holds memory).
//!
//! Failure switches (environment): `DEMO_EXIT_AT_START=code` exits at once;
//! `DEMO_NEVER_READY=1` neither listens nor sends READY=1; `DEMO_CRASH_AFTER=N` serves
//! N requests and exits with code 70 when the next one arrives.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::signal::unix::{signal, SignalKind};

/// Shared by all connections of the (single-threaded) server.
struct State {
    pid: u32,
    instance: String,
    requests: Cell<u64>,
    crash_after: Option<u64>,
    health_failing: Cell<bool>,
    /// Memory held by `/grow`.
    held: RefCell<Vec<Vec<u8>>>,
    /// Set on SIGINT/SIGTERM: every response then closes its connection.
    draining: Cell<bool>,
    /// When the last request arrived, to close idle connections only once idle.
    last_request: Cell<Instant>,
}

fn main() {
    if let Some(code) = env_num("DEMO_EXIT_AT_START") {
        eprintln!("demo-server: exiting at start with code {code} (DEMO_EXIT_AT_START)");
        std::process::exit(code as i32);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&rt, run());
    std::process::exit(code);
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

async fn run() -> i32 {
    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    };
    if std::env::var_os("DEMO_NEVER_READY").is_some_and(|v| v == "1") {
        println!(
            "demo-server pid {}: never ready (DEMO_NEVER_READY)",
            std::process::id()
        );
        let sig = shutdown.await;
        println!("demo-server: {sig}, exiting");
        return 0;
    }
    let (std_listener, source) = match listener() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-server: {e}");
            return 1;
        }
    };
    std_listener.set_nonblocking(true).expect("set_nonblocking");
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("register listener");
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let state = Rc::new(State {
        pid: std::process::id(),
        instance: std::env::var("CLUSTERD_INSTANCE").unwrap_or_else(|_| "-".into()),
        requests: Cell::new(0),
        crash_after: env_num("DEMO_CRASH_AFTER"),
        health_failing: Cell::new(false),
        held: RefCell::new(Vec::new()),
        draining: Cell::new(false),
        last_request: Cell::new(Instant::now()),
    });
    println!(
        "demo-server pid {} listening on {addr} ({source})",
        state.pid
    );
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            eprintln!("demo-server: READY=1 failed: {e}");
        }
    }
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    let sig = loop {
        tokio::select! {
            sig = &mut shutdown => break sig,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = Rc::clone(&state);
                let conn = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(move |req| {
                        let state = Rc::clone(&state);
                        async move {
                            state.last_request.set(Instant::now());
                            let mut resp = handle(Rc::clone(&state), req).await?;
                            if state.draining.get() {
                                resp.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    }));
                let conn = graceful.watch(conn);
                tokio::task::spawn_local(async move {
                    let _ = conn.await;
                });
            }
        }
    };
    drop(listener);
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
    println!(
        "demo-server pid {}: {sig}, draining {} connection(s)",
        state.pid,
        graceful.count()
    );
    state.draining.set(true);
    let linger = Duration::from_millis(env_num("DEMO_LINGER_MS").unwrap_or(1000));
    state.last_request.set(Instant::now());
    loop {
        let idle = state.last_request.get().elapsed();
        if graceful.count() == 0 || idle >= linger {
            break;
        }
        tokio::time::sleep((linger - idle).min(Duration::from_millis(20))).await;
    }
    graceful.shutdown().await;
    println!("demo-server pid {}: drained, exiting", state.pid);
    0
}

/// The listening socket and where it came from.
fn listener() -> Result<(std::net::TcpListener, String), String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        return match fds.take_tcp_listener(0) {
            Ok(Some(l)) => Ok((l, "inherited fd 3".into())),
            Ok(None) => Err("LISTEN_FDS is set but fd 3 is not a TCP listener".into()),
            Err(e) => Err(format!("inherited fd 3: {e}")),
        };
    }
    let port = match std::env::var("PORT") {
        Ok(p) => p,
        Err(_) => {
            let mut args = std::env::args().skip(1);
            loop {
                match args.next().as_deref() {
                    Some("--port") => break args.next().ok_or("--port needs a value")?,
                    Some(other) => {
                        if let Some(v) = other.strip_prefix("--port=") {
                            break v.to_string();
                        }
                    }
                    None => {
                        return Err(
                            "no listener: set LISTEN_FDS (inherit), PORT, or pass --port N".into(),
                        )
                    }
                }
            }
        }
    };
    let port: u16 = port
        .trim()
        .parse()
        .map_err(|_| format!("bad port `{port}`"))?;
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(|l| (l, format!("port {port}")))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))
}

fn query_num(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn handle(
    state: Rc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = state.requests.get() + 1;
    state.requests.set(n);
    if state.crash_after.is_some_and(|limit| n > limit) {
        eprintln!(
            "demo-server pid {}: crashing after {} requests (DEMO_CRASH_AFTER)",
            state.pid,
            n - 1
        );
        std::process::exit(70);
    }
    let (status, body) = match req.uri().path() {
        "/" => (
            StatusCode::OK,
            format!("pid {} instance {}\n", state.pid, state.instance),
        ),
        "/healthz" if state.health_failing.get() => {
            (StatusCode::INTERNAL_SERVER_ERROR, "failing\n".into())
        }
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/fail-health" => {
            state.health_failing.set(true);
            (StatusCode::OK, "health now failing\n".into())
        }
        "/heal" => {
            state.health_failing.set(false);
            (StatusCode::OK, "health ok again\n".into())
        }
        "/slow" => {
            let ms = query_num(&req, "ms").unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (
                StatusCode::OK,
                format!("slept {ms} ms in pid {}\n", state.pid),
            )
        }
        "/grow" => {
            let mb = query_num(&req, "mb").unwrap_or(10) as usize;
            // Filled, so the pages are resident (counted in RSS), not just reserved.
            state.held.borrow_mut().push(vec![1u8; mb * 1024 * 1024]);
            let total: usize = state.held.borrow().iter().map(Vec::len).sum();
            (
                StatusCode::OK,
                format!("holding {} MiB in pid {}\n", total >> 20, state.pid),
            )
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    Ok(resp)
}

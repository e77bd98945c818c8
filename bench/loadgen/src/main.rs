//! loadgen: a small closed-loop HTTP/1.1 load generator for clusterd's benchmarks.
//!
//! `C` concurrent clients each send `GET PATH` in a loop for a fixed duration, either
//! reusing one keep-alive connection (`--mode keepalive`) or opening a new TCP connection
//! for every request (`--mode close`, which also sends `Connection: close`). Every request
//! ends in exactly one outcome: ok (2xx), non-2xx (by status), or an error of a named kind.
//! The result is printed as one JSON object on stdout: req/s, latency percentiles of
//! completed requests, and the counts.
//!
//! Unlike wrk, it never counts a request twice, and a failed request in keep-alive mode
//! is classified by whether the connection it used was fresh or reused, since a client
//! that retries idempotent requests would hide the second kind.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Set when the run should end: at the deadline, or on SIGINT/SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

struct Args {
    addr: SocketAddr,
    host: String,
    path: String,
    connections: usize,
    duration: Duration,
    keepalive: bool,
    threads: usize,
    timeout: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen [--mode keepalive|close] [-c CONNS] [-d SECS (0: until SIGINT/SIGTERM)] [--threads N] [--timeout SECS] http://HOST:PORT/PATH"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut url = None;
    let mut connections = 32;
    let mut duration = 5.0f64;
    let mut keepalive = true;
    let mut threads = 1;
    let mut timeout = 10.0f64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "-c" | "--connections" => connections = val().parse().unwrap_or_else(|_| usage()),
            "-d" | "--duration" => {
                duration = val()
                    .trim_end_matches('s')
                    .parse()
                    .unwrap_or_else(|_| usage())
            }
            "--threads" | "-t" => threads = val().parse().unwrap_or_else(|_| usage()),
            "--timeout" => {
                timeout = val()
                    .trim_end_matches('s')
                    .parse()
                    .unwrap_or_else(|_| usage())
            }
            "--mode" => {
                keepalive = match val().as_str() {
                    "keepalive" | "keep-alive" => true,
                    "close" => false,
                    _ => usage(),
                }
            }
            "-h" | "--help" => usage(),
            s if s.starts_with("http://") => url = Some(s.to_string()),
            _ => usage(),
        }
    }
    let url = url.unwrap_or_else(|| usage());
    let rest = &url["http://".len()..];
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| usage());
    Args {
        addr,
        host: hostport,
        path: path.to_string(),
        connections: connections.max(1),
        duration: Duration::from_secs_f64(duration),
        keepalive,
        threads: threads.max(1),
        timeout: Duration::from_secs_f64(timeout),
    }
}

#[derive(Default)]
struct Stats {
    ok: u64,
    non2xx: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// Microseconds, completed requests (any status).
    lat: Vec<u32>,
    /// Seconds since start of each failed request (errors and non-2xx), capped.
    fail_times: Vec<f64>,
}

impl Stats {
    fn fail(&mut self, kind: &'static str, t: f64) {
        *self.errors.entry(kind).or_default() += 1;
        if self.fail_times.len() < 10_000 {
            self.fail_times.push(t);
        }
    }
}

enum Outcome {
    /// Status code; whether the server will keep the connection open.
    Response(u16, bool),
}

fn io_kind(e: &std::io::Error, stage: &'static str) -> &'static str {
    match (stage, e.kind()) {
        ("connect", ErrorKind::ConnectionRefused) => "connect_refused",
        ("connect", ErrorKind::ConnectionReset) => "connect_reset",
        ("connect", _) => "connect_other",
        ("write", _) => "write_error",
        (_, ErrorKind::ConnectionReset) => "read_reset",
        (_, ErrorKind::UnexpectedEof) => "eof_before_response",
        _ => "read_other",
    }
}

/// Reads one response; returns its status and whether the connection may be reused.
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Outcome, (&'static str, Option<std::io::Error>)> {
    buf.clear();
    let mut tmp = [0u8; 16 * 1024];
    // Headers.
    let (status, body_len, chunked, close, hdr_end) = loop {
        let n = s.read(&mut tmp).await.map_err(|e| ("read", Some(e)))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ("eof_before_response", None)
            } else {
                ("eof_in_response", None)
            });
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(end)) => {
                let status = resp.code.unwrap_or(0);
                let mut len = None;
                let mut chunked = false;
                let mut close = resp.version == Some(0);
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok());
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = h
                            .value
                            .windows(7)
                            .any(|w| w.eq_ignore_ascii_case(b"chunked"));
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                        if v.contains("close") {
                            close = true;
                        } else if v.contains("keep-alive") {
                            close = false;
                        }
                    }
                }
                break (status, len, chunked, close, end);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > 64 * 1024 {
                    return Err(("bad_response", None));
                }
            }
            Err(_) => return Err(("bad_response", None)),
        }
    };
    // Body.
    if chunked {
        // Good enough for small bodies: read until the terminating zero-size chunk.
        while !buf[hdr_end..].windows(5).any(|w| w == b"0\r\n\r\n") {
            let n = s.read(&mut tmp).await.map_err(|e| ("read", Some(e)))?;
            if n == 0 {
                return Err(("eof_in_response", None));
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        Ok(Outcome::Response(status, !close))
    } else if let Some(len) = body_len {
        while buf.len() - hdr_end < len {
            let n = s.read(&mut tmp).await.map_err(|e| ("read", Some(e)))?;
            if n == 0 {
                return Err(("eof_in_response", None));
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        Ok(Outcome::Response(status, !close))
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Ok(Outcome::Response(status, !close))
    } else {
        // Close-delimited body.
        loop {
            let n = s.read(&mut tmp).await.map_err(|e| ("read", Some(e)))?;
            if n == 0 {
                break;
            }
        }
        Ok(Outcome::Response(status, false))
    }
}

async fn client(args: std::sync::Arc<Args>, start: Instant) -> Stats {
    let mut st = Stats::default();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: clusterd-loadgen\r\n{}\r\n",
        args.path,
        args.host,
        if args.keepalive {
            ""
        } else {
            "Connection: close\r\n"
        }
    )
    .into_bytes();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    while !STOP.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let tsec = (t0 - start).as_secs_f64();
        let reused = conn.is_some();
        let work = async {
            let mut s = match conn.take() {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect(args.addr)
                        .await
                        .map_err(|e| io_kind(&e, "connect"))?;
                    let _ = s.set_nodelay(true);
                    s
                }
            };
            s.write_all(&req).await.map_err(|e| io_kind(&e, "write"))?;
            match read_response(&mut s, &mut buf).await {
                Ok(Outcome::Response(code, keep)) => Ok((
                    code,
                    if keep && args.keepalive {
                        Some(s)
                    } else {
                        None
                    },
                )),
                Err((kind, e)) => Err(match e {
                    Some(e) => io_kind(&e, "read"),
                    None => kind,
                }),
            }
        };
        match tokio::time::timeout(args.timeout, work).await {
            Ok(Ok((code, keep))) => {
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                st.lat.push(us);
                if (200..300).contains(&code) {
                    st.ok += 1;
                } else {
                    *st.non2xx.entry(code).or_default() += 1;
                    if st.fail_times.len() < 10_000 {
                        st.fail_times.push(tsec);
                    }
                }
                conn = keep;
            }
            Ok(Err(kind)) => {
                // A request that failed on a reused keep-alive connection before any
                // response byte is the classic "server closed an idle connection" race.
                let kind = match (reused, kind) {
                    (true, "eof_before_response") => "reused_conn_eof",
                    (true, "read_reset") => "reused_conn_reset",
                    (true, "write_error") => "reused_conn_write_error",
                    (_, k) => k,
                };
                st.fail(kind, tsec);
                conn = None;
                if kind.starts_with("connect") {
                    // Don't spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(_) => {
                st.fail("timeout", tsec);
                conn = None;
            }
        }
    }
    st
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() {
    let args = std::sync::Arc::new(parse_args());
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let (all, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let dur = args.duration;
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let timer = async {
                if dur.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(dur).await
                }
            };
            tokio::select! {
                _ = timer => {}
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            STOP.store(true, Ordering::Relaxed);
        });
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| tokio::spawn(client(args.clone(), start)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("client task"));
        }
        (all, start.elapsed().as_secs_f64())
    });
    let mut total = Stats::default();
    for s in all {
        total.ok += s.ok;
        for (k, v) in s.non2xx {
            *total.non2xx.entry(k).or_default() += v;
        }
        for (k, v) in s.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.lat.extend(s.lat);
        total.fail_times.extend(s.fail_times);
    }
    total.lat.sort_unstable();
    total.fail_times.sort_by(|a, b| a.total_cmp(b));
    let non2xx: u64 = total.non2xx.values().sum();
    let errors: u64 = total.errors.values().sum();
    let completed = total.lat.len() as u64;
    let out = serde_json::json!({
        "mode": if args.keepalive { "keepalive" } else { "close" },
        "connections": args.connections,
        "duration_s": elapsed,
        "requests": completed + errors,
        "ok": total.ok,
        "non2xx": non2xx,
        "non2xx_by_status": total.non2xx.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errors": errors,
        "errors_by_kind": total.errors,
        "failed": errors + non2xx,
        "rps": total.ok as f64 / elapsed,
        "latency_ms": {
            "p50": pct(&total.lat, 50.0),
            "p90": pct(&total.lat, 90.0),
            "p99": pct(&total.lat, 99.0),
            "max": pct(&total.lat, 100.0),
        },
        "fail_times_s": total.fail_times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
    });
    println!("{out}");
}

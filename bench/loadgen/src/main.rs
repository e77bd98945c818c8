//! loadgen: a small closed-loop HTTP/1.1 load generator for clusterd's benchmarks.
//!
//! `C` concurrent clients each send `GET PATH` in a loop for a fixed duration, either
//! reusing one keep-alive connection (`--mode keepalive`) or opening a new TCP connection
//! for every request (`--mode close`, which also sends `Connection: close`). Every request
//! ends in exactly one outcome: ok (2xx), non-2xx (by status), or an error of a named kind.
//! The result is printed as one JSON object on stdout: req/s, latency percentiles of
//! completed requests, and the counts.
//!
//! With an `https://` URL every connection is TLS (rustls, ring), with ALPN `http/1.1`.
//! The server's certificate is *not* verified (`--tls` is for benchmarking loopback
//! listeners with a self-signed certificate), but its handshake signature is, so a
//! handshake costs the server what a real client's would. A new connection per request
//! resumes the previous session (rustls' in-memory ticket cache), as a returning browser
//! would; `--no-resume` forces a full handshake every time.
//!
//! Unlike wrk, it never counts a request twice, and a failed request in keep-alive mode
//! is classified by whether the connection it used was fresh or reused, since a client
//! that retries idempotent requests would hide the second kind.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection, plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

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
    /// `https://`: the connector and the name to present (SNI).
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// Accepts any certificate (loopback benchmarks against self-signed certificates) but
/// checks the handshake signature like any client, so the server does its full work.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector(resume: bool) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen [--mode keepalive|close] [-c CONNS] [-d SECS (0: until SIGINT/SIGTERM)] [--threads N] [--timeout SECS] [--no-resume] http[s]://HOST:PORT/PATH"
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
    let mut resume = true;
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
            "--no-resume" => resume = false,
            "-h" | "--help" => usage(),
            s if s.starts_with("http://") || s.starts_with("https://") => url = Some(s.to_string()),
            _ => usage(),
        }
    }
    let url = url.unwrap_or_else(|| usage());
    let https = url.starts_with("https://");
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if https { 443 } else { 80 })
    };
    let tls = https.then(|| {
        let host = hostport.rsplit_once(':').map_or(&*hostport, |(h, _)| h);
        let name =
            rustls_pki_types::ServerName::try_from(host.to_string()).unwrap_or_else(|_| usage());
        (tls_connector(resume), name)
    });
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
        tls,
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
        ("tls", _) => "tls_handshake",
        ("write", _) => "write_error",
        (_, ErrorKind::ConnectionReset) => "read_reset",
        (_, ErrorKind::UnexpectedEof) => "eof_before_response",
        _ => "read_other",
    }
}

/// Reads one response; returns its status and whether the connection may be reused.
async fn read_response(
    s: &mut (impl AsyncRead + Unpin),
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

async fn client(args: Arc<Args>, start: Instant) -> Stats {
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
    let mut conn: Option<Box<dyn Conn>> = None;
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
                    match &args.tls {
                        None => Box::new(s) as Box<dyn Conn>,
                        Some((connector, name)) => Box::new(
                            connector
                                .connect(name.clone(), s)
                                .await
                                .map_err(|e| io_kind(&e, "tls"))?,
                        ),
                    }
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
    let args = Arc::new(parse_args());
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

//! http mode as the front door, through the real daemon (issue 14): TLS terminated by
//! clusterd in front of an unmodified Node app, HTTP/2 and HTTP/1.1 by ALPN (curl),
//! SNI (openssl s_client), a renewed certificate served without a reload, a broken one
//! refused (with a `certificate-refused` event) and a fixed one loaded again, sticky
//! sessions from several source addresses; and an HTTP/2 load over TLS that loses no
//! request across rolling reloads, and whose stream in flight finishes when the daemon
//! shuts down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// Answers with its pid, the scheme the proxy reported and the HTTP version it got.
const NODE_ECHO: &str = "require('http').createServer((q,s)=>s.end(process.pid+' '+q.headers['x-forwarded-proto']+' '+q.httpVersion)).listen(process.env.PORT)";

/// A self-signed pair for `names`, written (atomically) to `dir/stem.{pem,key}`;
/// returns the certificate's PEM.
fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> String {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    let tmp = dir.join(".tmp");
    std::fs::write(&tmp, ck.cert.pem()).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{stem}.pem"))).unwrap();
    std::fs::write(&tmp, ck.key_pair.serialize_pem()).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{stem}.key"))).unwrap();
    ck.cert.pem()
}

/// `curl` over TLS to `name:port` (resolved to 127.0.0.1), from `source`; returns the
/// body followed by ` HTTPVERSION`, or the failure.
fn curl(port: u16, name: &str, version: &str, source: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "10",
            version,
            "--interface",
            source,
        ])
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .args(["-w", " %{http_version}"])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The leaf certificate (PEM, whitespace removed) `openssl s_client` gets for `sni`.
fn served_pem(port: u16, sni: &str) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", sni])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
    let end = text
        .find("-----END CERTIFICATE-----")
        .map_or(0, |e| e + "-----END CERTIFICATE-----".len());
    squash(&text[start..end.max(start)])
}

fn squash(pem: &str) -> String {
    pem.split_whitespace().collect()
}

fn tools_present() -> bool {
    ["curl", "openssl"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok())
}

#[test]
fn tls_front_door_h2_sni_renewal_and_affinity() {
    if !tools_present() {
        assert!(
            std::env::var_os("CLUSTERD_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
            "curl or openssl is missing and CLUSTERD_REQUIRE_TOOLS=1 (run .ci/run)"
        );
        eprintln!("SKIP tls_front_door: curl or openssl missing");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let dir: PathBuf = certs.path().to_path_buf();
    let a_pem = write_pair(&dir, "a", &["a.test"]);
    let w_pem = write_pair(&dir, "w", &["*.wild.test"]);
    let d = Daemon::start();
    let port = free_port();
    let manifest = proxied_manifest(
        "front",
        port,
        "http",
        3,
        &format!("[\"node\", \"-e\", \"{NODE_ECHO}\"]"),
        "",
    )
    .replace(
        "      mode: http\n",
        &format!(
            "      mode: http\n      affinity: clientIP\n      tls:\n        certificates:\n          - {{cert: {0}/a.pem, key: {0}/a.key}}\n          - {{cert: {0}/w.pem, key: {0}/w.key}}\n",
            dir.display()
        ),
    );
    d.write_manifest("front.yaml", &manifest);
    d.wait_phase("front", "Available", Duration::from_secs(30));
    let mut pids = d.ready_pids("front");
    pids.sort_unstable();

    // HTTP/2 and HTTP/1.1 by ALPN; the Node workers get HTTP/1.1 and `https`.
    for (flag, shown) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let body = curl(port, "a.test", flag, "127.0.0.1").unwrap();
        let parts: Vec<&str> = body.split(' ').collect();
        assert_eq!(parts.len(), 4, "{body}");
        assert!(pids.contains(&parts[0].parse().unwrap()), "{body} {pids:?}");
        assert_eq!(&parts[1..], ["https", "1.1", shown], "{body}");
    }

    // SNI: exact name, wildcard, and the first as the default.
    assert_eq!(served_pem(port, "a.test"), squash(&a_pem));
    assert_eq!(served_pem(port, "x.wild.test"), squash(&w_pem));
    assert_eq!(served_pem(port, "nothing.test"), squash(&a_pem));

    // Sticky sessions: each source address keeps its worker.
    let mut seen = std::collections::BTreeSet::new();
    for i in 2..=9 {
        let source = format!("127.0.0.{i}");
        let pid_of = || {
            curl(port, "a.test", "--http1.1", &source)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let first = pid_of();
        for _ in 0..3 {
            assert_eq!(pid_of(), first, "{source} changed worker");
        }
        seen.insert(first);
    }
    assert!(seen.len() > 1, "8 addresses all on one worker: {seen:?}");

    // A renewed certificate is served without a reload.
    let renewed = write_pair(&dir, "a", &["a.test"]);
    eventually(
        Duration::from_secs(15),
        "renewed certificate served",
        || (served_pem(port, "a.test") == squash(&renewed)).then_some(()),
    );
    // A broken pair is refused; the renewed one stays in use.
    std::fs::write(dir.join("a.key"), "garbage\n").unwrap();
    let w_renewed = write_pair(&dir, "w", &["*.wild.test"]);
    eventually(Duration::from_secs(15), "probe certificate renewed", || {
        (served_pem(port, "x.wild.test") == squash(&w_renewed)).then_some(())
    });
    assert_eq!(served_pem(port, "a.test"), squash(&renewed));
    assert!(curl(port, "a.test", "--http2", "127.0.0.1").is_ok());
    let mut now = d.ready_pids("front");
    now.sort_unstable();
    assert_eq!(now, pids, "no worker was restarted");
    assert!(
        d.log().contains("certificate refused"),
        "the refusal is logged"
    );

    // ... and is an event, with the file, what is wrong and what was expected.
    let key = dir.join("a.key");
    let refused = d
        .events("front")
        .into_iter()
        .find(|e| {
            e["kind"] == "certificate-refused"
                && e["message"].as_str().is_some_and(|m| {
                    m.contains(&format!("{}: no PEM private key found", key.display()))
                })
        })
        .unwrap_or_else(|| panic!("no certificate-refused event: {:?}", d.events("front")));
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("127.0.0.1:{port}: ")),
        "{message}"
    );
    assert!(message.contains(", expected a PKCS#8"), "{message}");
    assert!(
        message.ends_with("still serving the previous certificate"),
        "{message}"
    );
    let out = d.cli(&["events", "front"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("certificate-refused"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A good pair again: served, and reported as loaded after the refusal.
    let fixed = write_pair(&dir, "a", &["a.test"]);
    eventually(Duration::from_secs(15), "fixed certificate served", || {
        (served_pem(port, "a.test") == squash(&fixed)).then_some(())
    });
    let cert = dir.join("a.pem");
    let loaded = eventually(Duration::from_secs(15), "certificate-loaded event", || {
        d.events("front").into_iter().find(|e| {
            e["kind"] == "certificate-loaded"
                && e["seq"].as_u64() > refused["seq"].as_u64()
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("{} (key", cert.display())))
        })
    });
    assert!(
        loaded["message"]
            .as_str()
            .unwrap()
            .ends_with("reloaded; new connections get it"),
        "{loaded}"
    );
    eprintln!("events: {message} / {}", loaded["message"]);
}

/// Answers with its pid; `/slow` sends its head at once and its body 1.5 s later.
const NODE_SLOW_ECHO: &str = "require('http').createServer((q,s)=>{if(q.url==='/slow'){s.writeHead(200);s.flushHeaders();setTimeout(()=>s.end(String(process.pid)),1500)}else s.end(String(process.pid))}).listen(process.env.PORT)\n";

/// A small HTTP/2-over-TLS client load: `conns` connections, each with `streams`
/// requests in flight at all times, every outcome counted, every answering pid kept.
mod h2load {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http2::SendRequest;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// Accepts the test's self-signed certificate (the handshake signature is still checked).
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A new HTTP/2 connection over TLS (ALPN `h2` only) to 127.0.0.1:`port`, SNI `a.test`.
    pub async fn connect(port: u16) -> Result<SendRequest<Empty<Bytes>>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from("a.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the server did not choose h2 by ALPN".into());
        }
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// GET `path`; the status and the body.
    pub async fn get(
        send: &mut SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> Result<(u16, String), String> {
        let resp = request(send, path).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Sends GET `path` and waits for the response head only.
    pub async fn request(
        send: &mut SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        send.ready().await.map_err(|e| format!("ready: {e}"))?;
        let req = hyper::Request::get(format!("https://a.test{path}"))
            .body(Empty::new())
            .unwrap();
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))
    }

    #[derive(Default)]
    pub struct Counts {
        pub ok: AtomicU64,
        pub failed: AtomicU64,
        /// Connections opened (each one beyond the first per slot means one was lost).
        pub connects: AtomicU64,
        pub errors: Mutex<Vec<String>>,
        /// Answering pid -> requests.
        pub pids: Mutex<BTreeMap<i32, u64>>,
    }

    impl Counts {
        fn fail(&self, e: String) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut errors = self.errors.lock().unwrap();
            if errors.len() < 10 {
                errors.push(e);
            }
        }
    }

    pub struct Load {
        stop: Arc<AtomicBool>,
        pub counts: Arc<Counts>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Load {
        pub fn start(port: u16, conns: usize, streams: usize) -> Load {
            let stop = Arc::new(AtomicBool::new(false));
            let counts = Arc::new(Counts::default());
            let thread = std::thread::spawn({
                let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
                move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let mut all = tokio::task::JoinSet::new();
                        for _ in 0..conns {
                            all.spawn(connection(
                                port,
                                streams,
                                Arc::clone(&stop),
                                Arc::clone(&counts),
                            ));
                        }
                        while all.join_next().await.is_some() {}
                    });
                }
            });
            Load {
                stop,
                counts,
                thread,
            }
        }

        pub fn ok(&self) -> u64 {
            self.counts.ok.load(Ordering::Relaxed)
        }

        pub fn stop(self) -> Arc<Counts> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().unwrap();
            self.counts
        }
    }

    /// One connection slot: `streams` request loops on one connection, a new
    /// connection only if it is lost.
    async fn connection(port: u16, streams: usize, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
        while !stop.load(Ordering::Relaxed) {
            counts.connects.fetch_add(1, Ordering::Relaxed);
            let send = match connect(port).await {
                Ok(s) => s,
                Err(e) => {
                    counts.fail(e);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let mut loops = tokio::task::JoinSet::new();
            for _ in 0..streams {
                let (mut send, stop, counts) =
                    (send.clone(), Arc::clone(&stop), Arc::clone(&counts));
                loops.spawn(async move {
                    while !stop.load(Ordering::Relaxed) && !send.is_closed() {
                        match get(&mut send, "/").await {
                            Ok((200, body)) => match body.trim().parse::<i32>() {
                                Ok(pid) => {
                                    counts.ok.fetch_add(1, Ordering::Relaxed);
                                    *counts.pids.lock().unwrap().entry(pid).or_default() += 1;
                                }
                                Err(_) => counts.fail(format!("200 with body {body:?}")),
                            },
                            Ok((status, body)) => counts.fail(format!("{status}: {body}")),
                            Err(e) => counts.fail(e),
                        }
                    }
                });
            }
            while loops.join_next().await.is_some() {}
        }
    }
}

#[test]
fn tls_h2_load_through_reloads_then_goaway_lets_streams_finish() {
    use std::sync::atomic::Ordering;
    if !tools_present() {
        eprintln!("SKIP tls_h2_load: curl or openssl missing");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), "a", &["a.test"]);
    let app = script(certs.path(), "app.js", NODE_SLOW_ECHO);
    let d = Daemon::start();
    let port = free_port();
    let manifest = proxied_manifest(
        "h2",
        port,
        "http",
        2,
        &format!("[\"node\", \"{}\"]", app.display()),
        "",
    )
    .replace(
        "      mode: http\n",
        &format!(
            "      mode: http\n      tls:\n        certificates:\n          - {{cert: {0}/a.pem, key: {0}/a.key}}\n",
            certs.path().display()
        ),
    );
    d.write_manifest("h2.yaml", &manifest);
    d.wait_phase("h2", "Available", Duration::from_secs(30));
    let first_pids = d.ready_pids("h2");

    // 4 connections x 8 streams in flight, across 3 rolling reloads.
    let (conns, streams) = (4, 8);
    let load = h2load::Load::start(port, conns, streams);
    eventually(Duration::from_secs(30), "h2 load to flow", || {
        (load.ok() >= 200).then_some(())
    });
    for i in 0..3 {
        let before = load.ok();
        let out = d.cli(&["reload", "h2"]);
        assert!(
            out.status.success(),
            "reload {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let during = load.ok() - before;
        assert!(during > 0, "no request completed during reload {i}");
        eventually(
            Duration::from_secs(30),
            "load to flow after the reload",
            || (load.ok() >= before + during + 100).then_some(()),
        );
    }
    let last_pids = d.ready_pids("h2");
    let counts = load.stop();
    let (ok, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    let errors = counts.errors.lock().unwrap().clone();
    if failed > 0 {
        let log = d.log();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        panic!(
            "{failed} of {} failed: {errors:?}; the daemon's warnings:\n{}",
            ok + failed,
            warnings.join("\n")
        );
    }
    assert_eq!(
        counts.connects.load(Ordering::Relaxed),
        conns as u64,
        "an HTTP/2 connection was lost across the reloads: {errors:?}"
    );
    let answered: Vec<i32> = counts.pids.lock().unwrap().keys().copied().collect();
    for pid in first_pids.iter().chain(&last_pids) {
        assert!(
            answered.contains(pid),
            "pid {pid} (first {first_pids:?}, last {last_pids:?}) never answered: {answered:?}"
        );
    }
    assert!(
        first_pids.iter().all(|p| !last_pids.contains(p)),
        "every worker was replaced: {first_pids:?} -> {last_pids:?}"
    );
    eprintln!("h2 load: {ok} requests over 3 reloads, 0 failed, pids {answered:?}");

    // Daemon shutdown: a stream in flight finishes (GOAWAY, then drain before signal),
    // and the connection is closed after it.
    let mut d = d;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut send = h2load::connect(port).await.unwrap();
        let resp = h2load::request(&mut send, "/slow").await.unwrap();
        assert_eq!(resp.status(), 200);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("the in-flight stream finished")
            .to_bytes();
        let pid: i32 = String::from_utf8_lossy(&body).trim().parse().unwrap();
        assert!(last_pids.contains(&pid), "{pid} {last_pids:?}");
        tokio::time::timeout(Duration::from_secs(20), async {
            while !send.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the connection closes after the shutdown");
    });
    let status = d.stop().expect("the daemon exits");
    assert!(status.success(), "{status:?}");
}

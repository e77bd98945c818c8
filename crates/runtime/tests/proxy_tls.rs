//! The http proxy as a TLS front door, with a real rustls client: certificate choice by
//! SNI, renewal without a reload, refusal of a broken pair, HTTP/2 to clients with
//! HTTP/1.1 to workers, per-stream drain accounting, and sticky sessions.
#![allow(missing_docs)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clusterd_core::model::{Tls, TlsCertificate};
use clusterd_core::plan::WorkerId;
use clusterd_runtime::proxy::HttpProxyConfig;
use clusterd_runtime::tls::TlsTerminator;
use http_body_util::BodyExt;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

use support::*;

const W1: WorkerId = WorkerId(1);
const W2: WorkerId = WorkerId(2);
const W3: WorkerId = WorkerId(3);

/// Accepts any server certificate (the tests check which one was served instead),
/// while still checking the handshake signatures.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(alpn: &[&[u8]], tls12_only: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(addr: SocketAddr, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    try_tls_connect(addr, sni, alpn, false).await.unwrap()
}

async fn try_tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    tls12_only: bool,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(client_config(alpn, tls12_only))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// The DER of the leaf certificate the server presented.
fn served(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A self-signed pair for `names`, written to `dir/stem.{pem,key}`; returns the leaf DER.
fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    // Write then rename, as certbot and friends do.
    let tmp = dir.join(".tmp");
    std::fs::write(&tmp, ck.cert.pem()).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    std::fs::write(&tmp, ck.key_pair.serialize_pem()).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

fn tls_config(pairs: &[(&PathBuf, &PathBuf)]) -> HttpProxyConfig {
    let tls = Tls {
        certificates: pairs
            .iter()
            .map(|(c, k)| TlsCertificate {
                cert: (*c).clone(),
                key: (*k).clone(),
            })
            .collect(),
        acme: None,
    };
    HttpProxyConfig {
        no_backend_wait: Duration::from_millis(500),
        header_read_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(2),
        tls: TlsTerminator::new(Some(&tls)),
        ..HttpProxyConfig::default()
    }
}

/// An HTTP/1.1 request over an established TLS stream; returns status and body.
async fn h1_get(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let resp = sender
        .send_request(
            Request::get(path)
                .header("host", "a.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn h1_over(
    s: TlsStream<TcpStream>,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_wildcards_match() {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key, a_der) = write_pair(dir.path(), "a", &["a.test"]);
    let (w_cert, w_key, w_der) = write_pair(dir.path(), "w", &["*.wild.test"]);
    let proxy = Proxy::http(tls_config(&[(&a_cert, &a_key), (&w_cert, &w_key)])).await;
    let backend = Backend::ok().await;
    proxy.routes.add(W1, backend.addr);

    assert_eq!(served(&tls_connect(proxy.addr, "a.test", &[]).await), a_der);
    assert_eq!(
        served(&tls_connect(proxy.addr, "x.wild.test", &[]).await),
        w_der
    );
    assert_eq!(
        served(&tls_connect(proxy.addr, "unknown.test", &[]).await),
        a_der,
        "the first certificate is the default"
    );
    assert_eq!(
        served(&tls_connect(proxy.addr, "wild.test", &[]).await),
        a_der,
        "a wildcard does not cover its apex"
    );
    // TLS 1.2 is still accepted; the request goes through.
    let s = try_tls_connect(proxy.addr, "a.test", &[b"http/1.1"], true)
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut sender, _conn) = h1_over(s).await;
    assert_eq!(h1_get(&mut sender, "/").await, (200, "ok".to_string()));
    // Plain HTTP on a TLS listener is not served.
    let mut plain = Client::connect(proxy.addr).await.unwrap();
    assert!(plain.get("/").await.is_err());
    proxy.stop().await;
}

/// The suite the server picks for a client that offers `suites` in that order.
async fn negotiated(
    addr: SocketAddr,
    suites: &[rustls::CipherSuite],
    tls12_only: bool,
) -> rustls::CipherSuite {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suites
        .iter()
        .map(|want| {
            *provider
                .cipher_suites
                .iter()
                .find(|s| s.suite() == *want)
                .unwrap()
        })
        .collect();
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    s.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

#[tokio::test]
async fn aes_128_gcm_is_preferred_unless_the_client_puts_chacha_first() {
    use rustls::CipherSuite::*;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(tls_config(&[(&cert, &key)])).await;
    // OpenSSL's and rustls' own order: AES-256 first; the server picks AES-128.
    let openssl_like = [
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_128_GCM_SHA256,
    ];
    assert_eq!(
        negotiated(proxy.addr, &openssl_like, false).await,
        TLS13_AES_128_GCM_SHA256
    );
    // Without AES-128 offered, the next of ours.
    let no_128 = [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    assert_eq!(
        negotiated(proxy.addr, &no_128, false).await,
        TLS13_AES_256_GCM_SHA384
    );
    // A client without AES hardware (ChaCha20 first) gets ChaCha20.
    let no_aes = [
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
    ];
    assert_eq!(
        negotiated(proxy.addr, &no_aes, false).await,
        TLS13_CHACHA20_POLY1305_SHA256
    );
    // TLS 1.2 alike (the test certificate is ECDSA).
    assert_eq!(
        negotiated(
            proxy.addr,
            &[
                TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            ],
            true
        )
        .await,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
    proxy.stop().await;
}

/// A worker that answers with what it saw: version, scheme header, cookies.
async fn echo_backend() -> Backend {
    Backend::spawn(|req: Request<hyper::body::Incoming>| async move {
        let h = req.headers();
        let get = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
                .join("|")
        };
        Response::new(full(format!(
            "version={:?} proto={} host={} cookie={} forwarded={}",
            req.version(),
            get("x-forwarded-proto"),
            get("host"),
            get("cookie"),
            get("forwarded"),
        )))
    })
    .await
}

async fn h2_over(
    s: TlsStream<TcpStream>,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

#[tokio::test]
async fn h2_and_http11_clients_reach_an_http11_worker_as_https() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(tls_config(&[(&cert, &key)])).await;
    let backend = echo_backend().await;
    proxy.routes.add(W1, backend.addr);

    let s = tls_connect(proxy.addr, "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, _conn) = h2_over(s).await;
    let resp = h2
        .send_request(
            Request::get("https://a.test/x")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("version=HTTP/1.1"), "{body}");
    assert!(body.contains("proto=https"), "{body}");
    assert!(body.contains("host=a.test"), "{body}");
    assert!(body.contains("cookie=a=1; b=2"), "{body}");
    assert!(body.contains("proto=https;host=\"a.test\""), "{body}");

    let s = tls_connect(proxy.addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, _conn) = h1_over(s).await;
    let (status, body) = h1_get(&mut h1, "/y").await;
    assert_eq!(status, 200);
    assert!(body.contains("version=HTTP/1.1 proto=https"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn h2_streams_count_in_flight_and_shutdown_sends_goaway() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(tls_config(&[(&cert, &key)])).await;
    let gate = Arc::new(Semaphore::new(0));
    let backend = Backend::spawn({
        let gate = Arc::clone(&gate);
        move |_req| {
            let gate = Arc::clone(&gate);
            async move {
                gate.acquire().await.unwrap().forget();
                Response::new(full("done"))
            }
        }
    })
    .await;
    proxy.routes.add(W1, backend.addr);
    let s = tls_connect(proxy.addr, "a.test", &[b"h2"]).await;
    let (h2, conn) = h2_over(s).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        let mut h2 = h2.clone();
        streams.push(tokio::spawn(async move {
            let resp = h2
                .send_request(
                    Request::get(format!("https://a.test/{i}"))
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    let routes = Arc::clone(&proxy.routes);
    eventually(Duration::from_secs(10), "3 streams in flight", || {
        let routes = Arc::clone(&routes);
        async move { routes.inflight(W1) == 3 }
    })
    .await;
    // Drain: nothing new goes to W1, and the drain waits for all three streams.
    proxy.routes.stop_routing(W1);
    let drained = tokio::spawn({
        let routes = Arc::clone(&proxy.routes);
        async move { routes.drained(W1).await }
    });
    gate.add_permits(2);
    eventually(Duration::from_secs(10), "2 streams done", || {
        let routes = Arc::clone(&routes);
        async move { routes.inflight(W1) == 1 }
    })
    .await;
    assert!(!drained.is_finished(), "drained with a stream in flight");
    gate.add_permits(1);
    drained.await.unwrap();
    for s in streams {
        assert_eq!(s.await.unwrap(), "done");
    }
    // Shutdown: the idle h2 connection is told to go away and closes.
    proxy.stop().await;
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("client connection closed after GOAWAY")
        .unwrap();
}

#[tokio::test]
async fn renewed_certificate_is_served_and_open_connections_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, old_der) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(tls_config(&[(&cert, &key)])).await;
    let backend = Backend::ok().await;
    proxy.routes.add(W1, backend.addr);

    let open = tls_connect(proxy.addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(served(&open), old_der);
    let (mut keep_alive, _conn) = h1_over(open).await;
    assert_eq!(h1_get(&mut keep_alive, "/").await.0, 200);

    let (_, _, new_der) = write_pair(dir.path(), "a", &["a.test"]);
    assert_ne!(new_der, old_der);
    let addr = proxy.addr;
    eventually(
        Duration::from_secs(10),
        "renewed certificate served",
        || {
            let new_der = new_der.clone();
            async move { served(&tls_connect(addr, "a.test", &[]).await) == new_der }
        },
    )
    .await;
    // The connection opened before the renewal is still there and still works.
    assert_eq!(h1_get(&mut keep_alive, "/").await.0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_broken_pair_is_refused_and_the_last_good_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key, a_der) = write_pair(dir.path(), "a", &["a.test"]);
    let (p_cert, p_key, _) = write_pair(dir.path(), "probe", &["probe.test"]);
    let proxy = Proxy::http(tls_config(&[(&a_cert, &a_key), (&p_cert, &p_key)])).await;
    let backend = Backend::ok().await;
    proxy.routes.add(W1, backend.addr);

    // a.test gets a key that belongs to another certificate; at the same time the probe
    // pair is renewed, so that seeing the new probe proves the files were re-checked
    // (both pairs are checked in one pass, a.test first).
    let (_, other_key, _) = write_pair(dir.path(), "other", &["a.test"]);
    std::fs::copy(&other_key, dir.path().join(".k")).unwrap();
    std::fs::rename(dir.path().join(".k"), &a_key).unwrap();
    let (_, _, probe_new) = write_pair(dir.path(), "probe", &["probe.test"]);
    let addr = proxy.addr;
    eventually(Duration::from_secs(10), "probe renewed", || {
        let probe_new = probe_new.clone();
        async move { served(&tls_connect(addr, "probe.test", &[]).await) == probe_new }
    })
    .await;
    let s = tls_connect(addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(served(&s), a_der, "the last good certificate stays in use");
    let (mut sender, _conn) = h1_over(s).await;
    assert_eq!(h1_get(&mut sender, "/").await.0, 200);

    // Garbage in the certificate file: same.
    std::fs::write(&a_cert, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
    let (_, _, probe_newer) = write_pair(dir.path(), "probe", &["probe.test"]);
    eventually(Duration::from_secs(10), "probe renewed again", || {
        let probe_newer = probe_newer.clone();
        async move { served(&tls_connect(addr, "probe.test", &[]).await) == probe_newer }
    })
    .await;
    assert_eq!(served(&tls_connect(addr, "a.test", &[]).await), a_der);
    proxy.stop().await;
}

/// A plain HTTP/1.1 GET from `source` (a 127.0.0.x address); returns the body.
async fn get_from(proxy: SocketAddr, source: IpAddr) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = sock.connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::get("/").header("host", "t").body(empty()).unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn affinity_keeps_each_client_on_its_worker_and_moves_only_changed_ones() {
    let proxy = Proxy::http(HttpProxyConfig {
        no_backend_wait: Duration::from_millis(500),
        ..HttpProxyConfig::default()
    })
    .await;
    proxy.routes.set_affinity(true);
    let named =
        |name: &'static str| Backend::spawn(move |_req| async move { Response::new(full(name)) });
    let (b1, b2, b3) = (named("w1").await, named("w2").await, named("w3").await);
    proxy.routes.add(W1, b1.addr);
    proxy.routes.add(W2, b2.addr);
    let sources: Vec<IpAddr> = (2..=25u8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let mut first = Vec::new();
    for s in &sources {
        let w = get_from(proxy.addr, *s).await;
        for _ in 0..3 {
            assert_eq!(get_from(proxy.addr, *s).await, w, "{s} changed worker");
        }
        first.push(w);
    }
    assert!(first.iter().any(|w| w == "w1") && first.iter().any(|w| w == "w2"));

    // Scale up: clients move only to the new worker.
    proxy.routes.add(W3, b3.addr);
    let mut second = Vec::new();
    for (s, before) in sources.iter().zip(&first) {
        let now = get_from(proxy.addr, *s).await;
        assert!(now == *before || now == "w3", "{s}: {before} -> {now}");
        second.push(now);
    }
    // Drain w1: only its clients move.
    proxy.routes.stop_routing(W1);
    for (s, before) in sources.iter().zip(&second) {
        let now = get_from(proxy.addr, *s).await;
        if before == "w1" {
            assert_ne!(now, "w1");
        } else {
            assert_eq!(now, *before, "{s} moved though its worker stayed");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn h2_load_through_three_worker_replacements_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(tls_config(&[(&cert, &key)])).await;
    let mut current = (W1, Backend::ok().await);
    proxy.routes.add(current.0, current.1.addr);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let s = tls_connect(proxy.addr, "a.test", &[b"h2"]).await;
        let (h2, conn) = h2_over(s).await;
        for _ in 0..4 {
            let (mut h2, stop, ok) = (h2.clone(), Arc::clone(&stop), Arc::clone(&ok));
            clients.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = Request::get("https://a.test/").body(empty()).unwrap();
                    match h2.send_request(req).await {
                        Ok(resp) if resp.status() == 200 => {
                            resp.into_body().collect().await.unwrap();
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(resp) => failed.push(resp.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                failed
            }));
        }
        clients.push(tokio::spawn(async move {
            let _ = conn.await;
            Vec::new()
        }));
    }
    let wait_ok = |n: u64| {
        let ok = Arc::clone(&ok);
        async move {
            let target = ok.load(std::sync::atomic::Ordering::Relaxed) + n;
            eventually(Duration::from_secs(10), "requests flowing", || {
                let ok = Arc::clone(&ok);
                async move { ok.load(std::sync::atomic::Ordering::Relaxed) >= target }
            })
            .await;
        }
    };
    wait_ok(50).await;
    for next in [W2, W3, WorkerId(4)] {
        // A reload step: the new worker is routable, then the old one drains and goes.
        let fresh = Backend::ok().await;
        proxy.routes.add(next, fresh.addr);
        proxy.routes.stop_routing(current.0);
        proxy.routes.drained(current.0).await;
        proxy.routes.remove(current.0);
        current = (next, fresh);
        wait_ok(50).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = Vec::new();
    let loaders = clients.len();
    for (i, c) in clients.into_iter().enumerate() {
        if i % 5 != 4 {
            failed.extend(c.await.unwrap());
        } else {
            c.abort();
        }
    }
    assert!(loaders > 0);
    assert!(failed.is_empty(), "{failed:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn idle_h2_connection_is_sent_away() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_pair(dir.path(), "a", &["a.test"]);
    let proxy = Proxy::http(HttpProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..tls_config(&[(&cert, &key)])
    })
    .await;
    let backend = Backend::ok().await;
    proxy.routes.add(W1, backend.addr);
    let s = tls_connect(proxy.addr, "a.test", &[b"h2"]).await;
    let (mut h2, conn) = h2_over(s).await;
    let resp = h2
        .send_request(Request::get("https://a.test/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("idle connection closed by the proxy")
        .unwrap();
    proxy.stop().await;
}

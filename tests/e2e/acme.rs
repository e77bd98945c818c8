//! `tls.acme` through the real daemon against Debian's `pebble` (an ACME test server,
//! RFC 8555): the daemon obtains a certificate by answering TLS-ALPN-01 on its own
//! listener, serves it, keeps it across a restart without a new order, and renews it
//! (test knob `CLUSTERD_ACME_RENEW_AFTER`) while a keep-alive connection stays open.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::*;

/// A pebble process on 127.0.0.1, killed on drop.
struct Pebble {
    child: Child,
    log: PathBuf,
    directory: String,
    /// The CA of pebble's own HTTPS certificate (the manifest's `caBundle`).
    ca: PathBuf,
    /// Pebble's management API (its issuing root, made anew each run).
    management: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Starts pebble validating TLS-ALPN-01 on `tls_port` (clusterd's listener).
    fn start(dir: &Path, bin: &Path, tls_port: u16) -> Pebble {
        // Pebble's Debian package ships no test certificates: a CA and a server
        // certificate for 127.0.0.1 are made here.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "clusterd test ACME server CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        let (acme_port, mgmt_port, http_port) = (free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.join("server.pem"),
            "privateKey": dir.join("server.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let child = Command::new(bin)
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Deterministic: no nonces rejected on purpose, no authorization reused.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(15), "pebble listening", || {
            std::net::TcpStream::connect(("127.0.0.1", acme_port))
                .ok()
                .map(|_| ())
        });
        Pebble {
            child,
            log,
            directory: format!("https://127.0.0.1:{acme_port}/dir"),
            ca,
            management: format!("https://127.0.0.1:{mgmt_port}"),
        }
    }

    /// Writes the root pebble issues under to `path` (from its management API).
    fn write_root(&self, path: &Path) {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.ca)
            .arg(format!("{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(path, &out.stdout).unwrap();
    }

    /// How many certificates pebble has issued.
    fn issued(&self) -> usize {
        read(&self.log).matches("Issued certificate serial").count()
    }
}

/// Pebble, if installed (and curl and openssl, which check what is served); else
/// `None` after printing why, or a failure in CI (`CLUSTERD_REQUIRE_TOOLS=1`).
fn find_pebble() -> Option<PathBuf> {
    let found = ["/usr/bin/pebble", "/usr/local/bin/pebble"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let tools = ["curl", "openssl"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    let missing = match (&found, tools) {
        (Some(_), true) => return found,
        (None, _) => "pebble is not installed (apt-get install pebble)",
        (Some(_), false) => "curl or openssl is missing",
    };
    assert!(
        std::env::var_os("CLUSTERD_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
        "{missing} and CLUSTERD_REQUIRE_TOOLS=1 (run .ci/run)"
    );
    eprintln!("SKIP acme: {missing}");
    None
}

/// What `openssl s_client` sees for SNI `localhost`, verifying the chain against
/// pebble's `root` and the name `localhost`: (issuer line, leaf PEM). Fails unless the
/// verification passed.
fn served(port: u16, root: &Path) -> (String, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-verify_hostname", "localhost"])
        .arg("-CAfile")
        .arg(root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "the served chain does not verify against pebble's root for localhost:\n{text}"
    );
    let issuer = text
        .lines()
        .find(|l| l.trim_start().starts_with("i:"))
        .unwrap_or_default()
        .to_string();
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
    let end = text
        .find("-----END CERTIFICATE-----")
        .map_or(0, |e| e + "-----END CERTIFICATE-----".len());
    (issuer, text[start..end.max(start)].to_string())
}

/// A keep-alive HTTPS connection held by `openssl s_client`: requests are written to
/// its stdin, its output lines arrive on a channel.
struct KeepAlive {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl KeepAlive {
    fn open(port: u16) -> KeepAlive {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-alpn", "http/1.1", "-ign_eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        KeepAlive { child, lines }
    }

    /// One request on the open connection; the status line of its answer.
    fn get(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        stdin.flush().unwrap();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("an answer on the keep-alive connection");
            if line.starts_with("HTTP/1.1 ") {
                return line;
            }
            assert!(
                !line.contains("closed"),
                "the keep-alive connection was closed: {line}"
            );
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_event(d: &Daemon, app: &str, kind: &str, n: usize) -> Vec<serde_json::Value> {
    eventually(Duration::from_secs(30), kind, || {
        let evs = d.events(app);
        if let Some(f) = evs
            .iter()
            .find(|e| e["kind"] == "certificate-failed" && kind != "certificate-failed")
        {
            panic!("{f}\n{}", d.log());
        }
        let got: Vec<_> = evs.into_iter().filter(|e| e["kind"] == kind).collect();
        (got.len() >= n).then_some(got)
    })
}

#[test]
fn acme_obtains_reuses_and_renews_a_certificate_from_pebble() {
    let Some(bin) = find_pebble() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(tmp.path(), &bin, port);

    let mut d = Daemon::start();
    let manifest = demo_http_manifest(
        "web",
        port,
        2,
        "",
        "  shutdown: {signal: SIGTERM, timeout: 5s}\n",
    )
    .replace(
        "      mode: http\n",
        &format!(
            "      mode: http\n      tls:\n        acme:\n          domains: [localhost]\n          email: ops@example.com\n          directory: {}\n          caBundle: {}\n",
            pebble.directory,
            pebble.ca.display()
        ),
    );
    d.write_manifest("web.yaml", &manifest);
    d.wait_phase("web", "Available", Duration::from_secs(30));

    // Obtained: served for `localhost`, issued by pebble's intermediate, stored.
    let obtained = wait_event(&d, "web", "certificate-obtained", 1);
    assert!(
        obtained[0]["message"]
            .as_str()
            .unwrap()
            .contains("localhost"),
        "{obtained:?}"
    );
    let root = tmp.path().join("pebble-root.pem");
    pebble.write_root(&root);
    let (issuer, first) = served(port, &root);
    assert!(issuer.contains("Pebble Intermediate CA"), "{issuer}");
    let (code, body) = https_get(port, &root);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("pid"), "{body}");
    let files = d
        .state_dir
        .join("acme/web")
        .join(format!("127.0.0.1-{port}"));
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(files.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("key.pem"), 0o600);
    assert_eq!(mode("account.json"), 0o600);
    assert_eq!(pebble.issued(), 1);
    let expires = d.app("web").unwrap()["listen"][0]["certificate_expires"].clone();
    assert!(
        expires.as_str().is_some_and(|t| t.ends_with('Z')),
        "{expires}"
    );

    // A restart reuses the stored certificate; with the test knob it is renewed a
    // few seconds later, while a keep-alive connection stays open.
    d.stop();
    d.set_env("CLUSTERD_ACME_RENEW_AFTER", "4s");
    d.spawn();
    d.wait_phase("web", "Available", Duration::from_secs(30));
    let mut conn = KeepAlive::open(port);
    assert!(conn.get().starts_with("HTTP/1.1 200"));
    // The knob renews every 4 s: wait for one that comes after the connection opened.
    let before = d.event_kinds("web");
    let before = before
        .iter()
        .filter(|k| *k == "certificate-renewed")
        .count();
    let renewed = wait_event(&d, "web", "certificate-renewed", before + 1);
    let kinds = d.event_kinds("web");
    assert!(
        !kinds.iter().any(|k| k == "certificate-obtained"),
        "the restarted daemon ordered anew instead of reusing the stored certificate: {kinds:?}"
    );
    assert!(
        pebble.issued() >= before + 2 && pebble.issued() <= before + 3,
        "one order by the first daemon, then renewals only: {} issued, {renewed:?}",
        pebble.issued()
    );
    let (issuer, second) = served(port, &root);
    assert!(issuer.contains("Pebble Intermediate CA"), "{issuer}");
    assert_ne!(first, second, "the renewed certificate is served");
    assert!(
        conn.get().starts_with("HTTP/1.1 200"),
        "the keep-alive connection still works"
    );
    drop(conn);

    // A failed order is an event with pebble's reason: this listener's port is not the
    // one pebble validates on, so the challenge is answered by `web` (wrongly).
    let other = free_port();
    d.write_manifest(
        "other.yaml",
        &manifest
            .replace("name: web", "name: other")
            .replace(&format!("port: {port}"), &format!("port: {other}")),
    );
    let failed = wait_event(&d, "other", "certificate-failed", 1);
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.contains("localhost") && message.contains("next attempt in"),
        "{message}"
    );
    d.stop();
}

/// A request over TLS with curl, trusting pebble's `root` only; returns (status, body).
fn https_get(port: u16, root: &Path) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

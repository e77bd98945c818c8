//! http mode as the front door, through the real daemon (issue 14): TLS terminated by
//! clusterd in front of an unmodified Node app, HTTP/2 and HTTP/1.1 by ALPN (curl),
//! SNI (openssl s_client), a renewed certificate served without a reload, a broken one
//! refused, and sticky sessions from several source addresses.

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
}

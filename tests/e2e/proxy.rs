//! http and tcp listener modes through the real daemon (issue 4's proof): unmodified
//! apps that only read `PORT` (python3's http.server, a bare Node server) reloaded under
//! load without a lost request, WebSocket tunnels that outlive their worker's drain,
//! bodies streamed without buffering, tcp mode with half-close, in-flight numbers in
//! status, and bad input answered without disturbing anyone else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// A bare Node server: no drain handler, dies at once on SIGINT (the default signal).
const NODE_OK: &str = "require('http').createServer((q,s)=>s.end('ok')).listen(process.env.PORT)";

fn reload_ok(d: &Daemon, app: &str) {
    let out = d.cli(&["reload", app]);
    assert!(
        out.status.success(),
        "reload failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `loads` through three reloads and asserts nothing was lost.
fn three_reloads_lose_nothing(d: &Daemon, app: &str, loads: Vec<(&str, Load)>) {
    let before = d.ready_pids(app);
    for (_, l) in &loads {
        l.wait_for(30);
    }
    for _ in 0..3 {
        reload_ok(d, app);
        for (_, l) in &loads {
            l.wait_for(30);
        }
    }
    for (what, l) in loads {
        let stats = l.stop();
        eprintln!("{app} {what}: {stats:?}");
        assert!(stats.ok > 0);
        assert_eq!(
            (stats.failed, stats.non2xx),
            (0, 0),
            "{app} {what} load lost requests across 3 reloads: {:?}",
            stats.errors
        );
    }
    let after = d.ready_pids(app);
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} {after:?}"
    );
}

#[test]
fn python_http_server_reloads_three_times_without_a_failed_request() {
    let d = Daemon::start();
    let site = d.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello from python\n").unwrap();
    let port = free_port();
    d.write_manifest(
        "py.yaml",
        &proxied_manifest(
            "py",
            port,
            "http",
            2,
            "python3 -m http.server --bind 127.0.0.1 $(PORT)",
            &format!("  workingDir: {}\n", site.display()),
        ),
    );
    d.wait_phase("py", "Available", Duration::from_secs(20));
    let (status, body) = http_get(local(port), "/hello.txt").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from python\n"));
    three_reloads_lose_nothing(
        &d,
        "py",
        vec![
            (
                "keep-alive",
                Load::start(local(port), "/hello.txt", 3, true),
            ),
            (
                "new-connection",
                Load::start(local(port), "/hello.txt", 2, false),
            ),
        ],
    );
}

#[test]
fn node_server_that_dies_on_sigint_reloads_three_times_without_a_failed_request() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest(
        "node.yaml",
        &proxied_manifest(
            "node",
            port,
            "http",
            2,
            &format!("[\"node\", \"-e\", \"{NODE_OK}\"]"),
            "",
        ),
    );
    let app = d.wait_phase("node", "Available", Duration::from_secs(20));
    assert_eq!(app["listen"][0]["mode"], "http");
    assert_eq!(http_get(local(port), "/").unwrap(), (200, "ok".to_string()));
    three_reloads_lose_nothing(
        &d,
        "node",
        vec![
            ("keep-alive", Load::start(local(port), "/", 3, true)),
            ("new-connection", Load::start(local(port), "/", 2, false)),
        ],
    );
}

/// A WebSocket echo server (text/binary frames up to 125 bytes) that names its pid in
/// the handshake; plain requests get the pid as the body.
const WS_ECHO: &str = r"
const http = require('http'), crypto = require('crypto');
const s = http.createServer((q, r) => r.end(String(process.pid)));
s.on('upgrade', (req, sock) => {
  const accept = crypto.createHash('sha1')
    .update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
    .digest('base64');
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    'Sec-WebSocket-Accept: ' + accept + '\r\nX-Pid: ' + process.pid + '\r\n\r\n');
  let buf = Buffer.alloc(0);
  sock.on('data', d => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 2) {
      const len = buf[1] & 127, masked = buf[1] & 128, head = 2 + (masked ? 4 : 0);
      if (len > 125) { sock.destroy(); return; }
      if (buf.length < head + len) break;
      const p = Buffer.from(buf.subarray(head, head + len));
      if (masked) for (let i = 0; i < len; i++) p[i] ^= buf[2 + (i % 4)];
      const op = buf[0] & 15;
      buf = buf.subarray(head + len);
      if (op === 8) { sock.end(Buffer.from([0x88, 0])); return; }
      sock.write(Buffer.concat([Buffer.from([0x80 | op, len]), p]));
    }
  });
});
s.listen(process.env.PORT);
";

fn ws_send(s: &mut TcpStream, opcode: u8, payload: &[u8]) {
    assert!(payload.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
}

fn ws_recv(s: &mut BufReader<TcpStream>) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    s.read_exact(&mut head)
        .expect("a frame header from the tunnel");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let mut payload = vec![0; usize::from(head[1] & 127)];
    s.read_exact(&mut payload).unwrap();
    (head[0] & 15, payload)
}

fn ws_echo(w: &mut TcpStream, r: &mut BufReader<TcpStream>, text: &str) {
    ws_send(w, 1, text.as_bytes());
    assert_eq!(ws_recv(r), (1, text.as_bytes().to_vec()), "echo of {text}");
}

#[test]
fn websocket_tunnel_keeps_echoing_while_its_worker_drains_through_a_reload() {
    let d = Daemon::start();
    let ws = script(d.dir.path(), "ws.js", WS_ECHO);
    let port = free_port();
    d.write_manifest(
        "ws.yaml",
        &proxied_manifest(
            "ws",
            port,
            "http",
            2,
            &format!("[\"node\", \"{}\"]", ws.display()),
            "  shutdown: {timeout: 25s}\n",
        ),
    );
    d.wait_phase("ws", "Available", Duration::from_secs(20));
    let old = d.ready_pids("ws");

    let mut w = TcpStream::connect(local(port)).unwrap();
    w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        w,
        "GET /chat HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        local(port)
    )
    .unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept key passed through: {head}"
    );
    let tunnel_pid: i32 = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("x-pid: ")
                .or_else(|| l.strip_prefix("X-Pid: "))
        })
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no X-Pid in {head}"));
    assert!(old.contains(&tunnel_pid));
    ws_echo(&mut w, &mut r, "before the reload");

    let out = d.cli(&["reload", "ws", "--no-wait"]);
    assert!(out.status.success());
    let mut echoes = 0;
    let new = eventually(Duration::from_secs(20), "two new ready workers", || {
        ws_echo(&mut w, &mut r, &format!("during the reload {echoes}"));
        echoes += 1;
        let now = d.ready_pids("ws");
        (now.len() == 2 && now.iter().all(|p| !old.contains(p))).then_some(now)
    });
    // The tunnel's worker drains but is not signalled while the tunnel is open; the
    // other old worker had nothing in flight and is gone.
    let other_old = *old.iter().find(|p| **p != tunnel_pid).unwrap();
    eventually(Duration::from_secs(10), "idle old worker gone", || {
        (!alive(other_old)).then_some(())
    });
    assert!(
        alive(tunnel_pid),
        "the tunnel's worker was stopped under it"
    );
    let draining = d
        .instances("ws")
        .into_iter()
        .find(|i| i["pid"].as_i64() == Some(i64::from(tunnel_pid)))
        .expect("tunnel worker still listed");
    assert_eq!(draining["state"], "Draining", "{draining}");
    assert_eq!(draining["inflight"], 1, "{draining}");
    for _ in 0..6 {
        let (status, body) = http_get(local(port), "/").unwrap();
        assert_eq!(status, 200);
        let pid: i32 = body.trim().parse().unwrap();
        assert!(
            new.contains(&pid),
            "request went to {pid}, not a new worker {new:?}"
        );
    }
    ws_echo(&mut w, &mut r, "after the reload");
    eprintln!("tunnel echoed {echoes} times during the reload");

    // Closing the tunnel ends the drain: the worker is signalled well before its
    // 25 s shutdown timeout.
    ws_send(&mut w, 8, &[]);
    assert_eq!(ws_recv(&mut r).0, 8);
    drop((w, r));
    eventually(
        Duration::from_secs(10),
        "tunnel worker stopped after close",
        || (!alive(tunnel_pid)).then_some(()),
    );
    d.wait_phase("ws", "Available", Duration::from_secs(10));
}

/// Streams 100 MiB in (counted) and out (generated), with backpressure.
const BULK: &str = r"
require('http').createServer((q, s) => {
  if (q.url === '/up') { let n = 0; q.on('data', d => n += d.length); q.on('end', () => s.end(String(n))); return; }
  if (q.url === '/down') {
    const total = 100 * 1024 * 1024, chunk = Buffer.alloc(64 * 1024, 97); let sent = 0;
    s.writeHead(200, {'content-length': total});
    const pump = () => { while (sent < total) { sent += chunk.length; if (!s.write(chunk)) { s.once('drain', pump); return; } } s.end(); };
    pump(); return;
  }
  s.end('ok');
}).listen(process.env.PORT);
";

const MIB: usize = 1024 * 1024;

#[test]
fn hundred_mib_upload_and_download_stream_without_daemon_memory_growth() {
    let d = Daemon::start();
    let bulk = script(d.dir.path(), "bulk.js", BULK);
    let port = free_port();
    d.write_manifest(
        "bulk.yaml",
        &proxied_manifest(
            "bulk",
            port,
            "http",
            2,
            &format!("[\"node\", \"{}\"]", bulk.display()),
            "",
        ),
    );
    d.wait_phase("bulk", "Available", Duration::from_secs(20));
    for _ in 0..4 {
        assert_eq!(http_get(local(port), "/").unwrap().0, 200);
    }
    let daemon = d.pid();
    let baseline = rss_kib(daemon);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(daemon), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let started = Instant::now();
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        100 * MIB
    )
    .unwrap();
    let chunk = vec![b'u'; 64 * 1024];
    for _ in 0..(100 * MIB / chunk.len()) {
        s.write_all(&chunk).unwrap();
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(&(100 * MIB).to_string()), "{resp}");
    let up = started.elapsed();

    let started = Instant::now();
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut total = 0usize;
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == b'a'));
        total += n;
    }
    assert_eq!(total, 100 * MIB);
    let down = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let growth_kib = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "daemon VmRSS baseline {baseline} KiB, peak growth {growth_kib} KiB; upload {up:?}, download {down:?}"
    );
    assert!(
        growth_kib < 24 * 1024,
        "the daemon's RSS grew by {growth_kib} KiB while streaming 2 x 100 MiB"
    );
}

/// A line echo server; after the client's EOF (half-close) it says bye and closes.
const LINE_ECHO: &str = r#"
import os, socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
            self.wfile.flush()
        self.wfile.write(b"bye %d\n" % os.getpid())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(os.environ["PORT"])), Echo).serve_forever()
"#;

fn echo_line(r: &mut BufReader<TcpStream>, w: &mut TcpStream, text: &str) {
    writeln!(w, "{text}").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{text}\n"));
}

fn echo_conn(port: u16) -> (BufReader<TcpStream>, TcpStream) {
    let w = TcpStream::connect(local(port)).unwrap();
    w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (BufReader::new(w.try_clone().unwrap()), w)
}

/// Half-closes, then reads the server's last words; returns the server's pid.
fn say_bye(mut r: BufReader<TcpStream>, w: TcpStream) -> i32 {
    w.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    rest.trim()
        .strip_prefix("bye ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("after half-close expected `bye PID`, got {rest:?}"))
}

#[test]
fn tcp_mode_line_echo_handles_half_close_and_keeps_open_connections_through_a_reload() {
    let d = Daemon::start();
    let echo = script(d.dir.path(), "echo.py", LINE_ECHO);
    let port = free_port();
    d.write_manifest(
        "echo.yaml",
        &proxied_manifest(
            "echo",
            port,
            "tcp",
            2,
            &format!("[\"python3\", \"{}\"]", echo.display()),
            "  shutdown: {timeout: 25s}\n",
        ),
    );
    let app = d.wait_phase("echo", "Available", Duration::from_secs(20));
    assert_eq!(app["listen"][0]["mode"], "tcp");
    let old = d.ready_pids("echo");
    // Both workers get connections (least connections).
    let mut conns: Vec<_> = (0..2).map(|_| echo_conn(port)).collect();
    for (i, (r, w)) in conns.iter_mut().enumerate() {
        echo_line(r, w, &format!("hello {i}"));
    }
    let (r, w) = conns.pop().unwrap();
    let a = say_bye(r, w);
    let (mut r, mut w) = conns.pop().unwrap();

    let out = d.cli(&["reload", "echo", "--no-wait"]);
    assert!(out.status.success());
    let new = eventually(Duration::from_secs(20), "two new ready workers", || {
        let now = d.ready_pids("echo");
        (now.len() == 2 && now.iter().all(|p| !old.contains(p))).then_some(now)
    });
    // The open connection's worker drains but keeps its connection.
    echo_line(&mut r, &mut w, "still here after the reload");
    let b = say_bye(r, w);
    assert!(
        old.contains(&a) && old.contains(&b) && a != b,
        "{a} {b} {old:?}"
    );
    let (r, mut w) = echo_conn(port);
    let mut r = r;
    echo_line(&mut r, &mut w, "a new connection");
    let c = say_bye(r, w);
    assert!(new.contains(&c), "new connection went to {c}, not {new:?}");
    eventually(Duration::from_secs(10), "old workers stopped", || {
        (!alive(a) && !alive(b)).then_some(())
    });
}

#[test]
fn status_shows_requests_in_flight_per_worker() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_http_manifest("web", port, 2, "", ""));
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let slow = std::thread::spawn(move || http_get(local(port), "/slow?ms=4000"));
    let busy = eventually(Duration::from_secs(10), "one request in flight", || {
        let inst = d.instances("web");
        let total: u64 = inst.iter().filter_map(|i| i["inflight"].as_u64()).sum();
        let busy = inst.iter().find(|i| i["inflight"] == 1)?;
        (total == 1).then(|| busy["pid"].as_i64().unwrap())
    });
    let out = d.cli(&["status", "web"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.contains("INFLIGHT"), "{table}");
    eprintln!("{table}");
    // Columns are aligned: the INFLIGHT cell starts where its header does.
    let header = table.lines().find(|l| l.contains("INFLIGHT")).unwrap();
    let col = header.find("INFLIGHT").unwrap();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(busy.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for {busy}: {table}"));
    let cell = row.get(col..).and_then(|c| c.split_whitespace().next());
    assert_eq!(cell, Some("1"), "{row}");
    assert_eq!(slow.join().unwrap().unwrap().0, 200);
    eventually(Duration::from_secs(5), "nothing in flight", || {
        d.instances("web")
            .iter()
            .all(|i| i["inflight"] == 0)
            .then_some(())
    });
}

/// Sends raw bytes on a fresh connection and returns whatever comes back until close.
fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The proxy may answer and close before it has read everything (an oversized
    // head): a failed write is part of the answer, not a test error.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn bad_input_gets_4xx_or_a_closed_connection_while_others_are_served() {
    let d = Daemon::start_env(&[("CLUSTERD_PROXY_HEADER_TIMEOUT_MS", "1500")]);
    let port = free_port();
    d.write_manifest("web.yaml", &demo_http_manifest("web", port, 2, "", ""));
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let load = Load::start(local(port), "/", 2, true);
    load.wait_for(20);

    let resp = raw_exchange(port, b"THIS IS NOT HTTP\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "malformed: {resp:?}");
    let resp = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "bad length: {resp:?}");
    let mut huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let resp = raw_exchange(port, &huge);
    assert!(
        resp.starts_with("HTTP/1.1 431") || resp.is_empty(),
        "oversized head: {resp:?}"
    );

    // Slowloris: a header line every 100 ms never completes the head; the proxy closes
    // the connection at its header timeout while other requests keep being served.
    let mut slow = TcpStream::connect(local(port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut served_meanwhile = 0;
    let mut n = 0;
    eventually(
        Duration::from_secs(15),
        "slowloris connection closed",
        || {
            n += 1;
            if slow
                .write_all(format!("X-Drip-{n}: x\r\n").as_bytes())
                .is_err()
            {
                return Some(());
            }
            let mut buf = [0u8; 512];
            let closed = match slow.read(&mut buf) {
                Ok(0) => true,
                Ok(k) => {
                    let text = String::from_utf8_lossy(&buf[..k]).to_string();
                    assert!(!text.starts_with("HTTP/1.1 2"), "slowloris served: {text}");
                    true
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    false
                }
                Err(_) => true,
            };
            if let Ok((200, _)) = http_get(local(port), "/") {
                served_meanwhile += 1;
            }
            closed.then_some(())
        },
    );
    assert!(served_meanwhile > 0);
    load.wait_for(20);
    let stats = load.stop();
    assert_eq!(
        (stats.failed, stats.non2xx),
        (0, 0),
        "bad input disturbed other clients: {:?}",
        stats.errors
    );
}

#[test]
fn no_ready_worker_waits_then_answers_503() {
    let d = Daemon::start_env(&[("CLUSTERD_PROXY_NO_BACKEND_WAIT_MS", "1500")]);
    let port = free_port();
    d.write_manifest(
        "never.yaml",
        &demo_http_manifest("never", port, 2, "    DEMO_NEVER_READY: \"1\"\n", ""),
    );
    eventually(Duration::from_secs(20), "workers started", || {
        (d.instances("never").len() == 2).then_some(())
    });
    assert!(d.ready_pids("never").is_empty());
    let started = Instant::now();
    let (status, body) = http_get(local(port), "/").unwrap();
    let waited = started.elapsed();
    eprintln!("503 after {waited:?}: {body}");
    assert_eq!(status, 503, "after {waited:?}: {body}");
    assert!(
        waited >= Duration::from_millis(1000),
        "answered after {waited:?}, without waiting for a worker"
    );
}

/// Headers as a python worker received them, one `name: value` line each.
const HEADER_ECHO: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = "".join("%s: %s\n" % (k.lower(), v) for k, v in self.headers.items()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

fn spoofed_get(port: u16) -> String {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: evil.example\r\nX-Real-IP: 10.6.6.6\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Issue 16, item 6, through the daemon: `listen[].trustedProxies` decides whether a
/// peer's forwarding headers reach the worker, and a change applies without a restart.
#[test]
fn trusted_proxies_from_the_manifest_apply_live() {
    let d = Daemon::start();
    let echo = script(d.dir.path(), "headers.py", HEADER_ECHO);
    let port = free_port();
    let manifest = |trusted: &str| {
        format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: hdr\nspec:\n  command: [\"python3\", \"{}\"]\n  listen:\n    - port: {port}\n      address: 127.0.0.1\n{trusted}  readiness: {{type: tcp, period: 50ms, timeout: 10s}}\n",
            echo.display()
        )
    };
    d.write_manifest(
        "hdr.yaml",
        &manifest("      trustedProxies: [127.0.0.0/8]\n"),
    );
    d.wait_phase("hdr", "Available", Duration::from_secs(20));
    let pids = d.ready_pids("hdr");
    let seen = spoofed_get(port);
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    assert!(seen.contains("x-real-ip: 10.6.6.6\n"), "{seen}");

    d.write_manifest("hdr.yaml", &manifest(""));
    let seen = eventually(Duration::from_secs(10), "untrusted now", || {
        let seen = spoofed_get(port);
        seen.contains("x-forwarded-proto: http\n").then_some(seen)
    });
    assert!(seen.contains("x-forwarded-host: app.example\n"), "{seen}");
    assert!(
        !seen.contains("10.6.6.6") && !seen.contains("evil"),
        "{seen}"
    );
    assert_eq!(d.ready_pids("hdr"), pids, "no worker was restarted");
}

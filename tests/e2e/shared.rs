//! `mode: shared` with the real binary: unmodified servers that bind `$PORT` share the
//! daemon's socket (seccomp user notification), readiness `bind`, status and events
//! naming the pid that bound, a stray bind reported, UDP, and a reload under
//! new-connection load that loses nothing.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

/// A shared-mode manifest for any command (argv as YAML flow list items); `listen` lines
/// (indented 4) replace the default TCP listener when given.
fn shared_manifest(name: &str, port: u16, instances: u32, argv: &[&str], extra: &str) -> String {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [{}]\n  instances: {instances}\n  listen:\n    - {{name: web, port: {port}, address: 127.0.0.1, mode: shared}}\n  shutdown: {{signal: SIGTERM, timeout: 10s}}\n  restart: {{backoff: {{initial: 100ms, max: 2s}}}}\n{extra}",
        argv.join(", ")
    )
}

fn node() -> Option<PathBuf> {
    ["/usr/bin/node", "/usr/local/bin/node"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .map(std::path::Path::to_path_buf)
        .or_else(|| require_tool(std::path::Path::new("/usr/bin/node"), "node shared mode"))
}

/// New connections until every pid in `want` answered (at most 1000, in rounds of 200).
fn distinct_pids(port: u16, want: &BTreeSet<String>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        for _ in 0..200 {
            let (status, body) = http_get(local(port), "/").unwrap();
            assert_eq!(status, 200, "{body}");
            seen.insert(body.trim().to_string());
        }
        if seen.is_superset(want) {
            break;
        }
    }
    seen
}

fn pids_of(app: &Value) -> BTreeSet<String> {
    instance_pids(app)
        .into_iter()
        .map(|(_, p)| p.to_string())
        .collect()
}

const NODE_APP: &str = r#"// Unmodified: listen on PORT (Node binds :: dual-stack), drain on SIGTERM.
const server = require('http').createServer((req, res) => {
  res.end(String(process.pid));
}).listen(process.env.PORT);
process.on('SIGTERM', () => { server.close(() => process.exit(0)); server.closeIdleConnections(); });
"#;

/// Node workers that call `listen(process.env.PORT)` share the socket: Available through
/// readiness `bind` (the default), every worker answers, status and events say which pid
/// bound the listener, and a reload under new-connection load loses nothing.
#[test]
fn node_listen_port_workers_share_the_socket_and_reload_without_loss() {
    let Some(node) = node() else { return };
    let d = Daemon::start();
    let script = d.dir.path().join("server.js");
    std::fs::write(&script, NODE_APP).unwrap();
    let port = free_port();
    d.write_manifest(
        "web.yaml",
        &shared_manifest(
            "web",
            port,
            3,
            &[node.to_str().unwrap(), script.to_str().unwrap()],
            "",
        ),
    );
    let app = d.wait_phase("web", "Available", T);
    assert_eq!(app["ready"], 3);
    assert_eq!(app["listen"][0]["mode"], "shared");
    let want = pids_of(&app);
    for i in app["instances"].as_array().unwrap() {
        let pid = i["pid"].as_i64().unwrap();
        assert_eq!(
            i["bound"],
            serde_json::json!([format!("127.0.0.1:{port}/tcp by pid {pid}")]),
            "{i}"
        );
        assert_eq!(
            proc_env(pid as i32, "PORT"),
            Some(port.to_string()),
            "PORT is the public port"
        );
    }
    assert_eq!(
        distinct_pids(port, &want),
        want,
        "every worker took connections"
    );
    let events = d.events("web");
    let bound: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "bound")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(bound.len(), 3, "{events:?}");
    assert!(
        bound
            .iter()
            .all(|m| m.ends_with(&format!("bound the shared listener 127.0.0.1:{port}/tcp"))),
        "{bound:?}"
    );
    let table = d.cli(&["status", "web"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("BOUND"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}/tcp by pid")),
        "{text}"
    );

    let stats = reload_replaces_every_worker(&d, "web", port, &want, "Node");
    assert!(stats.ok > 0);
}

/// Reloads `app` under new-connection load on `port` (no request may fail), then checks
/// that every worker in `old` was replaced and that each new one takes connections.
fn reload_replaces_every_worker(
    d: &Daemon,
    app: &str,
    port: u16,
    old: &BTreeSet<String>,
    what: &str,
) -> LoadStats {
    let stats = d.reload_under(app, Load::start(local(port), "/", 4, false));
    eprintln!(
        "{what} shared-mode reload under new-connection load: {} ok, {} failed",
        stats.ok, stats.failed
    );
    let new = pids_of(&d.wait_phase(app, "Available", T));
    assert!(
        new.is_disjoint(old),
        "every worker was replaced: {old:?} -> {new:?}"
    );
    assert_eq!(distinct_pids(port, &new), new);
    stats
}

/// `python3 -m http.server $(PORT)` unmodified, and a UDP server binding `PORT_DNS`: both
/// as 2 workers on shared sockets, all of them answering.
#[test]
fn python_http_server_and_udp_workers_share_their_sockets() {
    let d = Daemon::start();
    let port = free_port();
    let www = d.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from http.server").unwrap();
    let yaml = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: py\nspec:\n  command: [python3, -m, http.server, \"$(PORT)\"]\n  workingDir: {}\n  instances: 2\n  listen:\n    - {{port: {port}, address: 127.0.0.1, mode: shared}}\n",
        www.display()
    );
    d.write_manifest("py.yaml", &yaml);
    let udp_port = free_port();
    let script = d.dir.path().join("udp.py");
    std::fs::write(
        &script,
        "import os, socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', int(os.environ['PORT_DNS'])))\nwhile True:\n    _, peer = s.recvfrom(100)\n    time.sleep(0.005)\n    s.sendto(str(os.getpid()).encode(), peer)\n",
    )
    .unwrap();
    let udp = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: dns\nspec:\n  command: [python3, \"{}\"]\n  instances: 2\n  listen:\n    - {{name: dns, port: {udp_port}, address: 127.0.0.1, mode: shared, protocol: udp}}\n",
        script.display()
    );
    d.write_manifest("dns.yaml", &udp);

    let app = d.wait_phase("py", "Available", T);
    // http.server names no pid, but logs every request to its instance's log.
    let mut served = BTreeSet::new();
    for _ in 0..5 {
        for _ in 0..200 {
            let (status, body) = http_get(local(port), "/").unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("hello from http.server"), "{body}");
        }
        for index in ["0", "1"] {
            let out = d.cli(&["logs", "py", "--instance", index, "--tail", "5"]);
            if String::from_utf8_lossy(&out.stdout).contains("\"GET / HTTP/1.1\" 200") {
                served.insert(index);
            }
        }
        if served.len() == 2 {
            break;
        }
    }
    assert_eq!(served.len(), 2, "both http.server workers took connections");
    for i in app["instances"].as_array().unwrap() {
        assert_eq!(i["bound"].as_array().map(Vec::len), Some(1), "{i}");
    }

    let dns = d.wait_phase("dns", "Available", T);
    let want = pids_of(&dns);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    let mut answered = BTreeSet::new();
    for _ in 0..1000 {
        client.send_to(b"who", ("127.0.0.1", udp_port)).unwrap();
        let mut buf = [0u8; 32];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        answered.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
        if answered.len() == want.len() {
            break;
        }
    }
    assert_eq!(answered, want, "every UDP worker received datagrams");
    for i in dns["instances"].as_array().unwrap() {
        let pid = i["pid"].as_i64().unwrap();
        assert_eq!(
            i["bound"],
            serde_json::json!([format!("127.0.0.1:{udp_port}/udp by pid {pid}")])
        );
    }
}

/// An app that binds another port than `PORT` runs but is reported, never becomes ready
/// through `bind`, and the status marks it as not bound.
#[test]
fn a_worker_binding_another_port_is_reported_and_never_ready() {
    let d = Daemon::start();
    let port = free_port();
    let other = free_port();
    let script = d.dir.path().join("stray.py");
    std::fs::write(
        &script,
        format!("import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', {other}))\ns.listen()\ntime.sleep(600)\n"),
    )
    .unwrap();
    d.write_manifest(
        "stray.yaml",
        &shared_manifest(
            "stray",
            port,
            1,
            &["python3", script.to_str().unwrap()],
            "  readiness: {timeout: 2s}\n",
        ),
    );
    let message = eventually(T, "a stray-bind event", || {
        d.events("stray")
            .iter()
            .find(|e| e["kind"] == "stray-bind")
            .and_then(|e| e["message"].as_str().map(String::from))
    });
    let pid = eventually(T, "the worker's pid", || {
        d.instances("stray").first()?["pid"].as_i64()
    });
    assert_eq!(
        message,
        format!("worker bound 127.0.0.1:{other}/tcp (pid {pid}), not the shared listener")
    );
    let instance = &d.instances("stray")[0];
    assert_eq!(instance["state"], "Starting", "{instance}");
    assert_eq!(instance["bound"], serde_json::json!([]), "{instance}");
    let table = d.cli(&["status", "stray"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("not bound"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    // Its readiness times out like any other worker's that never gets ready.
    eventually(T, "the readiness timeout to act", || {
        d.events("stray")
            .iter()
            .any(|e| e["kind"] == "rollout-failed" || e["kind"] == "drain")
            .then_some(())
    });
}

/// A daemon SIGKILLed and restarted adopts shared-mode workers: they keep serving the
/// shared socket meanwhile (no request lost), the new daemon recovers that socket from
/// them and its status still says which pid bound it; a reload then replaces them
/// through fresh bind answers.
#[test]
fn shared_workers_survive_a_daemon_restart_and_are_adopted() {
    let Some(node) = node() else { return };
    let mut d = Daemon::start();
    let script = d.dir.path().join("server.js");
    std::fs::write(&script, NODE_APP).unwrap();
    let port = free_port();
    d.write_manifest(
        "web.yaml",
        &shared_manifest(
            "web",
            port,
            2,
            &[node.to_str().unwrap(), script.to_str().unwrap()],
            "",
        ),
    );
    d.wait_phase("web", "Available", T);
    let before = d.ready_pids("web");
    let load = Load::start(local(port), "/", 4, false);
    load.wait_for(50);
    d.kill_daemon();
    load.wait_for(200); // served with no daemon at all
    d.spawn();
    let app = d.wait_phase("web", "Available", T);
    load.wait_for(50);
    let stats = load.stop();
    assert_eq!(
        (stats.failed, stats.non2xx),
        (0, 0),
        "requests lost across the daemon restart: {:?}",
        stats.errors
    );
    assert_eq!(d.ready_pids("web"), before, "adopted, not replaced: {app}");
    eventually(T, "adopted workers' binds in status", || {
        let instances = d.instances("web");
        instances
            .iter()
            .all(|i| {
                let pid = i["pid"].as_i64().unwrap_or(0);
                i["bound"] == serde_json::json!([format!("127.0.0.1:{port}/tcp by pid {pid}")])
            })
            .then_some(())
    });
    let stats = d.reload_under("web", Load::start(local(port), "/", 4, false));
    assert!(stats.ok > 0);
    let after = d.ready_pids("web");
    assert!(before.iter().all(|p| !after.contains(p)));
}

/// `uvicorn app:app --port $(PORT)` unmodified (asyncio, non-blocking socket) as 2 shared
/// workers: both answer.
#[test]
fn uvicorn_port_workers_share_the_socket() {
    let Some(uvicorn) = require_tool(&repo_root().join(".venv/bin/uvicorn"), "uvicorn") else {
        return;
    };
    let d = Daemon::start();
    std::fs::write(
        d.dir.path().join("asgi.py"),
        r#"import os

async def app(scope, receive, send):
    assert scope["type"] == "http"
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"#,
    )
    .unwrap();
    let port = free_port();
    let yaml = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: asgi\nspec:\n  command: [\"{}\", asgi:app, --host, 127.0.0.1, --port, \"$(PORT)\", --no-access-log]\n  workingDir: {}\n  instances: 2\n  listen:\n    - {{port: {port}, address: 127.0.0.1, mode: shared}}\n  shutdown: {{signal: SIGTERM, timeout: 10s}}\n",
        uvicorn.display(),
        d.dir.path().display()
    );
    d.write_manifest("asgi.yaml", &yaml);
    let app = d.wait_phase("asgi", "Available", T);
    let want = pids_of(&app);
    assert_eq!(want.len(), 2);
    assert_eq!(
        distinct_pids(port, &want),
        want,
        "every uvicorn worker took connections"
    );
}

/// A worker that binds `PORT` again later: it serves from a forked child that binds on
/// SIGUSR1 (the parent closes its own copy first, so only the child's bind can serve).
/// Python, blocking sockets, one connection at a time: just enough HTTP for `http_get`.
const REBIND_APP: &str = r#"import os, signal, socket
port = int(os.environ['PORT'])
def bind():
    s = socket.socket()
    s.bind(('127.0.0.1', port))
    s.listen(16)
    return s
def serve(s):
    while True:
        c, _ = s.accept()
        data = b''
        while b'\r\n\r\n' not in data:
            data += c.recv(65536)
        body = str(os.getpid()).encode()
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n' % len(body) + body)
        c.close()
class Fork(Exception):
    pass
def on_usr1(*_):
    raise Fork()
signal.signal(signal.SIGUSR1, on_usr1)
s = bind()
try:
    serve(s)
except Fork:
    pass
s.close()
if os.fork() == 0:
    serve(bind())
os.wait()
"#;

/// How the daemon is replaced in [`a_worker_binding_after_the_daemon_changed`].
enum Handover {
    /// `clusterd upgrade`.
    Upgrade,
    /// SIGKILL, restarted with the sockets of systemd's fd store (`FdStoreHost`).
    CrashWithFdStore,
    /// `clusterd upgrade` to a binary that fails: the old daemon, which paused its
    /// supervisors for the handover, answers again.
    FailedUpgrade,
}

/// After the daemon changed (or an upgrade failed), an adopted worker's new bind (a child it forks, which
/// inherits the seccomp filter) is answered by the new daemon with the shared socket,
/// because the worker's notification fd was handed over (upgrade) or kept in systemd's fd
/// store (crash). Without that the child's bind fails with ENOSYS.
fn a_worker_binding_after_the_daemon_changed(how: Handover) {
    let mut d = Daemon::start();
    let host = match how {
        Handover::Upgrade => None,
        Handover::FailedUpgrade => {
            d.stop();
            d.set_env("CLUSTERD_UPGRADE_BINARY", "/bin/false");
            d.spawn();
            None
        }
        Handover::CrashWithFdStore => {
            d.stop();
            let host = FdStoreHost::start(d.dir.path());
            d.set_env("NOTIFY_SOCKET", host.path.to_str().unwrap());
            d.spawn();
            Some(host)
        }
    };
    let script = d.dir.path().join("rebind.py");
    std::fs::write(&script, REBIND_APP).unwrap();
    let port = free_port();
    d.write_manifest(
        "web.yaml",
        &shared_manifest("web", port, 1, &["python3", script.to_str().unwrap()], ""),
    );
    d.wait_phase("web", "Available", T);
    let pid = d.ready_pids("web")[0];
    assert_eq!(http_get(local(port), "/").unwrap().1, pid.to_string());
    let failing = matches!(how, Handover::FailedUpgrade);
    match &host {
        None if failing => {
            let out = d.upgrade();
            assert_eq!(out.status.code(), Some(1), "the upgrade must fail");
        }
        None => {
            let out = d.upgrade();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            d.wait_retired(T);
        }
        Some(host) => {
            let name = format!("web/seccomp/{pid}/");
            eventually(T, "the notification fd in the fd store", || {
                host.names()
                    .iter()
                    .any(|n| n.starts_with(&name))
                    .then_some(())
            });
            d.kill_daemon();
            d.listen_fds = host.duplicates();
            d.spawn();
        }
    }
    d.wait_phase("web", "Available", T);
    assert_eq!(d.ready_pids("web"), vec![pid], "adopted");
    assert!(
        failing || d.log().contains("answering an adopted worker's binds"),
        "{}",
        d.log()
    );
    // The worker forks a child that binds PORT: the new daemon answers it.
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    let child = eventually(T, "the child's answer", || {
        let (status, body) = http_get(local(port), "/").ok()?;
        (status == 200 && body.trim() != pid.to_string()).then(|| body.trim().to_string())
    });
    let bound = format!("pid {child} bound the shared listener 127.0.0.1:{port}/tcp");
    eventually(T, "a bound event for the child", || {
        d.events("web")
            .iter()
            .any(|e| e["kind"] == "bound" && e["message"] == bound.as_str())
            .then_some(())
    });
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert!(
        status.contains(&format!("\nPPid:\t{pid}\n")),
        "{child} is the worker's child: {status}"
    );
    assert_eq!(d.ready_pids("web"), vec![pid], "the same worker");
    for _ in 0..20 {
        assert_eq!(http_get(local(port), "/").unwrap().1.trim(), child);
    }
    if let Some(host) = host {
        // The worker goes (app removed): its notification fd leaves the store with it.
        d.remove_manifest("web.yaml");
        eventually(T, "FDSTOREREMOVE of socket and notification fd", || {
            host.names().is_empty().then_some(())
        });
    }
}

#[test]
fn a_worker_binding_after_an_upgrade_gets_the_shared_socket() {
    a_worker_binding_after_the_daemon_changed(Handover::Upgrade);
}

#[test]
fn a_worker_binding_after_a_failed_upgrade_gets_the_shared_socket() {
    a_worker_binding_after_the_daemon_changed(Handover::FailedUpgrade);
}

#[test]
fn a_worker_binding_after_a_crash_gets_the_shared_socket_from_the_fd_store() {
    a_worker_binding_after_the_daemon_changed(Handover::CrashWithFdStore);
}

/// An unmodified Express app: `app.listen(process.env.PORT)`. The SIGINT/SIGTERM handler
/// is the usual graceful shutdown a user writes for any process manager (stop accepting
/// with `server.close()`, let requests in flight finish); clusterd needs nothing of it,
/// but without it Node exits at once on SIGTERM and a reload would cut requests in
/// flight, as it would under any manager.
const EXPRESS_APP: &str = r#"const express = require('express');
const app = express();
app.get('/', (req, res) => res.send(String(process.pid)));
const server = app.listen(process.env.PORT);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { server.close(() => process.exit(0)); server.closeIdleConnections(); });
}
"#;

/// Express (from npm, installed by .ci/run into .node/node_modules) as 3 shared workers:
/// every worker takes new connections, and a reload under new-connection load loses
/// nothing.
#[test]
fn express_app_listen_port_workers_share_the_socket_and_reload_without_loss() {
    let Some(node) = node() else { return };
    let modules = repo_root().join(".node/node_modules");
    if require_tool(&modules.join("express/package.json"), "express shared mode").is_none() {
        return;
    }
    let d = Daemon::start();
    let script = d.dir.path().join("app.js");
    std::fs::write(&script, EXPRESS_APP).unwrap();
    let port = free_port();
    d.write_manifest(
        "web.yaml",
        &shared_manifest(
            "web",
            port,
            3,
            &[node.to_str().unwrap(), script.to_str().unwrap()],
            &format!("  env:\n    NODE_PATH: \"{}\"\n", modules.display()),
        ),
    );
    let app = d.wait_phase("web", "Available", T);
    let want = pids_of(&app);
    assert_eq!(want.len(), 3);
    assert_eq!(
        distinct_pids(port, &want),
        want,
        "every Express worker took connections"
    );
    reload_replaces_every_worker(&d, "web", port, &want, "Express");
}

/// A Go server with the standard library only: `net.Listen("tcp", ":"+PORT)` (Go binds
/// `[::]` dual-stack, from whichever runtime thread runs the goroutine, and its runtime
/// sends preemption signals that must not restart a bind the daemon is answering:
/// WAIT_KILLABLE_RECV). On SIGTERM it closes its listener and finishes the connections
/// it accepted: a drain.
const GO_APP: &str = r#"package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

func main() {
	ln, err := net.Listen("tcp", ":"+os.Getenv("PORT"))
	if err != nil {
		panic(err)
	}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ln.Close()
	}()
	var wg sync.WaitGroup
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if line == "\r\n" {
					break
				}
			}
			body := fmt.Sprint(os.Getpid())
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		}()
	}
	wg.Wait()
}
"#;

/// Go (Debian's golang-go, stdlib only, built offline here) as 3 shared workers through
/// the daemon: every worker takes new connections, and a reload under new-connection
/// load loses nothing.
#[test]
fn go_net_listen_workers_share_the_socket_and_reload_without_loss() {
    let Some(go) = ["/usr/bin/go", "/usr/lib/go/bin/go", "/usr/local/go/bin/go"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .map(std::path::Path::to_path_buf)
        .or_else(|| require_tool(std::path::Path::new("/usr/bin/go"), "go shared mode"))
    else {
        return;
    };
    let d = Daemon::start();
    let src = d.dir.path().join("go");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("main.go"), GO_APP).unwrap();
    let bin = src.join("server");
    let out = std::process::Command::new(&go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg("main.go")
        .current_dir(&src)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOCACHE", src.join("cache"))
        .env("GOPATH", src.join("gopath"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    d.write_manifest(
        "go.yaml",
        &shared_manifest("go", port, 3, &[bin.to_str().unwrap()], ""),
    );
    let app = d.wait_phase("go", "Available", T);
    let want = pids_of(&app);
    assert_eq!(want.len(), 3);
    for i in app["instances"].as_array().unwrap() {
        let pid = i["pid"].as_i64().unwrap();
        assert_eq!(
            i["bound"],
            serde_json::json!([format!("127.0.0.1:{port}/tcp by pid {pid}")]),
            "{i}"
        );
    }
    assert_eq!(
        distinct_pids(port, &want),
        want,
        "every Go worker took connections"
    );
    reload_replaces_every_worker(&d, "go", port, &want, "Go");
}

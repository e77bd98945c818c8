//! The daemon's lifecycle against real processes: rolling edits, scaling, crash loops,
//! failed rollouts, bad manifests, editors' files, shutdown, and real third-party
//! workers (Node over IPC, python3 over sd_notify, gunicorn on an inherited socket).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(15);

/// Asks `/` until every pid in `pids` has answered; returns pid -> instance as printed
/// by demo-server (`pid X instance I`).
fn instances_by_pid(port: u16, pids: &[i32]) -> Vec<(i32, String)> {
    let mut seen: Vec<(i32, String)> = Vec::new();
    eventually(T, "every worker to answer `/`", || {
        let (status, body) = http_get(local(port), "/").ok()?;
        assert_eq!(status, 200, "{body}");
        let words: Vec<&str> = body.split_whitespace().collect();
        let pid: i32 = words.get(1)?.parse().ok()?;
        let instance = words.get(3)?.to_string();
        if !seen.iter().any(|(p, _)| *p == pid) {
            seen.push((pid, instance));
        }
        pids.iter()
            .all(|p| seen.iter().any(|(s, _)| s == p))
            .then_some(())
    });
    seen.retain(|(p, _)| pids.contains(p));
    seen.sort();
    seen
}

#[test]
fn edit_replaces_workers_one_by_one_keeping_each_index() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    let before = d.wait_phase("web", "Available", T);
    let old = instance_pids(&before);
    assert_eq!(old.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
    let seen = d.events("web").last().unwrap()["seq"].as_u64().unwrap();

    d.write_manifest(
        "web.yaml",
        &demo_manifest("web", port, 2, "    VERSION: \"2\"\n"),
    );
    let after = eventually(T, "the new revision to be Available", || {
        d.app("web").filter(|a| {
            a["phase"] == "Available"
                && a["revision"] != before["revision"]
                && a["instances"].as_array().unwrap().len() == 2
        })
    });
    let new = instance_pids(&after);
    assert_eq!(new.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
    for i in after["instances"].as_array().unwrap() {
        assert_eq!(i["revision"], after["revision"], "{after:#}");
    }
    for (_, p) in &old {
        assert!(new.iter().all(|(_, n)| n != p), "old pid {p} kept: {new:?}");
        eventually(T, "old worker gone", || (!alive(*p)).then_some(()));
    }
    // Each worker says which index it is, and it is the index it replaced.
    let pids: Vec<i32> = new.iter().map(|(_, p)| *p).collect();
    for (pid, instance) in instances_by_pid(port, &pids) {
        let index = new.iter().find(|(_, p)| *p == pid).unwrap().0;
        assert_eq!(instance, index.to_string(), "pid {pid}");
    }
    // One by one (maxSurge 1, maxUnavailable 0): never fewer than 2 ready, never more
    // than one new worker starting.
    let (mut ready, mut starting, mut drains) = (2i32, 0i32, 0);
    for e in d.events("web") {
        if e["seq"].as_u64().unwrap() <= seen {
            continue;
        }
        match e["kind"].as_str().unwrap() {
            "spawn" => starting += 1,
            "ready" => {
                starting -= 1;
                ready += 1;
            }
            "drain" => {
                ready -= 1;
                drains += 1;
            }
            _ => {}
        }
        assert!(ready >= 2, "ready dropped below 2 at {e}");
        assert!(starting <= 1, "more than one surge worker at {e}");
    }
    assert_eq!(drains, 2);
}

#[test]
fn scale_up_keeps_workers_and_scale_down_drains_the_highest_indexes() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    let two = d.wait_phase("web", "Available", T);
    let revision = two["revision"].clone();
    let first = instance_pids(&two);

    d.write_manifest("web.yaml", &demo_manifest("web", port, 4, ""));
    let four = eventually(T, "4 ready", || {
        d.app("web")
            .filter(|a| a["phase"] == "Available" && a["ready"] == 4)
    });
    assert_eq!(four["revision"], revision, "scaling changed the revision");
    let scaled = instance_pids(&four);
    assert_eq!(scaled.len(), 4, "{four:#}");
    assert_eq!(&scaled[..2], &first[..], "scale up touched running workers");
    assert_eq!(
        scaled.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );

    d.write_manifest("web.yaml", &demo_manifest("web", port, 1, ""));
    let one = eventually(T, "scaled down to 1", || {
        d.app("web")
            .filter(|a| a["phase"] == "Available" && a["instances"].as_array().unwrap().len() == 1)
    });
    assert_eq!(one["revision"], revision);
    assert_eq!(instance_pids(&one), first[..1], "index 0 must stay");
    for (_, p) in &scaled[1..] {
        eventually(T, "scaled-down worker gone", || (!alive(*p)).then_some(()));
    }
    let drained: BTreeSet<u64> = d
        .events("web")
        .iter()
        .filter(|e| e["kind"] == "drain")
        .filter_map(|e| e["instance"].as_u64())
        .collect();
    assert_eq!(drained, BTreeSet::from([1, 2, 3]));
}

#[test]
fn crash_loop_backs_off_with_growing_gaps() {
    let d = Daemon::start();
    let port = free_port();
    let events = d.follow_events("web");
    let manifest = demo_manifest("web", port, 1, "    DEMO_EXIT_AT_START: \"3\"\n").replace(
        "backoff: {initial: 100ms, max: 2s}",
        "backoff: {initial: 150ms, max: 10s}",
    );
    d.write_manifest("web.yaml", &manifest);
    // Spawns at about 0, 0.15, 0.45, 1.05, 2.25 s (plus start-up time).
    eventually(T, "5 spawns", || {
        (events.instants("spawn").len() >= 5).then_some(())
    });
    let app = d.wait_phase("web", "CrashLoopBackOff", T);
    assert!(app["restarts"].as_u64().unwrap() >= 4, "{app:#}");
    let spawns = events.instants("spawn");
    let exits = events.instants("exit");
    // The wait from each exit to the next spawn is the backoff: it must grow.
    let gaps: Vec<Duration> = exits
        .iter()
        .zip(spawns.iter().skip(1))
        .take(4)
        .map(|(exit, spawn)| spawn.saturating_duration_since(*exit))
        .collect();
    assert_eq!(gaps.len(), 4, "exits {exits:?} spawns {spawns:?}");
    for w in gaps.windows(2) {
        assert!(w[1] > w[0], "backoff did not grow: {gaps:?}");
    }
    assert!(gaps[3] > gaps[0] * 3, "backoff not exponential: {gaps:?}");
    let last_exit = app["instances"][0]["last_exit"]
        .as_str()
        .unwrap_or_default();
    assert!(last_exit.contains('3'), "exit code not recorded: {app:#}");
}

#[test]
fn never_ready_rollout_stops_and_old_workers_keep_serving() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    let good = d.wait_phase("web", "Available", T);
    let old = d.ready_pids("web");

    let bad = demo_manifest("web", port, 2, "    DEMO_NEVER_READY: \"1\"\n")
        .replace("timeout: 10s}", "timeout: 2s}");
    d.write_manifest("web.yaml", &bad);
    let degraded = d.wait_phase("web", "Degraded", T);
    assert_ne!(degraded["revision"], good["revision"]);
    assert!(
        degraded["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{degraded:#}"
    );
    assert_eq!(d.ready_pids("web"), old, "old workers replaced");
    assert!(d.event_kinds("web").contains(&"rollout-failed".to_string()));
    for _ in 0..10 {
        let (status, body) = http_get(local(port), "/").unwrap();
        assert_eq!(status, 200);
        let pid: i32 = body.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(old.contains(&pid), "answered by {pid}, not an old worker");
    }

    let started = Instant::now();
    let out = d.cli(&["reload", "web", "--timeout", "10s"]);
    assert!(
        !out.status.success(),
        "reload of a never-ready revision succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(started.elapsed() < T);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rollout failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever the reload tried, the old workers still serve.
    let app = d.wait_phase("web", "Degraded", T);
    assert_eq!(d.ready_pids("web"), old, "{app:#}");
    assert_eq!(http_get(local(port), "/").unwrap().0, 200);
}

#[test]
fn reload_under_new_connection_per_request_load_loses_nothing() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    d.wait_phase("web", "Available", T);
    let before = d.ready_pids("web");

    // /slow keeps requests in flight while workers are signalled.
    let stats = d.reload_under("web", Load::start(local(port), "/slow?ms=100", 8, false));
    assert!(stats.ok >= 80, "{stats:?}");
    let after = d.ready_pids("web");
    assert!(before.iter().all(|p| !after.contains(p)));
}

#[test]
fn instances_max_is_the_usable_cpu_count() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let d = Daemon::start();
    let port = free_port();
    let manifest = demo_manifest("web", port, 1, "").replace("instances: 1", "instances: max");
    d.write_manifest("web.yaml", &manifest);
    let app = d.wait_phase("web", "Available", T);
    assert_eq!(app["desired"].as_u64().unwrap() as usize, cpus, "{app:#}");
    assert_eq!(app["ready"].as_u64().unwrap() as usize, cpus);
    assert_eq!(instance_pids(&app).len(), cpus);
}

/// `file:line:column:` somewhere in `error`, for the given file name.
fn has_position(error: &str, file: &str) -> bool {
    error.lines().any(|l| {
        l.split_once(&format!("{file}:")).is_some_and(|(_, rest)| {
            let mut parts = rest.splitn(3, ':');
            let line = parts.next().and_then(|p| p.parse::<u32>().ok());
            let col = parts.next().and_then(|p| p.parse::<u32>().ok());
            line.is_some() && col.is_some() && parts.next().is_some()
        })
    })
}

#[test]
fn bad_edits_keep_the_old_workers_and_a_fix_recovers() {
    let d = Daemon::start();
    let port = free_port();
    let good = demo_manifest("web", port, 2, "");
    d.write_manifest("web.yaml", &good);
    d.wait_phase("web", "Available", T);
    let pids = d.ready_pids("web");

    let broken_yaml = good.replace("  instances: 2\n", "  instances: [2\n");
    let unknown_field = good.replace("  instances: 2\n", "  instances: 2\n  replicas: 3\n");
    for (what, bad, needle) in [
        ("invalid YAML", broken_yaml, "YAML"),
        ("unknown field", unknown_field, "unknown field `replicas`"),
    ] {
        d.write_manifest("web.yaml", &bad);
        let app = d.wait_phase("web", "Invalid", T);
        let error = app["error"].as_str().unwrap_or_default();
        assert!(has_position(error, "web.yaml"), "{what}: {error}");
        assert!(error.contains(needle), "{what}: {error}");
        assert_eq!(d.ready_pids("web"), pids, "{what} replaced workers");
        assert_eq!(http_get(local(port), "/").unwrap().0, 200, "{what}");

        d.write_manifest("web.yaml", &good);
        let app = d.wait_phase("web", "Available", T);
        assert_eq!(app["error"], Value::Null);
        assert_eq!(d.ready_pids("web"), pids, "fixing {what} replaced workers");
    }
    // A fix that changes something rolls out as usual.
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, "    V: \"2\"\n"));
    eventually(T, "the fixed revision to roll out", || {
        let now = d.ready_pids("web");
        (now.len() == 2 && now.iter().all(|p| !pids.contains(p))).then_some(())
    });
}

#[test]
fn sigterm_drains_everything_exits_0_and_removes_the_socket() {
    let mut d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    d.write_manifest("api.yaml", &demo_manifest("api", free_port(), 1, ""));
    d.wait_phase("web", "Available", T);
    d.wait_phase("api", "Available", T);
    let pids: Vec<i32> = ["web", "api"]
        .iter()
        .flat_map(|a| d.ready_pids(a))
        .collect();
    assert_eq!(pids.len(), 3);
    for p in &pids {
        let members: Vec<i32> = group_members(*p)
            .into_iter()
            .filter(|m| !is_timestamper(*m))
            .collect();
        assert_eq!(members, vec![*p], "worker {p} leads its own group");
    }
    let daemon = d.pid();

    let status = d.stop().expect("daemon exit status");
    assert!(status.success(), "daemon exited with {status:?}");
    assert!(!alive(daemon));
    for p in &pids {
        assert!(!alive(*p), "worker {p} outlived the daemon");
        // The log timestamper leaves right after the worker's output closes.
        eventually(T, &format!("process group {p} to be empty"), || {
            group_members(*p).is_empty().then_some(())
        });
    }
    assert!(!d.socket.exists(), "control socket left behind");
    assert!(std::net::TcpStream::connect(local(port)).is_err());
}

#[test]
fn editor_temp_files_and_partial_writes_cause_no_rollout() {
    use std::io::Write;
    let d = Daemon::start();
    let port = free_port();
    let good = demo_manifest("web", port, 2, "");
    d.write_manifest("web.yaml", &good);
    let app = d.wait_phase("web", "Available", T);
    let pids = d.ready_pids("web");
    let seq_before = d.events("web").len();

    // What vim and emacs leave next to the file: a changed manifest that must be ignored.
    let other = demo_manifest("web", port, 3, "    V: \"swap\"\n");
    std::fs::write(
        d.apps_dir.join(".web.yaml.swp"),
        b"\x00\x01b0VIM 9.0\x00garbage",
    )
    .unwrap();
    std::fs::write(d.apps_dir.join("web.yaml~"), &other).unwrap();
    std::fs::write(d.apps_dir.join(".#web.yaml"), &other).unwrap();

    // An in-place write in two halves, 80 ms apart (a slow editor or `cat > web.yaml`):
    // the first half alone is invalid YAML (an open flow mapping).
    let cut = good.find("readiness: {type").unwrap() + "readiness: {type".len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.apps_dir.join("web.yaml"))
        .unwrap();
    f.write_all(&good.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(80)); // the gap between the two halves IS the test
    f.write_all(&good.as_bytes()[cut..]).unwrap();
    drop(f);
    // And a first half that is a valid manifest on its own (no readiness, no shutdown:
    // another revision): only the watcher's debounce keeps it from rolling out, so the
    // rest follows quickly.
    let cut = good.find("  readiness:").unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.apps_dir.join("web.yaml"))
        .unwrap();
    f.write_all(&good.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20)); // the gap between the two halves IS the test
    f.write_all(&good.as_bytes()[cut..]).unwrap();
    drop(f);

    // A marker manifest written after all of that is accepted only by a rescan that
    // read the whole dir after our writes (a rescan that meets a half-written file
    // accepts nothing until it settles), so once it is Available the verdict is in.
    d.write_manifest("marker.yaml", &demo_manifest("marker", free_port(), 1, ""));
    d.wait_phase("marker", "Available", T);
    let now = d.app("web").unwrap();
    assert_eq!(now["revision"], app["revision"]);
    assert_eq!(now["desired"], 2);
    assert_eq!(
        d.ready_pids("web"),
        pids,
        "a temp file or partial write rolled workers"
    );
    let kinds: Vec<String> = d.event_kinds("web")[seq_before..].to_vec();
    assert!(
        !kinds
            .iter()
            .any(|k| k == "invalid" || k == "spawn" || k == "manifest"),
        "spurious events: {kinds:?}\n{}",
        d.log()
    );
}

#[test]
fn node_app_becomes_ready_over_ipc_and_serves_the_inherited_socket() {
    let Some(node) = ["/usr/bin/node", "/usr/local/bin/node"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .map(|p| p.to_path_buf())
        .or_else(|| require_tool(std::path::Path::new("/usr/bin/node"), "node ipc"))
    else {
        return;
    };
    let d = Daemon::start();
    let script = d.dir.path().join("server.js");
    std::fs::write(
        &script,
        r#"// An unmodified PM2 `wait_ready` app: serve fd 3, then process.send('ready').
const http = require('http');
const server = http.createServer((req, res) => {
  res.end(`node pid ${process.pid} instance ${process.env.CLUSTERD_INSTANCE}\n`);
});
server.listen({ fd: 3 }, () => {
  setTimeout(() => process.send('ready'), 200);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"#,
    )
    .unwrap();
    let port = free_port();
    d.write_manifest(
        "node.yaml",
        &inherit_manifest(
            "node",
            port,
            "2",
            &[node.to_str().unwrap(), script.to_str().unwrap()],
            "  readiness: {type: ipc, timeout: 10s}\n",
        ),
    );
    let app = d.wait_phase("node", "Available", T);
    assert_eq!(app["ready"], 2);
    for (index, pid) in instance_pids(&app) {
        assert!(proc_env(pid, "NODE_CHANNEL_FD").is_some());
        assert_eq!(proc_env(pid, "CLUSTERD_INSTANCE"), Some(index.to_string()));
    }
    let (status, body) = http_get(local(port), "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("node pid "), "{body}");
    let ready = d.events("node");
    assert_eq!(ready.iter().filter(|e| e["kind"] == "ready").count(), 2);
}

const PY_ENV_SERVER: &str = r#"
# A worker that speaks sd_notify itself and serves its own environment as JSON on fd 3.
import http.server, json, os, socket

def notify(state):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        keys = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "CLUSTERD_APP",
                "CLUSTERD_INSTANCE", "CLUSTERD_REVISION", "NOTIFY_SOCKET"]
        env = {k: os.environ.get(k) for k in keys}
        env["pid"] = os.getpid()
        body = json.dumps(env).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not my pid"
server = http.server.HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
notify(b"READY=1")
server.serve_forever()
"#;

#[test]
fn python_worker_notifies_readiness_and_sees_the_socket_activation_env() {
    let d = Daemon::start();
    let script = d.dir.path().join("env_server.py");
    std::fs::write(&script, PY_ENV_SERVER).unwrap();
    let port = free_port();
    d.write_manifest(
        "py.yaml",
        &inherit_manifest(
            "py",
            port,
            "2",
            &["python3", "-u", script.to_str().unwrap()],
            "  readiness: {type: notify, timeout: 10s}\n",
        ),
    );
    let app = d.wait_phase("py", "Available", T);
    let pids = instance_pids(&app);
    assert_eq!(pids.len(), 2);
    let mut answered = BTreeSet::new();
    eventually(T, "both workers to answer", || {
        let (status, body) = http_get(local(port), "/").ok()?;
        assert_eq!(status, 200, "{body}");
        let env: Value = serde_json::from_str(&body).unwrap();
        let pid = env["pid"].as_i64().unwrap() as i32;
        let (index, _) = *pids
            .iter()
            .find(|(_, p)| *p == pid)
            .unwrap_or_else(|| panic!("pid {pid} not in status {pids:?}"));
        assert_eq!(env["LISTEN_PID"], pid.to_string(), "{env}");
        assert_eq!(env["LISTEN_FDS"], "1", "{env}");
        assert_eq!(env["LISTEN_FDNAMES"], "py", "{env}");
        assert_eq!(env["CLUSTERD_APP"], "py", "{env}");
        assert_eq!(env["CLUSTERD_INSTANCE"], index.to_string(), "{env}");
        assert_eq!(env["CLUSTERD_REVISION"], app["revision"], "{env}");
        assert!(env["NOTIFY_SOCKET"].is_string(), "{env}");
        answered.insert(pid);
        (answered.len() == 2).then_some(())
    });
}

#[test]
fn gunicorn_serves_the_inherited_socket_and_reloads_without_loss() {
    let Some(gunicorn) = require_tool(&repo_root().join(".venv/bin/gunicorn"), "gunicorn") else {
        return;
    };
    let d = Daemon::start();
    std::fs::write(
        d.dir.path().join("wsgi_app.py"),
        r#"import os

def app(environ, start_response):
    body = f"gunicorn pid {os.getpid()} instance {os.environ.get('CLUSTERD_INSTANCE')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#,
    )
    .unwrap();
    let port = free_port();
    let dir = d.dir.path().to_str().unwrap().to_string();
    // gunicorn's master is the process clusterd spawns (argv, no shell); it picks the
    // socket up from LISTEN_FDS only if LISTEN_PID is its own pid, and says READY=1.
    d.write_manifest(
        "gunicorn.yaml",
        &inherit_manifest(
            "gunicorn",
            port,
            "2",
            &[
                gunicorn.to_str().unwrap(),
                "--workers",
                "1",
                "--chdir",
                &dir,
                "--graceful-timeout",
                "10",
                "wsgi_app:app",
            ],
            "  readiness: {type: notify, timeout: 15s}\n",
        ),
    );
    let app = d.wait_phase("gunicorn", "Available", T);
    let before = instance_pids(&app);
    let (status, body) = http_get(local(port), "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("gunicorn pid "), "{body}");
    let log = read(&d.log_dir.join("gunicorn/gunicorn-0.log"));
    assert!(
        log.is_empty() || !log.contains("0.0.0.0:8000"),
        "gunicorn bound its default port instead of the inherited socket: {log}"
    );

    d.reload_under("gunicorn", Load::start(local(port), "/", 4, false));
    let after = instance_pids(&d.wait_phase("gunicorn", "Available", T));
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().all(|b| !after.contains(b)),
        "{before:?} {after:?}"
    );
}

#[test]
fn relative_daemon_paths_work_for_workers_in_another_directory() {
    // `clusterd daemon --state-dir state ...` from a shell: the workers run in the
    // manifest's directory, so NOTIFY_SOCKET and friends must not be relative.
    let d = Daemon::start_relative();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 1, ""));
    let app = d.wait_phase("web", "Available", T);
    let pid = instance_pids(&app)[0].1;
    let notify = proc_env(pid, "NOTIFY_SOCKET").unwrap();
    assert!(
        notify.starts_with('/') || notify.starts_with('@'),
        "{notify}"
    );
    assert!(d.log_dir.join("web/web-0.log").exists());
    let out = d.cli(&["logs", "web", "--tail", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

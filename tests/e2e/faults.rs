//! Faults the daemon must survive (issue 18) and a port in use (issue 16): a second
//! daemon on the same dirs, a crash in the middle of a scale-up, a public port held by
//! another program.

use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

/// Pids of live processes whose environment says they are workers of `app`.
fn workers_of(app: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            alive(*pid)
                && !is_timestamper(*pid)
                && proc_env(*pid, "CLUSTERD_APP").as_deref() == Some(app)
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn a_second_daemon_on_the_same_dirs_is_refused_naming_the_first() {
    let d = Daemon::start();
    let out = std::process::Command::new(clusterd_bin())
        .arg("daemon")
        .arg("--apps-dir")
        .arg(&d.apps_dir)
        .arg("--socket")
        .arg(d.dir.path().join("second.sock"))
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--log-dir")
        .arg(&d.log_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon started: {err}");
    assert!(
        err.contains(&format!("pid {}", d.pid())) && err.contains("already running"),
        "{err}"
    );
    // The first one is untouched.
    assert!(d.status()["apps"].is_array());
}

/// A daemon SIGKILLed while new workers were still starting: the restarted daemon
/// adopts them too (they were recorded before it acted) instead of orphaning them and
/// starting more.
#[test]
fn a_crash_during_scale_up_leaves_no_orphan() {
    let mut d = Daemon::start();
    let port = free_port();
    let app = "scaleorphan";
    // Ready two seconds after start: a window to crash in.
    let manifest = |n: u32| {
        format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {app}\nspec:\n  command: [\"sh\", \"-c\", \"sleep 2; exec {}\"]\n  instances: {n}\n  listen:\n    - port: {port}\n      address: 127.0.0.1\n      mode: inherit\n  readiness: {{type: notify, timeout: 30s}}\n  shutdown: {{signal: SIGTERM, timeout: 5s}}\n",
            demo_server().display()
        )
    };
    d.write_manifest("app.yaml", &manifest(2));
    d.wait_phase(app, "Available", T);
    d.write_manifest("app.yaml", &manifest(6));
    eventually(T, "six workers, some still starting", || {
        let a = d.app(app)?;
        let instances = a["instances"].as_array()?;
        (instances.len() == 6 && instances.iter().any(|i| i["state"] == "Starting")).then_some(())
    });
    d.kill_daemon();
    d.spawn();
    let status = d.wait_phase(app, "Available", T);
    assert_eq!(status["ready"], 6, "{status}");
    let live = workers_of(app);
    assert_eq!(
        live.len(),
        6,
        "workers running after the restart (orphans?): {live:?}\n{status}"
    );
    d.stop();
    let left = workers_of(app);
    assert!(left.is_empty(), "workers outlived the daemon: {left:?}");
}

/// A public port held by another program: the app stays listed with who holds it, the
/// failure is logged once, and the app starts when the port is freed.
#[test]
fn a_port_in_use_keeps_the_app_listed_and_it_starts_once_freed() {
    let d = Daemon::start();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 1, ""));
    let app = eventually(T, "the app listed with the port's holder", || {
        let a = d.app("web")?;
        a["error"].as_str()?.contains("in use").then_some(a)
    });
    let error = app["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("pid {}", std::process::id())),
        "the error should name the holder: {error}"
    );
    // Retried with backoff, reported once.
    std::thread::sleep(Duration::from_secs(3)); // the absence of repeated events IS the test
    let failures = d
        .event_kinds("web")
        .iter()
        .filter(|k| *k == "listen-failed")
        .count();
    assert_eq!(failures, 1, "{:?}", d.event_kinds("web"));
    drop(holder);
    d.wait_phase("web", "Available", T);
}

/// One worker calling `shutdown(3, SHUT_RD)` on the inherited socket stops it for every
/// worker. The daemon notices, binds the address anew, replaces every worker, and says
/// why; connections are accepted again without anyone touching the app.
#[test]
fn a_worker_that_shuts_the_shared_socket_down_does_not_kill_the_port() {
    let d = Daemon::start();
    let port = free_port();
    let marker = d.dir.path().join("shut-once");
    let worker = script(
        d.dir.path(),
        "shutter.py",
        r#"import http.server, os, socket
s = socket.socket(fileno=3)
marker = os.environ["MARKER"]
if not os.path.exists(marker):
    open(marker, "w").close()
    s.shutdown(socket.SHUT_RD)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H, bind_and_activate=False)
srv.socket.close()
srv.socket = s
srv.serve_forever()
"#,
    );
    d.write_manifest(
        "web.yaml",
        &format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: [\"python3\", \"{}\"]\n  instances: 2\n  env:\n    MARKER: \"{}\"\n  listen:\n    - port: {port}\n      address: 127.0.0.1\n      mode: inherit\n  readiness: {{type: delay, delay: 0s}}\n  shutdown: {{signal: SIGTERM, timeout: 2s}}\n  restart: {{backoff: {{initial: 100ms, max: 1s}}}}\n",
            worker.display(),
            marker.display()
        ),
    );
    eventually(T, "the socket shut down by a worker", || {
        marker.exists().then_some(())
    });
    let back = eventually(Duration::from_secs(40), "the port accepting again", || {
        http_get(local(port), "/")
            .ok()
            .filter(|(code, _)| *code == 200)
    });
    assert_eq!(back.1, "ok");
    let events = String::from_utf8_lossy(&d.cli(&["events", "web"]).stdout).to_string();
    assert!(events.contains("stopped listening"), "{events}");
    d.wait_phase("web", "Available", T);
}

/// `clusterd status` against a stopped daemon gives up with a message instead of hanging.
#[test]
fn status_against_a_stopped_daemon_times_out_with_a_message() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = Daemon::start();
    kill(Pid::from_raw(d.pid()), Signal::SIGSTOP).unwrap();
    let out = std::process::Command::new(clusterd_bin())
        .args(["status"])
        .env("CLUSTERD_SOCKET", &d.socket)
        .env("CLUSTERD_TIMEOUT", "1s")
        .output()
        .unwrap();
    kill(Pid::from_raw(d.pid()), Signal::SIGCONT).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did not answer within 1s"), "{err}");
}

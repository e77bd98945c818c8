//! Upgrading or restarting the daemon never closes a port (issue 13): `clusterd upgrade`
//! and SIGUSR2 hand every socket and worker to the binary on disk; after a SIGKILL, the
//! sockets come back from systemd's fd store (played here by `FdStoreHost`).

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// An app of two demo-servers in `mode` on a fresh port; returns the port.
fn app_in_mode(d: &Daemon, mode: &str) -> u16 {
    let port = free_port();
    let manifest = match mode {
        "inherit" => demo_manifest("web", port, 2, ""),
        "http" => demo_http_manifest("web", port, 2, "", ""),
        "shared" => format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: [\"{}\"]\n  instances: 2\n  listen:\n    - {{name: web, port: {port}, address: 127.0.0.1, mode: shared}}\n  shutdown: {{signal: SIGTERM, timeout: 10s}}\n  restart: {{backoff: {{initial: 100ms, max: 2s}}}}\n",
            demo_server().display()
        ),
        _ => proxied_manifest(
            "web",
            port,
            mode,
            2,
            &format!("[\"{}\"]", demo_server().display()),
            "",
        ),
    };
    d.write_manifest("web.yaml", &manifest);
    d.wait_phase("web", "Available", Duration::from_secs(20));
    port
}

/// Upgrade under keep-alive and new-connection load at once: not one request fails, the
/// workers are the same processes, and the new daemon answers.
fn upgrade_under_load(mode: &str, by_signal: bool) {
    let mut d = Daemon::start();
    let port = app_in_mode(&d, mode);
    let before = d.ready_pids("web");
    let old_pid = d.pid();

    let keepalive = Load::start(local(port), "/", 3, true);
    let fresh = Load::start(local(port), "/", 3, false);
    keepalive.wait_for(100);
    fresh.wait_for(100);
    let new_pid = if by_signal {
        kill(Pid::from_raw(old_pid), Signal::SIGUSR2).unwrap();
        let new_pid = eventually(Duration::from_secs(20), "a new daemon pid", || {
            d.reported_pid().filter(|p| *p != old_pid)
        });
        d.follow_upgrade(new_pid);
        new_pid
    } else {
        let out = d.upgrade();
        assert!(
            out.status.success(),
            "upgrade failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        d.pid()
    };
    assert_ne!(new_pid, old_pid);
    // The new daemon answers (the old one no longer accepts on the control socket).
    let t = std::time::Instant::now();
    let answer = api_request(&d.socket, "GET", "/v1/daemon");
    assert!(
        matches!(&answer, Ok((200, body)) if body.contains(&format!("\"pid\":{new_pid}"))),
        "GET /v1/daemon after the upgrade ({:?}): {answer:?}\n{}",
        t.elapsed(),
        d.log()
    );
    let out = d.cli(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keepalive.wait_for(100);
    fresh.wait_for(100);
    let (ka, fr) = (keepalive.stop(), fresh.stop());
    eprintln!("upgrade in {mode} mode: keep-alive {ka:?}, new connections {fr:?}");
    for (what, s) in [("keep-alive", &ka), ("new-connection", &fr)] {
        assert_eq!(
            (s.failed, s.non2xx),
            (0, 0),
            "{what} requests lost across the upgrade in {mode} mode: {:?}\n{}",
            s.errors,
            d.log()
        );
    }
    assert_eq!(d.ready_pids("web"), before, "the workers must be adopted");
    assert!(
        d.log().contains("took over a handed-over socket"),
        "{}",
        d.log()
    );
    // The old daemon lets its connections finish and exits 0, without the workers.
    d.wait_retired(Duration::from_secs(20));
    assert!(!alive(old_pid));
    for p in &before {
        assert!(alive(*p), "worker {p} died with the old daemon");
    }
    let events = String::from_utf8_lossy(&d.cli(&["events"]).stdout).to_string();
    assert!(events.contains("upgrade"), "{events}");
    assert!(events.contains("adopted"), "{events}");

    // And the new daemon manages them: a reload without loss (in shared mode the new
    // workers' binds are answered by the new daemon, and the adopted ones drain on their
    // own), under new-connection load too.
    d.reload_under("web", Load::start(local(port), "/", 3, true));
    if mode == "shared" {
        d.reload_under("web", Load::start(local(port), "/", 3, false));
    }
}

#[test]
fn upgrade_in_http_mode_loses_no_request_and_keeps_the_workers() {
    upgrade_under_load("http", false);
}

#[test]
fn upgrade_in_tcp_mode_loses_no_request_and_keeps_the_workers() {
    upgrade_under_load("tcp", false);
}

/// Inherit mode, through SIGUSR2 (the same path as `clusterd upgrade`).
#[test]
fn sigusr2_upgrade_in_inherit_mode_loses_no_request_and_keeps_the_workers() {
    upgrade_under_load("inherit", true);
}

/// Shared mode: the daemon's socket, which the workers got through their intercepted
/// `bind`, is handed over like an inherit-mode one.
#[test]
fn upgrade_in_shared_mode_loses_no_request_and_keeps_the_workers() {
    upgrade_under_load("shared", false);
}

/// A new binary that exits at start: the old daemon keeps serving, and says why.
#[test]
fn an_upgrade_to_a_binary_that_fails_keeps_the_old_daemon() {
    let mut d = Daemon::start();
    d.stop();
    d.set_env("CLUSTERD_UPGRADE_BINARY", "/bin/false");
    d.spawn();
    let port = app_in_mode(&d, "http");
    d.write_manifest("ready.yaml", &demo_manifest("ready", free_port(), 1, ""));
    d.wait_phase("ready", "Available", Duration::from_secs(20));
    let before = d.ready_pids("web");
    let old_pid = d.pid();
    let load = Load::start(local(port), "/", 3, false);
    load.wait_for(50);
    let out = d.upgrade();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("upgrade failed"), "{stderr}");
    assert!(stderr.contains("/bin/false"), "{stderr}");
    assert!(stderr.contains("exit code 1"), "{stderr}");
    assert!(stderr.contains("keeps"), "{stderr}");
    load.wait_for(50);
    let stats = load.stop();
    assert_eq!((stats.failed, stats.non2xx), (0, 0), "{:?}", stats.errors);
    assert_eq!(d.pid(), old_pid);
    assert_eq!(d.reported_pid(), Some(old_pid));
    assert_eq!(d.ready_pids("web"), before);
    let events = String::from_utf8_lossy(&d.cli(&["events"]).stdout).to_string();
    assert!(events.contains("upgrade-failed"), "{events}");
    // Still fully in charge: a reload works, in http mode and in inherit mode, whose
    // readiness is READY=1 on the notify socket (read again after the failed attempt).
    d.reload_under("web", Load::start(local(port), "/", 3, true));
    let out = d.cli(&["reload", "ready"]);
    assert!(
        out.status.success(),
        "notify readiness after a failed upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGKILL of the daemon under new-connection load, restarted at once with the sockets
/// of the fd store: no connection is refused; only requests that were inside the killed
/// proxy fail (at most one per client).
fn crash_under_load(mode: &str) {
    let mut d = Daemon::start();
    d.stop();
    let host = FdStoreHost::start(d.dir.path());
    d.set_env("NOTIFY_SOCKET", host.path.to_str().unwrap());
    d.spawn();
    let port = app_in_mode(&d, mode);
    let name = format!("web/{mode}/tcp/127.0.0.1/{port}");
    eventually(
        Duration::from_secs(10),
        "the socket in the fd store",
        || host.names().contains(&name).then_some(()),
    );
    let before = d.ready_pids("web");

    let clients = 4;
    let load = Load::start(local(port), "/", clients, false);
    load.wait_for(100);
    d.kill_daemon();
    // Restart=: at once, with the store's sockets as LISTEN_FDS.
    d.listen_fds = host.duplicates();
    d.spawn();
    d.wait_phase("web", "Available", Duration::from_secs(20));
    load.wait_for(200);
    let stats = load.stop();
    eprintln!(
        "SIGKILL in {mode} mode: {} ok, {} failed (in flight in the killed proxy), {} refused: {:?}",
        stats.ok, stats.failed, stats.refused, stats.errors
    );
    assert_eq!(stats.refused, 0, "refused: {:?}\n{}", stats.errors, d.log());
    assert_eq!(stats.non2xx, 0, "{:?}", stats.errors);
    assert!(
        stats.failed <= clients as u64,
        "more failures than requests in flight: {:?}",
        stats.errors
    );
    assert_eq!(d.ready_pids("web"), before, "the workers must be adopted");
    assert_eq!(host.names(), vec![name.clone()], "stored once, not twice");
    let log = d.log();
    assert!(
        log.contains("source=\"LISTEN_FDS\"") && log.contains("took over a handed-over socket"),
        "the restarted daemon must take the stored socket, not bind: {log}"
    );

    // Closed for good: the app is removed, the socket leaves the store.
    d.remove_manifest("web.yaml");
    eventually(Duration::from_secs(20), "FDSTOREREMOVE", || {
        host.names().is_empty().then_some(())
    });
    eventually(Duration::from_secs(20), "the port closed", || {
        std::net::TcpStream::connect(local(port))
            .is_err()
            .then_some(())
    });
}

#[test]
fn sigkill_in_http_mode_refuses_no_connection_with_the_fd_store() {
    crash_under_load("http");
}

#[test]
fn sigkill_in_tcp_mode_refuses_no_connection_with_the_fd_store() {
    crash_under_load("tcp");
}

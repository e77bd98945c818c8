//! The shortest path through the product: manifest in, workers serving, reload, gone.

use std::time::Duration;

use crate::support::*;

#[test]
fn manifest_drop_serves_reloads_without_loss_and_removal_closes_the_port() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    let app = d.wait_phase("web", "Available", Duration::from_secs(20));
    assert_eq!(app["ready"], 2);
    let before = d.ready_pids("web");
    assert_eq!(before.len(), 2);
    let metrics = api_get(&d.socket, "/metrics");
    assert!(
        metrics.contains("clusterd_app_ready_instances{app=\"web\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("clusterd_app_phase{app=\"web\",phase=\"Available\"} 1"),
        "{metrics}"
    );
    let (status, body) = http_get(local(port), "/").unwrap();
    assert_eq!(status, 200, "{body}");

    let load = Load::start(local(port), "/", 4, true);
    load.wait_for(50);
    let out = d.cli(&["reload", "web"]);
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2/2 replaced"));
    load.wait_for(50);
    let stats = load.stop();
    assert_eq!(
        (stats.failed, stats.non2xx),
        (0, 0),
        "lost requests during reload: {:?}",
        stats.errors
    );
    let after = d.ready_pids("web");
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "old pids {before:?} still serving: {after:?}"
    );
    for p in &before {
        eventually(Duration::from_secs(10), "old worker gone", || {
            (!alive(*p)).then_some(())
        });
    }

    d.remove_manifest("web.yaml");
    eventually(Duration::from_secs(20), "app forgotten", || {
        d.app("web").is_none().then_some(())
    });
    assert!(
        std::net::TcpStream::connect(local(port)).is_err(),
        "port still open after removal"
    );
    for p in &after {
        assert!(!alive(*p), "worker {p} survived the app's removal");
    }
}

#[test]
fn daemon_sigkill_and_restart_adopts_inherit_workers_while_they_keep_serving() {
    adopts_across_a_daemon_restart(false);
}

/// The bug of issue 10: a manifest written just before the restart (`clusterd apply ...
/// && systemctl restart clusterd`) made the new daemon drain the adopted workers and
/// close the socket.
#[test]
fn a_manifest_written_right_before_a_restart_does_not_close_the_port() {
    adopts_across_a_daemon_restart(true);
}

fn adopts_across_a_daemon_restart(touch_manifest: bool) {
    let mut d = Daemon::start();
    let port = free_port();
    let manifest = demo_manifest("web", port, 2, "");
    d.write_manifest("web.yaml", &manifest);
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let before = d.ready_pids("web");

    // New connection per request: every request must find the port open and a worker.
    let load = Load::start(local(port), "/", 4, false);
    load.wait_for(50);
    d.kill_daemon();
    load.wait_for(200); // served with no daemon at all
    if touch_manifest {
        d.write_manifest("web.yaml", &manifest);
    }
    d.spawn();
    let app = d.wait_phase("web", "Available", Duration::from_secs(20));
    load.wait_for(50);
    let stats = load.stop();
    assert_eq!(
        (stats.failed, stats.non2xx),
        (0, 0),
        "requests lost across the daemon restart: {:?}",
        stats.errors
    );
    assert_eq!(
        d.ready_pids("web"),
        before,
        "the new daemon must adopt, not replace: {app}"
    );
    let events = String::from_utf8_lossy(&d.cli(&["events", "web"]).stdout).to_string();
    assert!(events.contains("adopted"), "{events}");
    for bad in ["forgotten", "draining", "removed"] {
        assert!(!events.contains(bad), "{bad} after the restart: {events}");
    }

    // The adopted workers are fully managed: a reload replaces them without loss.
    let load = Load::start(local(port), "/", 4, true);
    load.wait_for(50);
    let out = d.cli(&["reload", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load.wait_for(50);
    let stats = load.stop();
    assert_eq!((stats.failed, stats.non2xx), (0, 0), "{:?}", stats.errors);
    let after = d.ready_pids("web");
    assert!(before.iter().all(|p| !after.contains(p)));
    for p in &before {
        eventually(Duration::from_secs(15), "adopted worker stopped", || {
            (!alive(*p)).then_some(())
        });
    }
}

#[test]
fn as_root_a_manifest_writable_by_others_is_refused_and_the_running_app_kept() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: StrictModes only applies when the daemon runs as root");
        return;
    }
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 1, ""));
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let pids = d.ready_pids("web");
    let path = d.apps_dir.join("web.yaml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let app = d.wait_phase("web", "Invalid", Duration::from_secs(20));
    let error = app["error"].as_str().unwrap();
    assert!(error.contains("chmod go-w"), "{error}");
    assert_eq!(
        d.ready_pids("web"),
        pids,
        "a refused manifest must not touch running workers"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.wait_phase("web", "Available", Duration::from_secs(20));
    assert_eq!(d.ready_pids("web"), pids);
}

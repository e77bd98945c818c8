//! Nothing of a worker outlives it (issue 16 items 1 and 2): wrappers (`sh -c`, `npm
//! start`) that die on the stop signal while the app ignores it, servers backgrounded
//! with `&`, children detached with `setsid`, old code after a reload, and the daemon's
//! own shutdown. Each worker's processes are found by a mark in their environment
//! (`E2E_TREE`), which every descendant inherits, whatever group or session it is in.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

/// A mark unique to one test run.
fn new_mark() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Live processes whose environment carries `E2E_TREE=<mark>`.
fn marked(mark: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid) && proc_env(pid, "E2E_TREE").as_deref() == Some(mark))
        .collect()
}

/// Kills whatever carries the mark when the test ends, failed or not (a leak must not
/// outlive the test that found it).
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn node() -> Option<PathBuf> {
    ["/usr/bin/node", "/usr/local/bin/node"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .or_else(|| require_tool(Path::new("/usr/bin/node"), "process trees"))
}

/// A Node app that ignores SIGTERM and SIGINT (as apps with a slow or broken handler
/// do) and, when `detach` is set, starts a `{detached: true}` child (setsid) that
/// ignores them too. Each writes `$E2E_READY/<pid>` once its handler is installed.
const STUBBORN_JS: &str = r#"
const { spawn } = require('child_process');
const fs = require('fs');
process.on('SIGTERM', () => {});
process.on('SIGINT', () => {});
fs.writeFileSync(process.env.E2E_READY + '/' + process.pid, '');
if (process.argv[2] === 'detach') {
  const child = "process.on('SIGTERM', () => {}); require('fs').writeFileSync(process.env.E2E_READY + '/' + process.pid, ''); setInterval(() => {}, 1000)";
  const c = spawn(process.execPath, ['-e', child], { detached: true, stdio: 'ignore' });
  c.unref();
}
setInterval(() => {}, 1000);
"#;

/// Marked node processes that have installed their SIGTERM handler. Until then a SIGTERM
/// still kills them (node catches SIGTERM from the start, to exit), and the test would
/// prove nothing.
fn stubborn_nodes(mark: &str, ready: &Path) -> usize {
    marked(mark)
        .into_iter()
        .filter(|pid| ready.join(pid.to_string()).exists())
        .count()
}

/// A fresh directory for one app's ready files.
fn ready_dir(d: &Daemon, name: &str) -> PathBuf {
    let dir = d.dir.path().join(format!("ready-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn manifest(name: &str, command: &[&str], mark: &str, ready: &Path, extra: &str) -> String {
    let argv: Vec<String> = command
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [{}]\n  instances: 2\n  env:\n    E2E_TREE: \"{mark}\"\n    E2E_READY: \"{}\"\n  shutdown: {{signal: SIGTERM, timeout: 1s}}\n{extra}",
        argv.join(", "),
        ready.display()
    )
}

/// Starts `command` as a 2-instance app, waits until `nodes` node processes of it ignore
/// SIGTERM, removes the manifest, and checks that once the app is gone nothing of it
/// runs.
fn removed_app_leaves_nothing(d: &Daemon, name: &str, command: &[&str], extra: &str, nodes: usize) {
    let mark = new_mark();
    let _sweep = Sweep(mark.clone());
    let ready = ready_dir(d, name);
    d.write_manifest(
        &format!("{name}.yaml"),
        &manifest(name, command, &mark, &ready, extra),
    );
    d.wait_phase(name, "Available", T);
    eventually(
        T,
        &format!("{nodes} node processes of {name} ignoring SIGTERM"),
        || (stubborn_nodes(&mark, &ready) >= nodes).then_some(()),
    );
    d.remove_manifest(&format!("{name}.yaml"));
    eventually(T, &format!("{name} forgotten"), || {
        d.app(name).is_none().then_some(())
    });
    // The workers counted as stopped: nothing of their trees may be left.
    let left = marked(&mark);
    assert!(
        left.is_empty(),
        "{name}: {left:?} outlived their workers\n{}",
        d.log()
    );
}

#[test]
fn wrapped_apps_that_ignore_the_stop_signal_die_with_their_worker() {
    let Some(node) = node() else { return };
    let d = Daemon::start();
    let js = d.dir.path().join("app.js");
    std::fs::write(&js, STUBBORN_JS).unwrap();
    let node_s = node.display().to_string();
    // `sh -c "node app.js"`: the shell dies on SIGTERM, node does not.
    let line = format!("{node_s} {} ; echo shell-done", js.display());
    removed_app_leaves_nothing(&d, "shwrap", &["sh", "-c", &line], "", 2);

    // `npm start`: npm -> sh -> node.
    let npm = node.with_file_name("npm");
    if npm.exists() {
        let pkg = d.dir.path().join("pkg");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(
            pkg.join("package.json"),
            format!(
                "{{\"name\": \"stubborn\", \"version\": \"1.0.0\", \"scripts\": {{\"start\": \"{node_s} {}\"}}}}",
                js.display()
            ),
        )
        .unwrap();
        let npm_s = npm.display().to_string();
        removed_app_leaves_nothing(
            &d,
            "npmapp",
            &[&npm_s, "start", "--silent"],
            &format!("  workingDir: {}\n", pkg.display()),
            2,
        );
    } else {
        require_tool(&npm, "npm start tree");
    }
}

/// Node's `spawn(..., {detached: true})` calls setsid: the child leaves the worker's
/// process group and session, and still dies with its worker.
#[test]
fn a_detached_node_child_dies_with_its_worker() {
    let Some(node) = node() else { return };
    let d = Daemon::start();
    let js = d.dir.path().join("app.js");
    std::fs::write(&js, STUBBORN_JS).unwrap();
    let node_s = node.display().to_string();
    let js_s = js.display().to_string();
    removed_app_leaves_nothing(&d, "detach", &[&node_s, &js_s, "detach"], "", 4);
}

/// `sh -c "python3 -m http.server $(PORT) &"`: the shell exits at once, the server is
/// the worker. It runs as one worker (not restarted in a loop, leaking a server each
/// time), and goes away with the app.
#[test]
fn a_backgrounded_server_is_the_worker_and_leaks_nothing() {
    let d = Daemon::start();
    let port = free_port();
    let mark = new_mark();
    let _sweep = Sweep(mark.clone());
    let yaml = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: bg\nspec:\n  command: [sh, -c, \"python3 -m http.server $(PORT) --bind 127.0.0.1 >/dev/null 2>&1 &\"]\n  instances: 2\n  env:\n    E2E_TREE: \"{mark}\"\n  listen:\n    - port: {port}\n      address: 127.0.0.1\n      mode: http\n  readiness: {{type: tcp, period: 50ms, timeout: 20s}}\n  shutdown: {{signal: SIGTERM, timeout: 2s}}\n"
    );
    d.write_manifest("bg.yaml", &yaml);
    let app = d.wait_phase("bg", "Available", T);
    let (status, _) = http_get(local(port), "/").unwrap();
    assert_eq!(status, 200);
    let servers = marked(&mark);
    assert_eq!(servers.len(), 2, "one server per worker: {servers:?}");
    let app_now = d.app("bg").unwrap();
    assert_eq!(app_now["restarts"], 0, "{app_now:#}");
    assert_eq!(
        instance_pids(&app),
        instance_pids(&app_now),
        "no worker replaced"
    );
    d.remove_manifest("bg.yaml");
    eventually(T, "bg forgotten", || d.app("bg").is_none().then_some(()));
    let left = marked(&mark);
    assert!(left.is_empty(), "{left:?} outlived their workers");
}

/// Inherit mode, `sh -c "node server.js"` with a server that ignores SIGTERM: after a
/// reload every old process is gone by the time the rollout is done, so no request is
/// answered by old code.
#[test]
fn after_a_reload_no_old_code_answers_in_inherit_mode() {
    let Some(node) = node() else { return };
    let d = Daemon::start();
    let port = free_port();
    let mark = new_mark();
    let _sweep = Sweep(mark.clone());
    let js = d.dir.path().join("server.js");
    std::fs::write(
        &js,
        "process.on('SIGTERM', () => {});\n\
         require('http').createServer((q, s) => s.end(process.env.VERSION + '\\n')).listen({fd: 3});\n",
    )
    .unwrap();
    let line = format!("{} {}; echo shell-done", node.display(), js.display());
    let yaml = |version: &str| {
        inherit_manifest(
            "inh",
            port,
            "2",
            &["sh", "-c", &line],
            &format!("  env:\n    E2E_TREE: \"{mark}\"\n    VERSION: \"{version}\"\n"),
        )
        .replace("timeout: 10s", "timeout: 1s")
    };
    d.write_manifest("inh.yaml", &yaml("old"));
    let before = d.wait_phase("inh", "Available", T);
    eventually(T, "old code answering", || {
        http_get(local(port), "/")
            .ok()
            .filter(|(_, b)| b.trim() == "old")
    });
    d.write_manifest("inh.yaml", &yaml("new"));
    eventually(T, "the new revision rolled out", || {
        d.app("inh").filter(|a| {
            let inst = a["instances"].as_array().unwrap();
            a["phase"] == "Available"
                && a["revision"] != before["revision"]
                && inst.len() == 2
                && inst.iter().all(|i| i["revision"] == a["revision"])
        })
    });
    for _ in 0..20 {
        let (status, body) = http_get(local(port), "/").unwrap();
        assert_eq!((status, body.trim()), (200, "new"), "old code answered");
    }
}

/// SIGTERM to the daemon: it stops every worker's whole tree before it exits.
#[test]
fn daemon_sigterm_leaves_no_worker_process() {
    let Some(node) = node() else { return };
    let mut d = Daemon::start();
    let mark = new_mark();
    let _sweep = Sweep(mark.clone());
    let js = d.dir.path().join("app.js");
    std::fs::write(&js, STUBBORN_JS).unwrap();
    let line = format!(
        "{} {} detach; echo shell-done",
        node.display(),
        js.display()
    );
    let ready = ready_dir(&d, "term");
    d.write_manifest(
        "term.yaml",
        &manifest("term", &["sh", "-c", &line], &mark, &ready, ""),
    );
    d.wait_phase("term", "Available", T);
    eventually(
        T,
        "node and its detached child per worker, ignoring SIGTERM",
        || (stubborn_nodes(&mark, &ready) >= 4).then_some(()),
    );
    let status = d.stop().expect("daemon was running");
    assert!(status.success(), "{status:?}\n{}", d.log());
    let left = marked(&mark);
    assert!(left.is_empty(), "{left:?} outlived the daemon\n{}", d.log());
}

/// The pid of the only child of `parent`.
fn only_child(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(") ")?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
}

/// Zombie children of `parent`.
fn zombie_children(parent: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(") ")?.1.to_string();
                    let mut f = rest.split_whitespace();
                    let state = f.next()?.to_string();
                    let ppid = f.next()?.parse::<i32>().ok()?;
                    Some(state == "Z" && ppid == parent)
                })
                .unwrap_or(false)
        })
        .count()
}

/// As PID 1 (a container's init), every orphan is the daemon's: it reaps them all, so no
/// zombie piles up (issue 18 item 8). Runs the daemon as PID 1 of a new pid namespace;
/// skipped where that is not allowed (not root, no `unshare`).
#[test]
fn as_pid_1_the_daemon_reaps_every_orphan() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIP as_pid_1_the_daemon_reaps_every_orphan: cannot create a pid namespace here"
        );
        return;
    }
    let mut d =
        Daemon::start_under(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]);
    let daemon = eventually(T, "the daemon under unshare", || only_child(d.pid()));
    let nspid = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap();
    assert!(
        nspid
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "the daemon is PID 1 in its namespace: {nspid}"
    );
    let done = d.dir.path().join("orphans-done");
    // 30 orphans: each subshell exits at once, leaving its sleep to PID 1.
    let script = format!(
        "for i in $(seq 30); do (sleep 0.01 &); done; touch {}; exec sleep 1000",
        done.display()
    );
    let yaml = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: orphans\nspec:\n  command: [sh, -c, {}]\n  shutdown: {{signal: SIGTERM, timeout: 1s}}\n",
        serde_json::to_string(&script).unwrap()
    );
    d.write_manifest("orphans.yaml", &yaml);
    eventually(T, "30 orphans made", || done.exists().then_some(()));
    eventually(T, "every orphan reaped (no zombie under PID 1)", || {
        (zombie_children(daemon) == 0).then_some(())
    });
    let _ = kill(Pid::from_raw(daemon), Signal::SIGTERM);
    let status = d.stop().expect("running");
    assert!(status.success(), "{status:?}\n{}", d.log());
}

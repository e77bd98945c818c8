//! Issue 16, items 11 to 15: the control socket as an attacker on the same host sees it,
//! and the first hour of a new user (a `$PORT` that no shell expands, a Python worker
//! whose prints never show, logs of several instances read together).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const T: Duration = Duration::from_secs(20);

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `clusterd daemon` with these paths and waits for it to exit on its own (it is
/// expected to refuse to start); kills it and fails when it does not.
fn daemon_refuses(dir: &Path, socket: &Path) -> String {
    let mut child = Command::new(clusterd_bin())
        .args(["daemon", "--apps-dir"])
        .arg(dir.join("apps"))
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(!status.success(), "daemon started: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A socket directory that another user owns, or that anyone may write to, is refused:
/// a squatter could otherwise answer `clusterd status` with its own socket.
#[test]
fn unsafe_socket_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let err = daemon_refuses(tmp.path(), &foreign.join("clusterd.sock"));
    assert!(
        err.contains("refusing the socket directory") && err.contains("belongs to user 65534"),
        "{err}"
    );

    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = daemon_refuses(tmp.path(), &open.join("clusterd.sock"));
    assert!(err.contains("anyone may write to it (mode 777)"), "{err}");
}

/// A missing socket directory is created 0700, and the socket is put in place by a
/// rename, already 0600: it is never created in place under the daemon's umask.
#[test]
fn control_socket_appears_with_its_final_mode() {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut d = Daemon::start();
    d.stop();
    let sock_dir = d.dir.path().join("run/clusterd");
    d.socket = sock_dir.join("clusterd.sock");
    d.spawn();
    let meta = std::fs::metadata(&sock_dir).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700, "socket directory mode");
    d.stop();
    let _ = std::fs::remove_file(&d.socket);
    // Now watch the (existing) directory while the daemon binds again.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx).unwrap();
    watcher
        .watch(&sock_dir, RecursiveMode::NonRecursive)
        .unwrap();
    d.spawn();
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    let sock_events: Vec<EventKind> = eventually(T, "the socket's events", || {
        let all: Vec<notify::Event> = rx.try_iter().filter_map(Result::ok).collect();
        let mine: Vec<EventKind> = all
            .into_iter()
            .filter(|e| e.paths.iter().any(|p| p == &d.socket))
            .map(|e| e.kind)
            .collect();
        (!mine.is_empty()).then_some(mine)
    });
    assert!(
        !sock_events
            .iter()
            .any(|k| matches!(k, EventKind::Create(_))),
        "the socket was created in place (with the umask's mode until a chmod): {sock_events:?}"
    );
}

/// A control connection that never finishes its request is closed, and idle connections
/// cannot take more than a bounded number of the daemon's descriptors.
#[test]
fn control_connections_have_a_header_timeout_and_a_cap() {
    let d = Daemon::start_env(&[("CLUSTERD_CONTROL_HEADER_TIMEOUT", "300ms")]);
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    slow.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(T)).unwrap();
    let mut buf = Vec::new();
    // Closed (EOF), possibly after a 408: never left hanging until our read timeout.
    let r = slow.read_to_end(&mut buf);
    assert!(r.is_ok(), "the half-sent request was left open: {r:?}");

    let d = Daemon::start_env(&[("CLUSTERD_CONTROL_HEADER_TIMEOUT", "60s")]);
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let base = fds(d.pid());
    let mut idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // (`base` may count a connection of the harness that is about to close: a margin.)
    eventually(T, "the daemon to accept up to its cap", || {
        (fds(d.pid()) >= base + 60).then_some(())
    });
    let mut probe = UnixStream::connect(&d.socket).unwrap();
    probe
        .write_all(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Free every idle connection: the probe, queued behind them, is then served.
    idle.drain(..40);
    probe.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    probe.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let now = fds(d.pid());
    assert!(
        now <= base + 64 + 4,
        "the daemon holds {} control connections (cap 64)",
        now - base
    );
}

/// A CLI user the socket refuses is told so, not asked whether the daemon runs.
#[test]
fn cli_says_permission_denied() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("clusterd.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(clusterd_bin());
        c
    } else {
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
        Command::new(clusterd_bin())
    };
    let out = cmd
        .arg("status")
        .env("CLUSTERD_SOCKET", &socket)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("permission denied on"), "{err}");
    assert!(!err.contains("is the daemon running"), "{err}");
}

/// `$PORT` in an argv is a warning (with the fix), and warnings alone exit 0.
#[test]
fn validate_warns_about_shell_variables_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("web.yaml");
    std::fs::write(
        &file,
        "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec:\n  command: [python3, -m, http.server, $PORT]\n  listen: [{port: 8080}]\n",
    )
    .unwrap();
    let out = Command::new(clusterd_bin())
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!(
            "{}:5:39: warning: `$PORT` is passed to the program as written: no shell runs the command, so nothing expands it (expected `$(PORT)`, which clusterd replaces with the worker's PORT)\n",
            file.display()
        )
    );
}

/// A Python worker's prints reach `clusterd logs` while it runs, even when the daemon's
/// own environment would leave Python's stdout block-buffered.
#[test]
fn python_prints_show_while_the_worker_runs() {
    let d = Daemon::start_env(&[("PYTHONUNBUFFERED", "")]);
    d.write_manifest(
        "py.yaml",
        "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: py}\nspec:\n  command: [python3, -c, \"import time\\nprint('hello from python')\\ntime.sleep(600)\"]\n  shutdown: {signal: SIGKILL, timeout: 1s}\n",
    );
    d.wait_phase("py", "Available", T);
    eventually(T, "the print in `clusterd logs`", || {
        let (out, _) = text(&d.cli(&["logs", "py"]));
        out.contains("hello from python").then_some(())
    });
}

fn untimed(line: &str) -> &str {
    clusterd_runtime::logs::split_timestamp(line).map_or(line, |(_, rest)| rest)
}

fn shown_with_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 25 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z' && b[24] == b' '
}

/// `clusterd logs APP` merges the instances in time order, with the time and the
/// instance on each line; `--instance N` shows one; `-f` follows all of them.
#[test]
fn logs_merge_instances_in_time_order() {
    let d = Daemon::start();
    let flags = d.dir.path().join("flags");
    std::fs::create_dir(&flags).unwrap();
    // Instance 0 says `first`, instance 1 answers `second`, then instance 0 `third`: the
    // order of the conversation, not of the files.
    let script = format!(
        "f={}; w() {{ while [ ! -e $f/$1 ]; do sleep 0.02; done; }}; \
         if [ $CLUSTERD_INSTANCE = 0 ]; then echo first; touch $f/a; w b; echo third; touch $f/c; \
         else w a; echo second; touch $f/b; fi; w more; while :; do echo more $CLUSTERD_INSTANCE; sleep 0.1; done",
        flags.display()
    );
    d.write_manifest(
        "talk.yaml",
        &format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata: {{name: talk}}\nspec:\n  command: [sh, -c, {script:?}]\n  instances: 2\n  shutdown: {{signal: SIGKILL, timeout: 1s}}\n"
        ),
    );
    d.wait_phase("talk", "Available", T);
    eventually(T, "instance 0's third line", || {
        flags.join("c").exists().then_some(())
    });
    let lines = eventually(T, "all three lines in the logs", || {
        let (out, _) = text(&d.cli(&["logs", "talk"]));
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        (lines.len() == 3).then_some(lines)
    });
    assert!(lines.iter().all(|l| shown_with_time(l)), "{lines:?}");
    let plain: Vec<&str> = lines.iter().map(|l| untimed_shown(l)).collect();
    assert_eq!(
        plain,
        ["talk[0] first", "talk[1] second", "talk[0] third"],
        "{lines:?}"
    );
    let (one, _) = text(&d.cli(&["logs", "talk", "--instance", "1"]));
    let one: Vec<&str> = one.lines().map(untimed_shown).collect();
    assert_eq!(one, ["talk[1] second"]);

    let mut follow = Command::new(clusterd_bin())
        .args(["logs", "talk", "-f", "--tail", "0"])
        .env("CLUSTERD_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !(seen.contains("talk[0] more 0") && seen.contains("talk[1] more 1")) {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    // The workers now repeat a line: whenever `-f` starts watching, it sees new ones.
    std::fs::write(flags.join("more"), "").unwrap();
    let deadline = Instant::now() + T;
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let seen = reader.join().unwrap();
    assert!(
        seen.contains("talk[0] more 0") && seen.contains("talk[1] more 1"),
        "{seen}"
    );
}

/// `2026-12-01T17:05:03.123Z talk[0] first` -> `talk[0] first`.
fn untimed_shown(line: &str) -> &str {
    if shown_with_time(line) {
        &line[25..]
    } else {
        untimed(line)
    }
}

//! The process layer against real processes: the inherited socket protocol, readiness
//! channels, logs, signals and exit reasons, errors before exec, /proc numbers.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;

use clusterd_core::plan::AppName;
use clusterd_runtime::listener::BoundListener;
use clusterd_runtime::notify::{NotifySocket, WorkerMessage};
use clusterd_runtime::spawn::{adopt, spawn_worker, ExitReason, InheritedListener};
use clusterd_runtime::{logs, procfs, Error};
use common::*;
use nix::sys::signal::Signal;

fn kv(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A python worker reports what it inherited; LISTEN_PID must be its own pid, fd 3 a
/// blocking listening socket, and nothing else leaked.
#[tokio::test]
async fn inherited_socket_protocol_as_seen_by_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let script = r#"
import os, socket
s = socket.socket(fileno=3)
print("pid=%d" % os.getpid())
for k in ["LISTEN_PID","LISTEN_FDS","LISTEN_FDNAMES","CLUSTERD_APP","CLUSTERD_INSTANCE","CLUSTERD_REVISION","PORT","NOTIFY_SOCKET"]:
    print("%s=%s" % (k, os.environ.get(k)))
print("blocking=%s" % os.get_blocking(3))
print("listening=%s" % s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
print("port=%d" % s.getsockname()[1])
print("fds=%s" % ",".join(sorted(os.listdir("/proc/self/fd"), key=int)))
for f in sorted(os.listdir("/proc/self/fd"), key=int):
    try: print("fd%s -> %s" % (f, os.readlink("/proc/self/fd/" + f)))
    except OSError: pass
s.detach()
"#;
    // Not through a pyenv shim: its bash wrapper leaks descriptors of its own.
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut spec = spec(2, &[python, "-c", script]);
    spec.listeners.push(InheritedListener {
        name: "http".into(),
        fd: l.inherit_fd().unwrap(),
    });
    spec.extra_env.insert("PORT".into(), "1234".into());
    spec.env
        .insert("CLUSTERD_INSTANCE".into(), "spoofed".into());
    spec.log_dir = Some(dir.path().to_path_buf());
    let w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let log = std::fs::read_to_string(w.log_path.unwrap()).unwrap();
    let v = kv(&log);
    assert_eq!(v["pid"], w.process.pid().to_string(), "{log}");
    assert_eq!(v["LISTEN_PID"], v["pid"], "{log}");
    assert_eq!(v["LISTEN_FDS"], "1");
    assert_eq!(v["LISTEN_FDNAMES"], "http");
    assert_eq!(v["CLUSTERD_APP"], "t");
    assert_eq!(
        v["CLUSTERD_INSTANCE"], "2",
        "the daemon's value wins over the manifest's"
    );
    assert_eq!(v["CLUSTERD_REVISION"], "rev1");
    assert_eq!(v["PORT"], "1234");
    assert_eq!(v["NOTIFY_SOCKET"], "None");
    assert_eq!(v["blocking"], "True");
    assert_eq!(v["listening"], "1");
    assert_eq!(v["port"], l.local_addr().port().to_string());
    // 0-2 stdio, 3 the listener, and the one fd listdir itself opens.
    assert_eq!(v["fds"].split(',').count(), 5, "leaked descriptors: {log}");
    assert!(
        !l.is_nonblocking().unwrap(),
        "the daemon's copy must stay blocking"
    );
}

/// demo-server takes fd 3 through listenfd (which checks LISTEN_PID), says READY=1 over
/// the notify socket, serves, and drains on SIGTERM with exit code 0.
#[tokio::test]
async fn demo_server_on_inherited_fd_with_notify() {
    let dir = tempfile::tempdir().unwrap();
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let notify = NotifySocket::bind(&dir.path().join("notify.sock")).unwrap();
    let demo = demo_server();
    let mut spec = spec(0, &[demo.to_str().unwrap()]);
    spec.listeners.push(InheritedListener {
        name: "http".into(),
        fd: l.inherit_fd().unwrap(),
    });
    spec.notify_socket = Some(notify.path().to_path_buf());
    spec.log_dir = Some(dir.path().to_path_buf());
    let w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    let reports = within("READY=1", notify.recv()).await.unwrap();
    assert_eq!(reports[0].pgid, w.process.pid());
    assert_eq!(reports[0].message, WorkerMessage::Ready);
    let addr = l.local_addr();
    let body = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .unwrap();
    assert!(
        body.contains(&format!("pid {} instance 0", w.process.pid())),
        "{body}"
    );
    w.process.signal(Signal::SIGTERM).unwrap();
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
}

/// Only workers may speak on the notify socket: a process that is not a worker of this
/// daemon is ignored even though it can reach the socket.
#[tokio::test]
async fn notify_accepts_workers_and_ignores_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notify = NotifySocket::bind(&path).unwrap();
    let send = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(sys.argv[1].encode(), os.environ["NOTIFY_SOCKET"])
print("sent", flush=True)
time.sleep(60)
"#;
    // A stranger in the test's own process group, alive while we read.
    let mut stranger = std::process::Command::new("python3")
        .args(["-c", send, "READY=1\nSTATUS=stranger"])
        .env("NOTIFY_SOCKET", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = stranger.stdout.take().unwrap();
    let _sg = ChildGuard(stranger);
    let mut line = String::new();
    tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    let mut spec = spec(1, &["python3", "-c", send, "READY=1\nSTATUS=worker"]);
    spec.notify_socket = Some(path.clone());
    let w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    // Datagrams are read in order: had the stranger's been accepted, it would come first.
    let reports = within("worker READY=1", notify.recv()).await.unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.pgid == w.process.pid()));
    assert_eq!(reports[1].message, WorkerMessage::Status("worker".into()));
}

/// An unmodified Node app's `process.send('ready')` arrives through NODE_CHANNEL_FD.
#[tokio::test]
async fn ipc_ready_from_real_node() {
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut spec = spec(
        0,
        &[
            "node",
            "-e",
            "process.send({hello: 1}); process.send('ready'); setInterval(() => {}, 1000)",
        ],
    );
    // A listener too, so the channel fd is not 3.
    spec.listeners.push(InheritedListener {
        name: "http".into(),
        fd: l.inherit_fd().unwrap(),
    });
    spec.ipc = true;
    let mut w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    let ch = w.ipc.as_mut().unwrap();
    use clusterd_runtime::ipc::IpcMessage;
    let first = within("ipc message", ch.recv()).await.unwrap();
    assert_eq!(
        first,
        Some(IpcMessage::Other(serde_json::json!({"hello": 1})))
    );
    assert_eq!(
        within("ipc ready", ch.recv()).await.unwrap(),
        Some(IpcMessage::Ready)
    );
    // SIGINT still ends node (the IPC channel must not keep it alive).
    w.process.signal(Signal::SIGINT).unwrap();
    assert_eq!(
        within("exit", w.process.wait()).await,
        ExitReason::Signal(libc::SIGINT)
    );
}

/// A worker's output goes to its log, which rotates by size while the worker keeps
/// writing to the same (truncated) file.
#[tokio::test]
async fn logs_rotate_under_a_live_worker() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = r#"
import os, sys, time
for i in range(2000):
    print("out line %d %s" % (i, "x" * 60))
    sys.stderr.write("err line %d\n" % i)
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("after rotation", flush=True)
"#;
    let mut spec = spec(3, &["python3", "-u", "-c", script, go.to_str().unwrap()]);
    spec.log_dir = Some(dir.path().to_path_buf());
    let w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    let path = w.log_path.clone().unwrap();
    assert_eq!(path, logs::instance_log_path(dir.path(), "t", 3));
    wait_until("first batch", || {
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > 100_000
    })
    .await;
    wait_until("last line", || {
        logs::tail(&path, 1)
            .unwrap()
            .first()
            .is_some_and(|l| l.starts_with("err line 1999"))
    })
    .await;
    let policy = logs::LogPolicy {
        max_size: 64 * 1024,
        max_files: 2,
    };
    assert_eq!(logs::rotate_app(dir.path(), "t", policy).unwrap(), 1);
    std::fs::write(&go, "").unwrap();
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "after rotation\n");
    let rotated = std::fs::read_to_string(logs::rotated_path(&path, 1)).unwrap();
    assert!(rotated.contains("out line 0 ") && rotated.contains("err line 1999"));
    let tail = logs::tail(&path, 2).unwrap();
    assert_eq!(
        tail,
        vec!["err line 1999".to_string(), "after rotation".to_string()]
    );
}

/// A signal reaches the whole group, grandchildren included, and the exit reason says
/// which signal ended the leader.
#[tokio::test]
async fn group_signal_reaches_grandchildren() {
    let w = spawn_worker(spec(0, &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]))
        .await
        .unwrap();
    let _g = Guard(w.process.clone());
    let pgid = w.process.pid();
    wait_until("three processes", || procfs::group_members(pgid).len() >= 3).await;
    let stat = procfs::stat(pgid).unwrap();
    assert_eq!((stat.pgid, stat.sid), (pgid, pgid), "own group and session");
    assert!(w.process.signal(Signal::SIGTERM).unwrap());
    assert_eq!(
        within("exit", w.process.wait()).await,
        ExitReason::Signal(libc::SIGTERM)
    );
    wait_until("group empty", || procfs::group_members(pgid).is_empty()).await;
    assert!(
        !w.process.signal(Signal::SIGKILL).unwrap(),
        "nothing left to signal"
    );
}

/// A leader that exits early leaves its children: the worker is not over while they
/// run, and killing it takes them.
#[tokio::test]
async fn leftover_group_members_keep_the_worker_until_killed() {
    let w = spawn_worker(spec(0, &["sh", "-c", "sleep 1000 & exit 0"]))
        .await
        .unwrap();
    let _g = Guard(w.process.clone());
    let pgid = w.process.pid();
    wait_until("leader reaped, orphan visible", || {
        procfs::stat(pgid).is_none() && !procfs::group_members(pgid).is_empty()
    })
    .await;
    assert_eq!(w.process.exit_reason(), None, "not over while sleep runs");
    assert!(w.process.kill().unwrap());
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    assert!(procfs::group_members(pgid).is_empty());
}

#[tokio::test]
async fn exit_reasons() {
    let a = spawn_worker(spec(0, &["sh", "-c", "exit 3"]))
        .await
        .unwrap();
    let b = spawn_worker(spec(1, &["sh", "-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!(within("exit", a.process.wait()).await, ExitReason::Code(3));
    assert_eq!(
        within("exit", b.process.wait()).await,
        ExitReason::Signal(libc::SIGKILL)
    );
    assert_eq!(b.process.exit_reason(), Some(ExitReason::Signal(9)));
    assert_eq!(ExitReason::Signal(9).to_string(), "killed by SIGKILL");
}

/// Errors before exec come back as a readable message, and also land in the log.
#[tokio::test]
async fn setup_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(0, &["no-such-program-for-clusterd", "--flag"]);
    s.log_dir = Some(dir.path().to_path_buf());
    let err = spawn_worker(s).await.unwrap_err();
    assert!(matches!(err, Error::WorkerStart { .. }));
    let msg = err.to_string();
    assert_eq!(
        msg,
        "worker t-0 failed to start: exec of `no-such-program-for-clusterd` failed: No such file or directory"
    );
    let log = std::fs::read_to_string(logs::instance_log_path(dir.path(), "t", 0)).unwrap();
    assert!(
        log.contains("exec of `no-such-program-for-clusterd` failed"),
        "{log}"
    );

    let mut s = spec(1, &["true"]);
    s.cwd = Some("/nonexistent/clusterd".into());
    let msg = spawn_worker(s).await.unwrap_err().to_string();
    assert!(
        msg.contains("chdir to `/nonexistent/clusterd` failed: No such file or directory"),
        "{msg}"
    );

    let mut s = spec(2, &["true"]);
    s.user = Some("no-such-user-clusterd".into());
    let msg = spawn_worker(s).await.unwrap_err().to_string();
    assert!(
        msg.contains("user `no-such-user-clusterd` does not exist"),
        "{msg}"
    );
}

/// rlimits are applied, and as root `user:` switches uid, gid and HOME.
#[tokio::test]
async fn rlimits_and_user_switch() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, resource; print('nofile=%d' % resource.getrlimit(resource.RLIMIT_NOFILE)[0]); print('uid=%d' % os.getuid()); print('home=%s' % os.environ.get('HOME'))";
    let mut s = spec(0, &["python3", "-c", script]);
    s.rlimits.nofile = Some(1234);
    s.log_dir = Some(dir.path().to_path_buf());
    let root = nix::unistd::geteuid().is_root();
    let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
    if root {
        if let Some(n) = &nobody {
            s.user = Some(n.name.clone());
        }
    }
    let w = spawn_worker(s).await.unwrap();
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let log = std::fs::read_to_string(w.log_path.unwrap()).unwrap();
    let v = kv(&log);
    assert_eq!(v["nofile"], "1234", "{log}");
    if let (true, Some(n)) = (root, nobody) {
        assert_eq!(v["uid"], n.uid.to_string(), "{log}");
        assert_eq!(v["home"], n.dir.display().to_string(), "{log}");
    }
}

/// /proc numbers of a group are plausible, and adoption checks the start time.
#[tokio::test]
async fn procfs_numbers_and_adoption() {
    let script = "b = bytearray(48 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time\nx = 0\nfor i in range(2_000_000): x += i\nprint('ready', flush=True)\ntime.sleep(600)";
    let w = spawn_worker(spec(0, &["python3", "-c", script]))
        .await
        .unwrap();
    let _g = Guard(w.process.clone());
    let pid = w.process.pid();
    wait_until("48 MiB resident", || {
        procfs::group_usage(pid).rss_bytes >= 48 << 20
    })
    .await;
    let before = procfs::group_usage(pid);
    assert_eq!(before.processes, 1);
    assert!(before.rss_bytes < 1 << 30, "{before:?}");
    wait_until("cpu time", || procfs::group_usage(pid).cpu_ticks > 0).await;
    assert_eq!(procfs::start_time(pid), Some(w.process.start_time()));

    let app = AppName("t".into());
    let err = adopt(&app, 0, pid, w.process.start_time() + 1).unwrap_err();
    assert!(matches!(err, Error::NotAdoptable { .. }), "{err}");
    let adopted = adopt(&app, 0, pid, w.process.start_time()).unwrap();
    assert_eq!(adopted.pid(), pid);
    adopted.signal(Signal::SIGKILL).unwrap();
    // Here the adopted pid is our own child, so both handles race to reap it: one gets
    // the status, the other sees it gone.
    let a = within("exit", w.process.wait()).await;
    let b = within("adopted exit", adopted.wait()).await;
    let mut got = [a, b];
    got.sort_by_key(|r| matches!(r, ExitReason::Unknown));
    assert_eq!(
        got,
        [ExitReason::Signal(libc::SIGKILL), ExitReason::Unknown]
    );
    assert!(
        adopt(&app, 0, pid, w.process.start_time()).is_err(),
        "a dead pid is not adopted"
    );
}

#[tokio::test]
async fn udp_listener_is_inherited_too() {
    let dir = tempfile::tempdir().unwrap();
    let l = BoundListener::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let script = "import socket\ns = socket.socket(fileno=3)\nprint('type=%d' % s.type)\ndata, peer = s.recvfrom(100)\nprint('got=%s' % data.decode(), flush=True)\ns.detach()";
    let mut s = spec(0, &["python3", "-c", script]);
    s.listeners.push(InheritedListener {
        name: "dns".into(),
        fd: l.inherit_fd().unwrap(),
    });
    s.log_dir = Some(dir.path().to_path_buf());
    let w = spawn_worker(s).await.unwrap();
    let _g = Guard(w.process.clone());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let path = w.log_path.clone().unwrap();
    wait_until("worker started", || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("type="))
    })
    .await;
    sock.send_to(b"hello", l.local_addr()).unwrap();
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("got=hello"), "{log}");
}

/// A Python worker's print shows up in its log while it runs (stdout is a file, which
/// Python block-buffers unless PYTHONUNBUFFERED is set), and the manifest can turn the
/// default off.
#[tokio::test]
async fn python_output_reaches_the_log_while_the_worker_runs() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, time\nprint('unbuffered=%r' % os.environ.get('PYTHONUNBUFFERED'))\ntime.sleep(60)\n";
    let mut s = spec(0, &["python3", "-c", script]);
    s.log_dir = Some(dir.path().to_path_buf());
    s.log_timestamps = true;
    let w = spawn_worker(s).await.unwrap();
    let _g = Guard(w.process.clone());
    let log = w.log_path.clone().unwrap();
    wait_until("the print in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("unbuffered='1'"))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let (_, line) = logs::split_timestamp(text.lines().next().unwrap()).expect("a timestamp");
    assert_eq!(line, "unbuffered='1'");
    w.process.kill().unwrap();

    let mut s = spec(
        1,
        &[
            "python3",
            "-c",
            "import os\nprint('unbuffered=%r' % os.environ.get('PYTHONUNBUFFERED'))",
        ],
    );
    s.log_dir = Some(dir.path().to_path_buf());
    s.env.insert("PYTHONUNBUFFERED".into(), String::new());
    let w = spawn_worker(s).await.unwrap();
    let _g = Guard(w.process.clone());
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let text = std::fs::read_to_string(w.log_path.unwrap()).unwrap();
    assert!(text.contains("unbuffered=''"), "{text}");
}

/// With the timestamper: every line (stdout and stderr) is stamped, the worker's output
/// survives its graceful stop signal (the timestamper ignores it), rotation still works
/// (copytruncate: the timestamper writes O_APPEND), and the timestamper is gone once the
/// worker and its output are.
#[tokio::test]
async fn timestamped_logs_rotate_and_end_with_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = format!(
        "trap 'echo bye; exit 0' TERM; echo one; echo two >&2; while [ ! -e {} ]; do sleep 0.02; done; echo three; while :; do sleep 0.02; done",
        go.display()
    );
    let mut s = spec(4, &["sh", "-c", &script]);
    s.log_dir = Some(dir.path().to_path_buf());
    s.log_timestamps = true;
    let w = spawn_worker(s).await.unwrap();
    let _g = Guard(w.process.clone());
    let path = w.log_path.clone().unwrap();
    let lines = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| logs::split_timestamp(l).expect("stamped").1.to_string())
            .collect()
    };
    wait_until("two lines", || lines(&path).len() == 2).await;
    assert_eq!(lines(&path), ["one", "two"]);
    let policy = logs::LogPolicy {
        max_size: 1,
        max_files: 1,
    };
    assert_eq!(logs::rotate_app(dir.path(), "t", policy).unwrap(), 1);
    std::fs::write(&go, "").unwrap();
    wait_until("the line after rotation", || lines(&path) == ["three"]).await;
    assert_eq!(lines(&logs::rotated_path(&path, 1)), ["one", "two"]);
    // The group gets the stop signal: the worker's last words still reach the log.
    let pgid = w.process.pid();
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGTERM).unwrap();
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    // (sh may also report its killed `sleep` as "Terminated".)
    wait_until("bye", || {
        let l = lines(&path);
        l.first().is_some_and(|f| f == "three") && l.last().is_some_and(|b| b == "bye")
    })
    .await;
    wait_until("the timestamper to exit", || {
        std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|st| {
                    let rest = st.rsplit_once(") ")?.1.to_string();
                    rest.split(' ').nth(2).map(|g| g != pgid.to_string())
                })
                .unwrap_or(true)
        })
    })
    .await;
}

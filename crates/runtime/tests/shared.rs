//! Shared listener mode against real, unmodified servers: each worker binds `PORT` itself,
//! the bind is answered with the daemon's socket, and every worker takes connections (or
//! datagrams) from that one socket.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use clusterd_runtime::listener::{BoundListener, Protocol};
use clusterd_runtime::seccomp::{BindEvent, Peers, SharedBind, SharedListener};
use clusterd_runtime::spawn::{spawn_worker, ExitReason, SpawnedWorker};
use common::*;

/// New connections (or datagrams) sent to count which workers answer.
const REQUESTS: usize = 200;

type Events = Arc<Mutex<Vec<BindEvent>>>;

struct Worker {
    spawned: SpawnedWorker,
    bind: SharedBind,
    _guard: Guard,
}

/// Starts one shared-mode worker on `listeners` with `PORT` = the first one's port, the
/// way the daemon's spawn path does.
async fn start(
    index: u32,
    argv: &[&str],
    listeners: &[&BoundListener],
    cwd: Option<&std::path::Path>,
    events: &Events,
) -> Worker {
    start_among(index, argv, listeners, cwd, events, Peers::new()).await
}

/// [`start`], counted among `peers` (one app's workers).
async fn start_among(
    index: u32,
    argv: &[&str],
    listeners: &[&BoundListener],
    cwd: Option<&std::path::Path>,
    events: &Events,
    peers: Arc<Peers>,
) -> Worker {
    let mut spec = spec(index, argv);
    spec.shared_bind = true;
    spec.extra_env
        .insert("PORT".into(), listeners[0].local_addr().port().to_string());
    spec.cwd = cwd.map(std::path::Path::to_path_buf);
    let mut spawned = spawn_worker(spec).await.unwrap();
    let guard = Guard(spawned.process.clone());
    let notif = spawned.seccomp_notif.take().expect("notification fd");
    let shared = listeners
        .iter()
        .map(|l| SharedListener {
            addr: l.local_addr(),
            protocol: l.protocol(),
            fd: l.inherit_fd().unwrap(),
        })
        .collect();
    let sink = Arc::clone(events);
    let bind = SharedBind::start_among(notif, shared, peers, false, move |e| {
        sink.lock().unwrap().push(e);
    })
    .unwrap();
    Worker {
        spawned,
        bind,
        _guard: guard,
    }
}

/// Waits until every worker's bind was answered (readiness `bind`).
async fn all_bound(workers: &[Worker]) {
    for w in workers {
        let ev = within("bind", w.bind.first_bind()).await;
        assert!(ev.is_some(), "worker exited without binding");
    }
}

/// Rounds of `REQUESTS` new connections from 8 client threads until `want` answers (pids
/// or names) were all seen, at most 5 rounds: a worker that was answered its bind but not
/// yet scheduled to accept may miss the first round on a busy machine. Returns what was
/// seen.
fn answers_until(
    want: &BTreeSet<String>,
    one: impl Fn() -> String + Send + Sync + 'static,
) -> BTreeSet<String> {
    let one = Arc::new(one);
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let one = Arc::clone(&one);
                std::thread::spawn(move || (0..REQUESTS / 8).map(|_| one()).collect::<Vec<_>>())
            })
            .collect();
        seen.extend(threads.into_iter().flat_map(|t| t.join().unwrap()));
        if seen.is_superset(want) {
            break;
        }
    }
    seen
}

/// One HTTP GET over a new connection; the body.
fn http_body(addr: SocketAddr, path: &str) -> String {
    let resp = http_get(addr, path);
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 "),
        "{resp}"
    );
    resp.rsplit("\r\n\r\n").next().unwrap().trim().to_string()
}

fn pids(workers: &[Worker]) -> BTreeSet<String> {
    workers
        .iter()
        .map(|w| w.spawned.process.pid().to_string())
        .collect()
}

fn python() -> &'static str {
    // Not through a pyenv shim: its bash wrapper is an extra process per worker.
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Node's `http.createServer().listen(process.env.PORT)` binds `::` dual-stack; three such
/// workers share the daemon's IPv4 socket and all of them answer.
#[tokio::test]
async fn node_listen_port_workers_share_one_socket() {
    if !tool_exists("node") {
        return;
    }
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let app = "require('http').createServer((q, s) => { s.setHeader('connection', 'close'); s.end(String(process.pid)); }).listen(process.env.PORT);";
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start(i, &["node", "-e", app], &[&l], None, &events).await);
    }
    all_bound(&workers).await;
    for w in &workers {
        let ev = w.bind.bound().unwrap();
        assert_eq!(ev.pid, w.spawned.process.pid());
        assert_eq!(ev.addr, l.local_addr());
        assert_eq!(ev.listener, 0);
        assert_eq!(
            ev.requested,
            SocketAddr::new("::".parse().unwrap(), l.local_addr().port()),
            "node binds :: dual-stack"
        );
    }
    let addr = l.local_addr();
    let want = pids(&workers);
    let w2 = want.clone();
    let seen =
        tokio::task::spawn_blocking(move || answers_until(&w2, move || http_body(addr, "/")))
            .await
            .unwrap();
    assert_eq!(
        seen, want,
        "every worker took connections, and only workers did"
    );
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .all(|e| matches!(e, BindEvent::Bound(_))),
        "{:?}",
        events.lock().unwrap()
    );
}

/// `python3 -m http.server $PORT` unmodified (blocking sockets, listen(5)): each worker
/// serves its own directory, whose `who` file names it.
#[tokio::test]
async fn python_http_server_workers_share_one_socket() {
    let dir = tempfile::tempdir().unwrap();
    let l = BoundListener::bind_tcp("0.0.0.0:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let port = l.local_addr().port().to_string();
    let mut workers = Vec::new();
    for i in 0..3 {
        let wd = dir.path().join(format!("w{i}"));
        std::fs::create_dir(&wd).unwrap();
        std::fs::write(wd.join("who"), format!("worker{i}")).unwrap();
        workers.push(
            start(
                i,
                &[python(), "-m", "http.server", &port],
                &[&l],
                Some(&wd),
                &events,
            )
            .await,
        );
    }
    all_bound(&workers).await;
    assert!(
        !l.is_nonblocking().unwrap(),
        "python asked for a blocking socket"
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let want: BTreeSet<String> = (0..3).map(|i| format!("worker{i}")).collect();
    let w2 = want.clone();
    let seen =
        tokio::task::spawn_blocking(move || answers_until(&w2, move || http_body(addr, "/who")))
            .await
            .unwrap();
    assert_eq!(seen, want, "every worker took connections");
}

/// UDP: workers bind `PORT` with a datagram socket and answer with their pid; all of
/// them receive from the one shared socket. Each answer takes a few milliseconds, so with
/// 8 clients in flight no worker can take everything (the kernel wakes one waiting
/// reader per datagram; a worker still starting up must get its turn).
#[tokio::test]
async fn udp_workers_share_one_socket() {
    let l = BoundListener::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let app = r#"
import os, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(os.environ["PORT"])))
while True:
    data, peer = s.recvfrom(100)
    time.sleep(0.005)
    s.sendto(str(os.getpid()).encode(), peer)
"#;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start(i, &[python(), "-c", app], &[&l], None, &events).await);
    }
    all_bound(&workers).await;
    let addr = l.local_addr();
    let want = pids(&workers);
    let w2 = want.clone();
    let seen = tokio::task::spawn_blocking(move || {
        answers_until(&w2, move || {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            c.send_to(b"who", addr).unwrap();
            let mut buf = [0u8; 32];
            let (n, _) = c.recv_from(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    })
    .await
    .unwrap();
    assert_eq!(seen, want, "every worker received datagrams");
}

/// What the app sees: its own fd number now holds the daemon's socket (same inode), bound
/// to the shared port, listening; its listen(5) did not replace the daemon's backlog; a
/// bind of another port runs normally and is reported; the fd keeps the app's flags.
#[tokio::test]
async fn the_app_holds_the_daemon_socket_and_stray_binds_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_port = stray.local_addr().unwrap().port();
    drop(stray); // a port that is free now
    let events: Events = Arc::default();
    let app = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(os.environ["PORT"])))
s.listen(5)
print("fd=%d" % s.fileno())
print("inode=%s" % os.readlink("/proc/self/fd/%d" % s.fileno()))
print("name=%s:%d" % s.getsockname()[:2])
print("cloexec=%s" % (not os.get_inheritable(s.fileno())))
print("listening=%d" % s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
o = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
o.bind(("127.0.0.1", int(sys.argv[1])))
print("stray=%s:%d" % o.getsockname())
sys.stdout.flush()
c, _ = s.accept()
c.sendall(b"hello from %d" % os.getpid())
c.close()
"#;
    let mut spec = spec(0, &[python(), "-c", app, &stray_port.to_string()]);
    spec.shared_bind = true;
    spec.extra_env
        .insert("PORT".into(), l.local_addr().port().to_string());
    spec.log_dir = Some(dir.path().to_path_buf());
    let mut w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    let sink = Arc::clone(&events);
    let bind = SharedBind::start(
        w.seccomp_notif.take().unwrap(),
        vec![SharedListener {
            addr: l.local_addr(),
            protocol: Protocol::Tcp,
            fd: l.inherit_fd().unwrap(),
        }],
        move |e| sink.lock().unwrap().push(e),
    )
    .unwrap();
    within("bind", bind.first_bind()).await.unwrap();
    let addr = l.local_addr();
    let got = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    })
    .await
    .unwrap();
    assert_eq!(got, format!("hello from {}", w.process.pid()));
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let log = std::fs::read_to_string(w.log_path.as_ref().unwrap()).unwrap();
    let daemon_inode = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&l.as_fd())
    ))
    .unwrap();
    assert!(
        log.contains(&format!("inode={}", daemon_inode.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("name=127.0.0.1:{}", addr.port())),
        "{log}"
    );
    assert!(log.contains("cloexec=True"), "{log}");
    assert!(log.contains("listening=1"), "{log}");
    assert!(
        log.contains(&format!("stray=127.0.0.1:{stray_port}")),
        "{log}"
    );
    let events = events.lock().unwrap().clone();
    let strays: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            BindEvent::Stray(s) => Some(s.to_string()),
            BindEvent::Bound(_) => None,
        })
        .collect();
    assert_eq!(
        strays,
        [format!(
            "worker bound 127.0.0.1:{stray_port}/tcp (pid {}), not the shared listener",
            w.process.pid()
        )]
    );
    // listen(5) was a no-op: the daemon's backlog (ss shows it as Send-Q) is intact.
    if let Ok(out) = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().next() {
            let send_q = line.split_whitespace().nth(2).unwrap_or("");
            assert_eq!(
                send_q,
                clusterd_runtime::listener::DEFAULT_BACKLOG.to_string(),
                "{text}"
            );
        }
    }
}

/// An app that never binds: readiness `bind` never fires, and the supervisor ends with
/// the worker.
#[tokio::test]
async fn a_worker_that_never_binds_is_never_bound() {
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let w = start(0, &["true"], &[&l], None, &events).await;
    assert_eq!(
        within("exit", w.spawned.process.wait()).await,
        ExitReason::Code(0)
    );
    assert_eq!(within("supervisor end", w.bind.first_bind()).await, None);
    wait_until("supervisor stopped", || !w.bind.is_running()).await;
}

/// A program that cannot be started in shared mode still reports the exec error.
#[tokio::test]
async fn exec_errors_still_reported_in_shared_mode() {
    let mut spec = spec(0, &["/nonexistent/clusterd-app"]);
    spec.shared_bind = true;
    let e = spawn_worker(spec).await.unwrap_err().to_string();
    assert!(e.contains("No such file or directory"), "{e}");
}

fn tool_exists(name: &str) -> bool {
    let found = clusterd_runtime::shim::program_exists(std::path::Path::new(name));
    if !found {
        assert!(
            std::env::var_os("CLUSTERD_REQUIRE_TOOLS").is_none(),
            "{name} is required in CI"
        );
        eprintln!("skipping: {name} not installed");
    }
    found
}

/// Go's `http.ListenAndServe(":"+PORT)` (net.Listen binds `[::]` dual-stack from any OS
/// thread of the Go runtime, whose preemption signals would restart a waiting bind without
/// WAIT_KILLABLE_RECV): three workers share one socket.
#[tokio::test]
async fn go_listen_and_serve_workers_share_one_socket() {
    if !tool_exists("go") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("main.go");
    std::fs::write(
        &src,
        r#"package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		fmt.Fprint(w, os.Getpid())
	})
	if err := http.ListenAndServe(":"+os.Getenv("PORT"), nil); err != nil {
		panic(err)
	}
}
"#,
    )
    .unwrap();
    let bin = dir.path().join("server");
    let built = tokio::process::Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .current_dir(dir.path())
        .env("GO111MODULE", "off")
        .status()
        .await
        .unwrap();
    assert!(built.success(), "go build failed");
    let l = BoundListener::bind_tcp("0.0.0.0:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start(i, &[bin.to_str().unwrap()], &[&l], None, &events).await);
    }
    all_bound(&workers).await;
    // Go's runtime signals its threads (preemption): on a kernel that has it (5.19+),
    // the filter must wait killably, or a signal during the daemon's answer restarts
    // the bind.
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    let mut v = release.split(|c: char| !c.is_ascii_digit());
    let version: (u32, u32) = (
        v.next().and_then(|x| x.parse().ok()).unwrap_or(0),
        v.next().and_then(|x| x.parse().ok()).unwrap_or(0),
    );
    if version >= (5, 19) {
        for w in &workers {
            assert!(
                w.spawned.seccomp_wait_killable,
                "Linux {release}: the filter must use WAIT_KILLABLE_RECV"
            );
        }
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", l.local_addr().port())
        .parse()
        .unwrap();
    let want = pids(&workers);
    let w2 = want.clone();
    let seen =
        tokio::task::spawn_blocking(move || answers_until(&w2, move || http_body(addr, "/")))
            .await
            .unwrap();
    assert_eq!(seen, want, "every Go worker took connections");
}

/// A rolling replacement under new-connection load loses nothing: old Node workers that
/// drain on SIGTERM (`server.close()`, closing only their copy of the socket) are
/// replaced by new ones, while 4 clients open a new connection per request the whole time.
/// Connections queued on the shared socket are taken by whichever worker accepts next.
#[tokio::test]
async fn replacing_workers_under_load_loses_no_connection() {
    if !tool_exists("node") {
        return;
    }
    let l = BoundListener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let events: Events = Arc::default();
    let app = "const s = require('http').createServer((q, r) => { r.setHeader('connection', 'close'); r.end(String(process.pid)); }).listen(process.env.PORT); process.on('SIGTERM', () => s.close());";
    let mut old = Vec::new();
    for i in 0..2 {
        old.push(start(i, &["node", "-e", app], &[&l], None, &events).await);
    }
    all_bound(&old).await;
    let addr = l.local_addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match try_get(addr) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    // Roll: one new worker up (bound), then one old one drained, twice.
    let mut new = Vec::new();
    for (i, o) in old.iter().enumerate() {
        let w = start(2 + i as u32, &["node", "-e", app], &[&l], None, &events).await;
        within("new bind", w.bind.first_bind()).await.unwrap();
        new.push(w);
        o.spawned
            .process
            .signal(nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        assert_eq!(
            within("drained", o.spawned.process.wait()).await,
            ExitReason::Code(0)
        );
    }
    // Some traffic on the new workers alone, then stop.
    let served_by_new = tokio::task::spawn_blocking(move || http_body(addr, "/"))
        .await
        .unwrap();
    assert!(pids(&new).contains(&served_by_new), "{served_by_new}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    let mut failures = Vec::new();
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        total += ok;
        failures.extend(failed);
    }
    assert!(total > 0);
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        total as usize + failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{total} requests over new connections during the roll, 0 failed");
}

/// One GET over a new connection, errors as text (for counting failures under load).
fn try_get(addr: SocketAddr) -> Result<String, String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.1 200") {
        Ok(out)
    } else {
        Err(format!("bad response: {out:?}"))
    }
}

/// `O_NONBLOCK` is one flag for every worker (one open file description). A worker that
/// binds a blocking socket (as `std::net::TcpListener::bind` and asyncio do before making
/// it non-blocking) must not clear it under running workers' event loops, which would
/// then sleep in `accept()` deaf to their shutdown signal. Alone, a worker gets what it
/// asked for.
#[tokio::test]
async fn a_blocking_bind_keeps_o_nonblocking_while_other_workers_hold_the_socket() {
    let listener = BoundListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        Protocol::Tcp,
        clusterd_runtime::listener::DEFAULT_BACKLOG,
    )
    .unwrap();
    let events: Events = Arc::default();
    let peers = Peers::new();
    let server = |blocking: bool| {
        format!(
            "import os, socket, time\ns = socket.socket()\ns.setblocking({})\ns.bind(('127.0.0.1', int(os.environ['PORT'])))\ns.listen()\ntime.sleep(600)\n",
            if blocking { "True" } else { "False" }
        )
    };
    let (nonblocking, blocking) = (server(false), server(true));
    let a = start_among(
        0,
        &[python(), "-c", &nonblocking],
        &[&listener],
        None,
        &events,
        Arc::clone(&peers),
    )
    .await;
    all_bound(std::slice::from_ref(&a)).await;
    assert!(
        listener.is_nonblocking().unwrap(),
        "a non-blocking bind sets it"
    );
    let b = start_among(
        1,
        &[python(), "-c", &blocking],
        &[&listener],
        None,
        &events,
        Arc::clone(&peers),
    )
    .await;
    all_bound(std::slice::from_ref(&b)).await;
    assert_eq!(peers.count(), 2);
    assert!(
        listener.is_nonblocking().unwrap(),
        "a blocking bind must not clear O_NONBLOCK under another worker"
    );
    drop((a, b));
    assert_eq!(peers.count(), 0, "a dropped supervisor no longer counts");
    let c = start_among(
        2,
        &[python(), "-c", &blocking],
        &[&listener],
        None,
        &events,
        Arc::clone(&peers),
    )
    .await;
    all_bound(std::slice::from_ref(&c)).await;
    assert!(
        !listener.is_nonblocking().unwrap(),
        "alone, a blocking bind gets a blocking socket"
    );
}

//! The e2e harness: a daemon in a temp dir, manifest helpers, CLI calls, waiting for
//! conditions (never bare sleeps), and a load generator that classifies every request.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The clusterd binary under test.
pub fn clusterd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clusterd"))
}

/// The demo-server binary, built on first use (it is another package of the workspace,
/// so cargo does not build it for this test target by itself).
pub fn demo_server() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = clusterd_bin().parent().expect("target dir").to_path_buf();
        let path = dir.join("demo-server");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "demo-server"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build -p demo-server");
        assert!(status.success(), "building demo-server failed");
        assert!(path.exists(), "{} missing after build", path.display());
        path
    })
    .clone()
}

/// A port that was free a moment ago (the tiny race is acceptable in tests: a clash
/// makes the test fail loudly, never pass wrongly).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running daemon in its own temp dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub apps_dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    child: Option<Child>,
    /// Every worker pid ever seen in status, so Drop can kill what is left.
    seen_pids: Arc<Mutex<Vec<i32>>>,
    extra_args: Vec<String>,
    /// Start the daemon in its dir with relative paths (as a user typing them would).
    relative_paths: bool,
    /// Extra environment for the daemon process.
    extra_env: Vec<(String, String)>,
    /// The daemon started by `clusterd upgrade` (not our child): its pid.
    upgraded: Option<i32>,
    /// Daemons that handed over and are exiting (our children), to reap and check.
    retired: Vec<Child>,
    /// Sockets to pass to the next `spawn` the way systemd does (LISTEN_FDS).
    pub listen_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// A command the daemon is started under (e.g. `unshare --pid --fork`).
    wrapper: Vec<String>,
}

impl Daemon {
    /// Starts a daemon with an empty apps dir.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts a daemon with extra arguments (e.g. `--git-repo ...`).
    pub fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let apps_dir = dir.path().join("apps");
        std::fs::create_dir_all(&apps_dir).unwrap();
        let mut d = Daemon {
            socket: dir.path().join("clusterd.sock"),
            state_dir: dir.path().join("state"),
            log_dir: dir.path().join("logs"),
            apps_dir,
            dir,
            child: None,
            seen_pids: Arc::default(),
            extra_args: extra.iter().map(ToString::to_string).collect(),
            relative_paths: false,
            extra_env: Vec::new(),
            upgraded: None,
            retired: Vec::new(),
            listen_fds: Vec::new(),
            wrapper: Vec::new(),
        };
        d.spawn();
        d
    }

    /// Starts a daemon whose working directory is its temp dir and whose `--apps-dir`,
    /// `--socket`, `--state-dir` and `--log-dir` are given as relative paths.
    pub fn start_relative() -> Daemon {
        let mut d = Daemon::start_with(&[]);
        d.stop();
        d.relative_paths = true;
        d.spawn();
        d
    }

    /// Starts a daemon with extra environment (e.g. proxy timeouts).
    pub fn start_env(env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::start_with(&[]);
        d.stop();
        d.extra_env = env
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        d.spawn();
        d
    }

    /// Starts a daemon under `wrapper` (its argv before the clusterd binary), e.g.
    /// `unshare --pid --fork` to run it as PID 1. `pid()` is then the wrapper's.
    pub fn start_under(wrapper: &[&str]) -> Daemon {
        let mut d = Daemon::start_with(&[]);
        d.stop();
        d.wrapper = wrapper.iter().map(ToString::to_string).collect();
        d.spawn();
        d
    }

    /// (Re)starts the daemon process on the same dirs.
    pub fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.dir.path().join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        )))
        .unwrap();
        let listen_fds = std::mem::take(&mut self.listen_fds);
        let mut cmd = if !listen_fds.is_empty() {
            use std::os::fd::AsFd;
            let borrowed: Vec<(String, std::os::fd::BorrowedFd<'_>)> = listen_fds
                .iter()
                .map(|(n, f)| (n.clone(), f.as_fd()))
                .collect();
            clusterd_runtime::handover::systemd_style_command(&clusterd_bin(), &borrowed)
                .expect("systemd-style command")
        } else {
            match self.wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(clusterd_bin());
                    c
                }
                None => Command::new(clusterd_bin()),
            }
        };
        let root = self.dir.path();
        let path = |p: &Path| -> PathBuf {
            if self.relative_paths {
                p.strip_prefix(root).unwrap_or(p).to_path_buf()
            } else {
                p.to_path_buf()
            }
        };
        cmd.arg("daemon")
            .arg("--apps-dir")
            .arg(path(&self.apps_dir))
            .arg("--socket")
            .arg(path(&self.socket))
            .arg("--state-dir")
            .arg(path(&self.state_dir))
            .arg("--log-dir")
            .arg(path(&self.log_dir))
            .args(&self.extra_args)
            .current_dir(root)
            .env("CLUSTERD_LOG", "info,clusterd=debug")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().unwrap())
            .process_group(0);
        self.child = Some(cmd.spawn().expect("start clusterd daemon"));
        let socket = self.socket.clone();
        eventually(
            Duration::from_secs(20),
            "the daemon's control socket",
            || {
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| ())
            },
        );
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.upgraded
            .or_else(|| self.child.as_ref().map(|c| c.id() as i32))
            .expect("daemon running")
    }

    /// Extra environment for the next `spawn`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    /// The pid the daemon reports for itself (`GET /v1/daemon`).
    pub fn reported_pid(&self) -> Option<i32> {
        let info: Value = serde_json::from_str(&api_get(&self.socket, "/v1/daemon")).ok()?;
        info["pid"].as_i64().map(|p| p as i32)
    }

    /// `clusterd upgrade`; on success the harness follows the new daemon (its pid from
    /// the answer) and keeps the old one to reap in [`Daemon::wait_retired`].
    pub fn upgrade(&mut self) -> Output {
        let out = self.cli(&["upgrade"]);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let new_pid: i32 = text
                .split("replaced by pid ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no new pid in {text:?}"));
            self.follow_upgrade(new_pid);
        }
        out
    }

    /// The daemon is now `new_pid` (started by the previous one).
    pub fn follow_upgrade(&mut self, new_pid: i32) {
        if let Some(old) = self.child.take() {
            self.retired.push(old);
        }
        self.upgraded = Some(new_pid);
    }

    /// Waits for every daemon that handed over to exit, and asserts it exited 0.
    pub fn wait_retired(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for mut child in std::mem::take(&mut self.retired) {
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "the old daemon {} did not exit after handing over",
                    child.id()
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(status.success(), "the old daemon exited with {status}");
        }
    }

    /// Everything the daemon wrote to stderr (for assertion messages).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("daemon-") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// Writes a manifest atomically (temp file + rename, like an editor or `apply`).
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.apps_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.apps_dir.join(file)).unwrap();
    }

    /// Deletes a manifest.
    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.apps_dir.join(file)).unwrap();
    }

    /// Runs `clusterd ARGS` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(clusterd_bin())
            .args(args)
            .env("CLUSTERD_SOCKET", &self.socket)
            .output()
            .expect("run clusterd")
    }

    /// `clusterd status -o json`, parsed; remembers worker pids for cleanup.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "-o", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let mut seen = self.seen_pids.lock().unwrap();
        for app in v["apps"].as_array().into_iter().flatten() {
            for i in app["instances"].as_array().into_iter().flatten() {
                if let Some(pid) = i["pid"].as_i64() {
                    if !seen.contains(&(pid as i32)) {
                        seen.push(pid as i32);
                    }
                }
            }
        }
        v
    }

    /// One app's status object, if present.
    pub fn app(&self, name: &str) -> Option<Value> {
        self.status()["apps"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
    }

    /// Waits until `name` is in `phase` and returns its status.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("{name} to be {phase}"), || {
            self.app(name).filter(|a| a["phase"] == phase)
        })
    }

    /// Pids of the app's instances in state Ready, sorted by index.
    pub fn ready_pids(&self, name: &str) -> Vec<i32> {
        let Some(app) = self.app(name) else {
            return Vec::new();
        };
        let mut v: Vec<(u64, i32)> = app["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["state"] == "Ready")
            .filter_map(|i| Some((i["index"].as_u64()?, i["pid"].as_i64()? as i32)))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.upgraded.take() {
            // Not our child: SIGTERM, then wait for the pid to go (SIGKILL at the end).
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) {
                if Instant::now() > deadline {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for mut old in std::mem::take(&mut self.retired) {
                let _ = old.kill();
                let _ = old.wait();
            }
            return None;
        }
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon only (its workers keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(pid) = self.upgraded.take() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            while alive(pid) {
                std::thread::sleep(Duration::from_millis(5));
            }
            return;
        }
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() || self.upgraded.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = self.status();
            }));
            self.stop();
        }
        for pid in self.seen_pids.lock().unwrap().iter() {
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// A blocking HTTP GET with a fresh connection; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Counts of a load run.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub ok: u64,
    pub non2xx: u64,
    pub failed: u64,
    /// Of `failed`: connections the kernel refused (nobody listening).
    pub refused: u64,
    /// First few failures, for the assertion message.
    pub errors: Vec<String>,
}

/// A closed-loop HTTP/1.1 load: `concurrency` clients, each sending GET `path` in a loop,
/// on keep-alive connections (`keepalive`) or a new connection per request.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadStats>>,
    pub sent: Arc<AtomicU64>,
}

impl Load {
    /// Starts the load.
    pub fn start(addr: SocketAddr, path: &str, concurrency: usize, keepalive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..concurrency)
            .map(|_| {
                let stop = stop.clone();
                let sent = sent.clone();
                let path = path.to_string();
                std::thread::spawn(move || client_loop(addr, &path, keepalive, &stop, &sent))
            })
            .collect();
        Load {
            stop,
            threads,
            sent,
        }
    }

    /// Waits until at least `n` more requests were sent (proves the load is flowing).
    pub fn wait_for(&self, n: u64) {
        let start = self.sent.load(Ordering::Relaxed);
        eventually(Duration::from_secs(30), "load to flow", || {
            (self.sent.load(Ordering::Relaxed) >= start + n).then_some(())
        });
    }

    /// Stops and sums up.
    pub fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.threads {
            let s = t.join().unwrap();
            total.ok += s.ok;
            total.non2xx += s.non2xx;
            total.failed += s.failed;
            total.refused += s.refused;
            for e in s.errors {
                if total.errors.len() < 10 {
                    total.errors.push(e);
                }
            }
        }
        total
    }
}

fn client_loop(
    addr: SocketAddr,
    path: &str,
    keepalive: bool,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> LoadStats {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stats = LoadStats::default();
    let mut conn: Option<BufReader<std::net::TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let result = (|| -> std::io::Result<u16> {
            if conn.is_none() {
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.set_nodelay(true)?;
                conn = Some(BufReader::new(s));
            }
            let c = conn.as_mut().unwrap();
            let close = if keepalive {
                ""
            } else {
                "Connection: close\r\n"
            };
            write!(
                c.get_mut(),
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{close}\r\n"
            )?;
            let mut line = String::new();
            if c.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the status line",
                ));
            }
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut length = None;
            let mut server_close = false;
            loop {
                line.clear();
                if c.read_line(&mut line)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed in the headers",
                    ));
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let lower = l.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse::<usize>().ok();
                }
                if lower.starts_with("connection:") && lower.contains("close") {
                    server_close = true;
                }
            }
            match length {
                Some(n) => {
                    let mut body = vec![0; n];
                    c.read_exact(&mut body)?;
                }
                None => {
                    let mut rest = Vec::new();
                    c.read_to_end(&mut rest)?;
                    server_close = true;
                }
            }
            if !keepalive || server_close {
                conn = None;
            }
            Ok(status)
        })();
        sent.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(s) if (200..300).contains(&s) => stats.ok += 1,
            Ok(s) => {
                stats.non2xx += 1;
                if stats.errors.len() < 10 {
                    stats.errors.push(format!("status {s}"));
                }
            }
            Err(e) => {
                conn = None;
                stats.failed += 1;
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    stats.refused += 1;
                }
                if stats.errors.len() < 10 {
                    stats.errors.push(e.to_string());
                }
            }
        }
    }
    stats
}

/// A manifest for demo-server in inherit mode on `port`.
pub fn demo_manifest(name: &str, port: u16, instances: u32, extra_env: &str) -> String {
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [\"{}\"]\n  instances: {instances}\n  env:\n    DEMO: \"1\"\n{extra_env}  listen:\n    - port: {port}\n      address: 127.0.0.1\n      mode: inherit\n  readiness: {{type: notify, timeout: 10s}}\n  shutdown: {{signal: SIGTERM, timeout: 10s}}\n  restart: {{backoff: {{initial: 100ms, max: 2s}}}}\n",
        demo_server().display()
    )
}

/// The app's public address.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Reads a file as a string, or "" if missing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The repository root (where `manifests/` and `tests/fixtures/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A third-party tool a test needs: `Some(path)` if it is there; otherwise prints SKIP
/// and returns `None`, or fails when `CLUSTERD_REQUIRE_TOOLS=1` (CI).
pub fn require_tool(path: &Path, test: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    assert!(
        std::env::var_os("CLUSTERD_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
        "{test}: {} is missing and CLUSTERD_REQUIRE_TOOLS=1 (run .ci/run to create it)",
        path.display()
    );
    eprintln!(
        "SKIP {test}: {} is missing (run .ci/run, or python3 -m venv .venv && .venv/bin/pip install gunicorn==23.0.0)",
        path.display()
    );
    None
}

/// A one-shot HTTP/1.1 request to the daemon's control socket; returns (status, body),
/// with a chunked body decoded.
pub fn api_request(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: clusterd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        decode_chunked(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn decode_chunked(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

impl Daemon {
    /// `GET /v1/events?app=APP`: the event history, oldest first (JSON objects).
    pub fn events(&self, app: &str) -> Vec<Value> {
        let (status, body) =
            api_request(&self.socket, "GET", &format!("/v1/events?app={app}")).unwrap();
        assert_eq!(status, 200, "events: {body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }

    /// The kinds of the app's events, oldest first.
    pub fn event_kinds(&self, app: &str) -> Vec<String> {
        self.events(app)
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Follows `GET /v1/events?app=APP&follow=1`, stamping each event with the moment
    /// it arrived (event times have second precision; arrival instants measure gaps).
    pub fn follow_events(&self, app: &str) -> EventFollower {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        write!(
            s,
            "GET /v1/events?app={app}&follow=1 HTTP/1.1\r\nHost: clusterd\r\n\r\n"
        )
        .unwrap();
        let events: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
        let sink = events.clone();
        let reader = s.try_clone().unwrap();
        std::thread::spawn(move || {
            // Chunk framing lines are skipped: every event is one JSON object per line.
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                let line = line.trim();
                if line.starts_with('{') {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        sink.lock().unwrap().push((Instant::now(), v));
                    }
                }
            }
        });
        EventFollower { events, stream: s }
    }
}

/// Events received so far by [`Daemon::follow_events`]; dropping it closes the stream.
pub struct EventFollower {
    events: Arc<Mutex<Vec<(Instant, Value)>>>,
    stream: std::os::unix::net::UnixStream,
}

impl EventFollower {
    /// Arrival instants of the events of `kind`.
    pub fn instants(&self, kind: &str) -> Vec<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["kind"] == kind)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Every event so far with its arrival instant.
    pub fn all(&self) -> Vec<(Instant, Value)> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Every live process whose process group is `pgid` (scans /proc; zombies excluded).
/// Whether `pid` is a worker's log timestamper (it shares the worker's process group).
pub fn is_timestamper(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end() == clusterd_runtime::shim::TIMESTAMPER_NAME)
}

pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the `(comm)`: state ppid pgrp ...
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

/// A variable of a live process's environment (as it was at exec).
pub fn proc_env(pid: i32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}="))
            .map(ToString::to_string)
    })
}

/// (index, pid) of every instance of an app status object that has a pid, sorted.
pub fn instance_pids(app: &Value) -> Vec<(u64, i32)> {
    let mut v: Vec<(u64, i32)> = app["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["index"].as_u64()?, i["pid"].as_i64()? as i32)))
        .collect();
    v.sort_unstable();
    v
}

/// An inherit-mode manifest for any command (argv as YAML flow list items).
pub fn inherit_manifest(
    name: &str,
    port: u16,
    instances: &str,
    argv: &[&str],
    extra: &str,
) -> String {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [{}]\n  instances: {instances}\n  listen:\n    - name: {name}\n      port: {port}\n      address: 127.0.0.1\n      mode: inherit\n  shutdown: {{signal: SIGTERM, timeout: 10s}}\n{extra}",
        argv.join(", ")
    )
}

/// A manifest for `command` (a YAML flow sequence or string) in http or tcp `mode` on
/// `port`, with tcp readiness; `extra` is appended to `spec` (indented two spaces).
pub fn proxied_manifest(
    name: &str,
    port: u16,
    mode: &str,
    instances: u32,
    command: &str,
    extra: &str,
) -> String {
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: {command}\n  instances: {instances}\n  listen:\n    - port: {port}\n      address: 127.0.0.1\n      mode: {mode}\n  readiness: {{type: tcp, period: 50ms, timeout: 10s}}\n  restart: {{backoff: {{initial: 100ms, max: 2s}}}}\n{extra}"
    )
}

/// demo-server in http mode (it reads `PORT`); `env` lines go under `spec.env`.
pub fn demo_http_manifest(name: &str, port: u16, instances: u32, env: &str, extra: &str) -> String {
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("  env:\n{env}")
    };
    proxied_manifest(
        name,
        port,
        "http",
        instances,
        &format!("[\"{}\"]", demo_server().display()),
        &format!("{env}{extra}"),
    )
}

impl Daemon {
    /// Instances of the app (status JSON), whatever their state.
    pub fn instances(&self, name: &str) -> Vec<Value> {
        self.app(name)
            .and_then(|a| a["instances"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The private port of the Ready worker with `pid` (http/tcp modes).
    pub fn private_port(&self, name: &str, pid: i32) -> u16 {
        self.instances(name)
            .iter()
            .find(|i| i["pid"].as_i64() == Some(i64::from(pid)))
            .and_then(|i| i["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no private port for pid {pid}"))
    }
}

/// A raw HTTP/1.0 GET on the control socket (so the body is never chunked); returns the
/// body ("" on error).
pub fn api_get(socket: &Path, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: clusterd\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// VmRSS of a process in KiB (0 when it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A worker script file in `dir`, for interpreters (`node FILE`, `python3 FILE`).
pub fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    /// `clusterd reload APP` while `load` is flowing: asserts the reload succeeded and
    /// that not one request failed or got a non-2xx answer; returns the load's counts.
    pub fn reload_under(&self, app: &str, load: Load) -> LoadStats {
        load.wait_for(40);
        let out = self.cli(&["reload", app]);
        assert!(
            out.status.success(),
            "reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        load.wait_for(40);
        let stats = load.stop();
        assert_eq!(
            (stats.failed, stats.non2xx),
            (0, 0),
            "lost requests: {:?}\n{}",
            stats.errors,
            self.log()
        );
        stats
    }
}

/// systemd's part for a daemon crash: a `NOTIFY_SOCKET` that keeps the descriptors the
/// daemon stores (`FDSTORE=1` + `FDNAME=`, the fd over `SCM_RIGHTS`) and drops them on
/// `FDSTOREREMOVE=1`, so a restarted daemon can be given them as `LISTEN_FDS`
/// (`Daemon::listen_fds`), as `Restart=` does with `FileDescriptorStoreMax=`.
pub struct FdStoreHost {
    pub path: PathBuf,
    pub store: Arc<Mutex<Vec<(String, std::os::fd::OwnedFd)>>>,
    /// Every message received (for assertions), descriptors aside.
    pub messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdStoreHost {
    /// Binds `dir/systemd-notify.sock` and starts receiving.
    pub fn start(dir: &Path) -> FdStoreHost {
        use std::os::fd::OwnedFd;
        let path = dir.join("systemd-notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let store: Arc<Mutex<Vec<(String, OwnedFd)>>> = Arc::default();
        let messages: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (store, messages, stop) = (store.clone(), messages.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((text, fds)) = clusterd_runtime::fdstore::receive_notify(&socket) else {
                        continue;
                    };
                    let field = |key: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(key))
                            .map(str::to_string)
                    };
                    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
                    let mut store = store.lock().unwrap();
                    if field("FDSTORE=").as_deref() == Some("1") {
                        for fd in fds {
                            store.push((name.clone(), fd));
                        }
                    }
                    if field("FDSTOREREMOVE=").as_deref() == Some("1") {
                        store.retain(|(n, _)| *n != name);
                    }
                    messages.lock().unwrap().push(text);
                }
            })
        };
        FdStoreHost {
            path,
            store,
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// Names currently stored.
    pub fn names(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Duplicates of everything stored, to pass as LISTEN_FDS (systemd keeps its own).
    pub fn duplicates(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|(n, f)| (n.clone(), f.try_clone().unwrap()))
            .collect()
    }
}

impl Drop for FdStoreHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Helpers shared by the runtime's process tests: real processes, always cleaned up.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clusterd_core::plan::{AppName, Revision};
use clusterd_runtime::shim::ShimCommand;
use clusterd_runtime::spawn::{WorkerProcess, WorkerSpec};

/// Upper bound for any single wait; only reached when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The standalone shim built from this crate.
pub fn shim() -> ShimCommand {
    ShimCommand::program(env!("CARGO_BIN_EXE_clusterd-exec-shim"))
}

/// Path of demo-server, built on demand (it is another package of the workspace).
pub fn demo_server() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/debug/deps -> target/debug
    let path = dir.join("demo-server");
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "demo-server"])
            .status()
            .expect("cargo build demo-server");
        assert!(status.success(), "building demo-server failed");
    }
    path
}

/// A spec for app `t`, instance `index`.
/// Logs are written raw (no timestamper) so tests can read a worker's log the moment it
/// exits; the tests of the timestamper turn it on.
pub fn spec(index: u32, argv: &[&str]) -> WorkerSpec {
    let mut s = WorkerSpec::new(
        AppName("t".into()),
        index,
        Revision("rev1".into()),
        argv.iter().map(OsString::from).collect(),
        shim(),
    );
    s.log_timestamps = false;
    s
}

/// Kills the worker's whole process group when dropped (also on test failure).
pub struct Guard(pub WorkerProcess);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// Kills and reaps a plain child when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` until it holds; panics after [`PATIENCE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `fut`, panicking after [`PATIENCE`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// One HTTP/1.1 GET over a fresh connection; returns the whole response text.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

//! The daemon raises its own open-files limit at start (issue 16, item 4); workers
//! still start with the soft limit the daemon was given. Its own test binary, because
//! it changes this process's limits.
#![allow(missing_docs)]

mod common;

use clusterd_runtime::accept::{original_nofile_soft, raise_nofile_limit};
use clusterd_runtime::spawn::{spawn_worker, ExitReason};
use common::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

#[tokio::test]
async fn daemon_raises_its_soft_limit_and_workers_get_the_original_back() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Start below the hard limit, as under a default systemd or login session.
    let start = hard.min(1000) - 1;
    setrlimit(Resource::RLIMIT_NOFILE, start, hard).unwrap();
    assert_eq!(raise_nofile_limit().unwrap(), (start, hard));
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    assert_eq!(original_nofile_soft(), Some(start));

    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(
        0,
        &["sh", "-c", "echo soft=$(ulimit -Sn) hard=$(ulimit -Hn)"],
    );
    spec.log_dir = Some(dir.path().to_path_buf());
    let w = spawn_worker(spec).await.unwrap();
    let _g = Guard(w.process.clone());
    assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
    let log = std::fs::read_to_string(w.log_path.unwrap()).unwrap();
    assert!(
        log.contains(&format!("soft={start} hard={hard}")),
        "worker limits: {log}"
    );
}

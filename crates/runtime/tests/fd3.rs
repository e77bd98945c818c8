//! The listener already *is* fd 3 in the daemon, with FD_CLOEXEC set (the pitfall:
//! `dup2(3, 3)` does not clear the flag, so the socket would silently close at exec).
//! Alone in its own test binary, so that fd 3 is free before the test takes it.
#![allow(unsafe_code)] // reads fd flags of the test process itself

mod common;

use std::os::fd::{AsRawFd, OwnedFd};

use clusterd_runtime::spawn::{spawn_worker, ExitReason, InheritedListener};
use common::*;

#[test]
fn listener_already_at_fd3_with_cloexec_reaches_the_worker() {
    // First descriptor this process opens: the lowest free number, normally 3.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if sock.as_raw_fd() != 3 {
        eprintln!(
            "skipped: fd 3 was already taken by the test harness (got {})",
            sock.as_raw_fd()
        );
        return;
    }
    sock.set_reuse_address(true).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(16).unwrap();
    let port = sock.local_addr().unwrap().as_socket().unwrap().port();
    // SAFETY: F_GETFD only reads the flags of a descriptor we own.
    let flags = unsafe { libc::fcntl(3, libc::F_GETFD) };
    assert_eq!(
        flags & libc::FD_CLOEXEC,
        libc::FD_CLOEXEC,
        "precondition: CLOEXEC set"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let script = "import socket\ns = socket.socket(fileno=3)\nprint('port=%d' % s.getsockname()[1])\ns.detach()";
        let mut s = spec(0, &["python3", "-c", script]);
        s.listeners.push(InheritedListener { name: "http".into(), fd: OwnedFd::from(sock) });
        s.log_dir = Some(dir.path().to_path_buf());
        let w = spawn_worker(s).await.unwrap();
        assert_eq!(within("exit", w.process.wait()).await, ExitReason::Code(0));
        let log = std::fs::read_to_string(w.log_path.unwrap()).unwrap();
        assert_eq!(log.trim(), format!("port={port}"));
    });
}

//! Shared mode without the daemon, for measuring it against bench/launcher.py (the
//! physical limit): binds ADDRESS:PORT once, starts N copies of an unmodified app with
//! `PORT` set, answers their binds with that socket, prints `pids: ...` once every copy
//! is bound, and stops them (SIGTERM to each group) on SIGINT/SIGTERM.
//!
//!     shared_launcher --shim target/debug/clusterd-exec-shim --port 8080 [--address 127.0.0.1] [-n 2] -- node app.js

use std::ffi::OsString;

use clusterd_core::plan::{AppName, Revision};
use clusterd_runtime::listener::BoundListener;
use clusterd_runtime::seccomp::{BindEvent, SharedBind, SharedListener};
use clusterd_runtime::shim::ShimCommand;
use clusterd_runtime::spawn::{spawn_worker, WorkerSpec};

#[tokio::main]
async fn main() {
    let mut shim = None;
    let mut port = 0u16;
    let mut address = "127.0.0.1".to_string();
    let mut n = 2u32;
    let mut args = std::env::args_os().skip(1);
    let mut command: Vec<OsString> = Vec::new();
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value").into_string().unwrap();
        match a.to_str() {
            Some("--shim") => shim = Some(val()),
            Some("--port") => port = val().parse().expect("port"),
            Some("--address") => address = val(),
            Some("-n") => n = val().parse().expect("n"),
            Some("--") => {
                command = args.collect();
                break;
            }
            _ => panic!("unknown argument {a:?}"),
        }
    }
    let shim = ShimCommand::program(shim.expect("--shim PATH"));
    let listener =
        BoundListener::bind_tcp(format!("{address}:{port}").parse().expect("address")).unwrap();
    let mut workers = Vec::new();
    for i in 0..n {
        let mut spec = WorkerSpec::new(
            AppName("bench".into()),
            i,
            Revision("bench".into()),
            command.clone(),
            shim.clone(),
        );
        spec.shared_bind = true;
        spec.extra_env
            .insert("PORT".into(), listener.local_addr().port().to_string());
        let mut w = spawn_worker(spec).await.unwrap();
        let bind = SharedBind::start(
            w.seccomp_notif.take().unwrap(),
            vec![SharedListener {
                addr: listener.local_addr(),
                protocol: listener.protocol(),
                fd: listener.inherit_fd().unwrap(),
            }],
            |e| {
                if let BindEvent::Stray(s) = e {
                    eprintln!("{s}");
                }
            },
        )
        .unwrap();
        workers.push((w, bind));
    }
    for (_, bind) in &workers {
        bind.first_bind()
            .await
            .expect("a worker exited before binding");
    }
    let pids: Vec<String> = workers
        .iter()
        .map(|(w, _)| w.process.pid().to_string())
        .collect();
    println!("pids: {}", pids.join(" "));
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for (w, _) in &workers {
        let _ = w.process.signal(nix::sys::signal::Signal::SIGTERM);
    }
    for (w, _) in &workers {
        w.process.wait().await;
    }
}

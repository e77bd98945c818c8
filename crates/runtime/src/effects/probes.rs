//! Readiness and liveness probes (`readiness.type: tcp|http`, `liveness`), run against a
//! worker's own private port. Each is a future the caller runs until it finishes or the
//! worker drains; results come back as [`Report`]s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clusterd_core::model::{CommandLine, Liveness, LivenessKind, ReadinessKind};
use clusterd_core::plan::{AppName, WorkerId};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::Report;

/// Probes every `period` until the worker answers, then reports it ready once.
pub async fn readiness(
    app: AppName,
    id: WorkerId,
    kind: ReadinessKind,
    path: String,
    period: Duration,
    port: u16,
    tx: mpsc::UnboundedSender<Report>,
) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let attempt_timeout = period.max(Duration::from_secs(1));
    let mut last: Option<String> = None;
    loop {
        let result = if kind == ReadinessKind::Http {
            http_probe(addr, &path, attempt_timeout).await
        } else {
            tcp_probe(addr, attempt_timeout).await
        };
        match result {
            Ok(()) => {
                let _ = tx.send(Report::Ready { app, id });
                return;
            }
            Err(e) => {
                // Say it in the app's terms: the worker was given PORT and nothing took it.
                let detail = if e.contains("refused") {
                    format!("nothing is listening on PORT={port} (connection refused)")
                } else {
                    e
                };
                if last.as_deref() != Some(&detail) {
                    let report = Report::ProbeFailed {
                        app: app.clone(),
                        id,
                        detail: detail.clone(),
                    };
                    if tx.send(report).is_err() {
                        return;
                    }
                    last = Some(detail);
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// Probes every `period` after the initial delay and reports each result.
pub async fn liveness(
    l: Liveness,
    port: Option<u16>,
    env: BTreeMap<String, String>,
    tx: mpsc::UnboundedSender<Report>,
    app: AppName,
    id: WorkerId,
) {
    tokio::time::sleep(l.initial_delay.0).await;
    loop {
        tokio::time::sleep(l.period.0).await;
        let timeout = l.timeout.0;
        let result = match (l.kind, port) {
            (LivenessKind::Http, Some(p)) => {
                http_probe(
                    SocketAddr::from(([127, 0, 0, 1], p)),
                    l.path.as_deref().unwrap_or("/"),
                    timeout,
                )
                .await
            }
            (LivenessKind::Tcp, Some(p)) => {
                tcp_probe(SocketAddr::from(([127, 0, 0, 1], p)), timeout).await
            }
            (LivenessKind::Exec, _) => exec_probe(l.command.as_ref(), &env, timeout).await,
            (_, None) => Err("no private port to probe".to_string()),
        };
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        let report = Report::Liveness {
            app: app.clone(),
            id,
            ok,
            detail,
        };
        if tx.send(report).is_err() {
            return;
        }
    }
}

async fn tcp_probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
        Err(_) => Err(format!(
            "tcp connect to {addr}: timed out after {timeout:?}"
        )),
    }
}

async fn http_probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http {addr}: {e}"))?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header("user-agent", "clusterd-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        // Drive the connection in this task: the probe owns it and drops it after.
        let (resp, _) = tokio::join!(sender.send_request(req), async {
            let _ = conn.await;
        });
        let resp = resp.map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {path} on {addr}: timed out after {timeout:?}")),
    }
}

async fn exec_probe(
    command: Option<&CommandLine>,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), String> {
    let argv = match command {
        Some(CommandLine::Argv(a)) => a.clone(),
        Some(CommandLine::Shell(s)) => shell_words::split(s).map_err(|e| e.to_string())?,
        None => return Err("no command".into()),
    };
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, async { cmd.status().await }).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("`{program}` {s}")),
        Ok(Err(e)) => Err(format!("`{program}`: {e}")),
        Err(_) => Err(format!("`{program}` timed out after {timeout:?}")),
    }
}

//! The control API: HTTP/1.1 + JSON on the daemon's unix socket.
//!
//! Requests that read or change the apps are forwarded to the reconcile loop, which owns
//! that state and answers through a oneshot; the API task never holds app state itself.
//! Events are served from the shared `EventLog` so a slow follower never stalls the loop.

use std::convert::Infallible;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::events::EventLog;
use super::Msg;
use crate::api_types::{ApiError, Event};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the API asks the reconcile loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /v1/apps` or `/v1/apps/{name}`.
    Status(Option<String>),
    /// `POST /v1/apps/{name}/reload`, or every app with `None`.
    Reload(Option<String>),
    /// `POST /v1/sync`.
    Sync,
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/daemon`.
    Info,
}

/// The loop's answer.
#[derive(Debug)]
pub enum ApiReply {
    /// A JSON document with a status code.
    Json(StatusCode, serde_json::Value),
    /// Prometheus text.
    Text(String),
}

/// Serves until `shutdown` is cancelled, then gives the connections in progress a moment
/// to send their answers (an upgrade's reply is written after the next daemon took over).
/// While `paused` is true nothing is accepted: during an upgrade new requests wait in the
/// socket's queue for whichever daemon serves next, instead of reaching a controller that
/// may never answer them.
pub async fn serve(
    listener: UnixListener,
    loop_tx: mpsc::UnboundedSender<Msg>,
    events: EventLog,
    shutdown: CancellationToken,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    let connections = tokio_util::task::TaskTracker::new();
    // At the fd limit accept fails at once with the connection still queued: pause,
    // or the loop spins (issue 16).
    let mut backoff = clusterd_runtime::accept::AcceptBackoff::new("control socket");
    // Anyone allowed on the socket could otherwise hold every descriptor of the daemon
    // (a connection each) or park connections that never send a request.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    let header_timeout = control_header_timeout();
    loop {
        if *paused.borrow_and_update() && !shutdown.is_cancelled() {
            tokio::select! {
                () = shutdown.cancelled() => {}
                Ok(()) = paused.changed() => continue,
            }
        }
        let permit = tokio::select! {
            () = shutdown.cancelled() => {
                connections.close();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connections.wait()).await;
                return;
            }
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            // Biased: a daemon shutting down (or retiring after an upgrade) or pausing
            // must not accept one more connection it would never answer.
            biased;
            () = shutdown.cancelled() => {
                connections.close();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connections.wait()).await;
                return;
            }
            // Paused while waiting here: stop accepting at once, not after one more.
            Ok(()) = paused.changed() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let loop_tx = loop_tx.clone();
        let events = events.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let loop_tx = loop_tx.clone();
                let events = events.clone();
                let shutdown = shutdown.clone();
                async move { Ok::<_, Infallible>(route(req, loop_tx, events, shutdown).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Most control connections served at once; `clusterd` commands use one each, `top`
/// and `events -f` hold theirs. More wait in the socket's backlog.
pub const MAX_CONTROL_CONNECTIONS: usize = 64;

/// How long a control connection may take to send a request's headers (or sit idle
/// between requests) before it is closed. `CLUSTERD_CONTROL_HEADER_TIMEOUT` (a duration
/// like `500ms`) overrides the 10 s default, for tests.
fn control_header_timeout() -> std::time::Duration {
    std::env::var("CLUSTERD_CONTROL_HEADER_TIMEOUT")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(std::time::Duration::from_secs(10))
}

async fn route(
    req: Request<Incoming>,
    loop_tx: mpsc::UnboundedSender<Msg>,
    events: EventLog,
    shutdown: CancellationToken,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ask = |r: ApiRequest| ask(&loop_tx, r);
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["v1", "apps"]) => reply(ask(ApiRequest::Status(None)).await),
        (&Method::GET, ["v1", "apps", name]) => {
            reply(ask(ApiRequest::Status(Some((*name).to_string()))).await)
        }
        (&Method::POST, ["v1", "apps", name, "reload"]) => {
            reply(ask(ApiRequest::Reload(Some((*name).to_string()))).await)
        }
        (&Method::POST, ["v1", "reload"]) => reply(ask(ApiRequest::Reload(None)).await),
        (&Method::POST, ["v1", "sync"]) => reply(ask(ApiRequest::Sync).await),
        (&Method::POST, ["v1", "upgrade"]) => {
            let (tx, rx) = oneshot::channel();
            let answer = match loop_tx.send(Msg::Upgrade(Some(tx))) {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            reply(answer)
        }
        (&Method::GET, ["metrics"]) => reply(ask(ApiRequest::Metrics).await),
        (&Method::GET, ["v1", "daemon"]) => reply(ask(ApiRequest::Info).await),
        (&Method::GET, ["v1", "events"]) => events_response(&events, &query, shutdown),
        (_, ["v1", ..] | ["metrics"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

async fn ask(loop_tx: &mpsc::UnboundedSender<Msg>, request: ApiRequest) -> Option<ApiReply> {
    let (tx, rx) = oneshot::channel();
    loop_tx.send(Msg::Api(request, tx)).ok()?;
    rx.await.ok()
}

fn reply(answer: Option<ApiReply>) -> Response<Body> {
    match answer {
        Some(ApiReply::Json(status, value)) => json(status, &value),
        Some(ApiReply::Text(text)) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(text)).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A JSON error body.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let value = serde_json::to_value(ApiError {
        error: message.to_string(),
    })
    .unwrap_or_default();
    json(status, &value)
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `GET /v1/events[?app=NAME][&follow=1]`: newline-delimited JSON, the kept history
/// first, then (with follow) new events as they happen.
fn events_response(events: &EventLog, query: &str, shutdown: CancellationToken) -> Response<Body> {
    let app = query_param(query, "app").map(str::to_string);
    let follow = query_param(query, "follow").is_some_and(|v| v == "1" || v == "true");
    let keep = move |e: &Event| app.as_deref().is_none_or(|a| e.app.as_deref() == Some(a));
    // Subscribe before taking the snapshot so no event falls between the two.
    let receiver = follow.then(|| events.subscribe());
    let mut history = Vec::new();
    for e in events.snapshot().iter().filter(|e| keep(e)) {
        history.extend_from_slice(&line(e));
    }
    let state = (Some(Bytes::from(history)), receiver, keep, shutdown);
    let stream = futures_util::stream::unfold(
        state,
        |(mut first, mut receiver, keep, shutdown)| async move {
            if let Some(chunk) = first.take() {
                return Some((Ok(Frame::data(chunk)), (None, receiver, keep, shutdown)));
            }
            let rx = receiver.as_mut()?;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    received = rx.recv() => match received {
                        Ok(e) if keep(&e) => {
                            let chunk = Bytes::from(line(&e));
                            return Some((Ok(Frame::data(chunk)), (None, receiver, keep, shutdown)));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn line(e: &Event) -> Vec<u8> {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Binds the control socket, replacing a stale socket file but never a live daemon's.
///
/// The socket never exists with a wider mode than its final one, not even for a moment:
/// it is bound inside a fresh 0700 directory, given its mode (0600, or 0660 with a
/// `clusterd` group), and only then renamed into place. The directory that holds it is
/// created 0700 when missing, and refused when another user owns it or anyone else may
/// write to it: there, a squatter could put its own socket in our place and answer our
/// CLI (see [`check_socket_dir`]).
///
/// # Errors
/// When the directory cannot be created or is unsafe, or another live daemon owns the
/// socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.exists() {
        if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(up)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    check_socket_dir(&dir)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another clusterd is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let private = dir.join(format!(".clusterd-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp)?;
        let group = nix::unistd::Group::from_name("clusterd").ok().flatten();
        let mode = if let Some(g) = group {
            let _ = nix::unistd::chown(&tmp, None, Some(g.gid));
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Refuses a socket directory that someone else could tamper with: not a directory (a
/// symlink included), owned by another user (root-owned system directories aside), or
/// writable by others without the sticky bit. A non-root daemon's default,
/// `/tmp/clusterd-UID`, is the case this is for: anyone can create that name first.
///
/// # Errors
/// `PermissionDenied` naming the directory and what is wrong with it.
pub fn check_socket_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let euid = nix::unistd::geteuid().as_raw();
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing the socket directory {}: {why} (expected a directory of user {euid} that only it can write, e.g. mode 0700)",
                dir.display()
            ),
        ))
    };
    if !meta.file_type().is_dir() {
        return refuse("it is not a directory".into());
    }
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if meta.uid() != euid && meta.uid() != 0 {
        return refuse(format!("it belongs to user {}", meta.uid()));
    }
    if meta.uid() != euid && !sticky && mode & 0o022 != 0 {
        return refuse(format!("others may write to it (mode {:o})", mode & 0o7777));
    }
    if mode & 0o002 != 0 && !sticky {
        return refuse(format!("anyone may write to it (mode {:o})", mode & 0o7777));
    }
    Ok(())
}

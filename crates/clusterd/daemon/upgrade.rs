//! `clusterd upgrade` and SIGUSR2: the running daemon starts the binary now on disk as
//! the next daemon, hands it every socket, and exits without touching a worker.
//!
//! The mechanism is fork+exec with the sockets passed over a socketpair
//! (`clusterd_runtime::handover`), as pingora, tableflip and HAProxy do, rather than an
//! in-place re-exec: the old daemon keeps serving until the new one says it has taken
//! over, so a new binary that fails to start (or to adopt) costs nothing, and the old one
//! answers why. docs/restarts.md explains the choice and the sequence.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use clusterd_runtime::effects::LinuxEffects;
use clusterd_runtime::handover::{self, TookOver, UpgradeRequest};
use hyper::StatusCode;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::api::ApiReply;
use crate::api_types::UpgradeReply;

/// The names of the state and apps dir locks in a handover.
pub const LOCK_STATE: &str = "lock/state";
/// See [`LOCK_STATE`].
pub const LOCK_APPS: &str = "lock/apps";

/// How long the next daemon may take from its start to "taken over" (adoption and the
/// first scan; a manifest being written can hold that up by up to 5 s).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the retired daemon waits for its proxies (each bounds its connections by its
/// own shutdown grace, 10 s): a backstop only.
const RETIRE_BACKSTOP: Duration = Duration::from_secs(15);

/// What an upgrade runs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The binary on disk: the one this daemon was started from (the path, not the
    /// running image, so a package upgrade that replaced the file is picked up), or
    /// `CLUSTERD_UPGRADE_BINARY` (tests, or a binary installed elsewhere).
    pub binary: PathBuf,
    /// This daemon's own arguments: the next one serves the same dirs and socket.
    pub args: Vec<OsString>,
    /// `CLUSTERD_UPGRADE_TIMEOUT_MS`, or 30 s.
    pub timeout: Duration,
}

impl Spec {
    /// From the process: read at start, before anything can replace the binary.
    pub fn from_env() -> Self {
        let binary = std::env::var_os("CLUSTERD_UPGRADE_BINARY")
            .map(PathBuf::from)
            .or_else(|| std::env::current_exe().ok().map(strip_deleted))
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        let timeout = std::env::var("CLUSTERD_UPGRADE_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map_or(TAKEOVER_TIMEOUT, Duration::from_millis);
        Spec {
            binary,
            args: std::env::args_os().skip(1).collect(),
            timeout,
        }
    }
}

/// `/proc/self/exe` of a binary replaced on disk reads `... (deleted)`: the path is what
/// an upgrade wants.
fn strip_deleted(p: PathBuf) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => p,
    }
}

/// The control socket a previous daemon handed over.
pub fn control_from(fd: OwnedFd) -> std::io::Result<UnixListener> {
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

/// A duplicate of the control socket, for the next daemon.
pub fn duplicate(control: &UnixListener) -> Option<OwnedFd> {
    control
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| tracing::warn!(error = %e, "an upgrade will not hand over the control socket"))
        .ok()
}

/// Starts the next daemon with every socket; returns once it has taken over.
///
/// # Errors
/// Why it did not: this daemon keeps running, untouched.
pub async fn hand_over(
    spec: &Spec,
    effects: &mut LinuxEffects,
    control: Option<&OwnedFd>,
    locks: &[nix::fcntl::Flock<std::fs::File>],
) -> Result<TookOver, String> {
    // First, so that every failure below finds them paused (the caller resumes them).
    effects.pause_notify();
    effects.pause_shared_binds().await;
    let mut fds = effects.handover_fds()?;
    if let Some(c) = control {
        let fd = c
            .try_clone()
            .map_err(|e| format!("dup control socket: {e}"))?;
        fds.push((handover::CONTROL.to_string(), fd));
    }
    // The same order as `lock_dirs` takes them.
    for (lock, name) in locks.iter().zip([LOCK_STATE, LOCK_APPS]) {
        let fd = lock
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("dup {name}: {e}"))?;
        fds.push((name.to_string(), fd));
    }
    tracing::info!(binary = %spec.binary.display(), sockets = fds.len(), "upgrade: starting the next daemon");
    let req = UpgradeRequest {
        binary: spec.binary.clone(),
        args: spec.args.clone(),
        fds,
        timeout: spec.timeout,
    };
    tokio::task::spawn_blocking(move || handover::start_successor(req))
        .await
        .map_err(|e| format!("upgrade task: {e}"))?
}

/// The next daemon serves: make it systemd's main process, answer the requester, stop
/// accepting, let requests in flight finish, and return (the caller exits without
/// touching the workers, the sockets' store entries, `workers.json` or the control
/// socket's path).
pub async fn retire(
    took: TookOver,
    reply: Option<oneshot::Sender<ApiReply>>,
    effects: &mut LinuxEffects,
    shutdown: CancellationToken,
    api_task: tokio::task::JoinHandle<()>,
) {
    let old_pid = std::process::id();
    tracing::info!(
        new_pid = took.pid,
        took_ms = took.elapsed.as_millis() as u64,
        "upgrade: the next daemon has taken over; retiring"
    );
    if let Some(store) = clusterd_runtime::fdstore::FdStore::from_env() {
        // NotifyAccess=main accepts this from us, the main process, and from then on
        // from the new daemon.
        if let Err(e) = store.notify(&format!("MAINPID={}\n", took.pid)) {
            tracing::warn!(error = %e, "sd_notify MAINPID");
        }
    }
    let proxies = effects.retire();
    if let Some(reply) = reply {
        let _ = reply.send(ApiReply::Json(
            StatusCode::OK,
            json!(UpgradeReply {
                old_pid,
                new_pid: took.pid,
                took_ms: u64::try_from(took.elapsed.as_millis()).unwrap_or(u64::MAX),
            }),
        ));
    }
    shutdown.cancel();
    let _ = api_task.await;
    let started = std::time::Instant::now();
    if tokio::time::timeout(RETIRE_BACKSTOP, proxies)
        .await
        .is_err()
    {
        tracing::warn!("upgrade: proxies still busy after the backstop; exiting anyway");
    }
    tracing::info!(
        drained_ms = started.elapsed().as_millis() as u64,
        new_pid = took.pid,
        "upgrade: requests in flight finished; exiting without touching the workers"
    );
    // Never waited for: it is the daemon now.
    std::mem::forget(took.child);
}

/// The answer to a request that reached this daemon after it handed over.
pub fn moved_on() -> ApiReply {
    ApiReply::Json(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "this daemon has just handed over to its successor; ask again"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_upgraded_to_by_path() {
        assert_eq!(
            strip_deleted(PathBuf::from("/usr/local/bin/clusterd (deleted)")),
            PathBuf::from("/usr/local/bin/clusterd")
        );
        assert_eq!(
            strip_deleted(PathBuf::from("/usr/local/bin/clusterd")),
            PathBuf::from("/usr/local/bin/clusterd")
        );
    }
}

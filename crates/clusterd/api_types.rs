//! The JSON shapes of the control API, shared by the daemon and the CLI client.
//!
//! `StatusReport` is the contract of `clusterd status -o json` (DESIGN.md); fields beyond
//! the documented ones are additions, never renames, so scripts written against the
//! documented shape keep working.

use clusterd_core::event::EventKind;
use clusterd_core::model::{ListenMode, Protocol};
pub use clusterd_core::plan::Phase;
use serde::{Deserialize, Serialize};

/// `GET /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Every app the daemon knows, sorted by name.
    pub apps: Vec<AppStatus>,
    /// GitOps sync state, when the daemon follows a git repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// Problems of the daemon itself that put its guarantees at risk (e.g. the state dir
    /// is not writable: a restart could not adopt the newest workers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemon_errors: Vec<String>,
}

/// One app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    /// `metadata.name` (or the file stem of a manifest that could not be read).
    pub name: String,
    /// Pending, Progressing, Available, Degraded, CrashLoopBackOff, Invalid, Stopping.
    pub phase: Phase,
    /// The desired revision (empty when no manifest was ever valid).
    pub revision: String,
    /// Bumped by every `clusterd reload`.
    #[serde(default)]
    pub generation: u64,
    /// Resolved instance count.
    pub desired: u32,
    /// Instances in state Ready, of any revision.
    pub ready: u32,
    /// Sum of unplanned exits over instances.
    pub restarts: u32,
    /// Why the app is Invalid or Degraded.
    pub error: Option<String>,
    /// Public sockets.
    pub listen: Vec<ListenStatus>,
    /// The manifest file.
    pub source: String,
    /// Seconds since the app was first seen.
    #[serde(default)]
    pub age_secs: u64,
    /// Whether the per-app cgroup backstop is active, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The rollout towards the desired revision and generation (absent when nothing is
    /// desired: no valid manifest, or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Live workers, by index then age.
    pub instances: Vec<InstanceStatus>,
}

/// Where the rollout towards the desired template stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The desired revision.
    pub revision: String,
    /// The desired generation (bumped by `clusterd reload`).
    pub generation: u64,
    /// Workers Ready at the desired revision and generation.
    pub updated: u32,
    /// Every instance is Ready at it and no other worker is left (draining ones aside).
    pub complete: bool,
    /// The rollout to it failed, and why (which worker, how): the old workers serve on.
    pub failed: Option<String>,
}

/// State of one instance (DESIGN.md), serialized as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Started, not ready yet.
    Starting,
    /// Takes traffic.
    Ready,
    /// Takes no new traffic; stopping.
    Draining,
    /// No live worker: waiting out a restart backoff.
    Backoff,
    /// No live worker, and none will be restarted (restart policy).
    Exited,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// `POST /v1/apps/{name}/reload` and `POST /v1/reload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReply {
    /// The apps whose reload was accepted, with the generation to wait for.
    pub reloads: Vec<ReloadAccepted>,
}

/// One accepted reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadAccepted {
    /// App.
    pub app: String,
    /// The new generation: the reload is done when the rollout reaches it.
    pub generation: u64,
}

/// `POST /v1/sync`: what the sync applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReply {
    /// The commit now applied.
    pub commit: String,
    /// Files added to the apps dir.
    pub added: Vec<String>,
    /// Files changed.
    pub changed: Vec<String>,
    /// Files removed.
    pub removed: Vec<String>,
}

/// One public socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenStatus {
    /// Listener name, if any.
    pub name: Option<String>,
    /// `address:port` as bound.
    pub address: String,
    /// http, tcp, inherit or shared.
    pub mode: ListenMode,
    /// tcp or udp.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// `tls.acme`: when the certificate served now expires (RFC 3339); absent before
    /// one is obtained and for listeners without `tls.acme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires: Option<String>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// One worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// `CLUSTERD_INSTANCE`.
    pub index: u32,
    /// Process id (= process group id).
    pub pid: Option<u32>,
    /// Starting, Ready, Draining, Backoff, Exited.
    pub state: InstanceState,
    /// Revision it runs.
    pub revision: String,
    /// Generation it was started for.
    #[serde(default)]
    pub generation: u64,
    /// Unplanned exits of this index.
    pub restarts: u32,
    /// RFC 3339 start time.
    pub started: Option<String>,
    /// Seconds since start.
    #[serde(default)]
    pub uptime_secs: u64,
    /// CPU use since the previous sample, percent of one CPU.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the worker's process group, bytes.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Requests (http) or connections (tcp) in flight through the daemon.
    #[serde(default)]
    pub inflight: Option<u64>,
    /// Why it is not ready yet: its readiness probe's last failure (e.g. "nothing is
    /// listening on PORT=41234 (connection refused)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_error: Option<String>,
    /// Requests (http) or connections (tcp) sent to it through the daemon so far (a
    /// counter: `clusterd top` shows its rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_total: Option<u64>,
    /// Private port (http/tcp modes).
    #[serde(default)]
    pub port: Option<u16>,
    /// How the last run of this index ended, e.g. `exit 1` or `signal SIGKILL`.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Shared mode only: the shared listeners this worker bound, each as
    /// `address:port/protocol by pid N`; empty while it has not bound (yet). Absent for
    /// apps without a shared listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<Vec<String>>,
}

/// GitOps sync state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Repository URL (credentials stripped).
    pub repo: String,
    /// Branch, tag or commit followed.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Commit applied last.
    pub commit: Option<String>,
    /// Why the last sync failed.
    pub error: Option<String>,
    /// RFC 3339 time of the last sync attempt.
    pub at: Option<String>,
}

/// One entry of `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic sequence number.
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    /// App, if the event concerns one.
    pub app: Option<String>,
    /// Instance index, if the event concerns one.
    pub instance: Option<u32>,
    /// Short machine-friendly kind: spawn, ready, drain, signal, kill, exit, rollout-failed, invalid, ...
    pub kind: EventKind,
    /// Human-readable.
    pub message: String,
}

/// Error body of the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// `POST /v1/upgrade`: the next daemon has taken over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeReply {
    /// The daemon that answered, and exits now.
    pub old_pid: u32,
    /// The daemon that serves from now on.
    pub new_pid: u32,
    /// From starting the new binary to its "taken over".
    pub took_ms: u64,
}

/// `GET /v1/daemon`: where the daemon keeps things (for `clusterd logs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// clusterd version.
    pub version: String,
    /// Manifests.
    pub apps_dir: String,
    /// Worker logs.
    pub log_dir: String,
    /// State.
    pub state_dir: String,
    /// The daemon's pid (it changes on `clusterd upgrade`).
    #[serde(default)]
    pub pid: Option<u32>,
}

//! The planner: `plan(desired, observed, now) -> Plan`.
//!
//! Pure and deterministic: no clock, no I/O, no randomness. The runtime owns the
//! [`Observed`] state, feeds it events through the `record_*` transitions (also pure),
//! calls [`plan`] on every wake-up (level-triggered: it never learns *why* it was woken),
//! carries out the returned actions, applies them to `Observed` with
//! [`ObservedApp::apply`] (spawns with [`ObservedApp::record_spawn`]), and sleeps until
//! the next event or `Plan::wake_at`. [`phase`] summarises an app for status.
//!
//! # Contract with the runtime
//! - Call [`Observed::record_desired`] before planning whenever the desired state may
//!   have changed (it remembers each app's [`DrainPolicy`] so a removed app still drains
//!   with its own timeout, and forgets a failure whose template is no longer desired).
//! - Every `record_*` call is an event: plan again after it. So is a draining worker's
//!   `inflight` reaching 0 (http/tcp), and a change of `rss`/`liveness_failures`.
//! - After the runtime has applied every action of a plan, planning again at the same
//!   `now` yields no action that was already carried out (idempotence); if the plan had no
//!   `Spawn`, it yields nothing at all.
//! - The runtime keeps the spec of every template that still has workers or is the last
//!   good one, because a `Spawn` may name an older template (fail-closed: after a failed
//!   rollout, a crashed old worker comes back at its old template).
//!
//! # Rules
//! - **Spawn / fill**: every index `0..replicas` gets a worker of its target template (the
//!   desired one; after a failed rollout, the template already serving there, else the
//!   last good one). **Scale down** drains every index `>= replicas`, highest first.
//! - **Readiness**: `Immediate` is marked ready at once, `Delay(d)` at `spawned_at + d`,
//!   `Reported` once `ready_reported`. Not ready by `spawned_at + readiness_timeout`: the
//!   worker drains (`ReadinessTimeout`).
//! - **Drain**: `Signal` at once in inherit mode; in http/tcp mode once `inflight == 0`
//!   or `shutdown_timeout` after the drain started. `Kill` at `signalled_at +
//!   shutdown_timeout`.
//! - **Restart**: an unplanned exit makes the index wait `backoff_delay` (initial,
//!   doubling per consecutive failure, capped at max), then restart unless the policy says
//!   no (`never`; `on-failure` after exit code 0). A worker that was Ready for
//!   [`stable_after`] = max(10 s, backoff.max) before it died starts a new streak at 1.
//!   A worker that missed its readiness deadline is a failure too, and holds its index
//!   until it has exited (so the backoff starts from its exit, not from the timeout).
//! - **Rolling replacement** (template change, reload, RSS over `memory_limit`,
//!   `liveness_failures >= threshold`), per index, lowest first: surge a new worker for the
//!   same index while `live < replicas + maxSurge`; else, if allowed by maxUnavailable,
//!   drain the old worker first and start the new one. The old worker drains
//!   (`Replaced`, `MemoryLimit`, `LivenessFailed`) in the very plan in which its
//!   replacement is marked ready.
//! - **Fail closed**: a worker of the desired template, not yet proven (it never was
//!   `last_good`), that misses its readiness deadline or exits (or fails to spawn) fails
//!   the rollout (`FailRollout`, once) when there is something to fall back on (a last
//!   good template, or workers of another template). The failed template is not spawned
//!   again while `failed` names it; its starting workers drain (`RolloutFailed`); old
//!   workers keep serving, and a crashed one comes back at its old template. Without a
//!   fallback (first start, or after a daemon restart with nothing adopted) failing closed
//!   would leave the app down for good on a transient error, so failures are instance
//!   failures (backoff, `CrashLoopBackOff`). A proven template's failures are always
//!   instance failures.
//!   Likewise a recorded failure stops blocking once its fallback is gone (no last good
//!   template, no Ready worker of another template): the desired template is retried.
//! - **Available**: once every index has a healthy Ready worker of the desired template,
//!   `MarkAvailable` records it as `last_good`.
//! - **Removal**: an app absent from `Desired` drains everything (`AppRemoved`).
//!
//! # Invariants (checked by the property tests)
//! Counting: *live* = non-draining workers at an index `< replicas`; *ready* = live
//! workers in state Ready. Draining workers are counted apart: they take no new traffic
//! and hold no index, so they count neither as capacity nor against the surge (a slow
//! drain must not stall a rollout), and their number is bounded by the drain deadlines.
//! - `live <= replicas + maxSurge` after every plan: the surge is the extra capacity the
//!   user allowed (memory, ports) and no more. A scale-down that leaves too much surge in
//!   flight cancels starting replacements, highest index first, until the bound holds.
//! - The planner never takes `ready` below `min(ready before, replicas -
//!   maxUnavailable)`: with maxUnavailable 0 a rollout never lowers serving capacity.
//!   (Crashes can; the planner only refills.)
//! - A failed readiness or a failed rollout drains only workers that never served: the
//!   old Ready workers stay.
//! - Live workers have indexes in `0..replicas` and, among healthy ones, at most one per
//!   (index, template): `CLUSTERD_INSTANCE` stays stable and unique; a replacement keeps
//!   the index it replaces.
//! - Idempotence (above): decisions are applied to a private copy of the state as they
//!   are made, so the plan is computed against the state it leaves behind.
//! - Convergence: with no more events than ready reports, exits after signals and time
//!   passing, the app ends with `replicas` Ready workers at the desired template, nothing
//!   draining — or, if that template's rollout failed, `replicas` Ready workers of the old
//!   one(s) and phase Degraded; only a template that cannot run with nothing to fall back
//!   on keeps looping (CrashLoopBackOff).

mod backoff;
mod decide;
mod phase;
mod transitions;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod reloads;
#[cfg(test)]
mod tests;

pub use backoff::{backoff_delay, stable_after, MIN_STABLE_RUN};
pub use decide::{plan, plan_app};
pub use phase::{describe_template, phase, vacant_state, VacantState};

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{Restart, Rollout};

/// Name of an app (`metadata.name`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppName(pub String);

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Short stable hash of what shapes a worker (see `revision`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub String);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Daemon-unique worker identity, assigned by the runtime at spawn. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// The template a worker is spawned from: a revision plus the reload generation.
/// `clusterd reload` bumps the generation so that every worker is replaced although
/// the revision is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Template {
    /// Hash of the worker-shaping part of the spec.
    pub revision: Revision,
    /// Bumped by every reload request.
    pub generation: u64,
}

/// How the planner learns a new worker is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessGate {
    /// Ready as soon as spawned.
    Immediate,
    /// Ready this long after spawn.
    Delay(Duration),
    /// The runtime reports it (notify, ipc, tcp or http probe) via `record_ready_report`.
    Reported,
}

/// What one app should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredApp {
    /// Which template current workers must have.
    pub template: Template,
    /// Resolved instance count (>= 1).
    pub replicas: u32,
    /// maxSurge / maxUnavailable.
    pub rollout: Rollout,
    /// How readiness is decided.
    pub readiness: ReadinessGate,
    /// A new worker not ready by then fails (see module docs of the rules).
    pub readiness_timeout: Duration,
    /// Signal-to-SIGKILL time; also the bound of the wait for in-flight work.
    pub shutdown_timeout: Duration,
    /// http/tcp modes: signal a draining worker only once `inflight == 0` (or the
    /// shutdown timeout passed). inherit mode: signal at once.
    pub drain_waits_for_idle: bool,
    /// Restart policy and backoff.
    pub restart: Restart,
    /// Replace (rolling) a worker whose RSS exceeds this.
    pub memory_limit: Option<u64>,
    /// Replace (rolling) a worker with this many consecutive liveness failures.
    pub liveness_failure_threshold: Option<u32>,
}

/// The desired state of the host. An app absent here is drained and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// By name.
    pub apps: BTreeMap<AppName, DesiredApp>,
}

/// Lifecycle of a live worker. Exited workers leave `ObservedApp::workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Spawned, not yet ready: gets no traffic.
    Starting,
    /// Takes traffic.
    Ready,
    /// Gets no new traffic; being stopped.
    Draining,
}

/// Why a worker is being drained (shown in events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainReason {
    /// Replaced by a worker of the desired template.
    Replaced,
    /// Index >= replicas.
    ScaledDown,
    /// The app was removed (or the daemon is stopping).
    AppRemoved,
    /// Not ready within the readiness timeout.
    ReadinessTimeout,
    /// RSS over `limits.memory`.
    MemoryLimit,
    /// Failed its liveness probe `failureThreshold` times.
    LivenessFailed,
    /// A worker of a template whose rollout failed (it would only add surge).
    RolloutFailed,
}

/// Progress of a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainProgress {
    /// When routing to it stopped.
    pub started_at: Instant,
    /// Why.
    pub reason: DrainReason,
    /// When the shutdown signal was sent.
    pub signalled_at: Option<Instant>,
    /// SIGKILL sent.
    pub killed: bool,
}

/// A live worker as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Identity.
    pub id: WorkerId,
    /// Stable instance index 0..N (`CLUSTERD_INSTANCE`).
    pub index: u32,
    /// What it was spawned from.
    pub template: Template,
    /// Lifecycle state.
    pub state: WorkerState,
    /// When spawned.
    pub spawned_at: Instant,
    /// The runtime saw its readiness signal (notify, ipc, probe).
    pub ready_reported: bool,
    /// When it became Ready.
    pub ready_at: Option<Instant>,
    /// Set once draining.
    pub drain: Option<DrainProgress>,
    /// Requests (http) or connections (tcp) in flight through the proxy.
    pub inflight: u64,
    /// Consecutive liveness failures.
    pub liveness_failures: u32,
    /// Resident memory of its process group, bytes.
    pub rss: Option<u64>,
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// exit(code).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
    /// The spawn itself failed (exec error, bad user...).
    SpawnFailed,
    /// The worker was adopted after a daemon restart, so it is not our child and its
    /// exit status went to its real parent. Counted as a failure.
    Unknown,
}

/// The one wording of an exit, used by status, events and the planner's reasons:
/// `exited with code 1`, `killed by SIGKILL`, `could not be started`.
impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(c) => write!(f, "exited with code {c}"),
            ExitReason::Signal(s) => match crate::signal::signal_name(s) {
                Some(name) => write!(f, "killed by {name}"),
                None => write!(f, "killed by signal {s}"),
            },
            ExitReason::SpawnFailed => f.write_str("could not be started"),
            ExitReason::Unknown => f.write_str("exited (status unknown: adopted worker)"),
        }
    }
}

impl ExitReason {
    /// A clean exit (code 0).
    #[must_use]
    pub fn is_success(self) -> bool {
        matches!(self, ExitReason::Code(0))
    }
}

/// Restart bookkeeping of one instance index; survives its workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotHistory {
    /// Times this index was restarted after an unplanned end: a worker (or a failed
    /// spawn) started for a pending restart, or a replacement for memory or liveness.
    /// An exit the restart policy leaves alone is no restart (shown as `restarts`).
    pub restarts: u32,
    /// Unplanned exits in a row without a long-enough clean run; drives the backoff.
    pub consecutive_failures: u32,
    /// When and how the last unplanned exit happened, and of which template.
    pub last_exit: Option<(Instant, ExitReason, Template)>,
    /// The index's last worker ended unplanned (crash, failed spawn, not ready in time)
    /// and nothing was started for the index since: restart policy and backoff apply.
    pub restart_pending: bool,
    /// That unplanned end counts as a failure for `restart.policy: on-failure`
    /// (non-zero code, signal, failed spawn, not ready in time).
    pub last_exit_failed: bool,
}

/// A rollout that failed; its template is not retried until the desired template changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutFailure {
    /// The template that failed.
    pub template: Template,
    /// Human-readable reason (shown in status and events).
    pub reason: String,
    /// When.
    pub at: Instant,
}

/// What the runtime knows about one app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedApp {
    /// Live workers.
    pub workers: BTreeMap<WorkerId, Worker>,
    /// Per-index history.
    pub slots: BTreeMap<u32, SlotHistory>,
    /// The last failed rollout, if its template is still the desired one.
    pub failed: Option<RolloutFailure>,
    /// The last template that reached Available (fail-closed fallback).
    pub last_good: Option<Template>,
    /// How to stop workers, remembered from the last desired state by
    /// [`Observed::record_desired`] so that an app whose manifest is gone still drains
    /// with its own shutdown timeout. `None`: [`DrainPolicy::default`].
    pub drain_policy: Option<DrainPolicy>,
}

/// How a draining worker is stopped (from `shutdown` and the listener mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Signal-to-SIGKILL time, and the bound of the wait for in-flight work.
    pub shutdown_timeout: Duration,
    /// Signal only once in-flight work is done (http/tcp modes).
    pub wait_for_idle: bool,
}

impl Default for DrainPolicy {
    /// The manifest defaults: 10 s, wait for idle (http mode).
    fn default() -> Self {
        DrainPolicy {
            shutdown_timeout: Duration::from_secs(10),
            wait_for_idle: true,
        }
    }
}

/// What the runtime knows about the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// By name; apps with live workers or history.
    pub apps: BTreeMap<AppName, ObservedApp>,
}

/// A decision for the runtime to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker for `index` from `template`.
    Spawn {
        /// App.
        app: AppName,
        /// Instance index.
        index: u32,
        /// Template (may be an older one after a failed rollout).
        template: Template,
    },
    /// Start routing traffic to it.
    MarkReady {
        /// App.
        app: AppName,
        /// Worker.
        worker: WorkerId,
    },
    /// Stop routing to it; the drain clock starts.
    Drain {
        /// App.
        app: AppName,
        /// Worker.
        worker: WorkerId,
        /// Why.
        reason: DrainReason,
    },
    /// Send the app's shutdown signal to the worker's process group.
    Signal {
        /// App.
        app: AppName,
        /// Worker.
        worker: WorkerId,
    },
    /// SIGKILL the worker's process group (shutdown deadline passed).
    Kill {
        /// App.
        app: AppName,
        /// Worker.
        worker: WorkerId,
    },
    /// The app reached Available at `template`: remember it as the last good one
    /// (the fail-closed fallback) and clear a failure of that template.
    MarkAvailable {
        /// App.
        app: AppName,
        /// The template every instance now runs, ready.
        template: Template,
    },
    /// Stop the rollout of `template`; old workers keep serving.
    FailRollout {
        /// App.
        app: AppName,
        /// Failed template.
        template: Template,
        /// Why (for status and events).
        reason: String,
    },
}

impl Action {
    /// The app the action is about.
    #[must_use]
    pub fn app(&self) -> &AppName {
        match self {
            Action::Spawn { app, .. }
            | Action::MarkReady { app, .. }
            | Action::Drain { app, .. }
            | Action::Signal { app, .. }
            | Action::Kill { app, .. }
            | Action::MarkAvailable { app, .. }
            | Action::FailRollout { app, .. } => app,
        }
    }

    /// The worker the action is about, if any.
    #[must_use]
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            Action::MarkReady { worker, .. }
            | Action::Drain { worker, .. }
            | Action::Signal { worker, .. }
            | Action::Kill { worker, .. } => Some(*worker),
            Action::Spawn { .. } | Action::MarkAvailable { .. } | Action::FailRollout { .. } => {
                None
            }
        }
    }
}

/// The planner's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In order.
    pub actions: Vec<Action>,
    /// The earliest time at which planning again may yield something new without any
    /// event (a backoff ending, a deadline, a delay readiness). `None`: only events.
    pub wake_at: Option<Instant>,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Phase of an app (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Nothing started yet.
    Pending,
    /// A rollout or scale is under way within its deadlines.
    Progressing,
    /// ready = desired, all current, nothing in progress.
    Available,
    /// Fewer ready than desired for another reason, or the last rollout failed.
    Degraded,
    /// Workers keep exiting and wait out a backoff.
    CrashLoopBackOff,
    /// The newest manifest was rejected (decided by the runtime, not the planner).
    Invalid,
    /// The manifest is gone; workers drain.
    Stopping,
}

//! The world: one record per app and per worker, the single owner of what the daemon
//! knows.
//!
//! An [`AppRecord`] holds the app's manifest input (current revision, specs still in use,
//! reload generation, errors), the planner's observed state ([`ObservedApp`]) and the
//! process facts of its workers ([`ProcFacts`]) side by side. Only the `on_*` methods
//! change a worker, and each changes the planner's view and the process facts together,
//! so they cannot drift apart. Status, metrics and `workers.json` are read-only views of
//! this (see `status` and `state`); the controller is the only writer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clusterd_core::event::EventKind;
use clusterd_core::load::LoadedApp;
use clusterd_core::model::{ListenMode, ReadinessKind};
use clusterd_core::plan::{
    self, Action, AppName, DesiredApp, ExitReason, ObservedApp, ReadinessGate, Revision, Template,
    WorkerId, WorkerState,
};
use clusterd_runtime::effects::{ListenKey, Started};
use clusterd_runtime::procfs::{self, GroupUsage};

use super::events::EventLog;

/// First wait before binding a port that was in use again; doubles up to [`LISTEN_RETRY_MAX`].
const LISTEN_RETRY_FIRST: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// Facts about a worker's process (the planner's view of it is in `ObservedApp`).
#[derive(Debug, Clone)]
pub struct ProcFacts {
    /// Pid, also its process group id.
    pub pid: u32,
    /// Start time in clock ticks since boot (to verify it after a daemon restart).
    pub start_time: u64,
    /// Private ports per proxied listener.
    pub ports: Vec<(ListenKey, u16)>,
    /// Wall-clock start (adopted: when this daemon took it over).
    pub spawned: SystemTime,
    /// CPU use between the last two samples.
    pub cpu_percent: Option<f64>,
    /// The last sample, for the next CPU figure.
    pub last_usage: Option<(Instant, GroupUsage)>,
    /// The per-worker cgroup, or why there is none.
    pub cgroup_note: Option<String>,
    /// Shared mode: the listeners the worker bound, `address:port/protocol by pid N`.
    pub bound: Vec<String>,
}

impl ProcFacts {
    fn new(started: Started) -> Self {
        ProcFacts {
            pid: started.pid,
            start_time: started.start_time,
            ports: started.ports,
            spawned: SystemTime::now(),
            cpu_percent: None,
            last_usage: None,
            cgroup_note: started.cgroup_note,
            bound: Vec::new(),
        }
    }
}

/// A manifest whose sockets could not be bound yet, retried with backoff.
#[derive(Debug, Clone)]
pub struct PendingListen {
    /// The revision waiting for its sockets.
    pub loaded: Arc<LoadedApp>,
    /// When to try again.
    pub retry_at: Instant,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Everything about one app.
#[derive(Debug)]
pub struct AppRecord {
    /// Name.
    pub name: AppName,
    /// The last valid manifest whose sockets are bound: what the app runs towards.
    /// `None`: never valid (or not bound yet), or removed.
    pub current: Option<Arc<LoadedApp>>,
    /// A valid manifest waiting for a port that is in use.
    pub pending_listen: Option<PendingListen>,
    /// The newest manifest was rejected: the diagnostics (phase Invalid).
    pub error: Option<String>,
    /// A runtime problem that keeps the app from its desired revision (a port in use).
    pub runtime_error: Option<String>,
    /// The manifest file.
    pub source: PathBuf,
    /// Bumped by `clusterd reload`.
    pub generation: u64,
    /// Specs of every revision that still has workers (a Spawn may name an old one).
    pub specs: BTreeMap<Revision, Arc<LoadedApp>>,
    /// When the daemon first saw the app.
    pub first_seen: SystemTime,
    /// The manifest is gone: drain and forget.
    pub removed: bool,
    /// Pids adopted from a previous daemon, until the app's sockets are bound (an
    /// inherit-mode socket is taken back from them rather than bound anew).
    pub adopted_pids: Vec<i32>,
    /// A socket was lost and bound anew: `runtime_error` says so until Available.
    pub listener_lost: bool,
    /// The planner's view of the app's workers and instance slots.
    pub observed: ObservedApp,
    /// Process facts of the same workers (same keys as `observed.workers`).
    pub procs: BTreeMap<WorkerId, ProcFacts>,
}

impl AppRecord {
    fn new(name: AppName, source: PathBuf) -> Self {
        AppRecord {
            name,
            current: None,
            pending_listen: None,
            error: None,
            runtime_error: None,
            source,
            generation: 0,
            specs: BTreeMap::new(),
            first_seen: SystemTime::now(),
            removed: false,
            adopted_pids: Vec::new(),
            listener_lost: false,
            observed: ObservedApp::default(),
            procs: BTreeMap::new(),
        }
    }

    /// What the planner should reach for this app, or `None` when it must not be
    /// planned at all. An app with no accepted manifest that is not removed (its file is
    /// still being written, or its port is taken) is left as it is: its adopted workers
    /// keep serving until the manifest is accepted.
    pub fn desired(&self, shutting_down: bool) -> Option<Option<DesiredApp>> {
        if shutting_down || self.removed {
            return Some(None);
        }
        self.current
            .as_ref()
            .map(|c| Some(desired_app(c, self.generation)))
    }

    /// The spec of a revision this app still uses.
    pub fn spec(&self, revision: &Revision) -> Option<&Arc<LoadedApp>> {
        self.specs.get(revision)
    }

    /// The worker's pid, if it is live.
    pub fn pid(&self, id: WorkerId) -> Option<u32> {
        self.procs.get(&id).map(|p| p.pid)
    }

    fn index_of(&self, id: WorkerId) -> Option<u32> {
        self.observed.workers.get(&id).map(|w| w.index)
    }
}

/// The daemon's whole picture.
#[derive(Debug, Default)]
pub struct World {
    /// Every app, by name.
    pub apps: BTreeMap<AppName, AppRecord>,
    /// Since when the daemon drains everything to exit.
    pub shutting_down: Option<Instant>,
    /// Workers changed since the state file was written.
    pub dirty: bool,
    next_worker_id: u64,
}

impl World {
    /// A fresh id for a worker about to be spawned or adopted.
    pub fn next_id(&mut self) -> WorkerId {
        self.next_worker_id += 1;
        WorkerId(self.next_worker_id)
    }

    fn record(&mut self, name: &AppName, source: PathBuf) -> &mut AppRecord {
        self.apps
            .entry(name.clone())
            .or_insert_with(|| AppRecord::new(name.clone(), source))
    }

    /// The app the manifest file names, found by the reload generation a previous
    /// daemon saved.
    pub fn restore_generation(&mut self, name: &AppName, generation: u64) {
        let record = self.record(name, PathBuf::new());
        record.generation = record.generation.max(generation);
    }

    /// Whether `loaded` differs from what the app runs towards (or waits to bind).
    pub fn is_change(&self, loaded: &LoadedApp) -> bool {
        let Some(app) = self.apps.get(&loaded.name) else {
            return true;
        };
        let same = |c: &LoadedApp| c.spec == loaded.spec && c.replicas == loaded.replicas;
        app.removed
            || app.error.is_some()
            || !(app.current.as_deref().is_some_and(same)
                || app.pending_listen.as_ref().is_some_and(|p| same(&p.loaded)))
    }

    /// The newest manifest of an app is valid and its sockets are bound: the app now runs
    /// towards it.
    pub fn on_manifest_accepted(&mut self, loaded: Arc<LoadedApp>, events: &EventLog) {
        let name = loaded.name.clone();
        let app = self.record(&name, loaded.source.clone());
        app.removed = false;
        app.error = None;
        app.runtime_error = None;
        app.pending_listen = None;
        app.adopted_pids.clear();
        app.source = loaded.source.clone();
        let unchanged = app
            .current
            .as_ref()
            .is_some_and(|c| c.spec == loaded.spec && c.replicas == loaded.replicas);
        if unchanged {
            return;
        }
        let what = match &app.current {
            None => format!(
                "revision {} ({} instances)",
                loaded.revision, loaded.replicas
            ),
            Some(c) if c.revision != loaded.revision => format!(
                "revision {} -> {}: rolling replacement",
                c.revision, loaded.revision
            ),
            Some(c) if c.replicas != loaded.replicas => {
                format!("scale {} -> {}", c.replicas, loaded.replicas)
            }
            Some(_) => "settings changed (no worker replaced)".to_string(),
        };
        events.push(Some(&name.0), None, EventKind::Manifest, what);
        app.specs.insert(loaded.revision.clone(), loaded.clone());
        app.current = Some(loaded);
    }

    /// The manifest is valid but a socket could not be bound: the app stays listed
    /// (with the error), keeps running its current revision if it has one, and the bind
    /// is retried with backoff. Logged once per distinct error.
    pub fn on_listen_failed(
        &mut self,
        loaded: Arc<LoadedApp>,
        error: String,
        now: Instant,
        events: &EventLog,
    ) {
        let name = loaded.name.clone();
        let app = self.record(&name, loaded.source.clone());
        app.removed = false;
        app.error = None;
        app.source = loaded.source.clone();
        let attempts = app.pending_listen.as_ref().map_or(0, |p| p.attempts) + 1;
        let delay = LISTEN_RETRY_FIRST
            .saturating_mul(1 << (attempts - 1).min(5))
            .min(LISTEN_RETRY_MAX);
        app.pending_listen = Some(PendingListen {
            loaded,
            retry_at: now + delay,
            attempts,
        });
        if app.runtime_error.as_deref() != Some(&error) {
            events.push(
                Some(&name.0),
                None,
                EventKind::ListenFailed,
                format!("{error}; retrying"),
            );
        }
        app.runtime_error = Some(error);
    }

    /// The newest manifest of an app (or a file that could not be read or parsed far
    /// enough to name one) was rejected: phase Invalid, the last good revision runs on.
    pub fn on_manifest_rejected(
        &mut self,
        key: &str,
        source: PathBuf,
        text: String,
        events: &EventLog,
    ) {
        let name = AppName(key.to_string());
        let app = self.record(&name, source);
        app.removed = false;
        if app.error.as_deref() != Some(&text) {
            events.push(
                Some(&name.0),
                None,
                EventKind::Invalid,
                format!("manifest rejected, keeping the last good revision:\n{text}"),
            );
            app.error = Some(text);
        }
    }

    /// A complete scan of the apps dir found no file for these apps: drain them.
    pub fn on_manifests_gone(&mut self, present: &[AppName], events: &EventLog) {
        for app in self.apps.values_mut() {
            if present.contains(&app.name) || app.removed {
                continue;
            }
            // A record with nothing accepted, no error and no worker was never an app.
            app.removed = true;
            app.pending_listen = None;
            events.push(
                Some(&app.name.0),
                None,
                EventKind::Removed,
                format!("{} is gone: draining every worker", app.source.display()),
            );
        }
    }

    /// An inherit-mode socket stopped listening and was bound anew: every worker still
    /// holds the dead one, so all are replaced (a new generation, like a reload), and the
    /// app shows the reason until it is Available again.
    pub fn on_listener_lost(&mut self, name: &AppName, what: String, events: &EventLog) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        events.push(Some(&name.0), None, EventKind::ListenFailed, what.clone());
        app.runtime_error = Some(what);
        if app.current.is_some() && !app.removed {
            app.generation += 1;
            app.listener_lost = true;
        }
    }

    /// `clusterd reload`: a new generation of the app's current revision.
    pub fn on_reload(&mut self, name: &AppName, events: &EventLog) -> Option<u64> {
        let app = self.apps.get_mut(name)?;
        if app.current.is_none() || app.removed {
            return None;
        }
        app.generation += 1;
        events.push(
            Some(&name.0),
            None,
            EventKind::Reload,
            format!("rolling restart requested (generation {})", app.generation),
        );
        Some(app.generation)
    }

    /// A worker was started.
    #[allow(clippy::too_many_arguments)]
    pub fn on_spawned(
        &mut self,
        name: &AppName,
        id: WorkerId,
        index: u32,
        template: &Template,
        started: Started,
        now: Instant,
        events: &EventLog,
    ) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        events.push(
            Some(&name.0),
            Some(index),
            EventKind::Spawn,
            format!(
                "pid {} (revision {}, generation {})",
                started.pid, template.revision, template.generation
            ),
        );
        app.observed.record_spawn(id, index, template.clone(), now);
        app.procs.insert(id, ProcFacts::new(started));
        self.dirty = true;
    }

    /// A worker could not be started.
    pub fn on_spawn_failed(
        &mut self,
        name: &AppName,
        index: u32,
        template: &Template,
        error: String,
        now: Instant,
        events: &EventLog,
    ) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        events.push(Some(&name.0), Some(index), EventKind::SpawnFailed, error);
        app.observed
            .record_spawn_failed(index, template.clone(), now);
    }

    /// A worker of the previous daemon was taken over. Ready workers count as ready at
    /// once (they were serving); a worker that was still starting is judged again by its
    /// readiness rule; one that was draining goes on draining.
    #[allow(clippy::too_many_arguments)]
    pub fn on_adopted(
        &mut self,
        name: &AppName,
        id: WorkerId,
        index: u32,
        template: Template,
        state: WorkerState,
        started: Started,
        now: Instant,
        events: &EventLog,
    ) {
        let app = self.record(name, PathBuf::new());
        events.push(
            Some(&name.0),
            Some(index),
            EventKind::Adopted,
            format!(
                "pid {} (revision {}, {state:?}) from the previous daemon",
                started.pid, template.revision
            ),
        );
        let pid = i32::try_from(started.pid).unwrap_or_default();
        app.adopted_pids.push(pid);
        match state {
            WorkerState::Ready => app.observed.record_adopted(id, index, template, now),
            WorkerState::Starting => app.observed.record_spawn(id, index, template, now),
            WorkerState::Draining => {
                app.observed.record_adopted(id, index, template, now);
                let drain = Action::Drain {
                    app: name.clone(),
                    worker: id,
                    reason: plan::DrainReason::AppRemoved,
                };
                app.observed.apply(&drain, now);
            }
        }
        app.procs.insert(id, ProcFacts::new(started));
        self.dirty = true;
    }

    /// A readiness report (probe, ipc) for a worker.
    pub fn on_ready_report(&mut self, name: &AppName, id: WorkerId) {
        if let Some(app) = self.apps.get_mut(name) {
            app.observed.record_ready_report(id);
        }
    }

    /// Shared mode: the worker's bind of `listener` by `pid` was answered.
    pub fn on_bound(
        &mut self,
        name: &AppName,
        id: WorkerId,
        pid: u32,
        listener: String,
        events: &EventLog,
    ) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let index = app.observed.workers.get(&id).map(|w| w.index);
        let Some(p) = app.procs.get_mut(&id) else {
            return;
        };
        let entry = format!("{listener} by pid {pid}");
        if !p.bound.contains(&entry) {
            events.push(
                Some(&name.0),
                index,
                EventKind::Bound,
                format!("pid {pid} bound the shared listener {listener}"),
            );
            p.bound.push(entry);
        }
    }

    /// Shared mode: the worker bound something else than a shared listener.
    pub fn on_stray_bind(
        &mut self,
        name: &AppName,
        id: WorkerId,
        message: String,
        events: &EventLog,
    ) {
        let index = self
            .apps
            .get(name)
            .and_then(|a| a.observed.workers.get(&id))
            .map(|w| w.index);
        events.push(Some(&name.0), index, EventKind::StrayBind, message);
    }

    /// `READY=1` from a process group: the worker whose pid it is.
    pub fn on_notify_ready(&mut self, pgid: u32) {
        for app in self.apps.values_mut() {
            if let Some(id) = app
                .procs
                .iter()
                .find(|(_, p)| p.pid == pgid)
                .map(|(id, _)| *id)
            {
                app.observed.record_ready_report(id);
                return;
            }
        }
    }

    /// A liveness probe result.
    pub fn on_liveness(
        &mut self,
        name: &AppName,
        id: WorkerId,
        ok: bool,
        detail: String,
        events: &EventLog,
    ) {
        let Some(w) = self
            .apps
            .get_mut(name)
            .and_then(|a| a.observed.workers.get_mut(&id))
        else {
            return;
        };
        if ok {
            w.liveness_failures = 0;
        } else {
            w.liveness_failures += 1;
            events.push(
                Some(&name.0),
                Some(w.index),
                EventKind::LivenessFailed,
                detail,
            );
        }
    }

    /// A worker's process exited: it leaves both the planner's view and the process
    /// facts. Returns whether it was known.
    pub fn on_exited(
        &mut self,
        name: &AppName,
        id: WorkerId,
        reason: ExitReason,
        now: Instant,
        events: &EventLog,
    ) -> bool {
        let Some(app) = self.apps.get_mut(name) else {
            return false;
        };
        let Some(facts) = app.procs.remove(&id) else {
            return false;
        };
        let worker = app.observed.workers.get(&id);
        let planned = worker.is_some_and(|w| w.drain.is_some());
        let index = worker.map(|w| w.index);
        let kind = if planned {
            EventKind::Stopped
        } else {
            EventKind::Exit
        };
        events.push(
            Some(&name.0),
            index,
            kind,
            format!("pid {} {reason}", facts.pid),
        );
        let stable_after = app.current.as_ref().map_or(plan::MIN_STABLE_RUN, |c| {
            plan::stable_after(&c.spec.restart.backoff)
        });
        app.observed.record_exit(id, reason, now, stable_after);
        self.dirty = true;
        true
    }

    /// Fresh CPU and memory figures, by pid. Memory feeds the planner's limit rule.
    pub fn on_sample(&mut self, usage: &BTreeMap<u32, GroupUsage>, now: Instant) {
        for app in self.apps.values_mut() {
            for (id, facts) in &mut app.procs {
                let Some(u) = usage.get(&facts.pid).copied() else {
                    continue;
                };
                if let Some((then, before)) = &facts.last_usage {
                    facts.cpu_percent = Some(procfs::cpu_percent(before, &u, now - *then));
                }
                facts.last_usage = Some((now, u));
                if let Some(w) = app.observed.workers.get_mut(id) {
                    w.rss = Some(u.rss_bytes);
                }
            }
        }
    }

    /// Records an action the effects carried out, and reports it. `Spawn` goes through
    /// [`World::on_spawned`] instead (it needs the new process).
    pub fn on_action(&mut self, action: &Action, now: Instant, events: &EventLog) {
        let name = action.app();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let worker = action.worker();
        let index = worker.and_then(|id| app.index_of(id));
        let pid = worker
            .and_then(|id| app.pid(id))
            .map_or_else(|| "?".to_string(), |p| p.to_string());
        match action {
            Action::Spawn { .. } => return,
            Action::MarkAvailable { template, .. } => {
                if std::mem::take(&mut app.listener_lost) {
                    app.runtime_error = None;
                }
                if app.observed.last_good.as_ref() != Some(template) {
                    events.push(
                        Some(&name.0),
                        None,
                        EventKind::Available,
                        format!(
                            "every instance ready at {}",
                            plan::describe_template(template)
                        ),
                    );
                }
            }
            Action::MarkReady { worker, .. } => {
                let ms = app
                    .procs
                    .get(worker)
                    .and_then(|p| p.spawned.elapsed().ok())
                    .map_or(0, |d| d.as_millis());
                let revision = app
                    .observed
                    .workers
                    .get(worker)
                    .map(|w| w.template.revision.clone());
                events.push(
                    Some(&name.0),
                    index,
                    EventKind::Ready,
                    format!(
                        "pid {pid} ready after {ms} ms (revision {})",
                        revision.map(|r| r.0).unwrap_or_default()
                    ),
                );
            }
            Action::Drain { reason, .. } => {
                events.push(
                    Some(&name.0),
                    index,
                    EventKind::Drain,
                    format!("pid {pid} draining: {reason:?}"),
                );
            }
            Action::Signal { worker, .. } => {
                let signal = stop_signal(app, *worker);
                events.push(
                    Some(&name.0),
                    index,
                    EventKind::Signal,
                    format!("{signal} to process group {pid}"),
                );
            }
            Action::Kill { .. } => {
                events.push(
                    Some(&name.0),
                    index,
                    EventKind::Kill,
                    format!("SIGKILL to process group {pid}: shutdown timeout passed"),
                );
            }
            Action::FailRollout {
                template, reason, ..
            } => {
                events.push(
                    Some(&name.0),
                    None,
                    EventKind::RolloutFailed,
                    format!(
                        "revision {} (generation {}): {reason}; the previous workers keep serving",
                        template.revision, template.generation
                    ),
                );
            }
        }
        app.observed.apply(action, now);
        self.dirty = true;
    }

    /// Forgets apps that are gone and have no worker left, and the specs no worker and
    /// no fallback needs. Returns the forgotten apps (their sockets must be closed) and,
    /// per remaining app, the listeners its specs still name (the rest may be closed).
    pub fn collect_garbage(&mut self, events: &EventLog) -> Vec<AppName> {
        let gone: Vec<AppName> = self
            .apps
            .values()
            .filter(|a| a.procs.is_empty() && a.observed.workers.is_empty())
            .filter(|a| {
                a.removed
                    || (a.current.is_none()
                        && a.error.is_none()
                        && a.pending_listen.is_none()
                        && a.runtime_error.is_none())
            })
            .map(|a| a.name.clone())
            .collect();
        for name in &gone {
            self.apps.remove(name);
            events.push(
                Some(&name.0),
                None,
                EventKind::Forgotten,
                "every worker stopped; sockets closed".into(),
            );
        }
        for app in self.apps.values_mut() {
            let live: Vec<Revision> = app
                .observed
                .workers
                .values()
                .map(|w| w.template.revision.clone())
                .collect();
            let current = app.current.as_ref().map(|c| c.revision.clone());
            let last_good = app.observed.last_good.as_ref().map(|t| t.revision.clone());
            app.specs.retain(|rev, _| {
                live.contains(rev)
                    || Some(rev) == current.as_ref()
                    || Some(rev) == last_good.as_ref()
            });
        }
        gone
    }

    /// The earliest time something is due without any event: a listen retry.
    pub fn wake_at(&self) -> Option<Instant> {
        self.apps
            .values()
            .filter_map(|a| a.pending_listen.as_ref().map(|p| p.retry_at))
            .min()
    }

    /// Whether every worker of every app has stopped.
    pub fn all_stopped(&self) -> bool {
        self.apps.values().all(|a| a.procs.is_empty())
    }
}

/// The stop signal of the worker's revision (normalized at load to `SIGTERM` form).
pub fn stop_signal(app: &AppRecord, id: WorkerId) -> String {
    app.observed
        .workers
        .get(&id)
        .and_then(|w| app.spec(&w.template.revision))
        .or(app.current.as_ref())
        .map_or_else(
            || "SIGTERM".to_string(),
            |s| s.spec.shutdown.signal.0.clone(),
        )
}

/// The planner's input for a loaded manifest.
pub fn desired_app(current: &LoadedApp, generation: u64) -> DesiredApp {
    let spec = &current.spec;
    let readiness = match spec.readiness.kind {
        None | Some(ReadinessKind::None) => ReadinessGate::Immediate,
        Some(ReadinessKind::Delay) => {
            ReadinessGate::Delay(spec.readiness.delay.map_or(Duration::ZERO, |d| d.0))
        }
        Some(_) => ReadinessGate::Reported,
    };
    DesiredApp {
        template: Template {
            revision: current.revision.clone(),
            generation,
        },
        replicas: current.replicas,
        rollout: spec.rollout,
        readiness,
        readiness_timeout: spec.readiness.timeout.0,
        shutdown_timeout: spec.shutdown.timeout.0,
        drain_waits_for_idle: spec
            .listen
            .iter()
            .any(|l| matches!(l.mode, ListenMode::Http | ListenMode::Tcp)),
        restart: spec.restart,
        memory_limit: spec.limits.memory.map(|m| m.0),
        liveness_failure_threshold: spec.liveness.as_ref().map(|l| l.failure_threshold),
    }
}

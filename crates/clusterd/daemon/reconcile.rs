//! The reconcile loop: the single owner of app and worker state.
//!
//! Every wake-up (manifest change, worker exit, readiness, a timer, an API request) ends
//! in the same place: build `Desired` from the manifests, refresh `Observed` from the
//! runtime, ask the pure planner what to do, do it, and sleep until the next event or the
//! planner's `wake_at`. The loop never acts on *why* it was woken, so a lost event costs
//! at most a delay until the next rescan, never a wrong host.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clusterd_core::load::{LoadContext, LoadedApp, ManifestFile};
use clusterd_core::model::{ListenMode, ReadinessKind};
use clusterd_core::plan::{
    self, Action, AppName, Desired, DesiredApp, ExitReason, Observed, ReadinessGate, Template,
    WorkerId,
};
use hyper::StatusCode;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::api::{ApiReply, ApiRequest};
use super::events::EventLog;
use super::process::{self, ListenerSet, WorkerProc};
use super::{state, status, Config, Msg};
use crate::cli::is_manifest_name;

/// Per-app state that is not the planner's business: manifests, sockets, processes.
pub struct AppState {
    /// Name.
    pub name: AppName,
    /// The last valid manifest (what the app runs towards). None: never valid, or removed.
    pub current: Option<Arc<LoadedApp>>,
    /// The newest manifest was rejected: the diagnostics (phase Invalid).
    pub error: Option<String>,
    /// A runtime problem that keeps the app from running (e.g. its port is taken).
    pub runtime_error: Option<String>,
    /// The manifest file.
    pub source: PathBuf,
    /// Bumped by `clusterd reload`.
    pub generation: u64,
    /// Specs of every revision that still has workers (a Spawn may name an old one).
    pub specs: HashMap<plan::Revision, Arc<LoadedApp>>,
    /// Bound public sockets and their proxies.
    pub listeners: ListenerSet,
    /// Live worker processes.
    pub workers: HashMap<WorkerId, WorkerProc>,
    /// When the daemon first saw the app.
    pub first_seen: SystemTime,
    /// The manifest is gone: drain and forget.
    pub removed: bool,
}

/// The reconcile loop's state.
pub struct Controller {
    config: Config,
    tx: mpsc::UnboundedSender<Msg>,
    events: EventLog,
    apps: BTreeMap<AppName, AppState>,
    observed: Observed,
    next_worker_id: u64,
    runtime: process::Runtime,
    shutting_down: Option<Instant>,
    /// A manifest was still being written: look again at this time.
    settle_until: Option<Instant>,
    /// Since when changes have been held back waiting for quiet files.
    settling_since: Option<Instant>,
    /// Workers of a previous daemon, verified and waiting for their app's manifest.
    adoptions: BTreeMap<AppName, Vec<(state::SavedWorker, clusterd_runtime::spawn::WorkerProcess)>>,
    /// Generations saved by the previous daemon.
    saved_generations: BTreeMap<AppName, u64>,
    /// What was last written to the state file (to write only on change).
    last_saved: Option<state::Saved>,
    /// When workers' CPU and memory were last sampled.
    last_sample: Option<Instant>,
    /// Workers changed since the state file was written.
    workers_changed: bool,
    /// GitOps: asks the sync loop for a sync now (`POST /v1/sync`).
    sync_trigger: Option<mpsc::Sender<clusterd_runtime::gitops::SyncReply>>,
    /// GitOps: the status JSON's `sync` block.
    sync: Option<clusterd_runtime::gitops::SyncStatus>,
}

const MAX_ROUNDS: usize = 16;
/// A changed manifest is applied once its file has been unchanged this long.
const QUIET_CHANGE: Duration = Duration::from_millis(250);
/// An invalid manifest is reported once its file has been unchanged this long.
const QUIET_ERROR: Duration = Duration::from_millis(500);

impl Controller {
    /// Prepares the loop (notify socket, log dir).
    ///
    /// # Errors
    /// When the notify socket cannot be bound in the state dir.
    pub fn new(
        config: Config,
        tx: mpsc::UnboundedSender<Msg>,
        events: EventLog,
        sync_trigger: Option<mpsc::Sender<clusterd_runtime::gitops::SyncReply>>,
    ) -> anyhow::Result<Self> {
        let runtime = process::Runtime::new(&config, tx.clone())?;
        let saved = state::load(&config.state_dir);
        let mut adoptions: BTreeMap<AppName, Vec<_>> = BTreeMap::new();
        for w in saved.workers.into_iter().filter(|w| w.ready) {
            let app = AppName(w.app.clone());
            match clusterd_runtime::spawn::adopt(&app, w.index, w.pid, w.start_time) {
                Ok(process) => adoptions.entry(app).or_default().push((w, process)),
                Err(e) => {
                    events.push(
                        Some(&w.app),
                        Some(w.index),
                        "adopt-skipped",
                        format!("pid {}: {e}", w.pid),
                    );
                }
            }
        }
        let saved_generations = saved
            .apps
            .into_iter()
            .map(|a| (AppName(a.name), a.generation))
            .collect();
        let sync = config
            .git
            .as_ref()
            .map(clusterd_runtime::gitops::SyncStatus::initial);
        Ok(Controller {
            sync,
            config,
            tx,
            events,
            apps: BTreeMap::new(),
            observed: Observed::default(),
            next_worker_id: 1,
            runtime,
            shutting_down: None,
            settle_until: None,
            settling_since: None,
            adoptions,
            saved_generations,
            last_saved: None,
            last_sample: None,
            workers_changed: true,
            sync_trigger,
        })
    }

    /// Runs until shutdown has drained every worker.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        self.rescan();
        self.adopt_pending();
        let mut stats = tokio::time::interval(Duration::from_secs(2));
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(self.config.rescan_every);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake_at = self.reconcile().await;
            if self.shutting_down.is_some() && self.apps.values().all(|a| a.workers.is_empty()) {
                self.events
                    .push(None, None, "stopped", "every worker has stopped".into());
                state::clear(&self.config.state_dir);
                return;
            }
            let sleep_until = wake_at
                .map(|t| t.max(Instant::now()))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        // Drain whatever else is queued before re-planning once.
                        while let Ok(msg) = rx.try_recv() {
                            self.handle(msg);
                        }
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(sleep_until.into()) => {}
                _ = stats.tick() => self.sample(),
                _ = rescan.tick() => self.rescan(),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = Instant::now();
        if matches!(msg, Msg::Exited { .. } | Msg::Api(..)) {
            self.workers_changed = true;
        }
        match msg {
            Msg::ManifestsChanged => self.rescan(),
            Msg::Exited { app, id, reason } => self.on_exit(&app, id, reason, now),
            Msg::Ready { app, id } => {
                if let Some(o) = self.observed.apps.get_mut(&app) {
                    o.record_ready_report(id);
                }
            }
            Msg::NotifyReady { pgid } => {
                if let Some((app, id)) = self.find_by_pgid(pgid) {
                    if let Some(o) = self.observed.apps.get_mut(&app) {
                        o.record_ready_report(id);
                    }
                }
            }
            Msg::Liveness {
                app,
                id,
                ok,
                detail,
            } => {
                if let Some(o) = self.observed.apps.get_mut(&app) {
                    if let Some(w) = o.workers.get_mut(&id) {
                        if ok {
                            w.liveness_failures = 0;
                        } else {
                            w.liveness_failures += 1;
                            let index = w.index;
                            self.events
                                .push(Some(&app.0), Some(index), "liveness-failed", detail);
                        }
                    }
                }
            }
            Msg::Api(request, reply) => self.answer(request, reply),
            Msg::Wake => {}
            Msg::Synced(report) => {
                if let Some(outcome) = report.outcome.as_ref().filter(|o| !o.is_noop()) {
                    let mut parts = Vec::new();
                    for (what, files) in [
                        ("added", &outcome.added),
                        ("changed", &outcome.changed),
                        ("removed", &outcome.removed),
                    ] {
                        if !files.is_empty() {
                            parts.push(format!("{what} {}", files.join(", ")));
                        }
                    }
                    self.events.push(
                        None,
                        None,
                        "sync",
                        format!(
                            "applied commit {}: {}",
                            outcome.commit.short(),
                            parts.join("; ")
                        ),
                    );
                    self.rescan();
                }
                if let (Some(e), false) = (
                    &report.status.error,
                    self.sync
                        .as_ref()
                        .is_some_and(|s| s.error == report.status.error),
                ) {
                    self.events.push(None, None, "sync-failed", e.clone());
                }
                self.sync = Some(report.status);
            }
            Msg::Shutdown => {
                if self.shutting_down.is_none() {
                    self.events.push(
                        None,
                        None,
                        "shutdown",
                        "draining every app before exit".into(),
                    );
                    self.shutting_down = Some(now);
                }
            }
        }
    }

    fn find_by_pgid(&self, pgid: u32) -> Option<(AppName, WorkerId)> {
        self.apps.values().find_map(|a| {
            a.workers
                .iter()
                .find(|(_, w)| w.pid == pgid)
                .map(|(id, _)| (a.name.clone(), *id))
        })
    }

    /// Re-reads the apps dir and updates each app's desired manifest.
    fn rescan(&mut self) {
        let now = Instant::now();
        let mut files = Vec::new();
        // Age of the most recently written manifest: a write younger than the quiet
        // period may be the first half of an edit.
        let mut newest_age: Option<Duration> = None;
        let entries = match std::fs::read_dir(&self.config.apps_dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.config.apps_dir.display(), "cannot read the apps dir");
                return;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_manifest_name(p))
            .collect();
        paths.sort();
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if let Some(age) = meta.modified().ok().and_then(|m| m.elapsed().ok()) {
                newest_age = Some(newest_age.map_or(age, |n| n.min(age)));
            }
            match std::fs::read(&path) {
                Ok(bytes) => files.push(ManifestFile { path, bytes }),
                Err(e) => {
                    tracing::warn!(error = %e, file = %path.display(), "cannot read manifest")
                }
            }
        }
        let incumbents = self
            .apps
            .values()
            .filter_map(|a| {
                a.current
                    .as_ref()
                    .map(|c| (a.name.clone(), c.source.clone()))
            })
            .collect();
        let mut report = clusterd_core::load::load(
            &files,
            &LoadContext {
                cpus: self.config.cpus,
                incumbents,
                // Until the spawn path runs shared listeners (issue 12), refuse them rather
                // than serve them through the tcp proxy.
                shared_mode_unavailable: Some(
                    "this daemon's spawn path does not run shared listeners yet".into(),
                ),
            },
        );
        if nix::unistd::geteuid().is_root() {
            refuse_insecure(&mut report, &self.config.apps_dir);
        }
        // An editor (or `cat >`) may still be writing. A half-written file can be invalid
        // or, worse, a valid but different manifest: judge a change only once the files
        // have been quiet for a moment, so a partial write never shows up as Invalid or
        // rolls anything. Bounded, so a file rewritten forever is still judged.
        let changes = report.apps.iter().any(|(n, l)| {
            self.apps
                .get(n)
                .and_then(|a| a.current.as_ref())
                .is_none_or(|c| c.spec != l.spec || c.replicas != l.replicas)
        });
        let quiet = if report.errors.is_empty() {
            QUIET_CHANGE
        } else {
            QUIET_ERROR
        };
        let settling_for = self.settling_since.map_or(Duration::ZERO, |t| now - t);
        if let Some(age) = newest_age.filter(|a| *a < quiet) {
            if (changes || !report.errors.is_empty()) && settling_for < Duration::from_secs(5) {
                let wait = quiet - age + Duration::from_millis(20);
                self.settling_since.get_or_insert(now);
                self.settle_until = Some(now + wait);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Msg::ManifestsChanged);
                });
                return;
            }
        }
        self.settling_since = None;
        self.settle_until = None;

        let mut seen = Vec::new();
        for (name, loaded) in report.apps {
            seen.push(name.clone());
            self.accept_manifest(name, Arc::new(loaded));
        }
        for (key, diagnostics) in report.errors {
            let name = AppName(key);
            seen.push(name.clone());
            let text = diagnostics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            let source = diagnostics
                .first()
                .map(|d| d.file.clone())
                .unwrap_or_default();
            let app = self
                .apps
                .entry(name.clone())
                .or_insert_with(|| AppState::new(name.clone(), source));
            app.removed = false;
            if app.error.as_deref() != Some(&text) {
                self.events.push(
                    Some(&name.0),
                    None,
                    "invalid",
                    format!("manifest rejected, keeping the last good revision:\n{text}"),
                );
                app.error = Some(text);
            }
        }
        for app in self.apps.values_mut() {
            if !seen.contains(&app.name) && !app.removed {
                app.removed = true;
                self.events.push(
                    Some(&app.name.0),
                    None,
                    "removed",
                    format!("{} is gone: draining every worker", app.source.display()),
                );
            }
        }
    }

    fn accept_manifest(&mut self, name: AppName, loaded: Arc<LoadedApp>) {
        let adopted_pids: Vec<i32> = self
            .adoptions
            .get(&name)
            .map(|v| v.iter().map(|(w, _)| w.pid).collect())
            .unwrap_or_default();
        let app = self
            .apps
            .entry(name.clone())
            .or_insert_with(|| AppState::new(name.clone(), loaded.source.clone()));
        app.removed = false;
        app.error = None;
        app.source = loaded.source.clone();
        let unchanged = app
            .current
            .as_ref()
            .is_some_and(|c| c.spec == loaded.spec && c.replicas == loaded.replicas);
        if unchanged {
            return;
        }
        // Bind (or keep) the new revision's sockets before accepting it: a port that
        // cannot be bound must not take down the running revision.
        if let Err(e) = app
            .listeners
            .ensure(&name, &loaded.spec.listen, &adopted_pids)
        {
            let msg = e.to_string();
            if app.runtime_error.as_deref() != Some(&msg) {
                self.events
                    .push(Some(&name.0), None, "listen-failed", msg.clone());
            }
            app.runtime_error = Some(msg);
            return;
        }
        app.runtime_error = None;
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
        self.events.push(Some(&name.0), None, "manifest", what);
        app.specs.insert(loaded.revision.clone(), loaded.clone());
        app.current = Some(loaded);
    }

    /// Takes over the previous daemon's workers: Ready at once (they were serving), routed
    /// again in proxy modes, and replaced by the planner like any other worker if their
    /// revision is no longer the desired one.
    fn adopt_pending(&mut self) {
        let now = Instant::now();
        for (name, workers) in std::mem::take(&mut self.adoptions) {
            let generation = self.saved_generations.get(&name).copied().unwrap_or(0);
            let app = self.apps.entry(name.clone()).or_insert_with(|| {
                let mut a = AppState::new(name.clone(), PathBuf::new());
                // The manifest is gone: drain what we adopt.
                a.removed = true;
                a
            });
            app.generation = app.generation.max(generation);
            let listens = app
                .current
                .as_ref()
                .map(|c| c.spec.listen.clone())
                .unwrap_or_default();
            for (saved, process) in workers {
                let id = WorkerId(self.next_worker_id);
                self.next_worker_id += 1;
                let worker = self.runtime.adopt(&name, id, &saved, process, &listens);
                app.listeners.route(id, &worker.ports);
                self.events.push(
                    Some(&name.0),
                    Some(saved.index),
                    "adopted",
                    format!(
                        "pid {} (revision {}) from the previous daemon",
                        saved.pid, saved.revision
                    ),
                );
                self.observed
                    .apps
                    .entry(name.clone())
                    .or_default()
                    .record_adopted(id, saved.index, worker.template.clone(), now);
                app.workers.insert(id, worker);
            }
        }
    }

    /// Writes the live workers down for a future daemon (see `state`).
    fn persist(&mut self) {
        if self.shutting_down.is_some() || !self.workers_changed {
            return;
        }
        self.workers_changed = false;
        let mut saved = state::Saved::default();
        for app in self.apps.values() {
            saved.apps.push(state::SavedApp {
                name: app.name.0.clone(),
                generation: app.generation,
            });
            let observed = self.observed.apps.get(&app.name);
            for (id, w) in &app.workers {
                let ready = observed
                    .and_then(|o| o.workers.get(id))
                    .is_some_and(|o| o.state == clusterd_core::plan::WorkerState::Ready);
                saved.workers.push(state::SavedWorker {
                    app: app.name.0.clone(),
                    index: w.index,
                    pid: i32::try_from(w.pid).unwrap_or_default(),
                    start_time: w.start_time(),
                    revision: w.template.revision.0.clone(),
                    generation: w.template.generation,
                    ready,
                    ports: w
                        .ports
                        .iter()
                        .map(|(k, p)| {
                            let (a, port) = k.address_port();
                            (a, port, *p)
                        })
                        .collect(),
                });
            }
        }
        saved
            .workers
            .sort_by_key(|w| (w.app.clone(), w.index, w.pid));
        if self.last_saved.as_ref() != Some(&saved) {
            state::store(&self.config.state_dir, &saved);
            self.last_saved = Some(saved);
        }
    }

    fn desired(&self) -> Desired {
        let mut desired = Desired::default();
        if self.shutting_down.is_some() {
            return desired;
        }
        for app in self.apps.values() {
            let (Some(current), false) = (&app.current, app.removed) else {
                continue;
            };
            desired
                .apps
                .insert(app.name.clone(), desired_app(current, app.generation));
        }
        desired
    }

    /// Plans and acts until the planner has nothing more to say; returns when to wake.
    async fn reconcile(&mut self) -> Option<Instant> {
        let mut wake_at = None;
        for _ in 0..MAX_ROUNDS {
            let now = Instant::now();
            self.refresh_inflight();
            let desired = self.desired();
            self.observed.record_desired(&desired);
            let plan = plan::plan(&desired, &self.observed, now);
            wake_at = plan.wake_at;
            if plan.actions.is_empty() {
                break;
            }
            for action in plan.actions {
                self.execute(action, now).await;
            }
        }
        self.collect_garbage();
        self.persist();
        if let Some(started) = self.shutting_down {
            // A worker that ignores even SIGKILL's reaping must not keep the daemon forever.
            let hard = started + Duration::from_secs(3600);
            wake_at = Some(wake_at.map_or(hard, |w| w.min(hard)));
        }
        if let Some(settle) = self.settle_until.filter(|s| *s > Instant::now()) {
            wake_at = Some(wake_at.map_or(settle, |w| w.min(settle)));
        }
        wake_at
    }

    fn refresh_inflight(&mut self) {
        for app in self.apps.values() {
            let Some(observed) = self.observed.apps.get_mut(&app.name) else {
                continue;
            };
            for (id, w) in &mut observed.workers {
                w.inflight = app.listeners.inflight(*id);
            }
        }
    }

    async fn execute(&mut self, action: Action, now: Instant) {
        self.workers_changed = true;
        match &action {
            Action::Spawn {
                app,
                index,
                template,
            } => {
                self.spawn(app, *index, template, now).await;
                return;
            }
            Action::MarkAvailable { app, template } => {
                let first = self
                    .observed
                    .apps
                    .get(app)
                    .and_then(|o| o.last_good.as_ref())
                    != Some(template);
                if first {
                    self.events.push(
                        Some(&app.0),
                        None,
                        "available",
                        format!(
                            "every instance ready at {}",
                            plan::describe_template(template)
                        ),
                    );
                }
            }
            Action::MarkReady { app, worker } => {
                if let Some(a) = self.apps.get_mut(app) {
                    if let Some(w) = a.workers.get_mut(worker) {
                        a.listeners.route(*worker, &w.ports);
                        w.on_ready(
                            &self.runtime,
                            app,
                            *worker,
                            a.specs.get(&w.template.revision).map(|s| &s.spec),
                        );
                        let ms = w.spawned.elapsed().map_or(0, |d| d.as_millis());
                        self.events.push(
                            Some(&app.0),
                            Some(w.index),
                            "ready",
                            format!(
                                "pid {} ready after {ms} ms (revision {})",
                                w.pid, w.template.revision
                            ),
                        );
                    }
                }
            }
            Action::Drain {
                app,
                worker,
                reason,
            } => {
                if let Some(a) = self.apps.get_mut(app) {
                    a.listeners.stop_routing(*worker);
                    if a.listeners.has_proxy() {
                        // The planner signals once nothing is in flight: wake up for that.
                        self.runtime.wake_when(a.listeners.drained(*worker));
                    }
                    if let Some(w) = a.workers.get_mut(worker) {
                        w.stop_probes();
                        self.events.push(
                            Some(&app.0),
                            Some(w.index),
                            "drain",
                            format!("pid {} draining: {reason:?}", w.pid),
                        );
                    }
                }
            }
            Action::Signal { app, worker } => {
                if let Some(a) = self.apps.get(app) {
                    if let Some(w) = a.workers.get(worker) {
                        let signal = a.specs.get(&w.template.revision).map_or_else(
                            || "SIGTERM".to_string(),
                            |s| s.spec.shutdown.signal.0.clone(),
                        );
                        w.signal(&signal);
                        self.events.push(
                            Some(&app.0),
                            Some(w.index),
                            "signal",
                            format!("{signal} to process group {}", w.pid),
                        );
                    }
                }
            }
            Action::Kill { app, worker } => {
                if let Some(a) = self.apps.get(app) {
                    if let Some(w) = a.workers.get(worker) {
                        w.kill();
                        self.events.push(
                            Some(&app.0),
                            Some(w.index),
                            "kill",
                            format!(
                                "SIGKILL to process group {}: shutdown timeout passed",
                                w.pid
                            ),
                        );
                    }
                }
            }
            Action::FailRollout {
                app,
                template,
                reason,
            } => {
                self.events.push(
                    Some(&app.0),
                    None,
                    "rollout-failed",
                    format!(
                        "revision {} (generation {}): {reason}; the previous workers keep serving",
                        template.revision, template.generation
                    ),
                );
            }
        }
        if let Some(o) = self.observed.apps.get_mut(action_app(&action)) {
            o.apply(&action, now);
        }
    }

    async fn spawn(&mut self, name: &AppName, index: u32, template: &Template, now: Instant) {
        let id = WorkerId(self.next_worker_id);
        self.next_worker_id += 1;
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(spec) = app.specs.get(&template.revision).cloned() else {
            tracing::error!(app = %name, revision = %template.revision, "no spec for revision");
            return;
        };
        let result = self
            .runtime
            .spawn(name, id, index, template, &spec, &app.listeners)
            .await;
        let observed = self.observed.apps.entry(name.clone()).or_default();
        match result {
            Ok(worker) => {
                self.events.push(
                    Some(&name.0),
                    Some(index),
                    "spawn",
                    format!(
                        "pid {} (revision {}, generation {})",
                        worker.pid, template.revision, template.generation
                    ),
                );
                observed.record_spawn(id, index, template.clone(), now);
                app.workers.insert(id, worker);
            }
            Err(e) => {
                self.events
                    .push(Some(&name.0), Some(index), "spawn-failed", e.to_string());
                observed.record_spawn_failed(index, template.clone(), now);
            }
        }
    }

    fn on_exit(&mut self, name: &AppName, id: WorkerId, reason: ExitReason, now: Instant) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(worker) = app.workers.remove(&id) else {
            return;
        };
        app.listeners.remove(id);
        self.runtime.release(&worker);
        let planned = self
            .observed
            .apps
            .get(name)
            .and_then(|o| o.workers.get(&id))
            .is_some_and(|w| w.drain.is_some());
        let how = describe_exit(reason);
        let kind = if planned { "stopped" } else { "exit" };
        self.events.push(
            Some(&name.0),
            Some(worker.index),
            kind,
            format!("pid {} {how}", worker.pid),
        );
        let stable_after = app.current.as_ref().map_or(plan::MIN_STABLE_RUN, |c| {
            plan::stable_after(&c.spec.restart.backoff)
        });
        if let Some(o) = self.observed.apps.get_mut(name) {
            o.record_exit(id, reason, now, stable_after);
        }
    }

    /// Samples CPU and memory, and rotates logs. Memory feeds the planner's limit rule.
    fn sample(&mut self) {
        if self.apps.values().all(|a| a.workers.is_empty()) {
            return;
        }
        // Memory limits need a fresh RSS every 2 s; without any, a sample every 10 s keeps
        // `status` CPU%/RSS useful at a fifth of the cost of walking /proc.
        let limits = self.apps.values().any(|a| {
            a.current
                .as_ref()
                .is_some_and(|c| c.spec.limits.memory.is_some())
        });
        let now = Instant::now();
        if !limits
            && self
                .last_sample
                .is_some_and(|t| now - t < Duration::from_secs(10))
        {
            return;
        }
        self.last_sample = Some(now);
        let usage = clusterd_runtime::procfs::usage_by_group();
        for app in self.apps.values_mut() {
            let Some(observed) = self.observed.apps.get_mut(&app.name) else {
                continue;
            };
            for (id, w) in &mut app.workers {
                let pgid = i32::try_from(w.pid).unwrap_or_default();
                w.sample(usage.get(&pgid).copied().unwrap_or_default());
                if let Some(o) = observed.workers.get_mut(id) {
                    o.rss = w.rss;
                }
            }
            if let Some(current) = &app.current {
                self.runtime.rotate_logs(&app.name, &current.spec.logs);
            }
        }
    }

    fn collect_garbage(&mut self) {
        let gone: Vec<AppName> = self
            .apps
            .values()
            .filter(|a| (a.removed || a.current.is_none()) && a.workers.is_empty())
            .filter(|a| a.removed || a.error.is_none())
            .map(|a| a.name.clone())
            .collect();
        for name in gone {
            if let Some(app) = self.apps.remove(&name) {
                app.listeners.close();
                self.events.push(
                    Some(&name.0),
                    None,
                    "forgotten",
                    "every worker stopped; sockets closed".into(),
                );
            }
            self.observed.apps.remove(&name);
        }
        for app in self.apps.values_mut() {
            let live: Vec<plan::Revision> = app
                .workers
                .values()
                .map(|w| w.template.revision.clone())
                .collect();
            let current = app.current.as_ref().map(|c| c.revision.clone());
            let last_good = self
                .observed
                .apps
                .get(&app.name)
                .and_then(|o| o.last_good.as_ref())
                .map(|t| t.revision.clone());
            app.specs.retain(|rev, _| {
                live.contains(rev)
                    || Some(rev) == current.as_ref()
                    || Some(rev) == last_good.as_ref()
            });
            let keep: Vec<_> = app
                .specs
                .values()
                .flat_map(|s| s.spec.listen.clone())
                .collect();
            app.listeners.retain(&keep);
        }
    }

    fn answer(&mut self, request: ApiRequest, reply: oneshot::Sender<ApiReply>) {
        let answer = match request {
            ApiRequest::Status(None) => {
                ApiReply::Json(StatusCode::OK, json!(self.status_report(None)))
            }
            ApiRequest::Status(Some(name)) => {
                let report = self.status_report(Some(&name));
                match report.apps.into_iter().next() {
                    Some(app) => ApiReply::Json(StatusCode::OK, json!(app)),
                    None => not_found(&name),
                }
            }
            ApiRequest::Reload(target) => self.reload(target),
            ApiRequest::Sync => {
                let Some(trigger) = self.sync_trigger.clone() else {
                    let _ = reply.send(ApiReply::Json(
                        StatusCode::CONFLICT,
                        json!({"error": "this daemon does not follow a git repository (start it with --git-repo)"}),
                    ));
                    return;
                };
                // A fetch can take as long as the git timeout: answer from a task so the
                // loop keeps reconciling meanwhile.
                tokio::spawn(async move {
                    let (tx, rx) = oneshot::channel();
                    let answer = if trigger.send(tx).await.is_err() {
                        ApiReply::Json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            json!({"error": "the sync loop has stopped"}),
                        )
                    } else {
                        match rx.await {
                            Ok(Ok(o)) => ApiReply::Json(
                                StatusCode::OK,
                                json!({"commit": o.commit.0, "added": o.added, "changed": o.changed, "removed": o.removed}),
                            ),
                            Ok(Err(e)) => {
                                ApiReply::Json(StatusCode::BAD_GATEWAY, json!({"error": e}))
                            }
                            Err(_) => ApiReply::Json(
                                StatusCode::SERVICE_UNAVAILABLE,
                                json!({"error": "the sync loop has stopped"}),
                            ),
                        }
                    };
                    let _ = reply.send(answer);
                });
                return;
            }
            ApiRequest::Metrics => ApiReply::Text(status::metrics(&self.status_report(None))),
            ApiRequest::Info => ApiReply::Json(
                StatusCode::OK,
                json!(crate::api_types::DaemonInfo {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    apps_dir: self.config.apps_dir.display().to_string(),
                    log_dir: self.config.log_dir.display().to_string(),
                    state_dir: self.config.state_dir.display().to_string(),
                }),
            ),
        };
        let _ = reply.send(answer);
    }

    fn reload(&mut self, target: Option<String>) -> ApiReply {
        let names: Vec<AppName> = match target {
            Some(name) => {
                let name = AppName(name);
                match self.apps.get(&name) {
                    Some(a) if a.current.is_some() && !a.removed => vec![name],
                    Some(_) => {
                        return ApiReply::Json(
                            StatusCode::CONFLICT,
                            json!({"error": format!("{} has no valid manifest to reload", name)}),
                        )
                    }
                    None => return not_found(&name.0),
                }
            }
            None => self
                .apps
                .values()
                .filter(|a| a.current.is_some() && !a.removed)
                .map(|a| a.name.clone())
                .collect(),
        };
        let mut accepted = Vec::new();
        for name in names {
            if let Some(app) = self.apps.get_mut(&name) {
                app.generation += 1;
                self.events.push(
                    Some(&name.0),
                    None,
                    "reload",
                    format!("rolling restart requested (generation {})", app.generation),
                );
                accepted.push(json!({"app": name.0, "generation": app.generation}));
            }
        }
        ApiReply::Json(StatusCode::ACCEPTED, json!({"reloads": accepted}))
    }

    fn status_report(&self, only: Option<&str>) -> crate::api_types::StatusReport {
        let now = Instant::now();
        let desired = self.desired();
        let apps = self
            .apps
            .values()
            .filter(|a| only.is_none_or(|n| n == a.name.0))
            .map(|a| {
                status::app_status(
                    a,
                    desired.apps.get(&a.name),
                    self.observed.apps.get(&a.name),
                    now,
                )
            })
            .collect();
        let sync = self.sync.as_ref().map(|s| crate::api_types::SyncStatus {
            repo: s.repo.clone(),
            git_ref: s.git_ref.clone(),
            commit: s.commit.clone(),
            error: s.error.clone(),
            at: s.at.map(super::rfc3339),
        });
        crate::api_types::StatusReport { apps, sync }
    }
}

impl AppState {
    fn new(name: AppName, source: PathBuf) -> Self {
        AppState {
            name,
            current: None,
            error: None,
            runtime_error: None,
            source,
            generation: 0,
            specs: HashMap::new(),
            listeners: ListenerSet::default(),
            workers: HashMap::new(),
            first_seen: SystemTime::now(),
            removed: false,
        }
    }
}

fn desired_app(current: &LoadedApp, generation: u64) -> DesiredApp {
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
        drain_waits_for_idle: spec.listen.iter().any(|l| l.mode != ListenMode::Inherit),
        restart: spec.restart,
        memory_limit: spec.limits.memory.map(|m| m.0),
        liveness_failure_threshold: spec.liveness.as_ref().map(|l| l.failure_threshold),
    }
}

fn action_app(action: &Action) -> &AppName {
    match action {
        Action::Spawn { app, .. }
        | Action::MarkReady { app, .. }
        | Action::Drain { app, .. }
        | Action::Signal { app, .. }
        | Action::Kill { app, .. }
        | Action::FailRollout { app, .. }
        | Action::MarkAvailable { app, .. } => app,
    }
}

/// `exited with code 1`, `killed by SIGKILL`.
pub fn describe_exit(reason: ExitReason) -> String {
    match reason {
        ExitReason::Code(c) => format!("exited with code {c}"),
        ExitReason::Signal(s) => {
            let name = nix::sys::signal::Signal::try_from(s)
                .map_or_else(|_| format!("signal {s}"), |s| s.as_str().to_string());
            format!("killed by {name}")
        }
        ExitReason::SpawnFailed => "could not be started".to_string(),
        ExitReason::Unknown => "exited (status unknown: adopted worker)".to_string(),
    }
}

fn not_found(name: &str) -> ApiReply {
    ApiReply::Json(
        StatusCode::NOT_FOUND,
        json!({"error": format!("no app named {name}")}),
    )
}

/// As root, a manifest decides what runs as root: like sshd's StrictModes, refuse one
/// that someone other than root could have written (the file or its directory owned by
/// another user, or writable by group or others). The app keeps its last good revision
/// (phase Invalid), exactly as for a manifest that does not parse.
fn refuse_insecure(report: &mut clusterd_core::LoadReport, apps_dir: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let problem = |path: &std::path::Path, what: &str| -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        let mode = meta.mode() & 0o7777;
        if meta.uid() != 0 {
            Some(format!(
                "refusing {what} {}: owned by uid {}, not root (fix: chown root {})",
                path.display(),
                meta.uid(),
                path.display()
            ))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "refusing {what} {}: writable by group or others (mode {mode:04o}; fix: chmod go-w {})",
                path.display(),
                path.display()
            ))
        } else {
            None
        }
    };
    let dir_problem = problem(apps_dir, "the apps dir");
    let names: Vec<AppName> = report.apps.keys().cloned().collect();
    for name in names {
        let source = report.apps[&name].source.clone();
        let Some(message) = dir_problem.clone().or_else(|| problem(&source, "manifest")) else {
            continue;
        };
        report.apps.remove(&name);
        report
            .errors
            .entry(name.0.clone())
            .or_default()
            .push(clusterd_core::Diagnostic {
                file: source,
                line: 1,
                column: 1,
                message,
            });
    }
}

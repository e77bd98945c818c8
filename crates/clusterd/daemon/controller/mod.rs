//! The controller: wires the world, the pure planner and the effects.
//!
//! Every wake-up (a file changed, a worker reported, a timer, an API request) ends the
//! same way: take in what changed, plan every app from the whole picture, carry the
//! actions out through [`Effects`] and record them in the [`World`], then sleep until
//! the next message or the earliest time something is due. The controller never acts on
//! *why* it was woken, so a lost event costs a delay, never a wrong host. Nothing runs
//! periodically when nothing changes: exits come from pidfds, files from inotify, and
//! timers only when the planner, a held-back file, a listen retry, a memory limit or
//! log rotation asks for one.

mod answers;
mod refuse;

use refuse::refuse_insecure;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterd_core::event::EventKind;
use clusterd_core::load::LoadedApp;
use clusterd_core::plan::{self, Action, AppName, WorkerState};
use clusterd_runtime::effects::{AdoptRequest, Effects, Report, SpawnRequest};
use clusterd_runtime::tls::CertEvent;
use hyper::StatusCode;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::api::ApiReply;
use super::events::EventLog;
use super::intake::{Intake, Scan};
use super::world::{self, World};
use super::{state, Config, Msg};

/// Re-planning rounds per wake-up (a plan's actions may enable more).
const MAX_ROUNDS: usize = 16;
/// Memory limits need a fresh RSS this often.
const SAMPLE_FOR_LIMITS: Duration = Duration::from_secs(2);
/// A status or metrics request samples CPU/RSS if the last sample is older than this.
const SAMPLE_ON_DEMAND: Duration = Duration::from_secs(1);
/// Log sizes are checked this often while workers run.
const ROTATE_EVERY: Duration = Duration::from_secs(10);
/// A backstop scan of the apps dir (cheap: stat only, nothing is read unless changed).
const RESCAN_BACKSTOP: Duration = Duration::from_secs(60);

/// The daemon's heart. Generic over the host so tests run it against a fake.
pub struct Controller<E: Effects> {
    config: Config,
    world: World,
    effects: E,
    intake: Intake,
    events: EventLog,
    /// A held-back manifest must be looked at again by then.
    recheck_at: Option<Instant>,
    last_sample: Option<Instant>,
    next_rotation: Option<Instant>,
    next_rescan: Instant,
    last_saved: Option<state::Saved>,
    /// The worker state could not be written (shown in status, logged once).
    state_error: Option<String>,
    /// GitOps: asks the sync loop for a sync now (`POST /v1/sync`).
    sync_trigger: Option<mpsc::Sender<clusterd_runtime::gitops::SyncReply>>,
    /// GitOps: the status JSON's `sync` block.
    sync: Option<clusterd_runtime::gitops::SyncStatus>,
    /// Asks the owner to watch the apps dir again (it was removed and may come back).
    rewatch: Option<Box<dyn FnMut() -> bool + Send>>,
    watching: bool,
    /// The planner's clock (`Instant::now`, or a test's manual clock).
    clock: Box<dyn Fn() -> Instant + Send>,
    /// Adoption and the first scan are done (they happen once, even if `run_until`
    /// returns for an upgrade attempt and is called again).
    started: bool,
    /// Told once the first plan has been carried out: this daemon serves now.
    on_started: Option<oneshot::Sender<()>>,
    /// Handed-over sockets nobody claimed have been released (after the first scan
    /// with nothing held back).
    settled: bool,
    /// An upgrade was asked for (`POST /v1/upgrade` or SIGUSR2): return to the owner,
    /// which holds the real host and starts the next daemon.
    upgrade: Option<Option<oneshot::Sender<ApiReply>>>,
    /// Adopted Ready workers not yet given traffic: the planner never marks them ready
    /// again, so they are routed once their app's sockets are bound.
    unrouted: Vec<(AppName, plan::WorkerId)>,
}

/// Why [`Controller::run_until`] returned.
#[derive(Debug)]
pub enum Stop {
    /// Shutdown drained every worker, or every sender is gone.
    Stopped,
    /// Start the next daemon and hand over; answer the requester (if any) with the
    /// outcome. The world is written down (`workers.json`) and stays frozen meanwhile.
    Upgrade(Option<oneshot::Sender<ApiReply>>),
}

impl<E: Effects> Controller<E> {
    /// A controller over `effects`; `rewatch` re-establishes the apps dir watch (returns
    /// whether it now watches).
    pub fn new(
        config: Config,
        effects: E,
        events: EventLog,
        sync_trigger: Option<mpsc::Sender<clusterd_runtime::gitops::SyncReply>>,
        rewatch: Option<Box<dyn FnMut() -> bool + Send>>,
    ) -> Self {
        let sync = config
            .git
            .as_ref()
            .map(clusterd_runtime::gitops::SyncStatus::initial);
        let intake = Intake::new(config.apps_dir.clone(), config.cpus);
        Controller {
            world: World::default(),
            effects,
            intake,
            events,
            recheck_at: None,
            last_sample: None,
            next_rotation: None,
            next_rescan: Instant::now() + RESCAN_BACKSTOP,
            last_saved: None,
            state_error: None,
            sync_trigger,
            sync,
            watching: rewatch.is_some(),
            rewatch,
            config,
            clock: Box::new(Instant::now),
            started: false,
            on_started: None,
            settled: false,
            upgrade: None,
            unrouted: Vec::new(),
        }
    }

    /// `tx` is told once the first plan has been carried out (workers adopted, sockets
    /// claimed): what an upgraded daemon waits for before telling its predecessor.
    pub fn notify_started(&mut self, tx: oneshot::Sender<()>) {
        self.on_started = Some(tx);
    }

    /// The host (the owner hands its sockets over on upgrade).
    pub fn effects_mut(&mut self) -> &mut E {
        &mut self.effects
    }

    /// The host, once the controller is done.
    pub fn into_effects(self) -> E {
        self.effects
    }

    /// An upgrade failed: the next daemon may have written `workers.json` before it
    /// died, so write ours again at the next reconcile.
    pub fn upgrade_failed(&mut self) {
        self.last_saved = None;
        self.world.dirty = true;
    }

    /// Replaces the clock (tests drive time by hand).
    #[cfg(test)]
    pub fn with_clock(mut self, clock: impl Fn() -> Instant + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    /// The world, for tests.
    #[cfg(test)]
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The effects, for tests.
    #[cfg(test)]
    pub fn effects(&self) -> &E {
        &self.effects
    }

    /// Why the worker state cannot be written, if it cannot.
    #[cfg(test)]
    pub fn state_error(&self) -> Option<&str> {
        self.state_error.as_deref()
    }

    /// Loads (parses of the whole set) so far.
    #[cfg(test)]
    pub fn manifest_loads(&self) -> usize {
        self.intake.loads_total
    }

    /// Manifest files read so far (a read of an unchanged file is a bug).
    #[cfg(test)]
    pub fn manifest_reads(&self) -> usize {
        self.intake.reads_total
    }

    /// Reads the apps dir, takes over the previous daemon's workers, and binds sockets.
    /// Adoption happens before any manifest is accepted, so an inherit-mode socket is
    /// taken back from the adopted workers rather than bound anew; and an app is only
    /// ever drained for a manifest that a complete scan did not find, never for one
    /// that was still being written.
    pub fn start(&mut self) {
        let now = self.now();
        let saved = state::load(&self.config.state_dir);
        let scan = self.scan_at(now);
        let specs: BTreeMap<AppName, Arc<LoadedApp>> = scan
            .report
            .as_ref()
            .map(|r| {
                r.apps
                    .iter()
                    .map(|(n, a)| (n.clone(), Arc::new(a.clone())))
                    .collect()
            })
            .unwrap_or_default();
        for app in &saved.apps {
            let name = AppName(app.name.clone());
            if specs.contains_key(&name) || saved.workers.iter().any(|w| w.app == app.name) {
                self.world.restore_generation(&name, app.generation);
            }
        }
        for w in saved.workers {
            let Some(state) = w.state() else { continue };
            let app = AppName(w.app.clone());
            let id = self.world.next_id();
            let listens = specs
                .get(&app)
                .map(|s| s.spec.listen.clone())
                .unwrap_or_default();
            let ready_on_bind = specs.get(&app).is_some_and(|s| {
                s.spec.readiness.kind == Some(clusterd_core::model::ReadinessKind::Bind)
            });
            let adopted = self.effects.adopt(AdoptRequest {
                app: &app,
                id,
                index: w.index,
                pid: w.pid,
                start_time: w.start_time,
                ports: &w.ports,
                listens: &listens,
                ready_on_bind,
            });
            match adopted {
                Ok(started) => {
                    if state == WorkerState::Ready {
                        self.unrouted.push((app.clone(), id));
                    }
                    self.world.on_adopted(
                        &app,
                        id,
                        w.index,
                        plan::Template {
                            revision: plan::Revision(w.revision.clone()),
                            generation: w.generation,
                        },
                        state,
                        started,
                        now,
                        &self.events,
                    );
                }
                Err(e) => self.events.push(
                    Some(&w.app),
                    Some(w.index),
                    EventKind::AdoptSkipped,
                    format!("pid {}: {e}", w.pid),
                ),
            }
        }
        self.apply_scan(scan, now);
    }

    /// Runs until shutdown has drained every worker, or an upgrade is asked for. The
    /// first call adopts the previous daemon's workers and scans; a later call (after a
    /// failed upgrade) carries on where the last one stopped.
    pub async fn run_until(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) -> Stop {
        if !self.started {
            self.started = true;
            self.start();
        }
        loop {
            let wake_at = self.reconcile().await;
            if let Some(tx) = self.on_started.take() {
                let _ = tx.send(());
            }
            if !self.settled && self.recheck_at.is_none() {
                self.settled = true;
                self.effects.settle();
            }
            if let Some(reply) = self.upgrade.take() {
                if self.world.shutting_down.is_none() {
                    self.world.dirty = true;
                    self.persist();
                    return Stop::Upgrade(reply);
                }
                if let Some(reply) = reply {
                    let _ = reply.send(ApiReply::Json(
                        StatusCode::CONFLICT,
                        json!({"error": "the daemon is shutting down"}),
                    ));
                }
            }
            if self.world.shutting_down.is_some() && self.world.all_stopped() {
                self.events.push(
                    None,
                    None,
                    EventKind::Stopped,
                    "every worker has stopped".into(),
                );
                state::clear(&self.config.state_dir);
                return Stop::Stopped;
            }
            let sleep = wake_at.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        let mut rescan = self.handle(msg);
                        // Take whatever else is queued before re-planning once.
                        while let Ok(msg) = rx.try_recv() {
                            rescan |= self.handle(msg);
                        }
                        if rescan {
                            let now = self.now();
                            let scan = self.scan_at(now);
                            self.apply_scan(scan, now);
                        }
                    }
                    None => return Stop::Stopped,
                },
                () = tokio::time::sleep(sleep) => self.on_timer(),
            }
        }
    }

    /// Whatever came due: a held-back file, the backstop scan, a re-watch, samples, logs.
    fn on_timer(&mut self) {
        let now = self.now();
        if !self.watching {
            if let Some(rewatch) = self.rewatch.as_mut() {
                self.watching = rewatch();
            }
        }
        if self.recheck_at.is_some_and(|t| t <= now) || self.next_rescan <= now {
            self.next_rescan = now + RESCAN_BACKSTOP;
            let scan = self.scan_at(now);
            self.apply_scan(scan, now);
        }
        if self.sample_due(now).is_some_and(|t| t <= now) {
            self.sample(now);
        }
        if self.next_rotation.is_some_and(|t| t <= now) {
            self.next_rotation = None;
            for (app, what) in self.effects.repair_listeners() {
                self.world.on_listener_lost(&app, what, &self.events);
            }
            for app in self.world.apps.values() {
                if let (Some(current), false) = (&app.current, app.procs.is_empty()) {
                    self.effects.rotate_logs(&app.name, &current.spec.logs);
                }
            }
        }
    }

    /// Takes in one message; returns whether the apps dir must be scanned.
    pub(super) fn handle(&mut self, msg: Msg) -> bool {
        let now = self.now();
        match msg {
            Msg::Files { files, dir_gone } => {
                for (path, state) in files {
                    if let Some(state) = state {
                        self.intake.saw(path, state);
                    }
                }
                if dir_gone {
                    self.watching = false;
                }
                return true;
            }
            Msg::Rescan => return true,
            Msg::Report(report) => self.on_report(report, now),
            Msg::Api(request, reply) => self.answer(request, reply),
            Msg::Upgrade(reply) => {
                if let Some(Some(earlier)) = self.upgrade.replace(reply) {
                    let _ = earlier.send(ApiReply::Json(
                        StatusCode::CONFLICT,
                        json!({"error": "another upgrade was asked for at the same time"}),
                    ));
                }
            }
            Msg::Synced(report) => return self.on_synced(*report),
            Msg::Shutdown => {
                if self.world.shutting_down.is_none() {
                    self.events.push(
                        None,
                        None,
                        EventKind::Shutdown,
                        "draining every app before exit".into(),
                    );
                    self.world.shutting_down = Some(now);
                }
            }
        }
        false
    }

    fn on_report(&mut self, report: Report, now: Instant) {
        match report {
            Report::Exited { app, id, reason } => {
                if self.world.on_exited(&app, id, reason, now, &self.events) {
                    self.effects.forget(&app, id);
                }
            }
            Report::Ready { app, id } => self.world.on_ready_report(&app, id),
            Report::ProbeFailed { app, id, detail } => {
                self.world.on_probe_failed(&app, id, detail);
            }
            Report::Bound {
                app,
                id,
                pid,
                listener,
            } => self.world.on_bound(&app, id, pid, listener, &self.events),
            Report::StrayBind { app, id, message } => {
                self.world.on_stray_bind(&app, id, message, &self.events);
            }
            Report::NotifyReady { pgid } => self.world.on_notify_ready(pgid),
            Report::Liveness {
                app,
                id,
                ok,
                detail,
            } => self.world.on_liveness(&app, id, ok, detail, &self.events),
            Report::CertificateFiles {
                app,
                listener,
                event,
            } => {
                let kind = match event {
                    CertEvent::Loaded { .. } => EventKind::CertificateLoaded,
                    CertEvent::Refused { .. } => EventKind::CertificateRefused,
                };
                self.events
                    .push(Some(&app.0), None, kind, format!("{listener}: {event}"));
            }
            // In-flight counts are read before every plan.
            Report::Drained { .. } => {}
            Report::Certificate {
                app,
                listener,
                kind,
                message,
            } => {
                use clusterd_runtime::tls::acme::AcmeEventKind;
                let kind = match kind {
                    AcmeEventKind::Obtained => EventKind::CertificateObtained,
                    AcmeEventKind::Renewed => EventKind::CertificateRenewed,
                    AcmeEventKind::Failed => EventKind::CertificateFailed,
                };
                self.events
                    .push(Some(&app.0), None, kind, format!("{listener}: {message}"));
            }
        }
    }

    fn on_synced(&mut self, report: clusterd_runtime::gitops::SyncReport) -> bool {
        let mut rescan = false;
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
                EventKind::Sync,
                format!(
                    "applied commit {}: {}",
                    outcome.commit.short(),
                    parts.join("; ")
                ),
            );
            rescan = true;
        }
        if let (Some(e), false) = (
            &report.status.error,
            self.sync
                .as_ref()
                .is_some_and(|s| s.error == report.status.error),
        ) {
            self.events
                .push(None, None, EventKind::SyncFailed, e.clone());
        }
        self.sync = Some(report.status);
        rescan
    }

    fn scan_at(&mut self, now: Instant) -> Scan {
        let incumbents = self
            .world
            .apps
            .values()
            .filter_map(|a| {
                a.current
                    .as_ref()
                    .map(|c| (a.name.clone(), c.source.clone()))
            })
            .collect();
        let root = nix::unistd::geteuid().is_root();
        self.intake.scan(now, incumbents, |report, dir| {
            if root {
                refuse_insecure(report, dir);
            }
        })
    }

    /// Scans the apps dir now and takes in what changed.
    #[cfg(test)]
    pub(super) fn rescan(&mut self) {
        let now = self.now();
        let scan = self.scan_at(now);
        self.apply_scan(scan, now);
    }

    fn apply_scan(&mut self, scan: Scan, now: Instant) {
        self.recheck_at = scan.recheck_at;
        if let Some(report) = scan.report {
            for (_, loaded) in report.apps {
                if self.world.is_change(&loaded) {
                    self.offer(Arc::new(loaded), now);
                }
            }
            for (key, diagnostics) in report.errors {
                let text = diagnostics
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                let source = diagnostics
                    .first()
                    .map(|d| d.file.clone())
                    .unwrap_or_default();
                self.world
                    .on_manifest_rejected(&key, source, text, &self.events);
            }
        }
        if let Some(present) = scan.present {
            self.world.on_manifests_gone(&present, &self.events);
        }
    }

    /// A new valid manifest: bind its sockets first (a port that cannot be bound must
    /// not take down the running revision), then accept it.
    fn offer(&mut self, loaded: Arc<LoadedApp>, now: Instant) {
        let adopted = self
            .world
            .apps
            .get(&loaded.name)
            .map(|a| a.adopted_pids.clone())
            .unwrap_or_default();
        match self
            .effects
            .ensure_listeners(&loaded.name, &loaded.spec.listen, &adopted)
        {
            Ok(()) => {
                let name = loaded.name.clone();
                self.world.on_manifest_accepted(loaded, &self.events);
                self.route_adopted(&name);
            }
            Err(e) => self.world.on_listen_failed(loaded, e, now, &self.events),
        }
    }

    /// Gives traffic to the app's adopted Ready workers still in that state, now that its
    /// sockets are bound.
    fn route_adopted(&mut self, name: &AppName) {
        let (mine, rest) = std::mem::take(&mut self.unrouted)
            .into_iter()
            .partition(|(a, _)| a == name);
        self.unrouted = rest;
        let Some(app) = self.world.apps.get(name) else {
            return;
        };
        for (_, id) in mine {
            let Some(w) = app.observed.workers.get(&id) else {
                continue;
            };
            if w.state == WorkerState::Ready {
                let spec = app.spec(&w.template.revision).cloned();
                self.effects.route(name, id, spec.as_deref());
            }
        }
    }

    fn retry_listens(&mut self, now: Instant) {
        let due: Vec<Arc<LoadedApp>> = self
            .world
            .apps
            .values()
            .filter_map(|a| a.pending_listen.as_ref())
            .filter(|p| p.retry_at <= now)
            .map(|p| p.loaded.clone())
            .collect();
        for loaded in due {
            self.offer(loaded, now);
        }
    }

    /// Plans and acts until the planner has nothing more to say; returns when to wake.
    pub(super) async fn reconcile(&mut self) -> Option<Instant> {
        let mut wake_at = None;
        self.retry_listens(self.now());
        for _ in 0..MAX_ROUNDS {
            let now = self.now();
            let shutting_down = self.world.shutting_down.is_some();
            let mut actions = Vec::new();
            wake_at = None;
            for app in self.world.apps.values_mut() {
                let Some(desired) = app.desired(shutting_down) else {
                    continue;
                };
                for (id, w) in &mut app.observed.workers {
                    w.inflight = self.effects.inflight(&app.name, *id);
                }
                if let Some(d) = &desired {
                    app.observed.record_desired(d);
                }
                let plan = plan::plan_app(&app.name, desired.as_ref(), &app.observed, now);
                wake_at = earliest(wake_at, plan.wake_at);
                actions.extend(plan.actions);
            }
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.execute(action, now).await;
            }
        }
        for name in self.world.collect_garbage(&self.events) {
            self.effects.retain_listeners(&name, &[]);
        }
        // An app with no spec at all (its manifest still settling, adopted workers
        // waiting for it) keeps whatever sockets it has.
        for app in self.world.apps.values().filter(|a| !a.specs.is_empty()) {
            let mut keep: Vec<_> = app
                .specs
                .values()
                .flat_map(|s| s.spec.listen.clone())
                .collect();
            if let Some(p) = &app.pending_listen {
                keep.extend(p.loaded.spec.listen.clone());
            }
            self.effects.retain_listeners(&app.name, &keep);
        }
        self.persist();
        let now = self.now();
        if self.next_rotation.is_none() && !self.world.all_stopped() {
            self.next_rotation = Some(now + ROTATE_EVERY);
        }
        if let Some(started) = self.world.shutting_down {
            // A worker that ignores even SIGKILL's reaping must not keep the daemon forever.
            wake_at = earliest(wake_at, Some(started + Duration::from_secs(3600)));
        }
        for t in [
            self.world.wake_at(),
            self.recheck_at,
            self.sample_due(now),
            self.next_rotation,
            Some(self.next_rescan),
            (!self.watching && self.rewatch.is_some()).then(|| now + Duration::from_secs(2)),
        ] {
            wake_at = earliest(wake_at, t);
        }
        wake_at
    }

    async fn execute(&mut self, action: Action, now: Instant) {
        match &action {
            Action::Spawn {
                app,
                index,
                template,
            } => {
                let Some(spec) = self
                    .world
                    .apps
                    .get(app)
                    .and_then(|a| a.spec(&template.revision))
                    .cloned()
                else {
                    tracing::error!(app = %app, revision = %template.revision, "no spec for revision");
                    return;
                };
                let id = self.world.next_id();
                let result = self
                    .effects
                    .spawn(SpawnRequest {
                        app,
                        id,
                        index: *index,
                        template,
                        spec: &spec,
                    })
                    .await;
                match result {
                    Ok(started) => {
                        self.world
                            .on_spawned(app, id, *index, template, started, now, &self.events)
                    }
                    Err(e) => {
                        self.world
                            .on_spawn_failed(app, *index, template, e, now, &self.events)
                    }
                }
                return;
            }
            Action::MarkReady { app, worker } => {
                let spec = self.world.apps.get(app).and_then(|a| {
                    a.observed
                        .workers
                        .get(worker)
                        .and_then(|w| a.spec(&w.template.revision))
                        .cloned()
                });
                self.effects.route(app, *worker, spec.as_deref());
            }
            Action::Drain { app, worker, .. } => self.effects.drain(app, *worker),
            Action::Signal { app, worker } => {
                if let Some(a) = self.world.apps.get(app) {
                    let signal = world::stop_signal(a, *worker);
                    self.effects.signal(app, *worker, &signal);
                }
            }
            Action::Kill { app, worker } => self.effects.kill(app, *worker),
            Action::FailRollout { .. } | Action::MarkAvailable { .. } => {}
        }
        self.world.on_action(&action, now, &self.events);
    }

    /// When workers must be sampled next without anyone asking: only for memory limits.
    fn sample_due(&self, now: Instant) -> Option<Instant> {
        let limits = self.world.apps.values().any(|a| {
            !a.procs.is_empty()
                && a.current
                    .as_ref()
                    .is_some_and(|c| c.spec.limits.memory.is_some())
        });
        limits.then(|| self.last_sample.map_or(now, |t| t + SAMPLE_FOR_LIMITS))
    }

    fn sample(&mut self, now: Instant) {
        if self.world.all_stopped() {
            return;
        }
        self.last_sample = Some(now);
        let usage = self.effects.sample();
        self.world.on_sample(&usage, now);
    }

    /// Writes every worker (any state) down for a future daemon (see `state`).
    fn persist(&mut self) {
        if self.world.shutting_down.is_some() || !self.world.dirty {
            return;
        }
        self.world.dirty = false;
        let saved = state::project(&self.world);
        if self.last_saved.as_ref() == Some(&saved) {
            return;
        }
        match state::store(&self.config.state_dir, &saved) {
            Ok(()) => {
                if self.state_error.take().is_some() {
                    self.events.push(
                        None,
                        None,
                        EventKind::StateSaved,
                        "the worker state is written again".into(),
                    );
                }
                self.last_saved = Some(saved);
            }
            Err(e) => {
                // Keep the last file written: a restarted daemon adopts from it.
                let what = format!(
                    "cannot write {}: {e}; a daemon restart now would not adopt the newest workers",
                    state::path(&self.config.state_dir).display()
                );
                if self.state_error.as_deref() != Some(&what) {
                    self.events
                        .push(None, None, EventKind::StateFailed, what.clone());
                }
                self.state_error = Some(what);
                // Try again on the next change.
                self.world.dirty = true;
            }
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl state::SavedWorker {
    /// The state it was in, or `None` for a worker the previous daemon recorded in a
    /// state that cannot be adopted.
    fn state(&self) -> Option<WorkerState> {
        match self.state.as_deref() {
            Some("Starting") => Some(WorkerState::Starting),
            Some("Draining") => Some(WorkerState::Draining),
            Some("Ready") => Some(WorkerState::Ready),
            // Files of older daemons: only Ready workers were worth adopting.
            None if self.ready => Some(WorkerState::Ready),
            _ => None,
        }
    }
}

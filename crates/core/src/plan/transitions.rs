//! Pure transitions of [`Observed`]: the runtime calls them when something happened
//! (a spawn, a readiness report, an exit) and after carrying out an action
//! ([`ObservedApp::apply`]). Each `record_*` call is an event: plan again after it.

use std::time::{Duration, Instant};

use crate::model::RestartPolicy;

use super::{
    Action, Desired, DrainProgress, DrainReason, ExitReason, Observed, ObservedApp, RolloutFailure,
    SlotHistory, Template, Worker, WorkerId, WorkerState,
};

impl ObservedApp {
    /// [`Observed::record_desired`] for one app: remember its drain policy (needed after
    /// its manifest is gone) and forget a rollout failure of a template no longer desired.
    pub fn record_desired(&mut self, desired: &super::DesiredApp) {
        self.drain_policy = Some(desired.drain_policy());
        if self
            .failed
            .as_ref()
            .is_some_and(|f| f.template != desired.template)
        {
            self.failed = None;
        }
    }

    /// A worker was started for `index` from `template`. It is `Starting`; the index's
    /// pending restart (if any) is consumed and counted in `restarts`.
    pub fn record_spawn(&mut self, id: WorkerId, index: u32, template: Template, now: Instant) {
        self.slots.entry(index).or_default().consume_restart();
        self.workers
            .insert(id, Worker::starting(id, index, template, now));
    }

    /// A worker that survived a daemon restart was found and adopted. It is `Ready` (it
    /// was serving before); its index has no pending restart.
    pub fn record_adopted(&mut self, id: WorkerId, index: u32, template: Template, now: Instant) {
        self.slots.entry(index).or_default().restart_pending = false;
        let mut worker = Worker::starting(id, index, template, now);
        worker.state = WorkerState::Ready;
        worker.ready_reported = true;
        worker.ready_at = Some(now);
        self.workers.insert(id, worker);
    }

    /// Starting a worker for `index` failed (exec error, bad user...). Counts as an
    /// unplanned exit of that index: backoff, and possibly a failed rollout; if the
    /// attempt was a restart, it counts in `restarts` like a successful one.
    pub fn record_spawn_failed(&mut self, index: u32, template: Template, now: Instant) {
        let slot = self.slots.entry(index).or_default();
        slot.consume_restart();
        slot.record_failure(now, ExitReason::SpawnFailed, template, false);
    }

    /// The runtime saw the worker's readiness signal (notify, ipc, probe). Returns
    /// whether the worker is known. The planner turns it into `MarkReady`.
    pub fn record_ready_report(&mut self, id: WorkerId) -> bool {
        match self.workers.get_mut(&id) {
            Some(worker) => {
                worker.ready_reported = true;
                true
            }
            None => false,
        }
    }

    /// The worker's process ended; it leaves `workers` and is returned.
    ///
    /// - Not draining: an unplanned exit (crash). The index's `consecutive_failures`
    ///   goes up and a restart becomes pending (counted in `restarts` when the restart
    ///   happens, so an exit the restart policy leaves alone is no restart). If the worker had
    ///   been Ready for at least `stable_after` (see [`super::stable_after`]), or the
    ///   previous failure of the index was of another template, the streak restarts at 1.
    /// - Drained because it was not ready in time (and its template's rollout did not
    ///   fail, which is already accounted for): a failure too, as above, so that a
    ///   worker that never gets ready is retried with backoff, not in a loop.
    /// - Drained for memory or liveness: counted in `restarts` (the user sees it), no
    ///   restart pending (its replacement was started before it was drained).
    /// - Any other drain: planned, nothing to record.
    pub fn record_exit(
        &mut self,
        id: WorkerId,
        reason: ExitReason,
        now: Instant,
        stable_after: Duration,
    ) -> Option<Worker> {
        let worker = self.workers.remove(&id)?;
        let failed_template = self.failed.as_ref().map(|f| &f.template);
        let slot = self.slots.entry(worker.index).or_default();
        match worker.drain.as_ref().map(|d| &d.reason) {
            None => {
                let ran_clean = worker
                    .ready_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= stable_after);
                slot.record_failure(now, reason, worker.template.clone(), ran_clean);
                slot.last_exit_failed = !reason.is_success();
            }
            Some(DrainReason::ReadinessTimeout) if failed_template != Some(&worker.template) => {
                slot.record_failure(now, reason, worker.template.clone(), false);
                slot.last_exit_failed = true;
            }
            Some(DrainReason::MemoryLimit | DrainReason::LivenessFailed) => {
                slot.restarts = slot.restarts.saturating_add(1);
            }
            Some(_) => {}
        }
        Some(worker)
    }

    /// Records that `action` was carried out at `now`. `Spawn` is recorded with
    /// [`ObservedApp::record_spawn`] instead (it needs the new id) and is ignored here.
    /// Returns whether anything changed (an action about an unknown worker, or one
    /// already applied, changes nothing).
    pub fn apply(&mut self, action: &Action, now: Instant) -> bool {
        match action {
            Action::Spawn { .. } => false,
            Action::MarkReady { worker, .. } => match self.workers.get_mut(worker) {
                Some(w) if w.state == WorkerState::Starting => {
                    w.state = WorkerState::Ready;
                    w.ready_at = Some(now);
                    true
                }
                _ => false,
            },
            Action::Drain { worker, reason, .. } => match self.workers.get_mut(worker) {
                Some(w) if w.state != WorkerState::Draining => {
                    w.state = WorkerState::Draining;
                    w.drain = Some(DrainProgress {
                        started_at: now,
                        reason: reason.clone(),
                        signalled_at: None,
                        killed: false,
                    });
                    true
                }
                _ => false,
            },
            Action::Signal { worker, .. } => {
                match self.workers.get_mut(worker).and_then(|w| w.drain.as_mut()) {
                    Some(d) if d.signalled_at.is_none() => {
                        d.signalled_at = Some(now);
                        true
                    }
                    _ => false,
                }
            }
            Action::Kill { worker, .. } => {
                match self.workers.get_mut(worker).and_then(|w| w.drain.as_mut()) {
                    Some(d) if !d.killed => {
                        d.killed = true;
                        // A kill without a prior signal still starts no new clock.
                        d.signalled_at.get_or_insert(now);
                        true
                    }
                    _ => false,
                }
            }
            Action::MarkAvailable { template, .. } => {
                let mut changed = false;
                if self.last_good.as_ref() != Some(template) {
                    self.last_good = Some(template.clone());
                    changed = true;
                }
                if self
                    .failed
                    .as_ref()
                    .is_some_and(|f| &f.template == template)
                {
                    self.failed = None;
                    changed = true;
                }
                changed
            }
            Action::FailRollout {
                template, reason, ..
            } => {
                if self
                    .failed
                    .as_ref()
                    .is_some_and(|f| &f.template == template)
                {
                    return false;
                }
                self.failed = Some(RolloutFailure {
                    template: template.clone(),
                    reason: reason.clone(),
                    at: now,
                });
                true
            }
        }
    }
}

impl SlotHistory {
    /// A worker is being started for the index: a pending restart is consumed, and
    /// counted.
    fn consume_restart(&mut self) {
        if self.restart_pending {
            self.restart_pending = false;
            self.restarts = self.restarts.saturating_add(1);
        }
    }

    /// The restart policy forbids restarting the index's last unplanned exit
    /// (`never`; `on-failure` after a clean exit).
    #[must_use]
    pub fn restart_forbidden(&self, policy: RestartPolicy) -> bool {
        match policy {
            RestartPolicy::Always => false,
            RestartPolicy::OnFailure => !self.last_exit_failed,
            RestartPolicy::Never => true,
        }
    }

    fn record_failure(
        &mut self,
        now: Instant,
        reason: ExitReason,
        template: Template,
        ran_clean: bool,
    ) {
        let same_template = self
            .last_exit
            .as_ref()
            .is_some_and(|(_, _, t)| *t == template);
        self.consecutive_failures = if ran_clean || !same_template {
            1
        } else {
            self.consecutive_failures.saturating_add(1)
        };
        self.last_exit = Some((now, reason, template));
        self.restart_pending = true;
        self.last_exit_failed = true;
    }
}

impl Worker {
    /// A freshly spawned worker.
    #[must_use]
    pub fn starting(id: WorkerId, index: u32, template: Template, now: Instant) -> Worker {
        Worker {
            id,
            index,
            template,
            state: WorkerState::Starting,
            spawned_at: now,
            ready_reported: false,
            ready_at: None,
            drain: None,
            inflight: 0,
            liveness_failures: 0,
            rss: None,
        }
    }
}

impl Observed {
    /// Remembers what the planner needs from the desired state across a manifest's
    /// removal, and forgets what a new desired state makes stale: each desired app's
    /// [`super::DrainPolicy`], and a rollout failure whose template is no longer desired
    /// (so that going back to it later is a fresh attempt). Call it before [`super::plan`]
    /// whenever the desired state may have changed; it is cheap and idempotent.
    pub fn record_desired(&mut self, desired: &Desired) {
        for (name, app) in &desired.apps {
            if let Some(observed) = self.apps.get_mut(name) {
                observed.record_desired(app);
            }
        }
    }

    /// Drops the apps that are not desired and have no worker left.
    pub fn prune(&mut self, desired: &Desired) {
        self.apps
            .retain(|name, app| desired.apps.contains_key(name) || !app.workers.is_empty());
    }

    /// [`ObservedApp::apply`] on the action's app (an unknown app changes nothing).
    pub fn apply(&mut self, action: &Action, now: Instant) -> bool {
        self.apps
            .get_mut(action.app())
            .is_some_and(|app| app.apply(action, now))
    }
}

//! [`plan`]: the decisions. See the module docs of [`super`] for the rules and their
//! invariants.
//!
//! Every decision is applied at once to a private copy of the observed app (with the
//! same [`ObservedApp::apply`] the runtime uses), so later decisions of the same plan
//! see earlier ones: a worker marked ready lets its predecessor drain in the same plan,
//! a drained worker is signalled in the same plan when nothing holds it. That is also
//! what makes the planner idempotent: the plan is computed against the state it leaves.

use std::time::{Duration, Instant};

use super::backoff::{backoff_delay, stable_after};
use super::{
    Action, AppName, Desired, DesiredApp, DrainPolicy, DrainReason, ExitReason, Observed,
    ObservedApp, Plan, ReadinessGate, Template, Worker, WorkerId, WorkerState,
};

impl DesiredApp {
    /// How this app's workers are stopped.
    #[must_use]
    pub fn drain_policy(&self) -> DrainPolicy {
        DrainPolicy {
            shutdown_timeout: self.shutdown_timeout,
            wait_for_idle: self.drain_waits_for_idle,
        }
    }

    /// Pass to [`ObservedApp::record_exit`]: see [`super::stable_after`].
    #[must_use]
    pub fn stable_after(&self) -> Duration {
        stable_after(&self.restart.backoff)
    }

    /// Why `worker` must be replaced although its template is right, if it must.
    #[must_use]
    pub fn unhealthy(&self, worker: &Worker) -> Option<DrainReason> {
        if let (Some(limit), Some(rss)) = (self.memory_limit, worker.rss) {
            if rss > limit {
                return Some(DrainReason::MemoryLimit);
            }
        }
        match self.liveness_failure_threshold {
            Some(threshold) if threshold > 0 && worker.liveness_failures >= threshold => {
                Some(DrainReason::LivenessFailed)
            }
            _ => None,
        }
    }
}

/// Decides what to do now for one app (`desired` is `None` once its manifest is gone).
/// [`plan`] is this over every app; the daemon keeps each app's observed state in its
/// own record and plans them one by one.
#[must_use]
pub fn plan_app(
    name: &AppName,
    desired: Option<&DesiredApp>,
    observed: &ObservedApp,
    now: Instant,
) -> Plan {
    let mut out = Plan::default();
    AppPlanner::new(name, desired, observed, now).run(&mut out);
    out
}

/// Decides what to do now for every app. Pure: same inputs, same plan.
///
/// # Guarantees
/// - Idempotent: after the runtime applied every action (see the module docs of
///   [`super`]), planning again at the same `now` repeats none of them.
/// - `wake_at`, if any, is after `now`.
#[must_use]
pub fn plan(desired: &Desired, observed: &Observed, now: Instant) -> Plan {
    let empty = ObservedApp::default();
    let mut out = Plan::default();
    for (name, app) in &desired.apps {
        let obs = observed.apps.get(name).unwrap_or(&empty);
        AppPlanner::new(name, Some(app), obs, now).run(&mut out);
    }
    for (name, obs) in &observed.apps {
        if !desired.apps.contains_key(name) {
            AppPlanner::new(name, None, obs, now).run(&mut out);
        }
    }
    out
}

/// When an empty (or surge) slot may get its new worker.
enum SpawnGate {
    Now,
    At(Instant),
    /// Until an event (a held worker's exit) or never (restart policy).
    Blocked,
}

struct AppPlanner<'a> {
    app: &'a AppName,
    desired: Option<&'a DesiredApp>,
    /// The observed app with this plan's decisions applied.
    obs: ObservedApp,
    now: Instant,
    policy: DrainPolicy,
    /// Spawns decided in this plan (no id yet, so not in `obs`).
    spawned: usize,
    /// Their indexes.
    spawned_at: Vec<u32>,
    /// Ready workers (below `replicas`) when the plan began: the planner never takes
    /// the count below `min(this, replicas - maxUnavailable)`.
    ready_start: usize,
    actions: Vec<Action>,
    wake_at: Option<Instant>,
}

impl<'a> AppPlanner<'a> {
    fn new(
        app: &'a AppName,
        desired: Option<&'a DesiredApp>,
        obs: &ObservedApp,
        now: Instant,
    ) -> Self {
        let policy = desired.map_or_else(
            || obs.drain_policy.unwrap_or_default(),
            DesiredApp::drain_policy,
        );
        AppPlanner {
            app,
            desired,
            obs: obs.clone(),
            now,
            policy,
            spawned: 0,
            spawned_at: Vec::new(),
            ready_start: 0,
            actions: Vec::new(),
            wake_at: None,
        }
    }

    fn run(mut self, out: &mut Plan) {
        match self.desired {
            Some(d) => self.reconcile(d),
            None => {
                for id in self.ids(|w| w.state != WorkerState::Draining) {
                    self.drain(id, DrainReason::AppRemoved);
                }
            }
        }
        self.progress_drains();
        out.actions.append(&mut self.actions);
        out.wake_at = match (out.wake_at, self.wake_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn emit(&mut self, action: Action) {
        if matches!(action, Action::Spawn { .. }) {
            self.spawned += 1;
        }
        self.obs.apply(&action, self.now);
        self.actions.push(action);
    }

    fn wake(&mut self, at: Instant) {
        if at > self.now {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
    }

    fn drain(&mut self, worker: WorkerId, reason: DrainReason) {
        self.emit(Action::Drain {
            app: self.app.clone(),
            worker,
            reason,
        });
    }

    fn spawn(&mut self, index: u32, template: Template) {
        self.spawned_at.push(index);
        self.emit(Action::Spawn {
            app: self.app.clone(),
            index,
            template,
        });
    }

    /// Ids of the workers matching `pred`, by (index, id).
    fn ids(&self, pred: impl Fn(&Worker) -> bool) -> Vec<WorkerId> {
        let mut found: Vec<&Worker> = self.obs.workers.values().filter(|w| pred(w)).collect();
        found.sort_by_key(|w| (w.index, w.id));
        found.into_iter().map(|w| w.id).collect()
    }

    fn worker(&self, id: WorkerId) -> &Worker {
        &self.obs.workers[&id]
    }

    fn reconcile(&mut self, d: &DesiredApp) {
        let n = d.replicas;
        self.ready_start = self.ready_count(n);
        // Scale down: everything at an index >= replicas goes, highest index first.
        let mut beyond = self.ids(|w| w.state != WorkerState::Draining && w.index >= n);
        beyond.reverse();
        for id in beyond {
            self.drain(id, DrainReason::ScaledDown);
        }
        self.readiness(d);
        self.crashed_rollout(d);
        let failed = self.failed(d);
        self.normalize(d);
        self.trim_surge(d);
        self.fill(d);
        if self.failed(d) != failed {
            // This plan drained the last fallback of a failed rollout, so the failure no
            // longer blocks: decide again with the new targets now rather than in the
            // next plan (idempotence).
            self.normalize(d);
            self.trim_surge(d);
            self.fill(d);
        }
        self.available(d);
    }

    /// The desired template's rollout failed and there is still something to fall back
    /// on. A failure with no fallback left (every old worker gone, nothing ever proven)
    /// no longer blocks: the desired template is retried as an instance, with backoff,
    /// because keeping the app empty helps nobody.
    fn failed(&self, d: &DesiredApp) -> bool {
        self.obs
            .failed
            .as_ref()
            .is_some_and(|f| f.template == d.template)
            && self.has_fallback(d)
    }

    /// A proven template other than the desired one, or one that serves right now.
    fn has_fallback(&self, d: &DesiredApp) -> bool {
        self.obs
            .last_good
            .as_ref()
            .is_some_and(|g| *g != d.template)
            || self
                .obs
                .workers
                .values()
                .any(|w| w.state == WorkerState::Ready && w.template != d.template)
    }

    /// A failure of a worker of the desired template fails the rollout (rather than the
    /// instance) when the template is not proven and there is something to fall back to.
    /// Without a fallback (first start, or after a daemon restart that adopted nothing)
    /// failing closed would only leave the app down for good on a transient error, so
    /// the instance is retried with backoff instead (CrashLoopBackOff).
    fn rollout_can_fail(&self, d: &DesiredApp) -> bool {
        self.obs
            .failed
            .as_ref()
            .is_none_or(|f| f.template != d.template)
            && self.obs.last_good.as_ref() != Some(&d.template)
            && self.has_fallback(d)
    }

    fn fail_rollout(&mut self, d: &DesiredApp, reason: String) {
        self.emit(Action::FailRollout {
            app: self.app.clone(),
            template: d.template.clone(),
            reason,
        });
    }

    /// Starting workers: ready, or past their readiness deadline.
    fn readiness(&mut self, d: &DesiredApp) {
        let failed = self.failed(d);
        for id in self.ids(|w| w.state == WorkerState::Starting) {
            let w = self.worker(id);
            if failed && w.template == d.template {
                continue; // drained by `normalize`
            }
            let ready = match d.readiness {
                ReadinessGate::Immediate => true,
                ReadinessGate::Delay(delay) => self.now >= w.spawned_at + delay,
                ReadinessGate::Reported => w.ready_reported,
            };
            let deadline = w.spawned_at + d.readiness_timeout;
            if ready {
                self.emit(Action::MarkReady {
                    app: self.app.clone(),
                    worker: id,
                });
            } else if self.now >= deadline {
                let is_desired = w.template == d.template;
                self.drain(id, DrainReason::ReadinessTimeout);
                if is_desired && self.rollout_can_fail(d) {
                    let reason = format!("not ready within {}", human(d.readiness_timeout));
                    self.fail_rollout(d, reason);
                }
            } else {
                if let ReadinessGate::Delay(delay) = d.readiness {
                    self.wake(w.spawned_at + delay);
                }
                self.wake(deadline);
            }
        }
    }

    /// A worker of the desired, unproven template exited (or failed to spawn) during a
    /// rollout: the rollout fails.
    fn crashed_rollout(&mut self, d: &DesiredApp) {
        if !self.rollout_can_fail(d) {
            return;
        }
        let crash = self
            .obs
            .slots
            .iter()
            .find_map(|(index, slot)| match &slot.last_exit {
                Some((_, reason, template)) if slot.restart_pending && *template == d.template => {
                    Some((*index, *reason))
                }
                _ => None,
            });
        if let Some((index, reason)) = crash {
            self.fail_rollout(d, format!("worker {index} {}", describe_exit(reason)));
        }
    }

    /// The template an index should run, given its live workers `here`. `None`: none is
    /// known (a failed rollout whose fallback is gone).
    fn target(&self, d: &DesiredApp, here: &[&Worker]) -> Option<Template> {
        if !self.failed(d) {
            return Some(d.template.clone());
        }
        // Fail closed: keep what serves, prefer templates other than the failed one.
        let mut serving: Vec<&&Worker> = here
            .iter()
            .filter(|w| w.state == WorkerState::Ready && d.unhealthy(w).is_none())
            .collect();
        serving.sort_by_key(|w| (w.template == d.template, w.id));
        if let Some(w) = serving.first() {
            return Some(w.template.clone());
        }
        if let Some(w) = here.iter().find(|w| w.template != d.template) {
            return Some(w.template.clone());
        }
        let not_failed = |t: &&Template| **t != d.template;
        self.obs
            .last_good
            .as_ref()
            .filter(not_failed)
            .or_else(|| {
                // A template that serves elsewhere (adopted workers, or last_good unknown).
                self.obs
                    .workers
                    .values()
                    .filter(|w| w.state == WorkerState::Ready)
                    .map(|w| &w.template)
                    .find(not_failed)
            })
            .cloned()
    }

    fn here(&self, index: u32) -> Vec<&Worker> {
        let mut here: Vec<&Worker> = self
            .obs
            .workers
            .values()
            .filter(|w| w.index == index && w.state != WorkerState::Draining)
            .collect();
        here.sort_by_key(|w| w.id);
        here
    }

    fn replace_reason(&self, d: &DesiredApp, w: &Worker) -> DrainReason {
        if let Some(reason) = d.unhealthy(w) {
            reason
        } else if self.failed(d) && w.template == d.template {
            DrainReason::RolloutFailed
        } else {
            DrainReason::Replaced
        }
    }

    /// Per index: once a healthy Ready worker of the target template is there, every
    /// other worker of the index drains; before that, only starting workers that will
    /// never be the one (a duplicate, an old template) drain, except the reload
    /// predecessor (see [`Self::predecessor`]), which is left to finish. Ready ones keep
    /// serving, but only one per index: a second Ready worker that is not the target
    /// (left by overlapping reloads, or adopted after a restart) is redundant and drains,
    /// as far as the ready floor allows, or it would hold the surge the rollout needs.
    fn normalize(&mut self, d: &DesiredApp) {
        let n = d.replicas;
        let floor = (n as usize).saturating_sub(d.rollout.max_unavailable as usize);
        for index in 0..n {
            let here = self.here(index);
            let Some(target) = self.target(d, &here) else {
                continue;
            };
            let keeper = here
                .iter()
                .find(|w| {
                    w.state == WorkerState::Ready
                        && w.template == target
                        && d.unhealthy(w).is_none()
                })
                .or_else(|| {
                    here.iter()
                        .find(|w| w.state == WorkerState::Starting && w.template == target)
                })
                .map(|w| (w.id, w.state));
            let predecessor = match keeper {
                None => Self::predecessor(&here, &target),
                Some(_) => None,
            };
            let best_ready = match keeper {
                Some((_, WorkerState::Ready)) => None,
                _ => Self::best_ready(d, &here, &target),
            };
            let mut doomed: Vec<(WorkerId, DrainReason)> = Vec::new();
            for w in &here {
                let drain = match keeper {
                    Some((id, WorkerState::Ready)) => w.id != id,
                    Some((id, _)) => w.id != id && w.state == WorkerState::Starting,
                    None => w.state == WorkerState::Starting && Some(w.id) != predecessor,
                } || (w.state == WorkerState::Ready
                    && best_ready.is_some_and(|best| best != w.id));
                if drain {
                    doomed.push((w.id, self.replace_reason(d, w)));
                }
            }
            for (id, reason) in doomed {
                // Ready workers go only as far as the ready floor allows (a duplicate is
                // capacity too); what stays is drained by a later plan.
                if self.worker(id).state == WorkerState::Ready
                    && self.ready_count(n) <= self.ready_start.min(floor)
                {
                    continue;
                }
                self.drain(id, reason);
            }
        }
    }

    /// Reload coalescing: a starting worker of the target's revision but an older
    /// generation (spawned by an earlier reload that a newer one superseded) is left to
    /// finish starting, and no worker of the target is spawned at its index meanwhile.
    /// Once Ready it serves in place of the worker it was replacing, and is replaced in
    /// turn by a worker started after the newest request. A burst of reloads thus costs
    /// one extra start per burst instead of one start per request, and every index still
    /// ends at a worker spawned after the last request (`clusterd reload` after a deploy
    /// never leaves old code behind). A different revision (an edit) never waits: its
    /// starting workers are useless and drain at once.
    fn predecessor(here: &[&Worker], target: &Template) -> Option<WorkerId> {
        here.iter()
            .filter(|w| {
                w.state == WorkerState::Starting
                    && w.template.revision == target.revision
                    && w.template.generation < target.generation
            })
            .max_by_key(|w| (w.template.generation, w.id))
            .map(|w| w.id)
    }

    /// The Ready worker that keeps serving an index that has no Ready worker of its
    /// target yet: healthy first, then of the target's revision, then the newest.
    fn best_ready(d: &DesiredApp, here: &[&Worker], target: &Template) -> Option<WorkerId> {
        here.iter()
            .filter(|w| w.state == WorkerState::Ready)
            .max_by_key(|w| {
                (
                    d.unhealthy(w).is_none(),
                    w.template.revision == target.revision,
                    w.template.generation,
                    w.id,
                )
            })
            .map(|w| w.id)
    }

    /// A scale-down can leave more surge in flight than `replicas + maxSurge` allows
    /// (surge borrowed while other indexes were empty). Cancel starting replacements that
    /// stand next to a serving worker, highest index first, until the bound holds again;
    /// they serve nothing, so no capacity is lost.
    fn trim_surge(&mut self, d: &DesiredApp) {
        let n = d.replicas;
        let cap = n as usize + d.rollout.max_surge as usize;
        let mut surplus =
            self.ids(|w| {
                w.state == WorkerState::Starting
                    && w.index < n
                    && self.obs.workers.values().any(|o| {
                        o.index == w.index && o.id != w.id && o.state == WorkerState::Ready
                    })
            });
        while self.live_count(n) > cap {
            let Some(id) = surplus.pop() else { break };
            self.drain(id, DrainReason::ScaledDown);
        }
    }

    fn ready_count(&self, n: u32) -> usize {
        self.obs
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Ready && w.index < n)
            .count()
    }

    fn live_count(&self, n: u32) -> usize {
        self.obs
            .workers
            .values()
            .filter(|w| w.state != WorkerState::Draining && w.index < n)
            .count()
            + self.spawned
    }

    /// Per index, lowest first: start the worker the index lacks (a fill, or a surge
    /// next to the worker it replaces), or drain first within maxUnavailable when no
    /// surge is allowed.
    fn fill(&mut self, d: &DesiredApp) {
        let n = d.replicas;
        let cap = n as usize + d.rollout.max_surge as usize;
        let min_ready = (n as usize).saturating_sub(d.rollout.max_unavailable as usize);
        for index in 0..n {
            let here = self.here(index);
            let Some(target) = self.target(d, &here) else {
                continue;
            };
            let settled = here.iter().any(|w| {
                w.template == target
                    && (w.state == WorkerState::Starting
                        || (w.state == WorkerState::Ready && d.unhealthy(w).is_none()))
            });
            if settled
                || Self::predecessor(&here, &target).is_some()
                || self.spawned_at.contains(&index)
            {
                continue;
            }
            let serving: Vec<WorkerId> = here.iter().map(|w| w.id).collect();
            let ready_here = here
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            match self.spawn_gate(d, index, &target, serving.is_empty()) {
                SpawnGate::Now => {}
                SpawnGate::At(at) => {
                    self.wake(at);
                    continue;
                }
                SpawnGate::Blocked => continue,
            }
            if self.live_count(n) < cap {
                self.spawn(index, target);
            } else if !serving.is_empty()
                && self.ready_count(n).saturating_sub(ready_here) >= min_ready
            {
                for id in serving {
                    let reason = self.replace_reason(d, self.worker(id));
                    self.drain(id, reason);
                }
                self.spawn(index, target);
            }
        }
    }

    fn spawn_gate(&self, d: &DesiredApp, index: u32, target: &Template, empty: bool) -> SpawnGate {
        let failed = self.failed(d);
        let held = self.obs.workers.values().any(|w| {
            w.index == index
                && w.template == *target
                && !(failed && w.template == d.template)
                && w.drain
                    .as_ref()
                    .is_some_and(|dr| dr.reason == DrainReason::ReadinessTimeout)
        });
        if held {
            return SpawnGate::Blocked; // its exit starts the backoff
        }
        let Some(slot) = self.obs.slots.get(&index) else {
            return SpawnGate::Now;
        };
        match &slot.last_exit {
            Some((at, _, template)) if slot.restart_pending && template == target => {
                if empty && slot.restart_forbidden(d.restart.policy) {
                    return SpawnGate::Blocked;
                }
                let due = *at + backoff_delay(&d.restart.backoff, slot.consecutive_failures);
                if self.now < due {
                    SpawnGate::At(due)
                } else {
                    SpawnGate::Now
                }
            }
            _ => SpawnGate::Now,
        }
    }

    fn available(&mut self, d: &DesiredApp) {
        if self.obs.last_good.as_ref() == Some(&d.template) || self.spawned > 0 {
            return;
        }
        let all = (0..d.replicas).all(|index| {
            self.obs.workers.values().any(|w| {
                w.index == index
                    && w.state == WorkerState::Ready
                    && w.template == d.template
                    && d.unhealthy(w).is_none()
            })
        });
        if all {
            self.emit(Action::MarkAvailable {
                app: self.app.clone(),
                template: d.template.clone(),
            });
        }
    }

    /// Draining workers: signal once idle (or at once, or when the wait times out), kill
    /// `shutdown_timeout` after the signal.
    fn progress_drains(&mut self) {
        let timeout = self.policy.shutdown_timeout;
        for id in self.ids(|w| w.state == WorkerState::Draining) {
            let w = self.worker(id);
            let Some(drain) = w.drain.clone() else {
                continue;
            };
            if drain.signalled_at.is_none() {
                let give_up = drain.started_at + timeout;
                if !self.policy.wait_for_idle || w.inflight == 0 || self.now >= give_up {
                    self.emit(Action::Signal {
                        app: self.app.clone(),
                        worker: id,
                    });
                } else {
                    self.wake(give_up);
                    continue;
                }
            }
            let drain = self
                .worker(id)
                .drain
                .clone()
                .expect("draining worker has drain progress");
            if drain.killed {
                continue;
            }
            let kill_at = drain.signalled_at.unwrap_or(self.now) + timeout;
            if self.now >= kill_at {
                self.emit(Action::Kill {
                    app: self.app.clone(),
                    worker: id,
                });
            } else {
                self.wake(kill_at);
            }
        }
    }
}

/// The one wording of an exit (see [`ExitReason`]'s `Display`).
pub(crate) fn describe_exit(reason: ExitReason) -> String {
    reason.to_string()
}

/// `30s`, `250ms`, `1.5s`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

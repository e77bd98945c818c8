//! Test fixtures: fluent desired apps and a tiny simulated runtime ([`World`]).

use std::time::{Duration, Instant};

use super::{
    plan, Action, AppName, Desired, DesiredApp, ExitReason, Observed, ObservedApp, Plan,
    ReadinessGate, Revision, Template, Worker, WorkerId,
};
use crate::model::{Backoff, DurationValue, Restart, RestartPolicy, Rollout};

pub fn tpl(rev: &str) -> Template {
    Template {
        revision: Revision(rev.to_owned()),
        generation: 0,
    }
}

pub fn app() -> AppName {
    AppName("web".to_owned())
}

pub const SHUTDOWN: Duration = Duration::from_secs(10);
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl DesiredApp {
    /// `replicas` workers of template "a", Immediate readiness, surge 1 / unavailable 0,
    /// restart always with backoff 100ms..30s, shutdown 10s waiting for idle.
    pub fn test(replicas: u32) -> DesiredApp {
        DesiredApp {
            template: tpl("a"),
            replicas,
            rollout: Rollout::default(),
            readiness: ReadinessGate::Immediate,
            readiness_timeout: READY_TIMEOUT,
            shutdown_timeout: SHUTDOWN,
            drain_waits_for_idle: true,
            restart: Restart::default(),
            memory_limit: None,
            liveness_failure_threshold: None,
        }
    }
    /// Desired template.
    pub fn template(mut self, t: Template) -> Self {
        self.template = t;
        self
    }
    /// maxSurge / maxUnavailable.
    pub fn rollout(mut self, max_surge: u32, max_unavailable: u32) -> Self {
        self.rollout = Rollout {
            max_surge,
            max_unavailable,
        };
        self
    }
    /// Readiness gate.
    pub fn gate(mut self, gate: ReadinessGate) -> Self {
        self.readiness = gate;
        self
    }
    /// Restart policy.
    pub fn policy(mut self, policy: RestartPolicy) -> Self {
        self.restart.policy = policy;
        self
    }
    /// Restart backoff.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.restart.backoff = Backoff {
            initial: DurationValue(initial),
            max: DurationValue(max),
        };
        self
    }
    /// Inherit mode: signal right after drain.
    pub fn inherit(mut self) -> Self {
        self.drain_waits_for_idle = false;
        self
    }
    /// Memory limit in bytes.
    pub fn memory(mut self, limit: u64) -> Self {
        self.memory_limit = Some(limit);
        self
    }
    /// Liveness failure threshold.
    pub fn liveness(mut self, threshold: u32) -> Self {
        self.liveness_failure_threshold = Some(threshold);
        self
    }
}

/// One app "web", its observed state, a clock and an id counter: a runtime in miniature.
#[derive(Debug, Clone)]
pub struct World {
    pub desired: Desired,
    pub observed: Observed,
    pub now: Instant,
    pub next_id: u64,
}

impl World {
    pub fn new(d: DesiredApp) -> World {
        let now = Instant::now();
        let mut desired = Desired::default();
        desired.apps.insert(app(), d);
        World {
            desired,
            observed: Observed::default(),
            now,
            next_id: 1,
        }
    }

    pub fn d(&self) -> &DesiredApp {
        &self.desired.apps[&app()]
    }
    pub fn d_mut(&mut self) -> &mut DesiredApp {
        self.desired.apps.get_mut(&app()).expect("app desired")
    }
    pub fn remove_app(&mut self) {
        self.desired.apps.clear();
    }
    pub fn obs(&self) -> &ObservedApp {
        self.observed.apps.get(&app()).expect("app observed")
    }
    pub fn obs_mut(&mut self) -> &mut ObservedApp {
        self.observed.apps.entry(app()).or_default()
    }

    pub fn worker(&self, id: WorkerId) -> &Worker {
        &self.obs().workers[&id]
    }
    pub fn worker_mut(&mut self, id: WorkerId) -> &mut Worker {
        self.obs_mut().workers.get_mut(&id).expect("worker")
    }

    pub fn plan(&mut self) -> Plan {
        self.observed.record_desired(&self.desired);
        plan(&self.desired, &self.observed, self.now)
    }

    /// Carries the plan out; returns the ids given to spawned workers, in order.
    pub fn apply(&mut self, p: &Plan) -> Vec<WorkerId> {
        let mut ids = Vec::new();
        for a in &p.actions {
            if let Action::Spawn {
                app,
                index,
                template,
            } = a
            {
                let id = WorkerId(self.next_id);
                self.next_id += 1;
                let now = self.now;
                self.observed
                    .apps
                    .entry(app.clone())
                    .or_default()
                    .record_spawn(id, *index, template.clone(), now);
                ids.push(id);
            } else {
                self.observed.apply(a, self.now);
            }
        }
        ids
    }

    /// Plans and applies until a plan is empty; returns every action, in order.
    pub fn settle(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        for _ in 0..100 {
            let p = self.plan();
            if p.actions.is_empty() {
                return all;
            }
            self.apply(&p);
            all.extend(p.actions);
        }
        panic!("planner did not settle: {all:#?}");
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn exit(&mut self, id: WorkerId, reason: ExitReason) -> Option<Worker> {
        let stable = self
            .desired
            .apps
            .get(&app())
            .map_or(Duration::from_secs(10), DesiredApp::stable_after);
        let now = self.now;
        self.obs_mut().record_exit(id, reason, now, stable)
    }

    pub fn ids(&self, pred: impl Fn(&Worker) -> bool) -> Vec<WorkerId> {
        self.obs()
            .workers
            .values()
            .filter(|w| pred(w))
            .map(|w| w.id)
            .collect()
    }
}

/// What [`World::run_on`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// `Spawn` actions carried out.
    pub spawns: usize,
    /// Whether the world went quiet (no action, no wake-up left).
    pub quiet: bool,
}

impl World {
    /// The world on its own, for at most `rounds` rounds: plans are carried out, every
    /// starting worker reports ready, every signalled worker exits, and time jumps to
    /// `wake_at` when nothing else happens.
    pub fn run_on(&mut self, rounds: usize) -> RunStats {
        let mut stats = RunStats::default();
        for _ in 0..rounds {
            let p = self.plan();
            stats.spawns += self.apply(&p).len();
            if !p.actions.is_empty() {
                continue;
            }
            let mut happened = false;
            for id in self.ids(|_| true) {
                let x = self.worker(id).clone();
                if x.state == super::WorkerState::Starting && !x.ready_reported {
                    self.obs_mut().record_ready_report(id);
                    happened = true;
                }
                if x.drain.as_ref().is_some_and(|d| d.signalled_at.is_some()) {
                    self.exit(id, ExitReason::Code(0));
                    happened = true;
                }
            }
            if !happened {
                match p.wake_at {
                    Some(at) => self.now = at,
                    None => {
                        stats.quiet = true;
                        return stats;
                    }
                }
            }
        }
        stats
    }
}

//! Property tests: random specs, random event orders, a simulated runtime.
//!
//! A run is a random sequence of [`Op`]s (ready reports, crashes, exits, idling, time
//! passing, template changes, reloads, scale changes, liveness failures) delivered to a
//! [`World`]; after every event the runtime plans and applies until the plan is empty,
//! checking the safety invariants around every plan. Then the chaos stops and the world
//! runs on its own (ready reports of good templates, exits after signals, time jumping to
//! `wake_at`) until nothing happens any more, and convergence is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::fixtures::{app, World};
use super::{
    phase, Action, DesiredApp, DrainReason, ExitReason, Phase, Plan, ReadinessGate, Revision,
    Template, WorkerId, WorkerState,
};
use crate::model::RestartPolicy;

/// How workers of a template behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Reports ready (Reported gate) when told to.
    Good,
    /// Never reports ready (matters with the Reported gate only).
    NeverReady,
    /// Dies right after spawn.
    CrashAtStart,
}

#[derive(Debug, Clone)]
enum Op {
    Report(usize),
    Crash(usize),
    Exit(usize),
    Idle(usize),
    Advance(u64),
    AdvanceToWake,
    NewTemplate(Fate),
    Reload,
    Scale(u32),
    Sick(usize),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![4 => Just(Fate::Good), 1 => Just(Fate::NeverReady), 1 => Just(Fate::CrashAtStart)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<usize>().prop_map(Op::Report),
        2 => any::<usize>().prop_map(Op::Crash),
        4 => any::<usize>().prop_map(Op::Exit),
        2 => any::<usize>().prop_map(Op::Idle),
        3 => (0u64..40_000).prop_map(Op::Advance),
        3 => Just(Op::AdvanceToWake),
        1 => fate().prop_map(Op::NewTemplate),
        1 => Just(Op::Reload),
        1 => (1u32..6).prop_map(Op::Scale),
        1 => any::<usize>().prop_map(Op::Sick),
    ]
}

/// Reloads and edits during rollouts, between readiness reports and exits: no crash,
/// no failing template, so every run must end Available at the newest template.
fn storm_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => any::<usize>().prop_map(Op::Report),
        4 => Just(Op::Reload),
        1 => Just(Op::NewTemplate(Fate::Good)),
        3 => any::<usize>().prop_map(Op::Exit),
        1 => any::<usize>().prop_map(Op::Idle),
        2 => (0u64..3_000).prop_map(Op::Advance),
        1 => Just(Op::AdvanceToWake),
    ]
}

fn spec() -> impl Strategy<Value = DesiredApp> {
    let gate = prop_oneof![
        Just(ReadinessGate::Immediate),
        Just(ReadinessGate::Delay(Duration::from_secs(1))),
        Just(ReadinessGate::Reported),
    ];
    let rollout = (0u32..=2, 0u32..=2).prop_filter("not both 0", |(s, u)| s + u > 0);
    let policy = prop_oneof![Just(RestartPolicy::Always), Just(RestartPolicy::OnFailure)];
    (1u32..6, rollout, gate, any::<bool>(), policy).prop_map(
        |(n, (s, u), gate, inherit, policy)| {
            let mut d = DesiredApp::test(n)
                .rollout(s, u)
                .gate(gate)
                .policy(policy)
                .liveness(3)
                .backoff(Duration::from_millis(100), Duration::from_secs(2));
            d.drain_waits_for_idle = !inherit;
            d
        },
    )
}

/// The world plus the behaviour of each template's processes.
struct Sim {
    w: World,
    fates: BTreeMap<Revision, Fate>,
    revisions: u32,
    /// Workers that ignore the shutdown signal (exit only when killed).
    stubborn: BTreeSet<WorkerId>,
    /// Workers spawned so far.
    spawns: usize,
}

/// Ready, non-draining workers at an index below `n`.
fn ready_count(w: &World, n: u32) -> usize {
    w.observed.apps.get(&app()).map_or(0, |o| {
        o.workers
            .values()
            .filter(|x| x.state == WorkerState::Ready && x.index < n)
            .count()
    })
}

/// Non-draining workers at an index below `n`.
fn live_count(w: &World, n: u32) -> usize {
    w.observed.apps.get(&app()).map_or(0, |o| {
        o.workers
            .values()
            .filter(|x| x.state != WorkerState::Draining && x.index < n)
            .count()
    })
}

/// (id, index, generation/revision, state) of every worker, for failure messages.
fn summary(o: &super::ObservedApp) -> Vec<String> {
    o.workers
        .values()
        .map(|x| {
            format!(
                "{}@{} {}/{} {:?}",
                x.id, x.index, x.template.revision, x.template.generation, x.state
            )
        })
        .collect()
}

fn key(a: &Action) -> String {
    format!("{a:?}")
}

impl Sim {
    fn new(d: DesiredApp) -> Sim {
        let mut fates = BTreeMap::new();
        fates.insert(d.template.revision.clone(), Fate::Good);
        Sim {
            w: World::new(d),
            fates,
            revisions: 0,
            stubborn: BTreeSet::new(),
            spawns: 0,
        }
    }

    fn fate(&self, t: &Template) -> Fate {
        self.fates[&t.revision]
    }

    fn nth(&self, k: usize, pred: impl Fn(&super::Worker) -> bool) -> Option<WorkerId> {
        let o = self.w.observed.apps.get(&app())?;
        let ids: Vec<WorkerId> = o
            .workers
            .values()
            .filter(|x| pred(x))
            .map(|x| x.id)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[k % ids.len()])
        }
    }

    /// Plans once, checks the invariants around it, applies it, checks idempotence.
    /// Returns whether the plan did anything.
    fn step(&mut self) -> Result<(Plan, bool), TestCaseError> {
        let d = self.w.d().clone();
        let n = d.replicas;
        let before_ready = ready_count(&self.w, n);
        let before = self
            .w
            .observed
            .apps
            .get(&app())
            .cloned()
            .unwrap_or_default();
        let p = self.w.plan();
        if let Some(at) = p.wake_at {
            prop_assert!(at > self.w.now, "wake_at not in the future");
        }
        // A failed readiness never drains a worker that serves; a failed rollout drains
        // only workers of the failed template, and every index that had an old Ready
        // worker still has one after the plan (fail closed: old workers keep serving).
        for a in &p.actions {
            if let Action::Drain { worker, reason, .. } = a {
                let was = &before.workers[worker];
                if *reason == DrainReason::ReadinessTimeout {
                    prop_assert_ne!(was.state, WorkerState::Ready, "{:?}", p.actions);
                }
                if *reason == DrainReason::RolloutFailed {
                    prop_assert_eq!(
                        &was.template,
                        &d.template,
                        "RolloutFailed drained an old worker"
                    );
                }
            }
        }
        let failing = p
            .actions
            .iter()
            .any(|a| matches!(a, Action::FailRollout { .. }));
        let old_ready_at = |o: &super::ObservedApp, index: u32| {
            o.workers.values().any(|x| {
                x.index == index && x.state == WorkerState::Ready && x.template != d.template
            })
        };
        let spawned = self.apply(&p);
        if failing {
            let after = self.w.obs().clone();
            for index in 0..n {
                // (A sick old worker may be replaced by a healthy one of any template.)
                let sick_only = before.workers.values().all(|x| {
                    x.index != index
                        || x.state != WorkerState::Ready
                        || x.template == d.template
                        || d.unhealthy(x).is_some()
                });
                if old_ready_at(&before, index) && !sick_only {
                    prop_assert!(
                        old_ready_at(&after, index),
                        "a failing rollout took index {}'s old worker: {:?} from {:?}",
                        index,
                        p.actions,
                        summary(&before)
                    );
                }
            }
        }
        let after_ready = ready_count(&self.w, n);
        let floor = (n as usize).saturating_sub(d.rollout.max_unavailable as usize);
        prop_assert!(
            after_ready >= before_ready.min(floor),
            "ready {} -> {} (floor {}): {:?} from {:?}",
            before_ready,
            after_ready,
            floor,
            p.actions,
            summary(&before)
        );
        let cap = (n + d.rollout.max_surge) as usize;
        prop_assert!(
            live_count(&self.w, n) <= cap,
            "{} live > {}: {:?} from {:?}",
            live_count(&self.w, n),
            cap,
            p.actions,
            summary(&before)
        );
        if let Some(o) = self.w.observed.apps.get(&app()) {
            let mut seen = BTreeSet::new();
            for x in o
                .workers
                .values()
                .filter(|x| x.state != WorkerState::Draining)
            {
                prop_assert!(x.index < n, "live worker at index {} >= {}", x.index, n);
                if d.unhealthy(x).is_none() {
                    prop_assert!(
                        seen.insert((x.index, x.template.clone())),
                        "duplicate {:?}",
                        (x.index, &x.template)
                    );
                }
            }
        }
        // Idempotence: the same `now`, after applying, repeats nothing.
        let again = self.w.plan();
        let done: BTreeSet<String> = p.actions.iter().map(key).collect();
        for a in &again.actions {
            prop_assert!(!done.contains(&key(a)), "repeated {:?}", a);
        }
        if !spawned {
            prop_assert!(
                again.actions.is_empty(),
                "not idempotent: {:?} then {:?} from {:?}",
                p.actions,
                again.actions,
                summary(&before)
            );
        }
        let did = !p.actions.is_empty();
        Ok((p, did))
    }

    /// Carries a plan out like the runtime would; crash-at-start workers die at once.
    fn apply(&mut self, p: &Plan) -> bool {
        let ids = self.w.apply(p);
        self.spawns += ids.len();
        for id in &ids {
            let t = self.w.worker(*id).template.clone();
            if self.fate(&t) == Fate::CrashAtStart {
                self.w.exit(*id, ExitReason::Code(1));
            } else if id.0.is_multiple_of(3) {
                self.stubborn.insert(*id);
            }
        }
        !ids.is_empty()
    }

    fn plan_until_quiet(&mut self) -> Result<Option<std::time::Instant>, TestCaseError> {
        for _ in 0..50 {
            let (p, did) = self.step()?;
            if !did {
                return Ok(p.wake_at);
            }
        }
        Err(TestCaseError::fail("plans never ran dry"))
    }

    fn event(&mut self, op: &Op, wake: Option<std::time::Instant>) {
        let starting = |x: &super::Worker| x.state == WorkerState::Starting;
        match *op {
            Op::Report(k) => {
                if let Some(id) = self.nth(k, starting) {
                    if self.fate(&self.w.worker(id).template) == Fate::Good {
                        self.w.obs_mut().record_ready_report(id);
                    }
                }
            }
            Op::Crash(k) => {
                if let Some(id) = self.nth(k, |x| x.state != WorkerState::Draining) {
                    self.w.exit(id, ExitReason::Code(1));
                }
            }
            Op::Exit(k) => {
                if let Some(id) = self.nth(k, |x| {
                    x.drain.as_ref().is_some_and(|d| d.signalled_at.is_some())
                }) {
                    let killed = self.w.worker(id).drain.as_ref().is_some_and(|d| d.killed);
                    if killed || !self.stubborn.contains(&id) {
                        self.w.exit(
                            id,
                            if killed {
                                ExitReason::Signal(9)
                            } else {
                                ExitReason::Code(0)
                            },
                        );
                    }
                }
            }
            Op::Idle(k) => {
                if let Some(id) = self.nth(k, |x| x.inflight > 0) {
                    self.w.worker_mut(id).inflight = 0;
                }
            }
            Op::Advance(ms) => self.w.advance(Duration::from_millis(ms)),
            Op::AdvanceToWake => {
                if let Some(at) = wake {
                    self.w.now = at;
                }
            }
            Op::NewTemplate(f) => {
                self.revisions += 1;
                let rev = Revision(format!("r{}", self.revisions));
                self.fates.insert(rev.clone(), f);
                self.w.d_mut().template = Template {
                    revision: rev,
                    generation: 0,
                };
            }
            Op::Reload => self.w.d_mut().template.generation += 1,
            Op::Scale(n) => self.w.d_mut().replicas = n,
            Op::Sick(k) => {
                if let Some(id) = self.nth(k, |x| x.state == WorkerState::Ready) {
                    self.w.worker_mut(id).liveness_failures = 3;
                }
            }
        }
        // Busy workers make http drains wait for idle.
        let now_busy: Vec<WorkerId> = self
            .w
            .ids(|x| x.state == WorkerState::Ready && x.id.0.is_multiple_of(2));
        for id in now_busy {
            self.w.worker_mut(id).inflight = 1;
        }
    }

    /// The world on its own: good workers report ready, draining workers exit when
    /// signalled (stubborn ones when killed), busy ones go idle, time jumps to `wake_at`.
    /// Returns whether it went quiet.
    fn settle(&mut self) -> Result<bool, TestCaseError> {
        self.settle_n(400)
    }

    fn settle_n(&mut self, rounds: usize) -> Result<bool, TestCaseError> {
        for _ in 0..rounds {
            let wake = self.plan_until_quiet()?;
            let mut happened = false;
            let ids = self.w.ids(|_| true);
            for id in ids {
                let x = self.w.worker(id).clone();
                if x.state == WorkerState::Starting
                    && self.fate(&x.template) == Fate::Good
                    && !x.ready_reported
                {
                    self.w.obs_mut().record_ready_report(id);
                    happened = true;
                }
                if let Some(d) = &x.drain {
                    if d.killed || (d.signalled_at.is_some() && !self.stubborn.contains(&id)) {
                        self.w.exit(
                            id,
                            if d.killed {
                                ExitReason::Signal(9)
                            } else {
                                ExitReason::Code(0)
                            },
                        );
                        happened = true;
                    } else if x.inflight > 0 {
                        self.w.worker_mut(id).inflight = 0;
                        happened = true;
                    }
                }
            }
            if !happened {
                match wake {
                    Some(at) => self.w.now = at,
                    None => return Ok(true),
                }
            }
        }
        Ok(false)
    }
}

/// Delivers the events; one whose flag is false is followed by the next event before
/// any plan (the runtime records several events between two plans: a readiness report
/// and a reload request can land together).
fn run(d: DesiredApp, ops: &[(Op, bool)]) -> Result<Sim, TestCaseError> {
    let mut sim = Sim::new(d);
    let mut wake = sim.plan_until_quiet()?;
    for (op, plan_after) in ops {
        sim.event(op, wake);
        if *plan_after {
            wake = sim.plan_until_quiet()?;
        }
    }
    sim.plan_until_quiet()?;
    Ok(sim)
}

/// Events, most of them followed by a plan.
fn ops(max: usize) -> impl Strategy<Value = Vec<(Op, bool)>> {
    proptest::collection::vec((op(), proptest::bool::weighted(0.7)), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Around every plan: live workers <= replicas + maxSurge; the planner never takes
    /// the ready count below replicas - maxUnavailable (nor below where it was); a failed
    /// readiness drains no ready worker, a failed rollout leaves every index its old
    /// Ready worker; live indexes are in 0..replicas and unique per template; planning
    /// again at the same instant repeats nothing.
    #[test]
    fn safety_invariants_hold_at_every_step(d in spec(), ops in ops(40)) {
        let mut sim = run(d, &ops)?;
        sim.settle()?;
    }

    /// Once the chaos stops, the app ends with exactly `replicas` Ready workers of the
    /// desired template at indexes 0..replicas and nothing draining, unless the desired
    /// template failed (then: full count at the old template(s)) or cannot run at all.
    #[test]
    fn converges_to_the_desired_set(d in spec(), ops in ops(40)) {
        let mut sim = run(d, &ops)?;
        let quiet = sim.settle()?;
        let d = sim.w.d().clone();
        let o = sim.w.obs().clone();
        let t = d.template.clone();
        let failed = o.failed.as_ref().is_some_and(|f| f.template == t);
        let (ph, why) = phase(Some(&d), &o, sim.w.now);
        if !quiet {
            // Only a template that cannot run, with nothing to fall back to, loops.
            prop_assert_ne!(sim.fate(&t), Fate::Good, "a good template did not settle");
            // A failure with nothing left to fall back on no longer blocks retries.
            let fallback = o.last_good.as_ref().is_some_and(|g| *g != t)
                || o.workers.values().any(|x| x.state == WorkerState::Ready && x.template != t);
            prop_assert!(!failed || !fallback, "a failed rollout with a fallback keeps looping");
            prop_assert!(matches!(ph, Phase::CrashLoopBackOff | Phase::Degraded | Phase::Progressing), "{:?}", ph);
            return Ok(());
        }
        let mut live: Vec<(u32, Template)> =
            o.workers.values().map(|x| (x.index, x.template.clone())).collect();
        live.sort();
        prop_assert!(o.workers.values().all(|x| x.state == WorkerState::Ready), "not all ready: {:?}", o.workers);
        let indexes: Vec<u32> = live.iter().map(|(i, _)| *i).collect();
        prop_assert_eq!(indexes, (0..d.replicas).collect::<Vec<_>>(), "{:?}", o);
        if failed {
            prop_assert_eq!(ph, Phase::Degraded);
            prop_assert!(why.is_some_and(|w| w.starts_with("rollout of")));
        } else {
            prop_assert!(live.iter().all(|(_, x)| *x == t), "not all at {:?}: {:?}", t, live);
            prop_assert_eq!(o.last_good.as_ref(), Some(&t));
            prop_assert_eq!(ph, Phase::Available, "{:?}", why);
        }
    }

    /// Reload and edit storms during rollouts (overlapping reloads, a readiness report
    /// landing together with a reload, edits during reloads): every run converges to
    /// `replicas` Ready workers of the newest template, and once the storm is over the
    /// last rollout starts at most one worker per index (superseded reloads coalesce).
    #[test]
    fn reload_and_edit_storms_always_converge(
        d in spec(),
        ops in proptest::collection::vec((storm_op(), proptest::bool::weighted(0.5)), 0..60),
    ) {
        let mut sim = run(d, &ops)?;
        let before = sim.spawns;
        prop_assert!(sim.settle()?, "a storm of reloads never settled: {:?}", summary(sim.w.obs()));
        let d = sim.w.d().clone();
        let o = sim.w.obs().clone();
        let failed = o.failed.as_ref().is_some_and(|f| f.template == d.template);
        let (ph, why) = phase(Some(&d), &o, sim.w.now);
        prop_assert_eq!(o.workers.len(), d.replicas as usize, "{:?}", summary(&o));
        prop_assert!(o.workers.values().all(|x| x.state == WorkerState::Ready), "{:?}", summary(&o));
        if failed {
            // Only a readiness timeout (time passing in the storm) fails a good template.
            prop_assert_eq!(ph, Phase::Degraded);
        } else {
            prop_assert!(o.workers.values().all(|x| x.template == d.template), "{:?}", summary(&o));
            prop_assert_eq!(ph, Phase::Available, "{:?}", why);
            prop_assert!(
                sim.spawns - before <= d.replicas as usize,
                "{} spawns after the storm for {} replicas",
                sim.spawns - before,
                d.replicas
            );
        }
    }
}

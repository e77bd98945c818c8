//! Table tests: one readable case per planning rule.

use std::time::Duration;

use super::fixtures::{app, tpl, World, READY_TIMEOUT, SHUTDOWN};
use super::{
    phase, vacant_state, Action, DesiredApp, DrainReason, ExitReason, Phase, ReadinessGate,
    Template, VacantState, WorkerId, WorkerState,
};
use crate::model::RestartPolicy;

const MS: Duration = Duration::from_millis(1);

fn spawn(index: u32, t: &Template) -> Action {
    Action::Spawn {
        app: app(),
        index,
        template: t.clone(),
    }
}
fn ready(w: WorkerId) -> Action {
    Action::MarkReady {
        app: app(),
        worker: w,
    }
}
fn drain(w: WorkerId, reason: DrainReason) -> Action {
    Action::Drain {
        app: app(),
        worker: w,
        reason,
    }
}
fn signal(w: WorkerId) -> Action {
    Action::Signal {
        app: app(),
        worker: w,
    }
}
fn kill(w: WorkerId) -> Action {
    Action::Kill {
        app: app(),
        worker: w,
    }
}
fn available(t: &Template) -> Action {
    Action::MarkAvailable {
        app: app(),
        template: t.clone(),
    }
}

/// A world with `n` Ready workers of "a", proven (last_good = a), settled.
fn running(d: DesiredApp) -> World {
    let mut w = World::new(d);
    for _ in 0..10 {
        w.settle();
        for id in w.ids(|x| x.state == WorkerState::Starting) {
            w.obs_mut().record_ready_report(id);
        }
    }
    assert_eq!(w.obs().last_good, Some(tpl("a")));
    w
}

#[test]
fn spawns_every_index_of_a_new_app() {
    let mut w = World::new(DesiredApp::test(3));
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            spawn(0, &tpl("a")),
            spawn(1, &tpl("a")),
            spawn(2, &tpl("a"))
        ]
    );
    assert_eq!(p.wake_at, None);
}

#[test]
fn immediate_gate_marks_ready_at_once_then_available() {
    let mut w = World::new(DesiredApp::test(2));
    let p = w.plan();
    let ids = w.apply(&p);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![ready(ids[0]), ready(ids[1]), available(&tpl("a"))]
    );
    w.apply(&p);
    assert_eq!(phase(Some(w.d()), w.obs(), w.now), (Phase::Available, None));
}

#[test]
fn delay_gate_marks_ready_after_the_delay() {
    let mut w = World::new(DesiredApp::test(1).gate(ReadinessGate::Delay(Duration::from_secs(2))));
    let p = w.plan();
    let ids = w.apply(&p);
    let p = w.plan();
    assert_eq!(p.actions, vec![]);
    assert_eq!(p.wake_at, Some(w.now + Duration::from_secs(2)));
    w.advance(Duration::from_secs(2));
    assert_eq!(w.plan().actions, vec![ready(ids[0]), available(&tpl("a"))]);
}

#[test]
fn reported_gate_waits_for_the_report() {
    let mut w = World::new(DesiredApp::test(1).gate(ReadinessGate::Reported));
    let p = w.plan();
    let ids = w.apply(&p);
    let p = w.plan();
    assert_eq!(p.actions, vec![]);
    assert_eq!(
        p.wake_at,
        Some(w.now + READY_TIMEOUT),
        "wakes for the readiness deadline"
    );
    w.advance(Duration::from_secs(1));
    assert!(w.obs_mut().record_ready_report(ids[0]));
    assert_eq!(w.plan().actions, vec![ready(ids[0]), available(&tpl("a"))]);
}

#[test]
fn http_drain_signals_when_idle_and_kills_after_the_timeout() {
    let mut w = running(DesiredApp::test(2));
    let last = w.ids(|w| w.index == 1)[0];
    w.worker_mut(last).inflight = 3;
    w.d_mut().replicas = 1;
    let p = w.plan();
    assert_eq!(p.actions, vec![drain(last, DrainReason::ScaledDown)]);
    assert_eq!(
        p.wake_at,
        Some(w.now + SHUTDOWN),
        "gives up waiting for idle after the timeout"
    );
    w.apply(&p);
    w.advance(Duration::from_secs(1));
    w.worker_mut(last).inflight = 0;
    let p = w.plan();
    assert_eq!(p.actions, vec![signal(last)]);
    assert_eq!(p.wake_at, Some(w.now + SHUTDOWN));
    w.apply(&p);
    w.advance(SHUTDOWN - MS);
    assert_eq!(w.plan().actions, vec![]);
    w.advance(MS);
    assert_eq!(w.plan().actions, vec![kill(last)]);
}

#[test]
fn http_drain_signals_after_the_timeout_even_when_busy() {
    let mut w = running(DesiredApp::test(2));
    let last = w.ids(|w| w.index == 1)[0];
    w.worker_mut(last).inflight = 3;
    w.d_mut().replicas = 1;
    let p = w.plan();
    w.apply(&p);
    w.advance(SHUTDOWN);
    assert_eq!(w.plan().actions, vec![signal(last)]);
}

#[test]
fn inherit_drain_signals_right_away() {
    let mut w = running(DesiredApp::test(2).inherit());
    let last = w.ids(|w| w.index == 1)[0];
    w.d_mut().replicas = 1;
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![drain(last, DrainReason::ScaledDown), signal(last)]
    );
    assert_eq!(p.wake_at, Some(w.now + SHUTDOWN));
}

#[test]
fn scale_down_drains_highest_indexes_first_and_scale_up_fills() {
    let mut w = running(DesiredApp::test(4));
    let by_index = |w: &World, i| w.ids(|x| x.index == i)[0];
    let (i2, i3) = (by_index(&w, 2), by_index(&w, 3));
    w.worker_mut(i2).inflight = 1;
    w.worker_mut(i3).inflight = 1;
    w.d_mut().replicas = 2;
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            drain(i3, DrainReason::ScaledDown),
            drain(i2, DrainReason::ScaledDown)
        ]
    );
    w.apply(&p);
    w.d_mut().replicas = 3;
    assert_eq!(w.plan().actions, vec![spawn(2, &tpl("a"))]);
}

#[test]
fn crash_restarts_after_exponential_backoff_that_resets_after_a_clean_run() {
    let mut w =
        running(DesiredApp::test(1).backoff(Duration::from_millis(100), Duration::from_secs(30)));
    let mut id = w.ids(|_| true)[0];
    // Three quick crashes: 100ms, 200ms, 400ms.
    for (n, wait) in [(1, 100), (2, 200), (3, 400)] {
        w.advance(Duration::from_secs(1));
        w.exit(id, ExitReason::Code(1));
        assert_eq!(w.obs().slots[&0].consecutive_failures, n);
        let p = w.plan();
        assert_eq!(p.actions, vec![]);
        assert_eq!(p.wake_at, Some(w.now + wait * MS), "failure {n}");
        w.advance(wait * MS);
        let p = w.plan();
        assert_eq!(p.actions, vec![spawn(0, &tpl("a"))], "failure {n}");
        id = w.apply(&p)[0];
        w.settle();
    }
    assert_eq!(w.obs().slots[&0].restarts, 3);
    // Ready for max(10s, backoff.max) = 30s: the streak is forgiven.
    w.advance(Duration::from_secs(30));
    w.exit(id, ExitReason::Signal(9));
    assert_eq!(w.obs().slots[&0].consecutive_failures, 1);
    assert_eq!(w.plan().wake_at, Some(w.now + 100 * MS));
}

#[test]
fn restart_policy_never_and_on_failure() {
    let mut w = running(DesiredApp::test(1).policy(RestartPolicy::Never));
    let id = w.ids(|_| true)[0];
    w.exit(id, ExitReason::Code(1));
    w.advance(Duration::from_secs(60));
    let p = w.plan();
    assert_eq!((p.actions, p.wake_at), (vec![], None));
    let (ph, why) = phase(Some(w.d()), w.obs(), w.now);
    assert_eq!(ph, Phase::Degraded);
    assert_eq!(
        why.as_deref(),
        Some("worker 0 exited with code 1; restart policy is never")
    );

    let mut w = running(DesiredApp::test(2).policy(RestartPolicy::OnFailure));
    let ids = w.ids(|_| true);
    w.exit(ids[0], ExitReason::Code(0));
    w.exit(ids[1], ExitReason::Code(3));
    w.advance(Duration::from_secs(1));
    assert_eq!(
        w.plan().actions,
        vec![spawn(1, &tpl("a"))],
        "only the failure restarts"
    );
}

#[test]
fn an_exit_the_policy_does_not_restart_is_exited_and_no_restart() {
    let mut w = running(DesiredApp::test(2).policy(RestartPolicy::OnFailure));
    let ids = w.ids(|_| true);
    w.exit(ids[0], ExitReason::Code(0));
    w.exit(ids[1], ExitReason::Code(3));
    let d = w.d().clone();
    let slot = |w: &World, i: u32| w.obs().slots[&i].clone();
    assert_eq!(vacant_state(&d, &slot(&w, 0)), VacantState::Exited);
    assert_eq!(vacant_state(&d, &slot(&w, 1)), VacantState::Backoff);
    assert_eq!(
        (slot(&w, 0).restarts, slot(&w, 1).restarts),
        (0, 0),
        "a restart counts when it happens"
    );
    w.advance(Duration::from_secs(1));
    let p = w.plan();
    w.apply(&p);
    assert_eq!((slot(&w, 0).restarts, slot(&w, 1).restarts), (0, 1));

    let mut w = running(DesiredApp::test(1).policy(RestartPolicy::Never));
    let id = w.ids(|_| true)[0];
    w.exit(id, ExitReason::Signal(9));
    w.advance(Duration::from_secs(60));
    w.settle();
    assert_eq!(vacant_state(w.d(), &w.obs().slots[&0]), VacantState::Exited);
    assert_eq!(w.obs().slots[&0].restarts, 0);
}

#[test]
fn a_failed_restart_attempt_counts_as_a_restart() {
    let mut w = running(DesiredApp::test(1));
    let id = w.ids(|_| true)[0];
    w.exit(id, ExitReason::Code(1));
    w.advance(Duration::from_secs(1));
    assert_eq!(w.plan().actions, vec![spawn(0, &tpl("a"))]);
    let now = w.now;
    w.obs_mut().record_spawn_failed(0, tpl("a"), now);
    assert_eq!(w.obs().slots[&0].restarts, 1);
    assert_eq!(
        vacant_state(w.d(), &w.obs().slots[&0]),
        VacantState::Backoff
    );
}

#[test]
fn rolling_replacement_surges_one_then_drains_the_old_one() {
    let mut w = running(DesiredApp::test(2).gate(ReadinessGate::Reported));
    let old: Vec<WorkerId> = w.ids(|_| true);
    w.d_mut().template = tpl("b");
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![spawn(0, &tpl("b"))],
        "one surge worker, nothing drained"
    );
    let new0 = w.apply(&p)[0];
    assert_eq!(w.plan().actions, vec![], "waits for the new worker");
    w.obs_mut().record_ready_report(new0);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            ready(new0),
            drain(old[0], DrainReason::Replaced),
            spawn(1, &tpl("b")),
            signal(old[0])
        ],
        "a replacement keeps the index it replaces; an idle old worker is signalled at once"
    );
    let new1 = w.apply(&p)[0];
    w.obs_mut().record_ready_report(new1);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            ready(new1),
            drain(old[1], DrainReason::Replaced),
            available(&tpl("b")),
            signal(old[1])
        ]
    );
}

#[test]
fn rolling_replacement_without_surge_drains_first_within_max_unavailable() {
    let mut w = running(
        DesiredApp::test(3)
            .rollout(0, 1)
            .gate(ReadinessGate::Reported),
    );
    let old0 = w.ids(|x| x.index == 0)[0];
    w.d_mut().template = tpl("b");
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            drain(old0, DrainReason::Replaced),
            spawn(0, &tpl("b")),
            signal(old0)
        ]
    );
}

#[test]
fn memory_limit_replaces_surge_first() {
    let mut w = running(
        DesiredApp::test(2)
            .memory(100)
            .gate(ReadinessGate::Reported),
    );
    let fat = w.ids(|x| x.index == 1)[0];
    w.worker_mut(fat).rss = Some(101);
    let p = w.plan();
    assert_eq!(p.actions, vec![spawn(1, &tpl("a"))]);
    let new = w.apply(&p)[0];
    w.obs_mut().record_ready_report(new);
    w.worker_mut(fat).inflight = 1;
    assert_eq!(
        w.plan().actions,
        vec![ready(new), drain(fat, DrainReason::MemoryLimit)]
    );
    w.settle();
    w.exit(fat, ExitReason::Code(0));
    assert_eq!(
        w.obs().slots[&1].restarts,
        1,
        "a memory replacement shows as a restart"
    );
    assert!(!w.obs().slots[&1].restart_pending);
}

#[test]
fn liveness_failure_without_surge_drains_first() {
    let mut w = running(DesiredApp::test(2).rollout(0, 1).liveness(3));
    let sick = w.ids(|x| x.index == 0)[0];
    w.worker_mut(sick).liveness_failures = 3;
    let p = w.plan();
    assert_eq!(
        p.actions[..2],
        [
            drain(sick, DrainReason::LivenessFailed),
            spawn(0, &tpl("a"))
        ]
    );
}

#[test]
fn readiness_timeout_fails_the_rollout_closed() {
    let mut w = running(DesiredApp::test(2).gate(ReadinessGate::Reported));
    let old = w.ids(|_| true);
    w.d_mut().template = tpl("b");
    let p = w.plan();
    let new = w.apply(&p)[0];
    w.advance(READY_TIMEOUT - MS);
    assert_eq!(w.plan().actions, vec![]);
    w.advance(MS);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            drain(new, DrainReason::ReadinessTimeout),
            Action::FailRollout {
                app: app(),
                template: tpl("b"),
                reason: "not ready within 30s".into()
            },
            signal(new),
        ]
    );
    w.apply(&p);
    w.exit(new, ExitReason::Code(0));
    assert_eq!(w.settle(), vec![], "the failed template is not retried");
    assert_eq!(
        w.ids(|x| x.state == WorkerState::Ready),
        old,
        "old workers keep serving"
    );
    let (ph, why) = phase(Some(w.d()), w.obs(), w.now);
    assert_eq!(ph, Phase::Degraded);
    assert_eq!(
        why.as_deref(),
        Some("rollout of revision b failed: not ready within 30s")
    );
    // A reload (new generation) tries again.
    w.d_mut().template.generation = 1;
    assert_eq!(
        w.plan().actions,
        vec![spawn(
            0,
            &Template {
                revision: tpl("b").revision,
                generation: 1
            }
        )]
    );
}

#[test]
fn crash_during_rollout_fails_it_and_old_crashes_come_back_old() {
    let mut w = running(DesiredApp::test(2).gate(ReadinessGate::Reported));
    let old1 = w.ids(|x| x.index == 1)[0];
    w.d_mut().template = tpl("b");
    let p = w.plan();
    let new = w.apply(&p)[0];
    w.advance(Duration::from_secs(1));
    w.exit(new, ExitReason::Code(2));
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::FailRollout {
            app: app(),
            template: tpl("b"),
            reason: "worker 0 exited with code 2".into()
        }]
    );
    w.apply(&p);
    w.exit(old1, ExitReason::Signal(9));
    w.advance(Duration::from_secs(1));
    assert_eq!(
        w.plan().actions,
        vec![spawn(1, &tpl("a"))],
        "capacity stays full at the old template"
    );
}

#[test]
fn proven_template_missing_its_deadline_after_a_crash_is_an_instance_failure() {
    let mut w = running(DesiredApp::test(2).gate(ReadinessGate::Reported));
    let id = w.ids(|x| x.index == 0)[0];
    w.exit(id, ExitReason::Code(1));
    w.advance(Duration::from_secs(1));
    let p = w.plan();
    let again = w.apply(&p)[0];
    w.advance(READY_TIMEOUT);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![drain(again, DrainReason::ReadinessTimeout), signal(again)]
    );
    w.apply(&p);
    assert_eq!(
        w.plan().actions,
        vec![],
        "no respawn while the timed-out worker still runs"
    );
    w.exit(again, ExitReason::Code(0));
    assert_eq!(w.obs().slots[&0].consecutive_failures, 2);
    assert_eq!(w.plan().wake_at, Some(w.now + 200 * MS));
    assert!(w.obs().failed.is_none());
}

#[test]
fn first_start_crashes_loop_with_backoff_instead_of_failing_closed() {
    let mut w = World::new(DesiredApp::test(1));
    for _ in 0..2 {
        let p = w.plan();
        let id = w.apply(&p)[0];
        w.settle();
        w.exit(id, ExitReason::Code(1));
        assert_eq!(w.plan().actions, vec![]);
        w.advance(Duration::from_secs(1));
    }
    assert!(w.obs().failed.is_none());
    w.advance(Duration::from_secs(1));
    let (ph, _) = phase(Some(w.d()), w.obs(), w.now);
    assert_eq!(ph, Phase::CrashLoopBackOff);
}

#[test]
fn app_removal_drains_everything_with_the_remembered_timeout() {
    let mut w = running(DesiredApp::test(2).inherit());
    w.d_mut().shutdown_timeout = Duration::from_secs(60);
    w.plan();
    let ids = w.ids(|_| true);
    w.remove_app();
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            drain(ids[0], DrainReason::AppRemoved),
            drain(ids[1], DrainReason::AppRemoved),
            signal(ids[0]),
            signal(ids[1])
        ]
    );
    assert_eq!(p.wake_at, Some(w.now + Duration::from_secs(60)));
    assert_eq!(phase(None, w.obs(), w.now).0, Phase::Stopping);
}

#[test]
fn adopted_workers_make_the_app_available() {
    let mut w = World::new(DesiredApp::test(2));
    let now = w.now;
    w.obs_mut().record_adopted(WorkerId(40), 0, tpl("a"), now);
    w.obs_mut().record_adopted(WorkerId(41), 1, tpl("a"), now);
    assert_eq!(w.plan().actions, vec![available(&tpl("a"))]);
}

#[test]
fn phases() {
    let mut w = World::new(DesiredApp::test(2).gate(ReadinessGate::Reported));
    w.observed.apps.entry(app()).or_default();
    assert_eq!(phase(Some(w.d()), w.obs(), w.now), (Phase::Pending, None));
    let p = w.plan();
    w.apply(&p);
    assert_eq!(
        phase(Some(w.d()), w.obs(), w.now),
        (
            Phase::Progressing,
            Some("rolling out revision a: 0/2 ready".into())
        )
    );
    let ids = w.ids(|_| true);
    for id in &ids {
        w.obs_mut().record_ready_report(*id);
    }
    w.settle();
    assert_eq!(phase(Some(w.d()), w.obs(), w.now), (Phase::Available, None));
    w.exit(ids[1], ExitReason::Signal(9));
    assert_eq!(
        phase(Some(w.d()), w.obs(), w.now),
        (
            Phase::Degraded,
            Some("worker 1 killed by SIGKILL; restarting".into())
        )
    );
}

#[test]
fn wake_at_is_the_earliest_deadline() {
    let mut w = running(DesiredApp::test(2));
    let ids = w.ids(|_| true);
    w.exit(ids[0], ExitReason::Code(1)); // backoff 100ms
    w.d_mut().replicas = 1;
    w.worker_mut(ids[1]).inflight = 1;
    // index 1 drains (wait for idle: 10s), index 0 restarts in 100ms.
    assert_eq!(w.plan().wake_at, Some(w.now + 100 * MS));
}

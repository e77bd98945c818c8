//! Overlapping reloads and edits: the interleavings of issue 18 (a rollout wedged at its
//! surge cap, 50 reloads spawning 46 workers), one readable case each.

use super::fixtures::{app, tpl, World};
use super::{phase, DesiredApp, Phase, ReadinessGate, Template, WorkerState};

/// `n` Ready workers of "a" (Reported readiness, surge 1, unavailable 0), proven.
fn running(n: u32) -> World {
    let mut w = World::new(DesiredApp::test(n).gate(ReadinessGate::Reported));
    assert!(w.run_on(100).quiet);
    assert_eq!(w.obs().last_good, Some(tpl("a")));
    w
}

fn reload(w: &mut World) {
    w.d_mut().template.generation += 1;
}

/// One plan, carried out (what the daemon does after every request).
fn step(w: &mut World) -> usize {
    let p = w.plan();
    w.apply(&p).len()
}

/// Quiet, `replicas` Ready workers at the desired template, nothing else, Available.
fn assert_converged(w: &mut World) {
    let stats = w.run_on(500);
    assert!(stats.quiet, "never went quiet: {:#?}", w.obs().workers);
    let t: Template = w.d().template.clone();
    let mut live: Vec<(u32, Template, WorkerState)> = w
        .obs()
        .workers
        .values()
        .map(|x| (x.index, x.template.clone(), x.state))
        .collect();
    live.sort_by_key(|(i, t, _)| (*i, t.clone()));
    let want: Vec<_> = (0..w.d().replicas)
        .map(|i| (i, t.clone(), WorkerState::Ready))
        .collect();
    assert_eq!(live, want);
    assert_eq!(phase(Some(w.d()), w.obs(), w.now).0, Phase::Available);
}

#[test]
fn a_reload_whose_surge_worker_got_ready_just_before_the_next_reload_does_not_wedge() {
    let mut w = running(4);
    reload(&mut w);
    assert_eq!(step(&mut w), 1, "one surge worker for index 0");
    let surge = w.ids(|x| x.state == WorkerState::Starting)[0];
    // Its readiness report and the second reload arrive before the next plan.
    w.obs_mut().record_ready_report(surge);
    reload(&mut w);
    assert_converged(&mut w);
}

#[test]
fn adopted_duplicates_at_the_surge_cap_are_cleaned_up() {
    // After a daemon restart, index 0 holds two Ready workers of older generations and
    // the app is at its surge cap: one of them must go so the rollout can go on.
    let mut w = running(4);
    let now = w.now;
    let old = Template {
        generation: 1,
        ..tpl("a")
    };
    w.obs_mut()
        .record_adopted(super::WorkerId(900), 0, old.clone(), now);
    w.d_mut().template.generation = 2;
    assert_converged(&mut w);
}

#[test]
fn fifty_reloads_in_a_burst_coalesce() {
    let mut w = running(4);
    let mut spawns = 0;
    for _ in 0..50 {
        reload(&mut w);
        spawns += step(&mut w);
    }
    spawns += w.run_on(500).spawns;
    eprintln!("burst: {spawns} spawns");
    assert!((4..=8).contains(&spawns), "{spawns} spawns for 50 reloads");
    assert_converged(&mut w);
}

#[test]
fn fifty_reloads_while_workers_get_ready_coalesce() {
    let mut w = running(4);
    let mut spawns = 0;
    for k in 0..50 {
        reload(&mut w);
        spawns += step(&mut w);
        if k % 10 == 9 {
            // Some readiness reports land between requests.
            for id in w.ids(|x| x.state == WorkerState::Starting) {
                w.obs_mut().record_ready_report(id);
            }
            spawns += step(&mut w);
        }
    }
    spawns += w.run_on(500).spawns;
    eprintln!("interleaved: {spawns} spawns");
    assert!(spawns <= 12, "{spawns} spawns for 50 reloads");
    assert_converged(&mut w);
}

#[test]
fn an_edit_during_a_reload_rolls_to_the_edit() {
    let mut w = running(4);
    reload(&mut w);
    step(&mut w);
    w.d_mut().template = tpl("b");
    assert_converged(&mut w);
}

#[test]
fn a_reload_during_a_rollout_ends_at_the_reloaded_template() {
    let mut w = running(4);
    w.d_mut().template = tpl("b");
    step(&mut w);
    let first = w.ids(|x| x.state == WorkerState::Starting)[0];
    w.obs_mut().record_ready_report(first);
    step(&mut w);
    reload(&mut w);
    assert_converged(&mut w);
    assert_eq!(
        w.d().template,
        Template {
            generation: 1,
            ..tpl("b")
        }
    );
    let _ = app();
}

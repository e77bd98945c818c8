//! [`phase`]: the one-word summary of an app (DESIGN.md, "Phases"), with the reason
//! shown as `error` in status when it is not Available.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::backoff::backoff_delay;
use super::decide::{describe_exit, human};
use super::{DesiredApp, DrainReason, ObservedApp, Phase, SlotHistory, Template, WorkerState};
use crate::model::RestartPolicy;

/// The phase of an app and why (`None` when there is nothing to say).
///
/// In order: no desired app is `Stopping`; a failed rollout of the desired template is
/// `Degraded`; an instance without a ready worker after two or more failures in a row is
/// `CrashLoopBackOff`; an instance the restart policy leaves empty is `Degraded`; nothing
/// ever started is `Pending`; every instance Ready at the desired template, healthy, with
/// nothing draining, is `Available`; an instance without a ready worker since a crash is
/// `Degraded`; anything else is a rollout, scale or replacement under way: `Progressing`.
/// `Invalid` is the runtime's call (a rejected manifest), never returned here.
#[must_use]
pub fn phase(
    desired: Option<&DesiredApp>,
    observed: &ObservedApp,
    now: Instant,
) -> (Phase, Option<String>) {
    let Some(d) = desired else {
        let n = observed.workers.len();
        return (
            Phase::Stopping,
            Some(format!("app removed; {n} worker(s) draining")),
        );
    };
    if let Some(failure) = observed
        .failed
        .as_ref()
        .filter(|f| f.template == d.template)
    {
        return (
            Phase::Degraded,
            Some(format!(
                "rollout of {} failed: {}",
                describe_template(&failure.template),
                failure.reason
            )),
        );
    }
    let ready_at = |index: u32| {
        observed
            .workers
            .values()
            .any(|w| w.index == index && w.state == WorkerState::Ready)
    };
    let starting_at = |index: u32| {
        observed.workers.values().any(|w| {
            w.index == index
                && (w.state == WorkerState::Starting
                    || w.drain
                        .as_ref()
                        .is_some_and(|dr| dr.reason == DrainReason::ReadinessTimeout))
        })
    };
    for index in 0..d.replicas {
        let Some(slot) = observed.slots.get(&index) else {
            continue;
        };
        if ready_at(index) || slot.consecutive_failures < 2 {
            continue;
        }
        let Some((at, reason, _)) = &slot.last_exit else {
            continue;
        };
        let (at, reason) = (*at, *reason);
        if slot.restart_pending || starting_at(index) {
            let mut why = format!(
                "worker {index} failed {} times in a row (last: {})",
                slot.consecutive_failures,
                describe_exit(reason)
            );
            let due = at + backoff_delay(&d.restart.backoff, slot.consecutive_failures);
            if slot.restart_pending && due > now {
                why.push_str(&format!("; restarting in {}", human(due - now)));
            }
            return (Phase::CrashLoopBackOff, Some(why));
        }
    }
    for index in 0..d.replicas {
        let Some(slot) = observed.slots.get(&index) else {
            continue;
        };
        let Some((_, reason, _)) = &slot.last_exit else {
            continue;
        };
        let reason = *reason;
        let forbidden = slot.restart_forbidden(d.restart.policy);
        if slot.restart_pending && forbidden && !ready_at(index) && !starting_at(index) {
            let policy = match d.restart.policy {
                RestartPolicy::OnFailure => "on-failure",
                _ => "never",
            };
            return (
                Phase::Degraded,
                Some(format!(
                    "worker {index} {}; restart policy is {policy}",
                    describe_exit(reason)
                )),
            );
        }
    }
    if observed.workers.is_empty() && observed.slots.is_empty() {
        return (Phase::Pending, None);
    }
    let current = |index: u32| {
        observed.workers.values().any(|w| {
            w.index == index
                && w.state == WorkerState::Ready
                && w.template == d.template
                && d.unhealthy(w).is_none()
        })
    };
    let all_current = (0..d.replicas).all(current);
    let live = observed
        .workers
        .values()
        .filter(|w| w.state != WorkerState::Draining)
        .count();
    let draining = observed.workers.len() - live;
    if all_current && live == d.replicas as usize && draining == 0 {
        return (Phase::Available, None);
    }
    for index in 0..d.replicas {
        let Some(slot) = observed.slots.get(&index) else {
            continue;
        };
        if let (true, Some((_, reason, _))) = (slot.restart_pending, &slot.last_exit) {
            if !ready_at(index) {
                return (
                    Phase::Degraded,
                    Some(format!(
                        "worker {index} {}; restarting",
                        describe_exit(*reason)
                    )),
                );
            }
        }
    }
    let updated = (0..d.replicas).filter(|&i| current(i)).count();
    let why = if updated < d.replicas as usize {
        format!(
            "rolling out {}: {updated}/{} ready",
            describe_template(&d.template),
            d.replicas
        )
    } else if live > d.replicas as usize {
        format!("scaling down to {}", d.replicas)
    } else {
        format!("{draining} worker(s) draining")
    };
    (Phase::Progressing, Some(why))
}

/// What status shows for an index that has history but no live worker (DESIGN.md
/// instance states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VacantState {
    /// Its last worker ended unplanned and it restarts once the backoff is over.
    Backoff,
    /// Its last worker ended and nothing will restart it: the restart policy says no
    /// (`never`, or `on-failure` after exit code 0), or it was stopped on purpose.
    Exited,
}

impl VacantState {
    /// The name shown in status (`Backoff`, `Exited`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            VacantState::Backoff => "Backoff",
            VacantState::Exited => "Exited",
        }
    }
}

/// The state of an index with no live worker: `Backoff` only when a restart will come
/// (pending and allowed by the restart policy), else `Exited`. An index waiting for a
/// restart the policy forbids must not look like it is about to come back.
#[must_use]
pub fn vacant_state(d: &DesiredApp, slot: &SlotHistory) -> VacantState {
    if slot.restart_pending && !slot.restart_forbidden(d.restart.policy) {
        VacantState::Backoff
    } else {
        VacantState::Exited
    }
}

/// `revision 3f2a9c1e`, or `revision 3f2a9c1e (reload 2)` for a reload.
#[must_use]
pub fn describe_template(t: &Template) -> String {
    if t.generation == 0 {
        format!("revision {}", t.revision)
    } else {
        format!("revision {} (reload {})", t.revision, t.generation)
    }
}

//! Builds the status JSON and the Prometheus metrics: a read-only view of the world (and
//! of the sockets the effects bound). Nothing here decides anything; the phase is the
//! planner's, overridden only by what the planner cannot know (a rejected manifest, a
//! port in use, a manifest not accepted yet).

use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

use clusterd_core::plan::{self, DesiredApp, Phase, WorkerState};
use clusterd_runtime::effects::Effects;

use super::rfc3339;
use super::world::AppRecord;
use crate::api_types::{
    AppStatus, InstanceState, InstanceStatus, ListenStatus, RolloutStatus, StatusReport,
};

/// One app's status.
pub fn app_status(
    app: &AppRecord,
    effects: &impl Effects,
    desired: Option<&DesiredApp>,
    now: Instant,
) -> AppStatus {
    let observed = &app.observed;
    let (phase, reason) = plan::phase(desired, observed, now);
    let (phase, error) = if let Some(e) = &app.error {
        (Phase::Invalid, Some(e.clone()))
    } else if let Some(e) = &app.runtime_error {
        (
            if app.current.is_some() {
                phase
            } else {
                Phase::Degraded
            },
            Some(e.clone()),
        )
    } else if app.current.is_none() && !app.removed {
        (Phase::Pending, reason)
    } else {
        (phase, reason)
    };
    // A worker stopped for not getting ready says why, when its probe could tell (its
    // exit itself only says "killed by SIGTERM"); kept until the app is Available.
    let error = match (error, &app.last_probe_error) {
        (Some(e), Some(probe)) if phase != Phase::Invalid => {
            Some(format!("{e}; not ready: {probe}"))
        }
        (e, _) => e,
    };
    let listen = app
        .current
        .as_ref()
        .map(|c| {
            c.spec
                .listen
                .iter()
                .map(|l| ListenStatus {
                    name: l.name.clone(),
                    address: effects
                        .bound_address(&app.name, l)
                        .unwrap_or_else(|| format!("{}:{}", l.address, l.port)),
                    mode: l.mode,
                    protocol: l.protocol,
                    certificate_expires: effects
                        .certificate_expiry(&app.name, l)
                        .map(crate::daemon::rfc3339),
                })
                .collect()
        })
        .unwrap_or_default();
    let shared = app.current.as_ref().is_some_and(|c| {
        c.spec
            .listen
            .iter()
            .any(|l| l.mode == clusterd_core::model::ListenMode::Shared)
    });
    let mut instances: Vec<InstanceStatus> = observed
        .workers
        .values()
        .map(|w| {
            let proc_ = app.procs.get(&w.id);
            let slot = observed.slots.get(&w.index);
            InstanceStatus {
                index: w.index,
                pid: proc_.map(|p| p.pid),
                state: match w.state {
                    WorkerState::Starting => InstanceState::Starting,
                    WorkerState::Ready => InstanceState::Ready,
                    WorkerState::Draining => InstanceState::Draining,
                },
                revision: w.template.revision.0.clone(),
                generation: w.template.generation,
                restarts: slot.map_or(0, |s| s.restarts),
                started: proc_.map(|p| rfc3339(p.spawned)),
                uptime_secs: proc_
                    .and_then(|p| p.spawned.elapsed().ok())
                    .map_or(0, |d| d.as_secs()),
                cpu_percent: proc_.and_then(|p| p.cpu_percent),
                rss_bytes: w.rss,
                inflight: effects.has_proxy(&app.name).then_some(w.inflight),
                requests_total: effects.served(&app.name, w.id),
                readiness_error: proc_
                    .and_then(|p| p.probe_error.clone())
                    .filter(|_| w.state == WorkerState::Starting),
                port: proc_.and_then(|p| p.ports.first().map(|(_, port)| *port)),
                last_exit: slot
                    .and_then(|s| s.last_exit.as_ref())
                    .map(|(_, r, _)| r.to_string()),
                bound: shared.then(|| proc_.map(|p| p.bound.clone()).unwrap_or_default()),
            }
        })
        .collect();
    // Indexes with no live worker: waiting out a backoff, or exited for good.
    if let Some(d) = desired {
        for index in 0..d.replicas {
            if instances.iter().any(|i| i.index == index) {
                continue;
            }
            if let Some(slot) = observed.slots.get(&index) {
                // Backoff only when a restart will come (the policy allows it).
                let state = match plan::vacant_state(d, slot) {
                    plan::VacantState::Backoff => InstanceState::Backoff,
                    plan::VacantState::Exited => InstanceState::Exited,
                };
                instances.push(InstanceStatus {
                    index,
                    pid: None,
                    state,
                    revision: slot
                        .last_exit
                        .as_ref()
                        .map(|(_, _, t)| t.revision.0.clone())
                        .unwrap_or_default(),
                    generation: slot.last_exit.as_ref().map_or(0, |(_, _, t)| t.generation),
                    restarts: slot.restarts,
                    started: None,
                    uptime_secs: 0,
                    cpu_percent: None,
                    rss_bytes: None,
                    inflight: None,
                    requests_total: None,
                    readiness_error: None,
                    port: None,
                    last_exit: slot.last_exit.as_ref().map(|(_, r, _)| r.to_string()),
                    bound: None,
                });
            }
        }
    }
    instances.sort_by_key(|i| (i.index, i.uptime_secs));
    AppStatus {
        name: app.name.0.clone(),
        phase,
        revision: app
            .current
            .as_ref()
            .map(|c| c.revision.0.clone())
            .unwrap_or_default(),
        generation: app.generation,
        desired: app.current.as_ref().map_or(0, |c| c.replicas),
        ready: u32::try_from(
            observed
                .workers
                .values()
                .filter(|w| w.state == WorkerState::Ready)
                .count(),
        )
        .unwrap_or(u32::MAX),
        restarts: observed.slots.values().map(|s| s.restarts).sum(),
        error,
        listen,
        source: app.source.display().to_string(),
        age_secs: SystemTime::now()
            .duration_since(app.first_seen)
            .map_or(0, |d| d.as_secs()),
        cgroup: app
            .procs
            .values()
            .next()
            .and_then(|w| w.cgroup_note.clone()),
        rollout: desired.map(|d| rollout(app, d)),
        instances,
    }
}

/// Where the rollout towards the desired template stands (Kubernetes' observedGeneration
/// / updatedReplicas / conditions, in one block): `clusterd reload` follows this instead
/// of guessing from phase strings.
fn rollout(app: &AppRecord, d: &DesiredApp) -> RolloutStatus {
    let workers = app.observed.workers.values();
    let updated = workers
        .clone()
        .filter(|w| w.template == d.template && w.state == WorkerState::Ready)
        .count();
    let others = workers
        .filter(|w| w.template != d.template && w.state != WorkerState::Draining)
        .count();
    let failed = app
        .observed
        .failed
        .as_ref()
        .filter(|f| f.template == d.template)
        .map(|f| f.reason.clone());
    let updated = u32::try_from(updated).unwrap_or(u32::MAX);
    RolloutStatus {
        revision: d.template.revision.0.clone(),
        generation: d.template.generation,
        updated,
        complete: failed.is_none() && updated == d.replicas && others == 0,
        failed,
    }
}

/// Prometheus text exposition of the status.
pub fn metrics(report: &StatusReport) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let per_app = |f: &dyn Fn(&crate::api_types::AppStatus) -> String| -> Vec<(String, String)> {
        report
            .apps
            .iter()
            .map(|a| (format!("app=\"{}\"", a.name), f(a)))
            .collect()
    };
    let per_instance =
        |f: &dyn Fn(&crate::api_types::InstanceStatus) -> Option<u64>| -> Vec<(String, String)> {
            report
                .apps
                .iter()
                .flat_map(|a| a.instances.iter().map(move |i| (a, i)))
                .filter_map(|(a, i)| {
                    let pid = i.pid?;
                    let value = f(i)?;
                    Some((
                        format!("app=\"{}\",instance=\"{}\",pid=\"{pid}\"", a.name, i.index),
                        value.to_string(),
                    ))
                })
                .collect()
        };
    family(
        "clusterd_app_desired_instances",
        "gauge",
        "Resolved instance count.",
        per_app(&|a| a.desired.to_string()),
    );
    family(
        "clusterd_app_ready_instances",
        "gauge",
        "Instances in state Ready.",
        per_app(&|a| a.ready.to_string()),
    );
    family(
        "clusterd_app_restarts_total",
        "counter",
        "Unplanned worker exits.",
        per_app(&|a| a.restarts.to_string()),
    );
    family(
        "clusterd_app_phase",
        "gauge",
        "1 for the app's current phase.",
        report
            .apps
            .iter()
            .map(|a| {
                (
                    format!("app=\"{}\",phase=\"{:?}\"", a.name, a.phase),
                    "1".to_string(),
                )
            })
            .collect(),
    );
    family(
        "clusterd_instance_inflight",
        "gauge",
        "Requests or connections in flight through the daemon.",
        per_instance(&|i| i.inflight),
    );
    family(
        "clusterd_instance_requests_total",
        "counter",
        "Requests (http) or connections (tcp) sent to the worker through the daemon.",
        per_instance(&|i| i.requests_total),
    );
    family(
        "clusterd_instance_rss_bytes",
        "gauge",
        "Resident memory of the worker's process group.",
        per_instance(&|i| i.rss_bytes),
    );
    out
}

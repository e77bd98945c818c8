//! The controller's answers to the control API: status, metrics, reload, sync, daemon
//! info. Read-only views of the world, except `reload`, which bumps a generation.

use hyper::StatusCode;
use serde_json::json;
use tokio::sync::oneshot;

use clusterd_core::plan::AppName;
use clusterd_runtime::effects::Effects;

use super::super::api::{ApiReply, ApiRequest};
use super::super::status;
use super::{Controller, SAMPLE_ON_DEMAND};
use crate::api_types::{ReloadAccepted, ReloadReply, SyncReply};

impl<E: Effects> Controller<E> {
    pub(super) fn answer(&mut self, request: ApiRequest, reply: oneshot::Sender<ApiReply>) {
        let now = self.now();
        if matches!(request, ApiRequest::Status(_) | ApiRequest::Metrics)
            && self
                .last_sample
                .is_none_or(|t| now.duration_since(t) >= SAMPLE_ON_DEMAND)
        {
            self.sample(now);
        }
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
                self.answer_sync(reply);
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
                    pid: Some(std::process::id()),
                }),
            ),
        };
        let _ = reply.send(answer);
    }

    fn answer_sync(&self, reply: oneshot::Sender<ApiReply>) {
        let Some(trigger) = self.sync_trigger.clone() else {
            let _ = reply.send(ApiReply::Json(
                StatusCode::CONFLICT,
                json!({"error": "this daemon does not follow a git repository (start it with --git-repo)"}),
            ));
            return;
        };
        // A fetch can take as long as the git timeout: answer from a task so the loop
        // keeps reconciling meanwhile.
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let stopped = || {
                ApiReply::Json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "the sync loop has stopped"}),
                )
            };
            let answer = if trigger.send(tx).await.is_err() {
                stopped()
            } else {
                match rx.await {
                    Ok(Ok(o)) => ApiReply::Json(
                        StatusCode::OK,
                        json!(SyncReply {
                            commit: o.commit.0,
                            added: o.added,
                            changed: o.changed,
                            removed: o.removed,
                        }),
                    ),
                    Ok(Err(e)) => ApiReply::Json(StatusCode::BAD_GATEWAY, json!({"error": e})),
                    Err(_) => stopped(),
                }
            };
            let _ = reply.send(answer);
        });
    }

    fn reload(&mut self, target: Option<String>) -> ApiReply {
        let names: Vec<AppName> = match target {
            Some(name) => {
                let name = AppName(name);
                match self.world.apps.get(&name) {
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
                .world
                .apps
                .values()
                .filter(|a| a.current.is_some() && !a.removed)
                .map(|a| a.name.clone())
                .collect(),
        };
        let mut reloads = Vec::new();
        for name in names {
            if let Some(generation) = self.world.on_reload(&name, &self.events) {
                reloads.push(ReloadAccepted {
                    app: name.0,
                    generation,
                });
            }
        }
        ApiReply::Json(StatusCode::ACCEPTED, json!(ReloadReply { reloads }))
    }

    fn status_report(&self, only: Option<&str>) -> crate::api_types::StatusReport {
        let now = self.now();
        let shutting_down = self.world.shutting_down.is_some();
        let apps = self
            .world
            .apps
            .values()
            .filter(|a| only.is_none_or(|n| n == a.name.0))
            .map(|a| {
                status::app_status(
                    a,
                    &self.effects,
                    a.desired(shutting_down).flatten().as_ref(),
                    now,
                )
            })
            .collect();
        let sync = self.sync.as_ref().map(|s| crate::api_types::SyncStatus {
            repo: s.repo.clone(),
            git_ref: s.git_ref.clone(),
            commit: s.commit.clone(),
            error: s.error.clone(),
            at: s.at.map(super::super::rfc3339),
        });
        crate::api_types::StatusReport {
            apps,
            sync,
            daemon_errors: self.state_error.iter().cloned().collect(),
        }
    }
}

fn not_found(name: &str) -> ApiReply {
    ApiReply::Json(
        StatusCode::NOT_FOUND,
        json!({"error": format!("no app named {name}")}),
    )
}

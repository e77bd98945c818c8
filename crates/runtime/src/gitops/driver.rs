//! The sync task: fetch on a timer and on demand, one sync at a time, report every
//! attempt.
//!
//! The loop is level-triggered like the rest of the daemon: each run compares the whole
//! commit with the whole apps dir, so a missed tick or a hand edit in the apps dir is
//! corrected by the next run, and several `POST /v1/sync` requests that arrive while a
//! sync runs are answered together by the next one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::git::{Git, GitCli};
use super::{sync_once, GitOpsConfig, SyncOutcome, SyncStatus};

/// The reply channel of one on-demand sync (`POST /v1/sync`): the outcome, or the error
/// text as it appears in the status (already redacted).
pub type SyncReply = oneshot::Sender<Result<SyncOutcome, String>>;

/// One finished attempt, for the daemon: the status block to show, and what changed (for
/// events) when the attempt succeeded.
#[derive(Debug, Clone)]
pub struct SyncReport {
    /// The `sync` block of the status JSON after this attempt.
    pub status: SyncStatus,
    /// What this attempt did; `None` when it failed (`status.error` says why).
    pub outcome: Option<SyncOutcome>,
}

/// Runs the sync loop with the `git` command-line backend until `shutdown`.
///
/// Syncs once at start, then every `cfg.interval` (plus up to 10% jitter so a fleet of
/// hosts does not hit the server in the same second), and whenever a [`SyncReply`]
/// arrives on `trigger`. Each attempt calls `on_report` (the daemon turns it into its
/// status block and an event) and answers every waiting trigger.
///
/// If `trigger`'s senders are all dropped, the loop keeps running on the timer.
pub async fn run_sync_loop(
    cfg: GitOpsConfig,
    trigger: mpsc::Receiver<SyncReply>,
    on_report: impl FnMut(SyncReport) + Send + 'static,
    shutdown: CancellationToken,
) {
    let git = Arc::new(GitCli::for_repo(&cfg.state_dir, &cfg.repo, cfg.git_timeout));
    run_sync_loop_with(git, cfg, trigger, on_report, shutdown).await;
}

/// [`run_sync_loop`] with any [`Git`] backend (tests, or gix later).
pub async fn run_sync_loop_with(
    git: Arc<dyn Git>,
    cfg: GitOpsConfig,
    trigger: mpsc::Receiver<SyncReply>,
    mut on_report: impl FnMut(SyncReport) + Send + 'static,
    shutdown: CancellationToken,
) {
    let interval = cfg.interval.max(Duration::from_secs(1));
    let jitter = jitter(interval);
    let cfg = Arc::new(cfg);
    let mut status = SyncStatus::initial(&cfg);
    let mut trigger = Some(trigger);
    let mut last_error: Option<String> = None;
    let mut next = Instant::now();
    tracing::info!(repo = %status.repo, git_ref = %status.git_ref, path = %status.path, ?interval, "gitops sync started");

    loop {
        let mut waiters = Vec::new();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            request = recv_or_pending(&mut trigger) => match request {
                Some(reply) => waiters.push(reply),
                None => {
                    trigger = None;
                    continue;
                }
            },
            () = tokio::time::sleep_until(next) => {}
        }
        if let Some(rx) = trigger.as_mut() {
            while let Ok(reply) = rx.try_recv() {
                waiters.push(reply);
            }
        }

        let (git_now, cfg_now) = (Arc::clone(&git), Arc::clone(&cfg));
        let attempt = tokio::task::spawn_blocking(move || sync_once(git_now.as_ref(), &cfg_now));
        let result = tokio::select! {
            // A git command can take up to its timeout; shutdown does not wait for it
            // (the blocking thread finishes on its own and its result is dropped).
            () = shutdown.cancelled() => break,
            joined = attempt => match joined {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(error = %e, "gitops sync task panicked");
                    next = Instant::now() + interval;
                    continue;
                }
            },
        };
        status.record(&result, SystemTime::now());
        match &result {
            Ok(outcome) if outcome.is_noop() => {
                tracing::debug!(commit = %outcome.commit.short(), "gitops sync: up to date");
            }
            Ok(outcome) => tracing::info!(
                commit = %outcome.commit.short(),
                added = ?outcome.added,
                changed = ?outcome.changed,
                removed = ?outcome.removed,
                "gitops sync applied commit"
            ),
            Err(e) => {
                // The same failure every minute is one problem, not sixty: warn when it
                // starts or changes, stay quiet (debug) while it persists.
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!(error = %text, "gitops sync failed");
                } else {
                    tracing::debug!(error = %text, "gitops sync still failing");
                }
            }
        }
        if result.is_ok() {
            if last_error.take().is_some() {
                tracing::info!("gitops sync recovered");
            }
        } else {
            last_error.clone_from(&status.error);
        }
        let reply = result.map_err(|e| e.to_string());
        on_report(SyncReport {
            status: status.clone(),
            outcome: reply.as_ref().ok().cloned(),
        });
        for waiter in waiters {
            // The requester may have given up (client timeout); nothing to do then.
            let _ = waiter.send(reply.clone());
        }
        next = Instant::now() + interval + jitter;
    }
    tracing::info!("gitops sync stopped");
}

async fn recv_or_pending(trigger: &mut Option<mpsc::Receiver<SyncReply>>) -> Option<SyncReply> {
    match trigger {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Up to 10% of the interval, fixed per process. Taken from the clock's sub-second part:
/// hosts started at different moments get different offsets, which is all a fleet needs,
/// without a random-number dependency.
fn jitter(interval: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    interval.mul_f64(f64::from(nanos % 1000) / 10_000.0)
}

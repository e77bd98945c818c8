//! What the daemon reports in its event log (`clusterd events`, `GET /v1/events`).
//!
//! One enum instead of string literals at every call site: a kind cannot be misspelled,
//! and the CLI and tests match on the same values. On the wire each kind is the
//! kebab-case string it always was (`spawn`, `rollout-failed`, ...), so the JSON does
//! not change.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kind of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A valid manifest was accepted (new app, new revision, scale, settings).
    Manifest,
    /// A manifest was rejected; the app keeps its last good revision.
    Invalid,
    /// The manifest file is gone: every worker drains.
    Removed,
    /// A public socket could not be bound (or recovered).
    ListenFailed,
    /// A worker was started.
    Spawn,
    /// A worker could not be started.
    SpawnFailed,
    /// A worker became ready and takes traffic.
    Ready,
    /// Shared mode: a worker's bind of a shared listener was answered with the daemon's
    /// socket (which pid bound which listener).
    Bound,
    /// Shared mode: a worker bound some other port ("worker bound 127.0.0.1:9999/tcp
    /// (pid 42), not the shared listener"); it runs, but likely ignores `PORT`.
    StrayBind,
    /// Every instance is ready at the desired revision.
    Available,
    /// A worker stopped taking traffic and drains.
    Drain,
    /// The stop signal was sent.
    Signal,
    /// SIGKILL after the shutdown timeout.
    Kill,
    /// A worker exited unplanned.
    Exit,
    /// A draining worker exited (with an app), or every worker has stopped and the
    /// daemon exits (without).
    Stopped,
    /// A rollout was stopped; the previous workers keep serving.
    RolloutFailed,
    /// `clusterd reload` bumped the generation.
    Reload,
    /// A liveness probe failed.
    LivenessFailed,
    /// A worker of the previous daemon was taken over.
    Adopted,
    /// A worker of the previous daemon could not be taken over.
    AdoptSkipped,
    /// An app's last worker stopped and its sockets were closed.
    Forgotten,
    /// GitOps applied a commit.
    Sync,
    /// GitOps could not sync.
    SyncFailed,
    /// The daemon was asked to stop.
    Shutdown,
    /// The daemon handed its sockets and workers to the next daemon and exits.
    Upgrade,
    /// The next daemon did not start or take over; this one keeps running.
    UpgradeFailed,
    /// The worker state file cannot be written (adoption after a restart is at risk).
    StateFailed,
    /// The worker state file is written again.
    StateSaved,
    /// A TLS certificate/key pair of a listener loaded (at start, renewed, or good again
    /// after a refusal); new connections get it.
    CertificateLoaded,
    /// A TLS certificate/key pair was refused (`file: what, expected what`); the last
    /// good one of those files, if any, stays in use.
    CertificateRefused,
    /// `tls.acme`: a listener's first certificate was obtained (none was stored, or the
    /// stored one does not cover the domains).
    CertificateObtained,
    /// `tls.acme`: a listener's certificate was replaced before its expiry.
    CertificateRenewed,
    /// `tls.acme`: an order failed (the reason, and when the next attempt is).
    CertificateFailed,
}

impl EventKind {
    /// The wire spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Manifest => "manifest",
            EventKind::Invalid => "invalid",
            EventKind::Removed => "removed",
            EventKind::ListenFailed => "listen-failed",
            EventKind::Spawn => "spawn",
            EventKind::SpawnFailed => "spawn-failed",
            EventKind::Ready => "ready",
            EventKind::Bound => "bound",
            EventKind::StrayBind => "stray-bind",
            EventKind::Available => "available",
            EventKind::Drain => "drain",
            EventKind::Signal => "signal",
            EventKind::Kill => "kill",
            EventKind::Exit => "exit",
            EventKind::Stopped => "stopped",
            EventKind::RolloutFailed => "rollout-failed",
            EventKind::Reload => "reload",
            EventKind::LivenessFailed => "liveness-failed",
            EventKind::Adopted => "adopted",
            EventKind::AdoptSkipped => "adopt-skipped",
            EventKind::Forgotten => "forgotten",
            EventKind::Sync => "sync",
            EventKind::SyncFailed => "sync-failed",
            EventKind::Shutdown => "shutdown",
            EventKind::Upgrade => "upgrade",
            EventKind::UpgradeFailed => "upgrade-failed",
            EventKind::StateFailed => "state-failed",
            EventKind::StateSaved => "state-saved",
            EventKind::CertificateLoaded => "certificate-loaded",
            EventKind::CertificateRefused => "certificate-refused",
            EventKind::CertificateObtained => "certificate-obtained",
            EventKind::CertificateRenewed => "certificate-renewed",
            EventKind::CertificateFailed => "certificate-failed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_spelling_is_the_serde_spelling() {
        use EventKind::*;
        for k in [
            Manifest,
            Invalid,
            Removed,
            ListenFailed,
            Spawn,
            SpawnFailed,
            Ready,
            Bound,
            StrayBind,
            Available,
            Drain,
            Signal,
            Kill,
            Exit,
            Stopped,
            RolloutFailed,
            Reload,
            LivenessFailed,
            Adopted,
            AdoptSkipped,
            Forgotten,
            Sync,
            SyncFailed,
            Shutdown,
            Upgrade,
            UpgradeFailed,
            StateFailed,
            StateSaved,
            CertificateLoaded,
            CertificateRefused,
            CertificateObtained,
            CertificateRenewed,
            CertificateFailed,
        ] {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), k);
        }
    }
}

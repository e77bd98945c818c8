//! Everything the daemon does to the host, behind one interface.
//!
//! The daemon's controller decides (with the pure planner) and records facts in its
//! world; it touches the host only through [`Effects`]. [`LinuxEffects`] is the real
//! thing (sockets, proxies, processes, probes, ports, logs); tests use a fake that
//! records calls and answers instantly, so the whole controller runs in-process in
//! milliseconds.
//!
//! Effects never decide and never write the daemon's state: what happens later (a worker
//! exits, reports ready, a probe fails, a drain finishes) comes back as a [`Report`] on
//! the channel the implementation was built with.

mod linux;
mod probes;

use std::collections::BTreeMap;
use std::future::Future;

use clusterd_core::load::LoadedApp;
use clusterd_core::model::{ListenMode, Listener, Logs, Protocol};
use clusterd_core::plan::{AppName, ExitReason, Template, WorkerId};

pub use linux::{expand_vars, LinuxEffects, LinuxEffectsConfig};

use crate::procfs::GroupUsage;

/// What happened on the host, reported back to the controller. Each one only means
/// "look again" plus the one fact it carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A worker's process group leader exited.
    Exited {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// How.
        reason: ExitReason,
    },
    /// A readiness probe passed or a Node IPC `ready` arrived.
    Ready {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
    },
    /// `READY=1` on the notify socket from this (credential-checked) process group.
    NotifyReady {
        /// Process group of the sender.
        pgid: u32,
    },
    /// A liveness probe result.
    Liveness {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// Probe passed.
        ok: bool,
        /// Why it failed.
        detail: String,
    },
    /// Shared mode: the worker's bind of a shared listener was answered with the
    /// daemon's socket. With readiness `bind` a [`Report::Ready`] follows the first one.
    Bound {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// The process that bound (the worker or one of its children).
        pid: u32,
        /// The listener, `address:port/protocol` as bound by the daemon.
        listener: String,
    },
    /// Shared mode: the worker bound another port than a shared listener's; it runs, and
    /// the message says what it bound.
    StrayBind {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// "worker bound 127.0.0.1:9999/tcp (pid 42), not the shared listener".
        message: String,
    },
    /// A readiness probe failed in a new way (reported once per distinct failure).
    ProbeFailed {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// What failed, e.g. "nothing is listening on PORT=41234 (connection refused)".
        detail: String,
    },
    /// http mode with `tls`: a certificate/key pair (files) of a listener loaded or was
    /// refused (when the manifest was applied, or later when its files changed).
    CertificateFiles {
        /// App.
        app: AppName,
        /// The listener, `address:port` as written.
        listener: String,
        /// What happened.
        event: crate::tls::CertEvent,
    },
    /// Nothing is in flight to a draining worker any more.
    Drained {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
    },
    /// `tls.acme`: a listener's certificate was obtained or renewed, or an attempt
    /// failed.
    Certificate {
        /// App.
        app: AppName,
        /// The listener, `address:port` as written.
        listener: String,
        /// What happened.
        kind: crate::tls::acme::AcmeEventKind,
        /// The domains and expiry, or the reason of the failure.
        message: String,
    },
}

/// Identity of a public socket within an app: what must stay bound while any spec of the
/// app names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    /// Address as written.
    pub address: String,
    /// Port as written (0: the OS picks).
    pub port: u32,
    /// tcp or udp.
    pub protocol: Protocol,
    /// Mode.
    pub mode: ListenMode,
}

impl ListenKey {
    /// The key of a listener.
    #[must_use]
    pub fn of(l: &Listener) -> Self {
        ListenKey {
            address: l.address.clone(),
            port: l.port,
            protocol: l.protocol,
            mode: l.mode,
        }
    }
}

/// A worker to start.
#[derive(Debug, Clone, Copy)]
pub struct SpawnRequest<'a> {
    /// App.
    pub app: &'a AppName,
    /// The id the controller gave it.
    pub id: WorkerId,
    /// Instance index.
    pub index: u32,
    /// Revision and generation.
    pub template: &'a Template,
    /// The spec of that revision.
    pub spec: &'a LoadedApp,
}

/// A worker of a previous daemon to take over.
#[derive(Debug, Clone, Copy)]
pub struct AdoptRequest<'a> {
    /// App.
    pub app: &'a AppName,
    /// The id the controller gave it.
    pub id: WorkerId,
    /// Instance index.
    pub index: u32,
    /// Its pid (= process group).
    pub pid: i32,
    /// Its start time (clock ticks since boot), to refuse a reused pid.
    pub start_time: u64,
    /// Its private ports: `(listener address, listener port, private port)`.
    pub ports: &'a [(String, u32, u16)],
    /// The listeners of its app's spec, to map the ports back.
    pub listens: &'a [Listener],
    /// Its app's readiness is `bind` (shared mode): a worker adopted while still
    /// starting becomes ready when the new daemon answers its bind.
    pub ready_on_bind: bool,
}

/// Facts about a started (or adopted) process, for the controller's world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Pid, also the process group id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
    /// Private ports per proxied listener.
    pub ports: Vec<(ListenKey, u16)>,
    /// The per-worker cgroup, or why there is none (for status).
    pub cgroup_note: Option<String>,
}

/// The host, as the controller sees it.
///
/// # Contract
/// - Calls about a worker the implementation does not know are no-ops.
/// - Nothing here blocks for long: spawning is async, the rest returns at once and
///   reports later through [`Report`].
pub trait Effects: Send {
    /// Binds every listener of `listens` that is not bound yet for `app` (recovering an
    /// inherit-mode socket from `adopted` workers first) and starts its proxy.
    ///
    /// # Errors
    /// The first socket that cannot be bound; nothing of this call stays bound then.
    fn ensure_listeners(
        &mut self,
        app: &AppName,
        listens: &[Listener],
        adopted: &[i32],
    ) -> Result<(), String>;

    /// Closes the app's sockets that no listener in `keep` names.
    fn retain_listeners(&mut self, app: &AppName, keep: &[Listener]);

    /// `address:port` as bound.
    fn bound_address(&self, app: &AppName, l: &Listener) -> Option<String>;

    /// Whether any of the app's listeners is proxied (in-flight counts mean something).
    fn has_proxy(&self, app: &AppName) -> bool;

    /// `tls.acme`: when the certificate the listener serves now expires (for status).
    fn certificate_expiry(&self, _app: &AppName, _l: &Listener) -> Option<std::time::SystemTime> {
        None
    }

    /// Starts a worker.
    ///
    /// # Errors
    /// Why it could not be started (bad command, user, working dir, no port...).
    fn spawn(
        &mut self,
        req: SpawnRequest<'_>,
    ) -> impl Future<Output = Result<Started, String>> + Send;

    /// Takes over a worker of a previous daemon, after checking it is still the same
    /// process (pid and start time).
    ///
    /// # Errors
    /// Why it cannot be adopted (gone, pid reused, not a group leader).
    fn adopt(&mut self, req: AdoptRequest<'_>) -> Result<Started, String>;

    /// Starts sending the worker traffic on its private ports, and starts its liveness
    /// probe if the spec has one.
    fn route(&mut self, app: &AppName, id: WorkerId, spec: Option<&LoadedApp>);

    /// Stops sending the worker traffic and stops its probes; reports
    /// [`Report::Drained`] once nothing is in flight (proxied listeners only).
    fn drain(&mut self, app: &AppName, id: WorkerId);

    /// Sends a signal (a `SIGTERM`-style name) to the worker's process group.
    fn signal(&mut self, app: &AppName, id: WorkerId, signal: &str);

    /// SIGKILL to the worker's process group.
    fn kill(&mut self, app: &AppName, id: WorkerId);

    /// The worker has exited: release its ports, routes and probes.
    fn forget(&mut self, app: &AppName, id: WorkerId);

    /// Requests or connections in flight to the worker through the daemon.
    fn inflight(&self, app: &AppName, id: WorkerId) -> u64;

    /// Requests (http) or connections (tcp) ever sent to the worker through the daemon;
    /// `None` when none of the app's listeners is proxied.
    fn served(&self, _app: &AppName, _id: WorkerId) -> Option<u64> {
        None
    }

    /// CPU time and RSS of every worker's process group, by pid.
    fn sample(&mut self) -> BTreeMap<u32, GroupUsage>;

    /// Rotates the app's logs that passed their size limit.
    fn rotate_logs(&mut self, app: &AppName, logs: &Logs);

    /// Every app has had its chance to claim its sockets (a complete scan, nothing held
    /// back): sockets a previous daemon handed over that nobody claimed are closed.
    fn settle(&mut self) {}

    /// Inherit-mode sockets that stopped listening (a worker shut its copy down, which
    /// stops it for every worker) are bound anew; returns the apps affected and what
    /// happened. Their workers still hold the dead socket and must be replaced.
    fn repair_listeners(&mut self) -> Vec<(AppName, String)> {
        Vec::new()
    }
}

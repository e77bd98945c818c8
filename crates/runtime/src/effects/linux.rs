//! [`LinuxEffects`]: the real host. Public sockets with their proxies, private ports,
//! worker processes through the exec shim, readiness and liveness probes, the notify
//! socket, per-worker cgroups and log rotation. It owns OS resources and the tasks that
//! watch them; it decides nothing.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use clusterd_core::model::{Affinity, ListenMode, Listener, Logs, ReadinessKind};
use clusterd_core::plan::{AppName, WorkerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::probes;
use super::{AdoptRequest, Effects, ListenKey, Report, SpawnRequest, Started};
use crate::fdstore::FdStore;
use crate::handover::{self, Handover};
use crate::limits::{CgroupLimits, CgroupTree};
use crate::listener::BoundListener;
use crate::logwatch::LogSizeWatch;
use crate::notify::{NotifySocket, Registry, WorkerMessage, WorkerReport};
use crate::procfs::{self, GroupUsage};
use crate::proxy::{self, RouteTable};
use crate::seccomp::{BindEvent, PeerHold, Peers, SharedBind, SharedListener};
use crate::shim::ShimCommand;
use crate::spawn::{spawn_worker, InheritedListener, WorkerProcess, WorkerSpec};

/// Where [`LinuxEffects`] keeps things.
#[derive(Debug, Clone)]
pub struct LinuxEffectsConfig {
    /// Worker logs.
    pub log_dir: PathBuf,
    /// The notify socket's path (`NOTIFY_SOCKET` of workers).
    pub notify_path: PathBuf,
    /// The daemon's state dir: `tls.acme` keeps its certificates and accounts under
    /// `acme/` there ([`clusterd_core::acme::listener_dir`]).
    pub state_dir: PathBuf,
}

struct ListenerEntry {
    key: ListenKey,
    /// [`handover::listener_name`]: its name in a handover and in systemd's fd store.
    name: String,
    /// http mode: the proxy's `trustedProxies`, updated in place by a new manifest.
    trusted: Option<proxy::TrustedProxies>,
    /// http mode: the listener's `tls`, updated in place by a new manifest.
    tls: Option<crate::tls::TlsTerminator>,
    /// http mode with `tls.acme`: the settings its certificate task runs with, and the
    /// task's stop (a child of `proxy`, so closing the listener stops it too).
    acme: Option<(clusterd_core::model::Acme, CancellationToken)>,
    bound: BoundListener,
    routes: Option<Arc<RouteTable>>,
    proxy: CancellationToken,
    /// Stops the proxy for an upgrade (see [`proxy::serve_http_retirable`]).
    retire: CancellationToken,
    /// Taken from a handover rather than bound here.
    handed: bool,
}

/// An app's public sockets. Bound once and kept for the app's whole life, so no worker
/// restart ever closes a port.
#[derive(Default)]
struct ListenerSet {
    entries: Vec<ListenerEntry>,
}

impl ListenerSet {
    fn routes(&self) -> impl Iterator<Item = &Arc<RouteTable>> {
        self.entries.iter().filter_map(|e| e.routes.as_ref())
    }

    fn close(self) {
        for e in self.entries {
            e.proxy.cancel();
        }
    }
}

/// A live worker's OS handles.
struct Proc {
    handle: WorkerProcess,
    /// Its instance index: the log file it writes.
    index: u32,
    ports: Vec<(ListenKey, u16)>,
    /// Readiness and liveness probes; cancelled on drain and exit.
    probes: CancellationToken,
    /// Shared mode: answers the worker's binds for as long as it lives (dropping it
    /// would make the worker's later binds fail with ENOSYS). Handed to the next daemon
    /// on an upgrade (and kept in systemd's fd store), which resumes answering for the
    /// worker it adopts. `None` for other modes, and for an adopted worker whose
    /// notification fd did not come with it (a previous daemon that did not hand them
    /// over): its later binds fail with ENOSYS.
    shared: Option<SharedBind>,
    /// Adopted shared-mode worker: its handed-over notification fd, until the app's
    /// sockets are there to answer with ([`LinuxEffects::answer_adopted_binds`]).
    /// Meanwhile the worker's binds wait in the kernel.
    /// With whether its first answered bind makes it ready (readiness `bind`).
    pending_notif: Option<(OwnedFd, bool)>,
    /// The notification fd's name in systemd's fd store, removed when the worker is
    /// forgotten.
    stored_notif: Option<String>,
    /// An adopted shared-mode worker without its notification fd (a crash without the fd
    /// store): it still holds the sockets, so it counts among the app's [`Peers`].
    _peer: Option<PeerHold>,
}

/// What [`LinuxEffects::start`] hands back.
struct StartedProcess {
    process: WorkerProcess,
    ipc: Option<crate::ipc::IpcChannel>,
    cgroup_note: Option<String>,
    /// Shared mode: the notification fd and the sockets to answer binds with, labelled
    /// `address:port/protocol` for reports.
    shared: Option<(std::os::fd::OwnedFd, Vec<SharedListener>, Vec<String>)>,
}

/// The real host.
pub struct LinuxEffects {
    config: LinuxEffectsConfig,
    reports: mpsc::UnboundedSender<Report>,
    notify_registry: Registry,
    notify_reports: mpsc::Sender<WorkerReport>,
    listeners: BTreeMap<AppName, ListenerSet>,
    procs: BTreeMap<(AppName, WorkerId), Proc>,
    ports_in_use: HashSet<u16>,
    cgroups: Result<CgroupTree, String>,
    tasks: TaskTracker,
    /// The proxies alone, so an upgrade can wait for their requests in flight.
    proxies: TaskTracker,
    /// Sockets a previous daemon handed over, taken instead of binding.
    handover: Handover,
    /// systemd's fd store, when run by systemd: every public socket is kept there too.
    fdstore: Option<FdStore>,
    /// A duplicate of the notify socket, for the next daemon on upgrade.
    notify_dup: Option<OwnedFd>,
    /// The notify socket's reader: paused while the next daemon starts (its workers'
    /// `READY=1` must reach the daemon that will act on it), stopped once it took over.
    notify_task: tokio::task::JoinHandle<()>,
    /// Checks log sizes as workers write them (`None`: inotify unavailable; the periodic
    /// [`Effects::rotate_logs`] still runs).
    log_watch: Option<LogSizeWatch>,
    log_watch_stop: CancellationToken,
    /// Per shared-mode app: how many of its workers hold its shared sockets (an answered
    /// bind never clears `O_NONBLOCK` under the others; see [`crate::seccomp`]).
    peers: BTreeMap<AppName, Arc<Peers>>,
}

impl LinuxEffects {
    /// Binds the notify socket and starts forwarding `READY=1` (and Node IPC `ready`) as
    /// [`Report::NotifyReady`].
    ///
    /// # Errors
    /// When the notify socket cannot be bound.
    pub fn new(
        config: LinuxEffectsConfig,
        reports: mpsc::UnboundedSender<Report>,
    ) -> crate::Result<Self> {
        Self::with_handover(config, reports, Handover::default(), None)
    }

    /// [`LinuxEffects::new`], taking the sockets a previous daemon handed over (the
    /// notify socket now, public sockets as apps claim them) and keeping every public
    /// socket in systemd's fd store when `fdstore` is given.
    ///
    /// # Errors
    /// When the notify socket cannot be bound (or the handed-over one used).
    pub fn with_handover(
        config: LinuxEffectsConfig,
        reports: mpsc::UnboundedSender<Report>,
        mut handover: Handover,
        fdstore: Option<FdStore>,
    ) -> crate::Result<Self> {
        let notify = match handover.take(handover::NOTIFY) {
            Some(fd) => NotifySocket::from_handover(fd, &config.notify_path)?,
            None => NotifySocket::bind(&config.notify_path)?,
        };
        let notify_dup = notify
            .duplicate()
            .map_err(|e| tracing::warn!(error = %e, "an upgrade will rebind the notify socket"))
            .ok();
        let notify_registry = notify.registry();
        let (notify_reports, mut rx) = mpsc::channel::<WorkerReport>(256);
        let notify_task = notify.spawn(notify_reports.clone());
        let tasks = TaskTracker::new();
        let forward = reports.clone();
        tasks.spawn(async move {
            while let Some(r) = rx.recv().await {
                if r.message == WorkerMessage::Ready {
                    if let Ok(pgid) = u32::try_from(r.pgid) {
                        let _ = forward.send(Report::NotifyReady { pgid });
                    }
                }
            }
        });
        let log_watch_stop = CancellationToken::new();
        let log_watch = LogSizeWatch::start(log_watch_stop.clone())
            .map_err(|e| tracing::warn!(error = %e, "log sizes checked only periodically"))
            .ok();
        let cgroups = CgroupTree::detect().map_err(|e| e.to_string());
        if let Err(e) = &cgroups {
            tracing::info!(reason = %e, "cgroup backstop unavailable; memory limits are enforced by sampling only");
        }
        Ok(LinuxEffects {
            config,
            reports,
            notify_registry,
            notify_reports,
            listeners: BTreeMap::new(),
            procs: BTreeMap::new(),
            ports_in_use: HashSet::new(),
            cgroups,
            tasks,
            proxies: TaskTracker::new(),
            handover,
            fdstore,
            notify_dup,
            notify_task,
            log_watch,
            log_watch_stop,
            peers: BTreeMap::new(),
        })
    }

    /// Every task this instance started (proxies, probes, exit watchers), so shutdown
    /// can wait for them.
    #[must_use]
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Closes every socket and stops every proxy (daemon shutdown): closed for good, so
    /// they leave systemd's fd store too.
    pub fn close_all(&mut self) {
        for (_, set) in std::mem::take(&mut self.listeners) {
            for e in &set.entries {
                self.unstore(&e.name);
            }
            set.close();
        }
        for p in self.procs.values() {
            if let Some(name) = &p.stored_notif {
                self.unstore(name);
            }
        }
        self.settle_handover();
        self.log_watch_stop.cancel();
        self.tasks.close();
    }

    /// Duplicates of every public socket and of the notify socket, by name, for the next
    /// daemon (upgrade). This daemon keeps serving on its own copies meanwhile.
    ///
    /// # Errors
    /// When a descriptor cannot be duplicated (out of descriptors).
    pub fn handover_fds(&self) -> Result<Vec<(String, OwnedFd)>, String> {
        let mut out = Vec::new();
        for set in self.listeners.values() {
            for e in &set.entries {
                let fd = e.bound.inherit_fd().map_err(|e| e.to_string())?;
                out.push((e.name.clone(), fd));
            }
        }
        // Shared-mode workers' seccomp notification fds, named by worker: the next
        // daemon answers their later binds (a re-bind, a child forked after the upgrade).
        for ((app, _), p) in &self.procs {
            let fd = match (&p.shared, &p.pending_notif) {
                (Some(s), _) => s.duplicate(),
                (None, Some((fd, _))) => fd.try_clone(),
                (None, None) => continue,
            }
            .map_err(|e| format!("dup seccomp notification fd: {e}"))?;
            out.push((
                handover::seccomp_name(&app.0, p.handle.pid(), p.handle.start_time()),
                fd,
            ));
        }
        if let Some(n) = &self.notify_dup {
            let fd = n
                .try_clone()
                .map_err(|e| format!("dup notify socket: {e}"))?;
            out.push((handover::NOTIFY.to_string(), fd));
        }
        Ok(out)
    }

    /// Stops reading the notify socket while the next daemon starts: datagrams queue in
    /// the socket for whichever daemon serves next ([`LinuxEffects::resume_notify`] if
    /// the upgrade fails).
    pub fn pause_notify(&mut self) {
        self.notify_task.abort();
    }

    /// Stops answering shared-mode workers' binds while the next daemon starts (it takes
    /// their notification fds; two readers of one fd must never race), and returns once
    /// every supervisor has stopped. Binds meanwhile wait in the kernel for whichever
    /// daemon serves next ([`LinuxEffects::resume_shared_binds`] if the upgrade fails).
    pub async fn pause_shared_binds(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(s) = &mut p.shared {
                s.pause().await;
            }
        }
    }

    /// Answers shared-mode workers' binds again (an upgrade failed).
    pub fn resume_shared_binds(&mut self) {
        for ((app, _), p) in &mut self.procs {
            if let Some(s) = &mut p.shared {
                if let Err(e) = s.resume() {
                    tracing::error!(app = %app, pid = p.handle.pid(), error = %e, "cannot answer the worker's binds again; they fail with ENOSYS");
                }
            }
        }
    }

    /// Reads the notify socket again (an upgrade failed).
    pub fn resume_notify(&mut self) {
        let Some(dup) = self.notify_dup.as_ref().and_then(|d| d.try_clone().ok()) else {
            tracing::error!(
                "cannot read the notify socket again; readiness falls back to timeouts"
            );
            return;
        };
        match NotifySocket::from_handover(dup, &self.config.notify_path) {
            Ok(notify) => {
                self.notify_task = notify
                    .with_registry(self.notify_registry.clone())
                    .spawn(self.notify_reports.clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the notify socket again; readiness falls back to timeouts");
            }
        }
    }

    /// The next daemon has taken over (upgrade): stop reading the notify socket (its
    /// messages are for the new daemon now), stop accepting on every public socket, and
    /// let connections in flight finish (http: `Connection: close` on their next
    /// response), bounded by the proxies' shutdown grace. The sockets stay open (and in
    /// systemd's fd store) and no worker is touched. The future resolves when every
    /// proxy has returned.
    pub fn retire(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.notify_task.abort();
        for set in self.listeners.values() {
            for e in &set.entries {
                e.retire.cancel();
            }
        }
        let proxies = self.proxies.clone();
        proxies.close();
        async move { proxies.wait().await }
    }

    /// Closes handed-over sockets that no app claimed (their app is gone, or its port
    /// changed while no daemon ran) and drops them from systemd's fd store.
    fn settle_handover(&mut self) {
        for (name, fd) in self.handover.drain() {
            if name != handover::CONTROL && name != handover::NOTIFY {
                tracing::info!(socket = %name, "closing a handed-over socket no app claims");
                self.unstore(&name);
            }
            drop(fd);
        }
    }

    fn unstore(&self, name: &str) {
        if let Some(store) = &self.fdstore {
            if let Err(e) = store.remove(name) {
                tracing::warn!(socket = %name, error = %e, "FDSTOREREMOVE");
            }
        }
    }
    /// A port the kernel considers free right now and no live worker holds. Something
    /// else may still take it before the worker binds: the worker then fails readiness
    /// and is replaced, which the planner already handles.
    fn allocate_port(&mut self) -> Result<u16, String> {
        for _ in 0..64 {
            let port = StdTcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no private port: {e}"))?
                .port();
            if self.ports_in_use.insert(port) {
                return Ok(port);
            }
        }
        Err("no free private port found".into())
    }

    fn release_ports(&mut self, ports: &[(ListenKey, u16)]) {
        for (_, p) in ports {
            self.ports_in_use.remove(p);
        }
    }

    /// Whether a live (or draining) worker of `app` writes the log of `index`.
    fn writes_log(&self, app: &AppName, index: u32) -> bool {
        self.procs
            .iter()
            .any(|((a, _), p)| a == app && p.index == index)
    }

    fn watch_exit(&self, app: &AppName, id: WorkerId, process: WorkerProcess) {
        let tx = self.reports.clone();
        let app = app.clone();
        self.tasks.spawn(async move {
            let reason = process.wait().await;
            let _ = tx.send(Report::Exited { app, id, reason });
        });
    }

    fn cgroup_for(&self, req: &SpawnRequest<'_>, ws: &mut WorkerSpec) -> Option<String> {
        let spec = &req.spec.spec;
        if spec.limits.memory.is_none() && spec.limits.cpu.is_none() {
            return None;
        }
        let tree = match &self.cgroups {
            Ok(tree) => tree,
            Err(reason) => {
                return Some(format!(
                    "unavailable ({reason}); memory limit enforced by sampling"
                ))
            }
        };
        let limits = CgroupLimits {
            memory_max: spec
                .limits
                .memory
                .map(|m| crate::limits::memory_backstop(m.0)),
            cpus: spec.limits.cpu.map(|c| c.0),
        };
        match tree.create_worker_cgroup(
            &req.app.0,
            &format!("{}-{}", req.index, req.template.revision),
            limits,
        ) {
            Ok(path) => {
                let note = format!("active ({})", path.display());
                ws.cgroup = Some(path);
                Some(note)
            }
            Err(e) => Some(format!(
                "unavailable ({e}); memory limit enforced by sampling"
            )),
        }
    }

    async fn start(
        &mut self,
        req: SpawnRequest<'_>,
        ports: &[(ListenKey, u16)],
    ) -> Result<StartedProcess, String> {
        let spec = &req.spec.spec;
        // PORT is the first listener's port that the app binds itself: the private port
        // of a proxied listener, the public port of a shared one (inherit-mode apps get
        // fd 3 instead). PORT_<NAME> for each named one.
        let mut extra_env = BTreeMap::new();
        let set = self.listeners.get(req.app);
        let mut shared = Vec::new();
        let mut shared_labels = Vec::new();
        for l in &spec.listen {
            let key = ListenKey::of(l);
            let entry = set.and_then(|s| s.entries.iter().find(|e| e.key == key));
            let port = match l.mode {
                ListenMode::Http | ListenMode::Tcp => {
                    ports.iter().find(|(k, _)| *k == key).map(|(_, p)| *p)
                }
                ListenMode::Shared => {
                    let Some(e) = entry else {
                        return Err(format!(
                            "the shared listener {}:{} is not bound",
                            l.address, l.port
                        ));
                    };
                    shared.push(SharedListener {
                        addr: e.bound.local_addr(),
                        protocol: e.bound.protocol(),
                        fd: e.bound.inherit_fd().map_err(|e| e.to_string())?,
                    });
                    shared_labels.push(format!("{}/{}", e.bound.local_addr(), l.protocol));
                    Some(e.bound.local_addr().port())
                }
                ListenMode::Inherit => None,
            };
            let Some(port) = port else { continue };
            extra_env
                .entry("PORT".to_string())
                .or_insert_with(|| port.to_string());
            if let Some(name) = &l.name {
                extra_env.insert(format!("PORT_{}", env_suffix(name)), port.to_string());
            }
        }
        let mut all_env = spec.env.clone();
        all_env.extend(extra_env.clone());
        let argv = req
            .spec
            .argv()
            .iter()
            .map(|a| OsString::from(expand_vars(a, &all_env)))
            .collect();
        let mut ws = WorkerSpec::new(
            req.app.clone(),
            req.index,
            req.template.revision.clone(),
            argv,
            ShimCommand::current_exe(),
        );
        ws.cwd.clone_from(&spec.working_dir);
        ws.env = spec.env.clone();
        ws.extra_env = extra_env;
        if let Some(set) = self.listeners.get(req.app) {
            for l in spec.listen.iter().filter(|l| l.mode == ListenMode::Inherit) {
                let key = ListenKey::of(l);
                if let Some(e) = set.entries.iter().find(|e| e.key == key) {
                    ws.listeners.push(InheritedListener {
                        name: l.name.clone().unwrap_or_else(|| "unknown".into()),
                        fd: e.bound.inherit_fd().map_err(|e| e.to_string())?,
                    });
                }
            }
        }
        ws.notify_socket = Some(self.config.notify_path.clone());
        ws.ipc = spec.readiness.kind == Some(ReadinessKind::Ipc);
        ws.shared_bind = !shared.is_empty();
        ws.user.clone_from(&spec.user);
        ws.group.clone_from(&spec.group);
        ws.rlimits = (&spec.limits).into();
        ws.log_dir = Some(self.config.log_dir.clone());
        // Nobody else writes this index's log: rotate it by rename (no copy, works on a
        // full disk) before the new worker gets it.
        if !self.writes_log(req.app, req.index) {
            ws.log_rotate_unshared = Some((&spec.logs).into());
        }
        let cgroup_note = self.cgroup_for(&req, &mut ws);
        let mut spawned = spawn_worker(ws).await.map_err(|e| e.to_string())?;
        if spawned.seccomp_notif.is_some() {
            tracing::debug!(
                pid = spawned.process.pid(),
                wait_killable = spawned.seccomp_wait_killable,
                "shared-mode bind filter installed"
            );
        }
        let shared = spawned
            .seccomp_notif
            .take()
            .map(|notif| (notif, shared, shared_labels));
        Ok(StartedProcess {
            process: spawned.process,
            ipc: spawned.ipc,
            cgroup_note,
            shared,
        })
    }

    /// An adopted shared-mode worker bound under the previous daemon, whose answers are
    /// gone with it: report which of its processes hold which shared socket (found by
    /// inode in `/proc/<pid>/fd`), so status still says who bound what.
    /// Called once the app's sockets are bound or recovered (adoption comes first).
    fn report_adopted_binds(&self, app: &AppName, listens: &[Listener]) {
        let Some(set) = self.listeners.get(app) else {
            return;
        };
        let shared: Vec<(String, String)> = listens
            .iter()
            .filter(|l| l.mode == ListenMode::Shared)
            .filter_map(|l| {
                let key = ListenKey::of(l);
                let e = set.entries.iter().find(|e| e.key == key)?;
                let link = std::fs::read_link(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&e.bound)
                ))
                .ok()?;
                Some((
                    link.to_string_lossy().into_owned(),
                    format!("{}/{}", e.bound.local_addr(), l.protocol),
                ))
            })
            .collect();
        if shared.is_empty() {
            return;
        }
        let adopted = self
            .procs
            .iter()
            .filter(|((a, _), p)| a == app && p.handle.is_adopted())
            .map(|((_, id), p)| (*id, p.handle.pid()));
        for (id, pgid) in adopted {
            self.report_binds_of(app, id, pgid, &shared);
        }
    }

    fn report_binds_of(&self, app: &AppName, id: WorkerId, pgid: i32, shared: &[(String, String)]) {
        for member in procfs::group_members(pgid) {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{member}/fd")) else {
                continue;
            };
            let links: HashSet<String> = fds
                .flatten()
                .filter_map(|f| std::fs::read_link(f.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect();
            for (socket, label) in shared {
                if links.contains(socket) {
                    let _ = self.reports.send(Report::Bound {
                        app: app.clone(),
                        id,
                        pid: u32::try_from(member).unwrap_or_default(),
                        listener: label.clone(),
                    });
                }
            }
        }
    }

    /// Adopted shared-mode workers of `app` whose notification fds were handed over:
    /// answer their binds now that the app's sockets are here. With readiness `bind`, a
    /// worker adopted while still starting becomes ready when its bind is answered (for
    /// one already ready, the report changes nothing).
    fn answer_adopted_binds(&mut self, app: &AppName, listens: &[Listener]) {
        if listens.iter().any(|l| l.mode == ListenMode::Shared) {
            let peers = Arc::clone(self.peers.entry(app.clone()).or_default());
            for ((a, _), p) in &mut self.procs {
                if a == app
                    && p.handle.is_adopted()
                    && p.shared.is_none()
                    && p.pending_notif.is_none()
                    && p._peer.is_none()
                {
                    p._peer = Some(peers.hold());
                }
            }
        }
        let ids: Vec<WorkerId> = self
            .procs
            .iter()
            .filter(|((a, _), p)| a == app && p.pending_notif.is_some())
            .map(|((_, id), _)| *id)
            .collect();
        for id in ids {
            let (listeners, labels) = match self.shared_listeners(app, listens) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(app = %app, error = %e, "cannot answer an adopted worker's binds");
                    continue;
                }
            };
            let Some((notif, ready_on_bind)) = self
                .procs
                .get_mut(&(app.clone(), id))
                .and_then(|p| p.pending_notif.take())
            else {
                continue;
            };
            match self.answer_binds(app, id, ready_on_bind, true, notif, (listeners, labels)) {
                Ok(bind) => {
                    if let Some(p) = self.procs.get_mut(&(app.clone(), id)) {
                        tracing::info!(app = %app, pid = p.handle.pid(), "answering an adopted worker's binds");
                        p.shared = Some(bind);
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %app, error = %e, "cannot answer an adopted worker's binds; they fail with ENOSYS");
                }
            }
        }
    }

    /// The app's shared listeners (duplicates of its sockets) in manifest order, with
    /// their `address:port/protocol` labels.
    fn shared_listeners(
        &self,
        app: &AppName,
        listens: &[Listener],
    ) -> Result<(Vec<SharedListener>, Vec<String>), String> {
        let mut listeners = Vec::new();
        let mut labels = Vec::new();
        let set = self.listeners.get(app);
        for l in listens.iter().filter(|l| l.mode == ListenMode::Shared) {
            let key = ListenKey::of(l);
            let Some(e) = set.and_then(|s| s.entries.iter().find(|e| e.key == key)) else {
                return Err(format!(
                    "the shared listener {}:{} is not bound",
                    l.address, l.port
                ));
            };
            listeners.push(SharedListener {
                addr: e.bound.local_addr(),
                protocol: e.bound.protocol(),
                fd: e.bound.inherit_fd().map_err(|e| e.to_string())?,
            });
            labels.push(format!("{}/{}", e.bound.local_addr(), l.protocol));
        }
        Ok((listeners, labels))
    }

    /// Starts answering a shared-mode worker's binds; each answered bind is reported
    /// ([`Report::Bound`]), the first one also as [`Report::Ready`] when `ready_on_bind`
    /// (readiness `bind`), and a bind elsewhere as [`Report::StrayBind`].
    ///
    /// `holds`: the worker already holds the sockets (adopted), so it counts among the
    /// app's [`Peers`] from now rather than from its first answered bind.
    fn answer_binds(
        &mut self,
        app: &AppName,
        id: WorkerId,
        ready_on_bind: bool,
        holds: bool,
        notif: std::os::fd::OwnedFd,
        (listeners, labels): (Vec<SharedListener>, Vec<String>),
    ) -> Result<SharedBind, String> {
        let peers = Arc::clone(self.peers.entry(app.clone()).or_default());
        let tx = self.reports.clone();
        let app = app.clone();
        let first = std::sync::atomic::AtomicBool::new(true);
        SharedBind::start_among(notif, listeners, peers, holds, move |event| match event {
            BindEvent::Bound(b) => {
                let _ = tx.send(Report::Bound {
                    app: app.clone(),
                    id,
                    pid: u32::try_from(b.pid).unwrap_or_default(),
                    listener: labels.get(b.listener).cloned().unwrap_or_default(),
                });
                if ready_on_bind && first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    let _ = tx.send(Report::Ready {
                        app: app.clone(),
                        id,
                    });
                }
            }
            BindEvent::Stray(s) => {
                let _ = tx.send(Report::StrayBind {
                    app: app.clone(),
                    id,
                    message: s.to_string(),
                });
            }
        })
        .map_err(|e| e.to_string())
    }
}

impl Effects for LinuxEffects {
    fn ensure_listeners(
        &mut self,
        app: &AppName,
        listens: &[Listener],
        adopted: &[i32],
    ) -> Result<(), String> {
        let set = self.listeners.entry(app.clone()).or_default();
        let mut added: Vec<ListenerEntry> = Vec::new();
        let result = (|| {
            for l in listens {
                let key = ListenKey::of(l);
                if let Some(e) = set
                    .entries
                    .iter_mut()
                    .chain(added.iter_mut())
                    .find(|e| e.key == key)
                {
                    if let Some(trusted) = &e.trusted {
                        trusted.set(trusted_proxies(l));
                    }
                    if let Some(tls) = &e.tls {
                        tls.set(l.tls.as_ref());
                    }
                    let wanted = l.tls.as_ref().and_then(|t| t.acme.as_ref());
                    if e.acme.as_ref().map(|(a, _)| a) != wanted {
                        if let Some((_, stop)) = e.acme.take() {
                            stop.cancel();
                            if wanted.is_none() {
                                if let Some(tls) = &e.tls {
                                    tls.clear_acme();
                                }
                            }
                        }
                        if let Some(tls) = &e.tls {
                            e.acme = start_acme(
                                app,
                                l,
                                tls,
                                &e.proxy,
                                &self.config.state_dir,
                                &self.reports,
                                &self.tasks,
                            );
                        }
                    }
                    if let Some(routes) = &e.routes {
                        routes.set_affinity(l.affinity == Affinity::ClientIp);
                    }
                    continue;
                }
                let addr = socket_addr(&l.address, l.port)?;
                let name = handover::listener_name(&app.0, &key);
                // A previous daemon's very socket (upgrade, or systemd's fd store after a
                // crash): connections queued on it while no daemon accepted are served.
                let handed = self.handover.take(&name).and_then(|fd| {
                    BoundListener::from_handover(fd, l.protocol)
                        .inspect(|b| tracing::info!(app = %app, socket = %name, addr = %b.local_addr(), "took over a handed-over socket"))
                        .map_err(|e| tracing::warn!(app = %app, socket = %name, error = %e, "unusable handed-over socket; binding"))
                        .ok()
                });
                let fresh = handed.is_none();
                // Workers adopted from a previous daemon still hold an inherit-mode
                // socket: take that very socket back rather than binding (which would
                // fail anyway while they hold it).
                let recovered = if handed.is_some() {
                    handed
                } else if matches!(l.mode, ListenMode::Inherit | ListenMode::Shared)
                    && !adopted.is_empty()
                {
                    BoundListener::recover_from(adopted, addr, l.protocol).unwrap_or_else(|e| {
                        tracing::warn!(app = %app, error = %e, "cannot recover the listener from adopted workers");
                        None
                    })
                } else {
                    None
                };
                let bound = match recovered {
                    Some(b) => b,
                    None => BoundListener::bind(addr, l.protocol, crate::listener::DEFAULT_BACKLOG)
                        .map_err(|e| {
                            format!("cannot listen on {addr}: {}", describe_bind_error(&e, addr))
                        })?,
                };
                if fresh {
                    if let Some(store) = &self.fdstore {
                        if let Err(e) = store.store(&name, bound.as_fd()) {
                            tracing::warn!(app = %app, socket = %name, error = %e, "FDSTORE: this socket would close if the daemon crashed");
                        }
                    }
                }
                let cancel = CancellationToken::new();
                // Cancelled by `cancel` too: the proxy stops either way.
                let retire = cancel.child_token();
                let mut trusted = None;
                let mut tls = None;
                let routes = match l.mode {
                    // The workers themselves accept on these; no proxy.
                    ListenMode::Inherit | ListenMode::Shared => None,
                    mode => {
                        let routes = RouteTable::new();
                        routes.set_affinity(l.affinity == Affinity::ClientIp);
                        let std_listener = bound.proxy_listener().map_err(|e| e.to_string())?;
                        let listener = tokio::net::TcpListener::from_std(std_listener)
                            .map_err(|e| e.to_string())?;
                        let span = tracing::info_span!("proxy", app = %app, listen = %addr);
                        if mode == ListenMode::Http {
                            let cfg = http_proxy_config(l, cert_reporter(&self.reports, app, l));
                            trusted = Some(cfg.trusted_proxies.clone());
                            tls = Some(cfg.tls.clone());
                            self.proxies.spawn(
                                proxy::serve_http_retirable(
                                    listener,
                                    routes.clone(),
                                    cfg,
                                    cancel.clone(),
                                    retire.clone(),
                                )
                                .instrument(span),
                            );
                        } else {
                            // A tcp connection has no way to say "reconnect": on an
                            // upgrade it runs on until it closes or the grace passes,
                            // exactly as at shutdown.
                            self.proxies.spawn(
                                proxy::serve_tcp(
                                    listener,
                                    routes.clone(),
                                    proxy::TcpProxyConfig::default(),
                                    retire.clone(),
                                )
                                .instrument(span),
                            );
                        }
                        Some(routes)
                    }
                };
                let acme = tls.as_ref().and_then(|tls| {
                    start_acme(
                        app,
                        l,
                        tls,
                        &cancel,
                        &self.config.state_dir,
                        &self.reports,
                        &self.tasks,
                    )
                });
                let proxy = cancel;
                added.push(ListenerEntry {
                    key,
                    name,
                    trusted,
                    tls,
                    acme,
                    bound,
                    routes,
                    proxy,
                    retire,
                    handed: !fresh,
                });
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                let recovered = !adopted.is_empty() && !added.is_empty();
                set.entries.extend(added);
                if recovered {
                    self.report_adopted_binds(app, listens);
                }
                self.answer_adopted_binds(app, listens);
                Ok(())
            }
            Err(e) => {
                for a in added {
                    a.proxy.cancel();
                    if a.handed {
                        // Still the previous daemon's socket: keep it for the next try.
                        self.handover.put_back(a.name, a.bound.into_fd());
                    } else if let Some(store) = &self.fdstore {
                        // Bound for nothing: it must not linger in the fd store either.
                        let _ = store.remove(&a.name);
                    }
                }
                if set.entries.is_empty() {
                    self.listeners.remove(app);
                }
                Err(e)
            }
        }
    }

    fn retain_listeners(&mut self, app: &AppName, keep: &[Listener]) {
        let keys: Vec<ListenKey> = keep.iter().map(ListenKey::of).collect();
        if let Some(set) = self.listeners.get_mut(app) {
            let mut closed = Vec::new();
            set.entries.retain(|e| {
                let keep = keys.contains(&e.key);
                if !keep {
                    e.proxy.cancel();
                    closed.push(e.name.clone());
                }
                keep
            });
            for name in closed {
                if let Some(store) = &self.fdstore {
                    if let Err(e) = store.remove(&name) {
                        tracing::warn!(socket = %name, error = %e, "FDSTOREREMOVE");
                    }
                }
            }
            if set.entries.is_empty() {
                self.listeners.remove(app);
            }
        }
    }

    fn bound_address(&self, app: &AppName, l: &Listener) -> Option<String> {
        let key = ListenKey::of(l);
        self.listeners
            .get(app)?
            .entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.bound.local_addr().to_string())
    }

    fn certificate_expiry(&self, app: &AppName, l: &Listener) -> Option<std::time::SystemTime> {
        let key = ListenKey::of(l);
        let e = self
            .listeners
            .get(app)?
            .entries
            .iter()
            .find(|e| e.key == key)?;
        e.acme.as_ref()?;
        e.tls.as_ref()?.acme_expiry()
    }

    fn has_proxy(&self, app: &AppName) -> bool {
        self.listeners
            .get(app)
            .is_some_and(|s| s.routes().next().is_some())
    }

    async fn spawn(&mut self, req: SpawnRequest<'_>) -> Result<Started, String> {
        let mut ports = Vec::new();
        for l in req
            .spec
            .spec
            .listen
            .iter()
            .filter(|l| matches!(l.mode, ListenMode::Http | ListenMode::Tcp))
        {
            match self.allocate_port() {
                Ok(p) => ports.push((ListenKey::of(l), p)),
                Err(e) => {
                    self.release_ports(&ports);
                    return Err(e);
                }
            }
        }
        let StartedProcess {
            process,
            ipc,
            cgroup_note,
            shared,
        } = match self.start(req, &ports).await {
            Ok(r) => r,
            Err(e) => {
                self.release_ports(&ports);
                return Err(e);
            }
        };
        let shared = match shared {
            Some((notif, listeners, labels)) => {
                let ready_on_bind = req.spec.spec.readiness.kind == Some(ReadinessKind::Bind);
                match self.answer_binds(
                    req.app,
                    req.id,
                    ready_on_bind,
                    false,
                    notif,
                    (listeners, labels),
                ) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let _ = process.kill();
                        self.release_ports(&ports);
                        return Err(format!("cannot answer the worker's binds: {e}"));
                    }
                }
            }
            None => None,
        };
        let pid = u32::try_from(process.pid()).unwrap_or_default();
        // The notification fd goes to systemd's fd store too: a daemon restarted after a
        // crash answers this worker's later binds.
        let stored_notif = match (&shared, &self.fdstore) {
            (Some(bind), Some(store)) => {
                let name = handover::seccomp_name(&req.app.0, process.pid(), process.start_time());
                match bind
                    .duplicate()
                    .and_then(|fd| store.store(&name, fd.as_fd()))
                {
                    Ok(()) => Some(name),
                    Err(e) => {
                        tracing::warn!(app = %req.app, pid, error = %e, "FDSTORE: after a daemon crash this worker's later binds would fail");
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(ipc) = ipc {
            ipc.forward(process.pid(), self.notify_reports.clone());
        }
        self.watch_exit(req.app, req.id, process.clone());
        let probes = CancellationToken::new();
        let spec = &req.spec.spec;
        if let (Some(kind @ (ReadinessKind::Tcp | ReadinessKind::Http)), Some((_, port))) =
            (spec.readiness.kind, ports.first())
        {
            let probe = probes::readiness(
                req.app.clone(),
                req.id,
                kind,
                spec.readiness.path.clone().unwrap_or_else(|| "/".into()),
                spec.readiness.period.0,
                *port,
                self.reports.clone(),
            );
            let cancel = probes.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = probe => {}
                }
            });
        }
        let started = Started {
            pid,
            start_time: process.start_time(),
            ports: ports.clone(),
            cgroup_note,
        };
        self.procs.insert(
            (req.app.clone(), req.id),
            Proc {
                handle: process,
                index: req.index,
                ports,
                probes,
                shared,
                pending_notif: None,
                stored_notif,
                _peer: None,
            },
        );
        if let Some(watch) = &self.log_watch {
            watch.track(
                crate::logs::instance_log_path(&self.config.log_dir, &req.app.0, req.index),
                (&req.spec.spec.logs).into(),
            );
        }
        Ok(started)
    }

    fn adopt(&mut self, req: AdoptRequest<'_>) -> Result<Started, String> {
        let process = crate::spawn::adopt(req.app, req.index, req.pid, req.start_time)
            .map_err(|e| e.to_string())?;
        let mut ports = Vec::new();
        for (address, port, private) in req.ports {
            if let Some(l) = req
                .listens
                .iter()
                .find(|l| &l.address == address && l.port == *port)
            {
                self.ports_in_use.insert(*private);
                ports.push((ListenKey::of(l), *private));
            }
        }
        self.notify_registry.insert(process.pid());
        // A shared-mode worker's notification fd, if the previous daemon handed it over:
        // only for the very process it was made for (the name has its start time).
        let notif_name = handover::seccomp_name(&req.app.0, req.pid, req.start_time);
        let pending_notif = self.handover.take(&notif_name).and_then(|fd| {
            if crate::seccomp::is_filtered_worker(req.pid, req.start_time) {
                Some((fd, req.ready_on_bind))
            } else {
                tracing::warn!(app = %req.app, pid = req.pid, "a handed-over seccomp notification fd is not this worker's; closing it");
                self.unstore(&notif_name);
                None
            }
        });
        // Already in the fd store (the previous daemon put it there).
        let stored_notif =
            (pending_notif.is_some() && self.fdstore.is_some()).then_some(notif_name);
        self.watch_exit(req.app, req.id, process.clone());
        let started = Started {
            pid: u32::try_from(process.pid()).unwrap_or_default(),
            start_time: process.start_time(),
            ports: ports.clone(),
            cgroup_note: None,
        };
        self.procs.insert(
            (req.app.clone(), req.id),
            Proc {
                handle: process,
                index: req.index,
                ports,
                probes: CancellationToken::new(),
                shared: None,
                pending_notif,
                stored_notif,
                _peer: None,
            },
        );
        Ok(started)
    }

    fn route(
        &mut self,
        app: &AppName,
        id: WorkerId,
        spec: Option<&clusterd_core::load::LoadedApp>,
    ) {
        let Some(proc_) = self.procs.get(&(app.clone(), id)) else {
            return;
        };
        if let Some(set) = self.listeners.get(app) {
            for (key, port) in &proc_.ports {
                if let Some(routes) = set
                    .entries
                    .iter()
                    .find(|e| &e.key == key)
                    .and_then(|e| e.routes.as_ref())
                {
                    routes.add(id, SocketAddr::from(([127, 0, 0, 1], *port)));
                }
            }
        }
        let Some(liveness) = spec.and_then(|s| s.spec.liveness.clone()) else {
            return;
        };
        let port = proc_.ports.first().map(|(_, p)| *p);
        let cancel = proc_.probes.child_token();
        let env = spec.map(|s| s.spec.env.clone()).unwrap_or_default();
        let probe = probes::liveness(liveness, port, env, self.reports.clone(), app.clone(), id);
        self.tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = probe => {}
            }
        });
    }

    fn drain(&mut self, app: &AppName, id: WorkerId) {
        if let Some(p) = self.procs.get(&(app.clone(), id)) {
            p.probes.cancel();
        }
        let Some(set) = self.listeners.get(app) else {
            return;
        };
        let tables: Vec<Arc<RouteTable>> = set.routes().cloned().collect();
        if tables.is_empty() {
            return;
        }
        for t in &tables {
            t.stop_routing(id);
        }
        // The planner signals once nothing is in flight: report when that happens.
        let tx = self.reports.clone();
        let app = app.clone();
        self.tasks.spawn(async move {
            for t in tables {
                t.drained(id).await;
            }
            let _ = tx.send(Report::Drained { app, id });
        });
    }

    fn signal(&mut self, app: &AppName, id: WorkerId, signal: &str) {
        let Some(p) = self.procs.get(&(app.clone(), id)) else {
            return;
        };
        // Names were normalized to the `SIGTERM` form when the manifest was loaded.
        let sig = signal
            .parse::<nix::sys::signal::Signal>()
            .unwrap_or(nix::sys::signal::Signal::SIGTERM);
        if let Err(e) = p.handle.signal(sig) {
            tracing::warn!(app = %app, pid = p.handle.pid(), error = %e, "signal");
        }
    }

    fn kill(&mut self, app: &AppName, id: WorkerId) {
        if let Some(p) = self.procs.get(&(app.clone(), id)) {
            if let Err(e) = p.handle.kill() {
                tracing::warn!(app = %app, pid = p.handle.pid(), error = %e, "kill");
            }
        }
    }

    fn forget(&mut self, app: &AppName, id: WorkerId) {
        let Some(p) = self.procs.remove(&(app.clone(), id)) else {
            return;
        };
        if !self.writes_log(app, p.index) {
            if let Some(watch) = &self.log_watch {
                watch.untrack(crate::logs::instance_log_path(
                    &self.config.log_dir,
                    &app.0,
                    p.index,
                ));
            }
        }
        p.probes.cancel();
        if let Some(name) = &p.stored_notif {
            self.unstore(name);
        }
        self.notify_registry.remove(p.handle.pid());
        if let Some(set) = self.listeners.get(app) {
            for routes in set.routes() {
                routes.remove(id);
            }
        }
        self.release_ports(&p.ports);
    }

    fn served(&self, app: &AppName, id: WorkerId) -> Option<u64> {
        let set = self.listeners.get(app)?;
        let mut tables = set.routes().peekable();
        tables.peek()?;
        Some(
            tables
                .flat_map(|r| r.snapshot())
                .filter(|b| b.id == id)
                .map(|b| b.total)
                .sum(),
        )
    }

    fn inflight(&self, app: &AppName, id: WorkerId) -> u64 {
        self.listeners
            .get(app)
            .map_or(0, |s| s.routes().map(|r| r.inflight(id)).sum())
    }

    fn sample(&mut self) -> BTreeMap<u32, GroupUsage> {
        // One /proc pass for all workers; a worker with a cgroup counts its whole tree
        // (setsid'd children included), one without counts its process group.
        let by_pid = procfs::usage_by_pid();
        let by_group = procfs::group_by_pgid(&by_pid);
        self.procs
            .values()
            .filter_map(|p| {
                let pid = p.handle.pid();
                let usage = match p.handle.cgroup_members() {
                    Some(members) => procfs::sum_of(&by_pid, &members),
                    None => by_group.get(&pid).copied().unwrap_or_default(),
                };
                Some((u32::try_from(pid).ok()?, usage))
            })
            .collect()
    }

    fn settle(&mut self) {
        self.settle_handover();
    }

    fn repair_listeners(&mut self) -> Vec<(AppName, String)> {
        let mut repaired = Vec::new();
        for (app, set) in &mut self.listeners {
            for e in set.entries.iter_mut().filter(|e| e.routes.is_none()) {
                if e.bound.is_listening() {
                    continue;
                }
                let addr = e.bound.local_addr();
                // The dead socket keeps its address bound; SO_REUSEADDR lets a new one
                // take it.
                match BoundListener::bind(addr, e.key.protocol, crate::listener::DEFAULT_BACKLOG) {
                    Ok(fresh) => {
                        e.bound = fresh;
                        repaired.push((
                            app.clone(),
                            format!("{addr} stopped listening (a worker shut the shared socket down); bound it anew, replacing every worker"),
                        ));
                    }
                    Err(err) => repaired.push((
                        app.clone(),
                        format!("{addr} stopped listening (a worker shut the shared socket down) and cannot be bound anew: {err}"),
                    )),
                }
            }
        }
        repaired
    }

    fn rotate_logs(&mut self, app: &AppName, logs: &Logs) {
        if let Err(e) = crate::logs::rotate_app(&self.config.log_dir, &app.0, logs.into()) {
            tracing::warn!(app = %app, error = %e, "log rotation");
        }
        // Keep the size watch's policy current (a `logs` edit touches no worker), and
        // track workers it has not seen (adopted ones).
        if let Some(watch) = &self.log_watch {
            for ((a, _), p) in &self.procs {
                if a == app {
                    watch.track(
                        crate::logs::instance_log_path(&self.config.log_dir, &app.0, p.index),
                        logs.into(),
                    );
                }
            }
        }
    }
}

/// Says who holds a port when a bind fails with EADDRINUSE, from /proc (best effort).
fn describe_bind_error(e: &crate::Error, addr: SocketAddr) -> String {
    let in_use = matches!(e, crate::Error::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse);
    if !in_use {
        return e.to_string();
    }
    match procfs::port_holder(addr) {
        Some((pid, name)) => format!("{addr} is in use by pid {pid} ({name})"),
        None => format!("{addr} is in use"),
    }
}

/// The http proxy's settings for listener `l`: the defaults with the operator's
/// overrides from the daemon's environment (`CLUSTERD_PROXY_*_MS`, see
/// [`proxy::HttpProxyConfig::with_env`] and docs/operations.md), and the listener's
/// `trustedProxies`.
fn http_proxy_config(l: &Listener, certs: crate::tls::CertReporter) -> proxy::HttpProxyConfig {
    proxy::HttpProxyConfig {
        trusted_proxies: proxy::TrustedProxies::new(trusted_proxies(l)),
        tls: crate::tls::TlsTerminator::with_reporter(l.tls.as_ref(), Some(certs)),
        ..proxy::HttpProxyConfig::default().with_env()
    }
}

/// Sends listener `l`'s certificate loads and refusals to the controller as
/// [`Report::CertificateFiles`] (for the event log).
fn cert_reporter(
    reports: &mpsc::UnboundedSender<Report>,
    app: &AppName,
    l: &Listener,
) -> crate::tls::CertReporter {
    let reports = reports.clone();
    let app = app.clone();
    let listener = format!("{}:{}", l.address, l.port);
    crate::tls::CertReporter::new(move |event| {
        let _ = reports.send(Report::CertificateFiles {
            app: app.clone(),
            listener: listener.clone(),
            event,
        });
    })
}

/// Starts `l`'s certificate task if it has `tls.acme`: it serves the stored
/// certificate or orders one, renews it, and reports each outcome as
/// [`Report::Certificate`]. Stopped by `parent` (the listener's proxy token) or by the
/// token returned.
fn start_acme(
    app: &AppName,
    l: &Listener,
    tls: &crate::tls::TlsTerminator,
    parent: &CancellationToken,
    state_dir: &std::path::Path,
    reports: &mpsc::UnboundedSender<Report>,
    tasks: &TaskTracker,
) -> Option<(clusterd_core::model::Acme, CancellationToken)> {
    let acme = l.tls.as_ref()?.acme.clone()?;
    let stop = parent.child_token();
    let dir = clusterd_core::acme::listener_dir(state_dir, &app.0, &l.address, l.port);
    let job = crate::tls::acme::AcmeJob::new(acme.clone(), dir, tls.clone());
    let tx = reports.clone();
    let name = app.clone();
    let listener = format!("{}:{}", l.address, l.port);
    let span = tracing::info_span!("acme", app = %app, listen = %listener);
    tasks.spawn(
        crate::tls::acme::run(job, stop.clone(), move |event| {
            let _ = tx.send(Report::Certificate {
                app: name.clone(),
                listener: listener.clone(),
                kind: event.kind,
                message: event.message,
            });
        })
        .instrument(span),
    );
    Some((acme, stop))
}

/// `l.trustedProxies` parsed (validation has already rejected a bad range).
fn trusted_proxies(l: &Listener) -> Vec<clusterd_core::net::Cidr> {
    l.trusted_proxies
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn socket_addr(address: &str, port: u32) -> Result<SocketAddr, String> {
    let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| format!("`{address}` is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Expands `$(NAME)` from the worker's environment, as Kubernetes does for `command`
/// and `args`: apps that take their port as an argument (`http.server $(PORT)`) work
/// without a shell. `$$(NAME)` is a literal `$(NAME)`; unknown names stay as written.
#[must_use]
pub fn expand_vars(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(pos) = rest.find("$(") {
        if rest[..pos].ends_with('$') {
            out.push_str(&rest[..pos]);
            out.push('(');
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `PORT_<NAME>`: upper case, `-` to `_`.
fn env_suffix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_known_variables_only() {
        let env = BTreeMap::from([("PORT".to_string(), "4242".to_string())]);
        assert_eq!(expand_vars("--port=$(PORT)", &env), "--port=4242");
        assert_eq!(expand_vars("$(NOPE)", &env), "$(NOPE)");
        assert_eq!(expand_vars("$$(PORT)", &env), "$(PORT)");
        assert_eq!(expand_vars("a$(PORT)b$(PORT)", &env), "a4242b4242");
        assert_eq!(expand_vars("$(PORT", &env), "$(PORT");
    }
}

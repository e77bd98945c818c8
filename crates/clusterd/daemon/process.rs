//! The daemon's side of workers and sockets: bound listeners with their proxies, private
//! ports, readiness and liveness probes, and worker processes. It only carries out what
//! the reconcile loop decided and reports back through `Msg`.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clusterd_core::load::LoadedApp;
use clusterd_core::model::{
    AppSpec, CommandLine, ListenMode, Listener, LivenessKind, Protocol, ReadinessKind,
};
use clusterd_core::plan::ExitReason;
use clusterd_core::plan::{AppName, Template, WorkerId};
use clusterd_runtime::limits::{CgroupLimits, CgroupTree};
use clusterd_runtime::listener::BoundListener;
use clusterd_runtime::notify::{NotifySocket, Registry, WorkerMessage, WorkerReport};
use clusterd_runtime::procfs::{self, GroupUsage};
use clusterd_runtime::proxy::{self, RouteTable};
use clusterd_runtime::shim::ShimCommand;
use clusterd_runtime::spawn::{
    spawn_worker, ExitReason as RtExit, InheritedListener, WorkerProcess, WorkerSpec,
};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Config, Msg};

/// Identity of a public socket within an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenKey {
    address: String,
    port: u32,
    protocol: Protocol,
    mode: ListenMode,
}

impl ListenKey {
    /// Address and port, for the saved state.
    pub fn address_port(&self) -> (String, u32) {
        (self.address.clone(), self.port)
    }

    fn of(l: &Listener) -> Self {
        ListenKey {
            address: l.address.clone(),
            port: l.port,
            protocol: l.protocol,
            mode: l.mode,
        }
    }
}

struct ListenerEntry {
    key: ListenKey,
    bound: BoundListener,
    routes: Option<Arc<RouteTable>>,
    proxy: CancellationToken,
}

/// An app's public sockets. Bound once and kept for the app's whole life, so no worker
/// restart ever closes a port.
#[derive(Default)]
pub struct ListenerSet {
    entries: Vec<ListenerEntry>,
}

impl ListenerSet {
    /// Binds every listener of `listens` that is not bound yet and starts its proxy.
    ///
    /// # Errors
    /// The first socket that cannot be bound; nothing of this call stays bound then.
    pub fn ensure(
        &mut self,
        app: &AppName,
        listens: &[Listener],
        adopted: &[i32],
    ) -> anyhow::Result<()> {
        let mut added = Vec::new();
        for l in listens {
            let key = ListenKey::of(l);
            if self.entries.iter().any(|e| e.key == key)
                || added.iter().any(|e: &ListenerEntry| e.key == key)
            {
                continue;
            }
            let addr = socket_addr(&l.address, l.port)?;
            // Workers adopted from a previous daemon still hold an inherit-mode socket:
            // take that very socket back rather than binding (which would fail anyway).
            let recovered = if l.mode == ListenMode::Inherit && !adopted.is_empty() {
                BoundListener::recover_from(adopted, addr, l.protocol).unwrap_or_else(|e| {
                    tracing::warn!(app = %app, error = %e, "cannot recover the listener from adopted workers");
                    None
                })
            } else {
                None
            };
            let bound = match recovered {
                Some(b) => b,
                None => BoundListener::bind(
                    addr,
                    l.protocol,
                    clusterd_runtime::listener::DEFAULT_BACKLOG,
                )
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({}): {e}", l.address))?,
            };
            let (routes, proxy) = match l.mode {
                ListenMode::Inherit => (None, CancellationToken::new()),
                mode => {
                    let routes = RouteTable::new();
                    let cancel = CancellationToken::new();
                    let std_listener = bound.proxy_listener()?;
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    let span = tracing::info_span!("proxy", app = %app, listen = %addr);
                    let task_routes = routes.clone();
                    let task_cancel = cancel.clone();
                    let _g = span.enter();
                    if mode == ListenMode::Http {
                        tokio::spawn(proxy::serve_http(
                            listener,
                            task_routes,
                            http_proxy_config(),
                            task_cancel,
                        ));
                    } else {
                        tokio::spawn(proxy::serve_tcp(
                            listener,
                            task_routes,
                            proxy::TcpProxyConfig::default(),
                            task_cancel,
                        ));
                    }
                    (Some(routes), cancel)
                }
            };
            added.push(ListenerEntry {
                key,
                bound,
                routes,
                proxy,
            });
        }
        self.entries.extend(added);
        Ok(())
    }

    /// The inherited sockets for a worker of `listens` (inherit mode), with their names.
    pub fn inherit_fds(&self, listens: &[Listener]) -> Vec<(&BoundListener, String)> {
        listens
            .iter()
            .filter(|l| l.mode == ListenMode::Inherit)
            .filter_map(|l| {
                let key = ListenKey::of(l);
                let e = self.entries.iter().find(|e| e.key == key)?;
                Some((&e.bound, l.name.clone().unwrap_or_else(|| "unknown".into())))
            })
            .collect()
    }

    /// Starts sending traffic to the worker on its private ports.
    pub fn route(&self, id: WorkerId, ports: &[(ListenKey, u16)]) {
        for (key, port) in ports {
            if let Some(routes) = self
                .entries
                .iter()
                .find(|e| &e.key == key)
                .and_then(|e| e.routes.as_ref())
            {
                routes.add(id, SocketAddr::from(([127, 0, 0, 1], *port)));
            }
        }
    }

    /// No new requests or connections for the worker.
    pub fn stop_routing(&self, id: WorkerId) {
        for routes in self.entries.iter().filter_map(|e| e.routes.as_ref()) {
            routes.stop_routing(id);
        }
    }

    /// Forget the worker.
    pub fn remove(&self, id: WorkerId) {
        for routes in self.entries.iter().filter_map(|e| e.routes.as_ref()) {
            routes.remove(id);
        }
    }

    /// Requests or connections in flight to the worker, over every proxied listener.
    pub fn inflight(&self, id: WorkerId) -> u64 {
        self.entries
            .iter()
            .filter_map(|e| e.routes.as_ref())
            .map(|r| r.inflight(id))
            .sum()
    }

    /// Resolves when nothing is in flight to the worker any more.
    pub fn drained(&self, id: WorkerId) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tables: Vec<Arc<RouteTable>> = self
            .entries
            .iter()
            .filter_map(|e| e.routes.clone())
            .collect();
        async move {
            for t in tables {
                t.drained(id).await;
            }
        }
    }

    /// Whether any listener is proxied (in-flight numbers mean something).
    pub fn has_proxy(&self) -> bool {
        self.entries.iter().any(|e| e.routes.is_some())
    }

    /// `address:port` as actually bound.
    pub fn bound_address(&self, l: &Listener) -> Option<String> {
        let key = ListenKey::of(l);
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.bound.local_addr().to_string())
    }

    /// Closes sockets no spec in `keep` uses any more.
    pub fn retain(&mut self, keep: &[Listener]) {
        let keys: Vec<ListenKey> = keep.iter().map(ListenKey::of).collect();
        self.entries.retain(|e| {
            let keep = keys.contains(&e.key);
            if !keep {
                e.proxy.cancel();
            }
            keep
        });
    }

    /// Closes everything.
    pub fn close(self) {
        for e in self.entries {
            e.proxy.cancel();
        }
    }
}

/// The http proxy's bounds: the defaults, with the client-facing timeouts tunable through
/// the daemon's environment (`CLUSTERD_PROXY_HEADER_TIMEOUT_MS`: slowloris and keep-alive
/// idle bound; `CLUSTERD_PROXY_NO_BACKEND_WAIT_MS`: how long a request waits for a ready
/// worker before a 503), so operators and tests can tighten them.
fn http_proxy_config() -> proxy::HttpProxyConfig {
    let ms = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    let mut cfg = proxy::HttpProxyConfig::default();
    if let Some(d) = ms("CLUSTERD_PROXY_HEADER_TIMEOUT_MS") {
        cfg.header_read_timeout = d;
    }
    if let Some(d) = ms("CLUSTERD_PROXY_NO_BACKEND_WAIT_MS") {
        cfg.no_backend_wait = d;
    }
    cfg
}

fn socket_addr(address: &str, port: u32) -> anyhow::Result<SocketAddr> {
    let port = u16::try_from(port)?;
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| anyhow::anyhow!("`{address}` is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Hands out private 127.0.0.1 ports so that no two live workers ever share one.
#[derive(Default)]
struct PortAllocator {
    in_use: HashSet<u16>,
}

impl PortAllocator {
    /// A port the kernel considers free right now and no live worker holds. Something
    /// else may still take it before the worker binds: the worker then fails readiness
    /// and is replaced, which the planner already handles.
    fn allocate(&mut self) -> anyhow::Result<u16> {
        for _ in 0..64 {
            let port = StdTcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
            if self.in_use.insert(port) {
                return Ok(port);
            }
        }
        anyhow::bail!("no free private port found")
    }

    fn release(&mut self, port: u16) {
        self.in_use.remove(&port);
    }
}

/// A live worker process.
pub struct WorkerProc {
    /// Process id, also its process group id.
    pub pid: u32,
    /// Instance index.
    pub index: u32,
    /// What it was spawned from.
    pub template: Template,
    /// Wall-clock start.
    pub spawned: SystemTime,
    /// Private ports per proxied listener.
    pub ports: Vec<(ListenKey, u16)>,
    /// Last sampled CPU use.
    pub cpu_percent: Option<f64>,
    /// Last sampled RSS of the process group.
    pub rss: Option<u64>,
    /// Cgroup backstop state, for status.
    pub cgroup_note: Option<String>,
    probes: CancellationToken,
    last_usage: Option<(Instant, GroupUsage)>,
    handle: WorkerProcess,
}

impl WorkerProc {
    /// Start time (clock ticks since boot), recorded so a restarted daemon can verify it.
    pub fn start_time(&self) -> u64 {
        self.handle.start_time()
    }

    /// Starts liveness probing once the worker takes traffic.
    pub fn on_ready(&mut self, rt: &Runtime, app: &AppName, id: WorkerId, spec: Option<&AppSpec>) {
        let Some(liveness) = spec.and_then(|s| s.liveness.clone()) else {
            return;
        };
        let port = self.ports.first().map(|(_, p)| *p);
        let tx = rt.tx.clone();
        let cancel = self.probes.child_token();
        let app = app.clone();
        let env = spec.map(|s| s.env.clone()).unwrap_or_default();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = liveness_loop(liveness, port, env, tx, app, id) => {}
            }
        });
    }

    /// Stops readiness and liveness probes (the worker is draining).
    pub fn stop_probes(&self) {
        self.probes.cancel();
    }

    /// Sends `signal` (a name like `SIGINT`) to the worker's process group.
    pub fn signal(&self, signal: &str) {
        // Names were normalized to the `SIGTERM` form when the manifest was loaded.
        let sig = signal
            .parse::<nix::sys::signal::Signal>()
            .unwrap_or(nix::sys::signal::Signal::SIGTERM);
        if let Err(e) = self.handle.signal(sig) {
            tracing::warn!(pid = self.pid, error = %e, "signal");
        }
    }

    /// SIGKILL to the worker's process group.
    pub fn kill(&self) {
        if let Err(e) = self.handle.kill() {
            tracing::warn!(pid = self.pid, error = %e, "kill");
        }
    }

    /// Records a sample of the worker's process group (from one /proc pass for all).
    pub fn sample(&mut self, usage: GroupUsage) {
        let now = Instant::now();
        if let Some((then, before)) = &self.last_usage {
            self.cpu_percent = Some(procfs::cpu_percent(before, &usage, now - *then));
        }
        self.rss = Some(usage.rss_bytes);
        self.last_usage = Some((now, usage));
    }
}

/// Process-level services shared by every app: spawn, notify socket, ports, logs.
pub struct Runtime {
    tx: mpsc::UnboundedSender<Msg>,
    log_dir: PathBuf,
    notify_path: PathBuf,
    notify_registry: Registry,
    reports: mpsc::Sender<WorkerReport>,
    ports: std::sync::Mutex<PortAllocator>,
    cgroups: Result<CgroupTree, String>,
}

impl Runtime {
    /// Binds the notify socket in the state dir and starts forwarding `READY=1` (and
    /// Node IPC `ready`) to the loop.
    ///
    /// # Errors
    /// When the notify socket cannot be bound.
    pub fn new(config: &Config, tx: mpsc::UnboundedSender<Msg>) -> anyhow::Result<Self> {
        let notify_path = config.state_dir.join("notify.sock");
        let notify = NotifySocket::bind(&notify_path)?;
        let notify_registry = notify.registry();
        let (reports, mut rx) = mpsc::channel::<WorkerReport>(256);
        notify.spawn(reports.clone());
        let forward = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if r.message == WorkerMessage::Ready {
                    if let Ok(pgid) = u32::try_from(r.pgid) {
                        let _ = forward.send(Msg::NotifyReady { pgid });
                    }
                }
            }
        });
        let cgroups = CgroupTree::detect().map_err(|e| e.to_string());
        if let Err(e) = &cgroups {
            tracing::info!(reason = %e, "cgroup backstop unavailable; memory limits are enforced by sampling only");
        }
        Ok(Runtime {
            tx,
            log_dir: config.log_dir.clone(),
            notify_path,
            notify_registry,
            reports,
            ports: std::sync::Mutex::new(PortAllocator::default()),
            cgroups,
        })
    }

    fn release_ports(&self, ports: &[(ListenKey, u16)]) {
        let mut alloc = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, p) in ports {
            alloc.release(*p);
        }
    }

    /// Starts a worker for `index` of `app` from `loaded` (the template's spec).
    ///
    /// # Errors
    /// When the process cannot be started (bad command, user, working dir...).
    pub async fn spawn(
        &self,
        app: &AppName,
        id: WorkerId,
        index: u32,
        template: &Template,
        loaded: &LoadedApp,
        listeners: &ListenerSet,
    ) -> anyhow::Result<WorkerProc> {
        let spec = &loaded.spec;
        let mut extra_env: BTreeMap<String, String> = BTreeMap::new();
        let mut ports = Vec::new();
        {
            let mut alloc = self
                .ports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for l in spec.listen.iter().filter(|l| l.mode != ListenMode::Inherit) {
                let port = alloc.allocate()?;
                extra_env
                    .entry("PORT".into())
                    .or_insert_with(|| port.to_string());
                if let Some(name) = &l.name {
                    extra_env.insert(format!("PORT_{}", env_suffix(name)), port.to_string());
                }
                ports.push((ListenKey::of(l), port));
            }
        }
        let result = self
            .start(app, index, template, spec, listeners, extra_env, &ports)
            .await;
        let (process, ipc, cgroup_note) = match result {
            Ok(r) => r,
            Err(e) => {
                self.release_ports(&ports);
                return Err(e);
            }
        };
        let pid = u32::try_from(process.pid()).unwrap_or_default();
        if let Some(ipc) = ipc {
            ipc.forward(process.pid(), self.reports.clone());
        }
        let probes = CancellationToken::new();
        self.watch_exit(app, id, process.clone());
        if let (Some(kind @ (ReadinessKind::Tcp | ReadinessKind::Http)), Some((_, port))) =
            (spec.readiness.kind, ports.first())
        {
            self.probe_readiness(app, id, kind, spec, *port, probes.clone());
        }
        Ok(WorkerProc {
            pid,
            index,
            template: template.clone(),
            spawned: SystemTime::now(),
            ports,
            cpu_percent: None,
            rss: None,
            cgroup_note,
            probes,
            last_usage: None,
            handle: process,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        app: &AppName,
        index: u32,
        template: &Template,
        spec: &AppSpec,
        listeners: &ListenerSet,
        extra_env: BTreeMap<String, String>,
        ports: &[(ListenKey, u16)],
    ) -> anyhow::Result<(
        WorkerProcess,
        Option<clusterd_runtime::ipc::IpcChannel>,
        Option<String>,
    )> {
        let _ = ports;
        let mut all_env = spec.env.clone();
        all_env.extend(extra_env.clone());
        let argv: Vec<String> = match &spec.command {
            CommandLine::Argv(a) => a.clone(),
            CommandLine::Shell(s) => shell_words::split(s)?,
        };
        let argv = argv
            .iter()
            .map(|a| OsString::from(expand_vars(a, &all_env)))
            .collect();
        let mut ws = WorkerSpec::new(
            app.clone(),
            index,
            template.revision.clone(),
            argv,
            ShimCommand::current_exe(),
        );
        ws.cwd.clone_from(&spec.working_dir);
        ws.env = spec.env.clone();
        ws.extra_env = extra_env;
        for (bound, name) in listeners.inherit_fds(&spec.listen) {
            ws.listeners.push(InheritedListener {
                name,
                fd: bound.inherit_fd()?,
            });
        }
        ws.notify_socket = Some(self.notify_path.clone());
        ws.ipc = spec.readiness.kind == Some(ReadinessKind::Ipc);
        ws.user.clone_from(&spec.user);
        ws.group.clone_from(&spec.group);
        ws.rlimits = (&spec.limits).into();
        ws.log_dir = Some(self.log_dir.clone());
        let cgroup_note = match (
            &self.cgroups,
            spec.limits.memory.is_some() || spec.limits.cpu.is_some(),
        ) {
            (_, false) => None,
            (Err(reason), true) => Some(format!(
                "unavailable ({reason}); memory limit enforced by sampling"
            )),
            (Ok(tree), true) => {
                let limits = CgroupLimits {
                    memory_max: spec
                        .limits
                        .memory
                        .map(|m| clusterd_runtime::limits::memory_backstop(m.0)),
                    cpus: spec.limits.cpu.map(|c| c.0),
                };
                match tree.create_worker_cgroup(
                    &app.0,
                    &format!("{}-{}", index, template.revision),
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
        };
        let spawned = spawn_worker(ws).await?;
        Ok((spawned.process, spawned.ipc, cgroup_note))
    }

    fn probe_readiness(
        &self,
        app: &AppName,
        id: WorkerId,
        kind: ReadinessKind,
        spec: &AppSpec,
        port: u16,
        cancel: CancellationToken,
    ) {
        let path = spec.readiness.path.clone().unwrap_or_else(|| "/".into());
        let period = spec.readiness.period.0;
        let tx = self.tx.clone();
        let app = app.clone();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let attempt_timeout = period.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let probe = async {
                loop {
                    let ok = if kind == ReadinessKind::Http {
                        http_probe(addr, &path, attempt_timeout).await.is_ok()
                    } else {
                        tcp_probe(addr, attempt_timeout).await.is_ok()
                    };
                    if ok {
                        let _ = tx.send(Msg::Ready { app, id });
                        return;
                    }
                    tokio::time::sleep(period).await;
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                () = probe => {}
            }
        });
    }

    fn watch_exit(&self, app: &AppName, id: WorkerId, process: WorkerProcess) {
        let tx = self.tx.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let reason = match process.wait().await {
                RtExit::Code(c) => ExitReason::Code(c),
                RtExit::Signal(s) => ExitReason::Signal(s),
                RtExit::Unknown => ExitReason::Unknown,
            };
            let _ = tx.send(Msg::Exited { app, id, reason });
        });
    }

    /// Takes over a worker of a previous daemon (already verified by
    /// [`clusterd_runtime::spawn::adopt`]): its ports, readiness reports and exit.
    pub fn adopt(
        &self,
        app: &AppName,
        id: WorkerId,
        saved: &super::state::SavedWorker,
        process: WorkerProcess,
        listens: &[Listener],
    ) -> WorkerProc {
        let mut ports = Vec::new();
        {
            let mut alloc = self
                .ports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (address, port, private) in &saved.ports {
                if let Some(l) = listens
                    .iter()
                    .find(|l| &l.address == address && l.port == *port)
                {
                    alloc.in_use.insert(*private);
                    ports.push((ListenKey::of(l), *private));
                }
            }
        }
        self.notify_registry.insert(process.pid());
        self.watch_exit(app, id, process.clone());
        WorkerProc {
            pid: u32::try_from(process.pid()).unwrap_or_default(),
            index: saved.index,
            template: Template {
                revision: clusterd_core::plan::Revision(saved.revision.clone()),
                generation: saved.generation,
            },
            spawned: SystemTime::now(),
            ports,
            cpu_percent: None,
            rss: None,
            cgroup_note: None,
            probes: CancellationToken::new(),
            last_usage: None,
            handle: process,
        }
    }

    /// Returns the worker's private ports to the pool and stops its probes.
    pub fn release(&self, worker: &WorkerProc) {
        worker.probes.cancel();
        self.notify_registry.remove(worker.handle.pid());
        self.release_ports(&worker.ports);
    }

    /// Rotates the app's logs that passed their size limit.
    pub fn rotate_logs(&self, app: &AppName, logs: &clusterd_core::model::Logs) {
        if let Err(e) = clusterd_runtime::logs::rotate_app(&self.log_dir, &app.0, logs.into()) {
            tracing::warn!(app = %app, error = %e, "log rotation");
        }
    }

    /// Asks the loop to look again once `fut` resolves (used for drain completion).
    pub fn wake_when(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            fut.await;
            let _ = tx.send(Msg::Wake);
        });
    }
}

/// Expands `$(NAME)` from the worker's environment, as Kubernetes does for `command`
/// and `args`: apps that take their port as an argument (`http.server $(PORT)`) work
/// without a shell. `$$(NAME)` is a literal `$(NAME)`; unknown names stay as written.
fn expand_vars(arg: &str, env: &BTreeMap<String, String>) -> String {
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

async fn tcp_probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
        Err(_) => Err(format!(
            "tcp connect to {addr}: timed out after {timeout:?}"
        )),
    }
}

async fn http_probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header("user-agent", "clusterd-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {path} on {addr}: timed out after {timeout:?}")),
    }
}

async fn liveness_loop(
    l: clusterd_core::model::Liveness,
    port: Option<u16>,
    env: BTreeMap<String, String>,
    tx: mpsc::UnboundedSender<Msg>,
    app: AppName,
    id: WorkerId,
) {
    tokio::time::sleep(l.initial_delay.0).await;
    loop {
        tokio::time::sleep(l.period.0).await;
        let timeout = l.timeout.0;
        let result = match (l.kind, port) {
            (LivenessKind::Http, Some(p)) => {
                http_probe(
                    SocketAddr::from(([127, 0, 0, 1], p)),
                    l.path.as_deref().unwrap_or("/"),
                    timeout,
                )
                .await
            }
            (LivenessKind::Tcp, Some(p)) => {
                tcp_probe(SocketAddr::from(([127, 0, 0, 1], p)), timeout).await
            }
            (LivenessKind::Exec, _) => exec_probe(l.command.as_ref(), &env, timeout).await,
            (_, None) => Err("no private port to probe".to_string()),
        };
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        if tx
            .send(Msg::Liveness {
                app: app.clone(),
                id,
                ok,
                detail,
            })
            .is_err()
        {
            return;
        }
    }
}

async fn exec_probe(
    command: Option<&CommandLine>,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), String> {
    let argv = match command {
        Some(CommandLine::Argv(a)) => a.clone(),
        Some(CommandLine::Shell(s)) => shell_words::split(s).map_err(|e| e.to_string())?,
        None => return Err("no command".into()),
    };
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, async { cmd.status().await }).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("`{program}` {s}")),
        Ok(Err(e)) => Err(format!("`{program}`: {e}")),
        Err(_) => Err(format!("`{program}` timed out after {timeout:?}")),
    }
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

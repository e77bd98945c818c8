//! `clusterd daemon`: the world (one record per app and worker), the controller that
//! plans and acts, and the edges that feed it: the apps dir watcher, the control API,
//! the notify socket, signals and GitOps. The controller owns all state; everything else
//! only sends it messages. See docs/architecture.md.

mod api;
mod controller;
mod events;
mod intake;
mod state;
mod status;
#[cfg(test)]
mod tests;
mod upgrade;
mod watch;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clusterd_core::intake::WriteState;
use clusterd_runtime::effects::{LinuxEffects, LinuxEffectsConfig, Report};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use events::rfc3339;

/// Everything that wakes the controller. Each one only means "look again" plus the one
/// fact it carries; the controller re-plans from the whole picture.
#[derive(Debug)]
pub enum Msg {
    /// The watcher saw these files change (with what it knows of their writes).
    Files {
        /// Paths, and the write state when the event tells one.
        files: Vec<(PathBuf, Option<WriteState>)>,
        /// The apps dir itself was removed or moved away: watch it again when it is back.
        dir_gone: bool,
    },
    /// Scan the apps dir (SIGHUP).
    Rescan,
    /// Something happened to a worker (exit, readiness, liveness, drain).
    Report(Report),
    /// A control API request.
    Api(api::ApiRequest, oneshot::Sender<api::ApiReply>),
    /// SIGTERM or SIGINT: drain everything and exit.
    Shutdown,
    /// `POST /v1/upgrade` (with its reply) or SIGUSR2: start the binary on disk as the
    /// next daemon, hand it every socket and the workers, and exit without touching them.
    Upgrade(Option<oneshot::Sender<api::ApiReply>>),
    /// A GitOps sync attempt finished.
    Synced(Box<clusterd_runtime::gitops::SyncReport>),
}

/// Where the daemon keeps things and what it follows; built by the CLI.
#[derive(Debug, Clone)]
pub struct Options {
    /// Manifests.
    pub apps_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// State.
    pub state_dir: PathBuf,
    /// Worker logs.
    pub log_dir: PathBuf,
    /// One JSON object per log line instead of text.
    pub json_logs: bool,
    /// GitOps: `(repo, ref, path inside the repo, fetch interval)`.
    pub git: Option<(String, String, PathBuf, Duration)>,
}

/// Resolved daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Manifests.
    pub apps_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// State.
    pub state_dir: PathBuf,
    /// Worker logs.
    pub log_dir: PathBuf,
    /// Usable CPUs (affinity and cgroup quota honoured).
    pub cpus: u32,
    /// GitOps: follow a git repository into the apps dir.
    pub git: Option<clusterd_runtime::gitops::GitOpsConfig>,
}

/// Runs the daemon until SIGTERM/SIGINT, then drains every app and exits 0.
///
/// # Errors
/// Start-up failures (directories, the control socket) are reported and exit non-zero.
pub fn run(options: Options) -> anyhow::Result<ExitCode> {
    init_logging(options.json_logs);
    // Before any thread exists: it edits the environment (no worker may see
    // LISTEN_FDS or the upgrade pair) and takes ownership of inherited descriptors.
    let handover = clusterd_runtime::handover::Handover::from_env()
        .map_err(|e| anyhow::anyhow!("taking over from the previous daemon: {e}"))?;
    let upgrade = upgrade::Spec::from_env();
    // Absolute paths: workers run in their manifest's directory (NOTIFY_SOCKET lives in
    // the state dir), and `clusterd logs` reads the log dir from another working dir.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let mut config = Config {
        apps_dir: absolute(options.apps_dir),
        socket: absolute(options.socket),
        state_dir: absolute(options.state_dir),
        log_dir: absolute(options.log_dir),
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
        git: None,
    };
    if let Some((repo, git_ref, path, interval)) = options.git {
        let mut git = clusterd_runtime::gitops::GitOpsConfig::new(
            repo,
            git_ref,
            path,
            config.apps_dir.clone(),
            config.state_dir.clone(),
        );
        git.interval = interval;
        config.git = Some(git);
    }
    clusterd_runtime::quiet_read::ignore_lease_breaks();
    for dir in [&config.apps_dir, &config.state_dir, &config.log_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(config.cpus))
        .enable_all()
        .thread_name("clusterd")
        .build()
        .context("tokio runtime")?;
    rt.block_on(serve(config, handover, upgrade))?;
    Ok(ExitCode::SUCCESS)
}

/// Threads of the daemon's runtime: `CLUSTERD_THREADS`, or one per usable CPU (at most
/// 2). The daemon is mostly idle: the http/tcp proxies run on their own threads
/// (`CLUSTERD_PROXY_THREADS`, see clusterd_runtime::proxy::ProxyThreads); this runtime
/// has the controller, probes, log pipes and the API.
fn runtime_threads(cpus: u32) -> usize {
    std::env::var("CLUSTERD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or_else(|| cpus.clamp(1, 2) as usize)
}

/// Takes an exclusive lock on the state dir and on the apps dir for the daemon's life.
/// A second daemon on either would take over the notify socket, adopt the first one's
/// workers (and kill them when it stops), or run every app twice.
///
/// On upgrade the previous daemon hands its locked descriptors over (`lock/state`,
/// `lock/apps`): a flock belongs to the open file description, so the new daemon holds
/// the very same locks, and they never lapse between the two daemons.
///
/// # Errors
/// Another process holds a lock: says which pid, from /proc/locks.
fn lock_dirs(
    config: &Config,
    handover: &mut clusterd_runtime::handover::Handover,
) -> anyhow::Result<Vec<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    let mut locks = Vec::new();
    for (dir, what, name) in [
        (&config.state_dir, "state dir", upgrade::LOCK_STATE),
        (&config.apps_dir, "apps dir", upgrade::LOCK_APPS),
    ] {
        let file = match handover.take(name) {
            Some(fd) => std::fs::File::from(fd),
            None => std::fs::File::open(dir)
                .with_context(|| format!("opening the {what} {}", dir.display()))?,
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => locks.push(lock),
            Err((file, _)) => {
                use std::os::unix::fs::MetadataExt;
                let holder = file
                    .metadata()
                    .ok()
                    .and_then(|m| lock_holder(m.dev(), m.ino()))
                    .map_or_else(String::new, |pid| format!(" (pid {pid})"));
                anyhow::bail!(
                    "another clusterd{holder} is already running on the {what} {}; stop it first, or give this one other --state-dir/--apps-dir",
                    dir.display()
                );
            }
        }
    }
    Ok(locks)
}

/// The pid holding a flock on the file with this device and inode, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`).
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let major = nix::sys::stat::major(dev);
    let minor = nix::sys::stat::minor(dev);
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let id: Vec<&str> = f.get(5)?.split(':').collect();
        let (maj, min, inode) = (
            u64::from_str_radix(id.first()?, 16).ok()?,
            u64::from_str_radix(id.get(1)?, 16).ok()?,
            id.get(2)?.parse::<u64>().ok()?,
        );
        (maj == major && min == minor && inode == ino).then(|| f.get(4)?.parse().ok())?
    })
}

async fn serve(
    config: Config,
    mut handover: clusterd_runtime::handover::Handover,
    upgrade: upgrade::Spec,
) -> anyhow::Result<()> {
    let locks = lock_dirs(&config, &mut handover)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let events = events::EventLog::new();

    if !handover.is_empty() {
        tracing::info!(source = handover.source, sockets = ?handover.names(), "sockets handed over by the previous daemon");
    }
    let successor = handover.successor();
    let upgraded = successor.is_some();
    let control = match handover.take(clusterd_runtime::handover::CONTROL) {
        // The old daemon's control socket: requests queued on it are answered here.
        Some(fd) => upgrade::control_from(fd).with_context(|| {
            format!("the handed-over control socket {}", config.socket.display())
        })?,
        None => api::bind(&config.socket)
            .with_context(|| format!("binding the control socket {}", config.socket.display()))?,
    };
    let control_dup = upgrade::duplicate(&control);
    let watch_dir = config.apps_dir.clone();
    let watch_tx = tx.clone();
    let mut current_watch: Option<watch::Watch> = None;
    let mut rewatch = move || match watch::watch(&watch_dir, watch_tx.clone()) {
        Ok(w) => {
            // Replacing the old watch drops it.
            let _previous = current_watch.replace(w);
            // Whatever happened while nobody watched: look at everything.
            let _ = watch_tx.send(Msg::Rescan);
            true
        }
        Err(e) => {
            let _previous = current_watch.take();
            tracing::warn!(error = %e, dir = %watch_dir.display(), "cannot watch the apps dir; scanning it every 60 s and trying again");
            false
        }
    };
    rewatch();
    let (pause_api, api_paused) = tokio::sync::watch::channel(false);
    let api_task = tokio::spawn(api::serve(
        control,
        tx.clone(),
        events.clone(),
        shutdown.clone(),
        api_paused,
    ));
    spawn_signal_handler(tx.clone());

    let sync_trigger = config.git.clone().map(|git| {
        let (trigger_tx, trigger_rx) = mpsc::channel(8);
        let report_tx = tx.clone();
        tokio::spawn(clusterd_runtime::gitops::run_sync_loop(
            git,
            trigger_rx,
            move |report| {
                let _ = report_tx.send(Msg::Synced(Box::new(report)));
            },
            shutdown.clone(),
        ));
        trigger_tx
    });
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    let forward = tx.clone();
    tokio::spawn(async move {
        while let Some(r) = report_rx.recv().await {
            if forward.send(Msg::Report(r)).is_err() {
                return;
            }
        }
    });
    let effects = LinuxEffects::with_handover(
        LinuxEffectsConfig {
            log_dir: config.log_dir.clone(),
            notify_path: config.state_dir.join("notify.sock"),
            state_dir: config.state_dir.clone(),
        },
        report_tx,
        handover,
        clusterd_runtime::fdstore::FdStore::from_env(),
    )
    .context("binding the notify socket")?;
    let mut controller = controller::Controller::new(
        config.clone(),
        effects,
        events.clone(),
        sync_trigger,
        Some(Box::new(rewatch)),
    );
    if let Some(successor) = successor {
        let (started_tx, started_rx) = oneshot::channel();
        controller.notify_started(started_tx);
        let events = events.clone();
        tokio::spawn(async move {
            if started_rx.await.is_ok() {
                match successor.took_over() {
                    Ok(()) => {
                        tracing::info!("took over from the previous daemon");
                        events.push(
                            None,
                            None,
                            clusterd_core::event::EventKind::Upgrade,
                            format!(
                                "pid {} took over the sockets and workers",
                                std::process::id()
                            ),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot tell the previous daemon that this one took over")
                    }
                }
            }
        });
    }
    tracing::info!(apps_dir = %config.apps_dir.display(), socket = %config.socket.display(), cpus = config.cpus, pid = std::process::id(), "clusterd started");
    // An upgraded daemon joins a service systemd already sees as ready; it becomes the
    // main process when its predecessor sends MAINPID= (before that, NotifyAccess=main
    // would drop the message anyway).
    if !upgraded {
        notify_systemd_ready();
    }
    loop {
        match controller.run_until(&mut rx).await {
            controller::Stop::Stopped => break,
            controller::Stop::Upgrade(reply) => {
                // Control requests from now on wait in the socket's queue: the next
                // daemon answers them, or this one if the upgrade fails.
                pause_api.send_replace(true);
                let outcome = upgrade::hand_over(
                    &upgrade,
                    controller.effects_mut(),
                    control_dup.as_ref(),
                    &locks,
                )
                .await;
                match outcome {
                    Ok(took) => {
                        // Requests that reached this daemon just before the pause: the
                        // controller will not answer them any more.
                        rx.close();
                        while let Ok(msg) = rx.try_recv() {
                            if let Msg::Api(_, r) | Msg::Upgrade(Some(r)) = msg {
                                let _ = r.send(upgrade::moved_on());
                            }
                        }
                        upgrade::retire(took, reply, controller.effects_mut(), shutdown, api_task)
                            .await;
                        // The sockets, the notify socket, workers.json and the control
                        // socket's path now belong to the next daemon: touch none of them.
                        return Ok(());
                    }
                    Err(e) => {
                        pause_api.send_replace(false);
                        controller.effects_mut().resume_notify();
                        tracing::error!(error = %e, "upgrade failed");
                        events.push(
                            None,
                            None,
                            clusterd_core::event::EventKind::UpgradeFailed,
                            e.clone(),
                        );
                        controller.upgrade_failed();
                        if let Some(reply) = reply {
                            let _ = reply.send(api::ApiReply::Json(
                                hyper::StatusCode::INTERNAL_SERVER_ERROR,
                                serde_json::json!({ "error": e }),
                            ));
                        }
                    }
                }
            }
        }
    }
    controller.into_effects().close_all();

    shutdown.cancel();
    let _ = api_task.await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("clusterd stopped");
    Ok(())
}

fn spawn_signal_handler(tx: mpsc::UnboundedSender<Msg>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr2)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                // SIGHUP (a terminal closing, `systemctl reload`): scan the apps dir,
                // never die of it.
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: scanning the apps dir");
                    let _ = tx.send(Msg::Rescan);
                }
                // SIGUSR2 (nginx's and HAProxy's convention): upgrade to the binary on
                // disk, exactly as `clusterd upgrade`; the outcome goes to the log.
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrading to the binary on disk");
                    let _ = tx.send(Msg::Upgrade(None));
                }
            }
        }
        let _ = tx.send(Msg::Shutdown);
    });
}

/// Tells systemd (Type=notify) that the daemon is up; a no-op elsewhere.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = PathBuf::from(path);
    let result = if let Some(abstract_name) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(b"READY=1\nSTATUS=reconciling\n", &addr))
    } else {
        sock.send_to(b"READY=1\nSTATUS=reconciling\n", &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify READY=1");
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CLUSTERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd the journal adds timestamps; elsewhere keep them.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match (json, under_journal) {
        (true, _) => builder.json().init(),
        (false, true) => builder.without_time().init(),
        (false, false) => builder.init(),
    }
}

//! `clusterd daemon`: wiring of the watcher, the control API, the notify socket and the
//! reconcile loop. The loop (`reconcile`) owns all app and worker state; everything else
//! only sends it messages.

mod api;
mod events;
mod process;
mod reconcile;
mod state;
mod status;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clusterd_core::plan::{AppName, ExitReason, WorkerId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cli::{DaemonArgs, LogFormat, Paths};

pub use events::rfc3339;

/// Everything that wakes the reconcile loop. Each one only means "look again"; the loop
/// re-plans from the whole picture.
#[derive(Debug)]
pub enum Msg {
    /// Something changed in the apps dir.
    ManifestsChanged,
    /// A worker's process group leader exited.
    Exited {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
        /// How.
        reason: ExitReason,
    },
    /// A readiness signal (ipc message or probe success) for a worker.
    Ready {
        /// App.
        app: AppName,
        /// Worker.
        id: WorkerId,
    },
    /// `READY=1` on the notify socket from this (verified) process group.
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
    /// A control API request.
    Api(api::ApiRequest, oneshot::Sender<api::ApiReply>),
    /// SIGTERM or SIGINT: drain everything and exit.
    Shutdown,
    /// Nothing in particular: look again (a drain finished, a timer in a helper task).
    Wake,
    /// A GitOps sync attempt finished.
    Synced(Box<clusterd_runtime::gitops::SyncReport>),
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
    /// Periodic full rescan, a backstop for missed inotify events.
    pub rescan_every: Duration,
    /// GitOps: follow a git repository into the apps dir.
    pub git: Option<clusterd_runtime::gitops::GitOpsConfig>,
}

/// Runs the daemon until SIGTERM/SIGINT, then drains every app and exits 0.
///
/// # Errors
/// Start-up failures (directories, the control socket) are reported and exit non-zero.
pub fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.log_format);
    let defaults = Paths::defaults();
    // Absolute paths: workers run in their manifest's directory (NOTIFY_SOCKET lives in
    // the state dir), and `clusterd logs` reads the log dir from another working dir.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let config = Config {
        apps_dir: absolute(args.apps_dir.unwrap_or(defaults.apps_dir)),
        socket: absolute(args.socket.unwrap_or(defaults.socket)),
        state_dir: absolute(args.state_dir.unwrap_or(defaults.state_dir)),
        log_dir: absolute(args.log_dir.unwrap_or(defaults.log_dir)),
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
        rescan_every: Duration::from_secs(10),
        git: None,
    };
    let mut config = config;
    if let Some(repo) = args.git_repo {
        let path = args.git_path.unwrap_or_default();
        let mut git = clusterd_runtime::gitops::GitOpsConfig::new(
            repo,
            args.git_ref,
            path,
            config.apps_dir.clone(),
            config.state_dir.clone(),
        );
        git.interval = crate::cli::parse_duration_arg(&args.git_interval)?;
        config.git = Some(git);
    }
    for dir in [&config.apps_dir, &config.state_dir, &config.log_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(config.cpus))
        .enable_all()
        .thread_name("clusterd")
        .build()
        .context("tokio runtime")?;
    rt.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Threads of the daemon's runtime: `CLUSTERD_THREADS`, or one per usable CPU (at most
/// 4). The daemon is mostly idle; only the http/tcp proxies need more than one.
fn runtime_threads(cpus: u32) -> usize {
    std::env::var("CLUSTERD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or_else(|| cpus.clamp(1, 4) as usize)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let events = events::EventLog::new();

    let control = api::bind(&config.socket)
        .with_context(|| format!("binding the control socket {}", config.socket.display()))?;
    let _watch = match watch::watch(&config.apps_dir, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %config.apps_dir.display(), "cannot watch the apps dir; rescanning every {:?}", config.rescan_every);
            None
        }
    };
    let api_task = tokio::spawn(api::serve(
        control,
        tx.clone(),
        events.clone(),
        shutdown.clone(),
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
    let controller = reconcile::Controller::new(config.clone(), tx.clone(), events, sync_trigger)?;
    tracing::info!(apps_dir = %config.apps_dir.display(), socket = %config.socket.display(), cpus = config.cpus, "clusterd started");
    notify_systemd_ready();
    controller.run(rx).await;

    shutdown.cancel();
    let _ = api_task.await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("clusterd stopped");
    Ok(())
}

fn spawn_signal_handler(tx: mpsc::UnboundedSender<Msg>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
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

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CLUSTERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd the journal adds timestamps; elsewhere keep them.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

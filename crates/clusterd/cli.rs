//! Command-line parsing and dispatch. Exit codes: 0 success, 1 "the thing you asked
//! about is not fine" (invalid manifest, failed rollout, diff found changes), 2 usage or
//! operational errors (like `kubectl diff` and `grep`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::Client;
use crate::output::Format;
use crate::{daemon, import_pm2, manual, output, top};

/// clusterd: N workers behind one port, rolling reloads, for any language.
#[derive(Debug, Parser)]
#[command(name = "clusterd", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: watch the apps dir and make the host match it.
    Daemon(DaemonArgs),
    /// Show apps (or one app's instances).
    Status {
        /// Only this app, with its instances.
        app: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Rolling restart: replace every worker with a fresh one of the same revision.
    Reload {
        /// The app to reload.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        app: Option<String>,
        /// Reload every app.
        #[arg(long)]
        all: bool,
        /// Return at once instead of waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (e.g. 5m).
        #[arg(long, default_value = "10m")]
        timeout: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Validate, then install manifests into the daemon's apps dir atomically.
    Apply {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The apps dir (default: the daemon's default for this user).
        #[arg(long, env = "CLUSTERD_APPS_DIR")]
        apps_dir: Option<PathBuf>,
    },
    /// Show what `apply` would change. Exit 0: nothing, 1: changes, 2: error.
    Diff {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The apps dir (default: the daemon's default for this user).
        #[arg(long, env = "CLUSTERD_APPS_DIR")]
        apps_dir: Option<PathBuf>,
    },
    /// Check manifests offline; errors as file:line:column.
    Validate {
        /// Manifest files (or directories).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print an app's worker logs.
    Logs {
        /// App.
        app: String,
        /// Only this instance index.
        #[arg(long)]
        instance: Option<u32>,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines from the end of each log.
        #[arg(long, default_value_t = 100)]
        tail: usize,
        /// The log dir (default: ask the daemon).
        #[arg(long)]
        log_dir: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the daemon's events (reconcile actions, readiness, crashes, invalid manifests).
    Events {
        /// Only this app.
        app: Option<String>,
        /// Keep printing new events.
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Ask the daemon to fetch its git repository now.
    Sync {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Replace the running daemon with the binary now on disk, keeping every worker and
    /// every open port (also: SIGUSR2 to the daemon). Exit 1 if the new binary did not
    /// take over (the old daemon keeps running).
    Upgrade {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Export manifests for another platform.
    Export {
        #[command(subcommand)]
        target: ExportTarget,
    },
    /// Live view of apps and workers: phase, pids, CPU, memory, restarts (q quits).
    Top {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write clusterd manifests from another tool's configuration.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    Man {
        /// Write clusterd.1 and clusterd-COMMAND.1 here instead of printing clusterd.1.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Internal: the exec shim between the daemon's fork and the worker's exec.
    #[command(name = "__exec", hide = true)]
    Exec {
        /// Shim arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum ExportTarget {
    /// A Deployment and a Service per app.
    Kubernetes {
        /// Manifest files (or directories).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Container image for every app.
        #[arg(long)]
        image: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImportSource {
    /// A PM2 ecosystem file (ecosystem.config.js/.cjs/.mjs through node, .json, .yaml,
    /// or the output of `pm2 jlist`).
    Pm2 {
        /// The ecosystem file.
        file: PathBuf,
        /// Write one manifest per app into this directory (default: print them).
        #[arg(short = 'o', long = "output-dir")]
        output_dir: Option<PathBuf>,
        /// Also apply the `env_NAME` block of each app (like `pm2 start --env NAME`).
        #[arg(long = "env")]
        env_name: Option<String>,
        /// Overwrite existing files in the output directory.
        #[arg(long)]
        force: bool,
    },
}

/// Where the daemon's files live.
#[derive(Debug, Args, Clone)]
pub struct DaemonArgs {
    /// Directory of app manifests.
    #[arg(long)]
    pub apps_dir: Option<PathBuf>,
    /// Control socket path.
    #[arg(long, env = "CLUSTERD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// State dir (worker records for adoption, notify socket).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Worker log dir.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Follow this git repository (GitOps).
    #[arg(long, requires = "git_path")]
    pub git_repo: Option<String>,
    /// Branch, tag or commit to follow.
    #[arg(long, default_value = "main")]
    pub git_ref: String,
    /// Directory inside the repository holding the manifests.
    #[arg(long)]
    pub git_path: Option<PathBuf>,
    /// How often to fetch.
    #[arg(long, default_value = "1m")]
    pub git_interval: String,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl DaemonArgs {
    /// The daemon's options, with defaults for the current user filled in.
    ///
    /// # Errors
    /// A bad `--git-interval`.
    pub fn into_options(self) -> anyhow::Result<daemon::Options> {
        let defaults = Paths::defaults();
        let git = match self.git_repo {
            Some(repo) => Some((
                repo,
                self.git_ref,
                self.git_path.unwrap_or_default(),
                parse_duration_arg(&self.git_interval)?,
            )),
            None => None,
        };
        Ok(daemon::Options {
            apps_dir: self.apps_dir.unwrap_or(defaults.apps_dir),
            socket: self.socket.unwrap_or(defaults.socket),
            state_dir: self.state_dir.unwrap_or(defaults.state_dir),
            log_dir: self.log_dir.unwrap_or(defaults.log_dir),
            json_logs: self.log_format == LogFormat::Json,
            git,
        })
    }
}

/// Daemon log format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// journald-friendly text (no colours, no timestamps under systemd).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args, Clone)]
struct ConnArgs {
    /// Control socket of the daemon.
    #[arg(long, env = "CLUSTERD_SOCKET")]
    socket: Option<PathBuf>,
}

impl ConnArgs {
    fn client(&self) -> Client {
        Client::new(
            self.socket
                .clone()
                .unwrap_or_else(|| Paths::defaults().socket),
        )
    }
}

/// Default file locations: system paths as root, XDG paths otherwise.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Manifests.
    pub apps_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// State.
    pub state_dir: PathBuf,
    /// Worker logs.
    pub log_dir: PathBuf,
}

impl Paths {
    /// The defaults for the current user.
    pub fn defaults() -> Paths {
        if nix::unistd::geteuid().is_root() {
            return Paths {
                apps_dir: "/etc/clusterd/apps".into(),
                socket: "/run/clusterd/clusterd.sock".into(),
                state_dir: "/var/lib/clusterd".into(),
                log_dir: "/var/log/clusterd".into(),
            };
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let xdg = |var: &str, fallback: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map_or_else(|| home.join(fallback), PathBuf::from)
        };
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(
                || PathBuf::from(format!("/tmp/clusterd-{}", nix::unistd::getuid())),
                |d| PathBuf::from(d).join("clusterd"),
            );
        let state = xdg("XDG_STATE_HOME", ".local/state").join("clusterd");
        Paths {
            apps_dir: xdg("XDG_CONFIG_HOME", ".config").join("clusterd/apps"),
            socket: runtime.join("clusterd.sock"),
            log_dir: state.join("logs"),
            state_dir: state,
        }
    }
}

/// Parses arguments and runs the command.
pub fn run() -> ExitCode {
    // The shim must not pay for clap or anything else: it runs between fork and the app.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "__exec") {
        clusterd_runtime::shim::run_shim(std::env::args_os().skip(2));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clusterd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Daemon(args) => {
            // Before anything sizes itself from the fd limit (the proxies' connection caps).
            if let Err(e) = clusterd_runtime::accept::raise_nofile_limit() {
                eprintln!("clusterd: warning: cannot raise the open-files limit: {e}");
            }
            // Before any worker exists: the daemon becomes a child subreaper, so orphans of
            // worker trees stay under it (and are reaped), as do all orphans when PID 1.
            clusterd_runtime::reaper::start()?;
            daemon::run(args.into_options()?)
        }
        Command::Status {
            app,
            output: fmt,
            conn,
        } => output::status(&conn.client(), app.as_deref(), fmt),
        Command::Reload {
            app,
            all,
            no_wait,
            timeout,
            conn,
        } => {
            let timeout = parse_duration_arg(&timeout)?;
            output::reload(&conn.client(), app.as_deref(), all, no_wait, timeout)
        }
        Command::Validate { files } => output::validate(&files),
        Command::Apply { files, apps_dir } => output::apply(
            &files,
            &apps_dir.unwrap_or_else(|| Paths::defaults().apps_dir),
        ),
        Command::Diff { files, apps_dir } => output::diff(
            &files,
            &apps_dir.unwrap_or_else(|| Paths::defaults().apps_dir),
        ),
        Command::Logs {
            app,
            instance,
            follow,
            tail,
            log_dir,
            conn,
        } => output::logs(
            &conn.client(),
            log_dir.as_deref(),
            &app,
            instance,
            follow,
            tail,
        ),
        Command::Events { app, follow, conn } => {
            output::events(&conn.client(), app.as_deref(), follow)
        }
        Command::Sync { conn } => output::sync(&conn.client()),
        Command::Upgrade { conn } => output::upgrade(&conn.client()),
        Command::Export {
            target: ExportTarget::Kubernetes { files, image },
        } => output::export_kubernetes(&files, image.as_deref()),
        Command::Top { conn } => top::run(&conn.client()),
        Command::Import {
            source:
                ImportSource::Pm2 {
                    file,
                    output_dir,
                    env_name,
                    force,
                },
        } => import_pm2::run(&file, output_dir.as_deref(), env_name.as_deref(), force),
        Command::Completions { shell } => {
            manual::completions(<Cli as clap::CommandFactory>::command(), shell)
        }
        Command::Man { out_dir } => {
            manual::man(<Cli as clap::CommandFactory>::command(), out_dir.as_deref())
        }
        Command::Exec { .. } => unreachable!("handled before clap"),
    }
}

/// Parses a duration flag like `10s` with the manifest's rules.
pub fn parse_duration_arg(text: &str) -> anyhow::Result<Duration> {
    clusterd_core::model::parse_duration(text).map_err(|e| anyhow::anyhow!(e))
}

//! The exec shim: the tiny program that runs between `fork` and the worker's `exec`.
//!
//! Why a separate exec step instead of doing everything in `pre_exec`:
//! - `LISTEN_PID` must equal the worker's own pid, which is only known after the fork; the
//!   environment of an `execve` is fixed by the parent, so the child must set it itself
//!   and exec again.
//! - Between fork and exec in a multi-threaded daemon only async-signal-safe calls are
//!   allowed: no `getpwnam` (user lookup), no allocation, no formatted errors. The shim is a
//!   fresh single-threaded process where all of that is fine.
//! - std's `Command` keeps an internal `CLOEXEC` pipe open in the child at an fd number we
//!   cannot know; `dup2` onto 3, 4, ... in `pre_exec` could clobber it. So the daemon only
//!   clears `FD_CLOEXEC` on its own descriptors in `pre_exec` (and calls `setsid`), and the
//!   shim, where nothing else is open, moves them to 3, 4, ... .
//!
//! The daemon runs `<program> <args...> <config-json> <argv...>`, normally
//! `/proc/self/exe __exec ...` ([`ShimCommand::current_exe`]); the binary's `main` must
//! call [`run_shim`] with the arguments after `__exec`, first thing, before starting any
//! thread or runtime.
//!
//! The shim also marks every other descriptor close-on-exec, so nothing the daemon
//! inherited from its own parent leaks into workers.
//!
//! Setup errors are written to a `CLOEXEC` status pipe (the daemon reads it until EOF:
//! EOF without data means the exec succeeded) and to stderr (the worker's log), and the
//! shim exits with 127.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to start the shim: a program and the arguments that come before the shim's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimCommand {
    /// The program to exec (e.g. `/proc/self/exe`).
    pub program: PathBuf,
    /// Leading arguments (e.g. `["__exec"]`).
    pub args: Vec<OsString>,
}

impl ShimCommand {
    /// The daemon's own binary with the `__exec` entry: `/proc/self/exe __exec`.
    /// `/proc/self/exe` still works when the binary on disk was replaced by an upgrade.
    pub fn current_exe() -> Self {
        ShimCommand {
            program: PathBuf::from("/proc/self/exe"),
            args: vec![OsString::from("__exec")],
        }
    }

    /// A standalone shim binary whose arguments are exactly the shim's (no leading args).
    pub fn program(program: impl Into<PathBuf>) -> Self {
        ShimCommand {
            program: program.into(),
            args: Vec::new(),
        }
    }
}

/// Resource limits applied with `setrlimit` (soft = hard = value) before exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    /// RLIMIT_NOFILE.
    pub nofile: Option<u64>,
    /// RLIMIT_NPROC.
    pub nproc: Option<u64>,
    /// RLIMIT_CORE in bytes.
    pub core: Option<u64>,
    /// Soft RLIMIT_NOFILE only, when `nofile` is unset: the daemon's soft limit from
    /// before it raised its own ([`crate::accept::original_nofile_soft`]), so workers
    /// start with the limit they would have had without clusterd.
    #[serde(default)]
    pub nofile_soft: Option<u64>,
}

impl From<&clusterd_core::model::Limits> for Rlimits {
    fn from(l: &clusterd_core::model::Limits) -> Self {
        Rlimits {
            nofile: l.nofile,
            nproc: l.nproc,
            core: l.core.map(|s| s.0),
            nofile_soft: None,
        }
    }
}

/// What the shim must do before exec; serialized as one JSON argument.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimConfig {
    /// `(fd as inherited, fd the worker must see)`, e.g. listeners to 3, 4, ... .
    pub fds: Vec<(RawFd, RawFd)>,
    /// Write end of the status pipe, if any.
    pub status_fd: Option<RawFd>,
    /// Set `LISTEN_PID` to the shim's (= the worker's) pid.
    pub set_listen_pid: bool,
    /// Limits to apply.
    pub rlimits: Rlimits,
    /// Join this cgroup (write our pid to its `cgroup.procs`).
    pub cgroup: Option<PathBuf>,
    /// Also join these (cgroup v1 leaves on hybrid hosts: the pids controller for
    /// `limits.nproc`).
    #[serde(default)]
    pub extra_cgroups: Vec<PathBuf>,
    /// Drop to this user (root only).
    pub user: Option<String>,
    /// Primary group (default: the user's).
    pub group: Option<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Shared listener mode: install the bind filter right before exec and send its
    /// notification fd over this unix socket ([`crate::seccomp`]).
    #[serde(default)]
    pub seccomp_socket: Option<RawFd>,
    /// Put the worker's stdout and stderr through a pipe to a small logger process that
    /// writes each line to the log (the shim's stdout) with a timestamp prefix; see
    /// [`crate::logs`].
    #[serde(default)]
    pub timestamps: bool,
}

/// Builds the full argument list after `program`: leading args, config, argv.
pub(crate) fn shim_args(
    shim: &ShimCommand,
    config: &ShimConfig,
    argv: &[OsString],
) -> Result<Vec<OsString>> {
    let json = serde_json::to_string(config)
        .map_err(|e| Error::InvalidSpec(format!("shim config: {e}")))?;
    let mut out = shim.args.clone();
    out.push(OsString::from(json));
    out.extend(argv.iter().cloned());
    Ok(out)
}

/// The shim's entry point: `args` are the arguments after the leading ones (config JSON,
/// then the worker's argv). Never returns on success (the process becomes the worker);
/// on failure it reports and exits with 127.
pub fn run_shim<I>(args: I) -> !
where
    I: IntoIterator<Item = OsString>,
{
    let mut args = args.into_iter();
    let config: ShimConfig = match args
        .next()
        .map(|a| serde_json::from_str(&a.to_string_lossy()))
    {
        Some(Ok(c)) => c,
        Some(Err(e)) => fail(
            None,
            &format!("clusterd exec shim: bad config argument: {e}"),
        ),
        None => fail(
            None,
            "clusterd exec shim: missing config argument (internal entry point)",
        ),
    };
    let argv: Vec<OsString> = args.collect();
    let extra: Vec<RawFd> = config
        .status_fd
        .into_iter()
        .chain(config.seccomp_socket)
        .collect();
    let mut kept = match remap_fds(&config.fds, &extra) {
        Ok(s) => s.into_iter(),
        Err(e) => fail(
            None,
            &format!("moving inherited file descriptors failed: {e}"),
        ),
    };
    let status = config.status_fd.and_then(|_| kept.next());
    let seccomp_socket = config.seccomp_socket.and_then(|_| kept.next());
    let status = status.as_ref();
    if argv.is_empty() {
        fail(status, "empty command");
    }
    reset_signals();
    if config.set_listen_pid {
        // Single-threaded fresh process: nothing else reads the environment concurrently.
        std::env::set_var("LISTEN_PID", std::process::id().to_string());
    }
    if let Err(e) = apply_rlimits(&config.rlimits) {
        fail(status, &e);
    }
    for cg in config.cgroup.iter().chain(&config.extra_cgroups) {
        let procs = cg.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            fail(
                status,
                &format!("joining cgroup {} failed: {e}", cg.display()),
            );
        }
    }
    match resolve_credentials(config.user.as_deref(), config.group.as_deref()) {
        Ok(Some(creds)) => {
            if let Err(e) = creds.apply() {
                fail(status, &e);
            }
        }
        Ok(None) => {}
        Err(e) => fail(status, &e.to_string()),
    }
    if let Some(cwd) = &config.cwd {
        if let Err(e) = std::env::set_current_dir(cwd) {
            fail(
                status,
                &format!("chdir to `{}` failed: {}", cwd.display(), errno_text(&e)),
            );
        }
    }
    if config.timestamps {
        if let Err(e) = start_logger() {
            fail(status, &format!("starting the log timestamper failed: {e}"));
        }
    }
    if let Some(sock) = seccomp_socket {
        // Last step before exec: from here on this process's bind/listen wait for the
        // daemon, and nothing below binds.
        let sent = crate::seccomp::install_bind_filter()
            .and_then(|filter| crate::seccomp::send_fd(sock.as_fd(), &filter));
        if let Err(e) = sent {
            fail(
                status,
                &format!(
                    "installing the shared-listener seccomp filter failed: {} (mode: shared needs Linux 5.9 or newer with seccomp; expected mode: inherit or http here)",
                    errno_text(&e)
                ),
            );
        }
        drop(sock);
    }
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    fail(
        status,
        &format!(
            "exec of `{}` failed: {}",
            argv[0].to_string_lossy(),
            errno_text(&err)
        ),
    )
}

/// The name (`comm`) of the timestamper process, as `ps` and `/proc/PID/comm` show it.
pub const TIMESTAMPER_NAME: &str = "clusterd-log";

/// Starts the log timestamper: a grandchild (so it is never the worker's child, which
/// apps that reap every child would not expect) that reads a pipe and writes each line,
/// prefixed with the time it arrived, to what is now stdout (the log file). The shim's
/// stdout and stderr then become the pipe.
///
/// The timestamper stays in the worker's process group and cgroup, ignores the stop
/// signals (the worker's graceful shutdown must not lose its last words), and exits when
/// every writer has closed the pipe: with the worker and whatever it left behind. A
/// SIGKILL of the group takes it down with the worker.
fn start_logger() -> std::io::Result<()> {
    use nix::sys::wait::waitpid;
    use nix::unistd::{fork, ForkResult};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the shim is single-threaded (it starts no thread or runtime), so the child
    // may do anything the parent could.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(w);
            // SAFETY: as above; the intermediate child exits at once below.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    // Keep only the pipe and the log: the daemon waits for EOF on the
                    // status pipe (and on a Node IPC channel) to learn what the worker
                    // did, and the listeners belong to the worker alone.
                    let keep = [1, std::os::fd::AsRawFd::as_raw_fd(&r)];
                    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
                        .map(|d| {
                            d.flatten()
                                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                                .collect()
                        })
                        .unwrap_or_default();
                    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
                        // SAFETY: closing descriptors this process will never use; the
                        // directory's own fd may already be gone (EBADF, harmless).
                        unsafe { libc::close(fd) };
                    }
                    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
                    // bytes; `ps` then shows what this process is.
                    unsafe { libc::prctl(libc::PR_SET_NAME, c"clusterd-log".as_ptr()) };
                    for sig in [
                        libc::SIGTERM,
                        libc::SIGINT,
                        libc::SIGHUP,
                        libc::SIGQUIT,
                        libc::SIGUSR1,
                        libc::SIGUSR2,
                        libc::SIGWINCH,
                        libc::SIGTSTP,
                    ] {
                        // SAFETY: SIG_IGN installs no handler.
                        unsafe { libc::signal(sig, libc::SIG_IGN) };
                    }
                    crate::logs::timestamp_lines(r, std::io::stdout().lock());
                    std::process::exit(0)
                }
                _ => std::process::exit(0),
            }
        }
        ForkResult::Parent { child } => {
            let _ = waitpid(child, None);
            drop(r);
            for target in [1, 2] {
                // SAFETY: `w` and `target` are valid descriptors of this process.
                if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&w), target) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        }
    }
}

/// Reports a setup failure on stderr (the worker's log) and the status pipe, exits 127.
fn fail(status: Option<&OwnedFd>, message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "clusterd: {message}");
    if let Some(fd) = status {
        let _ = nix::unistd::write(fd, message.as_bytes());
    }
    std::process::exit(127)
}

/// "No such file or directory" instead of "No such file or directory (os error 2)".
pub(crate) fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// Moves inherited descriptors to their targets with `FD_CLOEXEC` cleared, even when a
/// source already is its target (`dup2(3, 3)` would leave the flag set). Every source is
/// first duplicated above all involved numbers, so sources and targets may overlap in any
/// order. Returns the `extra` descriptors (status pipe, seccomp socket) in their order, at
/// high, `CLOEXEC` numbers.
fn remap_fds(pairs: &[(RawFd, RawFd)], extra: &[RawFd]) -> std::io::Result<Vec<OwnedFd>> {
    let base = pairs
        .iter()
        .flat_map(|&(s, t)| [s, t])
        .chain(extra.iter().copied())
        .max()
        .unwrap_or(2)
        .max(2)
        + 1;
    let dup_high = |fd: RawFd| -> std::io::Result<RawFd> {
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd` and returns a new descriptor we own.
        let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let mut tmps = Vec::with_capacity(pairs.len());
    for &(src, _) in pairs {
        tmps.push(dup_high(src)?);
    }
    let extra_tmp = extra
        .iter()
        .map(|&fd| dup_high(fd))
        .collect::<std::io::Result<Vec<RawFd>>>()?;
    let targets: Vec<RawFd> = pairs.iter().map(|&(_, t)| t).collect();
    for src in pairs.iter().map(|&(s, _)| s).chain(extra.iter().copied()) {
        if !targets.contains(&src) {
            // SAFETY: `src` was handed to us by the daemon and is not used again; a
            // failure (already closed) is harmless.
            unsafe { libc::close(src) };
        }
    }
    for (&tmp, &target) in tmps.iter().zip(&targets) {
        // SAFETY: both are valid descriptors of this process; dup2 to a different number
        // gives `target` a clear FD_CLOEXEC flag.
        if unsafe { libc::dup2(tmp, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `tmp` is ours and no longer needed.
        unsafe { libc::close(tmp) };
    }
    cloexec_all_but(&targets)?;
    Ok(extra_tmp
        .into_iter()
        // SAFETY: each is a fresh descriptor owned by nothing else.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Marks every descriptor above 2 except `keep` close-on-exec, so that descriptors the
/// daemon itself inherited without `FD_CLOEXEC` (from a shell, a CI runner, a supervisor)
/// never reach a worker. The status pipe is already close-on-exec and stays usable until
/// the exec.
fn cloexec_all_but(keep: &[RawFd]) -> std::io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: setting FD_CLOEXEC touches no memory; an fd that is already gone
            // (the directory's own) just fails with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Restores default dispositions: ignored signals stay ignored across exec, and the
/// daemon's Rust runtime ignores SIGPIPE; a worker must start with the defaults.
fn reset_signals() {
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting SIG_DFL installs no handler; invalid numbers just fail.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

fn apply_rlimits(l: &Rlimits) -> std::result::Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let items = [
        (Resource::RLIMIT_NOFILE, l.nofile, "nofile"),
        (Resource::RLIMIT_NPROC, l.nproc, "nproc"),
        (Resource::RLIMIT_CORE, l.core, "core"),
    ];
    if let (None, Some(soft)) = (l.nofile, l.nofile_soft) {
        // Lowering a soft limit never needs a privilege; a failure leaves the raised one.
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard);
        }
    }
    for (res, value, name) in items {
        let Some(v) = value else { continue };
        if setrlimit(res, v, v).is_ok() {
            continue;
        }
        // Without CAP_SYS_RESOURCE the hard limit cannot be raised; a soft limit up to
        // the current hard one is still fine.
        let (_, hard) = getrlimit(res).map_err(|e| format!("getrlimit({name}): {e}"))?;
        if v <= hard {
            setrlimit(res, v, hard).map_err(|e| format!("setting limit {name}={v} failed: {e}"))?;
        } else {
            return Err(format!(
                "setting limit {name}={v} failed: above the hard limit {hard} and clusterd may not raise it"
            ));
        }
    }
    Ok(())
}

/// A resolved `user:`/`group:` switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (for `initgroups` and USER/LOGNAME).
    pub name: String,
    /// Target uid.
    pub uid: u32,
    /// Target primary gid.
    pub gid: u32,
    /// Home directory (HOME).
    pub home: PathBuf,
}

impl Credentials {
    /// initgroups, setgid, setuid (in that order: after setuid the others are refused),
    /// then HOME/USER/LOGNAME. Shim only.
    fn apply(&self) -> std::result::Result<(), String> {
        use nix::unistd::{initgroups, setgid, setuid, Gid, Uid};
        let cname = CString::new(self.name.clone()).map_err(|e| e.to_string())?;
        initgroups(&cname, Gid::from_raw(self.gid))
            .map_err(|e| format!("initgroups for user `{}` failed: {}", self.name, e.desc()))?;
        setgid(Gid::from_raw(self.gid))
            .map_err(|e| format!("setgid({}) failed: {}", self.gid, e.desc()))?;
        setuid(Uid::from_raw(self.uid))
            .map_err(|e| format!("setuid({}) failed: {}", self.uid, e.desc()))?;
        std::env::set_var("HOME", &self.home);
        std::env::set_var("USER", &self.name);
        std::env::set_var("LOGNAME", &self.name);
        Ok(())
    }
}

/// Resolves `user`/`group` against the passwd and group databases.
///
/// Returns `None` when nothing must change (no user/group, or they are the current
/// ones). A switch needs root: when the daemon is not root and the request differs from
/// the current identity, this is an error that says so. Called by the daemon before
/// spawning (to fail early, with a clear message) and by the shim.
pub fn resolve_credentials(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>> {
    use nix::unistd::{getegid, geteuid, Group, User};
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let euid = geteuid();
    let pw = match user {
        Some(name) => User::from_name(name)
            .map_err(|e| Error::Privilege(format!("looking up user `{name}` failed: {e}")))?
            .ok_or_else(|| {
                Error::Privilege(format!("user `{name}` does not exist on this host"))
            })?,
        None => User::from_uid(euid)
            .map_err(|e| Error::Privilege(format!("looking up uid {euid} failed: {e}")))?
            .ok_or_else(|| {
                Error::Privilege(format!("the current uid {euid} has no passwd entry"))
            })?,
    };
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .map_err(|e| Error::Privilege(format!("looking up group `{name}` failed: {e}")))?
                .ok_or_else(|| {
                    Error::Privilege(format!("group `{name}` does not exist on this host"))
                })?
                .gid
        }
        None => pw.gid,
    };
    let same = pw.uid == euid && (group.is_none() || gid == getegid());
    if !euid.is_root() {
        if same {
            return Ok(None);
        }
        let what = match (user, group) {
            (Some(u), Some(g)) => format!("user `{u}` and group `{g}`"),
            (Some(u), None) => format!("user `{u}`"),
            (None, Some(g)) => format!("group `{g}`"),
            (None, None) => unreachable!("checked above"),
        };
        return Err(Error::Privilege(format!(
            "{what} requested, but clusterd runs as uid {euid}, not root, and can only run workers as itself (remove `user:`/`group:` or run the daemon as root)"
        )));
    }
    Ok(Some(Credentials {
        name: pw.name,
        uid: pw.uid.as_raw(),
        gid: gid.as_raw(),
        home: pw.dir,
    }))
}

/// Whether `path` names a program that exists (absolute/relative path) or is found on
/// `PATH`. Used by callers that want an early, friendly error; the shim's exec is the
/// authority.
pub fn program_exists(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_roundtrip_and_args_layout() {
        let cfg = ShimConfig {
            fds: vec![(7, 3)],
            set_listen_pid: true,
            ..Default::default()
        };
        let args = shim_args(
            &ShimCommand::current_exe(),
            &cfg,
            &[OsString::from("node"), OsString::from("app.js")],
        )
        .unwrap();
        assert_eq!(args[0], "__exec");
        let back: ShimConfig = serde_json::from_str(args[1].to_str().unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(
            &args[2..],
            &[OsString::from("node"), OsString::from("app.js")]
        );
    }

    #[test]
    fn unknown_user_is_a_clear_error() {
        let e = resolve_credentials(Some("no-such-user-clusterd"), None).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn current_user_needs_no_switch_when_not_root() {
        if nix::unistd::geteuid().is_root() {
            // As root the switch to root is a (harmless) real switch.
            assert!(resolve_credentials(Some("root"), None).unwrap().is_some());
        } else {
            let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
                .unwrap()
                .unwrap();
            assert!(resolve_credentials(Some(&me.name), None).unwrap().is_none());
        }
    }
}

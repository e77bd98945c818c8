//! Per-app validation and normalization of one parsed manifest.
//!
//! Every rule runs and every problem is collected (an author fixes them all in one go).
//! A problem names the YAML path of the offending value; the loader turns the path into
//! `line:column`. On success the spec is normalized for the runtime: command as argv,
//! workingDir absolute-or-as-given joined to the manifest's directory, readiness type
//! resolved, signal names in the `SIGTERM` form.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::error::ManifestError;
use crate::instances::{resolve_instances, MAX_INSTANCES};
use crate::model::{
    Acme, Affinity, AppManifest, AppSpec, CommandLine, Instances, ListenMode, Listener,
    LivenessKind, Protocol, ReadinessKind, SignalName, Tls,
};
use crate::net::Cidr;
use crate::signal::normalize_signal;

/// The only `apiVersion` this release reads.
pub const API_VERSION: &str = "clusterd/v1";

/// Variables clusterd sets for every worker; a manifest may not override them, since the
/// worker would then read a port or socket that is not its own.
pub const RESERVED_ENV: &[&str] = &[
    "CLUSTERD_APP",
    "CLUSTERD_INSTANCE",
    "CLUSTERD_REVISION",
    "CLUSTERD_TREE",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "NODE_CHANNEL_FD",
    "PORT",
];

/// The longest single `NAME=value` (or argument) execve(2) accepts, in bytes, without
/// its NUL: Linux's `MAX_ARG_STRLEN` (32 pages of 4 KiB). A longer one fails every spawn
/// with `E2BIG`.
pub const MAX_EXEC_STRING: usize = 32 * 4096 - 1;

/// What execve(2) accepts for arguments and environment together (strings with their
/// NULs, plus one pointer each): a quarter of the stack limit, 2 MiB with the usual
/// 8 MiB `ulimit -s`.
pub const EXEC_ARG_MAX: usize = 2 * 1024 * 1024;

/// Of [`EXEC_ARG_MAX`], what a manifest may use: the rest is kept for the variables
/// clusterd sets, the environment workers inherit from the daemon, and the exec shim's
/// own arguments.
pub const MANIFEST_EXEC_BUDGET: usize = EXEC_ARG_MAX - 256 * 1024;

/// One problem, at a YAML path (`spec.listen[0].port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Where.
    pub path: String,
    /// Point at the mapping key rather than its value (for problems with the key itself).
    pub at_key: bool,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Issue {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            path: path.into(),
            at_key: false,
            message: message.into(),
        }
    }
    fn at_key(path: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            path: path.into(),
            at_key: true,
            message: message.into(),
        }
    }
}

/// `[a-z0-9-]`, 1..63 characters, no leading or trailing `-` (a DNS label, so names work
/// as hostnames, unit names and file names).
#[must_use]
pub fn is_valid_app_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A listener name usable in `LISTEN_FDNAMES` and as the suffix of `PORT_<NAME>`:
/// a letter, then letters, digits, `_` or `-`; at most 32 characters.
#[must_use]
pub fn is_valid_listener_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 32
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The variable a named listener's port is given in: `PORT_` + the name upper-cased with
/// `-` turned into `_` (`admin-api` -> `PORT_ADMIN_API`).
#[must_use]
pub fn port_env_name(listener_name: &str) -> String {
    format!(
        "PORT_{}",
        listener_name.to_ascii_uppercase().replace('-', "_")
    )
}

/// A POSIX-portable environment variable name.
#[must_use]
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits a command into argv with shell quoting rules, without running a shell.
///
/// # Errors
/// Unbalanced quotes, an empty command, or a shell operator (`|`, `&&`, `>`...) that
/// would silently become a literal argument.
pub fn command_argv(command: &CommandLine) -> Result<Vec<String>, ManifestError> {
    let argv = match command {
        CommandLine::Argv(argv) => argv.clone(),
        CommandLine::Shell(line) => {
            let argv = shell_words::split(line).map_err(|_| ManifestError::UnbalancedQuotes)?;
            if let Some(op) = argv.iter().find(|a| is_shell_operator(a)) {
                return Err(ManifestError::ShellOperator(op.clone()));
            }
            argv
        }
    };
    if argv.first().is_none_or(|program| program.trim().is_empty()) {
        return Err(ManifestError::EmptyCommand);
    }
    Ok(argv)
}

fn is_shell_operator(arg: &str) -> bool {
    matches!(
        arg,
        "|" | "||" | "&&" | "&" | ";" | ">" | ">>" | "<" | "2>" | "2>&1" | "|&"
    )
}

/// Whether two listeners would need the same socket: same port and protocol, and the
/// same address or either one the wildcard (which binds every address).
#[must_use]
pub fn listeners_overlap(a: &Listener, b: &Listener) -> bool {
    if a.port != b.port || a.protocol != b.protocol {
        return false;
    }
    match (a.address.parse::<IpAddr>(), b.address.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        _ => a.address == b.address,
    }
}

/// Describes a listener for messages: `0.0.0.0:8080/tcp`.
#[must_use]
pub fn listener_label(l: &Listener) -> String {
    let proto = match l.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    match l.address.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{}]:{}/{proto}", l.address, l.port),
        _ => format!("{}:{}/{proto}", l.address, l.port),
    }
}

fn mode_name(mode: ListenMode) -> &'static str {
    match mode {
        ListenMode::Http => "http",
        ListenMode::Tcp => "tcp",
        ListenMode::Inherit => "inherit",
        ListenMode::Shared => "shared",
    }
}

/// Problems of `spec` that depend on the host rather than on the manifest: `mode: shared`
/// where the runtime found seccomp user notification unusable (`shared_unavailable` is
/// its reason, naming the kernel). Kept apart from [`validate_manifest`] so an offline
/// check on another machine judges the manifest alone.
#[must_use]
pub fn host_issues(spec: &AppSpec, shared_unavailable: Option<&str>) -> Vec<Issue> {
    let Some(reason) = shared_unavailable else {
        return Vec::new();
    };
    spec.listen
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mode == ListenMode::Shared)
        .map(|(i, _)| {
            Issue::at(
                format!("spec.listen[{i}].mode"),
                format!(
                    "mode `shared` cannot work on this host: {reason} (expected mode: inherit if the app can take its socket as fd 3, or mode: http)"
                ),
            )
        })
        .collect()
}

/// Checks one manifest and normalizes its spec.
///
/// `dir` is the manifest's directory (for a relative or absent `workingDir`); `cpus` the
/// usable CPU count (for `instances`).
///
/// # Errors
/// Every problem found, each at a YAML path.
pub fn validate_manifest(
    m: &AppManifest,
    dir: &Path,
    cpus: u32,
) -> Result<(AppSpec, u32), Vec<Issue>> {
    let mut issues = Vec::new();
    if m.api_version != API_VERSION {
        issues.push(Issue::at(
            "apiVersion",
            format!(
                "unsupported apiVersion `{}` (expected `{API_VERSION}`)",
                m.api_version
            ),
        ));
    }
    if m.kind != "App" {
        issues.push(Issue::at(
            "kind",
            format!("unsupported kind `{}` (expected `App`)", m.kind),
        ));
    }
    if !is_valid_app_name(&m.metadata.name) {
        issues.push(Issue::at(
            "metadata.name",
            format!(
                "invalid app name `{}` (expected 1 to 63 characters of a-z, 0-9 and `-`, not starting or ending with `-`)",
                m.metadata.name
            ),
        ));
    }
    let spec = normalize_spec(&m.spec, dir, &mut issues);
    if issues.is_empty() {
        Ok((spec, resolve_instances(m.spec.instances, cpus)))
    } else {
        Err(issues)
    }
}

/// Bytes execve(2) counts for these strings: each with its NUL, plus a pointer.
fn exec_size(lens: impl Iterator<Item = usize>) -> usize {
    lens.map(|len| len + 1 + std::mem::size_of::<usize>()).sum()
}

#[allow(clippy::too_many_lines)] // one flat list of rules reads better than a split
fn normalize_spec(spec: &AppSpec, dir: &Path, issues: &mut Vec<Issue>) -> AppSpec {
    let mut out = spec.clone();

    match command_argv(&spec.command) {
        Ok(argv) => out.command = CommandLine::Argv(argv),
        Err(e) => issues.push(Issue::at("spec.command", e.to_string())),
    }

    out.working_dir = match &spec.working_dir {
        Some(wd) if wd.as_os_str().is_empty() => {
            issues.push(Issue::at(
                "spec.workingDir",
                "workingDir is empty (expected a directory path)",
            ));
            Some(dir.to_path_buf())
        }
        Some(wd) => Some(dir.join(wd)),
        None => Some(dir.to_path_buf()),
    };

    for (name, value) in &spec.env {
        let path = format!("spec.env.{name}");
        if !is_valid_env_name(name) {
            issues.push(Issue::at_key(
                &path,
                format!("invalid environment variable name `{name}` (expected letters, digits and `_`, not starting with a digit)"),
            ));
        } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("PORT_") {
            issues.push(Issue::at_key(
                &path,
                format!("`{name}` is set by clusterd for each worker (expected another name)"),
            ));
        }
        if value.contains('\0') {
            issues.push(Issue::at(
                &path,
                format!("value of `{name}` contains a NUL byte (expected text)"),
            ));
        }
        let entry = name.len() + 1 + value.len();
        if entry > MAX_EXEC_STRING {
            issues.push(Issue::at(
                &path,
                format!(
                    "`{name}=...` is {entry} bytes, more than the {MAX_EXEC_STRING} bytes execve accepts for one variable (expected a shorter value; pass large data in a file)"
                ),
            ));
        }
    }
    if let CommandLine::Argv(argv) = &out.command {
        for (i, arg) in argv.iter().enumerate() {
            if arg.len() > MAX_EXEC_STRING {
                issues.push(Issue::at(
                    "spec.command",
                    format!(
                        "argument {i} of the command is {} bytes, more than the {MAX_EXEC_STRING} bytes execve accepts for one argument (expected a shorter argument; pass large data in a file)",
                        arg.len()
                    ),
                ));
            }
        }
        let total = exec_size(argv.iter().map(String::len))
            + exec_size(spec.env.iter().map(|(k, v)| k.len() + 1 + v.len()));
        if total > MANIFEST_EXEC_BUDGET {
            issues.push(Issue::at(
                if spec.env.is_empty() { "spec.command" } else { "spec.env" },
                format!(
                    "command and env take {total} bytes to exec, more than the {MANIFEST_EXEC_BUDGET} bytes a manifest may use (execve accepts {EXEC_ARG_MAX} bytes with an 8 MiB stack limit, and clusterd keeps the rest for its own variables and the inherited environment) (expected less; pass large data in a file)"
                ),
            ));
        }
    }

    if let Instances::Count(n) = spec.instances {
        if n > MAX_INSTANCES {
            issues.push(Issue::at(
                "spec.instances",
                format!(
                    "instances {n} is more than {MAX_INSTANCES} (expected N >= 1, `max`, 0 or -K)"
                ),
            ));
        }
    }

    check_listeners(&spec.listen, issues);
    for (i, l) in out.listen.iter_mut().enumerate() {
        if let Some(tls) = &mut l.tls {
            normalize_tls(tls, &format!("spec.listen[{i}].tls"), dir, issues);
        }
    }

    // Readiness: resolve the default, then check the type against the first listener
    // (the one whose private port is in PORT, the one a probe would hit).
    let first_mode = spec.listen.first().map(|l| l.mode);
    let kind = spec.readiness.kind.unwrap_or(match first_mode {
        Some(ListenMode::Http | ListenMode::Tcp) => ReadinessKind::Tcp,
        Some(ListenMode::Shared) => ReadinessKind::Bind,
        Some(ListenMode::Inherit) | None => ReadinessKind::None,
    });
    out.readiness.kind = Some(kind);
    match kind {
        ReadinessKind::Tcp | ReadinessKind::Http => {
            let word = if kind == ReadinessKind::Tcp {
                "tcp"
            } else {
                "http"
            };
            if let Some(message) = probe_target_problem("readiness", word, first_mode) {
                issues.push(Issue::at("spec.readiness.type", message));
            }
            if kind == ReadinessKind::Http
                && !spec
                    .readiness
                    .path
                    .as_deref()
                    .is_some_and(|p| p.starts_with('/'))
            {
                issues.push(Issue::at(
                    "spec.readiness.path",
                    "readiness `http` needs a path starting with `/` (expected e.g. path: /healthz)",
                ));
            }
        }
        ReadinessKind::Delay => {
            if spec.readiness.delay.is_none() {
                issues.push(Issue::at(
                    "spec.readiness",
                    "readiness `delay` needs a delay (expected e.g. delay: 2s)",
                ));
            }
        }
        ReadinessKind::Bind => {
            if !spec.listen.iter().any(|l| l.mode == ListenMode::Shared) {
                issues.push(Issue::at(
                    "spec.readiness.type",
                    "readiness `bind` needs a listener in shared mode (it fires when the worker binds that port; expected notify, ipc, delay or none, or a listener with mode: shared)",
                ));
            }
        }
        ReadinessKind::None | ReadinessKind::Notify | ReadinessKind::Ipc => {}
    }
    if spec.readiness.timeout.0.is_zero() {
        issues.push(Issue::at(
            "spec.readiness.timeout",
            "readiness timeout is 0 (expected a duration above 0, e.g. 30s)",
        ));
    }
    if spec.readiness.period.0.is_zero() {
        issues.push(Issue::at(
            "spec.readiness.period",
            "readiness period is 0 (expected a duration above 0, e.g. 100ms)",
        ));
    }

    if let Some(live) = &spec.liveness {
        let mut live_out = live.clone();
        match live.kind {
            LivenessKind::Tcp | LivenessKind::Http => {
                let word = if live.kind == LivenessKind::Tcp {
                    "tcp"
                } else {
                    "http"
                };
                if let Some(message) = probe_target_problem("liveness", word, first_mode) {
                    issues.push(Issue::at("spec.liveness.type", message));
                }
                if live.kind == LivenessKind::Http
                    && !live.path.as_deref().is_some_and(|p| p.starts_with('/'))
                {
                    issues.push(Issue::at(
                        "spec.liveness.path",
                        "liveness `http` needs a path starting with `/` (expected e.g. path: /healthz)",
                    ));
                }
            }
            LivenessKind::Exec => match live.command.as_ref().map(command_argv) {
                None => issues.push(Issue::at(
                    "spec.liveness",
                    "liveness `exec` needs a command (expected e.g. command: [./check.sh])",
                )),
                Some(Err(e)) => {
                    issues.push(Issue::at("spec.liveness.command", format!("liveness {e}")))
                }
                Some(Ok(argv)) => live_out.command = Some(CommandLine::Argv(argv)),
            },
        }
        if live.failure_threshold == 0 {
            issues.push(Issue::at(
                "spec.liveness.failureThreshold",
                "failureThreshold is 0 (expected 1 or more)",
            ));
        }
        if live.period.0.is_zero() {
            issues.push(Issue::at(
                "spec.liveness.period",
                "liveness period is 0 (expected a duration above 0, e.g. 10s)",
            ));
        }
        if live.timeout.0.is_zero() {
            issues.push(Issue::at(
                "spec.liveness.timeout",
                "liveness timeout is 0 (expected a duration above 0, e.g. 1s)",
            ));
        }
        out.liveness = Some(live_out);
    }

    if spec.rollout.max_surge == 0 && spec.rollout.max_unavailable == 0 {
        issues.push(Issue::at(
            "spec.rollout",
            "maxSurge and maxUnavailable are both 0, so a rollout could never replace a worker (expected maxSurge >= 1 or maxUnavailable >= 1)",
        ));
    }

    match normalize_signal(&spec.shutdown.signal.0) {
        Ok(sig) => out.shutdown.signal = SignalName(sig),
        Err(e) => issues.push(Issue::at("spec.shutdown.signal", e.to_string())),
    }

    let backoff = spec.restart.backoff;
    if backoff.initial.0 < Duration::from_millis(1) {
        issues.push(Issue::at(
            "spec.restart.backoff.initial",
            "backoff initial is below 1ms (expected e.g. 100ms, so a crashing worker cannot spin the CPU)",
        ));
    }
    if backoff.initial > backoff.max {
        issues.push(Issue::at(
            "spec.restart.backoff.max",
            format!(
                "backoff max {} is below initial {} (expected max >= initial)",
                backoff.max, backoff.initial
            ),
        ));
    }

    if spec.limits.memory.is_some_and(|m| m.0 == 0) {
        issues.push(Issue::at(
            "spec.limits.memory",
            "memory limit is 0 (expected a size like 512Mi)",
        ));
    }
    if spec.limits.nofile == Some(0) {
        issues.push(Issue::at(
            "spec.limits.nofile",
            "nofile is 0 (expected a count like 65536)",
        ));
    }
    if spec.limits.nproc == Some(0) {
        issues.push(Issue::at(
            "spec.limits.nproc",
            "nproc is 0 (expected a count like 4096)",
        ));
    }
    if let Some(cpu) = spec.limits.cpu {
        if !(cpu.0.is_finite() && cpu.0 > 0.0 && cpu.0 <= 4096.0) {
            issues.push(Issue::at(
                "spec.limits.cpu",
                format!(
                    "cpu limit {} is out of range (expected CPUs above 0, like 1.5)",
                    cpu.0
                ),
            ));
        }
    }
    for (field, value) in [("user", &spec.user), ("group", &spec.group)] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            issues.push(Issue::at(
                format!("spec.{field}"),
                format!("{field} is empty (expected a name or a numeric id)"),
            ));
        }
    }
    if spec.logs.max_size.0 == 0 {
        issues.push(Issue::at(
            "spec.logs.maxSize",
            "logs maxSize is 0 (expected a size like 10Mi)",
        ));
    }
    if spec.logs.max_files == 0 {
        issues.push(Issue::at(
            "spec.logs.maxFiles",
            "logs maxFiles is 0 (expected 1 or more)",
        ));
    }
    out
}

/// Likely mistakes that do not make the manifest invalid, each at a YAML path.
///
/// Today: a shell variable (`$PORT`, `${PORT}`) in an argv that no shell will run. The
/// worker would get the literal text `$PORT` and typically crash-loop on "invalid port";
/// clusterd's own `$(PORT)` is what expands without a shell. A command that runs a shell
/// itself (`[sh, -c, "... $PORT"]`) is left alone.
#[must_use]
pub fn warnings(spec: &AppSpec) -> Vec<Issue> {
    let mut out = Vec::new();
    let mut check = |command: &CommandLine, base: &str| {
        let Ok(argv) = command_argv(command) else {
            return;
        };
        if runs_a_shell(&argv) {
            return;
        }
        for (i, arg) in argv.iter().enumerate() {
            let Some(name) = shell_variable(arg) else {
                continue;
            };
            let path = match command {
                CommandLine::Argv(_) => format!("{base}[{i}]"),
                CommandLine::Shell(_) => base.to_string(),
            };
            out.push(Issue::at(
                path,
                format!(
                    "`${name}` is passed to the program as written: no shell runs the command, so nothing expands it (expected `$({name})`, which clusterd replaces with the worker's {name})"
                ),
            ));
        }
    };
    check(&spec.command, "spec.command");
    if let Some(cmd) = spec.liveness.as_ref().and_then(|l| l.command.as_ref()) {
        check(cmd, "spec.liveness.command");
    }
    out
}

/// `sh -c ...`, `bash -lc ...` and the like (also behind `env`): the shell expands
/// `$VAR` itself.
fn runs_a_shell(argv: &[String]) -> bool {
    let is_shell = |a: &str| {
        matches!(
            a.rsplit('/').next().unwrap_or(""),
            "sh" | "bash" | "dash" | "zsh" | "ash" | "ksh" | "fish"
        )
    };
    let is_c =
        |a: &str| a.len() > 1 && a.starts_with('-') && !a.starts_with("--") && a.contains('c');
    argv.iter()
        .position(|a| is_shell(a))
        .is_some_and(|i| argv[i + 1..].iter().any(|a| is_c(a)))
}

/// The first `$NAME` or `${NAME}` in `arg` (not clusterd's `$(NAME)`, not `$$`).
fn shell_variable(arg: &str) -> Option<&str> {
    let bytes = arg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'$') {
            i += 2;
            continue;
        }
        let (start, braced) = match bytes.get(i + 1) {
            Some(b'{') => (i + 2, true),
            _ => (i + 1, false),
        };
        let len = arg[start..]
            .bytes()
            .enumerate()
            .take_while(|(k, b)| {
                b.is_ascii_alphabetic() || *b == b'_' || (*k > 0 && b.is_ascii_digit())
            })
            .count();
        let closed = !braced || bytes.get(start + len) == Some(&b'}');
        if len > 0 && closed {
            return Some(&arg[start..start + len]);
        }
        i += 1;
    }
    None
}

/// Why a tcp/http probe cannot work given the first listener's mode, if it cannot.
fn probe_target_problem(what: &str, word: &str, first_mode: Option<ListenMode>) -> Option<String> {
    match first_mode {
        Some(ListenMode::Http | ListenMode::Tcp) => None,
        Some(ListenMode::Inherit) => Some(format!(
            "{what} `{word}` cannot be used with an `inherit` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected notify, ipc or delay)"
        )),
        Some(ListenMode::Shared) => Some(format!(
            "{what} `{word}` cannot be used with a `shared` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected bind, notify, ipc or delay)"
        )),
        None => Some(format!(
            "{what} `{word}` needs a listener in http or tcp mode to probe, and this app has none (expected notify, ipc, delay or none)"
        )),
    }
}

/// Checks `listen[].tls` and resolves its paths against the manifest's directory.
fn normalize_tls(tls: &mut Tls, base: &str, dir: &Path, issues: &mut Vec<Issue>) {
    if let Some(acme) = &mut tls.acme {
        check_acme(acme, &format!("{base}.acme"), dir, issues);
    } else if tls.certificates.is_empty() {
        issues.push(Issue::at(
            format!("{base}.certificates"),
            "no certificates (expected at least one {cert: FILE, key: FILE}; the first is the default, or acme: {domains: [NAME]})",
        ));
    }
    for (j, c) in tls.certificates.iter_mut().enumerate() {
        for (field, path) in [("cert", &mut c.cert), ("key", &mut c.key)] {
            if path.as_os_str().is_empty() {
                issues.push(Issue::at(
                    format!("{base}.certificates[{j}].{field}"),
                    format!("{field} is empty (expected the path of a PEM file)"),
                ));
            } else {
                *path = dir.join(&*path);
            }
        }
    }
}

/// Checks `tls.acme` (names, contact, directory) and resolves `caBundle`.
fn check_acme(acme: &mut Acme, base: &str, dir: &Path, issues: &mut Vec<Issue>) {
    if acme.domains.is_empty() {
        issues.push(Issue::at(
            format!("{base}.domains"),
            "no domains (expected domains: [example.com, www.example.com], the names the certificate covers)",
        ));
    }
    for (j, d) in acme.domains.iter().enumerate() {
        if let Some(problem) = crate::acme::domain_problem(d) {
            issues.push(Issue::at(format!("{base}.domains[{j}]"), problem));
        } else if acme.domains[..j].contains(d) {
            issues.push(Issue::at(
                format!("{base}.domains[{j}]"),
                format!("`{d}` is listed twice (expected each name once)"),
            ));
        }
    }
    if let Some(problem) = acme.email.as_deref().and_then(crate::acme::email_problem) {
        issues.push(Issue::at(format!("{base}.email"), problem));
    }
    if let Some(problem) = acme
        .directory
        .as_deref()
        .and_then(crate::acme::directory_problem)
    {
        issues.push(Issue::at(format!("{base}.directory"), problem));
    }
    if let Some(ca) = &mut acme.ca_bundle {
        if ca.as_os_str().is_empty() {
            issues.push(Issue::at(
                format!("{base}.caBundle"),
                "caBundle is empty (expected the path of a PEM file with the ACME server's CA certificate)",
            ));
        } else {
            *ca = dir.join(&*ca);
        }
    }
}

fn check_listeners(listen: &[Listener], issues: &mut Vec<Issue>) {
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, l) in listen.iter().enumerate() {
        let base = format!("spec.listen[{i}]");
        if !(1..=65535).contains(&l.port) {
            issues.push(Issue::at(
                format!("{base}.port"),
                format!("port {} is out of range (expected 1..65535)", l.port),
            ));
        }
        if l.address.parse::<IpAddr>().is_err() {
            issues.push(Issue::at(
                format!("{base}.address"),
                format!(
                    "invalid address `{}` (expected an IP address like 0.0.0.0, 127.0.0.1 or ::)",
                    l.address
                ),
            ));
        }
        if l.protocol == Protocol::Udp
            && !matches!(l.mode, ListenMode::Inherit | ListenMode::Shared)
        {
            issues.push(Issue::at(
                format!("{base}.protocol"),
                format!(
                    "protocol udp needs mode inherit or shared (the {} proxy carries TCP only; expected mode: inherit or mode: shared)",
                    mode_name(l.mode)
                ),
            ));
        }
        for (j, range) in l.trusted_proxies.iter().enumerate() {
            if let Err(e) = range.parse::<Cidr>() {
                issues.push(Issue::at(
                    format!("{base}.trustedProxies[{j}]"),
                    e.to_string(),
                ));
            }
        }
        if !l.trusted_proxies.is_empty() && l.mode != ListenMode::Http {
            issues.push(Issue::at(
                format!("{base}.trustedProxies"),
                format!(
                    "trustedProxies applies to forwarding headers, which only the http proxy adds (this listener is mode {}; expected mode: http or no trustedProxies)",
                    mode_name(l.mode)
                ),
            ));
        }
        if l.affinity != Affinity::None && !matches!(l.mode, ListenMode::Http | ListenMode::Tcp) {
            issues.push(Issue::at(
                format!("{base}.affinity"),
                format!(
                    "affinity needs the daemon to choose the worker, and in mode {} the kernel does (expected mode: http or tcp, or affinity: none)",
                    mode_name(l.mode)
                ),
            ));
        }
        if l.tls.is_some() && l.mode != ListenMode::Http {
            issues.push(Issue::at_key(
                format!("{base}.tls"),
                format!(
                    "tls is terminated by the http proxy only (this listener is mode {}; expected mode: http, or TLS handled by the workers)",
                    mode_name(l.mode)
                ),
            ));
        }
        if let Some(name) = &l.name {
            if !is_valid_listener_name(name) {
                issues.push(Issue::at(
                    format!("{base}.name"),
                    format!("invalid listener name `{name}` (expected a letter, then letters, digits, `_` or `-`; at most 32 characters)"),
                ));
            } else if let Some(first) = names.insert(port_env_name(name), i) {
                issues.push(Issue::at(
                    format!("{base}.name"),
                    format!(
                        "listener name `{name}` is already used by listener {first} (both would be {}; expected unique names)",
                        port_env_name(name)
                    ),
                ));
            }
        }
        if let Some(j) = listen[..i]
            .iter()
            .position(|other| listeners_overlap(other, l))
        {
            issues.push(Issue::at(
                format!("{base}.port"),
                format!(
                    "{} overlaps listener {j} ({}) of this app (expected each listener on its own port)",
                    listener_label(l),
                    listener_label(&listen[j])
                ),
            ));
        }
    }
}

//! `clusterd import pm2 FILE [-o DIR]`: clusterd manifests from a PM2 ecosystem file.
//!
//! The file is read as PM2 reads it: `ecosystem.config.js`/`.cjs`/`.mjs` is evaluated by
//! node (the only faithful way: ecosystem files are programs), `.json` and `.yaml` are
//! parsed, and the output of `pm2 jlist` is understood too. Each app becomes one
//! manifest. Every PM2 option that has no clusterd counterpart, or whose meaning
//! differs, is reported as a note (on stderr, and as comments at the top of the
//! manifest), and the manifests are checked by the same loader the daemon uses before
//! anything is written, so what this command writes is what `clusterd validate` accepts.
//!
//! The mapping is a pure function ([`convert`]) of the parsed file, tested on real
//! ecosystem files in `tests/fixtures/pm2/` (e2e) and on small values here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{Map, Value};

/// PM2's own cap on `exp_backoff_restart_delay` growth (15 s, lib/God/ActionMethods).
const PM2_MAX_BACKOFF_MS: u64 = 15_000;

/// `clusterd import pm2`.
///
/// # Errors
/// The file cannot be read or evaluated, holds no apps, or the result does not validate.
pub fn run(
    file: &Path,
    out_dir: Option<&Path>,
    env_name: Option<&str>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let value = read_ecosystem(file)?;
    let base_dir = std::path::absolute(file.parent().unwrap_or(Path::new(".")))
        .context("resolving the ecosystem file's directory")?;
    let ctx = ImportOptions {
        base_dir,
        env_name: env_name.map(str::to_string),
        source: file.display().to_string(),
    };
    let apps = convert(&value, &ctx)?;
    let rendered: Vec<(PathBuf, String)> = apps
        .iter()
        .map(|a| {
            let dir = out_dir.unwrap_or(Path::new("."));
            Ok((dir.join(format!("{}.yaml", a.name)), a.render(&ctx.source)?))
        })
        .collect::<anyhow::Result<_>>()?;
    validate(&rendered)?;
    for a in &apps {
        for n in &a.notes {
            eprintln!("{}: {}: {}", a.name, n.field, n.reason);
        }
    }
    match out_dir {
        None => {
            let docs: Vec<&str> = rendered.iter().map(|(_, y)| y.as_str()).collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (path, _) in &rendered {
                if path.exists() && !force {
                    bail!(
                        "{} exists; use --force to overwrite it (nothing written)",
                        path.display()
                    );
                }
            }
            for (path, yaml) in &rendered {
                crate::output::write_atomically(path, yaml.as_bytes())?;
                println!("{}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the generated manifests through the daemon's loader, as one apps dir would.
fn validate(rendered: &[(PathBuf, String)]) -> anyhow::Result<()> {
    let files: Vec<clusterd_core::load::ManifestFile> = rendered
        .iter()
        .map(|(p, y)| clusterd_core::load::ManifestFile::new(p.clone(), y.as_bytes().to_vec()))
        .collect();
    let cpus =
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
    let report = clusterd_core::load::load(
        &files,
        &clusterd_core::load::LoadContext {
            cpus,
            ..Default::default()
        },
    );
    let problems: Vec<String> = report
        .errors
        .values()
        .flatten()
        .map(ToString::to_string)
        .collect();
    if !problems.is_empty() {
        bail!(
            "the generated manifests do not validate (nothing written):\n{}",
            problems.join("\n")
        );
    }
    Ok(())
}

/// Reads an ecosystem file into JSON: through node for JavaScript, else parsed.
fn read_ecosystem(file: &Path) -> anyhow::Result<Value> {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "js" | "cjs" | "mjs" => eval_with_node(file),
        "json" => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}:{}: {e}, expected a PM2 ecosystem file as JSON",
                    file.display(),
                    e.line(),
                    e.column()
                )
            })
        }
        "yaml" | "yml" => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            serde_saphyr::from_str::<Value>(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}, expected a PM2 ecosystem file as YAML",
                    file.display()
                )
            })
        }
        _ => bail!(
            "{}: unknown ecosystem file type, expected .js, .cjs, .mjs, .json, .yaml or .yml",
            file.display()
        ),
    }
}

/// What node runs: load the module as PM2 does (require, or import for ES modules) and
/// print it as JSON. Functions and other non-JSON values drop out, as they would for PM2.
const NODE_LOADER: &str = r#"
const path = require('path');
const file = path.resolve(process.argv[1]);
(async () => {
  let m;
  try { m = require(file); }
  catch (e) {
    if (e.code !== 'ERR_REQUIRE_ESM' && !file.endsWith('.mjs')) throw e;
    m = await import(require('url').pathToFileURL(file).href);
  }
  if (m && m.default !== undefined && m.apps === undefined) m = m.default;
  process.stdout.write(JSON.stringify(m === undefined ? null : m));
})().catch((e) => { console.error(e && e.stack || String(e)); process.exit(1); });
"#;

fn eval_with_node(file: &Path) -> anyhow::Result<Value> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
    let abs = std::path::absolute(file)?;
    let mut cmd = std::process::Command::new("node");
    cmd.arg("-e").arg(NODE_LOADER).arg(&abs);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "{}: running node to evaluate it: {e} (a .js ecosystem file needs node on PATH; or convert it with `pm2 ecosystem`/JSON first)",
            file.display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "{}: node could not evaluate it: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: reading what node printed", file.display()))
}

/// What the mapping needs besides the file.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The ecosystem file's directory: PM2 resolves `cwd` and `script` against it.
    pub base_dir: PathBuf,
    /// `--env NAME`: also apply `env_NAME`.
    pub env_name: Option<String>,
    /// The file as named by the user, for the header comment.
    pub source: String,
}

/// A PM2 option that was not mapped, or whose meaning changed on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The PM2 option.
    pub field: String,
    /// Why, and what to do instead.
    pub reason: String,
}

/// One converted app.
#[derive(Debug, Clone)]
pub struct ImportedApp {
    /// The clusterd name (PM2's, made valid).
    pub name: String,
    /// The manifest.
    pub manifest: Manifest,
    /// What did not map.
    pub notes: Vec<Note>,
}

impl ImportedApp {
    /// The manifest as YAML, with the notes as comments above it.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn render(&self, source: &str) -> anyhow::Result<String> {
        let mut out =
            format!("# Imported from the PM2 ecosystem file {source} by `clusterd import pm2`.\n");
        if !self.notes.is_empty() {
            out.push_str("# Not mapped, or mapped with a difference:\n");
            for n in &self.notes {
                out.push_str(&format!("#   {}: {}\n", n.field, n.reason));
            }
        }
        out.push_str(&serde_saphyr::to_string(&self.manifest).context("rendering YAML")?);
        Ok(out)
    }
}

/// A clusterd manifest, only the fields an import can fill, in the reference's order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Clone, Serialize)]
struct Metadata {
    name: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    command: Vec<String>,
    working_dir: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    instances: InstancesOut,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listen: Vec<ListenOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness: Option<ReadinessOut>,
    shutdown: ShutdownOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart: Option<RestartOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<LimitsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
enum InstancesOut {
    Count(i64),
    Word(&'static str),
}

#[derive(Debug, Clone, Serialize)]
struct ListenOut {
    port: u16,
    mode: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct ReadinessOut {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ShutdownOut {
    signal: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct RestartOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff: Option<BackoffOut>,
}

#[derive(Debug, Clone, Serialize)]
struct BackoffOut {
    initial: String,
    max: String,
}

#[derive(Debug, Clone, Serialize)]
struct LimitsOut {
    memory: String,
}

/// Options that have no clusterd counterpart, and why (shown to the user).
const UNMAPPED: &[(&str, &str)] = &[
    ("watch", "clusterd does not restart on file changes; roll a new revision with `clusterd reload APP` from your deploy step"),
    ("ignore_watch", "goes with watch, which is not supported"),
    ("watch_options", "goes with watch, which is not supported"),
    ("watch_delay", "goes with watch, which is not supported"),
    ("cron_restart", "no scheduled restarts; use a systemd timer running `clusterd reload APP`"),
    ("merge_logs", "clusterd keeps one log per instance; `clusterd logs APP` merges them when reading"),
    ("combine_logs", "clusterd keeps one log per instance; `clusterd logs APP` merges them when reading"),
    ("out_file", "worker output goes to <log-dir>/<app>/<app>-<index>.log (stdout and stderr together); read it with `clusterd logs`"),
    ("error_file", "worker output goes to <log-dir>/<app>/<app>-<index>.log (stdout and stderr together); read it with `clusterd logs`"),
    ("log_file", "worker output goes to <log-dir>/<app>/<app>-<index>.log; read it with `clusterd logs`"),
    ("output", "worker output goes to <log-dir>/<app>/<app>-<index>.log; read it with `clusterd logs`"),
    ("error", "worker output goes to <log-dir>/<app>/<app>-<index>.log; read it with `clusterd logs`"),
    ("log", "worker output goes to <log-dir>/<app>/<app>-<index>.log; read it with `clusterd logs`"),
    ("log_date_format", "clusterd writes the app's lines as they are, without a timestamp prefix"),
    ("time", "clusterd writes the app's lines as they are, without a timestamp prefix"),
    ("log_type", "clusterd writes the app's lines as they are (no JSON wrapping)"),
    ("pid_file", "pids are in `clusterd status APP` and `clusterd status -o json`"),
    ("max_restarts", "clusterd never gives up on a crashing worker: it restarts it with exponential backoff (phase CrashLoopBackOff)"),
    ("min_uptime", "clusterd resets a worker's backoff after a stable run derived from restart.backoff, not a fixed uptime"),
    ("instance_var", "each worker gets its index in CLUSTERD_INSTANCE (not NODE_APP_INSTANCE)"),
    ("increment_var", "workers in http mode each get their own private PORT behind the shared public port, so no variable needs incrementing"),
    ("source_map_support", "pass --enable-source-maps in interpreter_args (node_args) instead"),
    ("vizion", "no version metadata collection"),
    ("post_update", "no update hooks"),
    ("force", "one manifest per app name; there are no duplicate app instances to force"),
    ("namespace", "no namespaces: apps are grouped by their apps dir"),
    ("autostart", "every app in the apps dir runs; keep the manifest out of the apps dir to not start it"),
    ("treekill", "clusterd always signals the worker's whole process group"),
    ("shutdown_with_message", "clusterd stops workers with a signal (shutdown.signal), not an IPC message"),
    ("kill_retry_time", "clusterd sends SIGKILL once shutdown.timeout has passed"),
    ("disable_trace", "no tracing agent (PM2 Plus)"),
    ("trace", "no tracing agent (PM2 Plus)"),
    ("deep_monitoring", "no monitoring agent (PM2 Plus); see `clusterd top` and GET /metrics"),
    ("pmx", "no monitoring agent (PM2 Plus); see `clusterd top` and GET /metrics"),
    ("automation", "no monitoring agent (PM2 Plus)"),
    ("filter_env", "workers get exactly the manifest's env plus the daemon's environment"),
    ("append_env_to_name", "app names are fixed by metadata.name"),
    ("appendEnvToName", "app names are fixed by metadata.name"),
    ("cron", "no scheduled restarts; use a systemd timer running `clusterd reload APP`"),
    ("container", "no container runtime; see `clusterd export kubernetes`"),
    ("docker", "no container runtime; see `clusterd export kubernetes`"),
    ("version", "not needed"),
];

/// Options this module maps (so they are not reported as unknown).
const MAPPED: &[&str] = &[
    "name",
    "script",
    "args",
    "interpreter",
    "exec_interpreter",
    "interpreter_args",
    "node_args",
    "cwd",
    "instances",
    "exec_mode",
    "env",
    "max_memory_restart",
    "kill_timeout",
    "wait_ready",
    "listen_timeout",
    "restart_delay",
    "exp_backoff_restart_delay",
    "autorestart",
    "stop_exit_codes",
    "uid",
    "gid",
    "user",
];

/// Maps a parsed ecosystem file (or `pm2 jlist` output) to manifests.
///
/// # Errors
/// The value holds no apps, an app has no script, or two apps end up with one name.
pub fn convert(value: &Value, ctx: &ImportOptions) -> anyhow::Result<Vec<ImportedApp>> {
    let (apps, file_notes) = app_objects(value)?;
    let mut out: Vec<ImportedApp> = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let mut imported = convert_app(app, ctx).with_context(|| match app.get("name") {
            Some(Value::String(n)) => format!("app `{n}`"),
            _ => format!("apps[{i}]"),
        })?;
        if i == 0 {
            imported.notes.extend(file_notes.iter().cloned());
        }
        if let Some(first) = out.iter().find(|a| a.name == imported.name) {
            bail!(
                "two apps map to the name `{}`; rename one in the ecosystem file",
                first.name
            );
        }
        out.push(imported);
    }
    Ok(out)
}

/// App objects, and notes about the file as a whole.
type AppObjects = (Vec<Map<String, Value>>, Vec<Note>);

/// The app objects of an ecosystem value, normalized to ecosystem-file keys, plus notes
/// about the file itself (like a `deploy` section).
fn app_objects(value: &Value) -> anyhow::Result<AppObjects> {
    let mut notes = Vec::new();
    let list: Vec<Value> = match value {
        Value::Object(o) if o.contains_key("apps") => {
            if o.contains_key("deploy") {
                notes.push(Note {
                    field: "deploy".into(),
                    reason: "PM2's deploy system is not part of clusterd; deploy the files, then `clusterd apply` or GitOps (--git-repo)".into(),
                });
            }
            match &o["apps"] {
                Value::Array(a) => a.clone(),
                single @ Value::Object(_) => vec![single.clone()],
                _ => bail!("`apps` must be a list of apps"),
            }
        }
        Value::Object(o) if o.contains_key("script") => vec![value.clone()],
        Value::Array(a) => a.clone(),
        _ => bail!(
            "no apps found: expected `{{apps: [...]}}`, a list of apps, or `pm2 jlist` output"
        ),
    };
    let mut apps: Vec<Map<String, Value>> = Vec::new();
    for v in list {
        let Value::Object(o) = v else {
            bail!("every app must be an object");
        };
        if let Some(Value::Object(env)) = o.get("pm2_env") {
            // `pm2 jlist`: one entry per running process, so a cluster appears N times.
            let app = from_jlist(&o, env);
            if !apps.iter().any(|a| a.get("name") == app.get("name")) {
                apps.push(app);
            }
        } else {
            apps.push(o);
        }
    }
    if apps.is_empty() {
        bail!("no apps found in the ecosystem file");
    }
    Ok((apps, notes))
}

/// Variables the PM2 daemon adds to every process, or inherits from the shell that
/// started it: not part of the app's own configuration.
fn is_inherited_var(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "TERM",
        "LANG",
        "LANGUAGE",
        "MAIL",
        "HOSTNAME",
        "DISPLAY",
        "EDITOR",
        "PAGER",
        "NODE_APP_INSTANCE",
        "unique_id",
        "name",
        "status",
        "COLORTERM",
        "TMUX",
        "TMUX_PANE",
        "SUDO_USER",
        "SUDO_UID",
        "SUDO_GID",
        "SUDO_COMMAND",
        "MOTD_SHOWN",
        "LS_COLORS",
    ];
    const PREFIX: &[&str] = &[
        "PM2_", "pm_", "LC_", "XDG_", "SSH_", "DBUS_", "npm_", "axm_",
    ];
    EXACT.contains(&key) || PREFIX.iter().any(|p| key.starts_with(p))
}

/// An ecosystem-style app from one `pm2 jlist` entry.
fn from_jlist(entry: &Map<String, Value>, pm2_env: &Map<String, Value>) -> Map<String, Value> {
    let mut app = Map::new();
    let rename = [
        ("pm_exec_path", "script"),
        ("pm_cwd", "cwd"),
        ("exec_interpreter", "interpreter"),
    ];
    for (from, to) in rename {
        if let Some(v) = pm2_env.get(from) {
            app.insert(to.to_string(), v.clone());
        }
    }
    for key in MAPPED.iter().copied().filter(|k| {
        !matches!(
            *k,
            "script" | "cwd" | "interpreter" | "exec_interpreter" | "env"
        )
    }) {
        if let Some(v) = pm2_env.get(key) {
            if !v.is_null() {
                app.insert(key.to_string(), v.clone());
            }
        }
    }
    if let Some(n) = entry.get("name") {
        app.insert("name".into(), n.clone());
    }
    let app_name = entry.get("name").and_then(Value::as_str);
    if let Some(Value::Object(env)) = pm2_env.get("env") {
        let kept: Map<String, Value> = env
            .iter()
            // PM2 also stores `"<app name>": "{}"` there.
            .filter(|(k, _)| !is_inherited_var(k) && Some(k.as_str()) != app_name)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        app.insert("env".into(), Value::Object(kept));
    }
    // A process started with `pm2 start` has no `instances` when it is a single fork.
    if app.get("instances").is_none_or(Value::is_null) {
        app.insert("instances".into(), Value::from(1));
    }
    app
}

fn convert_app(app: &Map<String, Value>, ctx: &ImportOptions) -> anyhow::Result<ImportedApp> {
    let mut notes: Vec<Note> = Vec::new();
    let mut note = |field: &str, reason: String| {
        notes.push(Note {
            field: field.to_string(),
            reason,
        });
    };

    let script = match app.get("script") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => bail!("`script` is missing, expected the file or command PM2 starts"),
    };

    // Name: PM2 defaults it to the script's file name without extension.
    let pm2_name = match app.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => Path::new(&script)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "app".into()),
    };
    let name = sanitize_name(&pm2_name);
    if name != pm2_name {
        note(
            "name",
            format!("`{pm2_name}` is not a valid clusterd name ([a-z0-9-], 1..63), so the app is `{name}`"),
        );
    }

    // Working dir: PM2 resolves `cwd` against the directory it was started from (the
    // ecosystem file's, in practice); without one, that directory.
    let cwd = match app.get("cwd") {
        Some(Value::String(c)) if !c.is_empty() => ctx.base_dir.join(c),
        _ => ctx.base_dir.clone(),
    };
    let cwd = normalize(&cwd);

    // Command: [interpreter, interpreter_args..., script, args...], or the script alone
    // when PM2 would run it directly (a binary, or interpreter `none`).
    let interpreter = match app
        .get("interpreter")
        .or_else(|| app.get("exec_interpreter"))
    {
        Some(Value::String(i)) if !i.is_empty() => Some(i.clone()),
        _ => None,
    };
    let interpreter = match interpreter.as_deref() {
        Some("none") => None,
        Some(i) => Some(i.to_string()),
        None => default_interpreter(&script),
    };
    let script_path = {
        let p = Path::new(&script);
        if p.is_absolute() {
            script.clone()
        } else if interpreter.is_some() || cwd.join(p).exists() || script.contains('/') {
            normalize(&cwd.join(p)).display().to_string()
        } else {
            // A bare command name (`npm`): PM2 looks it up on PATH, and so does exec.
            script.clone()
        }
    };
    let mut command: Vec<String> = Vec::new();
    if let Some(i) = &interpreter {
        command.push(i.clone());
        for key in ["interpreter_args", "node_args"] {
            command.extend(string_list(app.get(key), key)?);
        }
    } else if app.contains_key("interpreter_args") || app.contains_key("node_args") {
        note(
            "interpreter_args",
            "the script runs without an interpreter, so there is nothing to pass them to".into(),
        );
    }
    command.push(script_path);
    command.extend(string_list(app.get("args"), "args")?);

    // Environment: `env`, then `env_NAME` with --env NAME (what `pm2 start --env NAME` does).
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if let Some(v) = app.get("env") {
        merge_env(&mut env, v, "env", &mut note)?;
    }
    let mut other_envs: Vec<String> = app
        .keys()
        .filter(|k| k.starts_with("env_") && k.len() > 4)
        .cloned()
        .collect();
    other_envs.sort();
    if let Some(want) = &ctx.env_name {
        let key = format!("env_{want}");
        match app.get(&key) {
            Some(v) => merge_env(&mut env, v, &key, &mut note)?,
            None => note(
                &key,
                format!("--env {want} was given but this app has no `{key}`"),
            ),
        }
        other_envs.retain(|k| *k != key);
    }
    for k in &other_envs {
        note(
            k,
            format!(
                "not applied; pass --env {} to merge it over `env`",
                &k["env_".len()..]
            ),
        );
    }

    // Instances and mode.
    let cluster = match app.get("exec_mode") {
        None | Some(Value::Null) => false,
        Some(Value::String(m)) => match m.as_str() {
            "cluster" | "cluster_mode" => true,
            "fork" | "fork_mode" => false,
            other => bail!("`exec_mode` is `{other}`, expected fork or cluster"),
        },
        Some(other) => bail!("`exec_mode` is {other}, expected fork or cluster"),
    };
    let instances = match app.get("instances") {
        None | Some(Value::Null) => InstancesOut::Count(1),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => InstancesOut::Word("max"),
            Some(k) => InstancesOut::Count(k),
            None => bail!("`instances` is {n}, expected a whole number or \"max\""),
        },
        Some(Value::String(s)) => match s.trim() {
            "max" => InstancesOut::Word("max"),
            t => match t.parse::<i64>() {
                Ok(0) => InstancesOut::Word("max"),
                Ok(k) => InstancesOut::Count(k),
                Err(_) => bail!("`instances` is \"{s}\", expected a number or \"max\""),
            },
        },
        Some(other) => bail!("`instances` is {other}, expected a number or \"max\""),
    };

    // The port. PM2 apps read PORT and listen on it; in cluster mode Node's cluster
    // module shares it. clusterd's http mode keeps that contract (each worker reads its
    // private PORT) while the daemon owns the public port.
    let mut listen = Vec::new();
    if let Some(port) = env.get("PORT").cloned() {
        match port.trim().parse::<u16>() {
            Ok(p) if p > 0 => {
                env.remove("PORT");
                listen.push(ListenOut {
                    port: p,
                    mode: "http",
                });
                note(
                    "env.PORT",
                    format!("became a listener on port {p} in http mode: the daemon owns the port and each worker gets its own private PORT behind it (use mode tcp for a non-HTTP protocol)"),
                );
                if !cluster && instance_count_above_one(&instances) {
                    note(
                        "exec_mode",
                        "fork mode with several instances: under clusterd they no longer compete for one port; each gets its own".into(),
                    );
                }
            }
            _ => note(
                "env.PORT",
                format!("`{port}` is not a port number, so no listener was made; it stays in env"),
            ),
        }
    } else if cluster {
        note(
            "exec_mode",
            "cluster mode, but no PORT in env to know which port the app listens on: add a `listen` entry (mode http) and have the app read PORT".into(),
        );
    }

    // Readiness.
    let wait_ready = bool_opt(app.get("wait_ready"), "wait_ready")?.unwrap_or(false);
    let listen_timeout = millis_opt(app.get("listen_timeout"), "listen_timeout")?;
    let readiness = if wait_ready || listen_timeout.is_some() {
        if listen_timeout.is_some() {
            note(
                "listen_timeout",
                "PM2 carries on after it; clusterd stops the rollout instead and keeps the old workers serving".into(),
            );
        }
        Some(ReadinessOut {
            kind: wait_ready.then_some("ipc"),
            timeout: listen_timeout.map(ms),
        })
    } else {
        None
    };

    // Shutdown: PM2 sends SIGINT, then SIGKILL after kill_timeout (default 1600 ms).
    let shutdown = ShutdownOut {
        signal: "SIGINT",
        timeout: millis_opt(app.get("kill_timeout"), "kill_timeout")?.map(ms),
    };

    // Restart policy and backoff.
    let autorestart = bool_opt(app.get("autorestart"), "autorestart")?.unwrap_or(true);
    let mut policy = None;
    if !autorestart {
        policy = Some("never");
    }
    if let Some(v) = app.get("stop_exit_codes").filter(|v| !v.is_null()) {
        let codes: Vec<i64> = match v {
            Value::Number(n) => n.as_i64().into_iter().collect(),
            Value::Array(a) => a.iter().filter_map(Value::as_i64).collect(),
            _ => bail!("`stop_exit_codes` is {v}, expected a number or a list of numbers"),
        };
        if autorestart {
            if codes.contains(&0) {
                policy = Some("on-failure");
                if codes.iter().any(|&c| c != 0) {
                    note(
                        "stop_exit_codes",
                        format!("{codes:?}: restart.policy on-failure treats only exit 0 as final; the other codes restart"),
                    );
                }
            } else {
                note(
                    "stop_exit_codes",
                    format!("{codes:?}: clusterd can stop restarting after exit 0 (on-failure), not after other codes; they restart"),
                );
            }
        }
    }
    let restart_delay = millis_opt(app.get("restart_delay"), "restart_delay")?;
    let exp_delay = millis_opt(
        app.get("exp_backoff_restart_delay"),
        "exp_backoff_restart_delay",
    )?;
    let backoff = match (exp_delay, restart_delay) {
        (Some(e), r) => {
            if r.is_some() {
                note(
                    "restart_delay",
                    "exp_backoff_restart_delay takes precedence, as in PM2".into(),
                );
            }
            Some(BackoffOut {
                initial: ms(e),
                max: ms(e.max(PM2_MAX_BACKOFF_MS)),
            })
        }
        (None, Some(r)) => Some(BackoffOut {
            initial: ms(r),
            max: ms(r),
        }),
        (None, None) => None,
    };
    let restart = (policy.is_some() || backoff.is_some()).then_some(RestartOut { policy, backoff });

    // Memory.
    let limits = match app.get("max_memory_restart").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(LimitsOut { memory: memory(v)? }),
    };

    let user = match app.get("uid").or_else(|| app.get("user")) {
        Some(Value::String(u)) if !u.is_empty() => Some(u.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let group = match app.get("gid") {
        Some(Value::String(g)) if !g.is_empty() => Some(g.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    if user.is_some() || group.is_some() {
        note(
            "uid",
            "user and group apply only when the daemon runs as root".into(),
        );
    }

    // Everything else.
    for key in app.keys() {
        if MAPPED.contains(&key.as_str()) || key.starts_with("env_") {
            continue;
        }
        match UNMAPPED.iter().find(|(k, _)| k == key) {
            Some((_, why)) => note(key, (*why).to_string()),
            None => note(key, "not a PM2 option clusterd knows; ignored".into()),
        }
    }

    Ok(ImportedApp {
        name: name.clone(),
        manifest: Manifest {
            api_version: "clusterd/v1",
            kind: "App",
            metadata: Metadata { name },
            spec: Spec {
                command,
                working_dir: cwd.display().to_string(),
                env,
                instances,
                listen,
                readiness,
                shutdown,
                restart,
                limits,
                user,
                group,
            },
        },
        notes,
    })
}

fn instance_count_above_one(i: &InstancesOut) -> bool {
    !matches!(i, InstancesOut::Count(1))
}

/// PM2's choice of interpreter by extension (lib/API/interpreter.json); `None` runs the
/// script itself (a binary, or anything with a shebang).
fn default_interpreter(script: &str) -> Option<String> {
    let ext = Path::new(script)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let i = match ext {
        "js" | "cjs" | "mjs" => "node",
        "ts" | "tsx" => "ts-node",
        "py" => "python3",
        "rb" => "ruby",
        "php" => "php",
        "sh" => "bash",
        "pl" => "perl",
        "coffee" => "coffee",
        "ls" => "lsc",
        _ => return None,
    };
    Some(i.to_string())
}

/// `[a-z0-9-]`, 1..63: lower-case, anything else becomes `-`, runs collapsed.
fn sanitize_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "app".into()
    } else {
        out
    }
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `args`-like values: a string is split like a shell would, a list is taken as is.
fn string_list(v: Option<&Value>, key: &str) -> anyhow::Result<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => shell_words::split(s)
            .map_err(|e| anyhow::anyhow!("`{key}` \"{s}\": {e}, expected shell-like words")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Bool(_) => Ok(i.to_string()),
                other => bail!("`{key}` holds {other}, expected strings"),
            })
            .collect(),
        Some(other) => bail!("`{key}` is {other}, expected a string or a list of strings"),
    }
}

fn merge_env(
    env: &mut BTreeMap<String, String>,
    v: &Value,
    key: &str,
    note: &mut impl FnMut(&str, String),
) -> anyhow::Result<()> {
    let Value::Object(o) = v else {
        bail!("`{key}` is {v}, expected an object of variables");
    };
    for (k, v) in o {
        let value = match v {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Number(_) | Value::Bool(_) => v.to_string(),
            other => {
                note(
                    &format!("{key}.{k}"),
                    "an object or list; PM2 would pass it JSON-encoded, and so does this import"
                        .into(),
                );
                other.to_string()
            }
        };
        env.insert(k.clone(), value);
    }
    Ok(())
}

fn bool_opt(v: Option<&Value>, key: &str) -> anyhow::Result<Option<bool>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
        Some(other) => bail!("`{key}` is {other}, expected true or false"),
    }
}

/// PM2 times are milliseconds, as numbers or numeric strings.
fn millis_opt(v: Option<&Value>, key: &str) -> anyhow::Result<Option<u64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            anyhow::anyhow!("`{key}` is {n}, expected milliseconds (a whole number >= 0)")
        }),
        Some(Value::String(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| {
            anyhow::anyhow!("`{key}` is \"{s}\", expected milliseconds (a whole number >= 0)")
        }),
        Some(other) => bail!("`{key}` is {other}, expected milliseconds"),
    }
}

fn ms(n: u64) -> String {
    if n > 0 && n.is_multiple_of(1000) {
        format!("{}s", n / 1000)
    } else {
        format!("{n}ms")
    }
}

/// `max_memory_restart`: bytes as a number, or `300M`/`1G`/`512K` (PM2's units are binary).
fn memory(v: &Value) -> anyhow::Result<String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => bail!("`max_memory_restart` is {other}, expected a size like 300M or 1G"),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("`max_memory_restart` is \"{text}\", expected a size like 300M or 1G")
    })?;
    let unit = match unit.to_ascii_uppercase().as_str() {
        // Bytes (what `pm2 jlist` holds): in the largest binary unit that divides them.
        "" | "B" => {
            for (factor, name) in [(1u64 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")] {
                if n > 0 && n.is_multiple_of(factor) {
                    return Ok(format!("{}{name}", n / factor));
                }
            }
            ""
        }
        "K" | "KB" => "Ki",
        "M" | "MB" => "Mi",
        "G" | "GB" => "Gi",
        _ => bail!("`max_memory_restart` is \"{text}\", expected a size like 300M or 1G"),
    };
    Ok(format!("{n}{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> ImportOptions {
        ImportOptions {
            base_dir: PathBuf::from("/srv/eco"),
            env_name: None,
            source: "ecosystem.config.js".into(),
        }
    }

    fn one(v: Value) -> ImportedApp {
        let mut apps = convert(&v, &ctx()).unwrap();
        assert_eq!(apps.len(), 1);
        apps.remove(0)
    }

    #[test]
    fn script_args_interpreter_make_the_command() {
        let a = one(
            json!({"apps": [{"name": "api", "script": "server.js", "args": "--port 1 'a b'", "node_args": ["--max-old-space-size=512"]}]}),
        );
        assert_eq!(
            a.manifest.spec.command,
            [
                "node",
                "--max-old-space-size=512",
                "/srv/eco/server.js",
                "--port",
                "1",
                "a b"
            ]
        );
        let a = one(
            json!({"apps": [{"name": "w", "script": "worker.py", "interpreter": "/usr/bin/python3.12", "args": ["-v"]}]}),
        );
        assert_eq!(
            a.manifest.spec.command,
            ["/usr/bin/python3.12", "/srv/eco/worker.py", "-v"]
        );
        let a = one(
            json!({"apps": [{"name": "bin", "script": "npm", "args": "start", "interpreter": "none"}]}),
        );
        assert_eq!(a.manifest.spec.command, ["npm", "start"]);
    }

    #[test]
    fn instances_follow_pm2() {
        for (given, want) in [
            (json!(4), InstancesOut::Count(4)),
            (json!("max"), InstancesOut::Word("max")),
            (json!(0), InstancesOut::Word("max")),
            (json!(-1), InstancesOut::Count(-1)),
            (json!("3"), InstancesOut::Count(3)),
        ] {
            let a = one(json!({"script": "a.js", "instances": given}));
            assert_eq!(a.manifest.spec.instances, want);
        }
    }

    #[test]
    fn port_becomes_an_http_listener_and_leaves_env() {
        let a = one(
            json!({"apps": [{"name": "web", "script": "a.js", "exec_mode": "cluster", "instances": 2, "env": {"PORT": 3000, "NODE_ENV": "production"}}]}),
        );
        assert_eq!(a.manifest.spec.listen.len(), 1);
        assert_eq!(a.manifest.spec.listen[0].port, 3000);
        assert!(!a.manifest.spec.env.contains_key("PORT"));
        assert_eq!(a.manifest.spec.env["NODE_ENV"], "production");
    }

    #[test]
    fn env_name_merges_over_env() {
        let v = json!({"apps": [{"name": "web", "script": "a.js", "env": {"A": "1", "B": "1"}, "env_production": {"B": "2"}}]});
        let mut c = ctx();
        c.env_name = Some("production".into());
        let a = convert(&v, &c).unwrap().remove(0);
        assert_eq!(a.manifest.spec.env["A"], "1");
        assert_eq!(a.manifest.spec.env["B"], "2");
        let a = one(v);
        assert_eq!(a.manifest.spec.env["B"], "1");
        assert!(a.notes.iter().any(|n| n.field == "env_production"));
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(memory(&json!("300M")).unwrap(), "300Mi");
        assert_eq!(memory(&json!("1G")).unwrap(), "1Gi");
        assert_eq!(memory(&json!(1_048_576)).unwrap(), "1Mi");
        assert_eq!(memory(&json!(1000)).unwrap(), "1000");
        assert!(memory(&json!("lots")).is_err());
        assert_eq!(ms(1600), "1600ms");
        assert_eq!(ms(3000), "3s");
    }

    #[test]
    fn names_are_made_valid() {
        assert_eq!(sanitize_name("My_API.v2"), "my-api-v2");
        assert_eq!(sanitize_name("__"), "app");
        let a = one(json!({"script": "/opt/Worker.js"}));
        assert_eq!(a.name, "worker");
    }

    #[test]
    fn restart_rules() {
        let a = one(json!({"script": "a.js", "autorestart": false}));
        assert_eq!(a.manifest.spec.restart.unwrap().policy, Some("never"));
        let a = one(json!({"script": "a.js", "stop_exit_codes": [0]}));
        assert_eq!(a.manifest.spec.restart.unwrap().policy, Some("on-failure"));
        let a = one(json!({"script": "a.js", "exp_backoff_restart_delay": 100}));
        let b = a.manifest.spec.restart.unwrap().backoff.unwrap();
        assert_eq!((b.initial.as_str(), b.max.as_str()), ("100ms", "15s"));
        let a = one(json!({"script": "a.js", "restart_delay": 4000}));
        let b = a.manifest.spec.restart.unwrap().backoff.unwrap();
        assert_eq!((b.initial.as_str(), b.max.as_str()), ("4s", "4s"));
    }

    #[test]
    fn unmapped_options_are_listed_with_a_reason() {
        let a = one(
            json!({"script": "a.js", "watch": true, "cron_restart": "0 0 * * *", "frobnicate": 1}),
        );
        let fields: Vec<&str> = a.notes.iter().map(|n| n.field.as_str()).collect();
        assert!(fields.contains(&"watch"));
        assert!(fields.contains(&"cron_restart"));
        assert!(fields.contains(&"frobnicate"));
    }

    #[test]
    fn bad_input_is_an_error_naming_the_app() {
        let e = convert(&json!({"apps": [{"name": "x"}]}), &ctx()).unwrap_err();
        assert!(format!("{e:#}").contains("app `x`"), "{e:#}");
        assert!(convert(
            &json!({"apps": [{"name": "x", "script": "a.js", "exec_mode": "weird"}]}),
            &ctx()
        )
        .is_err());
        assert!(convert(&json!(42), &ctx()).is_err());
    }

    #[test]
    fn jlist_entries_are_deduplicated_and_env_filtered() {
        let entry = |id: u32| {
            json!({"name": "api", "pm_id": id, "pid": 100 + id, "pm2_env": {
                "pm_exec_path": "/srv/api/server.js", "pm_cwd": "/srv/api",
                "exec_interpreter": "node", "exec_mode": "cluster_mode", "instances": 2,
                "node_args": [], "args": ["--x"], "kill_timeout": 5000,
                "env": {"PATH": "/usr/bin", "PM2_HOME": "/root/.pm2", "PORT": "8080", "API_KEY": "k"}
            }})
        };
        let a = one(json!([entry(0), entry(1)]));
        assert_eq!(
            a.manifest.spec.command,
            ["node", "/srv/api/server.js", "--x"]
        );
        assert_eq!(a.manifest.spec.instances, InstancesOut::Count(2));
        assert_eq!(a.manifest.spec.env.keys().collect::<Vec<_>>(), ["API_KEY"]);
        assert_eq!(a.manifest.spec.listen[0].port, 8080);
        assert_eq!(a.manifest.spec.shutdown.timeout.as_deref(), Some("5s"));
    }
}

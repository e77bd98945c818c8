//! The client commands: what they ask the daemon (or the files), and how they print it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets, ContentArrangement, Table};

use crate::api_types::{AppStatus, DaemonInfo, Event, ReloadReply, StatusReport};
use crate::client::Client;

/// `clusterd status [APP] [-o ...]`.
pub fn status(client: &Client, app: Option<&str>, format: Format) -> anyhow::Result<ExitCode> {
    match app {
        None => {
            let report: StatusReport = client.get("/v1/apps")?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Yaml => print!("{}", to_yaml(&report)?),
                Format::Table => {
                    for problem in &report.daemon_errors {
                        eprintln!("WARNING (daemon): {problem}");
                    }
                    print_apps(&report.apps);
                }
            }
        }
        Some(name) => {
            let app: AppStatus = client.get(&format!("/v1/apps/{name}"))?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&app)?),
                Format::Yaml => print!("{}", to_yaml(&app)?),
                Format::Table => print_app(&app),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn to_yaml<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    serde_saphyr::to_string(value).context("rendering YAML")
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    t
}

fn print_apps(apps: &[AppStatus]) {
    if apps.is_empty() {
        println!("No apps. Drop a manifest into the apps dir (see `clusterd daemon --help`).");
        return;
    }
    let mut t = table();
    t.set_header([
        "APP", "MODE", "READY", "RESTARTS", "REVISION", "LISTEN", "AGE", "PHASE",
    ]);
    for a in apps {
        let mode = a
            .listen
            .first()
            .map_or_else(|| "-".to_string(), |l| l.mode.to_string());
        let listen = if a.listen.is_empty() {
            "-".to_string()
        } else {
            a.listen
                .iter()
                .map(|l| l.address.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        t.add_row([
            a.name.clone(),
            mode,
            format!("{}/{}", a.ready, a.desired),
            a.restarts.to_string(),
            if a.revision.is_empty() {
                "-".into()
            } else {
                a.revision.clone()
            },
            listen,
            age(a.age_secs),
            a.phase.to_string(),
        ]);
    }
    println!("{t}");
    for a in apps {
        if let Some(e) = &a.error {
            println!("\n{} ({}): {}", a.name, a.phase, e);
        }
    }
}

fn print_app(a: &AppStatus) {
    println!("App:       {}", a.name);
    println!("Phase:     {}", a.phase);
    println!(
        "Revision:  {} (generation {})",
        if a.revision.is_empty() {
            "-"
        } else {
            &a.revision
        },
        a.generation
    );
    println!("Ready:     {}/{}", a.ready, a.desired);
    println!("Restarts:  {}", a.restarts);
    println!("Source:    {}", a.source);
    for l in &a.listen {
        println!(
            "Listen:    {} {} ({}{})",
            l.address,
            l.protocol,
            l.mode,
            l.name
                .as_ref()
                .map(|n| format!(", {n}"))
                .unwrap_or_default()
        );
    }
    if let Some(c) = &a.cgroup {
        println!("Cgroup:    {c}");
    }
    if let Some(e) = &a.error {
        println!("Error:     {}", e.replace('\n', "\n           "));
    }
    println!();
    let shared = a.instances.iter().any(|i| i.bound.is_some());
    let mut t = table();
    let mut header = vec![
        "INSTANCE",
        "PID",
        "STATE",
        "REVISION",
        "RESTARTS",
        "UPTIME",
        "CPU",
        "RSS",
        "INFLIGHT",
        "LAST EXIT",
    ];
    if shared {
        header.push("BOUND");
    }
    t.set_header(header);
    for i in &a.instances {
        let mut row = vec![
            i.index.to_string(),
            i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            i.state.to_string(),
            i.revision.clone(),
            i.restarts.to_string(),
            if i.pid.is_some() {
                age(i.uptime_secs)
            } else {
                "-".into()
            },
            i.cpu_percent
                .map_or_else(|| "-".into(), |c| format!("{c:.1}%")),
            i.rss_bytes.map_or_else(|| "-".into(), human_bytes),
            i.inflight.map_or_else(|| "-".into(), |n| n.to_string()),
            i.last_exit.clone().unwrap_or_else(|| "-".into()),
        ];
        if shared {
            row.push(match &i.bound {
                Some(b) if !b.is_empty() => b.join(", "),
                Some(_) if i.pid.is_some() => "not bound".into(),
                _ => "-".into(),
            });
        }
        t.add_row(row);
    }
    println!("{t}");
}

pub(crate) fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn human_bytes(n: u64) -> String {
    const MI: f64 = 1024.0 * 1024.0;
    if n as f64 >= 1024.0 * MI {
        format!("{:.1}Gi", n as f64 / (1024.0 * MI))
    } else {
        format!("{:.1}Mi", n as f64 / MI)
    }
}

/// `clusterd reload APP|--all [--no-wait]`: exit 0 when every worker was replaced, 1
/// when the rollout failed (the old workers keep serving), 2 when the daemon is away.
pub fn reload(
    client: &Client,
    app: Option<&str>,
    all: bool,
    no_wait: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let path = match (app, all) {
        (Some(name), _) => format!("/v1/apps/{name}/reload"),
        (None, true) => "/v1/reload".to_string(),
        (None, false) => bail!("name an app or pass --all"),
    };
    let accepted: ReloadReply = client.post(&path)?;
    let targets: Vec<(String, u64)> = accepted
        .reloads
        .into_iter()
        .map(|r| (r.app, r.generation))
        .collect();
    if targets.is_empty() {
        println!("nothing to reload");
        return Ok(ExitCode::SUCCESS);
    }
    if no_wait {
        for (name, generation) in &targets {
            println!("{name}: reload requested (generation {generation})");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + timeout;
    let mut failed = false;
    for (name, generation) in targets {
        let mut last = String::new();
        // The daemon's own account of the rollout (its `rollout` block), not a guess
        // from phase strings: an old worker crashing mid-reload is not a failed reload.
        loop {
            let a: AppStatus = client.get(&format!("/v1/apps/{name}"))?;
            let Some(r) = a.rollout.as_ref() else {
                eprintln!(
                    "{name}: nothing to roll out ({:?}): {}",
                    a.phase,
                    a.error.unwrap_or_else(|| "the manifest is gone".into())
                );
                failed = true;
                break;
            };
            if r.generation > generation {
                println!(
                    "{name}: superseded by a newer reload or revision (generation {})",
                    r.generation
                );
                break;
            }
            let line = format!("{name}: {}/{} replaced", r.updated, a.desired);
            if line != last {
                println!("{line}");
                last = line;
            }
            if let Some(why) = &r.failed {
                eprintln!("{name}: rollout failed: {why}");
                eprintln!("{name}: the previous workers keep serving; fix the app and run `clusterd reload {name}` again");
                failed = true;
                break;
            }
            if r.complete {
                println!("{name}: rollout complete");
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{name}: still not done after {}; check `clusterd status {name}` and `clusterd events {name}`", humantime::format_duration(timeout));
                failed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `clusterd validate FILE...`: 0 when every file is valid, 1 otherwise.
pub fn validate(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let files = read_manifests(paths)?;
    // In file order, then position order (line 4 before line 10), as the snapshots are;
    // warnings (`$PORT` that no shell expands) among them, but only errors fail.
    let checked = clusterd_core::check_files(&files, cpus());
    for line in &checked.lines {
        println!("{line}");
    }
    if checked.errors == 0 {
        let report = load(&files);
        for (name, app) in &report.apps {
            eprintln!(
                "{}: {name} ok (revision {}, {} instances)",
                app.source.display(),
                app.revision,
                app.replicas
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

fn read_manifests(paths: &[PathBuf]) -> anyhow::Result<Vec<clusterd_core::load::ManifestFile>> {
    expand_manifest_paths(paths)?
        .into_iter()
        .map(|path| {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok(clusterd_core::load::ManifestFile { path, bytes })
        })
        .collect()
}

fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

fn load(files: &[clusterd_core::load::ManifestFile]) -> clusterd_core::load::LoadReport {
    clusterd_core::load::load(
        files,
        &clusterd_core::load::LoadContext {
            cpus: cpus(),
            incumbents: Default::default(),
            shared_mode_unavailable: None,
        },
    )
}

/// Marker written by GitOps sync: the apps dir belongs to git, not to `apply`.
pub use clusterd_core::load::GIT_MARKER;

/// `clusterd apply -f FILE|DIR`.
pub fn apply(paths: &[PathBuf], apps_dir: &Path) -> anyhow::Result<ExitCode> {
    if apps_dir.join(GIT_MARKER).exists() {
        bail!(
            "{} is managed by git (GitOps sync): commit the change to the repository instead of applying it here",
            apps_dir.display()
        );
    }
    let files = read_manifests(paths)?;
    if files.is_empty() {
        bail!(
            "no manifest files (*.yaml, *.yml) found in {}",
            display_paths(paths)
        );
    }
    // Validate the result as the daemon will see it: the apps dir with these files in.
    let candidate = overlay(apps_dir, &files)?;
    let report = load(&candidate);
    let ours: Vec<PathBuf> = files
        .iter()
        .map(|f| apps_dir.join(file_name(&f.path)))
        .collect();
    let mut bad = false;
    for d in report.errors.values().flatten() {
        if ours.contains(&d.file) || files.iter().any(|f| f.path == d.file) {
            eprintln!("{d}");
            bad = true;
        }
    }
    if bad {
        eprintln!("nothing applied");
        return Ok(ExitCode::from(1));
    }
    std::fs::create_dir_all(apps_dir)
        .with_context(|| format!("creating {}", apps_dir.display()))?;
    for f in &files {
        let dest = apps_dir.join(file_name(&f.path));
        write_atomically(&dest, &f.bytes)?;
        println!("{} -> {}", f.path.display(), dest.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn file_name(path: &Path) -> PathBuf {
    PathBuf::from(path.file_name().unwrap_or_default())
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The apps dir as it would be after installing `files` (same file names replaced).
fn overlay(
    apps_dir: &Path,
    files: &[clusterd_core::load::ManifestFile],
) -> anyhow::Result<Vec<clusterd_core::load::ManifestFile>> {
    let mut out: Vec<clusterd_core::load::ManifestFile> = Vec::new();
    if apps_dir.is_dir() {
        for existing in read_manifests(&[apps_dir.to_path_buf()])? {
            if !files
                .iter()
                .any(|f| file_name(&f.path) == file_name(&existing.path))
            {
                out.push(existing);
            }
        }
    }
    for f in files {
        out.push(clusterd_core::load::ManifestFile {
            path: apps_dir.join(file_name(&f.path)),
            bytes: f.bytes.clone(),
        });
    }
    Ok(out)
}

/// Write to a hidden temp file in the same directory, fsync, rename: a reader (the
/// daemon's watcher) sees the old file or the new one, never half of one.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name(dest).display(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn view(
    apps: &std::collections::BTreeMap<clusterd_core::plan::AppName, clusterd_core::LoadedApp>,
) -> Vec<clusterd_core::diff::AppView<'_>> {
    apps.values()
        .map(|a| clusterd_core::diff::AppView {
            name: &a.name.0,
            source: &a.source,
            spec: &a.spec,
            replicas: a.replicas,
            revision: &a.revision.0,
        })
        .collect()
}

/// `clusterd diff -f FILE|DIR`: 0 no change, 1 changes, 2 error.
pub fn diff(paths: &[PathBuf], apps_dir: &Path) -> anyhow::Result<ExitCode> {
    let files = read_manifests(paths)?;
    let installed = if apps_dir.is_dir() {
        read_manifests(&[apps_dir.to_path_buf()])?
    } else {
        Vec::new()
    };
    let before = load(&installed);
    let after = load(&overlay(apps_dir, &files)?);
    let mut errors = false;
    for d in after.errors.values().flatten() {
        eprintln!("{d}");
        errors = true;
    }
    if errors {
        return Ok(ExitCode::from(2));
    }
    let changes = clusterd_core::diff::diff(&view(&before.apps), &view(&after.apps));
    print!("{}", changes.render());
    Ok(ExitCode::from(changes.exit_code()))
}

/// `clusterd export kubernetes FILE...`.
pub fn export_kubernetes(paths: &[PathBuf], image: Option<&str>) -> anyhow::Result<ExitCode> {
    let files = read_manifests(paths)?;
    let report = load(&files);
    if !report.errors.is_empty() {
        for d in report.errors.values().flatten() {
            eprintln!("{d}");
        }
        return Ok(ExitCode::from(1));
    }
    let apps: Vec<clusterd_core::export::kubernetes::ExportApp<'_>> = report
        .apps
        .values()
        .map(|a| clusterd_core::export::kubernetes::ExportApp {
            name: &a.name.0,
            source: &a.source,
            spec: &a.spec,
            replicas: a.replicas,
        })
        .collect();
    let yaml = clusterd_core::export::kubernetes::export(
        &apps,
        &clusterd_core::export::kubernetes::ExportOptions { image },
    )?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

/// `clusterd logs APP [--instance N] [-f] [--tail N]`.
pub fn logs(
    client: &Client,
    log_dir: Option<&Path>,
    app: &str,
    instance: Option<u32>,
    follow: bool,
    tail: usize,
) -> anyhow::Result<ExitCode> {
    let dir = match log_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let info: DaemonInfo = client.get("/v1/daemon")?;
            PathBuf::from(info.log_dir)
        }
    };
    print_logs(&dir, app, instance, tail, follow)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the last `tail` lines of each instance's log (across rotated files), merged
/// across instances in time order, each line as `TIME app[index] text` (like
/// `pm2 logs`); then with `follow` keeps printing new lines of every instance.
fn print_logs(
    dir: &Path,
    app: &str,
    instance: Option<u32>,
    tail: usize,
    follow: bool,
) -> anyhow::Result<()> {
    use clusterd_runtime::logs;
    let files: Vec<(u32, PathBuf)> = logs::instance_logs(dir, app)
        .into_iter()
        .filter(|(i, _)| instance.is_none_or(|want| want == *i))
        .collect();
    if files.is_empty() {
        bail!(
            "no logs for {app}{} in {}",
            instance
                .map(|i| format!(" instance {i}"))
                .unwrap_or_default(),
            dir.display()
        );
    }
    let mut batch = LogBatch::default();
    for (index, path) in &files {
        batch.add(*index, logs::tail(path, tail)?);
    }
    let mut out = std::io::stdout().lock();
    batch.print(&mut out, app)?;
    drop(out);
    if !follow {
        return Ok(());
    }
    let mut followers: Vec<(u32, logs::Follower)> = files
        .iter()
        .map(|(i, p)| (*i, logs::Follower::from_end(p.clone())))
        .collect();
    loop {
        let mut batch = LogBatch::default();
        for (index, f) in &mut followers {
            batch.add(*index, f.poll()?);
        }
        if batch.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        batch.print(&mut std::io::stdout().lock(), app)?;
    }
}

/// Log lines of several instances, to be printed in time order.
#[derive(Default)]
struct LogBatch {
    /// (sort time, instance, position in its file, printed time, text).
    lines: Vec<(String, u32, usize, Option<String>, String)>,
}

impl LogBatch {
    /// Adds one instance's lines (in file order). A line without a timestamp (written
    /// before timestamps existed) sorts with the line before it in its file.
    fn add(&mut self, index: u32, lines: Vec<String>) {
        let mut last = String::new();
        for (seq, line) in lines.into_iter().enumerate() {
            match clusterd_runtime::logs::split_timestamp(&line) {
                Some((ts, text)) => {
                    last = ts.to_string();
                    // Milliseconds are plenty to read; the sort uses the full time.
                    let shown = format!("{}Z", &ts[..ts.len().min(23)]);
                    self.lines
                        .push((last.clone(), index, seq, Some(shown), text.to_string()));
                }
                None => self.lines.push((last.clone(), index, seq, None, line)),
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn print(mut self, out: &mut impl std::io::Write, app: &str) -> std::io::Result<()> {
        self.lines
            .sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        for (_, index, _, shown, text) in &self.lines {
            match shown {
                Some(t) => writeln!(out, "{t} {app}[{index}] {text}")?,
                None => writeln!(out, "{app}[{index}] {text}")?,
            }
        }
        out.flush()
    }
}

/// `clusterd events [APP] [-f]`.
pub fn events(client: &Client, app: Option<&str>, follow: bool) -> anyhow::Result<ExitCode> {
    let mut path = String::from("/v1/events?");
    if let Some(a) = app {
        path.push_str(&format!("app={a}&"));
    }
    if follow {
        path.push_str("follow=1");
    }
    let mut stdout = std::io::stdout();
    client.stream_lines(&path, |line| {
        if let Ok(e) = serde_json::from_str::<Event>(line) {
            let who = match (&e.app, e.instance) {
                (Some(a), Some(i)) => format!("{a}[{i}]"),
                (Some(a), None) => a.clone(),
                _ => "clusterd".to_string(),
            };
            writeln!(
                stdout,
                "{}  {:<16} {:<15} {}",
                e.time,
                who,
                e.kind,
                e.message.replace('\n', "\n    ")
            )
            .is_ok()
                && stdout.flush().is_ok()
        } else {
            true
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `clusterd sync`.
/// `clusterd upgrade`: 0 when the new daemon has taken over; 1 with the reason when it
/// did not (the old daemon keeps running); 2 when no daemon answered.
pub fn upgrade(client: &Client) -> anyhow::Result<ExitCode> {
    let info: crate::api_types::DaemonInfo = client.get("/v1/daemon")?;
    match client.post::<crate::api_types::UpgradeReply>("/v1/upgrade") {
        Ok(r) => {
            println!(
                "upgraded: daemon pid {} replaced by pid {} in {} ms; workers and ports kept",
                r.old_pid, r.new_pid, r.took_ms
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let pid = info.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
            eprintln!("clusterd: upgrade failed: {e:#}");
            eprintln!("clusterd: the running daemon{pid} keeps serving");
            Ok(ExitCode::from(1))
        }
    }
}

pub fn sync(client: &Client) -> anyhow::Result<ExitCode> {
    let answer: serde_json::Value = client.post("/v1/sync")?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(ExitCode::SUCCESS)
}

/// Output formats of `status`.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Like `kubectl get`.
    Table,
    /// The status JSON.
    Json,
    /// The same as YAML.
    Yaml,
}

/// Expands directories into the manifest files they hold (`*.yaml`, `*.yml`), sorted.
pub fn expand_manifest_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_manifest_name(p))
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// A manifest file name (the rule lives in core, shared with the daemon and GitOps).
pub fn is_manifest_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(clusterd_core::load::is_manifest_name)
}

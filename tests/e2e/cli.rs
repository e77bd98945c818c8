//! The command line as a user and a script see it: exit codes, exact messages, output
//! formats, and the offline commands (validate, apply, diff, export).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(15);

/// `clusterd ARGS` run from the repository root, with no daemon socket configured.
fn clusterd(args: &[&str]) -> Output {
    Command::new(clusterd_bin())
        .args(args)
        .current_dir(repo_root())
        .env_remove("CLUSTERD_SOCKET")
        .env_remove("CLUSTERD_APPS_DIR")
        .output()
        .expect("run clusterd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_panic(o: &Output) {
    let all = format!("{}{}", stdout(o), stderr(o));
    assert!(
        !all.contains("panicked") && !all.contains("backtrace") && !all.contains("RUST_BACKTRACE"),
        "{all}"
    );
}

/// `dir/*.yaml`, sorted, relative to the repo root (as a shell glob would give).
fn yaml_files(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    v.sort();
    v
}

#[test]
fn validate_accepts_the_example_manifests() {
    let files = yaml_files("manifests");
    assert!(files.len() >= 2, "{files:?}");
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let out = clusterd(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(stdout(&out), "", "errors printed for valid manifests");
}

#[test]
fn validate_prints_the_snapshot_lines_and_exits_1() {
    let files = yaml_files("tests/fixtures/invalid");
    assert!(files.len() >= 5);
    let mut all_expected = Vec::new();
    for file in &files {
        let expected =
            std::fs::read_to_string(repo_root().join(file).with_extension("expected")).unwrap();
        let out = clusterd(&["validate", file]);
        assert_eq!(out.status.code(), Some(1), "{file}: {}", stderr(&out));
        assert_eq!(stdout(&out), expected, "{file}");
        assert_no_panic(&out);
        all_expected.extend(expected.lines().map(str::to_string));
    }
    // All at once (the shell glob): the same lines, plus only the cross-file findings
    // (some fixtures name the same app, and two files naming one app are both rejected).
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let out = clusterd(&args);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    for line in &all_expected {
        assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
    }
    for line in text
        .lines()
        .filter(|l| !all_expected.iter().any(|e| e == l))
    {
        assert!(line.contains("is also defined at"), "unexpected: {line}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["validate"][..],
        &["frobnicate"],
        &["status", "-o", "xml"],
        &["reload"],
        &["diff"],
    ] {
        let out = clusterd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error:"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_no_panic(&out);
    }
    assert_eq!(clusterd(&["--help"]).status.code(), Some(0));
}

#[test]
fn no_daemon_is_a_clear_message_not_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("clusterd.sock");
    let want = format!(
        "cannot reach clusterd at {}: is the daemon running?",
        socket.display()
    );
    for args in [
        &["status"][..],
        &["status", "web", "-o", "json"],
        &["reload", "web"],
        &["events"],
        &["logs", "web"],
    ] {
        let out = Command::new(clusterd_bin())
            .args(args)
            .env("CLUSTERD_SOCKET", &socket)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(&want), "{args:?}: {}", stderr(&out));
        assert_no_panic(&out);
    }
}

/// Column values of the row whose first cell is `key` in a whitespace-aligned table.
fn row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&key))
        .unwrap_or_else(|| panic!("no row {key} in\n{table}"))
}

#[test]
fn status_in_every_format_and_per_app_instances() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 2, ""));
    let app = d.wait_phase("web", "Available", T);
    let pids = instance_pids(&app);

    // JSON: the documented shape.
    let json: Value = serde_json::from_slice(&d.cli(&["status", "-o", "json"]).stdout).unwrap();
    let web = &json["apps"][0];
    for key in [
        "name",
        "phase",
        "revision",
        "desired",
        "ready",
        "restarts",
        "error",
        "listen",
        "source",
        "instances",
    ] {
        assert!(web.get(key).is_some(), "status JSON lacks {key}: {web:#}");
    }
    assert_eq!(web["listen"][0]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(web["listen"][0]["mode"], "inherit");
    assert!(web["source"].as_str().unwrap().ends_with("web.yaml"));
    for i in web["instances"].as_array().unwrap() {
        for key in ["index", "pid", "state", "revision", "restarts", "started"] {
            assert!(i.get(key).is_some(), "instance lacks {key}: {i:#}");
        }
        assert!(i["started"].as_str().unwrap().ends_with('Z'));
    }

    // YAML: the same fields.
    let yaml = stdout(&d.cli(&["status", "-o", "yaml"]));
    for needle in [
        "apps:",
        "name: web",
        "phase: Available",
        "desired: 2",
        "instances:",
    ] {
        assert!(yaml.contains(needle), "{needle} not in\n{yaml}");
    }

    // Table: like `kubectl get`.
    let table = stdout(&d.cli(&["status"]));
    let header = table.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["APP", "MODE", "READY", "RESTARTS", "REVISION", "LISTEN", "AGE", "PHASE"]
    );
    let cells = row(&table, "web");
    assert_eq!(cells[1], "inherit");
    assert_eq!(cells[2], "2/2");
    assert_eq!(cells[4], app["revision"].as_str().unwrap());
    assert_eq!(cells[5], format!("127.0.0.1:{port}"));
    assert_eq!(cells[7], "Available");

    // One app: its instances, once CPU and memory have been sampled.
    let single: Value =
        serde_json::from_slice(&d.cli(&["status", "web", "-o", "json"]).stdout).unwrap();
    assert_eq!(single["name"], "web");
    let detail = eventually(T, "CPU and RSS sampled", || {
        let text = stdout(&d.cli(&["status", "web"]));
        // CPU is use since the previous sample: it takes two samples.
        (text.matches('%').count() >= 2 && text.contains("Mi")).then_some(text)
    });
    assert!(detail.contains("Phase:     Available"), "{detail}");
    let header = detail
        .lines()
        .find(|l| l.trim_start().starts_with("INSTANCE"))
        .unwrap();
    for col in ["PID", "STATE", "RESTARTS", "UPTIME", "CPU", "RSS"] {
        assert!(header.contains(col), "{col} missing: {header}");
    }
    for (index, pid) in &pids {
        let cells = row(&detail, &index.to_string());
        assert_eq!(cells[1], pid.to_string());
        assert_eq!(cells[2], "Ready");
        assert_eq!(cells[4], "0");
        assert!(cells[5].ends_with('s'), "uptime {cells:?}");
        assert!(cells[6].ends_with('%'), "cpu {cells:?}");
        assert!(cells[7].ends_with("Mi"), "rss {cells:?}");
    }
    let missing = d.cli(&["status", "nope"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no app named nope"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn events_show_spawn_ready_and_drain_with_times() {
    let d = Daemon::start();
    let port = free_port();
    d.write_manifest("web.yaml", &demo_manifest("web", port, 1, ""));
    d.wait_phase("web", "Available", T);
    let out = d.cli(&["reload", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1/1 replaced"), "{}", stdout(&out));
    let text = eventually(T, "the old worker's exit event", || {
        let text = stdout(&d.cli(&["events", "web"]));
        text.contains(" stopped ").then_some(text)
    });
    let mut kinds = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with(' ')) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        // 2026-11-25T10:00:00.123Z  web[0]  spawn  pid 4242 ... (milliseconds: the
        // events of one reload share a second)
        let time = cells[0];
        assert!(
            time.len() == 24
                && time.as_bytes()[10] == b'T'
                && time.as_bytes()[19] == b'.'
                && time.ends_with('Z'),
            "no RFC 3339 time with milliseconds: {line}"
        );
        assert!(cells[1].starts_with("web"), "{line}");
        kinds.push(cells[2].to_string());
    }
    for kind in [
        "manifest", "spawn", "ready", "reload", "drain", "signal", "stopped",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} event in\n{text}"
        );
    }
    let spawn = kinds.iter().position(|k| k == "spawn").unwrap();
    let ready = kinds.iter().position(|k| k == "ready").unwrap();
    let drain = kinds.iter().position(|k| k == "drain").unwrap();
    assert!(spawn < ready && ready < drain, "{kinds:?}");
    // Every app's events include this one's; an unknown app has none.
    assert!(stdout(&d.cli(&["events"])).contains("web[0]"));
    assert_eq!(stdout(&d.cli(&["events", "nope"])), "");
}

#[test]
fn logs_tail_and_instance() {
    let d = Daemon::start();
    d.write_manifest(
        "chatty.yaml",
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: chatty\nspec:\n  command: [sh, -c, 'for i in $(seq 1 30); do echo \"line $i of $CLUSTERD_INSTANCE\"; done; exec sleep 600']\n  instances: 2\n  shutdown: {signal: SIGTERM, timeout: 5s}\n",
    );
    d.wait_phase("chatty", "Available", T);
    eventually(T, "30 lines per instance", || {
        let out = d.cli(&["logs", "chatty", "--tail", "100"]);
        (stdout(&out).lines().count() == 60).then_some(())
    });

    // Each line: `TIME chatty[i] text`, instances merged in time order.
    let untimed = |o: &Output| -> Vec<String> {
        stdout(o)
            .lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_string())
            .collect()
    };
    let out = d.cli(&["logs", "chatty", "--tail", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = untimed(&out);
    for i in 0..2 {
        let mine: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("chatty[{i}] ")))
            .collect();
        assert_eq!(
            mine,
            [28, 29, 30]
                .map(|n| format!("chatty[{i}] line {n} of {i}"))
                .iter()
                .collect::<Vec<_>>()
        );
    }
    let out = d.cli(&["logs", "chatty", "--instance", "1", "--tail", "2"]);
    assert_eq!(
        untimed(&out),
        ["chatty[1] line 29 of 1", "chatty[1] line 30 of 1"]
    );
    let out = d.cli(&["logs", "chatty", "--instance", "7"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no logs for chatty instance 7"),
        "{}",
        stderr(&out)
    );
}

/// A valid manifest, padded with comments to `size` bytes so a non-atomic write would
/// be observable half-done.
fn padded_manifest(instances: u32, size: usize, fill: char) -> String {
    let mut m = format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: [demo-server]\n  instances: {instances}\n"
    );
    let line = format!("# {}\n", fill.to_string().repeat(76));
    while m.len() + line.len() < size {
        m.push_str(&line);
    }
    m
}

#[test]
fn apply_writes_atomically_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let versions = [
        padded_manifest(2, 600_000, 'a'),
        padded_manifest(3, 700_000, 'b'),
    ];
    let dest = apps.join("web.yaml");

    // A reader that must only ever see a whole version (or no file yet).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, dest, versions) = (stop.clone(), dest.clone(), versions.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(&dest) {
                    assert!(
                        versions.contains(&text),
                        "reader saw a partial file of {} bytes",
                        text.len()
                    );
                    reads += 1;
                }
            }
            reads
        })
    };
    for round in 0..12 {
        let file = src.join("web.yaml");
        std::fs::write(&file, &versions[round % 2]).unwrap();
        let out = clusterd(&[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--apps-dir",
            apps.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw a partial file");
    assert!(reads > 0);
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), versions[1]);
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(listing(&apps), ["web.yaml"], "temp files left behind");

    // Invalid: nothing written, exit 1, the error with its position.
    let bad = src.join("api.yaml");
    std::fs::write(
        &bad,
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: api\nspec:\n  command: [x]\n  instnaces: 2\n",
    )
    .unwrap();
    let out = clusterd(&[
        "apply",
        "-f",
        bad.to_str().unwrap(),
        "--apps-dir",
        apps.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("api.yaml:7:3: unknown field `instnaces`"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("nothing applied"));
    assert_eq!(listing(&apps), ["web.yaml"]);

    // A git-managed apps dir belongs to the repository, not to apply.
    std::fs::write(apps.join(".clusterd-git"), "").unwrap();
    let out = clusterd(&[
        "apply",
        "-f",
        src.join("web.yaml").to_str().unwrap(),
        "--apps-dir",
        apps.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("managed by git"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), versions[1]);
    assert_eq!(listing(&apps), [".clusterd-git", "web.yaml"]);
}

fn diff_manifest(instances: u32, env_value: &str) -> String {
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: [demo-server]\n  instances: {instances}\n  env:\n    API_KEY: {env_value}\n"
    )
}

#[test]
fn diff_exit_codes_and_what_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    std::fs::write(apps.join("web.yaml"), diff_manifest(2, "hunter2-old")).unwrap();
    let candidate: PathBuf = dir.path().join("web.yaml");
    let run = |text: &str| {
        std::fs::write(&candidate, text).unwrap();
        clusterd(&[
            "diff",
            "-f",
            candidate.to_str().unwrap(),
            "--apps-dir",
            apps.to_str().unwrap(),
        ])
    };

    let same = run(&diff_manifest(2, "hunter2-old"));
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}{}",
        stdout(&same),
        stderr(&same)
    );
    assert!(stdout(&same).contains("no changes"), "{}", stdout(&same));

    let scaled = run(&diff_manifest(4, "hunter2-old"));
    assert_eq!(scaled.status.code(), Some(1));
    assert!(
        stdout(&scaled).contains("~ web: scaled 2 -> 4"),
        "{}",
        stdout(&scaled)
    );

    let rolled = run(&diff_manifest(2, "hunter2-new"));
    assert_eq!(rolled.status.code(), Some(1));
    assert!(
        stdout(&rolled).contains("rolling replacement (env.API_KEY changed)"),
        "{}",
        stdout(&rolled)
    );
    let all = format!("{}{}", stdout(&rolled), stderr(&rolled));
    assert!(!all.contains("hunter2"), "diff printed an env value: {all}");

    let invalid = run("apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec: {command: [x], instances: lots}\n");
    assert_eq!(invalid.status.code(), Some(2), "{}", stdout(&invalid));
    assert!(
        stderr(&invalid).contains("web.yaml:4:"),
        "{}",
        stderr(&invalid)
    );

    // diff never writes.
    assert_eq!(
        std::fs::read_to_string(apps.join("web.yaml")).unwrap(),
        diff_manifest(2, "hunter2-old")
    );
}

#[test]
fn export_kubernetes_of_the_examples() {
    let files = yaml_files("manifests");
    let mut args = vec!["export", "kubernetes"];
    args.extend(files.iter().map(String::as_str));
    let out = clusterd(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.matches("kind: Deployment").count(),
        files.len(),
        "{text}"
    );
    assert_eq!(text.matches("kind: Service").count(), files.len(), "{text}");
    let bad = clusterd(&["export", "kubernetes", "tests/fixtures/invalid/typo.yaml"]);
    assert_eq!(bad.status.code(), Some(1));
}

//! `clusterd import pm2` on real ecosystem files (tests/fixtures/pm2/, in the shapes of
//! PM2's documentation): every output is compared with its expected manifest (comments
//! with the unmapped options included) and validated by `clusterd validate`; the cluster
//! example is then run by the daemon end to end.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/pm2")
}

fn import(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(clusterd_bin());
    cmd.arg("import")
        .arg("pm2")
        .args(args)
        .current_dir(fixtures());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run clusterd import pm2")
}

/// Imports `file` into a temp dir, validates the result, and compares every manifest
/// with `expected/<stem>/<app>.yaml` (set `UPDATE_EXPECTED=1` to rewrite them).
fn check(file: &str, extra: &[&str], expected: &str, apps: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out_arg = out_dir.path().to_str().unwrap();
    let mut args = vec![file, "-o", out_arg];
    args.extend_from_slice(extra);
    let out = import(&args, &[]);
    assert!(
        out.status.success(),
        "import {file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let validate = Command::new(clusterd_bin())
        .arg("validate")
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "clusterd validate rejected the import of {file}: {}",
        String::from_utf8_lossy(&validate.stdout)
    );
    let mut written: Vec<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    let mut want: Vec<String> = apps.iter().map(|a| format!("{a}.yaml")).collect();
    want.sort();
    assert_eq!(written, want, "files written for {file}");
    let root = fixtures().display().to_string();
    for app in apps {
        let got = read(&out_dir.path().join(format!("{app}.yaml"))).replace(&root, "<fixtures>");
        let expected_path = fixtures()
            .join("expected")
            .join(expected)
            .join(format!("{app}.yaml"));
        if std::env::var_os("UPDATE_EXPECTED").is_some() {
            std::fs::create_dir_all(expected_path.parent().unwrap()).unwrap();
            std::fs::write(&expected_path, &got).unwrap();
        }
        assert_eq!(
            got,
            read(&expected_path),
            "{file}: {app}.yaml differs from {}",
            expected_path.display()
        );
    }
}

#[test]
fn pm2_ecosystem_files_of_every_shape_import_and_validate() {
    // .js (cluster mode, wait_ready, listen_timeout, kill_timeout, max_memory_restart, env)
    check("cluster/ecosystem.config.js", &[], "cluster", &["api"]);
    // .json (interpreter + interpreter_args + args list, cwd, fork with 3, autorestart
    // false, log options that do not map, a name that must be made valid)
    check("json/ecosystem.json", &[], "json", &["report-worker"]);
    // .yml (instances max, exp_backoff_restart_delay, stop_exit_codes, restart_delay,
    // max_restarts/min_uptime, watch and cron_restart)
    check("yaml/process.yml", &[], "yaml", &["web", "cleanup"]);
    // .cjs with --env staging (env_NAME), instances -1, node_args, interpreter none,
    // uid/gid, a deploy section, an app without a name
    check(
        "multi/ecosystem.config.cjs",
        &["--env", "staging"],
        "multi",
        &["gateway", "metrics-exporter", "scheduler"],
    );
    // .mjs (export default), instances as a string, fork mode with a PORT
    check("esm/ecosystem.config.mjs", &[], "esm", &["esm-app"]);
    // `pm2 jlist` output: one entry per process, PM2's own and the shell's variables
    check("jlist/pm2-jlist.json", &[], "jlist", &["api", "mailer"]);
}

#[test]
fn pm2_import_refuses_bad_files_and_overwrites_only_with_force() {
    let out = import(&["no-such-file.json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ecosystem.json");
    std::fs::write(&bad, "{\"apps\": [{\"name\": \"x\",\n \"script\": 1}]}").unwrap();
    let out = import(&[bad.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("app `x`") && err.contains("script"), "{err}");
    std::fs::write(&bad, "{\"apps\": [").unwrap();
    let err = String::from_utf8_lossy(&import(&[bad.to_str().unwrap()], &[]).stderr).into_owned();
    assert!(
        err.contains("ecosystem.json:1:"),
        "JSON errors carry file:line:column: {err}"
    );

    let out_dir = dir.path().join("out");
    let args = ["json/ecosystem.json", "-o", out_dir.to_str().unwrap()];
    assert!(import(&args, &[]).status.success());
    let again = import(&args, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(import(&forced, &[]).status.success());
}

#[test]
fn an_imported_pm2_cluster_app_runs_under_the_daemon() {
    if which("node").is_none() {
        eprintln!("SKIP: node is not installed");
        return;
    }
    let d = Daemon::start();
    let port = free_port();
    let out = import(
        &[
            "cluster/ecosystem.config.js",
            "--env",
            "production",
            "-o",
            d.apps_dir.to_str().unwrap(),
        ],
        &[("TEST_PORT", &port.to_string())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready through readiness ipc: the app's own process.send('ready') (PM2's wait_ready).
    let app = d.wait_phase("api", "Available", Duration::from_secs(30));
    assert_eq!(app["ready"], 2);
    let (status, body) = http_get(local(port), "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("env production greeting hello"),
        "env and env_production merged: {body}"
    );
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|c| c.exists())
    })
}

//! GitOps through the real daemon: a local bare repository (never the network), the
//! daemon following it, `clusterd sync` to fetch now.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn commit(work: &Path, msg: &str) {
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "--allow-empty", "-m", msg]);
    git(work, &["push", "-q", "origin", "HEAD:main"]);
}

fn sync(d: &Daemon) -> std::process::Output {
    d.cli(&["sync"])
}

#[test]
fn daemon_follows_a_repository_add_change_bad_commit_delete_and_refuses_an_empty_checkout() {
    let repos = tempfile::tempdir().unwrap();
    let bare = repos.path().join("apps.git");
    let work = repos.path().join("work");
    git(
        repos.path(),
        &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    git(
        repos.path(),
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(work.join("hosts/a")).unwrap();
    std::fs::write(work.join("hosts/a/README"), "manifests for host a\n").unwrap();
    commit(&work, "empty host");

    let url = format!("file://{}", bare.display());
    let d = Daemon::start_with(&[
        "--git-repo",
        &url,
        "--git-ref",
        "main",
        "--git-path",
        "hosts/a",
        "--git-interval",
        "1h",
    ]);
    let port = free_port();

    // Add.
    std::fs::write(
        work.join("hosts/a/web.yaml"),
        demo_manifest("web", port, 2, ""),
    )
    .unwrap();
    commit(&work, "add web");
    let out = sync(&d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let status = d.status();
    assert_eq!(status["sync"]["ref"], "main");
    assert!(
        status["sync"]["commit"]
            .as_str()
            .is_some_and(|c| c.len() >= 7),
        "{status}"
    );
    assert!(status["sync"]["error"].is_null());
    // A git-managed apps dir refuses `apply`.
    let out = d.cli(&[
        "apply",
        "-f",
        work.join("hosts/a/web.yaml").to_str().unwrap(),
        "--apps-dir",
        d.apps_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("git"));

    // Change: rolls out.
    let before = d.ready_pids("web");
    std::fs::write(
        work.join("hosts/a/web.yaml"),
        demo_manifest("web", port, 2, "    CHANGED: \"yes\"\n"),
    )
    .unwrap();
    commit(&work, "change web");
    assert!(sync(&d).status.success());
    eventually(Duration::from_secs(20), "web rolled over", || {
        let now = d.ready_pids("web");
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    });
    d.wait_phase("web", "Available", Duration::from_secs(20));
    let good = d.ready_pids("web");

    // A bad commit: the app stays on its last good revision, phase Invalid.
    std::fs::write(
        work.join("hosts/a/web.yaml"),
        "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec:\n  instnaces: 2\n",
    )
    .unwrap();
    commit(&work, "break web");
    assert!(sync(&d).status.success());
    let app = d.wait_phase("web", "Invalid", Duration::from_secs(20));
    assert!(
        app["error"].as_str().unwrap().contains("web.yaml:5:3"),
        "{app}"
    );
    assert_eq!(d.ready_pids("web"), good);
    assert_eq!(http_get(local(port), "/").unwrap().0, 200);

    // An empty checkout of a wrong path is refused: nothing is pruned.
    let status_before = d.status()["sync"]["commit"].clone();
    std::fs::remove_dir_all(work.join("hosts/a")).unwrap();
    std::fs::create_dir_all(work.join("hosts/b")).unwrap();
    std::fs::write(work.join("hosts/b/README"), "moved\n").unwrap();
    commit(&work, "oops: moved the directory");
    let out = sync(&d);
    assert!(!out.status.success(), "an empty checkout must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = d.status();
    assert!(status["sync"]["error"].as_str().is_some(), "{status}");
    assert_eq!(status["sync"]["commit"], status_before);
    assert_eq!(d.ready_pids("web"), good, "nothing pruned");

    // A real deletion: the commit removes the manifest but keeps the directory.
    std::fs::create_dir_all(work.join("hosts/a")).unwrap();
    std::fs::write(work.join("hosts/a/README"), "back\n").unwrap();
    std::fs::write(
        work.join("hosts/a/web.yaml"),
        demo_manifest("web", port, 2, "    CHANGED: \"yes\"\n"),
    )
    .unwrap();
    commit(&work, "restore");
    assert!(sync(&d).status.success());
    d.wait_phase("web", "Available", Duration::from_secs(20));
    std::fs::remove_file(work.join("hosts/a/web.yaml")).unwrap();
    commit(&work, "delete web");
    assert!(sync(&d).status.success());
    eventually(Duration::from_secs(20), "web pruned and forgotten", || {
        d.app("web").is_none().then_some(())
    });
    let events = String::from_utf8_lossy(&d.cli(&["events"]).stdout).to_string();
    assert!(events.contains("applied commit"), "{events}");
}

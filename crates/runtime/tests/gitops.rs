//! GitOps sync against real git repositories made in temp dirs (a bare "remote" and a
//! work clone). Only `file://` URLs: no test ever contacts a network address.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clusterd_runtime::gitops::{
    read_applied, run_sync_loop, sync_once, GitCli, GitOpsConfig, GitOpsError, SyncOutcome,
    SyncStatus, ALLOW_EMPTY_FILE, MARKER_FILE,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Fixture {
    _tmp: tempfile::TempDir,
    bare: PathBuf,
    work: PathBuf,
    apps: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let fx = Fixture {
            bare: root.join("remote.git"),
            work: root.join("work"),
            apps: root.join("apps"),
            state: root.join("state"),
            _tmp: tmp,
        };
        git_in(
            &root,
            &["init", "--quiet", "--bare", "-b", "main", "remote.git"],
        );
        git_in(&root, &["init", "--quiet", "-b", "main", "work"]);
        fx.git(&["remote", "add", "origin", fx.bare.to_str().unwrap()]);
        fx
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    fn git(&self, args: &[&str]) -> String {
        git_in(&self.work, args)
    }

    fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let path = self.work.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn remove(&self, rel: &str) {
        self.git(&["rm", "--quiet", rel]);
    }

    /// Commits everything and pushes it to the remote's main; returns the commit id.
    fn commit(&self, msg: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", msg]);
        self.git(&[
            "push",
            "--quiet",
            "--force",
            "origin",
            "HEAD:refs/heads/main",
        ]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn cfg(&self, git_ref: &str, path: &str) -> GitOpsConfig {
        GitOpsConfig::new(self.url(), git_ref, path, &self.apps, &self.state)
    }

    fn sync(&self, git_ref: &str, path: &str) -> Result<SyncOutcome, GitOpsError> {
        self.sync_cfg(&self.cfg(git_ref, path))
    }

    fn sync_cfg(&self, cfg: &GitOpsConfig) -> Result<SyncOutcome, GitOpsError> {
        let git = GitCli::for_repo(&cfg.state_dir, &cfg.repo, Duration::from_secs(30));
        sync_once(&git, cfg)
    }

    /// Manifest files in the apps dir (hidden files excluded), name -> content.
    fn apps_files(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(&self.apps)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .map(|n| (n.clone(), std::fs::read(self.apps.join(&n)).unwrap()))
            .collect()
    }

    fn app(&self, name: &str) -> String {
        String::from_utf8(std::fs::read(self.apps.join(name)).unwrap()).unwrap()
    }
}

fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn manifest(name: &str, instances: u32) -> String {
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [\"sleep\", \"1000\"]\n  instances: {instances}\n"
    )
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn add_change_delete_follow_the_commit() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 2));
    fx.write("apps/README.md", "not a manifest\n");
    fx.write("other/ignored.yaml", manifest("ignored", 1));
    let c1 = fx.commit("web");

    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.commit.0, c1);
    assert_eq!(out.added, names(&["web.yaml"]));
    assert_eq!(
        fx.apps_files().keys().cloned().collect::<Vec<_>>(),
        names(&["web.yaml"])
    );
    assert_eq!(fx.app("web.yaml"), manifest("web", 2));

    // The marker tells `apply` to keep out; the state dir remembers the commit.
    let marker = std::fs::read_to_string(fx.apps.join(MARKER_FILE)).unwrap();
    assert!(
        marker.contains(&format!("repo: {}", fx.url()))
            && marker.contains("ref: main")
            && marker.contains("path: apps")
    );
    assert_eq!(read_applied(&fx.state).unwrap().commit, c1);
    // The cache may hold other hosts' manifests: root-only.
    let mode = std::fs::metadata(fx.state.join("git"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    // Manifests are never group- or world-writable (the daemon refuses those as root).
    let mode = std::fs::metadata(fx.apps.join("web.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o022, 0);
    assert_eq!(
        SyncStatus::initial(&fx.cfg("main", "apps"))
            .commit
            .as_deref(),
        Some(c1.as_str())
    );

    // Nothing new: nothing written.
    let again = fx.sync("main", "apps").unwrap();
    assert!(again.is_noop());
    assert_eq!(again.unchanged, names(&["web.yaml"]));

    // Change one, add one.
    fx.write("apps/web.yaml", manifest("web", 4));
    fx.write("apps/api.yml", manifest("api", 1));
    fx.commit("scale web, add api");
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.changed, names(&["web.yaml"]));
    assert_eq!(out.added, names(&["api.yml"]));
    assert_eq!(fx.app("web.yaml"), manifest("web", 4));

    // Delete one: pruned; a file the user put next to them that is not a manifest stays.
    std::fs::write(fx.apps.join("notes.txt"), "mine").unwrap();
    fx.remove("apps/api.yml");
    let c3 = fx.commit("drop api");
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.removed, names(&["api.yml"]));
    assert_eq!(out.commit.0, c3);
    assert_eq!(
        fx.apps_files().keys().cloned().collect::<Vec<_>>(),
        names(&["notes.txt", "web.yaml"])
    );

    // A local edit of a git-managed file is drift: the next sync puts the commit back.
    std::fs::write(fx.apps.join("web.yaml"), "edited by hand").unwrap();
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.changed, names(&["web.yaml"]));
    assert_eq!(fx.app("web.yaml"), manifest("web", 4));
}

#[test]
fn a_broken_manifest_is_written_anyway_and_others_follow() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 2));
    fx.write("apps/api.yaml", manifest("api", 2));
    fx.commit("two apps");
    fx.sync("main", "apps").unwrap();

    let junk: Vec<u8> = (0u8..=255).cycle().take(4096).collect();
    fx.write(
        "apps/web.yaml",
        "apiVersion: clusterd/v1\nkind: App\nspec: [unclosed\n",
    );
    fx.write("apps/api.yaml", manifest("api", 3));
    fx.write("apps/junk.yaml", &junk);
    fx.commit("break web, scale api, add junk");
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.changed, names(&["api.yaml", "web.yaml"]));
    assert_eq!(out.added, names(&["junk.yaml"]));
    assert_eq!(fx.app("api.yaml"), manifest("api", 3));
    assert!(fx.app("web.yaml").contains("[unclosed"));
    assert_eq!(std::fs::read(fx.apps.join("junk.yaml")).unwrap(), junk);
}

#[test]
fn a_missing_directory_is_refused_and_nothing_is_pruned() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 2));
    fx.commit("web");
    fx.sync("main", "apps").unwrap();
    let before = fx.apps_files();

    // A typo in --git-path.
    let err = fx.sync("main", "apss").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, GitOpsError::RefuseEmpty { .. }), "{text}");
    assert!(
        text.starts_with("refusing to prune every app: apss at "),
        "{text}"
    );
    assert_eq!(fx.apps_files(), before);

    // The directory deleted in the repository, with no opt-in: refused too.
    fx.remove("apps/web.yaml");
    fx.write("elsewhere/README.md", "x");
    fx.commit("remove the whole dir");
    let err = fx.sync("main", "apps").unwrap_err();
    assert!(
        err.to_string().contains("does not exist in that commit"),
        "{err}"
    );
    assert_eq!(fx.apps_files(), before);
}

#[test]
fn an_empty_directory_in_rewritten_history_is_refused() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 2));
    fx.commit("web");
    fx.sync("main", "apps").unwrap();
    let before = fx.apps_files();

    // Someone force-pushes an unrelated history whose directory has no manifests.
    fx.git(&["checkout", "--quiet", "--orphan", "rewrite"]);
    fx.git(&["rm", "-r", "--quiet", "--cached", "."]);
    std::fs::remove_file(fx.work.join("apps/web.yaml")).unwrap();
    fx.write("apps/README.md", "nothing here\n");
    fx.commit("orphan");
    let err = fx.sync("main", "apps").unwrap_err();
    assert!(err.to_string().contains("not an ancestor"), "{err}");
    assert_eq!(fx.apps_files(), before);
    // The status keeps the last applied commit and shows the error.
    let mut status = SyncStatus::initial(&fx.cfg("main", "apps"));
    status.record(&Err(err), std::time::SystemTime::now());
    assert!(status.commit.is_some() && status.error.is_some());
}

#[test]
fn deleting_every_manifest_in_a_real_commit_prunes_them() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 2));
    fx.write("apps/api.yaml", manifest("api", 2));
    fx.write("apps/README.md", "apps of this host\n");
    fx.commit("two apps");
    fx.sync("main", "apps").unwrap();

    fx.remove("apps/web.yaml");
    fx.remove("apps/api.yaml");
    fx.commit("retire everything");
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.removed, names(&["api.yaml", "web.yaml"]));
    assert!(fx.apps_files().is_empty());
}

#[test]
fn allow_empty_file_lets_a_first_sync_empty_the_dir() {
    let fx = Fixture::new();
    std::fs::create_dir_all(&fx.apps).unwrap();
    std::fs::write(fx.apps.join("handmade.yaml"), manifest("handmade", 1)).unwrap();

    // First sync, empty directory, no record to compare with: refused.
    fx.write("apps/README.md", "x");
    fx.commit("empty");
    let err = fx.sync("main", "apps").unwrap_err();
    assert!(
        err.to_string()
            .contains("no commit of this repository was applied here before"),
        "{err}"
    );
    assert!(fx.apps.join("handmade.yaml").exists());

    fx.write(&format!("apps/{ALLOW_EMPTY_FILE}"), "");
    fx.commit("allow empty");
    let out = fx.sync("main", "apps").unwrap();
    assert_eq!(out.removed, names(&["handmade.yaml"]));
}

#[test]
fn a_missing_directory_with_an_empty_apps_dir_is_an_error() {
    let fx = Fixture::new();
    fx.write("hosts/web1/web.yaml", manifest("web", 1));
    fx.commit("web1 only");
    let err = fx.sync("main", "hosts/web2").unwrap_err();
    assert!(matches!(err, GitOpsError::PathMissing { .. }), "{err}");
    // The repository root works as a path too.
    fx.write("root.yaml", manifest("root", 1));
    fx.commit("root app");
    let out = fx.sync("main", ".").unwrap();
    assert_eq!(out.added, names(&["root.yaml"]));
}

#[test]
fn tags_and_commit_ids_as_ref() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 1));
    let c1 = fx.commit("v1");
    fx.git(&["tag", "v1"]);
    fx.git(&["tag", "-a", "-m", "release", "release-1"]);
    fx.git(&["push", "--quiet", "origin", "v1", "release-1"]);
    fx.write("apps/web.yaml", manifest("web", 5));
    let c2 = fx.commit("v2");

    let out = fx.sync("v1", "apps").unwrap();
    assert_eq!(out.commit.0, c1);
    assert_eq!(fx.app("web.yaml"), manifest("web", 1));

    let out = fx.sync(&c2, "apps").unwrap();
    assert_eq!(out.commit.0, c2);
    assert_eq!(fx.app("web.yaml"), manifest("web", 5));

    // An annotated tag resolves to its commit.
    let out = fx.sync("release-1", "apps").unwrap();
    assert_eq!(out.commit.0, c1);
    let out = fx.sync("refs/heads/main", "apps").unwrap();
    assert_eq!(out.commit.0, c2);

    let err = fx.sync("no-such-branch", "apps").unwrap_err();
    assert!(matches!(err, GitOpsError::Git { op: "fetch", .. }), "{err}");
}

#[test]
fn credentials_never_appear_in_errors_status_or_state() {
    let fx = Fixture::new();
    let secret = "s3cretPassw0rd";
    let url = format!("file://deploy:{secret}@{}/missing.git", fx.work.display());
    let cfg = GitOpsConfig::new(&url, "main", "apps", &fx.apps, &fx.state);
    let err = fx.sync_cfg(&cfg).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains(secret), "{text}");
    assert!(!format!("{err:?}").contains(secret));
    assert!(!format!("{cfg:?}").contains(secret));

    let mut status = SyncStatus::initial(&cfg);
    status.record(&Err(err), std::time::SystemTime::now());
    assert!(!format!("{status:?}").contains(secret));
    for entry in walk(&fx.state).into_iter().chain(walk(&fx.apps)) {
        let name = entry.display().to_string();
        assert!(!name.contains(secret), "{name}");
        if entry.is_file() {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains(secret), "{name}");
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_concurrent_reader_never_sees_a_half_written_file() {
    let fx = Fixture::new();
    let big = |fill: char| {
        let mut s = manifest("big", 1);
        let line: String = std::iter::repeat_n(fill, 100).collect();
        for _ in 0..20_000 {
            s.push_str("# ");
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str("# end\n");
        s.into_bytes()
    };
    let (v1, v2) = (big('a'), big('b'));
    fx.write("apps/big.yaml", &v1);
    let c1 = fx.commit("v1");
    fx.write("apps/big.yaml", &v2);
    let c2 = fx.commit("v2");
    fx.sync(&c1, "apps").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, file) = (stop.clone(), reads.clone(), fx.apps.join("big.yaml"));
        let (v1, v2) = (v1.clone(), v2.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let got = std::fs::read(&file).expect("the file always exists");
                assert!(got == v1 || got == v2, "torn read: {} bytes", got.len());
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for round in 0..12 {
        let out = fx
            .sync(if round % 2 == 0 { &c2 } else { &c1 }, "apps")
            .unwrap();
        assert_eq!(out.changed, names(&["big.yaml"]));
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader saw only whole files");
    assert!(reads.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn the_loop_syncs_at_start_and_on_demand() {
    let fx = Fixture::new();
    fx.write("apps/web.yaml", manifest("web", 1));
    fx.commit("web");
    let mut cfg = fx.cfg("main", "apps");
    cfg.interval = Duration::from_secs(3600);

    let (trigger_tx, trigger_rx) = mpsc::channel(4);
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_sync_loop(
        cfg,
        trigger_rx,
        move |report| {
            let _ = report_tx.send(report);
        },
        shutdown.clone(),
    ));

    let first = tokio::time::timeout(Duration::from_secs(30), report_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.outcome.unwrap().added, names(&["web.yaml"]));
    assert!(first.status.error.is_none() && first.status.at.is_some());

    fx.write("apps/api.yaml", manifest("api", 1));
    let c2 = fx.commit("api");
    let (reply_tx, reply_rx) = oneshot::channel();
    trigger_tx.send(reply_tx).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), reply_rx)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.added, names(&["api.yaml"]));
    let second = report_rx.recv().await.unwrap();
    assert_eq!(second.status.commit.as_deref(), Some(c2.as_str()));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn a_hung_git_is_killed_at_the_timeout() {
    let fx = Fixture::new();
    // An ssh "transport" that never answers: git hands the host to this command instead
    // of ssh, so nothing is resolved or contacted. `#` comments out the arguments git adds.
    let url = "ssh://deploy:hunter2secret@clusterd-test.invalid/fleet.git";
    let cfg = GitOpsConfig::new(url, "main", "apps", &fx.apps, &fx.state);
    let git = GitCli::for_repo(&cfg.state_dir, url, Duration::from_millis(500))
        .env("GIT_SSH_COMMAND", "sleep 30 #");
    let started = std::time::Instant::now();
    let err = sync_once(&git, &cfg).unwrap_err();
    assert!(
        matches!(err, GitOpsError::Timeout { op: "fetch", .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!err.to_string().contains("hunter2secret"), "{err}");
}

//! `clusterd top` driven through tmux against a real daemon: what it shows (capture-pane),
//! that it follows a scale, that its keys reload and follow logs, and that q and Ctrl-C
//! leave it with exit 0 and the terminal restored (alternate screen off).
//!
//! Each test runs its own tmux server on a private socket in a temp dir and kills only
//! that server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

/// A private tmux server with one session running `clusterd top`.
struct Tmux {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Tmux {
    fn top(daemon_socket: &Path) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("CLUSTERD_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                "tmux is missing and CLUSTERD_REQUIRE_TOOLS=1 (.ci/run installs it)"
            );
            eprintln!("SKIP: tmux is not installed (apt-get install tmux)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        // The shell waits for top and writes its exit status down: tmux sometimes never
        // learns a pane's exit status (its child stays a zombie on a loaded machine).
        let cmd = format!(
            "env CLUSTERD_SOCKET='{}' TERM=xterm-256color '{}' top; echo $? > '{}'",
            daemon_socket.display(),
            clusterd_bin().display(),
            dir.path().join("exit").display()
        );
        let t = Tmux { _dir: dir, socket };
        let out = t
            .tmux()
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "45",
            ])
            .arg(cmd)
            .arg(";")
            .args(["set-option", "-t", "top", "remain-on-exit", "on"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(t)
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }

    fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", "top"])
            .args(keys)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux send-keys {keys:?}");
    }

    /// `pane_dead pane_dead_status alternate_on`.
    fn pane(&self) -> String {
        let out = self
            .tmux()
            .args([
                "display-message",
                "-p",
                "-t",
                "top",
                "#{pane_dead} #{pane_dead_status} #{alternate_on}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_screen(&self, timeout: Duration, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.screen();
            if cond(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; screen:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `1 STATUS ALTERNATE_ON` once top has exited: its status from the wrapping shell,
    /// whether the terminal is still on the alternate screen from tmux.
    fn wait_exit(&self) -> String {
        let status = eventually(Duration::from_secs(30), "top to exit", || {
            let text = std::fs::read_to_string(self._dir.path().join("exit")).ok()?;
            text.ends_with('\n').then(|| text.trim().to_string())
        });
        let alternate = self
            .pane()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        format!("1 {status} {alternate}")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").output();
    }
}

fn pid_strings(d: &Daemon, app: &str) -> Vec<String> {
    d.ready_pids(app).iter().map(ToString::to_string).collect()
}

#[test]
fn top_shows_both_apps_follows_a_scale_reloads_and_quits_cleanly() {
    let d = Daemon::start();
    let (pa, pb) = (free_port(), free_port());
    d.write_manifest("alpha.yaml", &demo_manifest("alpha", pa, 2, ""));
    d.write_manifest("beta.yaml", &demo_manifest("beta", pb, 1, ""));
    d.wait_phase("alpha", "Available", Duration::from_secs(20));
    d.wait_phase("beta", "Available", Duration::from_secs(20));
    let Some(t) = Tmux::top(&d.socket) else {
        return;
    };

    // Both apps with their ready/desired, and the selected (first) app's worker pids.
    let alpha = pid_strings(&d, "alpha");
    let s = t.wait_screen(Duration::from_secs(10), "both apps and alpha's pids", |s| {
        s.contains("alpha") && s.contains("beta") && alpha.iter().all(|p| s.contains(p.as_str()))
    });
    assert!(s.contains("2/2") && s.contains("1/1"), "{s}");

    // Select beta: its pid shows.
    t.keys(&["Down"]);
    let beta = pid_strings(&d, "beta");
    t.wait_screen(Duration::from_secs(5), "beta's pid", |s| {
        s.contains(beta[0].as_str())
    });

    // Scale beta to 2: once the API shows the new worker, top shows it within the next
    // refresh (1 Hz); 3 s leaves room for a loaded CI machine.
    d.write_manifest("beta.yaml", &demo_manifest("beta", pb, 2, ""));
    let scaled = eventually(Duration::from_secs(20), "beta scaled to 2", || {
        let p = pid_strings(&d, "beta");
        (p.len() == 2).then_some(p)
    });
    let seen_at = Instant::now();
    t.wait_screen(Duration::from_secs(3), "the scale on screen", |s| {
        s.contains("2/2") && scaled.iter().all(|p| s.contains(p.as_str())) && !s.contains("1/1")
    });
    eprintln!(
        "top showed the scale {:?} after the API did",
        seen_at.elapsed()
    );

    // r reloads the selected app (beta), through the control API.
    let generation = d.app("beta").unwrap()["generation"].as_u64().unwrap();
    t.keys(&["r"]);
    eventually(Duration::from_secs(10), "beta's generation to move", || {
        (d.app("beta").unwrap()["generation"].as_u64().unwrap() > generation).then_some(())
    });
    t.wait_screen(Duration::from_secs(5), "the reload message", |s| {
        s.contains("beta: reload requested")
    });

    // l follows its logs; Esc closes the pane.
    t.keys(&["l"]);
    t.wait_screen(Duration::from_secs(5), "beta's log pane", |s| {
        s.contains("logs: beta") && s.contains("beta[0]")
    });
    t.keys(&["Escape"]);
    t.wait_screen(Duration::from_secs(5), "the log pane closed", |s| {
        !s.contains("logs: beta")
    });

    // q: exit 0, alternate screen off (the terminal is restored).
    t.keys(&["q"]);
    assert_eq!(t.wait_exit(), "1 0 0");
}

#[test]
fn top_exits_cleanly_on_ctrl_c_and_fails_clearly_without_a_daemon() {
    let d = Daemon::start();
    let Some(t) = Tmux::top(&d.socket) else {
        return;
    };
    t.wait_screen(Duration::from_secs(10), "the empty view", |s| {
        s.contains("No apps")
    });
    t.keys(&["C-c"]);
    assert_eq!(t.wait_exit(), "1 0 0");

    let out = Command::new(clusterd_bin())
        .arg("top")
        .env("CLUSTERD_SOCKET", d.dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach clusterd"));
}

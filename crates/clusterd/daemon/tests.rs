//! In-process tests of the controller against a fake host: what only end-to-end tests
//! covered before (adoption, intake hold-back, crash backoff, a port in use), each in
//! milliseconds, with a manual clock for the planner.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clusterd_core::intake::WriteState;
use clusterd_core::load::{load, LoadContext, ManifestFile};
use clusterd_core::model::{Listener, Logs};
use clusterd_core::plan::{AppName, ExitReason, Phase, WorkerId};
use clusterd_runtime::effects::{AdoptRequest, Effects, Report, SpawnRequest, Started};
use clusterd_runtime::procfs::GroupUsage;

use super::controller::Controller;
use super::events::EventLog;
use super::state::{self, Saved, SavedApp, SavedWorker};
use super::{Config, Msg};

/// What the controller asked of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Ensure(String, Vec<i32>),
    Retain(String, usize),
    Spawn(String, u32),
    Adopt(String, i32),
    Route(String, u64),
    Drain(String, u64),
    Signal(String, u64),
    Kill(String, u64),
    Forget(String, u64),
}

/// A host that does everything at once and remembers what it was asked.
#[derive(Default)]
struct Fake {
    calls: Vec<Call>,
    next_pid: u32,
    /// Binds fail while this is set (a port in use).
    port_taken: bool,
}

impl Effects for Fake {
    fn ensure_listeners(
        &mut self,
        app: &AppName,
        _listens: &[Listener],
        adopted: &[i32],
    ) -> Result<(), String> {
        self.calls
            .push(Call::Ensure(app.0.clone(), adopted.to_vec()));
        if self.port_taken {
            Err("127.0.0.1:9 is in use by pid 1 (holder)".into())
        } else {
            Ok(())
        }
    }
    fn retain_listeners(&mut self, app: &AppName, keep: &[Listener]) {
        if keep.is_empty() {
            self.calls.push(Call::Retain(app.0.clone(), 0));
        }
    }
    fn bound_address(&self, _: &AppName, _: &Listener) -> Option<String> {
        None
    }
    fn has_proxy(&self, _: &AppName) -> bool {
        false
    }
    async fn spawn(&mut self, req: SpawnRequest<'_>) -> Result<Started, String> {
        self.calls.push(Call::Spawn(req.app.0.clone(), req.index));
        self.next_pid += 1;
        Ok(Started {
            pid: 1000 + self.next_pid,
            start_time: 1,
            ports: Vec::new(),
            cgroup_note: None,
        })
    }
    fn adopt(&mut self, req: AdoptRequest<'_>) -> Result<Started, String> {
        self.calls.push(Call::Adopt(req.app.0.clone(), req.pid));
        Ok(Started {
            pid: u32::try_from(req.pid).unwrap(),
            start_time: req.start_time,
            ports: Vec::new(),
            cgroup_note: None,
        })
    }
    fn route(&mut self, app: &AppName, id: WorkerId, _: Option<&clusterd_core::LoadedApp>) {
        self.calls.push(Call::Route(app.0.clone(), id.0));
    }
    fn drain(&mut self, app: &AppName, id: WorkerId) {
        self.calls.push(Call::Drain(app.0.clone(), id.0));
    }
    fn signal(&mut self, app: &AppName, id: WorkerId, _: &str) {
        self.calls.push(Call::Signal(app.0.clone(), id.0));
    }
    fn kill(&mut self, app: &AppName, id: WorkerId) {
        self.calls.push(Call::Kill(app.0.clone(), id.0));
    }
    fn forget(&mut self, app: &AppName, id: WorkerId) {
        self.calls.push(Call::Forget(app.0.clone(), id.0));
    }
    fn inflight(&self, _: &AppName, _: WorkerId) -> u64 {
        0
    }
    fn sample(&mut self) -> BTreeMap<u32, GroupUsage> {
        BTreeMap::new()
    }
    fn rotate_logs(&mut self, _: &AppName, _: &Logs) {}
}

struct Harness {
    dir: tempfile::TempDir,
    clock: Arc<Mutex<Instant>>,
    ctl: Controller<Fake>,
}

fn manifest(name: &str, instances: u32, extra: &str) -> String {
    format!(
        "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: [\"sleep\", \"1000\"]\n  instances: {instances}\n  listen:\n    - port: 9\n      mode: inherit\n  readiness: {{type: delay, delay: 0s}}\n  restart: {{policy: always, backoff: {{initial: 1s, max: 8s}}}}\n{extra}"
    )
}

impl Harness {
    fn new(fake: Fake) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["apps", "state", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let config = Config {
            apps_dir: dir.path().join("apps"),
            socket: dir.path().join("sock"),
            state_dir: dir.path().join("state"),
            log_dir: dir.path().join("logs"),
            cpus: 2,
            git: None,
        };
        let clock = Arc::new(Mutex::new(Instant::now()));
        let c = clock.clone();
        let ctl = Controller::new(config, fake, EventLog::new(), None, None)
            .with_clock(move || *c.lock().unwrap());
        Harness { dir, clock, ctl }
    }

    fn apps(&self) -> std::path::PathBuf {
        self.dir.path().join("apps")
    }

    /// Writes a manifest whose mtime is `age` in the past (as if written then).
    fn write(&self, file: &str, text: &str, age: Duration) {
        let path = self.apps().join(file);
        std::fs::write(&path, text).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    fn advance(&self, d: Duration) {
        *self.clock.lock().unwrap() += d;
    }

    async fn settle(&mut self) {
        self.ctl.reconcile().await;
    }

    fn calls(&self) -> &[Call] {
        &self.ctl.effects().calls
    }

    fn phase(&self, app: &str) -> Option<Phase> {
        let a = self.ctl.world().apps.get(&AppName(app.into()))?;
        let d = a.desired(false).flatten();
        Some(clusterd_core::plan::phase(d.as_ref(), &a.observed, *self.clock.lock().unwrap()).0)
    }
}

fn revision_of(text: &str, path: &Path) -> String {
    let report = load(
        &[ManifestFile::new(path, text.as_bytes().to_vec())],
        &LoadContext {
            cpus: 2,
            incumbents: BTreeMap::new(),
            shared_mode_unavailable: None,
        },
    );
    report.apps.values().next().unwrap().revision.0.clone()
}

fn saved_workers(app: &str, revision: &str, pids: &[i32]) -> Saved {
    Saved {
        apps: vec![SavedApp {
            name: app.into(),
            generation: 0,
        }],
        workers: pids
            .iter()
            .enumerate()
            .map(|(i, pid)| SavedWorker {
                app: app.into(),
                index: u32::try_from(i).unwrap(),
                pid: *pid,
                start_time: 7,
                revision: revision.into(),
                generation: 0,
                ready: true,
                state: Some("Ready".into()),
                ports: Vec::new(),
            })
            .collect(),
    }
}

/// The bug of issue 10: a manifest written just before the daemon started used to be
/// held back, adoption then created the app as removed, drained the adopted workers and
/// closed the public socket. Now the app is never taken as gone while its file exists,
/// and the socket is taken back from the adopted workers.
#[tokio::test]
async fn adoption_with_a_fresh_manifest_keeps_workers_and_socket() {
    let mut h = Harness::new(Fake::default());
    let text = manifest("web", 2, "");
    let rev = revision_of(&text, &h.apps().join("web.yaml"));
    state::store(
        &h.dir.path().join("state"),
        &saved_workers("web", &rev, &[4001, 4002]),
    )
    .unwrap();
    // Still open for writing when the daemon starts: the intake holds it back.
    h.write("web.yaml", &text, Duration::ZERO);
    let writer = std::fs::File::options()
        .append(true)
        .open(h.apps().join("web.yaml"))
        .unwrap();
    h.ctl.start();
    h.settle().await;
    assert_eq!(
        h.calls(),
        &[
            Call::Adopt("web".into(), 4001),
            Call::Adopt("web".into(), 4002)
        ],
        "nothing but adoption may happen while the manifest settles"
    );
    // The writer closes: the manifest is accepted, the socket recovered from the adopted
    // workers, the adopted Ready workers given traffic once it is bound (the planner
    // never marks them ready again: http/tcp modes served nothing after a restart), and
    // nothing is replaced (same revision).
    drop(writer);
    h.ctl.rescan();
    h.settle().await;
    assert_eq!(
        &h.calls()[2..],
        &[
            Call::Ensure("web".into(), vec![4001, 4002]),
            Call::Route("web".into(), 1),
            Call::Route("web".into(), 2),
        ],
        "the socket must be taken back from the adopted workers, nothing else"
    );
    // Routed once: a later scan of the same manifest does not route them again.
    h.ctl.rescan();
    h.settle().await;
    assert_eq!(h.calls().len(), 5, "{:?}", h.calls());
    assert_eq!(h.phase("web"), Some(Phase::Available));
}

/// A manifest that is really gone when the daemon restarts: the adopted workers drain.
#[tokio::test]
async fn adoption_without_a_manifest_drains() {
    let mut h = Harness::new(Fake::default());
    state::store(
        &h.dir.path().join("state"),
        &saved_workers("old", "deadbeef", &[4001]),
    )
    .unwrap();
    h.ctl.start();
    h.settle().await;
    assert!(
        h.calls().contains(&Call::Drain("old".into(), 1)),
        "{:?}",
        h.calls()
    );
    assert!(
        h.calls().contains(&Call::Signal("old".into(), 1)),
        "{:?}",
        h.calls()
    );
}

/// Issue 17: with nothing changing, the daemon never reads a manifest twice; a file
/// being written waits for its close and is read at once then.
#[tokio::test]
async fn unchanged_files_are_never_read_again_and_open_files_wait_for_close() {
    let mut h = Harness::new(Fake::default());
    h.write("web.yaml", &manifest("web", 1, ""), Duration::from_secs(10));
    // 2,000 invalid documents (the file that kept the old daemon at 63 % of a CPU).
    let junk: String = (0..2000)
        .map(|i| format!("apiVersion: clusterd/v1\nkind: App\nmetadata: {{name: junk{i}}}\nspec: {{bogus: 1}}\n---\n"))
        .collect();
    h.write("junk.yaml", &junk, Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    assert_eq!(h.ctl.manifest_reads(), 2);
    for _ in 0..50 {
        h.ctl.rescan();
        h.settle().await;
    }
    assert_eq!(
        h.ctl.manifest_reads(),
        2,
        "an unchanged file was read again"
    );
    // Nothing was parsed again either: 50 scans of an unchanged dir cost a readdir and
    // two stats each.
    assert_eq!(
        h.ctl.manifest_loads(),
        1,
        "an unchanged dir was parsed again"
    );

    // An edit in progress (a writer has the file open, as an editor saving in place):
    // held back, whatever the watcher said last.
    let path = h.apps().join("web.yaml");
    let mut writer = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut writer, manifest("web", 3, "").as_bytes()).unwrap();
    h.ctl.handle(Msg::Files {
        files: vec![(path.clone(), Some(WriteState::Closed))],
        dir_gone: false,
    });
    h.ctl.rescan();
    h.settle().await;
    assert_eq!(
        h.ctl.manifest_reads(),
        2,
        "a file still open for writing was read"
    );
    // The writer closes: read at once, no quiet period.
    drop(writer);
    h.ctl.handle(Msg::Files {
        files: vec![(path, Some(WriteState::Closed))],
        dir_gone: false,
    });
    h.ctl.rescan();
    h.settle().await;
    assert_eq!(h.ctl.manifest_reads(), 3);
    let spawned = h
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Spawn(..)))
        .count();
    assert_eq!(spawned, 3, "scale 1 -> 3 after the close: {:?}", h.calls());
}

/// A crashed worker comes back only after its backoff.
#[tokio::test]
async fn a_crash_is_restarted_after_the_backoff() {
    let mut h = Harness::new(Fake::default());
    h.write("web.yaml", &manifest("web", 1, ""), Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    assert_eq!(h.calls().last(), Some(&Call::Route("web".into(), 1)));
    h.ctl.handle(Msg::Report(Report::Exited {
        app: AppName("web".into()),
        id: WorkerId(1),
        reason: ExitReason::Code(1),
    }));
    h.settle().await;
    let spawns = |h: &Harness| {
        h.calls()
            .iter()
            .filter(|c| matches!(c, Call::Spawn(..)))
            .count()
    };
    assert_eq!(
        spawns(&h),
        1,
        "restarted before the backoff: {:?}",
        h.calls()
    );
    assert_ne!(h.phase("web"), Some(Phase::Available));
    h.advance(Duration::from_millis(1100));
    h.settle().await;
    assert_eq!(
        spawns(&h),
        2,
        "not restarted after the backoff: {:?}",
        h.calls()
    );
}

/// Issue 16.3: a port in use keeps the app listed with the reason and retries; once the
/// port is free the app starts.
#[tokio::test]
async fn a_port_in_use_keeps_the_app_listed_and_is_retried() {
    let mut h = Harness::new(Fake {
        port_taken: true,
        ..Fake::default()
    });
    h.write("web.yaml", &manifest("web", 1, ""), Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    let app = &h.ctl.world().apps[&AppName("web".into())];
    assert!(app
        .runtime_error
        .as_deref()
        .unwrap()
        .contains("in use by pid 1"));
    assert!(!h.calls().iter().any(|c| matches!(c, Call::Spawn(..))));
    h.ctl.effects_mut().port_taken = false;
    h.advance(Duration::from_secs(2));
    h.settle().await;
    assert!(h.ctl.world().apps[&AppName("web".into())]
        .runtime_error
        .is_none());
    assert!(
        h.calls().contains(&Call::Spawn("web".into(), 0)),
        "{:?}",
        h.calls()
    );
}

/// Issue 18.3: a manifest that cannot be read is not a deleted one.
#[tokio::test]
async fn an_unreadable_manifest_keeps_the_app_running() {
    let mut h = Harness::new(Fake::default());
    h.write("web.yaml", &manifest("web", 1, ""), Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    // A symlink loop in place of the file.
    let path = h.apps().join("web.yaml");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&path, &path).unwrap();
    h.ctl.rescan();
    h.settle().await;
    assert!(
        !h.calls()
            .iter()
            .any(|c| matches!(c, Call::Drain(..) | Call::Retain(..))),
        "{:?}",
        h.calls()
    );
    let app = &h.ctl.world().apps[&AppName("web".into())];
    assert!(
        app.error.as_deref().unwrap().contains("symlink loop"),
        "{:?}",
        app.error
    );
    assert!(app.current.is_some());
}

/// Issue 18.10: an exit the restart policy leaves alone is `Exited`, not `Backoff`, and
/// no restart; a failure under the same policy is `Backoff`, and counts once restarted.
#[tokio::test]
async fn an_exit_that_will_not_be_restarted_is_exited_and_no_restart() {
    let mut h = Harness::new(Fake::default());
    let text = manifest("web", 2, "").replace("policy: always", "policy: on-failure");
    h.write("web.yaml", &text, Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    for (id, code) in [(1, 0), (2, 3)] {
        h.ctl.handle(Msg::Report(Report::Exited {
            app: AppName("web".into()),
            id: WorkerId(id),
            reason: ExitReason::Code(code),
        }));
    }
    h.settle().await;
    let status = |h: &Harness| {
        let a = &h.ctl.world().apps[&AppName("web".into())];
        let d = a.desired(false).flatten();
        super::status::app_status(a, h.ctl.effects(), d.as_ref(), *h.clock.lock().unwrap())
    };
    let s = status(&h);
    let states: Vec<(u32, String, u32)> = s
        .instances
        .iter()
        .map(|i| (i.index, format!("{:?}", i.state), i.restarts))
        .collect();
    assert_eq!(
        states,
        vec![(0, "Exited".into(), 0), (1, "Backoff".into(), 0)],
        "{s:?}"
    );
    assert_eq!(s.restarts, 0);
    h.advance(Duration::from_millis(1100));
    h.settle().await;
    let s = status(&h);
    assert_eq!(s.restarts, 1, "the restart of index 1 counts: {s:?}");
}

/// Issue 18.1, through the controller: the first reload's surge worker reports ready and
/// a second reload arrives before the next reconcile. Before the fix the app stayed at
/// "Progressing 3/4" with 5 workers for good; now it ends Available with 4.
#[tokio::test]
async fn two_reloads_back_to_back_do_not_wedge_the_rollout() {
    let mut h = Harness::new(Fake::default());
    let text = manifest("web", 4, "").replace("{type: delay, delay: 0s}", "{type: notify}");
    h.write("web.yaml", &text, Duration::from_secs(10));
    h.ctl.start();
    let web = || AppName("web".into());
    let reload = |h: &mut Harness| {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        h.ctl.handle(Msg::Api(
            super::api::ApiRequest::Reload(Some("web".into())),
            tx,
        ));
    };
    let ready_all = |h: &mut Harness| {
        for pid in 1001..=1000 + h.ctl.effects().next_pid {
            h.ctl.handle(Msg::Report(Report::NotifyReady { pgid: pid }));
        }
    };
    h.settle().await;
    ready_all(&mut h);
    h.settle().await;
    assert_eq!(h.phase("web"), Some(Phase::Available));
    reload(&mut h);
    h.settle().await;
    ready_all(&mut h); // the surge worker is ready...
    reload(&mut h); // ...and the next reload lands in the same reconcile
    h.settle().await;
    let mut exited = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let signalled: Vec<u64> = h
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::Signal(_, id) | Call::Kill(_, id) => Some(*id),
                _ => None,
            })
            .collect();
        for id in signalled {
            if exited.insert(id) {
                h.ctl.handle(Msg::Report(Report::Exited {
                    app: web(),
                    id: WorkerId(id),
                    reason: ExitReason::Code(0),
                }));
            }
        }
        ready_all(&mut h);
        h.advance(Duration::from_millis(100));
        h.settle().await;
        if h.phase("web") == Some(Phase::Available) {
            break;
        }
    }
    let live = h.ctl.world().apps[&web()].observed.workers.len();
    assert_eq!(
        (h.phase("web"), live),
        (Some(Phase::Available), 4),
        "{:?}",
        h.calls()
    );
}

/// Issue 18.9: a state dir that cannot be written is reported (status and events), the
/// last file written stays for adoption, and recovery is reported too.
#[tokio::test]
async fn an_unwritable_state_dir_is_reported_and_the_last_state_kept() {
    let mut h = Harness::new(Fake::default());
    h.write("web.yaml", &manifest("web", 1, ""), Duration::from_secs(10));
    h.ctl.start();
    h.settle().await;
    let state_dir = h.dir.path().join("state");
    let before = std::fs::read(state::path(&state_dir)).unwrap();
    // Even root cannot create a file where a directory is.
    std::fs::create_dir(state_dir.join(".workers.json.tmp")).unwrap();
    h.write("web.yaml", &manifest("web", 2, ""), Duration::from_secs(10));
    h.ctl.rescan();
    h.settle().await;
    let error = h.ctl.state_error().expect("reported").to_string();
    assert!(error.contains("cannot write"), "{error}");
    assert_eq!(std::fs::read(state::path(&state_dir)).unwrap(), before);
    std::fs::remove_dir(state_dir.join(".workers.json.tmp")).unwrap();
    h.write("web.yaml", &manifest("web", 3, ""), Duration::from_secs(10));
    h.ctl.rescan();
    h.settle().await;
    assert!(h.ctl.state_error().is_none());
    let saved = state::load(&state_dir);
    assert_eq!(saved.workers.len(), 3);
}

/// `tls.acme`: the runtime's certificate reports become the app's events (kebab-case
/// kinds, the listener first in the message).
#[tokio::test]
async fn certificate_reports_become_events() {
    use clusterd_runtime::tls::acme::AcmeEventKind;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        apps_dir: dir.path().join("apps"),
        socket: dir.path().join("sock"),
        state_dir: dir.path().join("state"),
        log_dir: dir.path().join("logs"),
        cpus: 2,
        git: None,
    };
    let events = EventLog::new();
    let mut ctl = Controller::new(config, Fake::default(), events.clone(), None, None);
    for (kind, message) in [
        (AcmeEventKind::Obtained, "certificate for a.test obtained"),
        (AcmeEventKind::Renewed, "certificate for a.test renewed"),
        (AcmeEventKind::Failed, "certificate for a.test: refused"),
    ] {
        ctl.handle(Msg::Report(Report::Certificate {
            app: AppName("web".into()),
            listener: "0.0.0.0:443".into(),
            kind,
            message: message.into(),
        }));
    }
    let got: Vec<(String, String)> = events
        .snapshot()
        .iter()
        .map(|e| (e.kind.as_str().to_string(), e.message.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "certificate-obtained",
                "0.0.0.0:443: certificate for a.test obtained"
            ),
            (
                "certificate-renewed",
                "0.0.0.0:443: certificate for a.test renewed"
            ),
            (
                "certificate-failed",
                "0.0.0.0:443: certificate for a.test: refused"
            ),
        ]
        .map(|(k, m)| (k.to_string(), m.to_string()))
    );
}

//! What the daemon writes down so that a restarted daemon adopts the workers of the
//! previous one instead of starting new ones (apps keep serving across a daemon crash
//! or upgrade). Only facts a new daemon can verify are kept: pids with their start
//! times (checked against /proc so a reused pid is never adopted), the template each
//! worker runs, its index and private ports.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file, in the state dir.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("workers.json")
}

/// Everything saved.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// Per app: its reload generation (so adopted workers count as current).
    pub apps: Vec<SavedApp>,
    /// Live workers.
    pub workers: Vec<SavedWorker>,
}

/// One app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedApp {
    /// Name.
    pub name: String,
    /// Reload generation.
    pub generation: u64,
}

/// One worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedWorker {
    /// App.
    pub app: String,
    /// Instance index.
    pub index: u32,
    /// Process (and group) id.
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/<pid>/stat field 22).
    pub start_time: u64,
    /// Revision it runs.
    pub revision: String,
    /// Generation it was started for.
    pub generation: u64,
    /// It was Ready (what daemons before `state` recorded).
    pub ready: bool,
    /// Starting, Ready or Draining: every worker is recorded, so a daemon that crashed
    /// mid-rollout, mid-scale or mid-drain finishes what was in progress after a restart
    /// (judges the starting, stops the draining) instead of orphaning them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Private ports, `(listener address, listener port, private port)`.
    pub ports: Vec<(String, u32, u16)>,
}

/// The world as the file records it.
pub fn project(world: &super::world::World) -> Saved {
    let mut saved = Saved::default();
    for app in world.apps.values() {
        saved.apps.push(SavedApp {
            name: app.name.0.clone(),
            generation: app.generation,
        });
        for (id, facts) in &app.procs {
            let Some(w) = app.observed.workers.get(id) else {
                continue;
            };
            saved.workers.push(SavedWorker {
                app: app.name.0.clone(),
                index: w.index,
                pid: i32::try_from(facts.pid).unwrap_or_default(),
                start_time: facts.start_time,
                revision: w.template.revision.0.clone(),
                generation: w.template.generation,
                ready: w.state == clusterd_core::plan::WorkerState::Ready,
                state: Some(format!("{:?}", w.state)),
                ports: facts
                    .ports
                    .iter()
                    .map(|(k, p)| (k.address.clone(), k.port, *p))
                    .collect(),
            });
        }
    }
    saved
        .workers
        .sort_by_key(|w| (w.app.clone(), w.index, w.pid));
    saved
}

/// Reads the file; a missing or unreadable file means nothing to adopt.
pub fn load(state_dir: &Path) -> Saved {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %p.display(), error = %e, "ignoring unreadable worker state");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// Writes the file atomically (and durably: a crash right after must find it).
///
/// # Errors
/// Why it could not be written (read-only or full state dir...).
pub fn store(state_dir: &Path, saved: &Saved) -> std::io::Result<()> {
    use std::io::Write;
    let p = path(state_dir);
    let tmp = state_dir.join(".workers.json.tmp");
    let bytes = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, &p)
}

/// Removes the file (clean shutdown: nothing left to adopt).
pub fn clear(state_dir: &Path) {
    let _ = std::fs::remove_file(path(state_dir));
}

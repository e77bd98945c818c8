//! cgroup v2: the backstop for `limits.memory` and `limits.cpu`, `limits.nproc` through
//! the pids controller, and one leaf per worker for membership even without any
//! controller.
//!
//! Membership is what makes "nothing of a worker outlives it" hold: every process a
//! worker starts, daemonized or not, stays in its leaf (see [`crate::tree`]). A cgroup
//! with no controller enabled is allowed anywhere in a v2 hierarchy, also on hybrid hosts
//! where every controller is bound to cgroup v1 and only the empty v2 tree is mounted
//! (`/sys/fs/cgroup/unified`). [`CgroupTree::membership`] finds that tree.
//!
//! The daemon replaces a worker over `limits.memory` itself (rolling, from RSS it reads
//! in [`crate::procfs`]); the cgroup's `memory.max`, set a margin above, is only the
//! kernel's backstop for a worker that grows faster than the daemon looks. Each worker
//! gets its own leaf, `<daemon's cgroup>/clusterd/<app>/<leaf>`, because limits are per
//! worker and a replacement overlaps the worker it replaces. The shim joins the leaf
//! before exec.
//!
//! Where the tree is not usable (no cgroup2 mount, controllers bound to cgroup v1, not
//! delegated/writable, the "no internal processes" rule) [`CgroupTree::detect`] says why,
//! and everything else works without it. rlimits are applied by the shim
//! ([`crate::shim::Rlimits`]).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// cgroup v2 `cpu.max` period in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Limits written into a worker's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupLimits {
    /// `memory.max` in bytes (already including the margin: see [`memory_backstop`]).
    pub memory_max: Option<u64>,
    /// CPUs (`1.5` = 150000/100000 in `cpu.max`).
    pub cpus: Option<f64>,
}

/// `memory.max` for a worker whose `limits.memory` is `limit`: 25% above, at least 32 MiB
/// more, so that the daemon's own rolling replacement normally acts first.
pub fn memory_backstop(limit: u64) -> u64 {
    limit.saturating_add((limit / 4).max(32 * 1024 * 1024))
}

/// A usable cgroup v2 subtree: `<base>/<app>/<leaf>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupTree {
    base: PathBuf,
}

impl CgroupTree {
    /// Uses `base` as is (a path given by the operator, or a test directory).
    pub fn at(base: impl Into<PathBuf>) -> Self {
        CgroupTree { base: base.into() }
    }

    /// The subtree root.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Finds the daemon's own cgroup v2 and prepares `<it>/clusterd` with the memory and
    /// cpu controllers enabled for children. The error is [`Error::CgroupUnavailable`]
    /// with a reason fit for "cgroup backstop: unavailable (reason)".
    pub fn detect() -> Result<Self> {
        let own_dir = own_cgroup_dir()?;
        let available = fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|x| x == c);
        if !has("memory") {
            return Err(Error::CgroupUnavailable(format!(
                "the memory controller is not available in cgroup v2 at {} (available: {}); the host may bind it to cgroup v1",
                own_dir.display(),
                if available.trim().is_empty() { "none" } else { available.trim() }
            )));
        }
        let mut enable = vec!["+memory"];
        if has("cpu") {
            enable.push("+cpu");
        }
        if has("pids") {
            enable.push("+pids");
        }
        enable_controllers(&own_dir, &enable).map_err(|e| {
            Error::CgroupUnavailable(format!(
                "cannot enable controllers in {}: {e} (the daemon's cgroup must be delegated to it and hold no processes besides a leaf; e.g. systemd Delegate=yes)",
                own_dir.display()
            ))
        })?;
        let base = own_dir.join("clusterd");
        fs::create_dir_all(&base).map_err(|e| {
            Error::CgroupUnavailable(format!("cannot create {}: {e}", base.display()))
        })?;
        enable_controllers(&base, &enable).map_err(|e| {
            Error::CgroupUnavailable(format!(
                "cannot enable controllers in {}: {e}",
                base.display()
            ))
        })?;
        Ok(CgroupTree { base })
    }

    /// The daemon's cgroup v2 subtree for membership: `<daemon's cgroup>/clusterd`,
    /// created with no controller required (the pids controller is enabled for children
    /// where the host offers it in v2). Fails only when no cgroup v2 is mounted or it is
    /// not writable (a container's read-only `/sys/fs/cgroup`, a non-root daemon without
    /// delegation); workers are then tracked by process group and ancestry alone.
    pub fn membership() -> Result<Self> {
        let own_dir = own_cgroup_dir()?;
        let base = own_dir.join("clusterd");
        fs::create_dir_all(&base).map_err(|e| {
            Error::CgroupUnavailable(format!("cannot create {}: {e}", base.display()))
        })?;
        let available = fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
        if available.split_whitespace().any(|c| c == "pids") {
            // Fails when the daemon's own cgroup holds processes and is not the root (the
            // "no internal processes" rule): then there is no pids limit, only membership.
            let _ = enable_controllers(&own_dir, &["+pids"]);
            let _ = enable_controllers(&base, &["+pids"]);
        }
        Ok(CgroupTree { base })
    }

    /// The membership tree of this process, detected once ([`CgroupTree::membership`]).
    pub fn shared_membership() -> std::result::Result<&'static CgroupTree, &'static str> {
        static TREE: std::sync::OnceLock<std::result::Result<CgroupTree, String>> =
            std::sync::OnceLock::new();
        TREE.get_or_init(|| {
            let t = CgroupTree::membership().map_err(|e| match e {
                Error::CgroupUnavailable(reason) => reason,
                other => other.to_string(),
            });
            match &t {
                Ok(tree) => tracing::debug!(base = %tree.base.display(), "worker trees tracked by cgroup"),
                Err(reason) => tracing::info!(%reason, "no cgroup v2 for worker trees; tracking them by process group and ancestry"),
            }
            t
        })
        .as_ref()
        .map_err(String::as_str)
    }

    /// Creates a fresh `<base>/<app>/<leaf>` with `limits` written, and returns it for
    /// [`crate::spawn::WorkerSpec::cgroup`]. When the name is taken (two workers of one
    /// index and revision overlap during a reload), a suffix makes the new one unique: a
    /// leaf is one worker's whole tree, never shared.
    pub fn create_worker_cgroup(
        &self,
        app: &str,
        leaf: &str,
        limits: CgroupLimits,
    ) -> Result<PathBuf> {
        let app_dir = self.base.join(app);
        let cg = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::Cgroup { path, what, source }
        };
        fs::create_dir_all(&app_dir).map_err(cg(&app_dir, "create"))?;
        let mut enable = Vec::new();
        if limits.memory_max.is_some() {
            enable.push("+memory");
        }
        if limits.cpus.is_some() {
            enable.push("+cpu");
        }
        // Best effort on a real cgroupfs; a test directory just gets a file.
        for c in &enable {
            let _ = enable_controllers(&app_dir, &[c]);
        }
        let dir = fresh_leaf(&app_dir, leaf).map_err(cg(&app_dir.join(leaf), "create"))?;
        if let Some(m) = limits.memory_max {
            let f = dir.join("memory.max");
            fs::write(&f, m.to_string()).map_err(cg(&f, "write memory.max"))?;
        }
        if let Some(c) = limits.cpus {
            let f = dir.join("cpu.max");
            let quota = ((c * CPU_PERIOD_US as f64).round() as u64).max(1000);
            fs::write(&f, format!("{quota} {CPU_PERIOD_US}")).map_err(cg(&f, "write cpu.max"))?;
        }
        Ok(dir)
    }

    /// Writes `pids.max` (`limits.nproc`: processes and threads of this worker alone)
    /// into an existing leaf, enabling the pids controller in its parent first. Fails
    /// where the host has no cgroup v2 pids controller for it.
    pub fn set_pids_max(leaf: &Path, n: u64) -> Result<()> {
        if let Some(parent) = leaf.parent() {
            let _ = enable_controllers(parent, &["+pids"]);
        }
        let f = leaf.join("pids.max");
        fs::write(&f, n.to_string()).map_err(|source| Error::Cgroup {
            path: f,
            what: "write pids.max (no cgroup v2 pids controller here)",
            source,
        })
    }

    /// Removes a worker's leaf once its processes are gone (`rmdir` on cgroupfs fails
    /// with EBUSY while any remain). Missing is fine.
    pub fn remove_worker_cgroup(path: &Path) -> Result<()> {
        match fs::remove_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Cgroup {
                path: path.to_path_buf(),
                what: "remove",
                source,
            }),
        }
    }
}

/// Creates `<dir>/<leaf>`, or `<leaf>.2`, `<leaf>.3`, ... when the name is taken. A taken
/// name is never reused, not even when it looks empty: `mkdir` is the only atomic claim
/// (a worker being started by another daemon or task may not have joined it yet).
fn fresh_leaf(dir: &Path, leaf: &str) -> std::io::Result<PathBuf> {
    for n in 1u32..10_000 {
        let path = if n == 1 {
            dir.join(leaf)
        } else {
            dir.join(format!("{leaf}.{n}"))
        };
        match fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("too many leaves of one name"))
}

/// A cgroup v1 pids leaf for one worker, `<v1 pids mount><daemon's group>/clusterd/<app>/<leaf>`
/// with `pids.max` = `n`: `limits.nproc` on hybrid hosts, where the pids controller is
/// bound to cgroup v1 and the v2 tree has none. The shim joins it next to the v2 leaf.
pub fn v1_pids_leaf(app: &str, leaf: &str, n: u64) -> Result<PathBuf> {
    let unavailable = |why: String| Error::CgroupUnavailable(why);
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| unavailable(format!("cannot read /proc/self/mountinfo: {e}")))?;
    let mount = cgroup1_mount(&mounts, "pids")
        .ok_or_else(|| unavailable("no cgroup v1 pids hierarchy is mounted".into()))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| unavailable(format!("cannot read /proc/self/cgroup: {e}")))?;
    let rel = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers.split(',').any(|c| c == "pids").then_some(path)
        })
        .ok_or_else(|| unavailable("the daemon is in no cgroup v1 pids group".into()))?;
    let app_dir = mount
        .join(rel.trim_start_matches('/'))
        .join("clusterd")
        .join(app);
    let cg = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| Error::Cgroup { path, what, source }
    };
    fs::create_dir_all(&app_dir).map_err(cg(&app_dir, "create"))?;
    let dir = fresh_leaf(&app_dir, leaf).map_err(cg(&app_dir.join(leaf), "create"))?;
    let f = dir.join("pids.max");
    if let Err(source) = fs::write(&f, n.to_string()) {
        let _ = fs::remove_dir(&dir);
        return Err(Error::Cgroup {
            path: f,
            what: "write pids.max",
            source,
        });
    }
    Ok(dir)
}

/// The mount point of the cgroup v1 hierarchy that carries `controller`.
fn cgroup1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _source, options) = (r.next()?, r.next()?, r.next()?);
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(mount))
    })
}

/// The cgroup v2 directory the calling process is in (`0::/path` under the cgroup2 mount).
fn own_cgroup_dir() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::CgroupUnavailable(format!("cannot read /proc/self/mountinfo: {e}")))?;
    let mount = cgroup2_mount(&mounts)
        .ok_or_else(|| Error::CgroupUnavailable("no cgroup v2 filesystem is mounted".into()))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::CgroupUnavailable(format!("cannot read /proc/self/cgroup: {e}")))?;
    let rel = cgroup2_path(&own)
        .ok_or_else(|| Error::CgroupUnavailable("the daemon is in no cgroup v2 group".into()))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// The cgroup v2 directory of `pid`, if it is a worker leaf of a clusterd subtree
/// (`.../clusterd/<app>/<leaf>`): how an adopted worker's tree is found again.
pub fn worker_cgroup_of(pid: i32) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = cgroup2_mount(&mounts)?;
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cgroup2_path(&text)?;
    let dir = mount.join(rel.trim_start_matches('/'));
    let base = dir.parent()?.parent()?;
    (base.file_name()? == "clusterd" && dir.is_dir()).then_some(dir)
}

/// The `0::` line of a /proc/PID/cgroup text.
fn cgroup2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

fn enable_controllers(dir: &Path, controllers: &[&str]) -> std::io::Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.subtree_control"), controllers.join(" "))
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let text = "35 24 0:30 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory\n\
                    36 24 0:31 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn finds_a_cgroup1_hierarchy_by_controller() {
        let text = "35 24 0:30 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory\n\
                    37 24 0:32 / /sys/fs/cgroup/pids rw,relatime shared:14 - cgroup cgroup rw,pids\n\
                    36 24 0:31 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup1_mount(text, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(cgroup1_mount(text, "cpu"), None);
    }

    #[test]
    fn writes_limits_into_a_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let tree = CgroupTree::at(dir.path());
        let limits = CgroupLimits {
            memory_max: Some(memory_backstop(512 << 20)),
            cpus: Some(1.5),
        };
        let leaf = tree.create_worker_cgroup("web", "w1", limits).unwrap();
        assert_eq!(
            fs::read_to_string(leaf.join("memory.max")).unwrap(),
            (640u64 << 20).to_string()
        );
        assert_eq!(
            fs::read_to_string(leaf.join("cpu.max")).unwrap(),
            "150000 100000"
        );
    }

    #[test]
    fn a_second_leaf_of_one_name_is_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tree = CgroupTree::at(dir.path());
        let a = tree
            .create_worker_cgroup("web", "0-r1", CgroupLimits::default())
            .unwrap();
        let b = tree
            .create_worker_cgroup("web", "0-r1", CgroupLimits::default())
            .unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
    }

    #[test]
    fn detect_either_works_or_says_why() {
        match CgroupTree::detect() {
            Ok(tree) => assert!(tree.base().ends_with("clusterd")),
            Err(Error::CgroupUnavailable(reason)) => assert!(!reason.is_empty()),
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
}

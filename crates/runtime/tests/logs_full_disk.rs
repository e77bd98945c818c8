//! Log rotation on a really full disk: a 1 MiB tmpfs (needs root; skipped otherwise).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clusterd_runtime::logs::{
    open_instance_log, open_instance_log_rotated, rotate_if_needed, rotated_path, LogPolicy,
    Rotation,
};
use clusterd_runtime::logwatch::LogSizeWatch;
use tokio_util::sync::CancellationToken;

/// A tmpfs of `size` mounted on a fresh temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount a tmpfs");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: mount -t tmpfs failed");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: an fd still open in a panicking test must not keep the mount.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn fill(path: &Path, bytes: usize) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let line = format!("{}\n", "z".repeat(1023));
    for _ in 0..bytes / 1024 {
        f.write_all(line.as_bytes()).unwrap();
    }
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// The issue-18 setup: 512 KiB limit, 5 files, and a disk with no room for a copy.
#[test]
fn a_full_disk_truncates_the_log_and_keeps_its_history() {
    let Some(fs_) = Tmpfs::mount("1m") else {
        return;
    };
    let policy = LogPolicy {
        max_size: 512 * 1024,
        max_files: 5,
    };
    let (_writer, path) = open_instance_log(fs_.path(), "web", 0).unwrap();
    fill(&rotated_path(&path, 1), 200 * 1024);
    fill(&path, 600 * 1024);
    // Someone else's file takes the rest of the disk.
    let filler = fs_.path().join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    drop(f);

    let r = rotate_if_needed(&path, policy).unwrap();
    let Rotation::Dropped { lost, reason } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(*lost, 600 * 1024);
    assert!(reason.contains("No space left on device"), "{reason}");
    // History intact, no partial copy left, the disk has room again.
    assert_eq!(len(&rotated_path(&path, 1)), 200 * 1024);
    assert!(!rotated_path(&path, 2).exists());
    assert!(fs::read_dir(fs_.path().join("web")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".rotating")));
    assert!(len(&path) < 1024, "{} bytes left", len(&path));
    assert!(fs::read_to_string(&path)
        .unwrap()
        .starts_with("[clusterd] log truncated"));
    // Failing again and again costs no history either.
    for _ in 0..3 {
        fill(&path, 520 * 1024);
        assert!(matches!(
            rotate_if_needed(&path, policy).unwrap(),
            Rotation::Dropped { .. }
        ));
    }
    assert_eq!(len(&rotated_path(&path, 1)), 200 * 1024);
    // Once there is room for a copy (the filler is gone; a 1 MiB disk holds the 200 KiB
    // of history, a 300 KiB file and its copy), rotation copies as usual.
    fs::remove_file(&filler).unwrap();
    fill(&path, 300 * 1024);
    let smaller = LogPolicy {
        max_size: 256 * 1024,
        ..policy
    };
    assert_eq!(rotate_if_needed(&path, smaller).unwrap(), Rotation::Copied);
    assert_eq!(len(&rotated_path(&path, 2)), 200 * 1024);
    assert!(len(&rotated_path(&path, 1)) >= 300 * 1024);
}

#[test]
fn rotation_by_rename_works_on_a_full_disk() {
    let Some(fs_) = Tmpfs::mount("1m") else {
        return;
    };
    let policy = LogPolicy {
        max_size: 512 * 1024,
        max_files: 5,
    };
    let (writer, path) = open_instance_log(fs_.path(), "web", 0).unwrap();
    fill(&path, 600 * 1024);
    drop(writer); // the index's worker exited
    let filler: PathBuf = fs_.path().join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let (_new, same) = open_instance_log_rotated(fs_.path(), "web", 0, Some(policy)).unwrap();
    assert_eq!(same, path);
    assert_eq!(len(&rotated_path(&path, 1)), 600 * 1024, "nothing lost");
    assert_eq!(len(&path), 0);
}

/// Measurement, not a check (`cargo test -p clusterd-runtime --test logs_full_disk --
/// --ignored --nocapture`): how far a writer (another thread, as a worker would be
/// another process) gets past a 512 KiB limit with [`LogSizeWatch`] and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn measure_overshoot_of_a_fast_writer() {
    let dir = tempfile::tempdir().unwrap();
    let policy = LogPolicy {
        max_size: 512 * 1024,
        max_files: 3,
    };
    let cancel = CancellationToken::new();
    let watch = LogSizeWatch::start(cancel.clone()).unwrap();
    for (index, label, pause) in [
        (0, "flat out", None),
        (1, "about 10 MB/s", Some(Duration::from_micros(400))),
        (2, "about 1 MB/s", Some(Duration::from_millis(4))),
    ] {
        let (mut f, path) = open_instance_log(dir.path(), "web", index).unwrap();
        watch.track(&path, policy);
        let total: usize = if pause.is_some() { 5 << 20 } else { 200 << 20 };
        let writer = std::thread::spawn(move || {
            let line = format!("{}\n", "x".repeat(4095));
            let mut max = 0;
            let start = std::time::Instant::now();
            let mut written = 0;
            while written < total {
                f.write_all(line.as_bytes()).unwrap();
                written += line.len();
                max = max.max(f.metadata().unwrap().len());
                if let Some(p) = pause {
                    std::thread::sleep(p);
                }
            }
            (written, start.elapsed().as_secs_f64(), max)
        });
        let (written, secs, max) = tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        #[allow(clippy::cast_precision_loss)]
        let (rate, ratio) = (
            written as f64 / secs / 1e6,
            max as f64 / policy.max_size as f64,
        );
        println!(
            "{label}: {written} bytes at {rate:.1} MB/s, largest size seen {max} bytes ({ratio:.2} x the limit)"
        );
    }
    cancel.cancel();
}

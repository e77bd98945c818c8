//! Worker log files: capture, size-based rotation, tail and follow.
//!
//! # Layout
//! One combined file per instance, stdout and stderr interleaved in write order (like
//! `kubectl logs` and the journal; two files would lose the order between them):
//!
//! ```text
//! <log-dir>/<app>/<app>-<index>.log       current
//! <log-dir>/<app>/<app>-<index>.log.1     newest rotated
//! ...
//! <log-dir>/<app>/<app>-<index>.log.<max_files>
//! ```
//!
//! The file is opened `O_APPEND` and given to the worker as its stdout and stderr, so no
//! daemon task sits in the data path: a worker keeps logging while the daemon restarts,
//! and an adopted worker needs nothing re-attached. Replacements of an index append to
//! the same file.
//!
//! # Timestamps
//! Each line starts with the UTC time it was written, `2026-12-01T17:05:03.123456Z `
//! (RFC 3339, microseconds, one space), so `clusterd logs` can merge the instances of an
//! app in time order. The worker's stdout and stderr are a pipe to a timestamper process
//! that the exec shim forks before exec ([`timestamp_lines`]), as conmon and
//! containerd-shim do for containers; it is not the daemon, so the daemon stays out of
//! the data path (a daemon restart or upgrade loses no line and blocks no worker). File
//! modification times could not order lines (one mtime per file), and a daemon-side pipe
//! would stall every worker whose pipe fills while the daemon is down. Lines without the
//! prefix (written by a worker started before timestamps existed) are read as they are.
//!
//! # Rotation
//! A file past `max_size` becomes `.1` (older ones shift up, the oldest is dropped).
//! Workers write into the file directly, so how depends on who holds it open:
//! - **Nobody** (the index's worker is being started and no other worker of the index
//!   is alive): [`rotate_unshared`] renames it. No copy, no free space needed, no line
//!   lost.
//! - **Live workers** (their `O_APPEND` fds point at the inode; a rename would only make
//!   them write into `.1`): [`rotate_if_needed`] copies it to `<file>.rotating`, shifts
//!   the history, renames the copy to `.1`, and truncates the file in place; the
//!   writers' next write lands at the new end. Lines written between the copy and the
//!   truncate (microseconds) are lost, the known cost of copytruncate, and a worker that
//!   reopens its stdout without `O_APPEND` would leave a sparse file.
//!
//! On a full disk the copy fails: the file is then truncated anyway (with a note at its
//! top), because a log that cannot rotate must not keep the disk full, and the history is
//! left alone, because deleting old logs to make room for a copy that then fails loses
//! the most history for nothing. [`crate::logwatch`] checks sizes as the files grow, so
//! files stay near their limit between the daemon's periodic passes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{IoContext, Result};

/// Longest line written as one entry; a longer one is cut into entries of this size, so
/// the timestamper's memory stays bounded whatever the worker prints.
pub const MAX_LINE: usize = 64 * 1024;

/// Length of the timestamp prefix, `2026-12-01T17:05:03.123456Z ` (with its space).
pub const TIMESTAMP_LEN: usize = 28;

/// `2026-12-01T17:05:03.123456Z`, the UTC time of `t` (RFC 3339, microseconds).
#[must_use]
pub fn format_timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Splits a log line into its timestamp and text; `None` for a line without the prefix.
/// The timestamp sorts as text (fixed width, UTC).
#[must_use]
pub fn split_timestamp(line: &str) -> Option<(&str, &str)> {
    let b = line.as_bytes();
    let shape = b.len() >= TIMESTAMP_LEN
        && b[..TIMESTAMP_LEN].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            27 => *c == b' ',
            _ => c.is_ascii_digit(),
        });
    shape.then(|| (&line[..TIMESTAMP_LEN - 1], &line[TIMESTAMP_LEN..]))
}

/// The timestamper's loop: reads `input` until every writer has closed it and writes each
/// line to `out` prefixed with the time it arrived. A final line without newline is
/// written with one; lines longer than [`MAX_LINE`] are cut. Write errors are ignored (a
/// full disk must not kill the worker through a broken pipe): the line is dropped.
pub fn timestamp_lines(input: std::os::fd::OwnedFd, mut out: impl std::io::Write) {
    let mut input = File::from(input);
    let mut chunk = vec![0u8; MAX_LINE];
    let mut partial: Vec<u8> = Vec::new();
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let stamp = format_timestamp(std::time::SystemTime::now());
        partial.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        loop {
            let rest = &partial[start..];
            let window = &rest[..rest.len().min(MAX_LINE + 1)];
            let (take, newline) = match window.iter().position(|&c| c == b'\n') {
                Some(i) if i <= MAX_LINE => (i + 1, true),
                _ if rest.len() >= MAX_LINE => (MAX_LINE, false),
                _ => break,
            };
            batch.extend_from_slice(stamp.as_bytes());
            batch.push(b' ');
            batch.extend_from_slice(&rest[..take]);
            if !newline {
                batch.push(b'\n');
            }
            start += take;
        }
        partial.drain(..start);
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
    }
    if !partial.is_empty() {
        let stamp = format_timestamp(std::time::SystemTime::now());
        batch.extend_from_slice(stamp.as_bytes());
        batch.push(b' ');
        batch.append(&mut partial);
        batch.push(b'\n');
        let _ = out.write_all(&batch).and_then(|()| out.flush());
    }
}

/// Size-based rotation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPolicy {
    /// Rotate when the file is larger than this many bytes.
    pub max_size: u64,
    /// How many rotated files to keep.
    pub max_files: u32,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            max_size: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

impl From<&clusterd_core::model::Logs> for LogPolicy {
    fn from(l: &clusterd_core::model::Logs) -> Self {
        LogPolicy {
            max_size: l.max_size.0,
            max_files: l.max_files,
        }
    }
}

/// `<log_dir>/<app>`.
pub fn app_log_dir(log_dir: &Path, app: &str) -> PathBuf {
    log_dir.join(app)
}

/// `<log_dir>/<app>/<app>-<index>.log`.
pub fn instance_log_path(log_dir: &Path, app: &str, index: u32) -> PathBuf {
    app_log_dir(log_dir, app).join(format!("{app}-{index}.log"))
}

/// `<path>.<n>` (n >= 1).
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Opens (creating the directory and file, mode 0640) an instance log for appending.
pub fn open_instance_log(log_dir: &Path, app: &str, index: u32) -> Result<(File, PathBuf)> {
    open_instance_log_rotated(log_dir, app, index, None)
}

/// [`open_instance_log`], rotating the file by rename first ([`rotate_unshared`]) when
/// `unshared` is given and the file is over its limit. Pass the app's policy only when
/// no live process writes this index's log (no other worker of the index is alive):
/// that is when a rotation can be a rename instead of a copy. A failed rotation only
/// logs a warning: the worker starts anyway, and the periodic copytruncate catches up.
pub fn open_instance_log_rotated(
    log_dir: &Path,
    app: &str,
    index: u32,
    unshared: Option<LogPolicy>,
) -> Result<(File, PathBuf)> {
    let dir = app_log_dir(log_dir, app);
    fs::create_dir_all(&dir).ctx(|| format!("create log directory {}", dir.display()))?;
    let path = instance_log_path(log_dir, app, index);
    if let Some(policy) = unshared {
        if let Err(e) = rotate_unshared(&path, policy) {
            tracing::warn!(path = %path.display(), error = %e, "log rotation by rename");
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&path)
        .ctx(|| format!("open log file {}", path.display()))?;
    Ok((file, path))
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The file is within its limit (or does not exist).
    NotNeeded,
    /// Copied to `.1` and truncated in place: the writers keep their `O_APPEND` fds and
    /// go on at the new end.
    Copied,
    /// Renamed to `.1` (nobody was writing it): needs no free space, loses no line.
    Renamed,
    /// The current file was emptied without a copy, and the older files were left as
    /// they were: `max_files` is 0, or the copy failed (a full disk) and truncating is
    /// what frees the disk. `lost` bytes of log are gone, `reason` says why.
    Dropped {
        /// Bytes of log thrown away.
        lost: u64,
        /// Why no copy was kept.
        reason: String,
    },
}

/// `<path>.rotating`: the copy being made. Renamed to `.1` once complete, so a partial
/// copy (a full disk, a crash) never takes the place of real history.
fn staging_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".rotating");
    PathBuf::from(s)
}

/// Copies `from` to a new file `to`, catching up (a few rounds at most, so a writer
/// faster than the copy cannot keep it going) with what was appended meanwhile; returns
/// the bytes copied. `std::io::copy` between files uses `copy_file_range`, which shares
/// the blocks on filesystems that can (btrfs, XFS with reflink).
fn copy_log(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(to)?;
    let mut copied = 0;
    for _ in 0..4 {
        let n = std::io::copy(&mut src, &mut dst)?;
        if n == 0 {
            break;
        }
        copied += n;
    }
    Ok(copied)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Makes room for a new `.1`: drops `.max_files` and renames `.n` to `.n+1`. Renames
/// need no free space. Call only once the new `.1` is safely made.
fn shift_history(path: &Path, max_files: u32) -> Result<()> {
    remove_if_exists(&rotated_path(path, max_files))?;
    for n in (1..max_files).rev() {
        let from = rotated_path(path, n);
        if from.exists() {
            let to = rotated_path(path, n + 1);
            fs::rename(&from, &to)
                .ctx(|| format!("rename {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

fn size_of(path: &Path) -> Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::Error::io(format!("stat {}", path.display()), e)),
    }
}

/// Empties `path` in place (writers keep their fds) and notes why at its top, so a
/// reader of the log sees the gap instead of a silent jump.
fn truncate_with_note(path: &Path, note: &str) -> Result<()> {
    let f = OpenOptions::new()
        .append(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    f.set_len(0)
        .ctx(|| format!("truncate {}", path.display()))?;
    // Best effort: the disk may still be full for other files' sake.
    let _ = (&f).write_all(format!("[clusterd] {note}\n").as_bytes());
    Ok(())
}

/// Rotates `path` if it is larger than `policy.max_size`, with live writers attached
/// (copytruncate).
///
/// # Guarantees
/// - History is touched only after the copy is complete: the copy goes to
///   `<path>.rotating` first, and only then are `.1..` shifted (the oldest dropped) and
///   the copy renamed to `.1`. A failed copy never costs a rotated file.
/// - A failed copy (ENOSPC on a full disk, EDQUOT...) still empties the current file,
///   since a log that keeps growing on a full disk helps nobody: the bytes are dropped,
///   a note saying so starts the file, and [`Rotation::Dropped`] reports it.
/// - Lines written between the end of the copy and the truncate (microseconds) are
///   lost: the known cost of copytruncate. [`rotate_unshared`] has none.
///
/// # Errors
/// The file cannot be inspected or truncated, or the history cannot be renamed.
pub fn rotate_if_needed(path: &Path, policy: LogPolicy) -> Result<Rotation> {
    rotate_with(path, policy, copy_log)
}

fn rotate_with(
    path: &Path,
    policy: LogPolicy,
    copy: impl FnOnce(&Path, &Path) -> std::io::Result<u64>,
) -> Result<Rotation> {
    let Some(len) = size_of(path)? else {
        return Ok(Rotation::NotNeeded);
    };
    if len <= policy.max_size {
        return Ok(Rotation::NotNeeded);
    }
    if policy.max_files == 0 {
        let reason = "no rotated files are kept (maxFiles 0)".to_owned();
        truncate_with_note(path, &format!("log truncated at {len} bytes: {reason}"))?;
        return Ok(Rotation::Dropped { lost: len, reason });
    }
    let staging = staging_path(path);
    remove_if_exists(&staging)?; // left by a crash or a failed copy
    match copy(path, &staging) {
        Ok(_) => {
            shift_history(path, policy.max_files)?;
            let first = rotated_path(path, 1);
            fs::rename(&staging, &first)
                .ctx(|| format!("rename {} to {}", staging.display(), first.display()))?;
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .ctx(|| format!("truncate {}", path.display()))?;
            tracing::debug!(path = %path.display(), size = len, "log rotated");
            Ok(Rotation::Copied)
        }
        Err(e) => {
            let _ = fs::remove_file(&staging);
            let lost = size_of(path)?.unwrap_or(len);
            let reason = format!("copy to {} failed: {e}", rotated_path(path, 1).display());
            truncate_with_note(
                path,
                &format!("log truncated: {lost} bytes dropped, {reason}; older files kept"),
            )?;
            tracing::warn!(path = %path.display(), lost, error = %e, "log copy failed; truncated to free the disk");
            Ok(Rotation::Dropped { lost, reason })
        }
    }
}

/// Rotates `path` by renaming it to `.1`, if it is larger than `policy.max_size`. Only
/// for a file no live process writes (the daemon calls it before it gives the file to a
/// new worker of an index that has no other live worker): a process still holding it
/// would go on writing into `.1`. Needs no free space and loses no line, so it works on
/// a full disk.
///
/// # Errors
/// The file cannot be inspected, or the history cannot be renamed.
pub fn rotate_unshared(path: &Path, policy: LogPolicy) -> Result<Rotation> {
    let Some(len) = size_of(path)? else {
        return Ok(Rotation::NotNeeded);
    };
    if len <= policy.max_size {
        return Ok(Rotation::NotNeeded);
    }
    if policy.max_files == 0 {
        remove_if_exists(path)?;
        return Ok(Rotation::Dropped {
            lost: len,
            reason: "no rotated files are kept (maxFiles 0)".to_owned(),
        });
    }
    shift_history(path, policy.max_files)?;
    let first = rotated_path(path, 1);
    fs::rename(path, &first).ctx(|| format!("rename {} to {}", path.display(), first.display()))?;
    tracing::debug!(path = %path.display(), size = len, "log rotated by rename");
    Ok(Rotation::Renamed)
}

/// Rotates every current instance log of `app` that needs it (copytruncate: workers
/// may be writing); returns how many rotated. One file's failure does not stop the
/// others.
///
/// # Errors
/// The first failure, after every file was tried.
pub fn rotate_app(log_dir: &Path, app: &str, policy: LogPolicy) -> Result<usize> {
    let dir = app_log_dir(log_dir, app);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(crate::Error::io(format!("read {}", dir.display()), e)),
    };
    let mut rotated = 0;
    let mut first_error = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        match rotate_if_needed(&path, policy) {
            Ok(Rotation::NotNeeded) => {}
            Ok(_) => rotated += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(rotated),
    }
}

/// The current instance logs of `app` as `(index, path)`, sorted by index.
pub fn instance_logs(log_dir: &Path, app: &str) -> Vec<(u32, PathBuf)> {
    let prefix = format!("{app}-");
    let mut out: Vec<(u32, PathBuf)> = fs::read_dir(app_log_dir(log_dir, app))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let idx = name
                .strip_prefix(&prefix)?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((idx, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The last `n` lines of the log at `path`, continuing into `.1`, `.2`, ... when the
/// current file holds fewer; oldest first. A last line without newline is included.
pub fn tail(path: &Path, n: usize) -> Result<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut k = 0;
    loop {
        let p = if k == 0 {
            path.to_path_buf()
        } else {
            rotated_path(path, k)
        };
        if k > 0 && !p.exists() {
            break;
        }
        let mut chunk = match last_lines(&p, n - lines.len()) {
            Ok(c) => c,
            Err(e)
                if k == 0
                    && matches!(&e, crate::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound) =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        chunk.append(&mut lines);
        lines = chunk;
        if lines.len() >= n {
            break;
        }
        k += 1;
    }
    Ok(lines)
}

/// The last `n` lines of one file, reading backwards in blocks (files may be large).
fn last_lines(path: &Path, n: usize) -> Result<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let len = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    const BLOCK: u64 = 64 * 1024;
    let mut pos = len;
    let mut buf: Vec<u8> = Vec::new();
    // Count newlines, ignoring one that ends the file.
    loop {
        let newlines = buf.iter().filter(|&&b| b == b'\n').count()
            - usize::from(buf.last() == Some(&b'\n') && pos + buf.len() as u64 == len);
        if newlines >= n || pos == 0 {
            break;
        }
        let start = pos.saturating_sub(BLOCK);
        let mut block = vec![0; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))
            .ctx(|| format!("seek {}", path.display()))?;
        f.read_exact(&mut block)
            .ctx(|| format!("read {}", path.display()))?;
        block.extend_from_slice(&buf);
        buf = block;
        pos = start;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if pos > 0 && !lines.is_empty() {
        lines.remove(0); // partial first line of the block
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

/// Follows a log file like `tail -F`: returns complete lines as they are appended, and
/// starts over at 0 when the file was truncated by rotation (size < position).
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows from the current end of the file (nothing old is returned).
    pub fn from_end(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let offset = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Follower {
            path,
            offset,
            partial: Vec::new(),
        }
    }

    /// Reads what was appended since the last call (never blocks for new data).
    pub fn poll(&mut self) -> Result<Vec<String>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(crate::Error::io(format!("open {}", self.path.display()), e)),
        };
        let len = f
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?
            .len();
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset {
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(self.offset))
            .ctx(|| format!("seek {}", self.path.display()))?;
        let mut data = Vec::new();
        (&mut f)
            .take(len - self.offset)
            .read_to_end(&mut data)
            .ctx(|| format!("read {}", self.path.display()))?;
        self.offset += data.len() as u64;
        self.partial.extend_from_slice(&data);
        let mut lines = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        Ok(lines)
    }

    /// Waits until at least one new line is there, polling every `interval`.
    pub async fn next_lines(&mut self, interval: Duration) -> Result<Vec<String>> {
        loop {
            let lines = self.poll()?;
            if !lines.is_empty() {
                return Ok(lines);
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn timestamps_format_and_split() {
        let t = std::time::UNIX_EPOCH + Duration::from_micros(1_764_608_703_123_456);
        let s = format_timestamp(t);
        assert_eq!(s, "2025-12-01T17:05:03.123456Z");
        assert_eq!(
            format_timestamp(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let line = format!("{s} hello world");
        assert_eq!(split_timestamp(&line), Some((s.as_str(), "hello world")));
        assert_eq!(split_timestamp("hello"), None);
        assert_eq!(split_timestamp("2025-12-01 17:05:03 not ours at all"), None);
    }

    #[test]
    fn timestamper_prefixes_each_line_and_finishes_the_last() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(w);
            let big = "x".repeat(MAX_LINE + 10);
            write!(w, "one\ntwo\n{big}\nthree").unwrap();
        });
        let mut out = Vec::new();
        timestamp_lines(r, &mut out);
        writer.join().unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let texts: Vec<&str> = lines
            .iter()
            .map(|l| split_timestamp(l).unwrap().1)
            .collect();
        assert_eq!(texts.len(), 5, "{texts:?}");
        assert_eq!(texts[0], "one");
        assert_eq!(texts[1], "two");
        assert_eq!(texts[2].len(), MAX_LINE);
        assert_eq!(texts[3], "x".repeat(10));
        assert_eq!(texts[4], "three");
    }

    #[test]
    fn rotation_shifts_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, path) = open_instance_log(dir.path(), "web", 0).unwrap();
        let policy = LogPolicy {
            max_size: 10,
            max_files: 2,
        };
        for round in 0..4 {
            writeln!(f, "round {round} xxxxxxxx").unwrap();
            assert_eq!(rotate_if_needed(&path, policy).unwrap(), Rotation::Copied);
        }
        // Writer keeps appending to the truncated file at offset 0.
        writeln!(f, "after").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "after\n");
        assert_eq!(
            fs::read_to_string(rotated_path(&path, 1)).unwrap(),
            "round 3 xxxxxxxx\n"
        );
        assert_eq!(
            fs::read_to_string(rotated_path(&path, 2)).unwrap(),
            "round 2 xxxxxxxx\n"
        );
        assert!(!rotated_path(&path, 3).exists());
        assert_eq!(
            rotate_if_needed(&path, policy).unwrap(),
            Rotation::NotNeeded
        );
        assert_eq!(tail(&path, 2).unwrap(), vec!["round 3 xxxxxxxx", "after"]);
        assert_eq!(tail(&path, 10).unwrap().len(), 3);
        assert_eq!(instance_logs(dir.path(), "web"), vec![(0, path.clone())]);
    }

    #[test]
    fn tail_of_large_file_and_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut f = File::create(&path).unwrap();
        for i in 0..50_000 {
            writeln!(f, "line {i}").unwrap();
        }
        write!(f, "unfinished").unwrap();
        let t = tail(&path, 3).unwrap();
        assert_eq!(t, vec!["line 49998", "line 49999", "unfinished"]);
        assert!(tail(&dir.path().join("missing.log"), 3).unwrap().is_empty());
    }

    #[test]
    fn follower_sees_appends_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, path) = open_instance_log(dir.path(), "a", 1).unwrap();
        writeln!(f, "old").unwrap();
        let mut fol = Follower::from_end(&path);
        assert!(fol.poll().unwrap().is_empty());
        write!(f, "new 1\nhalf").unwrap();
        assert_eq!(fol.poll().unwrap(), vec!["new 1"]);
        writeln!(f, " line").unwrap();
        assert_eq!(fol.poll().unwrap(), vec!["half line"]);
        rotate_if_needed(
            &path,
            LogPolicy {
                max_size: 1,
                max_files: 1,
            },
        )
        .unwrap();
        writeln!(f, "fresh").unwrap();
        assert_eq!(fol.poll().unwrap(), vec!["fresh"]);
    }

    fn small() -> LogPolicy {
        LogPolicy {
            max_size: 10,
            max_files: 3,
        }
    }

    /// A log with rotated history `.1` = "h1", `.2` = "h2" and a current file over the
    /// limit, held open by a writer.
    fn with_history(dir: &Path) -> (File, PathBuf) {
        let (mut f, path) = open_instance_log(dir, "web", 0).unwrap();
        fs::write(rotated_path(&path, 1), "h1\n").unwrap();
        fs::write(rotated_path(&path, 2), "h2\n").unwrap();
        writeln!(f, "current xxxxxxxxxxxx").unwrap();
        (f, path)
    }

    #[test]
    fn a_failed_copy_truncates_and_keeps_every_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, path) = with_history(dir.path());
        let enospc = |_: &Path, to: &Path| {
            fs::write(to, "partial").unwrap();
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        };
        let r = rotate_with(&path, small(), enospc).unwrap();
        let Rotation::Dropped { lost, reason } = r else {
            panic!("{r:?}")
        };
        assert_eq!(lost, 21);
        assert!(reason.contains("No space left on device"), "{reason}");
        // History untouched, the partial copy gone, the current file emptied with a note.
        assert_eq!(fs::read_to_string(rotated_path(&path, 1)).unwrap(), "h1\n");
        assert_eq!(fs::read_to_string(rotated_path(&path, 2)).unwrap(), "h2\n");
        assert!(!rotated_path(&path, 3).exists());
        assert!(!staging_path(&path).exists());
        let now = fs::read_to_string(&path).unwrap();
        assert!(
            now.starts_with("[clusterd] log truncated: 21 bytes dropped"),
            "{now}"
        );
        // The writer goes on at the new end.
        writeln!(f, "after").unwrap();
        assert!(fs::read_to_string(&path)
            .unwrap()
            .ends_with("older files kept\nafter\n"));
        // Many failed attempts in a row still cost no history.
        for _ in 0..5 {
            writeln!(f, "more xxxxxxxxxxxxxxxx").unwrap();
            rotate_with(&path, small(), enospc).unwrap();
        }
        assert_eq!(fs::read_to_string(rotated_path(&path, 1)).unwrap(), "h1\n");
        assert_eq!(fs::read_to_string(rotated_path(&path, 2)).unwrap(), "h2\n");
    }

    #[test]
    fn a_successful_copy_shifts_history_and_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, path) = with_history(dir.path());
        fs::write(staging_path(&path), "stale from a crash").unwrap();
        assert_eq!(rotate_if_needed(&path, small()).unwrap(), Rotation::Copied);
        assert_eq!(
            fs::read_to_string(rotated_path(&path, 1)).unwrap(),
            "current xxxxxxxxxxxx\n"
        );
        assert_eq!(fs::read_to_string(rotated_path(&path, 2)).unwrap(), "h1\n");
        assert_eq!(fs::read_to_string(rotated_path(&path, 3)).unwrap(), "h2\n");
        assert!(!staging_path(&path).exists());
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn an_unshared_log_rotates_by_rename_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (f, path) = with_history(dir.path());
        drop(f); // the worker is gone
        let (mut f, same) = open_instance_log_rotated(dir.path(), "web", 0, Some(small())).unwrap();
        assert_eq!(same, path);
        writeln!(f, "new").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(
            fs::read_to_string(rotated_path(&path, 1)).unwrap(),
            "current xxxxxxxxxxxx\n"
        );
        assert_eq!(fs::read_to_string(rotated_path(&path, 3)).unwrap(), "h2\n");
        // Under the limit: nothing moves.
        drop(f);
        open_instance_log_rotated(dir.path(), "web", 0, Some(small())).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
    }

    #[test]
    fn no_history_kept_means_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, path) = with_history(dir.path());
        let policy = LogPolicy {
            max_size: 10,
            max_files: 0,
        };
        assert!(matches!(
            rotate_if_needed(&path, policy).unwrap(),
            Rotation::Dropped { lost: 21, .. }
        ));
        assert_eq!(fs::read_to_string(rotated_path(&path, 1)).unwrap(), "h1\n");
    }
}

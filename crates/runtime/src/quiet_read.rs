//! Reading a manifest only when nobody is writing it.
//!
//! inotify says a file was written and closed, but by the time the daemon reads it the
//! next writer may already have truncated it (`cat > web.yaml` twice in a row, an editor
//! saving in place). A read lease answers the real question at the moment of reading:
//! `F_SETLEASE` with `F_RDLCK` succeeds only when no process has the file open for
//! writing, and while it is held a writer's `open` waits for the lease to be released.
//! So a read under a lease is a whole version of the file, never half of one. Leases are
//! local-filesystem only; elsewhere the caller falls back to the watcher's events and
//! the file's age.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What [`read_quiet`] found.
#[derive(Debug)]
pub enum QuietRead {
    /// Nobody had it open for writing: this is a whole version of the file.
    Whole(Vec<u8>),
    /// Someone has it open for writing right now.
    BeingWritten,
    /// Leases are not available here (filesystem, permissions): this is the content,
    /// with no promise about writers.
    Unchecked(Vec<u8>),
}

/// Makes the lease-break signal harmless. The kernel tells a lease holder that a writer
/// is waiting with SIGIO, whose default action terminates the process; the daemon holds
/// leases for microseconds and needs no notice. Call once at daemon start (workers get
/// default dispositions back from the exec shim).
pub fn ignore_lease_breaks() {
    // SAFETY: SIG_IGN installs no handler; SIGIO is a valid signal number.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}

/// Reads `path` if nobody has it open for writing (see the module docs).
///
/// # Errors
/// The file cannot be opened or read.
pub fn read_quiet(path: &Path) -> io::Result<QuietRead> {
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    #[allow(unsafe_code)]
    let leased = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if leased != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY) => Ok(QuietRead::BeingWritten),
            _ => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                Ok(QuietRead::Unchecked(bytes))
            }
        };
    }
    let mut bytes = Vec::new();
    let result = file.read_to_end(&mut bytes);
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe {
        libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
    }
    result?;
    Ok(QuietRead::Whole(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_open_for_writing_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        match read_quiet(&path).unwrap() {
            QuietRead::Whole(b) => assert_eq!(b, b"a: 1\n"),
            other => panic!("{other:?}"),
        }
        let mut writer = File::options().write(true).open(&path).unwrap();
        writer.write_all(b"a: ").unwrap();
        assert!(matches!(
            read_quiet(&path).unwrap(),
            QuietRead::BeingWritten
        ));
        drop(writer);
        assert!(matches!(read_quiet(&path).unwrap(), QuietRead::Whole(_)));
    }
}

//! When a changed manifest file may be read, when the daemon cannot ask the kernel.
//!
//! The daemon first tries a read lease, which tells for certain whether anyone has the
//! file open for writing (see `clusterd_runtime::quiet_read`). Where leases are not
//! available (some network and overlay filesystems, another user's file), this pure rule
//! decides from what the watcher saw and the file's age.
//!
//! A file can be caught half-written (an editor writing in place, `cat > web.yaml`), and
//! a half-written manifest can be invalid or, worse, a valid but different app. Holding
//! every change back for a quiet period (what clusterd did first) protects against that
//! but makes every change slow, even an atomic rename that cannot be half-written. So
//! the daemon's watcher tells what it saw of each file, and only a file that may still be
//! open for writing waits:
//!
//! - **Closed**: the last event was a close after writing (`IN_CLOSE_WRITE`) or the file
//!   arrived by rename (`IN_MOVED_TO`): complete, read at once.
//! - **Open**: written to (`IN_MODIFY`/`IN_CREATE`) and not closed yet: wait for the close,
//!   which wakes the daemon anyway; bounded by [`MAX_HOLD`] so a file held open forever is
//!   still judged.
//! - **Unknown**: no event seen (daemon start, no watcher): judged by its age, read once
//!   its mtime is [`QUIET`] old.

use std::time::Duration;

/// A file of unknown write state is read once it has not changed for this long.
pub const QUIET: Duration = Duration::from_millis(250);
/// No change waits longer than this, whatever the watcher says.
pub const MAX_HOLD: Duration = Duration::from_secs(5);

/// What the watcher saw last of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteState {
    /// No event seen since the daemon started watching.
    #[default]
    Unknown,
    /// Written and not closed yet.
    Open,
    /// Closed after writing, or renamed into place.
    Closed,
}

/// Facts about one file whose content changed since it was last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// What the watcher saw.
    pub write: WriteState,
    /// Time since the file's mtime (zero when the mtime is in the future).
    pub age: Duration,
    /// How long this change has been held back already.
    pub held_for: Duration,
}

/// The verdict for one changed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Read it now.
    Read,
    /// Keep the previous content for now; look again after this long at the latest.
    Hold(Duration),
}

/// Decides whether a changed file may be read now.
#[must_use]
pub fn settle(change: Change) -> Verdict {
    if change.held_for >= MAX_HOLD {
        return Verdict::Read;
    }
    let left = MAX_HOLD - change.held_for;
    match change.write {
        WriteState::Closed => Verdict::Read,
        WriteState::Open => Verdict::Hold(left),
        WriteState::Unknown if change.age >= QUIET => Verdict::Read,
        WriteState::Unknown => Verdict::Hold((QUIET - change.age).min(left)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(write: WriteState, age_ms: u64, held_ms: u64) -> Change {
        Change {
            write,
            age: Duration::from_millis(age_ms),
            held_for: Duration::from_millis(held_ms),
        }
    }

    #[test]
    fn complete_files_are_read_at_once() {
        assert_eq!(settle(change(WriteState::Closed, 0, 0)), Verdict::Read);
    }

    #[test]
    fn open_files_wait_for_their_close_but_not_forever() {
        assert_eq!(
            settle(change(WriteState::Open, 10_000, 0)),
            Verdict::Hold(MAX_HOLD)
        );
        assert_eq!(
            settle(change(WriteState::Open, 0, 4_000)),
            Verdict::Hold(Duration::from_secs(1))
        );
        assert_eq!(settle(change(WriteState::Open, 0, 5_000)), Verdict::Read);
    }

    #[test]
    fn unknown_files_are_judged_by_age() {
        assert_eq!(settle(change(WriteState::Unknown, 300, 0)), Verdict::Read);
        assert_eq!(
            settle(change(WriteState::Unknown, 100, 0)),
            Verdict::Hold(Duration::from_millis(150))
        );
        assert_eq!(
            settle(change(WriteState::Unknown, 0, 4_900)),
            Verdict::Hold(Duration::from_millis(100))
        );
    }

    #[test]
    fn every_hold_is_bounded_and_positive() {
        for write in [WriteState::Unknown, WriteState::Open, WriteState::Closed] {
            for age in [0, 1, 249, 250, 10_000] {
                for held in [0, 1, 2_500, 4_999, 5_000, 9_000] {
                    if let Verdict::Hold(d) = settle(change(write, age, held)) {
                        assert!(
                            d > Duration::ZERO && d <= MAX_HOLD,
                            "{write:?} {age} {held}"
                        );
                    }
                }
            }
        }
    }
}

//! Restart backoff: how long an instance waits after an unplanned exit, and when a
//! worker has run long enough for its failures to be forgotten.

use std::time::Duration;

use crate::model::Backoff;

/// The floor of [`stable_after`].
pub const MIN_STABLE_RUN: Duration = Duration::from_secs(10);

/// Wait before restart number `consecutive_failures` (1-based) of one instance:
/// `initial`, doubled per further consecutive failure, capped at `max`.
///
/// `consecutive_failures == 0` is treated as 1 (a first failure waits `initial`).
#[must_use]
pub fn backoff_delay(backoff: &Backoff, consecutive_failures: u32) -> Duration {
    let doublings = consecutive_failures.max(1) - 1;
    let max = backoff.max.0.max(backoff.initial.0);
    // 2^31 * anything overflows long before it matters: saturate, then cap.
    let factor = 1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX);
    backoff
        .initial
        .0
        .checked_mul(factor)
        .map_or(max, |d| d.min(max))
}

/// How long a worker must stay Ready before an exit stops counting as part of a crash
/// loop (its instance's `consecutive_failures` then restarts at 1).
///
/// `max(10 s, backoff.max)`: a worker that outlived the longest backoff interval is not
/// in a tight loop (a loop at the cap restarts every `backoff.max`, so it never lives
/// that long); the 10 s floor keeps a tiny cap (say `max: 500ms`) from forgiving a
/// worker that dies every two seconds. It counts from Ready, not from spawn, because a
/// worker that never got ready has not run cleanly at all.
#[must_use]
pub fn stable_after(backoff: &Backoff) -> Duration {
    backoff.max.0.max(MIN_STABLE_RUN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DurationValue;

    fn b(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial: DurationValue(Duration::from_millis(initial_ms)),
            max: DurationValue(Duration::from_millis(max_ms)),
        }
    }

    #[test]
    fn doubles_from_initial_and_caps_at_max() {
        let cases = [
            (0, 100),
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (9, 25_600),
            (10, 30_000),
        ];
        for (n, ms) in cases {
            assert_eq!(
                backoff_delay(&b(100, 30_000), n),
                Duration::from_millis(ms),
                "n={n}"
            );
        }
        assert_eq!(
            backoff_delay(&b(100, 30_000), u32::MAX),
            Duration::from_secs(30)
        );
        // max below initial: initial wins (validation should forbid it anyway)
        assert_eq!(backoff_delay(&b(500, 100), 3), Duration::from_millis(500));
    }

    #[test]
    fn stable_after_is_at_least_ten_seconds() {
        assert_eq!(stable_after(&b(100, 500)), Duration::from_secs(10));
        assert_eq!(stable_after(&b(100, 30_000)), Duration::from_secs(30));
    }
}

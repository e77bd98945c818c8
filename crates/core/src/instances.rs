//! Instance count resolution. Core does no I/O, so the caller passes the usable CPU count
//! (the runtime uses `std::thread::available_parallelism`, which honours the affinity
//! mask and the cgroup CPU quota — unlike PM2, which counts every core).

use crate::model::Instances;

/// Most workers one app may ask for explicitly; past this it is surely a typo.
pub const MAX_INSTANCES: i64 = 1024;

/// Resolves `instances:` to a worker count: N, `max` or 0 = `cpus`, -K = `cpus` - K.
///
/// # Guarantees
/// The result is at least 1, whatever the input (a validated N is already >= 1; `cpus`
/// of 0 is treated as 1).
#[must_use]
pub fn resolve_instances(instances: Instances, cpus: u32) -> u32 {
    let cpus = i64::from(cpus.max(1));
    let n = match instances {
        Instances::Max(_) | Instances::Count(0) => cpus,
        Instances::Count(k) if k < 0 => cpus.saturating_add(k),
        Instances::Count(n) => n.min(MAX_INSTANCES),
    };
    u32::try_from(n.max(1)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MaxWord;

    #[test]
    fn resolves_every_form() {
        let cases = [
            (Instances::Count(4), 8, 4),
            (Instances::Count(0), 8, 8),
            (Instances::Max(MaxWord::Max), 8, 8),
            (Instances::Count(-1), 8, 7),
            (Instances::Count(-8), 8, 1),
            (Instances::Count(-100), 8, 1),
            (Instances::Count(i64::MIN), 8, 1),
            (Instances::Max(MaxWord::Max), 0, 1),
            (Instances::Count(1), 1, 1),
        ];
        for (instances, cpus, want) in cases {
            assert_eq!(
                resolve_instances(instances, cpus),
                want,
                "{instances:?} on {cpus} cpus"
            );
        }
    }
}

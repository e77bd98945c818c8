//! Signal names: `SIGTERM`, `TERM`, `sigterm` all mean the same signal; the loader
//! normalizes them to the `SIGTERM` form so the runtime only ever sees one spelling.
//! Names only: core does not depend on nix; the runtime maps a name to a number.

use crate::error::ManifestError;

/// Linux signals by name, without the `SIG` prefix.
pub const SIGNALS: &[&str] = &[
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// `SIGKILL` for 9: the Linux numbering (1..=31 in the order of [`SIGNALS`]).
#[must_use]
pub fn signal_name(number: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    usize::try_from(number)
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| NAMES.get(i).copied())
}

/// Normalizes a signal name to the `SIGTERM` form.
///
/// # Errors
/// [`ManifestError::UnknownSignal`] for a name that is not a Linux signal.
pub fn normalize_signal(name: &str) -> Result<String, ManifestError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if SIGNALS.contains(&bare) {
        Ok(format!("SIG{bare}"))
    } else {
        Err(ManifestError::UnknownSignal(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_like_linux() {
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(15), Some("SIGTERM"));
        assert_eq!(signal_name(2), Some("SIGINT"));
        assert_eq!(signal_name(31), Some("SIGSYS"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(64), None);
        for (i, bare) in SIGNALS.iter().enumerate() {
            assert_eq!(signal_name(i as i32 + 1).unwrap(), format!("SIG{bare}"));
        }
    }

    #[test]
    fn accepts_every_spelling() {
        for (input, want) in [
            ("SIGTERM", "SIGTERM"),
            ("TERM", "SIGTERM"),
            ("sigint", "SIGINT"),
            ("usr2", "SIGUSR2"),
        ] {
            assert_eq!(normalize_signal(input).unwrap(), want, "{input}");
        }
        for bad in ["SIGFOO", "", "SIG", "15"] {
            assert!(normalize_signal(bad).is_err(), "{bad}");
        }
    }
}

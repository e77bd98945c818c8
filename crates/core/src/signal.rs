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

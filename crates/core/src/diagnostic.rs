//! Diagnostics: `file:line:column: what is wrong (expected what)`, the one error format
//! every manifest problem is reported in, and the wording of parser errors.

use std::fmt;
use std::path::PathBuf;

/// One problem in a manifest file, at a position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// The file as the caller named it (not canonicalized, so it reads as the user typed it).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and what was expected; lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl Diagnostic {
    /// The diagnostic as a warning line: `file:line:column: warning: message` (the
    /// `warning:` word as compilers print it, so editors and CI annotate it as one).
    #[must_use]
    pub fn warning_line(&self) -> String {
        format!(
            "{}:{}:{}: warning: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Words a serde-saphyr error the way clusterd words its own: what is wrong, what was
/// expected, and for an unknown field the closest known name.
pub(crate) fn describe(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    match err {
        E::SerdeUnknownField { field, expected, .. } => unknown_name("field", field, expected),
        E::SerdeUnknownVariant { variant, expected, .. } => unknown_name("value", variant, expected),
        E::SerdeMissingField { field, .. } => format!("missing field `{field}`"),
        E::SerdeInvalidType { unexpected, expected, .. } => format!("invalid type: {unexpected}, expected {expected}"),
        E::SerdeInvalidValue { unexpected, expected, .. } => {
            format!("invalid value: {unexpected}, expected {expected}")
        }
        E::Budget { breach, .. } => format!(
            "document is too large or complex ({breach:?}) (expected a plain manifest: at most 256 aliases, {} levels of nesting)",
            crate::yaml::MAX_DEPTH
        ),
        E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. } => {
            "aliases expand to too much data (is this a \"billion laughs\" file?); expected a plain manifest".to_string()
        }
        E::InvalidScalar { ty, .. } => format!("invalid value, expected {}", friendly_type(ty)),
        E::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping of `key: value` pairs".to_string(),
            "sequence start" => "expected a list".to_string(),
            "string scalar" => "expected a string".to_string(),
            other => format!("expected {other}"),
        },
        E::WithSnippet { .. } => describe(err.without_snippet()),
        other => strip_location(&other.to_string()),
    }
}

/// Whether the error concerns one value of a well-formed document (so recovery may cut
/// that value out and read on), rather than the document as a whole (syntax, budgets).
pub(crate) fn is_about_one_value(err: &serde_saphyr::Error) -> bool {
    use serde_saphyr::Error as E;
    match err {
        E::WithSnippet { .. } => is_about_one_value(err.without_snippet()),
        E::Message { .. }
        | E::Unexpected { .. }
        | E::InvalidBooleanStrict { .. }
        | E::NullIntoString { .. }
        | E::InvalidScalar { .. }
        | E::NonFiniteFloat { .. }
        | E::SerdeInvalidType { .. }
        | E::SerdeInvalidValue { .. }
        | E::SerdeInvalidLength { .. }
        | E::SerdeUnknownVariant { .. }
        | E::SerdeUnknownField { .. }
        | E::SerdeMissingField { .. }
        | E::DuplicateMappingKey { .. } => true,
        _ => false,
    }
}

fn friendly_type(ty: &str) -> &'static str {
    match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "bool" => "true or false",
        _ => "a value of another type",
    }
}

/// serde-saphyr appends ` at line L column C` to some messages; the diagnostic carries the
/// position already.
fn strip_location(msg: &str) -> String {
    let msg = msg.lines().next().unwrap_or(msg);
    let cut = msg.rfind(" at line ").unwrap_or(msg.len());
    msg[..cut].trim_end_matches('.').to_string()
}

/// `unknown field `instnaces`, did you mean `instances`?` or, with no close name, the
/// full list.
pub(crate) fn unknown_name(what: &str, got: &str, expected: &[&str]) -> String {
    match suggest(got, expected) {
        Some(best) => format!("unknown {what} `{got}`, did you mean `{best}`?"),
        None if expected.is_empty() => format!("unknown {what} `{got}` (nothing is expected here)"),
        None => {
            let list: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
            format!(
                "unknown {what} `{got}` (expected one of {})",
                list.join(", ")
            )
        }
    }
}

/// The closest candidate by edit distance (case-insensitive), if close enough to be a
/// typo: at most a third of the word's length, and at least 1 edit allowed.
pub(crate) fn suggest<'a>(got: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let got_l = got.to_lowercase();
    let limit = (got.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (levenshtein(&got_l, &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Classic edit distance with transpositions counted as one edit (`instnaces`).
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2 = vec![0usize; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        let fields = ["command", "workingDir", "instances", "listen"];
        assert_eq!(suggest("instnaces", &fields), Some("instances"));
        assert_eq!(suggest("workingdir", &fields), Some("workingDir"));
        assert_eq!(suggest("lisen", &fields), Some("listen"));
        assert_eq!(suggest("zzzzzz", &fields), None);
    }
}

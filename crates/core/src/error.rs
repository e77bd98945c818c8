//! The crate's error type, for the few operations that fail on their own (outside the
//! collect-everything validation, which reports [`crate::diagnostic::Diagnostic`]s).

/// Why a manifest value cannot be used. Messages say what is wrong and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A file over [`crate::yaml::MAX_FILE_BYTES`].
    #[error("file is {size} bytes, more than the {max} bytes a manifest may have (expected a small YAML file)")]
    TooLarge {
        /// Size of the file.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes that are not UTF-8 (a binary, or another encoding).
    #[error("file is not UTF-8 text (expected a YAML manifest)")]
    NotUtf8,
    /// Nothing but comments and blank lines.
    #[error(
        "file holds no manifest (expected a document with apiVersion, kind, metadata and spec)"
    )]
    Empty,
    /// `command: "node 'server.js"`.
    #[error("command has an unbalanced quote (expected matching ' or \" quotes)")]
    UnbalancedQuotes,
    /// `command: []` or `command: ""`.
    #[error("command is empty (expected a program and its arguments, like [node, server.js])")]
    EmptyCommand,
    /// A shell operator in a command string: it would need a shell, and none is run.
    #[error(
        "command contains `{0}`, which needs a shell, and clusterd never runs one (expected plain arguments; write [sh, -c, \"...\"] to use a shell)"
    )]
    ShellOperator(String),
    /// `shutdown.signal: SIGFOO`.
    #[error("unknown signal `{0}` (expected a name like SIGTERM, TERM or sigint)")]
    UnknownSignal(String),
}

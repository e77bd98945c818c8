//! The one error type of the runtime crate.
//!
//! Every variant says *what* was attempted on *which* object, so that the daemon can show
//! the message as is (in status, events and the CLI) without wrapping it again. The proxy
//! module may add its own variants here.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors of the runtime crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding a public listener failed (port in use, permission, bad address).
    #[error("cannot bind {protocol} {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// `tcp` or `udp`.
        protocol: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },

    /// An OS call on a file or object failed; `what` names the action and the object.
    #[error("{what}: {source}")]
    Io {
        /// E.g. "open log file /var/log/clusterd/web/web-0.log".
        what: String,
        /// OS error.
        #[source]
        source: io::Error,
    },

    /// The worker process could not be started: the shim itself failed to run, or one of
    /// its steps before `exec` failed (the message comes from the shim, e.g.
    /// "exec of `foo` failed: No such file or directory").
    #[error("worker {app}-{index} failed to start: {message}")]
    WorkerStart {
        /// App name.
        app: String,
        /// Instance index.
        index: u32,
        /// What went wrong, ready to print.
        message: String,
    },

    /// `user:`/`group:` cannot be honoured (unknown user, or the daemon is not root).
    #[error("{0}")]
    Privilege(String),

    /// The spec handed to the runtime is unusable (empty argv, NUL byte in an argument...).
    #[error("invalid worker spec: {0}")]
    InvalidSpec(String),

    /// A pid recorded in the state dir does not belong to the worker that was recorded
    /// (it exited, or the pid was reused), so it must not be adopted.
    #[error("pid {pid} cannot be adopted: {reason}")]
    NotAdoptable {
        /// The recorded pid.
        pid: i32,
        /// Why not.
        reason: String,
    },

    /// The cgroup v2 backstop cannot be used here; the reason is shown in status as
    /// "cgroup backstop: unavailable (reason)".
    #[error("cgroup backstop unavailable: {0}")]
    CgroupUnavailable(String),

    /// A cgroup operation failed on a tree that looked usable.
    #[error("cgroup {path}: {what}: {source}")]
    Cgroup {
        /// The cgroup directory or file.
        path: PathBuf,
        /// Action.
        what: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A step of an ACME order failed (the ACME server's problem document, or the HTTP
    /// error reaching it).
    #[error("ACME: {what}: {source}")]
    Acme {
        /// The step, e.g. "creating an account at https://acme.test/dir".
        what: String,
        /// instant-acme's error.
        #[source]
        source: instant_acme::Error,
    },
    /// An ACME order ended without a certificate (e.g. a challenge was refused).
    #[error("ACME: {0}")]
    AcmeOrder(String),
    /// A certificate, CSR or challenge certificate could not be generated.
    #[error("ACME: generating {what}: {source}")]
    AcmeKey {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Extension to attach a description to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Wraps the error in [`Error::Io`] with a lazily built description.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

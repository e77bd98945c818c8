//! Side effects of clusterd: the only crate that touches processes, sockets and files.
//!
//! It carries out the planner's actions and reports what happened as events. The one
//! place `unsafe` is allowed (fd juggling between fork and exec), each block with a
//! `SAFETY:` comment.
//!
//! The process layer:
//! - [`listener`]: the public sockets the daemon binds once and keeps.
//! - [`spawn`] + [`shim`]: workers as process groups, started through an exec shim that
//!   sets `LISTEN_PID`, rlimits, cgroup and user before exec; [`spawn::adopt`] after a
//!   daemon restart.
//! - [`notify`] and [`ipc`]: readiness from sd_notify and Node's `process.send('ready')`.
//! - [`logs`]: per-instance log files, rotation, tail and follow; [`logwatch`]: sizes
//!   checked as the files grow.
//! - [`proxy`]: the http and tcp modes' proxies and their route tables.
//! - [`accept`]: accept-error backoff, connection caps, the daemon's fd limit.
//! - [`procfs`] and [`limits`]: CPU/RSS of a worker's group, the cgroup v2 backstop.
//! - [`handover`] and [`fdstore`]: the public sockets outlive the daemon (upgrade
//!   handover to the next daemon; systemd's fd store across a crash).
//! - [`seccomp`]: shared listener mode, an app's `bind(PORT)` answered with the daemon's
//!   socket (seccomp user notification set up by the shim).
//! - [`tree`] and [`reaper`]: a worker's whole process tree, and the daemon as child
//!   subreaper reaping every orphan.
//! - [`effects`]: all of the above behind the one interface the daemon's controller
//!   uses ([`effects::Effects`]), with [`effects::LinuxEffects`] as the real host.

pub mod accept;
pub mod effects;
pub mod error;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod fdstore;
pub mod gitops;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod handover;
pub mod ipc;
pub mod limits;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod listener;
pub mod logs;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod logwatch;
pub mod notify;
pub mod procfs;
pub mod proxy;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod quiet_read;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod reaper;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod seccomp;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod shim;
#[allow(unsafe_code)] // fd and syscall plumbing, each block with a SAFETY comment
pub mod spawn;
pub mod tls;
pub mod tree;

pub use error::{Error, Result};

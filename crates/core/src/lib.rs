//! The pure core of clusterd.
//!
//! Everything here is deterministic and free of I/O, clocks and threads: the manifest
//! model, parsing with source positions, validation, instance-count resolution, the
//! revision hash, and the planner that turns desired and observed state into actions.
//! The runtime crate carries the actions out; this crate only decides.

pub mod acme;
pub mod diagnostic;
pub mod diff;
pub mod error;
pub mod event;
pub mod export;
pub mod instances;
pub mod intake;
pub mod load;
pub mod model;
pub mod net;
pub mod plan;
pub mod recover;
pub mod revision;
pub mod signal;
pub mod validate;
pub mod yaml;

pub use diagnostic::Diagnostic;
pub use error::ManifestError;
pub use instances::resolve_instances;
pub use load::{
    check_files, load, validate_files, Checked, LoadContext, LoadReport, LoadedApp, ManifestFile,
};
pub use revision::revision;

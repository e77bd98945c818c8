//! The pure core of clusterd.
//!
//! Everything here is deterministic and free of I/O, clocks and threads: the manifest
//! model, parsing with source positions, validation, instance-count resolution, the
//! revision hash, and the planner that turns desired and observed state into actions.
//! The runtime crate carries the actions out; this crate only decides.

pub mod diff;
pub mod export;
pub mod model;
pub mod plan;

//! Exports of app manifests to other systems: the way out when one host is not enough.
//!
//! Pure text generation; writing files and reading manifests is the caller's job.

pub mod kubernetes;
mod yaml;

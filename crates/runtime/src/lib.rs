//! Side effects of clusterd: the only crate that touches processes, sockets and files.
//!
//! It carries out the planner's actions and reports what happened as events. The one
//! place `unsafe` is allowed (fd juggling between fork and exec), each block with a
//! `SAFETY:` comment.

pub mod gitops;

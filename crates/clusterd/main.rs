//! The clusterd binary: the daemon, the CLI client, and the worker exec shim.
//!
//! `main` stays thin: argument parsing and dispatch live in `cli`, the daemon in
//! `daemon`, and everything with side effects below them in `clusterd-runtime`.

mod api_types;
mod cli;
mod client;
mod daemon;
mod output;

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the http proxy allocates and frees small buffers
/// and header maps on every request, and glibc's malloc/free/consolidate were ~7% of
/// the daemon's CPU under load (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::run()
}

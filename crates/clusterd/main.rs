//! The clusterd binary: the daemon, the CLI client, and the worker exec shim.
//!
//! `main` stays thin: argument parsing and dispatch live in `cli`, the daemon in
//! `daemon`, and everything with side effects below them in `clusterd-runtime`.

mod api_types;
mod cli;
mod client;
mod daemon;
mod import_pm2;
mod manual;
mod output;
mod top;

use std::process::ExitCode;

/// With `--features mimalloc`: mimalloc instead of glibc malloc. The http proxy
/// allocates and frees small buffers and header maps on every request; glibc's
/// malloc/free were 7-8% of the daemon's samples under load, mimalloc's ~2.7%. Off by
/// default because it costs resident memory (10 MiB -> 26 MiB for the daemon at 10 apps
/// x 4 workers; 11.3 MiB with `MIMALLOC_ARENA_EAGER_COMMIT=0`), and the daemon's RSS
/// target is 10 MiB (docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::run()
}

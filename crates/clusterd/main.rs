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

fn main() -> ExitCode {
    cli::run()
}

//! End-to-end tests: the real `clusterd` binary against real worker processes, on
//! 127.0.0.1, OS-chosen ports and temp dirs. Every process a test starts is stopped by
//! the harness (the daemon with SIGTERM then SIGKILL, and every worker process group the
//! daemon reported), even when the test fails.

#[path = "e2e/support.rs"]
mod support;

#[path = "e2e/acme.rs"]
mod acme;

#[path = "e2e/smoke.rs"]
mod smoke;

#[path = "e2e/daemon.rs"]
mod daemon;

#[path = "e2e/cli.rs"]
mod cli;
#[path = "e2e/proxy.rs"]
mod proxy;

#[path = "e2e/safety.rs"]
mod safety;

#[path = "e2e/gitops.rs"]
mod gitops;

#[path = "e2e/upgrade.rs"]
mod upgrade;

#[path = "e2e/faults.rs"]
mod faults;

#[path = "e2e/shared.rs"]
mod shared;

#[path = "e2e/friendly.rs"]
mod friendly;

#[path = "e2e/trees.rs"]
mod trees;

#[path = "e2e/import_pm2.rs"]
mod import_pm2;

#[path = "e2e/top.rs"]
mod top;

#[path = "e2e/tls.rs"]
mod tls;

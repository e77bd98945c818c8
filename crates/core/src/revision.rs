//! The revision: a short, stable hash of everything that shapes a worker process.
//!
//! Included: command (as argv), workingDir (resolved), env, user, group, limits, listen
//! (address, port, mode, protocol, and affinity and tls when set; not trustedProxies).
//! Excluded, because changing them must not replace any worker: instances (scaling),
//! rollout, shutdown, restart (daemon-side policies), readiness and liveness (how the
//! daemon watches a worker, not what the worker is), and logs (rotation is done by the
//! daemon's log capture, which can apply new settings without a restart).
//!
//! # Guarantees
//! - Stable across runs, machines and releases: the input is a canonical JSON document
//!   built from explicit fields with ordered maps (never a `HashMap`'s order or `Debug`
//!   output), prefixed with a format tag.
//! - Unset optional fields are omitted rather than written as `null`, so a future release
//!   that adds an optional worker-shaping field does not change every existing revision
//!   (which would roll every app on upgrade).

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::{Affinity, AppSpec, CommandLine, ListenMode, Protocol, Tls};
use crate::plan::Revision;

/// Bumped only if the canonical form must change on purpose (it rolls every app).
const FORMAT: &str = "clusterd-revision-v1";

#[derive(Serialize)]
struct Canonical<'a> {
    command: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    working_dir: Option<String>,
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    limits: CanonicalLimits,
    listen: Vec<CanonicalListener<'a>>,
}

#[derive(Serialize)]
struct CanonicalLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nofile: Option<u64>,
    /// As bits so float formatting can never differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_bits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nproc: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    core: Option<u64>,
}

#[derive(Serialize)]
struct CanonicalListener<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    port: u32,
    address: &'a str,
    mode: ListenMode,
    protocol: Protocol,
    /// Left out when `none`, so revisions from before the field existed stay the same.
    #[serde(skip_serializing_if = "Affinity::is_none")]
    affinity: Affinity,
    /// Left out when absent, for the same reason. Paths only: a renewed certificate
    /// in the same files is picked up by the proxy without a new revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'a Tls>,
}

/// Computes the revision of a loaded spec (command already normalized to argv and
/// workingDir resolved; a `Shell` command is split here the same way for robustness).
#[must_use]
pub fn revision(spec: &AppSpec) -> Revision {
    // Exhaustive destructuring: a new field of the spec, its limits or its listeners does
    // not compile until it is placed on one side of the rule above (as `diff.rs` does
    // for what it shows), so "diffed but not hashed" cannot happen by omission.
    let AppSpec {
        command,
        working_dir,
        env,
        instances: _,
        listen,
        readiness: _,
        liveness: _,
        rollout: _,
        shutdown: _,
        restart: _,
        limits,
        user,
        group,
        logs: _,
    } = spec;
    let crate::model::Limits {
        memory,
        nofile,
        cpu,
        nproc,
        core,
    } = limits;
    let split;
    let command: Vec<&str> = match command {
        CommandLine::Argv(argv) => argv.iter().map(String::as_str).collect(),
        CommandLine::Shell(line) => {
            split = shell_words::split(line).unwrap_or_else(|_| vec![line.clone()]);
            split.iter().map(String::as_str).collect()
        }
    };
    let canonical = Canonical {
        command,
        working_dir: working_dir
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        env,
        user: user.as_deref(),
        group: group.as_deref(),
        limits: CanonicalLimits {
            memory: memory.map(|s| s.0),
            nofile: *nofile,
            cpu_bits: cpu.map(|c| c.0.to_bits()),
            nproc: *nproc,
            core: core.map(|s| s.0),
        },
        listen: listen
            .iter()
            .map(|l| {
                let crate::model::Listener {
                    name,
                    port,
                    address,
                    mode,
                    protocol,
                    // Read by the proxy per connection; changing it replaces no worker.
                    trusted_proxies: _,
                    affinity,
                    tls,
                } = l;
                CanonicalListener {
                    name: name.as_deref(),
                    port: *port,
                    address,
                    mode: *mode,
                    protocol: *protocol,
                    affinity: *affinity,
                    tls: tls.as_ref(),
                }
            })
            .collect(),
    };
    // Serializing plain structs, strings and a BTreeMap cannot fail.
    let json = serde_json::to_vec(&canonical).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(FORMAT.as_bytes());
    hasher.update([0]);
    hasher.update(&json);
    let digest = hasher.finalize();
    Revision(digest.iter().take(4).map(|b| format!("{b:02x}")).collect())
}

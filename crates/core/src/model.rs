//! The manifest model (`apiVersion: clusterd/v1`, `kind: App`), as the YAML spells it.
//!
//! These types are the contract of `../shared/DESIGN.md`. Every struct denies unknown
//! fields so a typo is an error rather than a silently ignored setting. Defaults live
//! here, next to the fields, so docs/manifest.md and the code cannot drift apart.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One manifest document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppManifest {
    /// Must be `clusterd/v1`.
    pub api_version: String,
    /// Must be `App`.
    pub kind: String,
    /// Identity of the app.
    pub metadata: Metadata,
    /// What to run and how.
    pub spec: AppSpec,
}

/// Identity of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// `[a-z0-9-]`, 1..63 characters, unique on the host.
    pub name: String,
}

/// The app's desired shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppSpec {
    /// argv; a string is split like a shell would, without running one.
    pub command: CommandLine,
    /// Relative paths are resolved against the manifest's directory when loaded.
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Ordered so the revision hash and diffs are deterministic.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How many workers.
    #[serde(default)]
    pub instances: Instances,
    /// Public sockets the daemon owns.
    #[serde(default)]
    pub listen: Vec<Listener>,
    /// When a new worker may take traffic.
    #[serde(default)]
    pub readiness: Readiness,
    /// When a running worker must be replaced.
    #[serde(default)]
    pub liveness: Option<Liveness>,
    /// Bounds of a rolling replacement.
    #[serde(default)]
    pub rollout: Rollout,
    /// How a worker is stopped.
    #[serde(default)]
    pub shutdown: Shutdown,
    /// What happens when a worker exits on its own.
    #[serde(default)]
    pub restart: Restart,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Drop to this user when the daemon is root.
    #[serde(default)]
    pub user: Option<String>,
    /// Drop to this group (default: the user's primary group).
    #[serde(default)]
    pub group: Option<String>,
    /// Capture of the workers' stdout and stderr.
    #[serde(default)]
    pub logs: Logs,
}

/// argv of the worker. Accepts a YAML list or a shell-like string.
///
/// Deserialized by hand (not `untagged`) so a wrong type gets a message that says what
/// was expected, with a position, instead of "did not match any variant".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// Already split.
    Argv(Vec<String>),
    /// To be split with shell quoting rules (never run through a shell).
    Shell(String),
}

/// `instances:` as written: `4`, `max`, `0` (= max) or `-K` (CPUs minus K, at least 1).
///
/// Deserialized by hand for a clear error ("expected a number or `max`").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Instances {
    /// A number: N >= 1, 0 = all CPUs, -K = all CPUs minus K.
    Count(i64),
    /// The word `max`.
    Max(MaxWord),
}

impl Default for Instances {
    fn default() -> Self {
        Instances::Count(1)
    }
}

/// The literal `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxWord {
    /// `max`
    Max,
}

/// One public socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    /// Goes into `LISTEN_FDNAMES` and `PORT_<NAME>`.
    #[serde(default)]
    pub name: Option<String>,
    /// 1..65535.
    pub port: u32,
    /// Default `0.0.0.0`.
    #[serde(default = "default_address")]
    pub address: String,
    /// Default `http`.
    #[serde(default)]
    pub mode: ListenMode,
    /// Default `tcp`; `udp` only with `inherit` and `shared`.
    #[serde(default)]
    pub protocol: Protocol,
    /// http mode: peers (CIDRs or addresses) whose forwarding headers are believed, such
    /// as a load balancer in front of the host. From anyone else the proxy overwrites
    /// `X-Forwarded-Proto/Host/Port` and drops `X-Real-IP` and its kin. Parsed into
    /// [`crate::net::Cidr`] by validation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// http and tcp modes: whether a client keeps going to the same worker.
    #[serde(default, skip_serializing_if = "Affinity::is_none")]
    pub affinity: Affinity,
    /// http mode: terminate TLS on this listener (HTTP/2 offered by ALPN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// `listen[].affinity`: how the proxy chooses a worker for a client.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum Affinity {
    /// Each request (http) or connection (tcp) goes to the least-busy worker.
    #[default]
    None,
    /// The same client address keeps its worker (rendezvous hashing over the
    /// routable workers, so a reload or a scale moves only the clients of the
    /// workers that changed).
    #[serde(rename = "clientIP")]
    ClientIp,
}

impl Affinity {
    /// Whether this is the default (left out of serialized manifests and the revision).
    #[must_use]
    pub fn is_none(&self) -> bool {
        *self == Affinity::None
    }
}

/// `listen[].tls`: certificates for TLS termination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tls {
    /// PEM files, chosen by SNI; the first is the default for clients that send no
    /// name or a name no certificate covers. Files are watched and reloaded.
    #[serde(default)]
    pub certificates: Vec<TlsCertificate>,
    /// Obtain and renew a certificate automatically (ACME, TLS-ALPN-01 answered by this
    /// listener). With `certificates` too, the ACME certificate serves its `domains` and
    /// the files serve the other names (the first file stays the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<Acme>,
}

/// One certificate chain and its private key, as PEM files. Relative paths are
/// resolved against the manifest's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `listen[].tls.acme`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Acme {
    /// Names the certificate covers (one certificate for all of them).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Contact address for the ACME account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The ACME directory URL (default: Let's Encrypt's production directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// A PEM file with the CA certificate the ACME server's HTTPS certificate is checked
    /// against instead of the system's roots: for a private or test ACME server such as
    /// pebble. Relative paths are resolved against the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
}

fn default_address() -> String {
    "0.0.0.0".to_string()
}

/// How traffic reaches workers.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    /// HTTP/1.1 reverse proxy, per-request balancing.
    #[default]
    Http,
    /// L4 proxy, per-connection balancing.
    Tcp,
    /// The listening socket itself is passed to every worker as fd 3.
    Inherit,
    /// The app binds `PORT` itself and clusterd answers that bind with its own listening
    /// socket (seccomp user notification): inherit's data path without code changes.
    Shared,
}

/// Transport protocol of a listener.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Stream sockets.
    #[default]
    Tcp,
    /// Datagram sockets (inherit and shared modes only).
    Udp,
}

/// Readiness gate for new workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Readiness {
    /// Default: `tcp` in http/tcp modes, `none` in inherit mode, `bind` in shared mode
    /// (resolved at load from the first listener).
    #[serde(default, rename = "type")]
    pub kind: Option<ReadinessKind>,
    /// For `delay`.
    #[serde(default)]
    pub delay: Option<DurationValue>,
    /// For `http`: the GET path.
    #[serde(default)]
    pub path: Option<String>,
    /// Not ready by then: the rollout stops, old workers keep serving. Default 30s.
    #[serde(default = "default_readiness_timeout")]
    pub timeout: DurationValue,
    /// How often tcp/http probes run until ready. Default 100ms.
    #[serde(default = "default_probe_period")]
    pub period: DurationValue,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            kind: None,
            delay: None,
            path: None,
            timeout: default_readiness_timeout(),
            period: default_probe_period(),
        }
    }
}

fn default_readiness_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}

fn default_probe_period() -> DurationValue {
    DurationValue(Duration::from_millis(100))
}

/// How a worker says it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessKind {
    /// Ready as soon as it is spawned.
    None,
    /// Ready after `delay`.
    Delay,
    /// sd_notify `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// Node IPC `process.send('ready')`.
    Ipc,
    /// A TCP connect to the worker's private port succeeds.
    Tcp,
    /// GET `path` on the worker's private port answers 2xx/3xx.
    Http,
    /// Shared mode: the worker's bind of a shared listener's port was answered, i.e. the
    /// app is listening on the shared socket now.
    Bind,
}

/// Liveness probe: a worker failing it `failure_threshold` times in a row is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Liveness {
    /// `http`, `tcp` or `exec`.
    #[serde(rename = "type")]
    pub kind: LivenessKind,
    /// For `http`.
    #[serde(default)]
    pub path: Option<String>,
    /// For `exec`: argv run with the worker's environment; exit 0 = alive.
    #[serde(default)]
    pub command: Option<CommandLine>,
    /// Default 10s.
    #[serde(default = "default_liveness_period")]
    pub period: DurationValue,
    /// Default 1s.
    #[serde(default = "default_liveness_timeout")]
    pub timeout: DurationValue,
    /// Default 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Grace after readiness before the first probe. Default 0s.
    #[serde(default)]
    pub initial_delay: DurationValue,
}

fn default_liveness_period() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}
fn default_liveness_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(1))
}
fn default_failure_threshold() -> u32 {
    3
}

/// Kinds of liveness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LivenessKind {
    /// GET `path` on the worker's private port.
    Http,
    /// TCP connect to the worker's private port.
    Tcp,
    /// Run a command.
    Exec,
}

/// Bounds of a rolling replacement (Kubernetes semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    /// Extra workers allowed above `instances` during a rollout. Default 1.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Ready workers allowed below `instances` during a rollout. Default 0.
    #[serde(default)]
    pub max_unavailable: u32,
}

fn one() -> u32 {
    1
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

/// How a worker is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Shutdown {
    /// Default SIGINT.
    #[serde(default = "default_signal")]
    pub signal: SignalName,
    /// Then SIGKILL. Default 10s.
    #[serde(default = "default_shutdown_timeout")]
    pub timeout: DurationValue,
}

fn default_signal() -> SignalName {
    SignalName("SIGINT".to_string())
}
fn default_shutdown_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            signal: default_signal(),
            timeout: default_shutdown_timeout(),
        }
    }
}

/// A signal as written (`SIGINT`, `INT`, `sigterm`...); validated against the known set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignalName(pub String);

/// Restart policy for workers that exit on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Restart {
    /// Default `always`.
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Exponential backoff between restarts of one instance.
    #[serde(default)]
    pub backoff: Backoff,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::Always,
            backoff: Backoff::default(),
        }
    }
}

/// When an exited worker is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    #[default]
    Always,
    /// Only after a non-zero exit or a signal.
    OnFailure,
    /// Never.
    Never,
}

/// Exponential backoff: `initial`, doubled per consecutive failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    /// Default 100ms.
    #[serde(default = "default_backoff_initial")]
    pub initial: DurationValue,
    /// Default 30s.
    #[serde(default = "default_backoff_max")]
    pub max: DurationValue,
}

fn default_backoff_initial() -> DurationValue {
    DurationValue(Duration::from_millis(100))
}
fn default_backoff_max() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// Resource limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Replace (rolling) a worker whose RSS exceeds it; cgroup `memory.max` above it.
    #[serde(default)]
    pub memory: Option<SizeValue>,
    /// RLIMIT_NOFILE.
    #[serde(default)]
    pub nofile: Option<u64>,
    /// CPUs, e.g. `1.5` (cgroup `cpu.max`).
    #[serde(default)]
    pub cpu: Option<CpuQuota>,
    /// RLIMIT_NPROC.
    #[serde(default)]
    pub nproc: Option<u64>,
    /// RLIMIT_CORE in bytes.
    #[serde(default)]
    pub core: Option<SizeValue>,
}

/// CPUs as a fraction (`1.5`); compared bitwise so specs stay `Eq`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CpuQuota(pub f64);

impl PartialEq for CpuQuota {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for CpuQuota {}

/// Log capture of stdout/stderr per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logs {
    /// Rotate when a file passes this size. Default 10Mi.
    #[serde(default = "default_log_size")]
    pub max_size: SizeValue,
    /// Rotated files kept. Default 5.
    #[serde(default = "default_log_files")]
    pub max_files: u32,
}

fn default_log_size() -> SizeValue {
    SizeValue(10 * 1024 * 1024)
}
fn default_log_files() -> u32 {
    5
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            max_size: default_log_size(),
            max_files: default_log_files(),
        }
    }
}

/// A duration written as `250ms`, `10s`, `5m`, `1h` (parsed by the manifest loader).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationValue(pub Duration);

/// A size in bytes written as `512Mi`, `1G`, `4096` (parsed by the manifest loader).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SizeValue(pub u64);

impl fmt::Display for DurationValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if !ms.is_multiple_of(60_000) || ms == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{}m", ms / 60_000)
        }
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration `{text}`, expected a number and a unit like 250ms, 10s, 5m")
    })?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}`, expected ms, s, m or h"
            ))
        }
    };
    let secs = value * factor;
    if !secs.is_finite() || !(0.0..=1.0e9).contains(&secs) {
        return Err(format!("duration `{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `512Mi`, `1G`, `64k`, `4096` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid size `{text}`, expected a number and a unit like 512Mi or 1G")
    })?;
    let factor: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`, expected Ki, Mi, Gi, K, M or G"
            ))
        }
    };
    let bytes = value * factor;
    if !bytes.is_finite() || !(0.0..=1.0e18).contains(&bytes) {
        return Err(format!("size `{text}` is out of range"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

impl Serialize for DurationValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 250ms, 10s or 5m")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(DurationValue(Duration::from_secs(n)))
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Self::Value, E> {
                parse_duration(t).map(DurationValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for SizeValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 512Mi or 1G")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(SizeValue(n))
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Self::Value, E> {
                parse_size(t).map(SizeValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Instances {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Instances;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number (4, 0 or -1) or `max`")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(Instances::Count(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                i64::try_from(n)
                    .map(Instances::Count)
                    .map_err(|_| E::custom(format!("instances {n} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Self::Value, E> {
                if t.trim().eq_ignore_ascii_case("max") {
                    return Ok(Instances::Max(MaxWord::Max));
                }
                t.trim()
                    .parse::<i64>()
                    .map(Instances::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(t), &self))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CommandLine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of arguments or a command line string")
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Self::Value, E> {
                Ok(CommandLine::Shell(t.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<ArgString>()? {
                    argv.push(arg.0);
                }
                Ok(CommandLine::Argv(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// One argv element. YAML reads `8080` or `true` as a number or a bool, but in a command
/// they are plainly the text written, so they are accepted as such.
struct ArgString(String);

impl<'de> Deserialize<'de> for ArgString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ArgString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string argument")
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Self::Value, E> {
                Ok(ArgString(t.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(ArgString(n.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(ArgString(n.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
                Ok(ArgString(n.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(ArgString(b.to_string()))
            }
        }
        d.deserialize_string(V)
    }
}

impl std::fmt::Display for ListenMode {
    /// The manifest spelling (`http`, `tcp`, `inherit`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format!("{self:?}").to_lowercase())
    }
}

impl std::fmt::Display for Protocol {
    /// The manifest spelling (`tcp`, `udp`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format!("{self:?}").to_lowercase())
    }
}

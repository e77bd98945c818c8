//! `export kubernetes` against Kubernetes' own schema, and the settings it carries over.
//!
//! The schema check runs the `kubernetes-validate` tool (PyPI) in strict mode, which
//! rejects any field the API does not know. It is found through `KUBERNETES_VALIDATE`,
//! or at `.venv/bin/kubernetes-validate` in the repository root
//! (`python3 -m venv .venv && .venv/bin/pip install kubernetes-validate`). Without it the
//! check prints a SKIP line and passes, unless `CLUSTERD_REQUIRE_TOOLS=1` (as in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

use clusterd_core::export::kubernetes::{export, ExportApp, ExportOptions};
use clusterd_core::model::AppManifest;
use serde_json::{json, Value};

/// Kubernetes versions the output is validated against, pinned so the test does not
/// change meaning when the tool's default moves: the oldest schema the tool ships, a
/// release still common in managed clusters, and the newest it knows (its default).
const KUBERNETES_VERSIONS: [&str; 3] = ["1.25.0", "1.30.0", "1.37.0"];

/// Representative manifests with the instance count the loader would resolve them to
/// (on an 8-CPU host for `max` and negative counts).
const CASES: &[(&str, u32)] = &[
    (
        // http readiness, tcp liveness, memory and cpu limits, env, two listeners.
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: web}
spec:
  command: ["node", "server.js", "--title", "$(not-a-var)"]
  workingDir: /srv/web
  env: {NODE_ENV: production, FLAG: "on", COUNT: "010", EMPTY: "", QUOTE: "a: \"b\" # c"}
  instances: 4
  listen:
    - {name: http, port: 8080}
    - {name: Admin_Metrics, port: 9100, mode: tcp, address: 127.0.0.1}
  readiness: {type: http, path: /healthz, period: 500ms, timeout: 45s}
  liveness: {type: tcp, period: 15s, timeout: 2s, failureThreshold: 4, initialDelay: 5s}
  rollout: {maxSurge: 2, maxUnavailable: 1}
  shutdown: {signal: SIGTERM, timeout: 12500ms}
  limits: {memory: 512Mi, cpu: 1.5, nofile: 65536}
  user: "1000"
  group: "1000"
"#,
        4,
    ),
    (
        // instances max, inherit mode with tcp and udp, notify readiness, exec liveness.
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: dns}
spec:
  command: "coredns -conf '/etc/coredns/Corefile'"
  instances: max
  listen:
    - {name: dns-tcp, port: 53, mode: inherit}
    - {name: dns-udp, port: 53, mode: inherit, protocol: udp}
  readiness: {type: notify}
  liveness: {type: exec, command: ["/bin/check", "--quick"]}
  shutdown: {signal: SIGQUIT}
  restart: {policy: on-failure}
  user: coredns
"#,
        8,
    ),
    (
        // no listener, delay readiness, CPUs minus 2, http liveness without a port.
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: worker}
spec:
  command: [python3, -m, jobs]
  instances: -2
  readiness: {type: delay, delay: 2500ms}
  liveness: {type: http, path: /alive}
  limits: {memory: 1G, nproc: 512}
"#,
        6,
    ),
    (
        // ipc readiness, tcp readiness default, unnamed listeners, delay with a port.
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: 3d-render}
spec:
  command: [node, app.js]
  instances: 0
  listen:
    - {port: 3000}
    - {port: 3001, mode: tcp}
  readiness: {type: ipc}
  liveness: {type: http, path: /live}
"#,
        8,
    ),
    (
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: cache}
spec:
  command: [memcached]
  listen: [{port: 11211, mode: tcp}]
  readiness: {type: delay, delay: 3s}
"#,
        1,
    ),
    (
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: plain}
spec:
  command: [./serve]
  listen: [{port: 8000}]
  readiness: {type: tcp}
  restart: {policy: never, backoff: {initial: 1s}}
  logs: {maxFiles: 2}
"#,
        1,
    ),
    (
        // shared mode: readiness bind (its default) becomes a tcp probe of the port.
        r#"
apiVersion: clusterd/v1
kind: App
metadata: {name: shared-node}
spec:
  command: [node, server.js]
  instances: 2
  listen: [{name: web, port: 8080, mode: shared}]
"#,
        2,
    ),
];

fn manifests() -> Vec<AppManifest> {
    CASES
        .iter()
        .map(|(yaml, _)| serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}")))
        .collect()
}

fn export_all(image: Option<&str>) -> String {
    let manifests = manifests();
    let apps: Vec<ExportApp<'_>> = manifests
        .iter()
        .zip(CASES)
        .map(|(m, (_, replicas))| ExportApp {
            name: &m.metadata.name,
            source: Path::new("/etc/clusterd/apps/test.yaml"),
            spec: &m.spec,
            replicas: *replicas,
        })
        .collect();
    export(&apps, &ExportOptions { image }).expect("exports")
}

/// The exported documents, parsed back, by `kind/name`.
fn documents(text: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    &find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
}

fn env(c: &Value) -> Value {
    let pairs = c["env"].as_array().expect("env list");
    Value::Object(
        pairs
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["value"].clone()))
            .collect(),
    )
}

fn validator() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KUBERNETES_VALIDATE") {
        return Some(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/kubernetes-validate");
    venv.exists().then_some(venv)
}

#[test]
fn passes_kubernetes_strict_schema() {
    let Some(tool) = validator() else {
        assert!(
            std::env::var("CLUSTERD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "CLUSTERD_REQUIRE_TOOLS=1 but kubernetes-validate was not found (set KUBERNETES_VALIDATE \
             or create .venv with `python3 -m venv .venv && .venv/bin/pip install kubernetes-validate`)"
        );
        eprintln!("SKIP passes_kubernetes_strict_schema: kubernetes-validate not found; strict schema NOT checked");
        return;
    };
    for image in [None, Some("registry.example.com/{app}:1.2.3")] {
        let text = export_all(image);
        let expected = documents(&text).len();
        let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("export-{}.yaml", std::process::id()));
        std::fs::write(&file, &text).unwrap();
        for version in KUBERNETES_VERSIONS {
            let out = Command::new(&tool)
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "kubernetes {version} rejects the export:\n{report}\n--- output ---\n{text}"
            );
            // Every document must have been checked: a kind the tool skips would pass silently.
            assert_eq!(
                report.matches("passed for resource").count(),
                expected,
                "{report}"
            );
            assert!(!report.contains("WARN"), "{report}");
        }
        std::fs::remove_file(&file).ok();
    }
}

#[test]
fn deployment_carries_the_settings() {
    let docs = documents(&export_all(None));
    let web = find(&docs, "Deployment", "web");
    let labels =
        json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/managed-by": "clusterd-export"});
    let cases: Vec<(&str, &Value, Value)> = vec![
        ("replicas", &web["spec"]["replicas"], json!(4)),
        ("labels", &web["metadata"]["labels"], labels.clone()),
        (
            "pod labels",
            &web["spec"]["template"]["metadata"]["labels"],
            labels,
        ),
        (
            "selector",
            &web["spec"]["selector"],
            json!({"matchLabels": {"app.kubernetes.io/name": "web"}}),
        ),
        (
            "strategy",
            &web["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 1}}),
        ),
        (
            "progress deadline",
            &web["spec"]["progressDeadlineSeconds"],
            json!(45),
        ),
        (
            "grace rounded up",
            &web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            json!(13),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(*got, want, "{what}");
    }

    let c = container(&docs, "web");
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "image placeholder",
            c["image"].clone(),
            json!("REPLACE-ME/web:latest"),
        ),
        (
            "command escaped",
            c["command"].clone(),
            json!(["node", "server.js", "--title", "$$(not-a-var)"]),
        ),
        ("workingDir", c["workingDir"].clone(), json!("/srv/web")),
        (
            "env",
            env(c),
            json!({"COUNT": "010", "EMPTY": "", "FLAG": "on", "NODE_ENV": "production", "QUOTE": "a: \"b\" # c",
                   "CLUSTERD_APP": "web", "PORT": "8080", "PORT_HTTP": "8080", "PORT_ADMIN_METRICS": "9100"}),
        ),
        (
            "ports",
            c["ports"].clone(),
            json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                   {"name": "admin-metrics", "containerPort": 9100, "protocol": "TCP"}]),
        ),
        (
            "readiness",
            c["readinessProbe"].clone(),
            json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}),
        ),
        (
            "liveness",
            c["livenessProbe"].clone(),
            json!({"tcpSocket": {"port": "http"}, "initialDelaySeconds": 5, "periodSeconds": 15,
                   "timeoutSeconds": 2, "failureThreshold": 4}),
        ),
        (
            "limits",
            c["resources"].clone(),
            json!({"limits": {"memory": "512Mi", "cpu": "1500m"}}),
        ),
        (
            "numeric user",
            c["securityContext"].clone(),
            json!({"runAsUser": 1000, "runAsGroup": 1000}),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn other_readiness_and_liveness_kinds() {
    let docs = documents(&export_all(Some("ghcr.io/acme/{app}:v1")));
    let dns = container(&docs, "dns");
    let worker = find(&docs, "Deployment", "worker");
    let render = container(&docs, "3d-render");
    let cache = container(&docs, "cache");
    let cases: Vec<(&str, &Value, Value)> = vec![
        (
            "image template",
            &dns["image"],
            json!("ghcr.io/acme/dns:v1"),
        ),
        (
            "shell command split",
            &dns["command"],
            json!(["coredns", "-conf", "/etc/coredns/Corefile"]),
        ),
        (
            "tcp and udp on one port",
            &dns["ports"],
            json!([{"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                   {"name": "dns-udp", "containerPort": 53, "protocol": "UDP"}]),
        ),
        (
            "shared mode: bind readiness as a tcp probe",
            &container(&docs, "shared-node")["readinessProbe"]["tcpSocket"],
            json!({"port": "web"}),
        ),
        (
            "shared mode: the app binds PORT itself in a pod",
            &container(&docs, "shared-node")["ports"],
            json!([{"name": "web", "containerPort": 8080, "protocol": "TCP"}]),
        ),
        (
            "notify approximated by tcp",
            &dns["readinessProbe"]["tcpSocket"],
            json!({"port": "dns-tcp"}),
        ),
        (
            "exec liveness",
            &dns["livenessProbe"]["exec"],
            json!({"command": ["/bin/check", "--quick"]}),
        ),
        (
            "named user has no uid",
            &dns["securityContext"],
            Value::Null,
        ),
        (
            "max replicas",
            &find(&docs, "Deployment", "dns")["spec"]["replicas"],
            json!(8),
        ),
        (
            "delay without port",
            &worker["spec"]["minReadySeconds"],
            json!(3),
        ),
        (
            "deadline above minReady",
            &worker["spec"]["progressDeadlineSeconds"],
            json!(30),
        ),
        (
            "no port, no probe",
            &worker["spec"]["template"]["spec"]["containers"][0]["livenessProbe"],
            Value::Null,
        ),
        (
            "memory 1G",
            &worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"],
            json!("1G"),
        ),
        (
            "unnamed http port",
            &render["ports"][0],
            json!({"name": "http-3000", "containerPort": 3000, "protocol": "TCP"}),
        ),
        (
            "unnamed tcp port",
            &render["ports"][1]["name"],
            json!("tcp-3001"),
        ),
        (
            "ipc approximated by tcp",
            &render["readinessProbe"]["tcpSocket"]["port"],
            json!("http-3000"),
        ),
        (
            "http liveness",
            &render["livenessProbe"]["httpGet"],
            json!({"path": "/live", "port": "http-3000"}),
        ),
        (
            "delay with port",
            &cache["readinessProbe"]["initialDelaySeconds"],
            json!(3),
        ),
        (
            "delay probe",
            &cache["readinessProbe"]["tcpSocket"]["port"],
            json!("tcp-11211"),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(*got, want, "{what}");
    }
}

#[test]
fn services_map_ports() {
    let docs = documents(&export_all(None));
    assert_eq!(
        docs.len(),
        13,
        "seven deployments, six services (worker listens on nothing)"
    );
    let web = find(&docs, "Service", "web");
    assert_eq!(
        web["spec"]["selector"],
        json!({"app.kubernetes.io/name": "web"})
    );
    assert_eq!(
        web["spec"]["ports"],
        json!([{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"},
               {"name": "admin-metrics", "port": 9100, "targetPort": "admin-metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        find(&docs, "Service", "dns")["spec"]["ports"][1]["protocol"],
        "UDP"
    );
    assert_eq!(
        find(&docs, "Service", "svc-3d-render")["spec"]["selector"]["app.kubernetes.io/name"],
        "3d-render"
    );
    assert!(docs
        .iter()
        .all(|d| d["metadata"]["name"] != "worker" || d["kind"] == "Deployment"));
}

#[test]
fn comments_explain_what_does_not_map() {
    let text = export_all(None);
    for needle in [
        "`instances: max` (one per CPU) resolved to 8",
        "`instances: -2` (CPUs minus 2) resolved to 6",
        "`instances: 0` (one per CPU) resolved to 8",
        "STOPSIGNAL SIGQUIT",
        "inherit mode: Kubernetes passes no listening socket",
        "readiness `notify`",
        "readiness `ipc`",
        "user `coredns`: Kubernetes needs a numeric id",
        "limits nofile are rlimits",
        "limits nproc are rlimits",
        "restart.policy is not `always`",
        "REPLACE the image",
        "bound a specific host address",
        "Service names must start with a letter",
        "restart.backoff (1s .. 30s) does not map",
        "logs (rotation at 10485760 bytes, 2 files)",
    ] {
        assert!(
            text.contains(needle),
            "missing comment {needle:?} in:\n{text}"
        );
    }
    // SIGTERM is what Kubernetes sends anyway: no advice needed for `web`.
    let web = text
        .split("app `web`")
        .nth(1)
        .unwrap()
        .split("app `dns`")
        .next()
        .unwrap();
    assert!(!web.contains("STOPSIGNAL"), "{web}");
}

#[test]
fn rejects_what_kubernetes_cannot_name_or_run() {
    let m: AppManifest = serde_saphyr::from_str(CASES[0].0).unwrap();
    let app = |name| ExportApp {
        name,
        source: Path::new("x.yaml"),
        spec: &m.spec,
        replicas: 1,
    };
    for bad in ["-web", "web-", "Web", "", &"a".repeat(64)] {
        assert!(
            export(&[app(bad)], &ExportOptions::default()).is_err(),
            "{bad:?}"
        );
    }
    let mut spec = m.spec.clone();
    spec.command = clusterd_core::model::CommandLine::Shell("node 'unterminated".into());
    let err = export(
        &[ExportApp {
            name: "web",
            source: Path::new("x.yaml"),
            spec: &spec,
            replicas: 1,
        }],
        &ExportOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("command cannot be split"), "{err}");
}

//! One table row per validation rule: a manifest and the exact diagnostics it yields.

use std::path::PathBuf;

use clusterd_core::model::{CommandLine, ReadinessKind};
use clusterd_core::plan::AppName;
use clusterd_core::{load, validate_files, LoadContext, ManifestFile};

const HEAD: &str = "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: [node, server.js]\n";

fn check(yaml: &str) -> Vec<String> {
    validate_files(
        &[ManifestFile::new("/srv/apps/web.yaml", yaml.as_bytes())],
        8,
    )
}

/// `spec` lines appended to a valid head, so rows show only what they test.
fn with_spec(extra: &str) -> String {
    format!("{HEAD}{extra}")
}

#[test]
fn every_rule_reports_where_and_what() {
    let rows: Vec<(&str, String, Vec<&str>)> = vec![
        ("valid minimal", with_spec(""), vec![]),
        (
            "apiVersion",
            HEAD.replace("clusterd/v1", "clusterd/v2"),
            vec!["/srv/apps/web.yaml:1:13: unsupported apiVersion `clusterd/v2` (expected `clusterd/v1`)"],
        ),
        ("kind", HEAD.replace("kind: App", "kind: Pod"), vec!["/srv/apps/web.yaml:2:7: unsupported kind `Pod` (expected `App`)"]),
        (
            "name syntax",
            HEAD.replace("name: web", "name: Web_1"),
            vec!["/srv/apps/web.yaml:4:9: invalid app name `Web_1` (expected 1 to 63 characters of a-z, 0-9 and `-`, not starting or ending with `-`)"],
        ),
        ("name leading dash", HEAD.replace("name: web", "name: -web"), vec!["/srv/apps/web.yaml:4:9: invalid app name `-web` (expected 1 to 63 characters of a-z, 0-9 and `-`, not starting or ending with `-`)"]),
        (
            "unknown field",
            with_spec("  instnaces: 3\n"),
            vec!["/srv/apps/web.yaml:7:3: unknown field `instnaces`, did you mean `instances`?"],
        ),
        (
            "instances word",
            with_spec("  instances: lots\n"),
            vec!["/srv/apps/web.yaml:7:3: invalid value: string \"lots\", expected a number (4, 0 or -1) or `max`"],
        ),
        (
            "instances too many",
            with_spec("  instances: 5000\n"),
            vec!["/srv/apps/web.yaml:7:14: instances 5000 is more than 1024 (expected N >= 1, `max`, 0 or -K)"],
        ),
        (
            "port range",
            with_spec("  listen:\n    - port: 70000\n"),
            vec!["/srv/apps/web.yaml:8:13: port 70000 is out of range (expected 1..65535)"],
        ),
        (
            "port zero",
            with_spec("  listen:\n    - port: 0\n"),
            vec!["/srv/apps/web.yaml:8:13: port 0 is out of range (expected 1..65535)"],
        ),
        (
            "duplicate port in app",
            with_spec("  listen:\n    - port: 8080\n    - {port: 8080, address: 127.0.0.1}\n"),
            vec!["/srv/apps/web.yaml:9:14: 127.0.0.1:8080/tcp overlaps listener 0 (0.0.0.0:8080/tcp) of this app (expected each listener on its own port)"],
        ),
        (
            "same port other protocol is fine",
            with_spec("  listen:\n    - {port: 53, mode: inherit}\n    - {port: 53, mode: inherit, protocol: udp}\n  readiness: {type: notify}\n"),
            vec![],
        ),
        (
            "udp needs inherit or shared",
            with_spec("  listen:\n    - {port: 53, protocol: udp}\n"),
            vec!["/srv/apps/web.yaml:8:28: protocol udp needs mode inherit or shared (the http proxy carries TCP only; expected mode: inherit or mode: shared)"],
        ),
        (
            "udp with shared is fine",
            with_spec("  listen:\n    - {port: 53, mode: shared, protocol: udp}\n"),
            vec![],
        ),
        (
            "shared tcp and udp on one port",
            with_spec("  listen:\n    - {port: 53, mode: shared}\n    - {port: 53, mode: shared, protocol: udp}\n"),
            vec![],
        ),
        (
            "tcp readiness with shared",
            with_spec("  listen:\n    - {port: 80, mode: shared}\n  readiness:\n    type: tcp\n"),
            vec!["/srv/apps/web.yaml:10:11: readiness `tcp` cannot be used with a `shared` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected bind, notify, ipc or delay)"],
        ),
        (
            "http readiness with shared",
            with_spec("  listen:\n    - {port: 80, mode: shared}\n  readiness:\n    type: http\n    path: /healthz\n"),
            vec!["/srv/apps/web.yaml:10:11: readiness `http` cannot be used with a `shared` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected bind, notify, ipc or delay)"],
        ),
        (
            "liveness http with shared",
            with_spec("  listen: [{port: 80, mode: shared}]\n  liveness:\n    type: http\n    path: /live\n"),
            vec!["/srv/apps/web.yaml:9:11: liveness `http` cannot be used with a `shared` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected bind, notify, ipc or delay)"],
        ),
        (
            "bind readiness needs a shared listener",
            with_spec("  listen:\n    - {port: 80, mode: inherit}\n  readiness:\n    type: bind\n"),
            vec!["/srv/apps/web.yaml:10:11: readiness `bind` needs a listener in shared mode (it fires when the worker binds that port; expected notify, ipc, delay or none, or a listener with mode: shared)"],
        ),
        (
            "bind readiness with a second, shared listener",
            with_spec("  listen:\n    - {port: 80}\n    - {port: 81, mode: shared}\n  readiness:\n    type: bind\n"),
            vec![],
        ),
        (
            "unknown mode",
            with_spec("  listen:\n    - {port: 80, mode: share}\n"),
            vec!["/srv/apps/web.yaml:8:24: unknown value `share`, did you mean `shared`?"],
        ),
        (
            "listener name",
            with_spec("  listen:\n    - {port: 80, name: 9lives}\n"),
            vec!["/srv/apps/web.yaml:8:24: invalid listener name `9lives` (expected a letter, then letters, digits, `_` or `-`; at most 32 characters)"],
        ),
        (
            "trustedProxies ranges",
            with_spec("  listen:\n    - port: 80\n      trustedProxies: [10.0.0.0/8, \"::1\", 10.0.0.0/40, lb.internal]\n"),
            vec![
                "/srv/apps/web.yaml:9:43: invalid address range `10.0.0.0/40`: the prefix length is longer than the address (expected an address or address/prefix like 10.0.0.0/8, 192.168.1.10 or fd00::/8)",
                "/srv/apps/web.yaml:9:56: invalid address range `lb.internal`: not an IP address (expected an address or address/prefix like 10.0.0.0/8, 192.168.1.10 or fd00::/8)",
            ],
        ),
        (
            "trustedProxies needs http mode",
            with_spec("  listen:\n    - {port: 80, mode: tcp, trustedProxies: [10.0.0.0/8]}\n"),
            vec!["/srv/apps/web.yaml:8:45: trustedProxies applies to forwarding headers, which only the http proxy adds (this listener is mode tcp; expected mode: http or no trustedProxies)"],
        ),
        (
            "tls and affinity valid",
            with_spec("  listen:\n    - port: 443\n      affinity: clientIP\n      tls:\n        certificates:\n          - {cert: site.pem, key: site.key}\n    - {port: 81, mode: tcp, affinity: clientIP}\n"),
            vec![],
        ),
        (
            "tls needs http mode",
            with_spec("  listen:\n    - port: 443\n      mode: tcp\n      tls: {certificates: [{cert: a.pem, key: a.key}]}\n"),
            vec!["/srv/apps/web.yaml:10:7: tls is terminated by the http proxy only (this listener is mode tcp; expected mode: http, or TLS handled by the workers)"],
        ),
        (
            "tls needs a certificate",
            with_spec("  listen:\n    - port: 443\n      tls: {certificates: []}\n"),
            vec!["/srv/apps/web.yaml:9:27: no certificates (expected at least one {cert: FILE, key: FILE}; the first is the default, or acme: {domains: [NAME]})"],
        ),
        (
            "tls certificate fields",
            with_spec("  listen:\n    - port: 443\n      tls: {certificates: [{cert: \"\", key: a.key}]}\n"),
            vec!["/srv/apps/web.yaml:9:35: cert is empty (expected the path of a PEM file)"],
        ),
        (
            "tls unknown field",
            with_spec("  listen:\n    - port: 443\n      tls: {certs: []}\n"),
            vec![
                "/srv/apps/web.yaml:9:12: no certificates (expected at least one {cert: FILE, key: FILE}; the first is the default, or acme: {domains: [NAME]})",
                "/srv/apps/web.yaml:9:13: unknown field `certs` (expected one of `certificates`, `acme`)",
            ],
        ),
        (
            "tls acme with certificates",
            with_spec("  listen:\n    - port: 443\n      tls:\n        acme: {domains: [example.com], email: ops@example.com, directory: \"https://acme.test/dir\", caBundle: ca.pem}\n        certificates: [{cert: a.pem, key: a.key}]\n"),
            vec![],
        ),
        (
            "tls acme alone",
            with_spec("  listen:\n    - port: 443\n      tls:\n        acme: {domains: [example.com, www.example.com]}\n"),
            vec![],
        ),
        (
            "tls acme needs domains",
            with_spec("  listen:\n    - port: 443\n      tls:\n        acme: {email: ops@example.com}\n"),
            vec!["/srv/apps/web.yaml:10:15: no domains (expected domains: [example.com, www.example.com], the names the certificate covers)"],
        ),
        (
            "tls acme fields",
            with_spec("  listen:\n    - port: 443\n      tls:\n        acme:\n          domains: [\"*.example.com\", Example.com, a.test, a.test]\n          email: ops\n          directory: http://acme.test/dir\n"),
            vec![
                "/srv/apps/web.yaml:11:21: `*.example.com` is a wildcard, which ACME grants only through DNS-01 challenges, and clusterd answers TLS-ALPN-01 on its own listener (expected plain names like example.com, or a wildcard certificate in tls.certificates)",
                "/srv/apps/web.yaml:11:38: `Example.com` is not a valid DNS name: upper-case letters (write it in lower case) (expected a name like example.com: labels of a-z, 0-9 and `-`, separated by dots)",
                "/srv/apps/web.yaml:11:59: `a.test` is listed twice (expected each name once)",
                "/srv/apps/web.yaml:12:18: `ops` has no `@` (expected an address like ops@example.com)",
                "/srv/apps/web.yaml:13:22: `http://acme.test/dir` is not an https:// URL (expected the https:// URL of the ACME server's directory, like https://acme-v02.api.letsencrypt.org/directory)",
            ],
        ),
        (
            "affinity values",
            with_spec("  listen:\n    - {port: 80, affinity: sourceIP}\n"),
            vec!["/srv/apps/web.yaml:8:28: unknown value `sourceIP` (expected one of `none`, `clientIP`)"],
        ),
        (
            "affinity not in inherit mode",
            with_spec("  listen:\n    - {port: 80, mode: inherit, affinity: clientIP}\n"),
            vec!["/srv/apps/web.yaml:8:43: affinity needs the daemon to choose the worker, and in mode inherit the kernel does (expected mode: http or tcp, or affinity: none)"],
        ),
        (
            "listener names unique",
            with_spec("  listen:\n    - {port: 80, name: admin-api}\n    - {port: 81, name: admin_api}\n"),
            vec!["/srv/apps/web.yaml:9:24: listener name `admin_api` is already used by listener 0 (both would be PORT_ADMIN_API; expected unique names)"],
        ),
        (
            "address",
            with_spec("  listen:\n    - {port: 80, address: localhost}\n"),
            vec!["/srv/apps/web.yaml:8:27: invalid address `localhost` (expected an IP address like 0.0.0.0, 127.0.0.1 or ::)"],
        ),
        (
            "tcp readiness with inherit",
            with_spec("  listen:\n    - {port: 80, mode: inherit}\n  readiness:\n    type: tcp\n"),
            vec!["/srv/apps/web.yaml:10:11: readiness `tcp` cannot be used with an `inherit` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected notify, ipc or delay)"],
        ),
        (
            "http readiness without listener",
            with_spec("  readiness:\n    type: http\n    path: /healthz\n"),
            vec!["/srv/apps/web.yaml:8:11: readiness `http` needs a listener in http or tcp mode to probe, and this app has none (expected notify, ipc, delay or none)"],
        ),
        (
            "http readiness path",
            with_spec("  listen: [{port: 80}]\n  readiness:\n    type: http\n    path: healthz\n"),
            vec!["/srv/apps/web.yaml:10:11: readiness `http` needs a path starting with `/` (expected e.g. path: /healthz)"],
        ),
        (
            "delay needs delay",
            with_spec("  readiness:\n    type: delay\n"),
            vec!["/srv/apps/web.yaml:8:5: readiness `delay` needs a delay (expected e.g. delay: 2s)"],
        ),
        (
            "liveness http needs listener",
            with_spec("  listen: [{port: 80, mode: inherit}]\n  readiness: {type: notify}\n  liveness:\n    type: http\n    path: /live\n"),
            vec!["/srv/apps/web.yaml:10:11: liveness `http` cannot be used with an `inherit` listener: every worker shares that port, so any worker may answer the probe and it proves nothing (expected notify, ipc or delay)"],
        ),
        (
            "liveness exec needs command",
            with_spec("  liveness:\n    type: exec\n"),
            vec!["/srv/apps/web.yaml:8:5: liveness `exec` needs a command (expected e.g. command: [./check.sh])"],
        ),
        (
            "rollout both zero",
            with_spec("  rollout: {maxSurge: 0, maxUnavailable: 0}\n"),
            vec!["/srv/apps/web.yaml:7:12: maxSurge and maxUnavailable are both 0, so a rollout could never replace a worker (expected maxSurge >= 1 or maxUnavailable >= 1)"],
        ),
        (
            "unknown signal",
            with_spec("  shutdown: {signal: SIGFOO}\n"),
            vec!["/srv/apps/web.yaml:7:22: unknown signal `SIGFOO` (expected a name like SIGTERM, TERM or sigint)"],
        ),
        (
            "empty command",
            HEAD.replace("[node, server.js]", "[]"),
            vec!["/srv/apps/web.yaml:6:12: command is empty (expected a program and its arguments, like [node, server.js])"],
        ),
        (
            "unbalanced quotes",
            HEAD.replace("[node, server.js]", "node 'server.js"),
            vec!["/srv/apps/web.yaml:6:12: command has an unbalanced quote (expected matching ' or \" quotes)"],
        ),
        (
            "shell operator",
            HEAD.replace("[node, server.js]", "node server.js | tee log"),
            vec!["/srv/apps/web.yaml:6:12: command contains `|`, which needs a shell, and clusterd never runs one (expected plain arguments; write [sh, -c, \"...\"] to use a shell)"],
        ),
        (
            "env name",
            with_spec("  env:\n    1BAD: x\n    PORT: \"1\"\n"),
            vec![
                "/srv/apps/web.yaml:8:5: invalid environment variable name `1BAD` (expected letters, digits and `_`, not starting with a digit)",
                "/srv/apps/web.yaml:9:5: `PORT` is set by clusterd for each worker (expected another name)",
            ],
        ),
        (
            "backoff order",
            with_spec("  restart: {backoff: {initial: 10s, max: 1s}}\n"),
            vec!["/srv/apps/web.yaml:7:42: backoff max 1s is below initial 10s (expected max >= initial)"],
        ),
        (
            "bad duration",
            with_spec("  shutdown: {timeout: 10 minutes}\n"),
            vec!["/srv/apps/web.yaml:7:23: unknown duration unit `minutes` in `10 minutes`, expected ms, s, m or h"],
        ),
        (
            "missing command",
            "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec: {}\n".to_string(),
            vec!["/srv/apps/web.yaml:4:7: missing field `command`"],
        ),
        (
            "collects every problem",
            HEAD.replace("name: web", "name: WEB") + "  listen: [{port: 0}]\n  shutdown: {signal: nope}\n",
            vec![
                "/srv/apps/web.yaml:4:9: invalid app name `WEB` (expected 1 to 63 characters of a-z, 0-9 and `-`, not starting or ending with `-`)",
                "/srv/apps/web.yaml:7:19: port 0 is out of range (expected 1..65535)",
                "/srv/apps/web.yaml:8:22: unknown signal `nope` (expected a name like SIGTERM, TERM or sigint)",
            ],
        ),
        ("empty file", String::new(), vec!["/srv/apps/web.yaml:1:1: file holds no manifest (expected a document with apiVersion, kind, metadata and spec)"]),
        ("not a mapping", "- a\n- b\n".to_string(), vec!["/srv/apps/web.yaml:1:1: expected a mapping of `key: value` pairs"]),
    ];
    let mut failures = Vec::new();
    for (label, yaml, want) in &rows {
        let got = check(yaml);
        if got != *want {
            failures.push(format!("{label}:\n  got:  {got:#?}\n  want: {want:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn ctx(incumbents: &[(&str, &str)]) -> LoadContext {
    LoadContext {
        cpus: 4,
        incumbents: incumbents
            .iter()
            .map(|(n, p)| (AppName((*n).to_string()), PathBuf::from(p)))
            .collect(),
        shared_mode_unavailable: None,
    }
}

#[test]
fn shared_mode_defaults_to_bind_readiness() {
    let yaml = with_spec("  listen: [{port: 8080, mode: shared}]\n");
    let report = load(&[ManifestFile::new("/srv/apps/web.yaml", yaml)], &ctx(&[]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let web = &report.apps[&AppName("web".into())];
    assert_eq!(web.spec.readiness.kind, Some(ReadinessKind::Bind));
}

/// A host without seccomp user notification rejects `shared` at the listener's mode,
/// with the runtime's reason; other modes and an offline check (no reason) are unaffected.
#[test]
fn shared_mode_on_an_unable_host_is_rejected_with_the_reason() {
    let yaml = with_spec("  listen:\n    - {port: 8080}\n    - {port: 8081, mode: shared}\n");
    let host = LoadContext {
        shared_mode_unavailable: Some(
            "it needs Linux 5.9 or newer (seccomp user notification with ADDFD), this is Linux 5.4.0".into(),
        ),
        ..ctx(&[])
    };
    let report = load(
        &[ManifestFile::new("/srv/apps/web.yaml", yaml.clone())],
        &host,
    );
    assert!(report.apps.is_empty());
    let lines: Vec<String> = report.errors["web"]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        ["/srv/apps/web.yaml:9:26: mode `shared` cannot work on this host: it needs Linux 5.9 or newer (seccomp user notification with ADDFD), this is Linux 5.4.0 (expected mode: inherit if the app can take its socket as fd 3, or mode: http)"]
    );
    let inherit = with_spec("  listen: [{port: 8080, mode: inherit}]\n");
    let report = load(&[ManifestFile::new("/srv/apps/web.yaml", inherit)], &host);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(check(&yaml).is_empty(), "offline validate knows no host");
}

fn app(name: &str, port: u32) -> String {
    format!("apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: {name}\nspec:\n  command: x\n  listen:\n    - port: {port}\n")
}

#[test]
fn normalizes_the_spec() {
    let yaml = with_spec("  command: \"node 'my server.js' --port 1\"\n  workingDir: app\n  instances: -1\n  listen: [{port: 80}]\n  shutdown: {signal: term}\n")
        .replace("  command: [node, server.js]\n", "");
    let report = load(&[ManifestFile::new("/srv/apps/web.yaml", yaml)], &ctx(&[]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let web = &report.apps[&AppName("web".into())];
    assert_eq!(
        web.spec.command,
        CommandLine::Argv(vec![
            "node".into(),
            "my server.js".into(),
            "--port".into(),
            "1".into()
        ])
    );
    assert_eq!(web.spec.working_dir, Some(PathBuf::from("/srv/apps/app")));
    assert_eq!(web.spec.readiness.kind, Some(ReadinessKind::Tcp));
    assert_eq!(web.spec.shutdown.signal.0, "SIGTERM");
    assert_eq!(web.replicas, 3);
    assert_eq!(web.revision.0.len(), 8);

    let none = load(
        &[ManifestFile::new("/srv/apps/w.yaml", with_spec(""))],
        &ctx(&[]),
    );
    let w = &none.apps[&AppName("web".into())];
    assert_eq!(
        w.spec.readiness.kind,
        Some(ReadinessKind::None),
        "no listener: readiness none"
    );
    assert_eq!(w.spec.working_dir, Some(PathBuf::from("/srv/apps")));
}

#[test]
fn two_files_naming_one_app_are_both_rejected() {
    let files = [
        ManifestFile::new("a.yaml", app("web", 80)),
        ManifestFile::new("b.yaml", app("web", 81)),
    ];
    let report = load(&files, &ctx(&[("web", "a.yaml")]));
    assert!(report.apps.is_empty());
    let lines: Vec<String> = report.errors["web"]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "a.yaml:4:9: app `web` is also defined at b.yaml:4:9 (expected each app name in one manifest only; both are rejected)",
            "b.yaml:4:9: app `web` is also defined at a.yaml:4:9 (expected each app name in one manifest only; both are rejected)",
        ]
    );
}

#[test]
fn port_conflict_rejects_only_the_newcomer() {
    let files = [
        ManifestFile::new("api.yaml", app("api", 8080)),
        ManifestFile::new("web.yaml", app("web", 8080)),
    ];
    let report = load(&files, &ctx(&[("web", "web.yaml")]));
    assert!(report.apps.contains_key(&AppName("web".into())));
    assert_eq!(
        report.errors["api"].iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["api.yaml:8:13: 0.0.0.0:8080/tcp overlaps 0.0.0.0:8080/tcp of app `web` at web.yaml:8:13 (expected a port no other app uses)"]
    );

    // Neither running: there is no telling who is right, both are rejected.
    let report = load(&files, &ctx(&[]));
    assert!(report.apps.is_empty());
    assert_eq!(report.errors.len(), 2);

    // An incumbent that moved to another file is a newcomer there.
    let report = load(&files, &ctx(&[("web", "old.yaml")]));
    assert!(report.apps.is_empty());
}

#[test]
fn several_documents_keep_their_positions() {
    let text = format!("# two apps\n{}---\n{}", app("one", 80), app("two", 70000));
    let report = load(&[ManifestFile::new("m.yaml", text)], &ctx(&[]));
    assert!(report.apps.contains_key(&AppName("one".into())));
    assert_eq!(
        report.errors["two"]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["m.yaml:18:13: port 70000 is out of range (expected 1..65535)"]
    );
}

#[test]
fn unnamed_broken_file_is_listed_under_its_stem() {
    let report = load(
        &[ManifestFile::new("dir/broken.yaml", "a: [1, 2\n")],
        &ctx(&[]),
    );
    assert_eq!(
        report.errors["broken"]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["dir/broken.yaml:1:4: invalid YAML: unclosed bracket '['"]
    );
    // A broken document that names its app is listed under the app.
    let report = load(
        &[ManifestFile::new(
            "x.yaml",
            app("web", 80) + "  instances: nope\n",
        )],
        &ctx(&[]),
    );
    assert!(report.errors.contains_key("web"));
}

#[test]
fn non_utf8_is_an_error_with_a_position() {
    let report = load(
        &[ManifestFile::new("bin.yaml", b"a: 1\nb: \xff\xfe".to_vec())],
        &ctx(&[]),
    );
    assert_eq!(
        report.errors["bin"]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["bin.yaml:2:4: file is not UTF-8 text (expected a YAML manifest)"]
    );
}

/// execve(2) refuses one `NAME=value` over 128 KiB and arguments plus environment over
/// a quarter of the stack limit: such a manifest could never start a worker (issue 18).
#[test]
fn env_too_large_to_exec_is_rejected_where_it_is() {
    let big = "x".repeat(140_000);
    let got = check(&with_spec(&format!(
        "  env:\n    SMALL: y\n    BIG: {big}\n"
    )));
    assert_eq!(
        got,
        vec!["/srv/apps/web.yaml:9:10: `BIG=...` is 140004 bytes, more than the 131071 bytes execve accepts for one variable (expected a shorter value; pass large data in a file)"]
    );
    // Just under the limit for one variable is fine.
    let fits = "x".repeat(131_071 - "FITS=".len());
    assert_eq!(
        check(&with_spec(&format!("  env:\n    FITS: {fits}\n"))),
        Vec::<String>::new()
    );

    // Many variables each under the limit, together over what execve accepts (one
    // manifest file is at most 1 MiB, but YAML aliases repeat a value).
    let chunk = "y".repeat(120_000);
    let mut env = format!("  env:\n    V0: &v {chunk}\n");
    for i in 1..16 {
        env.push_str(&format!("    V{i}: *v\n"));
    }
    let got = check(&with_spec(&env));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with("/srv/apps/web.yaml:8:5: command and env take 1920")
            && got[0].contains("more than the 1835008 bytes a manifest may use"),
        "{got:#?}"
    );
}

/// `$PORT` in an argv is passed as written (no shell runs the command), so the worker
/// crash-loops on "invalid port": a warning at the argument, suggesting `$(PORT)`. It
/// rejects nothing; a command that runs a shell itself gets no warning.
#[test]
fn shell_variables_in_an_argv_are_warned_about() {
    let check = |command: &str| {
        let yaml = format!(
            "apiVersion: clusterd/v1\nkind: App\nmetadata: {{name: web}}\nspec:\n  command: {command}\n"
        );
        clusterd_core::check_files(&[ManifestFile::new("web.yaml", yaml.as_bytes())], 4)
    };
    let got = check("[python3, -m, http.server, $PORT]");
    assert_eq!(got.errors, 0);
    assert_eq!(
        got.lines,
        ["web.yaml:5:39: warning: `$PORT` is passed to the program as written: no shell runs the command, so nothing expands it (expected `$(PORT)`, which clusterd replaces with the worker's PORT)"]
    );
    let got = check("\"gunicorn -b 127.0.0.1:${PORT} app:app\"");
    assert_eq!(got.lines.len(), 1, "{:?}", got.lines);
    assert!(
        got.lines[0].starts_with("web.yaml:5:12: warning: `$PORT`"),
        "{:?}",
        got.lines
    );
    for quiet in [
        "[python3, -m, http.server, $(PORT)]",
        "[sh, -c, \"exec python3 -m http.server $PORT\"]",
        "[/bin/bash, -lc, \"exec node app.js --port $PORT\"]",
        "[echo, '$$(PORT)', costs, $5]",
    ] {
        let got = check(quiet);
        assert!(got.lines.is_empty(), "{quiet}: {:?}", got.lines);
    }
    // Errors and warnings come out together, in position order.
    let yaml = "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec:\n  command: [x, $PORT]\n  instances: [1]\n";
    let got = clusterd_core::check_files(&[ManifestFile::new("web.yaml", yaml.as_bytes())], 4);
    assert_eq!(got.errors, 1);
    assert_eq!(got.lines.len(), 2, "{:?}", got.lines);
    assert!(got.lines[0].contains("warning: `$PORT`"));
}

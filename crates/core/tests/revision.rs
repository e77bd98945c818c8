//! The revision is stable (golden value) and changes exactly with worker-shaping fields.

use clusterd_core::plan::AppName;
use clusterd_core::{load, LoadContext, ManifestFile};

const BASE: &str = "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\nspec:\n  command: [node, server.js]\n  env: {B: \"2\", A: \"1\"}\n  listen: [{port: 8080}]\n";

fn rev(extra: &str) -> String {
    let text = format!("{BASE}{extra}");
    let report = load(
        &[ManifestFile::new("/srv/apps/web.yaml", text)],
        &LoadContext {
            cpus: 4,
            ..LoadContext::default()
        },
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    report.apps[&AppName("web".into())].revision.0.clone()
}

#[test]
fn golden_value_is_stable_across_runs_and_machines() {
    // If this changes, every running app would roll on upgrade: do not change it lightly.
    assert_eq!(rev(""), "b3dded98");
}

#[test]
fn string_and_list_commands_hash_the_same() {
    let text = BASE.replace("[node, server.js]", "\"node server.js\"");
    let report = load(
        &[ManifestFile::new("/srv/apps/web.yaml", text)],
        &LoadContext {
            cpus: 4,
            ..LoadContext::default()
        },
    );
    assert_eq!(report.apps[&AppName("web".into())].revision.0, rev(""));
}

#[test]
fn only_worker_shaping_fields_change_it() {
    let base = rev("");
    for unchanged in [
        "  instances: 8\n",
        "  rollout: {maxSurge: 3}\n",
        "  shutdown: {signal: TERM, timeout: 1m}\n",
        "  restart: {policy: never}\n",
        "  readiness: {type: http, path: /x}\n",
        "  liveness: {type: tcp}\n",
        "  logs: {maxFiles: 9}\n",
    ] {
        assert_eq!(rev(unchanged), base, "{unchanged}");
    }
    for changed in [
        "  workingDir: other\n",
        "  user: nobody\n",
        "  group: nogroup\n",
        "  limits: {memory: 1Gi}\n",
        "  limits: {cpu: 0.5}\n",
    ] {
        assert_ne!(rev(changed), base, "{changed}");
    }
    // Listener additions that are off by default keep the revision of older manifests.
    assert_eq!(
        rev("").as_str(),
        {
            let text = BASE.replace("{port: 8080}", "{port: 8080, affinity: none}");
            let report = load(
                &[ManifestFile::new("/srv/apps/web.yaml", text)],
                &LoadContext {
                    cpus: 4,
                    ..LoadContext::default()
                },
            );
            report.apps[&AppName("web".into())].revision.0.clone()
        }
        .as_str()
    );
    let env = BASE.replace("A: \"1\"", "A: \"3\"");
    let affinity = BASE.replace("{port: 8080}", "{port: 8080, affinity: clientIP}");
    let tls = BASE.replace(
        "{port: 8080}",
        "{port: 8080, tls: {certificates: [{cert: a.pem, key: a.key}]}}",
    );
    let listen = BASE.replace("8080", "8081");
    let command = BASE.replace("server.js", "app.js");
    for text in [env, listen, command, affinity, tls] {
        let report = load(
            &[ManifestFile::new("/srv/apps/web.yaml", text)],
            &LoadContext {
                cpus: 4,
                ..LoadContext::default()
            },
        );
        assert_ne!(report.apps[&AppName("web".into())].revision.0, base);
    }
}

//! Bad input never panics and never runs long: proptest over arbitrary text and bytes and
//! YAML-ish generated text, plus the named hostile cases (huge, deep, alias bombs).

use std::time::{Duration, Instant};

use clusterd_core::{load, validate_files, LoadContext, ManifestFile};
use proptest::prelude::*;

fn check_bytes(bytes: Vec<u8>) -> Vec<String> {
    validate_files(&[ManifestFile::new("fuzz.yaml", bytes)], 4)
}

/// Fragments that steer generated text into the parser's and validator's deep paths.
fn yamlish() -> impl Strategy<Value = String> {
    let atom = prop::sample::select(vec![
        "apiVersion: clusterd/v1\n",
        "kind: App\n",
        "metadata:\n",
        "  name: web\n",
        "spec:\n",
        "  command: [a, b]\n",
        "  command: 'x \"y'\n",
        "  listen:\n",
        "    - port: 8080\n",
        "    - {port: 0, mode: inherit, protocol: udp}\n",
        "  readiness: {type: http}\n",
        "  instances: -3\n",
        "  instances: max\n",
        "---\n",
        "...\n",
        "&a ",
        "*a\n",
        "[",
        "]",
        "{",
        "}",
        "- ",
        ": ",
        "? ",
        "|\n",
        ">\n",
        "'",
        "\"",
        "#",
        "\t",
        "\n",
        "  ",
        "!!str ",
        "%YAML 1.2\n",
        "<<: *a\n",
        "\u{feff}",
        "é",
        "\0",
    ]);
    prop::collection::vec(atom, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}") {
        let _ = check_bytes(text.into_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = check_bytes(bytes);
    }

    #[test]
    fn yamlish_text_never_panics(text in yamlish()) {
        let report = load(&[ManifestFile::new("fuzz.yaml", text.into_bytes())], &LoadContext { cpus: 2, ..LoadContext::default() });
        // Every diagnostic has a real position.
        for d in report.errors.values().flatten() {
            prop_assert!(d.line >= 1 && d.column >= 1);
        }
    }
}

fn assert_fast_error(label: &str, bytes: Vec<u8>, needle: &str) {
    let started = Instant::now();
    let lines = check_bytes(bytes);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{label} took {:?}",
        started.elapsed()
    );
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "{label}: {lines:?}"
    );
}

#[test]
fn a_10_mb_file_is_refused_at_once() {
    let big = "# padding\n".repeat(1_100_000).into_bytes();
    assert_fast_error(
        "10 MB",
        big,
        "more than the 1048576 bytes a manifest may have",
    );
}

#[test]
fn deep_nesting_is_bounded() {
    let deep = format!("spec: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    assert_fast_error("deep flow", deep.into_bytes(), "deeper than 32 levels");
    let mut block = String::new();
    for i in 0..200 {
        block.push_str(&" ".repeat(i));
        block.push_str("k:\n");
    }
    assert_fast_error("deep block", block.into_bytes(), "deeper than 32 levels");
}

#[test]
fn alias_bombs_are_rejected_without_expansion() {
    // Many aliases to one string, each consumed by the typed parse: the alias budget stops it.
    let mut text = String::from(
        "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: lol}\nspec:\n  command: [&a lol",
    );
    for _ in 0..1000 {
        text.push_str(", *a");
    }
    text.push_str("]\n");
    assert_fast_error("alias count", text.into_bytes(), "too large or complex");

    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/invalid/billion-laughs.yaml"
    ))
    .unwrap();
    // Expansion is lazy: the first expanded value that does not fit the model stops it.
    assert_fast_error("billion laughs", fixture, "expected a string");
}

#[test]
fn garbage_and_empty_files_get_clear_errors() {
    assert_fast_error("empty", Vec::new(), "file holds no manifest");
    assert_fast_error(
        "comments only",
        b"# nothing\n---\n# here\n".to_vec(),
        "file holds no manifest",
    );
    assert_fast_error(
        "binary",
        vec![0x7f, b'E', b'L', b'F', 0, 0, 0xff],
        "not UTF-8",
    );
    assert_fast_error("nul text", b"a: \0\0\0".to_vec(), "fuzz.yaml:1:");
    assert_fast_error("scalar", b"hello".to_vec(), "expected a mapping");
}

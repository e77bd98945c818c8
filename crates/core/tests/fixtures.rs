//! Snapshot tests: every `tests/fixtures/invalid/*.yaml` must produce exactly the lines in
//! its `.expected` file (paths relative to the repo root, as `clusterd validate` prints
//! them when run there), and every `tests/fixtures/valid/*.yaml` must load cleanly.
//! `UPDATE_SNAPSHOTS=1 cargo test -p clusterd-core --test fixtures` rewrites the snapshots.

use std::fs;
use std::path::{Path, PathBuf};

use clusterd_core::{check_files, validate_files, ManifestFile};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo_root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn as_given(dir: &str, path: &Path) -> ManifestFile {
    let rel = Path::new(dir).join(path.file_name().unwrap());
    ManifestFile::new(rel, fs::read(path).unwrap())
}

#[test]
fn invalid_fixtures_match_their_snapshots() {
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let dir = "tests/fixtures/invalid";
    let files = yaml_files(dir);
    assert!(files.len() >= 8, "fixtures missing");
    let mut mismatches = Vec::new();
    for path in files {
        let got = check_files(&[as_given(dir, &path)], 4);
        assert!(got.errors > 0, "{} should be rejected", path.display());
        let text = got.lines.join("\n") + "\n";
        let expected_path = path.with_extension("expected");
        if update {
            fs::write(&expected_path, &text).unwrap();
            continue;
        }
        let want = fs::read_to_string(&expected_path).unwrap_or_default();
        if want != text {
            mismatches.push(format!(
                "{}:\n--- want\n{want}--- got\n{text}",
                path.display()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "set UPDATE_SNAPSHOTS=1 to accept\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn valid_fixtures_load() {
    let dir = "tests/fixtures/valid";
    let files: Vec<ManifestFile> = yaml_files(dir).iter().map(|p| as_given(dir, p)).collect();
    assert!(!files.is_empty());
    assert_eq!(validate_files(&files, 4), Vec::<String>::new());
}

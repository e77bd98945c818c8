# Everyday commands. Plain cargo works too: see README.md.

default:
    @just --list

# Build everything (debug).
build:
    cargo build --workspace

# The README's test command.
test:
    cargo test --workspace

# What CI runs (fmt, clippy, tests, with the third-party tools installed).
ci:
    bash .ci/run

# The Debian package: target/debian/clusterd_<version>_<arch>.deb (cargo-deb, installed
# into .tools/ if missing). CLUSTERD_DEB_PROFILE=release for a faster, unoptimized-for-size build.
deb:
    ./scripts/build-deb

# Build the package and check it as CI does (file list, unit, completions, man, install).
deb-check:
    ./scripts/check-deb

# Lints only.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Run the daemon on manifests/ (the README's main command).
demo:
    ./scripts/demo

# Benchmarks: clusterd vs. the app alone vs. PM2 (writes docs/benchmarks.md).
bench:
    ./bench/run

# Chaos run: kill random workers under load for 60 s.
chaos:
    cargo test --release --test e2e -- --ignored chaos --nocapture

#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, docs, then every test.
# Installs what the tests need (a Python venv with the official Optimizely SDK and moto)
# on first use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ ! -d "$root/../shared/fixtures" ]; then
  echo "error: ../shared/fixtures not found beside the repository" >&2
  exit 2
fi

TRIBUTARY_PYTHON="$(scripts/setup-python.sh)"
export TRIBUTARY_PYTHON
export PATH="$root/.venv/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo check tributary without default features (no HTTP dispatcher, no reqwest)"
cargo check -p tributary --no-default-features --locked
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== cargo test"
cargo test --workspace --locked
echo "== examples against a loopback upstream"
# Rebuild the example binaries (a test run alone would find stale ones), then run each one:
# from_datafile posts to a RecordingUpstream on 127.0.0.1:<free port> (TRIBUTARY_ENDPOINT);
# every example must exit 0 and account for every event it made (see tests/examples_run.rs).
cargo build -p tributary --examples --locked --quiet
cargo test -p tributary --test examples_run --locked

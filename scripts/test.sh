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

# Debian packages the tests drive: chromium (the status page in a real browser), prometheus
# (promtool and a live server for the alert rules), systemd (systemd-analyze verify for the
# unit). Installed only when missing.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq
  # The prometheus package starts prometheus.service (on :9090) where systemd runs: a
  # policy-rc.d that refuses service starts keeps the install from starting anything (it is
  # removed again unless one was already there).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
    echo "error: apt-get install ${missing[*]} failed" >&2
    exit 1
  fi
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
  # Belt and braces: never leave it enabled or running on a systemd host.
  if [ -d /run/systemd/system ] && systemctl list-unit-files prometheus.service >/dev/null 2>&1; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
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
# The spool crate's features one at a time, tests included: each must build on its own.
for features in sqlite sqs forward; do
  cargo check -p tributary-spool --no-default-features --features "$features" --all-targets --locked
done
# The relay without `lambda` (its one optional feature) must build too.
cargo check -p tributary-relay --no-default-features --all-targets --locked
echo "== promtool: alert rules and their unit tests"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts.test.yml)
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== cargo test"
cargo test --workspace --locked
# `cargo test` builds every example before it runs any test, so tests/examples_run.rs runs
# fresh example binaries against a loopback upstream.
# The Python package (crates/tributary-python), tested with pytest against the official SDK:
# built into .venv (debug profile, reusing the build above) only when its sources changed.
echo "== tributary-events (Python): pytest"
TRIBUTARY_WHEEL_PROFILE=dev scripts/setup-python-package.sh
"$TRIBUTARY_PYTHON" -m pytest -q -p no:cacheprovider crates/tributary-python/tests

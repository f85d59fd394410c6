#!/usr/bin/env bash
# Builds and installs tributary-events (crates/tributary-python) into .venv with pip, the
# way users install it, only when its sources (or the Rust crates it embeds, or the
# profile) changed since the last install: a cold release build takes minutes, a rerun
# with nothing changed is instant.
#
# TRIBUTARY_WHEEL_PROFILE: cargo profile of the wheel, `release` (default; for benchmarks
# and users) or `dev` (scripts/test.sh: reuses the debug build of `cargo test`).
# CARGO_TARGET_DIR is honoured (default: the workspace's target/), so the wheel reuses the
# workspace's compiled dependencies.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="$(scripts/setup-python.sh)"
# The build backend (maturin) runs from the venv.
export PATH="$root/.venv/bin:$PATH"
profile="${TRIBUTARY_WHEEL_PROFILE:-release}"
case "$profile" in release|dev) ;; *) echo "TRIBUTARY_WHEEL_PROFILE must be release or dev" >&2; exit 2;; esac
stamp="$root/.venv/.tributary-events.sha256"
want="$(
  { echo "profile=$profile"; git ls-files -s -- crates/tributary-python crates/tributary/src crates/tributary-spool/src \
      crates/tributary/Cargo.toml crates/tributary-spool/Cargo.toml Cargo.toml Cargo.lock;
    # Uncommitted edits count too.
    git diff -- crates/tributary-python crates/tributary crates/tributary-spool Cargo.toml Cargo.lock;
    # New files not yet added count too (their names and contents).
    git ls-files -o --exclude-standard -z -- crates/tributary-python crates/tributary crates/tributary-spool \
      | xargs -0 -r sha256sum; } | sha256sum | cut -d' ' -f1
)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$python" -c "import tributary_events" 2>/dev/null; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
  echo "== building tributary-events ($profile) into .venv" >&2
  start=$(date +%s)
  MATURIN_PEP517_ARGS="--profile $profile" "$python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --force-reinstall --no-deps ./crates/tributary-python >&2
  echo "== tributary-events built and installed in $(( $(date +%s) - start )) s" >&2
  echo "$want" > "$stamp"
fi
"$python" -c "import tributary_events" >&2

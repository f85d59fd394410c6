#!/usr/bin/env bash
# process() latency and events/s through close(), Tributary beside the official Python SDK
# 5.7.0, same events, batch sizes 10 and 100, 1 and 2 producer threads, in one run.
#
#   scripts/bench_processor.sh [EVENTS]      (default 1,000,000 for Rust, 100,000 for Python)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
events="${1:-1000000}"
py_events=$(( events / 10 ))
python="$(scripts/setup-python.sh)"
cargo build --release -q -p tributary-relay
bin="${CARGO_TARGET_DIR:-$root/target}/release/tributary"
printf '%-8s %6s %7s %9s %9s %9s %12s\n' impl batch threads p50_ns p99_ns p999_ns events/s
for batch in 10 100; do
  for threads in 1 2; do
    RUST_LOG=error "$bin" bench processor --events "$events" --batch-size "$batch" --threads "$threads" --json |
      python3 -c "import json,sys; d=json.load(sys.stdin); l=d['latency_ns']; print('%-8s %6d %7d %9d %9d %9d %12.0f' % ('rust', $batch, $threads, l['p50'], l['p99'], l['p999'], d['events_per_s']))"
    "$python" scripts/bench_python_processor.py --events "$py_events" --batch-size "$batch" --threads "$threads" --json |
      python3 -c "import json,sys; d=json.load(sys.stdin); l=d['latency_ns']; print('%-8s %6d %7d %9d %9d %9d %12.0f' % ('python', $batch, $threads, l['p50'], l['p99'], l['p999'], d['events_per_s']))"
  done
done

#!/usr/bin/env bash
# A/B of the batch event processor between `tributary` binaries, in the same minutes: each
# binary in turn runs the same `bench processor` command, ROUNDS times. Prints one line per
# run with events/s, the `EventFactory` peer measured in that run, their ratio and the
# process() latency; BENCHMARKS.md records them. On a shared machine compare pairs and
# ratios, not single figures.
#
#   ROUNDS=6 EVENTS=1000000 BATCH=10 THREADS=1 scripts/bench_processor_ab.sh BIN_A BIN_B [...] [-- EXTRA ARGS]
#
# EXTRA ARGS go to every run (e.g. `-- --upstream-latency 50ms`). Build
# the binaries first (e.g. a release build of another commit in its own worktree).
set -euo pipefail
rounds="${ROUNDS:-6}"; events="${EVENTS:-1000000}"; batch="${BATCH:-10}"; threads="${THREADS:-1}"
bins=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  bins+=("$1"); shift
done
[ "${#bins[@]}" -ge 1 ] || { echo "usage: bench_processor_ab.sh BIN_A BIN_B [...] [-- EXTRA ARGS]" >&2; exit 2; }
for round in $(seq "$rounds"); do
  for i in "${!bins[@]}"; do
    RUST_LOG=error "${bins[$i]}" bench processor --events "$events" --batch-size "$batch" --threads "$threads" "${extra[@]}" --json |
      python3 -c 'import json,sys
d = json.load(sys.stdin); l = d["latency_ns"]
print("round=%s bin=%s events_per_s=%d factory_events_per_s=%d ratio_to_factory=%.2f p50_ns=%d p99_ns=%d p999_ns=%d" % (
    sys.argv[1], sys.argv[2], d["events_per_s"], d["factory_events_per_s"] or 0,
    d["ratio_to_factory"] or 0, l["p50"], l["p99"], l["p999"]))' "$round" "$i:${bins[$i]}"
  done
done

#!/usr/bin/env bash
# A/B of the relay's CPU per request between `tributary` binaries, at a fixed request rate:
# each binary in turn serves on a fresh SQLite spool (forwarding to a sink, then
# `--no-forward`), and the relay process's `utime + stime` (from /proc) over the timed run
# is divided by the requests it answered. Below saturation this moves far less with the
# machine's other load than a throughput figure does, so small changes show. Prints one
# line per run; BENCHMARKS.md records them.
#
#   ROUNDS=3 SECS=6 EVENTS=10 RATE=4000 scripts/bench_relay_cpu_ab.sh GEN BIN_A BIN_B [...]
#
# GEN's load generator and sink drive every run. Everything binds to 127.0.0.1; every
# process started here is stopped on exit.
set -euo pipefail
rounds="${ROUNDS:-3}"; secs="${SECS:-6}"; events="${EVENTS:-10}"; rate="${RATE:-4000}"
gen="${1:?usage: bench_relay_cpu_ab.sh GEN BIN_A BIN_B [...]}"; shift
work="$(mktemp -d)"; pids=()
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
trap cleanup EXIT
tick=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sink_port=$(free_port)
"$gen" bench sink --listen "127.0.0.1:$sink_port" 2>/dev/null & pids+=($!)
wait_port "$sink_port"
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    for mode in forward no-forward; do
      port=$(free_port); extra=(--upstream "http://127.0.0.1:$sink_port/v1/events" --flush-interval 200ms)
      [ "$mode" = no-forward ] && extra=(--no-forward)
      RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --spool "$work/spool" "${extra[@]}" & rp=$!
      wait_port "$port"
      # One second of warm-up: connections, the spool file, the zstd contexts.
      "$gen" bench relay --url "http://127.0.0.1:$port/v1/events" --events-per-payload "$events" --rate 1000 --duration 1s --json > /dev/null
      before=$(cpu_ticks "$rp")
      result=$("$gen" bench relay --url "http://127.0.0.1:$port/v1/events" --events-per-payload "$events" --connections 32 --rate "$rate" --duration "${secs}s" --json)
      after=$(cpu_ticks "$rp")
      python3 -c 'import json, sys
r = json.loads(sys.argv[1]); cpu = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
print("round=%s bin=%s mode=%s events=%s requests=%d cpu_s=%.2f us_per_request=%.1f us_per_event=%.2f p99_ms=%.1f" % (
    sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8], r["requests"], cpu,
    cpu * 1e6 / r["requests"], cpu * 1e6 / r["requests"] / int(sys.argv[8]), r["p99_ms"]))' \
        "$result" "$before" "$after" "$tick" "$round" "$(basename "$bin")" "$mode" "$events"
      kill "$rp"; wait "$rp" 2>/dev/null || true
      rm -rf "$work/spool"
    done
  done
done

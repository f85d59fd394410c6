#!/usr/bin/env bash
# A/B of relay ingest between `tributary` binaries, in the same minutes: each binary in
# turn serves on a fresh SQLite spool, with and without forwarding, under the same load
# generator and sink (those of GEN). Prints one line per run; BENCHMARKS.md records them.
#
#   SECS=5 scripts/bench_relay_ab.sh GEN BIN_A BIN_B [...]
#
# Build the binaries first (e.g. a release build of another commit in its own worktree).
# Everything binds to 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
secs="${SECS:-5}"; gen="${1:?usage: bench_relay_ab.sh GEN BIN_A BIN_B [...]}"; shift
work="$(mktemp -d)"; pids=()
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
trap cleanup EXIT
sink_port=$(free_port)
"$gen" bench sink --listen "127.0.0.1:$sink_port" 2>/dev/null & pids+=($!)
wait_port "$sink_port"
for n in 1 10; do echo "peer n=$n $("$gen" bench relay --url "http://127.0.0.1:$sink_port/v1/events" --events-per-payload $n --connections 32 --duration "${secs}s" --json)"; done
for round in 1 2; do
for bin in "$@"; do
  for mode in forward no-forward; do
    port=$(free_port); extra=(--upstream "http://127.0.0.1:$sink_port/v1/events" --flush-interval 200ms)
    [ "$mode" = no-forward ] && extra=(--no-forward)
    RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --spool "$work/s-$round-$(basename $bin)-$mode" "${extra[@]}" & rp=$!
    wait_port "$port"
    for n in 1 10; do
      echo "round=$round bin=$(basename $bin) mode=$mode n=$n $("$gen" bench relay --url "http://127.0.0.1:$port/v1/events" --events-per-payload $n --connections 32 --duration "${secs}s" --json)"
    done
    kill $rp; wait $rp 2>/dev/null || true
    rm -rf "$work/s-$round-$(basename $bin)-$mode"
  done
done
done

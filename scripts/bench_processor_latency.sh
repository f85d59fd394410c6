#!/usr/bin/env bash
# events/s through close() against an upstream that answers 204 after 0, 10 and 50 ms:
# Tributary's BatchEventProcessor + HttpDispatcher (`tributary bench processor
# --upstream-latency`, its own loopback server) beside the official Python SDK 5.7.0's
# BatchEventProcessor + default EventDispatcher posting to `tributary bench sink --latency`
# (the same server code, on 127.0.0.1:<free port>), same events, batch size 10, one producer.
#
#   scripts/bench_processor_latency.sh [LATENCIES_MS...]     (default: 0 10 50)
#
# Tributary keeps up to 32 requests in flight, so it gets 20,000 events at every latency; the
# SDK's processor has one in flight (about batch_size / RTT events/s), so its event count
# shrinks with the latency to keep each run to seconds, not minutes. events/s is the figure
# compared.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="$(scripts/setup-python.sh)"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --locked -q -p tributary-relay
bin="$target/release/tributary"
latencies=("$@")
[ ${#latencies[@]} -gt 0 ] || latencies=(0 10 50)

sink_pid=""
cleanup() { if [ -n "$sink_pid" ]; then kill "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

events_for() { # enough for a few seconds at ~batch/RTT
  if [ "$1" -eq 0 ]; then echo 20000; elif [ "$1" -le 10 ]; then echo 5000; else echo 2000; fi
}

printf '%-8s %10s %8s %12s %8s\n' impl latency_ms events events/s lost
for ms in "${latencies[@]}"; do
  n="$(events_for "$ms")"
  RUST_LOG=error "$bin" bench processor --events 20000 --batch-size 10 --threads 1 \
      --upstream-latency "${ms}ms" --json |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('%-8s %10s %8d %12.0f %8d' % ('rust', '$ms', d['events'], d['events_per_s'], d['events'] - d['dispatched']))"

  log="$(mktemp)"
  RUST_LOG=error "$bin" bench sink --listen 127.0.0.1:0 --latency "${ms}ms" 2>"$log" &
  sink_pid=$!
  addr=""
  for _ in $(seq 100); do
    addr="$(sed -n 's/^sink listening on //p' "$log")"
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "bench sink did not start: $(cat "$log")" >&2; exit 1; }
  "$python" scripts/bench_python_processor.py --events "$n" --batch-size 10 --threads 1 \
      --endpoint "http://$addr/v1/events" --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('%-8s %10s %8d %12.0f %8d' % ('python', '$ms', d['events'], d['events_per_s'], d['lost']))"
  kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true; sink_pid=""
  rm -f "$log"
done

#!/usr/bin/env bash
# Measures the relay on this machine and, in the same run, its peer: a bare axum handler
# answering 204 (`tributary bench sink`). Prints JSON lines; BENCHMARKS.md records them.
# Every relay line carries `ratio_to_peer`: its events/s over the peer's at the same events
# per payload, measured minutes apart in this run. On a shared machine compare ratios across
# runs, not the absolute figures.
#
#   scripts/bench_relay.sh [SECONDS]        (default 10 s per load run)
#
# Everything binds to 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
secs="${1:-10}"
cargo build --release -q -p tributary-relay
bin="${CARGO_TARGET_DIR:-$root/target}/release/tributary"
work="$(mktemp -d)"
pids=()
source "$root/scripts/lib.sh"
trap cleanup EXIT

rss_mb() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
declare -A peer
# with_ratio TARGET EVENTS_PER_PAYLOAD RESULT_JSON: the line, with the ratio to the peer.
with_ratio() {
  python3 -c 'import json,sys
t, n, r, p = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
ratio = r["events_per_sec"] / p["events_per_sec"] if p["events_per_sec"] else None
print(json.dumps({"target": t, "events_per_payload": n, "result": r,
                  "peer_events_per_sec": p["events_per_sec"],
                  "ratio_to_peer": None if ratio is None else round(ratio, 3)}))' "$1" "$2" "$3" "${peer[$2]}"
}

sink_port=$(free_port)
"$bin" bench sink --listen "127.0.0.1:$sink_port" 2>/dev/null & pids+=($!); sink_pid=$!
wait_port "$sink_port"

echo "# peer: bare axum handler answering 204"
for n in 1 10; do
  peer[$n]=$("$bin" bench relay --url "http://127.0.0.1:$sink_port/v1/events" --events-per-payload $n --connections 32 --duration "${secs}s" --json)
  echo "{\"target\":\"axum-204\",\"events_per_payload\":$n,\"result\":${peer[$n]}}"
done

relay_port=$(free_port)
RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$relay_port" --spool "$work/spool" \
  --upstream "http://127.0.0.1:$sink_port/v1/events" --flush-interval 200ms & pids+=($!); relay_pid=$!
wait_port "$relay_port"
echo "# relay: durable ingest (SQLite spool, sync=full) while forwarding to the sink"
for n in 1 10; do
  with_ratio relay $n "$("$bin" bench relay --url "http://127.0.0.1:$relay_port/v1/events" --events-per-payload $n --connections 32 --duration "${secs}s" --json)"
done
echo "# relay: latency at a fixed 5000 req/s, 1 event per payload"
echo "{\"target\":\"relay\",\"rate\":5000,\"result\":$("$bin" bench relay --url "http://127.0.0.1:$relay_port/v1/events" --events-per-payload 1 --connections 32 --rate 5000 --duration "${secs}s" --json)}"
echo "{\"relay_peak_rss_mb\":$(rss_mb "$relay_pid")}"
kill "$relay_pid"; wait "$relay_pid" 2>/dev/null || true

echo "# relay: durable ingest only (--no-forward, sync=full); the 10-event run fills the spool drained below"
for n in 1 10; do
  fill_port=$(free_port)
  RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$fill_port" --spool "$work/fill$n" --no-forward & pids+=($!); fill_pid=$!
  wait_port "$fill_port"
  with_ratio "relay --no-forward" $n "$("$bin" bench relay --url "http://127.0.0.1:$fill_port/v1/events" --events-per-payload $n --connections 32 --duration "${secs}s" --json)"
  kill "$fill_pid"; wait "$fill_pid" 2>/dev/null || true
done
mv "$work/fill10" "$work/fill"
echo "# forwarding: the spool filled with 10-event payloads, drained to the sink"
events=$("$bin" spool stats --spool "$work/fill" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending_events"])')
start=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$work/drain.rss" "$bin" drain --once --spool "$work/fill" --upstream "http://127.0.0.1:$sink_port/v1/events" > "$work/drain.json"
end=$(date +%s.%N)
python3 - "$events" "$start" "$end" "$work/drain.json" "$work/drain.rss" <<'PY'
import json, sys
events, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
summary = json.load(open(sys.argv[4]))["summary"]
rss = int(open(sys.argv[5]).read().strip().splitlines()[-1]) / 1024
print(json.dumps({"target": "drain", "events": events, "seconds": round(end - start, 3),
                  "events_per_sec": round(events / (end - start)), "requests": summary["requests"],
                  "delivered": summary["events_delivered"], "peak_rss_mb": round(rss, 1)}))
PY

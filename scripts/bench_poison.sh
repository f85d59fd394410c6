#!/usr/bin/env bash
# What refused events cost: fills a spool with EVENTS events (10 per payload) without
# forwarding, then drains it with `drain --once` to `tributary bench sink`, which refuses with
# 400 every request holding a bad event (none, 1 in 256, 1 in 16). Prints one JSON line per
# rate: upstream requests (and how many were isolation), events delivered and dead, the time
# to drain, and whether `spool audit` balanced. The peer is the same drain with no poison.
#
#   scripts/bench_poison.sh [EVENTS]        (default 40000)
#
# Everything binds to 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
events="${1:-40000}"
cargo build --release -q -p tributary-relay
bin="${CARGO_TARGET_DIR:-$root/target}/release/tributary"
work="$(mktemp -d)"
pids=()
source "$root/scripts/lib.sh"
trap cleanup EXIT


payloads=$((events / 10))
for one_in in 0 256 16; do
  spool="$work/spool-$one_in"
  fill_port=$(free_port)
  RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$fill_port" --spool "$spool" --no-forward --spool-sync normal & pids+=($!); fill_pid=$!
  wait_port "$fill_port"
  # A fixed rate for a fixed time gives a fixed count of payloads.
  "$bin" bench relay --url "http://127.0.0.1:$fill_port/v1/events" --events-per-payload 10 \
    --connections 8 --rate "$payloads" --duration 1s --json > "$work/fill.json"
  kill "$fill_pid"; wait "$fill_pid" 2>/dev/null || true
  held=$("$bin" spool stats --spool "$spool" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending_events"])')

  sink_port=$(free_port)
  "$bin" bench sink --listen "127.0.0.1:$sink_port" --refuse-one-in "$one_in" 2>/dev/null & pids+=($!); sink_pid=$!
  wait_port "$sink_port"
  start=$(date +%s.%N)
  code=0
  RUST_LOG=error "$bin" drain --once --max-time 600s --spool "$spool" \
    --upstream "http://127.0.0.1:$sink_port/v1/events" > "$work/drain.json" || code=$?
  end=$(date +%s.%N)
  kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true
  audit_code=0
  "$bin" spool audit --spool "$spool" > "$work/audit.json" || audit_code=$?
  python3 - "$one_in" "$held" "$start" "$end" "$code" "$audit_code" "$work/drain.json" "$work/audit.json" <<'PY'
import json, sys
one_in, held, start, end, code, audit_code = sys.argv[1:7]
summary = json.load(open(sys.argv[7]))["summary"]
audit = json.load(open(sys.argv[8]))
print(json.dumps({
    "refused": "none" if one_in == "0" else f"1/{one_in}",
    "events": int(held),
    "upstream_requests": summary["requests"],
    "isolation_requests": summary["isolation_requests"],
    "events_delivered": summary["events_delivered"],
    "events_dead": summary["events_dead"],
    "seconds_to_drain": round(float(end) - float(start), 2),
    "drain_exit": int(code),
    "audit_balanced": audit.get("balanced") and int(audit_code) == 0,
    "pending_after": audit["totals"]["events"]["pending"],
}))
PY
done

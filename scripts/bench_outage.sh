#!/usr/bin/env bash
# Issue 11's outage row: relay ingest latency at a fixed 1,500 req/s of 10-event payloads
# while the upstream is gone 15 s in every 45 s, and whether the relay's memory stays flat.
# In the same run, the peer: the same load against a relay whose upstream never goes away.
# Prints JSON lines; BENCHMARKS.md records them.
#
#   scripts/bench_outage.sh [SECONDS]        (default 240 s of load with outages)
#
# Env: RATE (1500), EVENTS (10), EVERY (45s), GONE (15s), PEER_SECS (30; 0 skips the peer),
# DRAIN_WAIT (180: seconds to wait for the backlog to reach the sink), RELAY_ARGS (extra
# `serve` flags, e.g. to try a forwarder setting), BIN (a `tributary` binary to use instead
# of building this checkout, e.g. a copy of main's to measure before and after in one go).
# Everything binds to 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
secs="${1:-240}"
rate="${RATE:-1500}"
events="${EVENTS:-10}"
every="${EVERY:-45s}"
gone="${GONE:-15s}"
peer_secs="${PEER_SECS:-30}"
drain_wait="${DRAIN_WAIT:-180}"
read -r -a relay_extra <<< "${RELAY_ARGS:-}"
if [ -n "${BIN:-}" ]; then
  bin="$BIN"
else
  cargo build --release -q -p tributary-relay
  bin="${CARGO_TARGET_DIR:-$root/target}/release/tributary"
fi
work="$(mktemp -d)"
pids=()
source "$root/scripts/lib.sh"
trap cleanup EXIT

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
sink_events() { curl -s -m 2 "http://127.0.0.1:$1/counts" | python3 -c 'import json,sys; print(json.load(sys.stdin)["events"])' 2>/dev/null || echo -1; }

# run NAME SECONDS SINK_FLAGS...: a sink with SINK_FLAGS, a relay forwarding to it, the load;
# prints the load's per-window latency, the RSS series and the totals.
run() {
  local name=$1 duration=$2; shift 2
  local sink_port relay_port sink_pid relay_pid load_pid
  sink_port=$(free_port)
  "$bin" bench sink --listen "127.0.0.1:$sink_port" "$@" 2>"$work/$name.sink.log" & pids+=($!); sink_pid=$!
  wait_port "$sink_port"
  relay_port=$(free_port)
  RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$relay_port" --spool "$work/$name.spool" \
    --upstream "http://127.0.0.1:$sink_port/v1/events" "${relay_extra[@]}" 2>"$work/$name.relay.log" & pids+=($!); relay_pid=$!
  wait_port "$relay_port"
  "$bin" bench relay --url "http://127.0.0.1:$relay_port/v1/events" --events-per-payload "$events" \
    --connections 32 --rate "$rate" --duration "${duration}s" --window 5s --json > "$work/$name.load.json" &
  pids+=($!); load_pid=$!
  local start rss=() t
  start=$(date +%s)
  while kill -0 "$load_pid" 2>/dev/null; do
    t=$(( $(date +%s) - start ))
    rss+=("[$t,$(rss_kb "$relay_pid")]")
    sleep 5
  done
  wait "$load_pid" || true
  # The backlog reaches the sink (bounded): the sink counts what it answered 204.
  local accepted delivered drained_after=-1
  accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"] * int(sys.argv[2]))' "$work/$name.load.json" "$events")
  local drain_start
  drain_start=$(date +%s)
  for _ in $(seq $((drain_wait * 2))); do
    delivered=$(sink_events "$sink_port")
    if [ "$delivered" -ge "$accepted" ]; then drained_after=$(( $(date +%s) - drain_start )); break; fi
    sleep 0.5
  done
  delivered=$(sink_events "$sink_port")
  rss+=("[$(( $(date +%s) - start )),$(rss_kb "$relay_pid")]")
  local rss_json
  rss_json="[$(IFS=,; echo "${rss[*]}")]"
  python3 - "$name" "$work/$name.load.json" "$rss_json" "$accepted" "$delivered" "$drained_after" <<'PY'
import json, sys
name, load, rss = sys.argv[1], json.load(open(sys.argv[2])), json.loads(sys.argv[3])
accepted, delivered, drained_after = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
for w in load.pop("windows", []):
    print(json.dumps({"run": name, "window": w}))
print(json.dumps({"run": name, "rss_kb": rss}))
after_first_minute = next((kb for t, kb in rss if t >= 60), None)
growth = None if after_first_minute is None else round((max(kb for _, kb in rss) - after_first_minute) / 1024, 1)
print(json.dumps({"run": name, "overall": load, "p99_ms": load["p99_ms"],
                  "max_rss_mb": round(max(kb for _, kb in rss) / 1024, 1),
                  "rss_growth_after_first_minute_mb": growth,
                  "accepted_events": accepted, "delivered_events": delivered,
                  "drained_after_s": drained_after}))
PY
  kill "$relay_pid" "$sink_pid" 2>/dev/null || true
  wait "$relay_pid" "$sink_pid" 2>/dev/null || true
  # This run's processes are gone: the trap must not kill their ids, reused by then.
  local keep=() p
  for p in "${pids[@]}"; do
    case " $sink_pid $relay_pid $load_pid " in *" $p "*) ;; *) keep+=("$p") ;; esac
  done
  pids=("${keep[@]}")
  local warnings
  warnings=$(grep -c "upstream delivery failed" "$work/$name.relay.log" || true)
  echo "{\"run\":\"$name\",\"relay_retry_warnings\":$warnings}"
}

if [ "$peer_secs" -gt 0 ]; then
  echo "# peer: the same load, the upstream never gone (${peer_secs}s)"
  run peer "$peer_secs"
fi
echo "# outage: upstream gone $gone in every $every (${secs}s)"
run outage "$secs" --outage-every "$every" --outage-for "$gone"

#!/usr/bin/env bash
# Measures what the shared-relay rules cost at ingest, in one run on this machine: durable
# ingest (SQLite spool, sync=full, --no-forward) of 10-event payloads with fresh uuids in
# every request, with no rules, with the privacy rules (drop two attributes, HMAC visitor
# ids) and with the duplicate filter on; then the duplicate filter's cost per million
# uuids, on disk (dedup.db) and in memory (resident set over the no-rules relay's).
# Prints JSON lines; BENCHMARKS.md records them.
#
#   scripts/bench_shared_relay.sh [SECONDS]        (default 10 s per load run)
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

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
printf 'secret-for-the-benchmark' > "$work/hmac.key"

run() { # NAME FLAGS...
  local name="$1"; shift
  local port; port=$(free_port)
  RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --spool "$work/$name" --no-forward "$@" & pids+=($!)
  local pid=$!
  wait_port "$port"
  local result
  result=$("$bin" bench relay --url "http://127.0.0.1:$port/v1/events" --events-per-payload 10 \
    --connections 32 --duration "${secs}s" --fresh-uuids --json)
  echo "{\"target\":\"relay --no-forward\",\"rules\":\"$name\",\"events_per_payload\":10,\"rss_kb\":$(rss_kb "$pid"),\"result\":$result}"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "# durable ingest, 10-event payloads, fresh uuids in every request"
run none | tee "$work/none.json"
run privacy --drop-attributes plan,age --hash-visitor-ids --hash-key-file "$work/hmac.key"
run dedup --dedup-window 1h --dedup-cache-uuids 100000000 --dedup-max-uuids 100000000 | tee "$work/dedup.json"

echo "# the duplicate filter's cost per million uuids (the dedup run above: every uuid accepted is kept)"
python3 - "$work" <<'PY'
import json, os, sqlite3, sys
work = sys.argv[1]
none = json.load(open(f"{work}/none.json"))
dedup = json.load(open(f"{work}/dedup.json"))
db = f"{work}/dedup/dedup.db"
conn = sqlite3.connect(db)
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
uuids = conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
conn.close()
size = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))
rss_delta = (dedup["rss_kb"] - none["rss_kb"]) * 1024
per_m = lambda b: round(b / uuids * 1e6 / 2**20, 1) if uuids else None
print(json.dumps({"dedup_uuids": uuids, "dedup_db_bytes": size,
                  "disk_mib_per_million_uuids": per_m(size),
                  "rss_delta_bytes": rss_delta,
                  "rss_mib_per_million_uuids_in_memory": per_m(rss_delta)}))
PY

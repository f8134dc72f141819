#!/usr/bin/env bash
# How fast one edge takes records in from JetStream, and how long a warm start takes
# (issue #14): the feed handler (`tickgate publish --nats`) fills `MD_<FEED>` with RECORDS
# records (its synthetic source at RATE ticks/s over K instruments, batched into one message
# per instrument run of up to 8,192 records); then an edge starts, warms up from the stream
# (the whole window is within `[resume] max_age_s`) and reports ready. Printed: the handler's
# records/s, the edge's time to ready, its intake in records/s over that time and its
# CPU-seconds per million records taken in; and, side by side in the same run, the same
# records sent to a `source = "publish"` feed over `GET /v1/publish` (the direct path) with its
# CPU per million.
#
#   benches/nats_intake.sh [--records N] [--rate R] [--instruments K] [--rounds R]
#
# Defaults: 600,000 records (2,000 ticks/s for 5 minutes: the issue's warm-start case) at
# 1,000,000 ticks/s over 10 instruments, 3 rounds. Output: the table (medians) and
# docs/benchmarks-nats-intake.jsonl (OUT_DIR=... elsewhere). Never fails on timing.
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=600000; RATE=1000000; K=10; ROUNDS=3
while [ $# -gt 0 ]; do
  case $1 in
    --records) RECORDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --instruments) K=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install -y nats-server" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-docs}
[ -n "${TICKGATE_BIN:-}" ] || cargo build --release -q
BIN=${TICKGATE_BIN:-$PWD/target/release/tickgate}
PIN_SRV=(); PIN_LOAD=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then PIN_SRV=(taskset -c 0); PIN_LOAD=(taskset -c 1); fi
work=$(mktemp -d)
PIDS=()
trap 'kill -KILL "${PIDS[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
syms=$(for ((i = 0; i < K; i++)); do printf '"S%d",' "$i"; done | sed 's/,$//')
mkdir -p "$work/handler" "$work/edge" "$work/direct"
printf 'name = "IN"\nid = 7\nsource = "synthetic"\nsymbols = [%s]\n[synthetic]\nseed = 1\nrate_per_s = %s.0\n' "$syms" "$RATE" >"$work/handler/in.toml"
printf 'name = "IN"\nid = 7\nsource = "nats"\nsymbols = [%s]\n[resume]\nrecords = %s\nmax_age_s = 300\n' "$syms" "$RECORDS" >"$work/edge/in.toml"
printf 'name = "IN"\nid = 7\nsource = "publish"\nsymbols = [%s]\n[resume]\nrecords = %s\nmax_age_s = 300\n' "$syms" "$RECORDS" >"$work/direct/in.toml"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT_DIR"; OUT="$OUT_DIR/benchmarks-nats-intake.jsonl"; : >"$OUT"
port() { echo $((20000 + RANDOM % 30000)); }
for r in $(seq 1 "$ROUNDS"); do
  NP=$(port); TP=$(port); TA=$(port)
  "${PIN_LOAD[@]}" nats-server -a 127.0.0.1 -p "$NP" -js -sd "$work/js$r" >/dev/null 2>&1 &
  NATS=$!; PIDS+=("$NATS")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NP") 2>/dev/null && break; sleep 0.1; done
  t0=$(date +%s.%N)
  "${PIN_LOAD[@]}" "$BIN" publish --nats "nats://127.0.0.1:$NP" --feed IN --feeds-dir "$work/handler" --count "$RECORDS" >"$work/pub.json" 2>"$work/pub.err" \
    || { echo "handler failed: $(tail -3 "$work/pub.err")" >&2; exit 1; }
  t1=$(date +%s.%N)
  for side in nats direct; do
    dir=$work/edge; [ $side = direct ] && dir=$work/direct
    printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nfeeds_dir = "%s"\n[nats]\nservers = ["nats://127.0.0.1:%s"]\n[server]\nstate_dir = "%s/state"\n' \
      "$TP" "$TA" "$dir" "$NP" "$work" >"$work/tg.toml"
    s0=$(date +%s.%N)
    RUST_LOG=warn "${PIN_SRV[@]}" "$BIN" serve --config "$work/tg.toml" --insecure-no-auth >"$work/tg.log" 2>&1 &
    TG=$!; PIDS+=("$TG")
    for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$TA/readyz" >/dev/null && break; sleep 0.05; done
    s1=$(date +%s.%N)
    if [ $side = direct ]; then
      # The same records through the direct path: a recording of them would be the fairest
      # input; the load publisher sends the same count in 4,096-record batches as fast as it can.
      c0=$(cpu "$TG"); s1=$(date +%s.%N)
      "${PIN_LOAD[@]}" "$BIN" load --role publisher --target tickgate --url "ws://127.0.0.1:$TP/v1/stream" --no-token \
        --feed IN --feed-id 7 --symbols "$(echo "$syms" | tr -d '"')" --rate 10000000 --count "$RECORDS" --seconds 0 >/dev/null 2>"$work/dpub.err" \
        || { echo "direct publisher failed: $(tail -3 "$work/dpub.err")" >&2; exit 1; }
      s2=$(date +%s.%N); c1=$(cpu "$TG")
      python3 -c "import json; print(json.dumps({'round': $r, 'path': 'direct', 'records': $RECORDS, 'seconds': $s2 - $s1, 'records_per_s': $RECORDS / ($s2 - $s1), 'cpu_s_per_million': ($c1 - $c0) / $HZ / ($RECORDS / 1e6)}))" >>"$OUT"
    else
      c1=$(cpu "$TG")
      curl -sf "http://127.0.0.1:$TA/readyz" >/dev/null || { echo "edge not ready: $(curl -s "http://127.0.0.1:$TA/readyz")" >&2; exit 1; }
      python3 -c "import json; print(json.dumps({'round': $r, 'path': 'nats', 'records': $RECORDS, 'handler_records_per_s': $RECORDS / ($t1 - $t0), 'seconds_to_ready': $s1 - $s0, 'records_per_s': $RECORDS / ($s1 - $s0), 'cpu_s_per_million': $c1 / $HZ / ($RECORDS / 1e6)}))" >>"$OUT"
    fi
    kill -KILL "$TG" 2>/dev/null || true; wait "$TG" 2>/dev/null || true
  done
  kill -KILL "$NATS" 2>/dev/null || true; wait "$NATS" 2>/dev/null || true
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
m = lambda path, k: st.median([r[k] for r in rows if r["path"] == path and k in r])
print(f"\n| measurement | median |\n|---|---:|")
print(f"| handler into JetStream, records/s | {m('nats', 'handler_records_per_s'):,.0f} |")
print(f"| edge warm start, seconds to ready ({rows[0]['records']:,} records) | {m('nats', 'seconds_to_ready'):.2f} |")
print(f"| edge intake from JetStream (warm start), records/s | {m('nats', 'records_per_s'):,.0f} |")
print(f"| edge CPU-s per million, from JetStream (incl. start-up) | {m('nats', 'cpu_s_per_million'):.2f} |")
print(f"| edge intake over /v1/publish (direct), records/s | {m('direct', 'records_per_s'):,.0f} |")
print(f"| edge CPU-s per million, direct | {m('direct', 'cpu_s_per_million'):.2f} |")
print(f"| CPU per million, JetStream / direct | {m('nats', 'cpu_s_per_million') / m('direct', 'cpu_s_per_million'):.2f} |")
PY

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
RECORDS=600000; RATE=1000000; K=10; ROUNDS=3; QR=0.75; LIVE=2000000
while [ $# -gt 0 ]; do
  case $1 in
    --records) RECORDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --instruments) K=$2; shift ;;
    --quote-ratio) QR=$2; shift ;;
    --live) LIVE=$2; shift ;;
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
mkdir -p "$work/handler" "$work/edge" "$work/direct" "$work/empty"
printf 'name = "IN"\nid = 7\nsource = "synthetic"\nsymbols = [%s]\n[synthetic]\nseed = 1\nrate_per_s = %s.0\nquote_ratio = %s\n' "$syms" "$RATE" "$QR" >"$work/handler/in.toml"
printf 'name = "IN"\nid = 7\nsource = "nats"\nsymbols = [%s]\n[resume]\nrecords = %s\nmax_age_s = 300\n' "$syms" "$RECORDS" >"$work/edge/in.toml"
# The start-up alone, to subtract: the same edge on a NATS feed whose stream is empty.
printf 'name = "EMPTY"\nid = 8\nsource = "nats"\nsymbols = [%s]\n[resume]\nrecords = %s\nmax_age_s = 300\n' "$syms" "$RECORDS" >"$work/empty/empty.toml"
printf 'name = "IN"\nid = 7\nsource = "publish"\nsymbols = [%s]\n[resume]\nrecords = %s\nmax_age_s = 300\n' "$syms" "$RECORDS" >"$work/direct/in.toml"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Waits (polling every 20 ms, up to 60 s) until the edge on admin port $TA has taken in
# stream sequence $1 of feed IN; fails the run when it does not.
caught_up() {
  local pos=0
  for _ in $(seq 3000); do
    pos=$(curl -sf "http://127.0.0.1:$TA/metrics" | awk '/^tickgate_nats_stream_seq\{feed="IN"\}/ {print $2}')
    [ "${pos:-0}" -ge "$1" ] && return 0; sleep 0.02
  done
  echo "edge stuck at stream seq ${pos:-?} of $1" >&2; exit 1
}
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
  for side in empty nats direct; do
    dir=$work/edge; [ $side = direct ] && dir=$work/direct; [ $side = empty ] && dir=$work/empty
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
    elif [ $side = empty ]; then
      c1=$(cpu "$TG")
      python3 -c "import json; print(json.dumps({'round': $r, 'path': 'empty', 'seconds_to_ready': $s1 - $s0, 'cpu_s': $c1 / $HZ}))" >>"$OUT"
    else
      c1=$(cpu "$TG")
      e_s=$(python3 -c "import json; print([json.loads(l) for l in open('$OUT')][-1]['seconds_to_ready'])")
      e_c=$(python3 -c "import json; print([json.loads(l) for l in open('$OUT')][-1]['cpu_s'])")
      curl -sf "http://127.0.0.1:$TA/readyz" >/dev/null || { echo "edge not ready: $(curl -s "http://127.0.0.1:$TA/readyz")" >&2; exit 1; }
      python3 -c "import json; print(json.dumps({'round': $r, 'path': 'nats', 'records': $RECORDS, 'handler_records_per_s': $RECORDS / ($t1 - $t0), 'seconds_to_ready': $s1 - $s0, 'records_per_s': $RECORDS / ($s1 - $s0), 'cpu_s_per_million': $c1 / $HZ / ($RECORDS / 1e6), 'records_per_s_less_startup': $RECORDS / max(1e-3, $s1 - $s0 - $e_s), 'cpu_s_per_million_less_startup': max(0.0, $c1 / $HZ - $e_c) / ($RECORDS / 1e6)}))" >>"$OUT"
      # Live intake: the warm edge consumes while the handler publishes LIVE more records
      # (a new epoch); done when the edge's stream position reaches the stream's last message.
      c0=$(cpu "$TG"); l0=$(date +%s.%N)
      "${PIN_LOAD[@]}" "$BIN" publish --nats "nats://127.0.0.1:$NP" --feed IN --feeds-dir "$work/handler" --count "$LIVE" >"$work/pub2.json" 2>"$work/pub2.err" \
        || { echo "handler failed: $(tail -3 "$work/pub2.err")" >&2; exit 1; }
      l1=$(date +%s.%N)
      last=$(python3 -c "import json; print(json.load(open('$work/pub.json'))['messages'] + json.load(open('$work/pub2.json'))['messages'])")
      caught_up "$last"
      l2=$(date +%s.%N); c1=$(cpu "$TG")
      python3 -c "import json; m = json.load(open('$work/pub2.json')); print(json.dumps({'round': $r, 'path': 'live', 'records': $LIVE, 'messages': m['messages'], 'records_per_message': $LIVE / m['messages'], 'handler_records_per_s': $LIVE / ($l1 - $l0), 'seconds': $l2 - $l0, 'records_per_s': $LIVE / ($l2 - $l0), 'cpu_s_per_million': ($c1 - $c0) / $HZ / ($LIVE / 1e6)}))" >>"$OUT"
      # Catch-up intake, the edge alone: stopped (SIGSTOP) while the handler publishes LIVE
      # more records, then continued (SIGCONT): it pulls them from JetStream as fast as it
      # can take them. Timed from SIGCONT to its stream position reaching the last message.
      kill -STOP "$TG"
      "${PIN_LOAD[@]}" "$BIN" publish --nats "nats://127.0.0.1:$NP" --feed IN --feeds-dir "$work/handler" --count "$LIVE" >"$work/pub3.json" 2>"$work/pub3.err" \
        || { kill -CONT "$TG"; echo "handler failed: $(tail -3 "$work/pub3.err")" >&2; exit 1; }
      last=$((last + $(python3 -c "import json; print(json.load(open('$work/pub3.json'))['messages'])")))
      c0=$(cpu "$TG"); l0=$(date +%s.%N); kill -CONT "$TG"
      caught_up "$last"
      l2=$(date +%s.%N); c1=$(cpu "$TG")
      python3 -c "import json; print(json.dumps({'round': $r, 'path': 'catchup', 'records': $LIVE, 'seconds': $l2 - $l0, 'records_per_s': $LIVE / ($l2 - $l0), 'cpu_s_per_million': ($c1 - $c0) / $HZ / ($LIVE / 1e6)}))" >>"$OUT"
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
print(f"| edge warm start, seconds to ready ({[r for r in rows if r['path'] == 'nats'][0]['records']:,} records) | {m('nats', 'seconds_to_ready'):.2f} |")
print(f"| edge intake from JetStream (warm start), records/s | {m('nats', 'records_per_s'):,.0f} |")
print(f"| edge CPU-s per million, from JetStream (incl. start-up) | {m('nats', 'cpu_s_per_million'):.2f} |")
print(f"| edge start-up alone (empty stream): seconds to ready, CPU-s | {m('empty', 'seconds_to_ready'):.2f}, {m('empty', 'cpu_s'):.2f} |")
print(f"| warm start less start-up: records/s, CPU-s per million | {m('nats', 'records_per_s_less_startup'):,.0f}, {m('nats', 'cpu_s_per_million_less_startup'):.2f} |")
print(f"| live: handler into JetStream while the edge consumes, records/s | {m('live', 'handler_records_per_s'):,.0f} |")
print(f"| live: records per message | {m('live', 'records_per_message'):,.1f} |")
print(f"| live: edge intake from JetStream (handler start to edge caught up), records/s | {m('live', 'records_per_s'):,.0f} |")
print(f"| live: edge CPU-s per million from JetStream | {m('live', 'cpu_s_per_million'):.2f} |")
print(f"| catch-up (edge stopped while the handler publishes, then continued): records/s | {m('catchup', 'records_per_s'):,.0f} |")
print(f"| catch-up: edge CPU-s per million from JetStream | {m('catchup', 'cpu_s_per_million'):.2f} |")
print(f"| edge intake over /v1/publish (direct), records/s | {m('direct', 'records_per_s'):,.0f} |")
print(f"| edge CPU-s per million, direct | {m('direct', 'cpu_s_per_million'):.2f} |")
print(f"| CPU per million, JetStream warm start / direct | {m('nats', 'cpu_s_per_million') / m('direct', 'cpu_s_per_million'):.2f} |")
print(f"| CPU per million, JetStream catch-up / direct | {m('catchup', 'cpu_s_per_million') / m('direct', 'cpu_s_per_million'):.2f} |")
print(f"| CPU per million, JetStream live / direct | {m('live', 'cpu_s_per_million') / m('direct', 'cpu_s_per_million'):.2f} |")
PY

#!/usr/bin/env bash
# What the NATS fabric costs per node (issue #14): the same N subscribers served by ONE edge,
# or split over TWO edges (N/2 each), both fed by the same JetStream feed. Started here on
# free ports: nats-server with JetStream and, per cell, the feed handler (`tickgate publish
# --nats`, its synthetic source at M ticks/s over K instruments). Edge A runs throughout;
# edge B is started (and warms up from the stream) for each TWO run and killed after it, so
# a ONE run has no second consumer. Subscribers connect to the edges directly (no balancer:
# HAProxy's own cost is not the question) with `tickgate load` in two processes either way
# (ONE: `--processes 2` on A; TWO: one process of N/2 on each edge), alternating ONE and
# TWO, ROUNDS times. Per run: delivered records/s (all subscribers), p50/p99 latency against
# each tick's scheduled time (TWO: the worse of its two halves), edge CPU-seconds per million
# deliveries summed over the edges (/proc, the measured window), the edges' CPU in cores,
# the edges' CPU in cores over 3 s just before the subscribers come (the feed flowing, no
# client: the fabric's own cost per node), and nats-server's CPU in cores over the run.
#
#   benches/two_edges.sh [--cells "N:M ..."] [--rounds R] [--seconds S] [--instruments K]
#
# Default cells: "1000:100 1000:1000" (100,000 deliveries/s, which one core serves with room,
# and 1,000,000/s, which saturates it, §12), 2 rounds of 8 s, 10 instruments. Pinning (2
# cores, nothing isolated): both edges on core 0, so ONE and TWO get the same one core for
# edge work; nats-server, the handler and the load generator on core 1. Output: the table
# (medians, TWO/ONE ratios), and docs/benchmarks-two-edges.jsonl (OUT_DIR=... elsewhere).
# It never fails on timing, only on a run that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS="1000:100 1000:1000"; ROUNDS=2; SECS=8; K=10
source benches/lib.sh
bench_args "cells=CELLS rounds=ROUNDS seconds=SECS instruments=K" "$@"
bench_setup nats-server curl python3
work=$(mktemp -d)
NATS_PID=""; A_PID=""; B_PID=""; H_PID=""
# (The braces keep the shell's "Killed" job notices out of the output.)
trap '{ kill -KILL $A_PID $B_PID $H_PID $NATS_PID || true; wait || true; } 2>/dev/null; rm -rf "$work"' EXIT
syms=$(for ((i = 0; i < K; i++)); do printf '"S%d",' "$i"; done | sed 's/,$//')
mkdir -p "$work/handler" "$work/feeds"
printf 'name = "TWO"\nid = 22\nsource = "nats"\nsymbols = [%s]\n' "$syms" >"$work/feeds/two.toml"
NP=$(free_port)
"${PIN1[@]}" nats-server -a 127.0.0.1 -p "$NP" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
NATS_PID=$!
wait_port "$NP" || { echo "nats-server not listening: $(tail -3 "$work/nats.log")" >&2; exit 1; }
# An edge: its stream and admin ports in $work/<name>.ports, its pid in EDGE_PID.
start_edge() {
  local name=$1 p a; p=$(free_port); a=$(free_port)
  cat >"$work/$name.toml" <<EOF
listen = "127.0.0.1:$p"
admin_listen = "127.0.0.1:$a"
feeds_dir = "$work/feeds"
[limits]
max_outbound_bytes = 1048576
[server]
state_dir = "$work/$name-state"
[nats]
servers = ["nats://127.0.0.1:$NP"]
EOF
  echo "$p $a" >"$work/$name.ports"
  RUST_LOG=warn "${PIN0[@]}" "$BIN" serve --config "$work/$name.toml" --insecure-no-auth >"$work/$name.log" 2>&1 &
  EDGE_PID=$!
}
# Handler first: it creates the streams and the first epoch.
start_handler() {
  printf 'name = "TWO"\nid = 22\nsource = "synthetic"\nsymbols = [%s]\n[synthetic]\nseed = 1\nrate_per_s = %s.0\n' "$syms" "$1" >"$work/handler/two.toml"
  RUST_LOG=warn "${PIN1[@]}" "$BIN" publish --nats "nats://127.0.0.1:$NP" --feed TWO --feeds-dir "$work/handler" >/dev/null 2>"$work/handler.err" &
  H_PID=$!
}
# What the running edges cost with no subscriber at all, taking the feed in from JetStream
# (the fabric's own cost per node): CPU cores over IDLE seconds, one number per pid.
IDLE=3
idle_cores() {
  local before=() p i=0 out=""
  for p in "$@"; do before+=("$(cpu "$p")"); done
  sleep "$IDLE"
  for p in "$@"; do out+="$(python3 -c "print(($(cpu "$p") - ${before[$i]}) / $(getconf CLK_TCK) / $IDLE)") "; i=$((i + 1)); done
  echo "$out"
}
load() { # name url conns pid admin [extra...]
  local name=$1 url=$2 n=$3 pid=$4 admin=$5; shift 5
  "${PIN1[@]}" "$BIN" load --url "$url" --no-token --feed TWO --symbols '*' --connections "$n" \
    --seconds "$SECS" --warmup 2 --admin "$admin" --server-pid "$pid" "$@" >"$work/$name.json" 2>"$work/$name.err"
}
mkdir -p "$OUT_DIR"; OUT="$OUT_DIR/benchmarks-two-edges.jsonl"; : >"$OUT"
FAILED=0
start_edge a; A_PID=$EDGE_PID
for c in $CELLS; do
  n=${c%%:*}; m=${c##*:}
  [ -n "$H_PID" ] && { kill -TERM "$H_PID" 2>/dev/null || true; wait "$H_PID" 2>/dev/null || true; }
  start_handler "$m"
  read -r AP AA <"$work/a.ports"
  wait_ready "http://127.0.0.1:$AA" || { echo "edge A not ready: $(tail -3 "$work/a.log")" >&2; exit 1; }
  for r in $(seq 1 "$ROUNDS"); do
    for cfg in one two; do
      echo "== round $r: $n subscribers x $m/s, $cfg edge(s)" >&2
      n0=$(cpu "$NATS_PID"); t0=$(date +%s.%N)
      if [ $cfg = one ]; then
        idle=$(idle_cores "$A_PID")
        n0=$(cpu "$NATS_PID"); t0=$(date +%s.%N)
        load one "ws://127.0.0.1:$AP/v1/stream" "$n" "$A_PID" "http://127.0.0.1:$AA" --processes 2 \
          || { echo "load failed: $(tail -2 "$work/one.err")" >&2; FAILED=1; }
        files=("$work/one.json")
      else
        start_edge b; B_PID=$EDGE_PID
        read -r BP BA <"$work/b.ports"
        wait_ready "http://127.0.0.1:$BA" || { echo "edge B not ready: $(tail -3 "$work/b.log")" >&2; exit 1; }
        idle=$(idle_cores "$A_PID" "$B_PID")
        n0=$(cpu "$NATS_PID"); t0=$(date +%s.%N)
        load twoA "ws://127.0.0.1:$AP/v1/stream" $((n / 2)) "$A_PID" "http://127.0.0.1:$AA" &
        la=$!
        load twoB "ws://127.0.0.1:$BP/v1/stream" $((n - n / 2)) "$B_PID" "http://127.0.0.1:$BA" &
        lb=$!
        wait "$la" || { echo "load A failed: $(tail -2 "$work/twoA.err")" >&2; FAILED=1; }
        wait "$lb" || { echo "load B failed: $(tail -2 "$work/twoB.err")" >&2; FAILED=1; }
        files=("$work/twoA.json" "$work/twoB.json")
      fi
      n1=$(cpu "$NATS_PID"); t1=$(date +%s.%N)
      [ $cfg = two ] && { kill -KILL "$B_PID" 2>/dev/null || true; wait "$B_PID" 2>/dev/null || true; B_PID=""; rm -rf "$work/b-state"; }
      python3 - "$cfg" "$n" "$m" "$r" "$n0" "$n1" "$t0" "$t1" "$(getconf CLK_TCK)" "$idle" "${files[@]}" >>"$OUT" <<'PY'
import json, sys
cfg, n, m, r, n0, n1, t0, t1, hz, idle, *files = sys.argv[1:]
try:
    js = [json.load(open(f)) for f in files]
except ValueError:
    sys.exit(0)
recs = sum(j.get("records") or 0 for j in js)
secs = max(j.get("seconds") or 0 for j in js)
cpu = [j.get("server_cpu_s") for j in js]
cpu_s = sum(cpu) if None not in cpu else None
print(json.dumps({"config": cfg, "subscribers": int(n), "ticks_per_s": int(m), "round": int(r),
    "records_per_s": sum(j.get("records_per_s") or 0 for j in js),
    "p50_us": max(j.get("p50_us") or 0 for j in js), "p99_us": max(j.get("p99_us") or 0 for j in js),
    "gaps": sum(j.get("gap_messages") or 0 for j in js), "anomalies": sum(j.get("anomalies") or 0 for j in js),
    "edge_cpu_s_per_million": cpu_s / (recs / 1e6) if recs and cpu_s is not None else None,
    "edge_cores": cpu_s / secs if secs and cpu_s is not None else None,
    "per_edge_cpu_s_per_million": [j.get("server_cpu_s_per_million") for j in js],
    "idle_edge_cores": [float(x) for x in idle.split()],
    "nats_cores": (int(n1) - int(n0)) / int(hz) / (float(t1) - float(t0))}))
PY
    done
  done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
cells = sorted({(r["subscribers"], r["ticks_per_s"]) for r in rows})
med = lambda xs: st.median(xs) if xs else float("nan")
for r in rows:
    r["idle_cores_sum"] = sum(r.get("idle_edge_cores") or [0])
keys = ("records_per_s", "p50_us", "p99_us", "edge_cpu_s_per_million", "edge_cores", "idle_cores_sum", "nats_cores")
print("\n| cell | edges | delivered/s | p50 ms | p99 ms | edge CPU-s/M (sum) | edge cores | edge cores, no clients | nats-server cores | gaps |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for n, m in cells:
    got = {}
    for cfg in ("one", "two"):
        rs = [r for r in rows if (r["subscribers"], r["ticks_per_s"], r["config"]) == (n, m, cfg) and r.get("records_per_s")]
        got[cfg] = {k: med([r[k] for r in rs if r.get(k) is not None]) for k in keys}
        g = got[cfg]
        print(f"| {n} x {m}/s | {cfg} | {g['records_per_s']:.0f} | {g['p50_us']/1e3:.2f} | {g['p99_us']/1e3:.2f} | "
              f"{g['edge_cpu_s_per_million']:.2f} | {g['edge_cores']:.2f} | {g['idle_cores_sum']:.3f} | {g['nats_cores']:.3f} | {sum(r['gaps'] for r in rs)} |")
    o, t = got["one"], got["two"]
    print(f"| {n} x {m}/s | two/one | x{t['records_per_s']/o['records_per_s']:.3f} | x{t['p50_us']/o['p50_us']:.2f} | "
          f"x{t['p99_us']/o['p99_us']:.2f} | x{t['edge_cpu_s_per_million']/o['edge_cpu_s_per_million']:.2f} | "
          f"{t['edge_cores']-o['edge_cores']:+.2f} | {t['idle_cores_sum']-o['idle_cores_sum']:+.3f} | {t['nats_cores']-o['nats_cores']:+.3f} | |")
PY
exit $FAILED

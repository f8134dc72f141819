#!/usr/bin/env bash
# The cost of the NATS JetStream hop (issue #14), side by side in one run: one tickgate edge
# with two feeds of one instrument, DIRECT (`source = "publish"`: the publisher's batches are
# taken in by the edge) and VIANATS (`source = "nats"`: the same batches, sent to the same
# `GET /v1/publish`, are forwarded to JetStream and come back through the feed's consumer:
# publisher -> edge -> JetStream -> edge -> clients). The same load generator
# (`tickgate load`, N subscribers; `--role publisher` at M ticks/s with its own seqs) runs
# against each, alternating, ROUNDS times. Per path: p50/p99 latency against each tick's
# scheduled time (open loop), delivered records/s, gaps, edge CPU-seconds per million
# deliveries and nats-server CPU-seconds per million.
#
#   benches/nats_hop.sh [--cells "N:M ..."] [--rounds R] [--seconds S]
#
# Default cells: "1000:1000 100:1000" (the issue's cell first), 3 rounds of 8 s. Edge on
# core 0, load generator and nats-server on core 1 (2 cores; nothing pinned with 1).
# Output: the table (medians, and NATS minus direct in ms), and docs/benchmarks-nats-hop.jsonl
# (OUT_DIR=... to write elsewhere). It never fails on timing, only on a run that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS="1000:1000 100:1000"; ROUNDS=3; SECS=8
while [ $# -gt 0 ]; do
  case $1 in
    --cells) CELLS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECS=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install -y nats-server" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-docs}
[ -n "${TICKGATE_BIN:-}" ] || cargo build --release -q
BIN=${TICKGATE_BIN:-$PWD/target/release/tickgate}
ulimit -n 20000 2>/dev/null || true
PIN_SRV=(); PIN_LOAD=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then PIN_SRV=(taskset -c 0); PIN_LOAD=(taskset -c 1); fi
work=$(mktemp -d)
NATS_PID=""; TG_PID=""
trap 'kill -KILL $TG_PID $NATS_PID 2>/dev/null || true; rm -rf "$work"' EXIT
NP=$((20000 + RANDOM % 20000)); TP=$((NP + 1)); TA=$((NP + 2))
"${PIN_LOAD[@]}" nats-server -a 127.0.0.1 -p "$NP" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
NATS_PID=$!
mkdir -p "$work/feeds"
printf 'name = "DIRECT"\nid = 100\nsource = "publish"\nsymbols = ["S0"]\n' >"$work/feeds/direct.toml"
printf 'name = "VIANATS"\nid = 101\nsource = "nats"\nsymbols = ["S0"]\n' >"$work/feeds/vianats.toml"
cat >"$work/tg.toml" <<EOF
listen = "127.0.0.1:$TP"
admin_listen = "127.0.0.1:$TA"
feeds_dir = "$work/feeds"
[limits]
max_outbound_bytes = 1048576
max_connections = 100000
max_connections_per_ip = 100000
max_connections_per_subject = 100000
connect_rate_per_ip = 100000
connect_burst_per_ip = 100000
[nats]
servers = ["nats://127.0.0.1:$NP"]
stream_storage = "memory"
EOF
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NP") 2>/dev/null && break; sleep 0.1; done
RUST_LOG=warn "${PIN_SRV[@]}" "$BIN" serve --config "$work/tg.toml" --insecure-no-auth >"$work/tg.log" 2>&1 &
TG_PID=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$TA/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$TA/readyz" >/dev/null || { echo "tickgate not ready:"; curl -s "http://127.0.0.1:$TA/readyz"; tail -5 "$work/tg.log"; exit 1; } >&2
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
mkdir -p "$OUT_DIR"; OUT="$OUT_DIR/benchmarks-nats-hop.jsonl"; : >"$OUT"
FAILED=0
for r in $(seq 1 "$ROUNDS"); do
  for c in $CELLS; do
    n=${c%%:*}; m=${c##*:}
    for path in DIRECT VIANATS; do
      echo "== round $r: $n subscribers x $m/s via $path" >&2
      "${PIN_LOAD[@]}" "$BIN" load --url "ws://127.0.0.1:$TP/v1/stream" --no-token --feed "$path" --symbols S0 \
        --connections "$n" --seconds "$SECS" --warmup 2 --admin "http://127.0.0.1:$TA" --server-pid "$TG_PID" \
        >"$work/load.json" 2>"$work/load.err" &
      load=$!
      # The publisher starts while the subscribers connect; the warm-up covers the rest.
      sleep 1
      # A new epoch per run (ms, rising): the publisher numbers from 1 again each time.
      "${PIN_LOAD[@]}" "$BIN" load --role publisher --target tickgate --url "ws://127.0.0.1:$TP/v1/stream" --no-token \
        --publish-url "ws://127.0.0.1:$TP/v1/publish?feed=$path&epoch=$(date +%s%3N)" \
        --feed "$path" --feed-id $([ $path = DIRECT ] && echo 100 || echo 101) --symbols S0 --rate "$m" --seconds 0 \
        >/dev/null 2>"$work/pub.err" &
      pub=$!
      n0=$(cpu "$NATS_PID")
      if ! wait "$load"; then echo "load run failed: $(tail -2 "$work/load.err")" >&2; FAILED=1; fi
      n1=$(cpu "$NATS_PID")
      kill -TERM "$pub" 2>/dev/null || true; wait "$pub" 2>/dev/null || true
      # The next run's publisher needs the feed's publisher slot: wait until the edge has
      # seen this one go.
      for _ in $(seq 200); do
        curl -s "http://127.0.0.1:$TA/metrics" | grep -q '^tickgate_publishers 0' && break; sleep 0.05
      done
      [ -s "$work/pub.err" ] && grep -i "error\|refused" "$work/pub.err" | head -2 >&2 || true
      python3 - "$work/load.json" "$path" "$n" "$m" "$r" "$n0" "$n1" "$(getconf CLK_TCK)" >>"$OUT" <<'PY'
import json, sys
f, path, n, m, r, n0, n1, hz = sys.argv[1:]
try:
    j = json.load(open(f))
except ValueError:
    sys.exit(0)
nats_cpu = (int(n1) - int(n0)) / int(hz)
recs = j.get("records") or 0
print(json.dumps({"path": path, "subscribers": int(n), "ticks_per_s": int(m), "round": int(r),
    "records_per_s": j.get("records_per_s"), "p50_us": j.get("p50_us"), "p99_us": j.get("p99_us"),
    "gaps": j.get("gap_messages"), "missing": j.get("missing_records"),
    "edge_cpu_s_per_million": j.get("server_cpu_s_per_million"),
    "nats_cpu_s_per_million": nats_cpu / (recs / 1e6) if recs else None}))
PY
    done
  done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
cells = sorted({(r["subscribers"], r["ticks_per_s"]) for r in rows}, reverse=True)
med = lambda xs: st.median(xs) if xs else float("nan")
print("\n| cell | path | records/s | p50 ms | p99 ms | edge CPU-s/M | nats-server CPU-s/M | gaps |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for n, m in cells:
    got = {}
    for path in ("DIRECT", "VIANATS"):
        rs = [r for r in rows if (r["subscribers"], r["ticks_per_s"], r["path"]) == (n, m, path)]
        # A run that delivered nothing (a failed publisher) is reported, not averaged in.
        rs = [r for r in rs if r.get("records_per_s")]
        v = lambda k: [r[k] for r in rs if r.get(k) is not None]
        got[path] = {k: med(v(k)) for k in ("records_per_s", "p50_us", "p99_us", "edge_cpu_s_per_million", "nats_cpu_s_per_million")}
        print(f"| {n} x {m}/s | {path} | {got[path]['records_per_s']:.0f} | {got[path]['p50_us']/1e3:.2f} | {got[path]['p99_us']/1e3:.2f} | "
              f"{got[path]['edge_cpu_s_per_million']:.2f} | {got[path]['nats_cpu_s_per_million']:.2f} | {sum(v('gaps'))} |")
    d, x = got["DIRECT"], got["VIANATS"]
    print(f"| {n} x {m}/s | NATS hop | | +{(x['p50_us']-d['p50_us'])/1e3:.2f} | +{(x['p99_us']-d['p99_us'])/1e3:.2f} | "
          f"x{x['edge_cpu_s_per_million']/d['edge_cpu_s_per_million']:.2f} | | |")
PY
exit $FAILED

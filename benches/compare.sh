#!/usr/bin/env bash
# tickgate against nats-server's WebSocket listener, side by side in one run: the same
# subscriber processes (`tickgate load`, tickgate protocol or NATS over WebSocket), the same
# spec §5 binary ticks (one record per NATS message), the same measurements:
# delivered records/s, latency against each tick's *scheduled* time (open loop), seq gaps,
# server CPU-seconds per million deliveries (/proc/<pid>/stat of the server, before and
# after the window, divided by the records the subscribers received) and server memory per
# connection (/proc/<pid>/status VmRSS before and after connecting).
#
#   benches/compare.sh [--quick] [--publisher synthetic|tickgate-publish] [--seconds S] [--cells "N:M:K:PER ..."]
#                      [--write-delay-us D] [--ramp-only]
#
# --ramp-only runs only the ramp (no grid).
# --cells runs only the given cells (N subscribers, M ticks/s, K instruments, PER instruments
# per subscriber, 0 = all, and optionally RATE: throttled subscriptions, protocol v1.1
# `max_rate`, tickgate only) and no ramp, e.g. --cells "10000:100:1:0 1000:10000:100:10 1000:1000:1:0:20".
# Grid: subscribers N in {100, 1k, 5k, 10k} x M in {100, 1k, 10k} ticks/s on one instrument,
# plus 100 instruments at 10k ticks/s with 10 instruments per subscriber (N in {1k, 10k}),
# plus a ramp (M = 1,000 ticks/s on one instrument, N from 100 in steps of x1.25-x1.5:
# RAMP_STEPS="100 150 200 ..." to change them) to the highest load
# each server holds with p99 < 10 ms, zero gaps and no failed or closed subscriber.
# Throttled cell (in the grid and in --quick): 1,000 subscribers with max_rate 20/s on one
# instrument at 1,000 ticks/s, tickgate only (NATS has no per-subscriber throttle): its
# server CPU in cores and its latency are what the table's "throttled" section shows.
# --quick: three small cells (100 x 1k/s, 1k x 100/s, 100 x 1k/s over 100 instruments) plus
# the throttled cell, and no ramp, in well under 2 minutes (after the release build); it exits non-zero on gaps or
# errors only, never on timing. The full run takes 5-6 minutes on a 2-core machine (cells
# asking more than MAX_DEMAND deliveries/s are not run; each load run is cut at RUN_TIMEOUT);
# it exits non-zero on errors (a load run that failed), while gaps in overloaded cells are
# results and go to the table.
#
# Publisher (--publisher or PUBLISHER=):
#   tickgate-publish (default) - both servers are fed by the same publisher, `tickgate load
#     --role publisher` with the same open-loop schedule (ts_event_ns = scheduled time):
#     into tickgate's GET /v1/publish?feed=CMP (a `source = "publish"` feed; tickgate
#     assigns the seqs) and into NATS with PUB over TCP. It starts once the subscribers are live.
#   synthetic - tickgate is fed by its own synthetic source instead (a feed file with rate M
#     over the cell's instruments, also open loop), which runs from the server's start.
#
# --write-delay-us D: run tickgate with `engine.write_delay_us = D` (default 0: every
# connection is written as soon as it has something, tickgate's default). It is recorded
# in every result line and in the table's header. SERVERS=tickgate runs only tickgate (an
# A/B of two tickgate settings).
#
# Cores: with 4+ cores the servers get the first half and the load generator the second
# half (taskset); with 2-3 cores the servers get core 0 and the load generator the rest;
# with 1 core, or PIN=0, nothing is pinned. Only the server under test has subscribers and a publisher;
# the other one is idle (with --publisher synthetic, tickgate's feed keeps generating).
#
# Output: docs/benchmarks-compare.jsonl (one line per server and cell) and
# docs/benchmarks-compare.md (the table with tickgate/NATS ratios). OUT_DIR=... to write elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
PUBLISHER=${PUBLISHER:-tickgate-publish}
SECS=""
CELLS=""
WRITE_DELAY_US=${WRITE_DELAY_US:-0}
RAMP_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --publisher) PUBLISHER=$2; shift ;;
    --publisher=*) PUBLISHER=${1#*=} ;;
    --seconds) SECS=$2; shift ;;
    --cells) CELLS=$2; shift ;;
    --write-delay-us) WRITE_DELAY_US=$2; shift ;;
    --ramp-only) RAMP_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case $WRITE_DELAY_US in ''|*[!0-9]*) echo "--write-delay-us takes microseconds (0-100000)" >&2; exit 2 ;; esac
case $PUBLISHER in synthetic|tickgate-publish) ;; *) echo "--publisher synthetic|tickgate-publish" >&2; exit 2 ;; esac
command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install -y nats-server" >&2; exit 2; }
for t in jq python3 curl; do command -v $t >/dev/null || { echo "$t is missing" >&2; exit 2; }; done

if [ "$QUICK" = 1 ]; then SECS=${SECS:-3}; WARMUP=1; else SECS=${SECS:-5}; WARMUP=2; fi
OUT_DIR=${OUT_DIR:-docs}
# Cells asking for more deliveries/s than this are not run (0: no cap). One core of load
# generator takes in 1-10M records/s from tickgate (depending on batch size) and far fewer
# NATS messages; at 50-100M/s asked (5k-10k x 10k/s) a 2-core machine only measures a
# pile-up (gigabytes of socket buffers, SYN cookies, results that differ 100x from run to run).
MAX_DEMAND=${MAX_DEMAND:-$((5000000 * $(nproc)))}
RUN_TIMEOUT=${RUN_TIMEOUT:-90}
RAMP_STEPS=${RAMP_STEPS:-"100 150 200 250 300 400 500 600 800 1000 1250 1600 2000 2500 3200 4000 5000 6400 8000 10000 12800"}
TG_PORT=${TG_PORT:-9380}; TG_ADMIN=${TG_ADMIN:-9381}; NATS_PORT=${NATS_PORT:-9382}; NATS_WS=${NATS_WS:-9383}
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# TICKGATE_BIN=path: run that binary (e.g. an older build, for an A/B) instead of building.
if [ -n "${TICKGATE_BIN:-}" ]; then BIN=$TICKGATE_BIN; else cargo build --release -q; BIN=$PWD/target/release/tickgate; fi
work=$(mktemp -d)
TG_PID=""; NATS_PID=""; PUB_PID=""
stop() { if [ -n "$1" ]; then kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; fi; }
trap 'stop "$PUB_PID"; stop "$TG_PID"; stop "$NATS_PID"; rm -rf "$work"' EXIT

cores=$(nproc)
if [ "$cores" -ge 4 ]; then SRV_CORES="0-$((cores / 2 - 1))"; LOAD_CORES="$((cores / 2))-$((cores - 1))"
elif [ "$cores" -eq 3 ]; then SRV_CORES=0; LOAD_CORES="1-2"
elif [ "$cores" -eq 2 ]; then SRV_CORES=0; LOAD_CORES=1
else SRV_CORES=""; LOAD_CORES=""; fi
command -v taskset >/dev/null || { SRV_CORES=""; LOAD_CORES=""; }
# PIN=0: no pinning at all (servers and load generator share every core as the scheduler likes).
if [ "${PIN:-1}" = 0 ]; then SRV_CORES=""; LOAD_CORES=""; fi
# Command prefixes (taskset execs its command, so $! is the server's own pid).
PIN_SRV=(); PIN_LOAD=()
[ -n "$SRV_CORES" ] && PIN_SRV=(taskset -c "$SRV_CORES") && PIN_LOAD=(taskset -c "$LOAD_CORES")

symbols() { local k=$1 s="S0" i; for ((i = 1; i < k; i++)); do s="$s,S$i"; done; echo "$s"; }

# The tickgate feed of a cell: K instruments. Synthetic at RATE ticks/s, or fed by the publisher.
write_feed() {
  local k=$1 rate=$2 syms
  syms=$(symbols "$k" | sed 's/\([^,]*\)/"\1"/g')
  mkdir -p "$work/feeds"; rm -f "$work/feeds"/*.toml
  if [ "$PUBLISHER" = synthetic ]; then
    printf 'name = "CMP"\nid = 100\nsource = "synthetic"\npolicy = "disconnect"\nsymbols = [%s]\n\n[synthetic]\nseed = 1\nrate_per_s = %s.0\nquote_ratio = 0.75\n' \
      "$syms" "$rate" > "$work/feeds/cmp.toml"
  else
    # MERGER: the source kind of a feed that /v1/publish writes into (check the name the
    # publish endpoint's feed config uses).
    printf 'name = "CMP"\nid = 100\nsource = "publish"\npolicy = "disconnect"\nsymbols = [%s]\n' "$syms" > "$work/feeds/cmp.toml"
  fi
}

start_servers() {
  local k=$1 rate=$2
  stop "$TG_PID"; stop "$NATS_PID"
  write_feed "$k" "$rate"
  cat > "$work/tg.toml" <<EOF
listen = "127.0.0.1:$TG_PORT"
admin_listen = "127.0.0.1:$TG_ADMIN"
feeds_dir = "$work/feeds"

[engine]
write_delay_us = $WRITE_DELAY_US

[limits]
max_outbound_bytes = 1048576
max_connections = 100000
max_connections_per_ip = 100000
max_connections_per_subject = 100000
connect_rate_per_ip = 100000
connect_burst_per_ip = 100000
EOF
  RUST_LOG=warn "${PIN_SRV[@]}" "$BIN" serve --config "$work/tg.toml" --insecure-no-auth >"$work/tg.log" 2>&1 &
  TG_PID=$!
  cat > "$work/nats.conf" <<EOF
listen: "127.0.0.1:$NATS_PORT"
max_payload: 1MB
# The same outbound budget per connection as tickgate's limits.max_outbound_bytes (1 MiB):
# a subscriber further behind is a slow consumer and is disconnected on both servers.
max_pending: 1MB
websocket { listen: "127.0.0.1:$NATS_WS", no_tls: true }
EOF
  "${PIN_SRV[@]}" nats-server -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
  NATS_PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null || { echo "tickgate did not start:"; cat "$work/tg.log"; exit 1; } >&2
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_WS") 2>/dev/null && break; sleep 0.1; done
}

start_publisher() {
  local server=$1 k=$2 rate=$3 target url
  if [ "$server" = nats ]; then target=(--target nats --nats-url "nats://127.0.0.1:$NATS_PORT")
  # tickgate numbers the ticks itself (seq 0): each cell's publisher is a new process
  # whose own numbering would restart at 1, which the feed refuses as seq_backwards.
  else target=(--target tickgate --url "ws://127.0.0.1:$TG_PORT/v1/stream" --no-token --server-seq); fi
  : > "$work/pub.json"
  "${PIN_LOAD[@]}" "$BIN" load --role publisher "${target[@]}" --feed CMP --feed-id 100 \
    --symbols "$(symbols "$k")" --rate "$rate" --seconds 0 >"$work/pub.json" 2>"$work/pub.err" &
  PUB_PID=$!
}

# Stops the cell's publisher (SIGTERM: it confirms what it sent, prints its summary, exits)
# and leaves that summary in PUB_SUMMARY. Runs in this shell, not in $( ): `wait` needs
# the publisher to be this shell's child.
stop_publisher() {
  PUB_SUMMARY=null
  [ -n "$PUB_PID" ] || return 0
  kill -TERM "$PUB_PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$PUB_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PUB_PID" 2>/dev/null || true
  wait "$PUB_PID" 2>/dev/null || true
  PUB_PID=""
  PUB_SUMMARY=$(jq -c . "$work/pub.json" 2>/dev/null) || PUB_SUMMARY=""
  if [ -z "$PUB_SUMMARY" ]; then echo "publisher failed:" >&2; tail -3 "$work/pub.err" >&2; PUB_SUMMARY=null; fi
}

RESULTS="$work/results.jsonl"; : > "$RESULTS"
GAPS=0; ERRORS=0
# run_cell SERVER N RATE K PER PHASE -> appends one JSON line, prints a short line; returns 1
# when the cell is not clean (gaps, failed or closed subscribers, p99 >= 10 ms).
run_cell() {
  local server=$1 n=$2 rate=$3 k=$4 per=$5 phase=$6 max_rate=${7:-0} procs=1 out pub=null feeder
  if [ "$n" -ge 5000 ]; then procs=$((n / 2500)); fi
  local args=(--feed CMP --symbols "$(symbols "$k")" --connections "$n" --seconds "$SECS" --warmup "$WARMUP"
              --processes "$procs" --connect-concurrency 256)
  if [ "$per" -gt 0 ]; then args+=(--symbols-per-conn "$per"); fi
  if [ "$max_rate" != 0 ]; then args+=(--max-rate "$max_rate"); fi
  if [ "$server" = tickgate ]; then
    args+=(--url "ws://127.0.0.1:$TG_PORT/v1/stream" --no-token --admin "http://127.0.0.1:$TG_ADMIN" --server-pid "$TG_PID")
    feeder=$([ "$PUBLISHER" = synthetic ] && echo synthetic || echo tickgate-publish)
  else
    args+=(--target nats --nats-url "ws://127.0.0.1:$NATS_WS" --server-pid "$NATS_PID")
    feeder=nats-publisher
  fi
  local demand=$((n * rate * (per > 0 ? per : k) / k)) status=ok
  # A throttled subscriber takes at most max_rate updates per instrument (each carrying
  # the interval's trades): far below the tick rate, so the demand cap does not apply.
  if [ "$max_rate" != 0 ]; then demand=0; fi
  if [ "$MAX_DEMAND" -gt 0 ] && [ "$demand" -gt "$MAX_DEMAND" ]; then
    # Beyond what this machine's load generator can take in: not run (see MAX_DEMAND).
    out=null; status=skipped
  else
    timeout "$RUN_TIMEOUT" env -u TICKGATE_TOKEN -u TICKGATE_CLIENT_SECRET "${PIN_LOAD[@]}" "$BIN" load "${args[@]}" \
      >"$work/load.out" 2>"$work/load.err" &
    local lp=$! rc=0
    # The publisher starts once every subscriber is live (during the warm-up), so that
    # connecting does not happen under load; tickgate's synthetic source cannot wait.
    if [ "$feeder" != synthetic ]; then
      while kill -0 "$lp" 2>/dev/null && ! grep -qs "subscribers live" "$work/load.err"; do sleep 0.05; done
      start_publisher "$server" "$k" "$rate"
    fi
    wait "$lp" || rc=$?
    if [ "$rc" = 124 ]; then
      out=null; status=timed_out; echo "  $server: no result within ${RUN_TIMEOUT} s (overloaded)" >&2
    elif [ "$rc" != 0 ] || ! out=$(jq -c . "$work/load.out" 2>/dev/null) || [ -z "$out" ]; then
      out=null; status=failed; echo "load run failed ($server N=$n M=$rate K=$k):" >&2; tail -5 "$work/load.err" >&2
    fi
  fi
  if [ "$feeder" != synthetic ]; then stop_publisher; pub=$PUB_SUMMARY; fi
  jq -cn --arg server "$server" --arg phase "$phase" --arg feeder "$feeder" --argjson n "$n" --argjson rate "$rate" \
     --argjson k "$k" --argjson per "$per" --argjson procs "$procs" --argjson summary "$out" --argjson publisher "$pub" \
     --arg status "$status" --argjson demand "$demand" --argjson wd "$WRITE_DELAY_US" --argjson mr "$max_rate" \
     '{server: $server, phase: $phase, status: $status, subscribers: $n, ticks_per_s: $rate, instruments: $k,
       symbols_per_subscriber: (if $per > 0 then $per else $k end), deliveries_per_s_asked: $demand, processes: $procs,
       max_rate: (if $mr == 0 then null else $mr end),
       tickgate_write_delay_us: (if $server == "tickgate" then $wd else null end),
       feeder: $feeder, summary: $summary, publisher: $publisher}' >> "$RESULTS"
  case $status in
    skipped) echo "  $server: skipped ($demand deliveries/s asked, MAX_DEMAND=$MAX_DEMAND)"; return 3 ;;
    timed_out) [ "$QUICK" = 1 ] && return 2; return 3 ;;
    failed) echo "  $server: FAILED"; return 2 ;;
  esac
  jq -r --arg s "$server" '"  \($s): \(.records_per_s | floor) rec/s  p50 \(.p50_us)us  p99 \(.p99_us)us  max \(.max_us)us  gaps \(.gap_messages + .anomalies)  failed \(.failed)  closed \(.early_closes | length)  cpu/M \(.server_cpu_s_per_million // "-")"' <<<"$out"
  jq -e '.gap_messages + .anomalies + .missing_records == 0 and .failed == 0 and (.early_closes | length) == 0 and .p99_us < 10000' \
    <<<"$out" >/dev/null
}

cell() { # N RATE K PER [MAX_RATE]
  local max_rate=${5:-0} servers=${SERVERS:-tickgate nats}
  echo "cell: N=$1 M=$2/s K=$3 per-subscriber=$([ "$4" -gt 0 ] && echo "$4" || echo "$3")$([ "$max_rate" != 0 ] && echo " max_rate=$max_rate/s")"
  # NATS has no per-subscriber throttle: a throttled cell is tickgate's alone.
  if [ "$max_rate" != 0 ]; then servers=tickgate; fi
  for server in $servers; do
    local rc=0
    run_cell "$server" "$1" "$2" "$3" "$4" grid "$max_rate" || rc=$?
    if [ "$rc" = 2 ]; then ERRORS=$((ERRORS + 1)); fi
    if [ "$rc" = 1 ] && [ "$(tail -1 "$RESULTS" | jq '.summary | .gap_messages + .anomalies + .missing_records + .failed + (.early_closes | length)')" != 0 ]; then
      GAPS=$((GAPS + 1))
    fi
  done
}

started=$(date +%s)
if [ -n "$CELLS" ]; then
  for c in $CELLS; do
    IFS=: read -r n m k per mr <<<"$c"
    start_servers "$k" "$m"
    cell "$n" "$m" "$k" "${per:-0}" "${mr:-0}"
  done
elif [ "$QUICK" = 1 ]; then
  start_servers 1 1000
  cell 100 1000 1 0
  start_servers 1 100
  cell 1000 100 1 0
  start_servers 100 1000
  cell 100 1000 100 10
  start_servers 1 1000
  cell 1000 1000 1 0 20
else
  # Ramp first: 1,000 ticks/s on one instrument, N growing by a quarter to a half per step
  # until a server no longer holds it. It is the most latency-sensitive part, and the
  # grid's overloaded cells leave the machine disturbed for a while (gigabytes of socket
  # buffers to reclaim): ramp steps run after them saw 100 ms-1 s stalls.
  start_servers 1 1000
  for server in tickgate nats; do
    for n in $RAMP_STEPS; do
      echo "ramp $server: N=$n"
      rc=0; run_cell "$server" "$n" 1000 1 0 ramp || rc=$?
      # One retry: on a shared machine a single stall should not end the ramp.
      if [ "$rc" = 1 ]; then echo "ramp $server: N=$n again"; rc=0; run_cell "$server" "$n" 1000 1 0 ramp || rc=$?; fi
      if [ "$rc" = 2 ]; then ERRORS=$((ERRORS + 1)); fi
      if [ "$rc" != 0 ]; then break; fi
    done
  done
  if [ "$RAMP_ONLY" = 0 ]; then
    # Fresh servers for every cell: a server process that served an overloaded cell keeps
    # (and later returns) gigabytes, which made the next cell's RSS per connection
    # negative and its latency depend on the cell before.
    for rate in 100 1000 10000; do
      for n in 100 1000 5000 10000; do start_servers 1 "$rate"; cell "$n" "$rate" 1 0; done
    done
    for n in 1000 10000; do start_servers 100 10000; cell "$n" 10000 100 10; done
    start_servers 1 1000
    cell 1000 1000 1 0 20
  fi
fi
elapsed=$(( $(date +%s) - started ))

mkdir -p "$OUT_DIR"
cp "$RESULTS" "$OUT_DIR/benchmarks-compare.jsonl"
python3 - "$RESULTS" "$OUT_DIR/benchmarks-compare.md" "$QUICK" "$PUBLISHER" "$SECS" "$WARMUP" "$elapsed" \
  "${SRV_CORES:-none}" "${LOAD_CORES:-none}" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(nats-server --version 2>/dev/null | head -1)" "$WRITE_DELAY_US" <<'PY'
import json, sys, datetime, os
res, md, quick, publisher, secs, warmup, elapsed, srv, load, commit, natsv, wdelay = sys.argv[1:]
rows = [json.loads(l) for l in open(res) if l.strip()]
cpu = "?"
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass

def fmt_us(v):
    if v is None: return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"
def fmt_rate(v): return "-" if v is None else f"{v:,.0f}"
def fmt_num(v, d=2): return "-" if v is None else f"{v:.{d}f}"
def fmt_kib(v): return "-" if v is None else f"{v / 1024:.1f} KiB"
def cpu_share(s):
    c = s.get("client_cpu_s")
    return None if c is None or not s["seconds"] else c / s["seconds"]
def fmt_pct(v): return "-" if v is None else f"{v * 100:.0f} %"
def drops(s):
    d = (s or {}).get("client_drops", 0)
    return f" ({d:,} dropped by the load generator)" if d else ""
def status(r):
    return {"skipped": "not run (demand)", "timed_out": "timed out", "failed": "FAILED"}.get(r.get("status"), "-")
def gaps(s): return None if s is None else s["gap_messages"] + s["anomalies"]
def pair(t, n, f, ratio=True):
    a = f(t) if t is not None else "-"
    b = f(n) if n is not None else "-"
    r = f" ({t / n:.3g}×)" if ratio and isinstance(t, (int, float)) and isinstance(n, (int, float)) and n else ""
    return f"{a} / {b}{r}"

grid = {}
for r in rows:
    if r["phase"] != "grid": continue
    key = (r["instruments"], r["ticks_per_s"], r["subscribers"], r["symbols_per_subscriber"], r.get("max_rate") or 0)
    grid.setdefault(key, {})[r["server"]] = r
out = []
out.append("# tickgate vs nats-server (WebSocket): side by side\n")
out.append("Generated by `benches/compare.sh%s` on %s UTC (commit %s). Do not edit by hand: rerun the script.\n"
           % ((" --quick" if quick == "1" else "") + (f" --write-delay-us {wdelay}" if wdelay != "0" else ""), datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), commit))
out.append(f"- machine: {os.cpu_count()} cores ({cpu}); servers pinned to cores `{srv}`, load generator to `{load}`")
out.append(f"- {natsv}, WebSocket listener on loopback without TLS; tickgate: `serve --insecure-no-auth`, release build, "
           + (f"`engine.write_delay_us = {wdelay}` (at most one write per connection per {int(wdelay) / 1000:g} ms)" if wdelay != "0"
              else "`engine.write_delay_us = 0` (the default: write as soon as there is something)"))
feed = ("tickgate's own synthetic source (same open-loop schedule, rate and 3:1 quote:trade mix) for tickgate; "
        "`tickgate load --role publisher --target nats` (PUB over TCP) for NATS") if publisher == "synthetic" else \
       "the same `tickgate load --role publisher` for both (tickgate: `/v1/publish`; NATS: PUB over TCP)"
out.append(f"- ticks: spec §5 binary records (quote 72 B, trade 56 B), one record per NATS message on `md.CMP.<SYMBOL>`; fed by {feed}")
out.append(f"- subscribers: the same `tickgate load` processes for both (tickgate protocol / NATS over WebSocket with async-nats), "
           f"{warmup} s warm-up, {secs} s measured; latency = receive time − the tick's scheduled time (open loop, HDR histogram, merged exactly across processes)")
out.append("- CPU s/M: server CPU seconds (/proc/PID/stat) in the window per million records the subscribers received; "
           "RSS/conn: growth of the server's VmRSS from before connecting to all subscribers live, per subscriber")
out.append("- gaps: tickgate `gap` messages + silent seq gaps; NATS: seq jumps/repeats per subject")
out.append("- load generator CPU: CPU of all subscriber processes in the window, in cores (100 % = one core busy): "
           "near the cores it has, the load generator and not the server bounds that cell\n")
out.append("- not run (demand): the cell asks for more deliveries/s than MAX_DEMAND (default 5M × cores: 10M on 2 cores); "
           "timed out: no summary within RUN_TIMEOUT (the load generator could not even connect under that load)\n")
out.append("Each cell: **tickgate / NATS (tickgate÷NATS)**. Lower is better for latency, CPU and memory; higher for records/s.\n")
out.append("| subscribers | ticks/s | instruments (per sub) | delivered records/s | p50 | p99 | p99.9 | max | gaps | failed+closed | CPU s/M | RSS/conn | load generator CPU |")
out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(grid):
    k, m, n, per, mr = key
    rt, ra = grid[key].get("tickgate") or {}, grid[key].get("nats") or {}
    t, a = rt.get("summary"), ra.get("summary")
    g = lambda s, f: None if s is None else f(s)
    rate = lambda s, r: fmt_rate(s["records_per_s"]) if s else status(r)
    out.append("| " + " | ".join([
        f"{n:,}" + (f" (max_rate {mr:g}/s)" if mr else ""), f"{m:,}", f"{k} ({per})",
        f"{rate(t, rt)} / {rate(a, ra)}" + (f" ({t['records_per_s'] / a['records_per_s']:.3g}×)" if t and a and a["records_per_s"] else ""),
        pair(g(t, lambda s: s["p50_us"]), g(a, lambda s: s["p50_us"]), fmt_us),
        pair(g(t, lambda s: s["p99_us"]), g(a, lambda s: s["p99_us"]), fmt_us),
        pair(g(t, lambda s: s["p999_us"]), g(a, lambda s: s["p999_us"]), fmt_us),
        pair(g(t, lambda s: s["max_us"]), g(a, lambda s: s["max_us"]), fmt_us),
        pair(gaps(t), gaps(a), str, ratio=False) + drops(a),
        pair(g(t, lambda s: s["failed"] + len(s["early_closes"])), g(a, lambda s: s["failed"] + len(s["early_closes"])), str, ratio=False),
        pair(g(t, lambda s: s.get("server_cpu_s_per_million")), g(a, lambda s: s.get("server_cpu_s_per_million")), fmt_num),
        pair(g(t, lambda s: s.get("server_rss_per_conn_bytes")), g(a, lambda s: s.get("server_rss_per_conn_bytes")), fmt_kib),
        pair(g(t, cpu_share), g(a, cpu_share), fmt_pct, ratio=False),
    ]) + " |")
throttled = [r for r in rows if r["phase"] == "grid" and r.get("max_rate") and r["summary"]]
if throttled:
    out.append("\n## Throttled subscriptions (protocol v1.1 `max_rate`)\n")
    out.append("Server cores = server CPU seconds in the window ÷ the window; the same cell unthrottled (tickgate, NATS) "
               "from this run beside it when it ran. Targets (#16): at most 0.25 of a core, p99 at most 60 ms, every trade delivered (0 gaps).\n")
    out.append("| cell | server cores | p99 | records/s | gaps | unthrottled tickgate: cores, p99 | NATS: cores, p99 |")
    out.append("|---|---|---|---|---|---|---|")
    def cores(s):
        c = s.get("server_cpu_s")
        return None if c is None or not s["seconds"] else c / s["seconds"]
    for r in throttled:
        s = r["summary"]
        plain = grid.get((r["instruments"], r["ticks_per_s"], r["subscribers"], r["symbols_per_subscriber"], 0), {})
        def peer(x):
            ps = (plain.get(x) or {}).get("summary")
            return "-" if ps is None else f"{fmt_num(cores(ps))}, {fmt_us(ps['p99_us'])}"
        out.append(f"| {r['subscribers']:,} × {r['ticks_per_s']:,}/s, max_rate {r['max_rate']:g}/s | {fmt_num(cores(s))} | {fmt_us(s['p99_us'])} | "
                   f"{fmt_rate(s['records_per_s'])} | {gaps(s)} | {peer('tickgate')} | {peer('nats')} |")
ramp = [r for r in rows if r["phase"] == "ramp"]
if ramp:
    out.append("\n## Ramp: highest load held (p99 < 10 ms, zero gaps, no failed or closed subscriber)\n")
    out.append("1,000 ticks/s on one instrument, subscribers from 100 in steps of ×1.25-×1.5 (at most 12,800, and MAX_DEMAND); "
               "a step that fails is run once more, and the ramp ends at the first step that fails twice.\n")
    out.append("| server | highest subscribers held | deliveries/s | p99 there | first failing step |")
    out.append("|---|---|---|---|---|")
    held_rate = {}
    for server in ("tickgate", "nats"):
        steps = [r for r in ramp if r["server"] == server]
        ok = [r for r in steps if r["summary"] and gaps(r["summary"]) == 0 and r["summary"]["failed"] == 0
              and not r["summary"]["early_closes"] and r["summary"]["missing_records"] == 0 and r["summary"]["p99_us"] < 10000]
        best = max(ok, key=lambda r: r["subscribers"]) if ok else None
        held = {r["subscribers"] for r in ok}
        bad = [r for r in steps if r["subscribers"] not in held]
        why = "-"
        if bad:
            s = bad[0]["summary"]
            why = f"N={bad[0]['subscribers']:,}: " + (status(bad[0]) if s is None else
                  f"p99 {fmt_us(s['p99_us'])}, gaps {gaps(s)}, failed {s['failed']}, closed {len(s['early_closes'])}")
        out.append(f"| {server} | {best['subscribers']:,} | {fmt_rate(best['summary']['records_per_s'])} | {fmt_us(best['summary']['p99_us'])} | {why} |"
                   if best else f"| {server} | none | - | - | {why} |")
        if best:
            held_rate[server] = best["summary"]["records_per_s"]
    if len(held_rate) == 2 and held_rate["nats"]:
        out.append(f"\nHighest load held, tickgate ÷ NATS: **{held_rate['tickgate'] / held_rate['nats']:.2f}×** "
                   f"({held_rate['tickgate']:,.0f} vs {held_rate['nats']:,.0f} deliveries/s).")
out.append("\nRerun: `benches/compare.sh --quick` (three small cells, under 2 minutes after the build), `benches/compare.sh` "
           "(the full grid and the ramp), `--cells \"N:M:K:PER ...\"` for chosen cells; `--publisher synthetic` feeds tickgate "
           "from its own synthetic source instead of the shared publisher.")
out.append(f"\nRun time: {elapsed} s. Raw results: `benchmarks-compare.jsonl` next to this file (one JSON line per server and cell, "
           "with the full load and publisher summaries).")
open(md, "w").write("\n".join(out) + "\n")
PY
echo "wrote $OUT_DIR/benchmarks-compare.md and $OUT_DIR/benchmarks-compare.jsonl (${elapsed} s)"
if [ "$ERRORS" -gt 0 ]; then echo "$ERRORS load runs failed" >&2; exit 1; fi
if [ "$QUICK" = 1 ] && [ "$GAPS" -gt 0 ]; then echo "$GAPS runs had gaps or lost subscribers" >&2; exit 1; fi
exit 0

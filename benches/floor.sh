#!/usr/bin/env bash
# The per-write floor (issue #16 item 5): what one socket write costs tickgate, against
# what it costs a bare epoll writer of the same frames to the same readers, in the same run.
#
#   benches/floor.sh [--cells "N:M ..."] [--seconds S] [--runs R]
#
# For each cell (N subscribers x M ticks/s on one instrument; default cells
# "1000:100 100:1000 1000:1000", 5 s measured after 2 s of warm-up, R = 1 run) it starts,
# one after the other on the same core (core 0; the load generator on core 1):
#   tickgate - `serve --insecure-no-auth`, fed by its own synthetic source (M ticks/s,
#     open loop, ts_event_ns = the scheduled time; compare.sh's `--publisher synthetic`);
#   floor - `tickgate load --role floor`: one thread, one epoll, one timerfd; per tick one
#     frame (a one-record batch) encoded once and written to every subscriber, one write
#     per connection per tick (src/load/floor.rs);
# and loads both with the same `tickgate load --role subscriber --no-token` (N
# connections). Inside the load generator's measured window the script reads, twice, the
# server's CPU time and its write counter from one scrape each: tickgate's /metrics on its
# admin port (`process_cpu_seconds_total`, `tickgate_socket_flushes_total`: one per writer
# wake-up that wrote), the floor's `GET /counters` on its port (`cpu_s`, `writes`: write
# syscalls). CPU µs per write = CPU seconds / writes between the two; the ratio tickgate/floor is the gap #16
# wants at <= 1.3x. With R > 1 every cell runs R times (tickgate then floor each time) and
# the table shows medians.
#
# Output: the markdown table on stdout; one JSON line per server, cell and run in
# docs/benchmarks-floor.jsonl (OUT_DIR=... elsewhere). TICKGATE_BIN=path skips the build.
# It fails only on a load run that failed, never on timing.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS="1000:100 100:1000 1000:1000"; SECS=5; RUNS=1; WARMUP=2
source benches/lib.sh
bench_args "cells=CELLS seconds=SECS runs=RUNS" "$@"
case "$SECS$RUNS" in *[!0-9]*) echo "--seconds and --runs take whole numbers" >&2; exit 2 ;; esac
[ "$SECS" -ge 2 ] && [ "$RUNS" -ge 1 ] || { echo "--seconds >= 2, --runs >= 1" >&2; exit 2; }
bench_setup curl jq python3
work=$(mktemp -d)
SRV_PID=""; LOAD_PID=""
stop() { if [ -n "$1" ]; then kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; fi; }
trap '{ stop "$LOAD_PID"; stop "$SRV_PID"; } 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$OUT_DIR" "$work/feeds"; OUT="$OUT_DIR/benchmarks-floor.jsonl"; : >"$OUT"
TCK=$(getconf CLK_TCK)

# start_server tickgate|floor RATE: the server on core 0 at RATE ticks/s on S0; sets
# SRV_PID, PORT and COUNTERS (the URL its write counter is read from).
start_server() {
  local kind=$1 rate=$2 admin
  PORT=$(free_port)
  if [ "$kind" = tickgate ]; then
    admin=$(free_port)
    printf 'name = "CMP"\nid = 100\nsource = "synthetic"\npolicy = "disconnect"\nsymbols = ["S0"]\n\n[synthetic]\nseed = 1\nrate_per_s = %s.0\nquote_ratio = 0.75\n' \
      "$rate" >"$work/feeds/cmp.toml"
    { printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nfeeds_dir = "%s"\n\n' "$PORT" "$admin" "$work/feeds"
      bench_limits; } >"$work/tg.toml"
    RUST_LOG=warn "${PIN0[@]}" "$BIN" serve --config "$work/tg.toml" --insecure-no-auth >"$work/srv.log" 2>&1 &
    SRV_PID=$!
    COUNTERS="http://127.0.0.1:$admin/metrics"
    wait_ready "http://127.0.0.1:$admin" || { echo "tickgate did not start: $(tail -3 "$work/srv.log")" >&2; exit 1; }
  else
    "${PIN0[@]}" "$BIN" load --role floor --listen "127.0.0.1:$PORT" --feed CMP --feed-id 100 --symbols S0 \
      --rate "$rate" --seconds 0 >"$work/floor.json" 2>"$work/srv.log" &
    SRV_PID=$!
    COUNTERS="http://127.0.0.1:$PORT/counters"
    wait_port "$PORT" || { echo "floor did not start: $(tail -3 "$work/srv.log")" >&2; exit 1; }
  fi
}

# counters KIND: "writes frames bytes cpu_seconds" so far, from one scrape. The CPU there
# is only a cross-check (scrape_cpu_s): tickgate's `process_cpu_seconds_total` counts whole
# seconds, so the window's CPU comes from /proc/PID/stat for both servers, read right
# after the first scrape and right before the second.
counters() {
  if [ "$1" = tickgate ]; then
    curl -sf "$COUNTERS" | awk '
      /^tickgate_socket_flushes_total / {w += $2} /^tickgate_frames_sent_total / {f += $2}
      /^tickgate_bytes_sent_total / {b += $2} /^process_cpu_seconds_total / {c = $2}
      END {printf "%d %d %d %s\n", w, f, b, c}'
  else
    curl -sf "$COUNTERS" | jq -r '"\(.writes) \(.frames) \(.bytes) \(.cpu_s)"'
  fi
}

# run_one KIND N RATE RUN: one server, one load run; appends a JSON line to $OUT.
run_one() {
  local kind=$1 n=$2 rate=$3 run=$4 extra=() p0 p1 t0 t1 w0 f0 b0 s0 w1 f1 b1 s1 rc=0 summary floor=null
  start_server "$kind" "$rate"
  [ "$kind" = tickgate ] && extra=(--admin "${COUNTERS%/metrics}")
  timeout 120 env -u TICKGATE_TOKEN "${PIN1[@]}" "$BIN" load --url "ws://127.0.0.1:$PORT/v1/stream" --no-token \
    --feed CMP --symbols S0 --connections "$n" --seconds "$SECS" --warmup "$WARMUP" --server-pid "$SRV_PID" \
    "${extra[@]}" >"$work/load.json" 2>"$work/load.err" &
  LOAD_PID=$!
  while kill -0 "$LOAD_PID" 2>/dev/null && ! grep -qs '^measuring' "$work/load.err"; do sleep 0.02; done
  # The script's window sits inside the load generator's: it starts 0.2 s after and ends
  # 0.3 s before, so neither the connects nor the closes are in it.
  sleep 0.2
  read -r w0 f0 b0 s0 < <(counters "$kind"); p0=$(cpu "$SRV_PID"); t0=$(date +%s.%N)
  sleep "$(python3 -c "print($SECS - 0.5)")"
  p1=$(cpu "$SRV_PID"); t1=$(date +%s.%N); read -r w1 f1 b1 s1 < <(counters "$kind")
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  stop "$SRV_PID"; SRV_PID=""
  if [ "$rc" != 0 ] || ! summary=$(jq -c . "$work/load.json" 2>/dev/null) || [ -z "$summary" ]; then
    echo "load run failed ($kind N=$n M=$rate, rc $rc): $(tail -3 "$work/load.err")" >&2
    return 1
  fi
  [ "$kind" = floor ] && floor=$(jq -c . "$work/floor.json" 2>/dev/null || echo null)
  jq -cn --arg server "$kind" --argjson n "$n" --argjson rate "$rate" --argjson run "$run" \
     --argjson secs "$(python3 -c "print($t1 - $t0)")" --argjson cpu "$(python3 -c "print(($p1 - $p0) / $TCK)")" \
     --argjson scpu "$(python3 -c "print(round(${s1:-0} - ${s0:-0}, 3))")" \
     --argjson writes "$((${w1:-0} - ${w0:-0}))" --argjson frames "$((${f1:-0} - ${f0:-0}))" --argjson bytes "$((${b1:-0} - ${b0:-0}))" \
     --argjson summary "$summary" --argjson floor "${floor:-null}" \
     '{server: $server, subscribers: $n, ticks_per_s: $rate, run: $run,
       window: {seconds: $secs, cpu_s: $cpu, scrape_cpu_s: $scpu, writes: $writes, frames: $frames, bytes: $bytes},
       cpu_us_per_write: (if $writes > 0 then $cpu * 1e6 / $writes else null end),
       cpu_us_per_frame: (if $frames > 0 then $cpu * 1e6 / $frames else null end),
       summary: $summary, floor_summary: $floor}' >>"$OUT"
  tail -1 "$OUT" | jq -r '"  \(.server): \(.summary.records_per_s | floor) rec/s  p50 \(.summary.p50_us) us  p99 \(.summary.p99_us) us  cpu \(.window.cpu_s) s  writes \(.window.writes)  \(.cpu_us_per_write // "-") us/write"'
}

ERRORS=0
for run in $(seq "$RUNS"); do
  for c in $CELLS; do
    IFS=: read -r n m <<<"$c"
    echo "run $run/$RUNS, cell N=$n M=$m/s" >&2
    for kind in tickgate floor; do run_one "$kind" "$n" "$m" "$run" >&2 || ERRORS=$((ERRORS + 1)); done
  done
done

python3 - "$OUT" "$SECS" "$RUNS" "${PIN0[*]:-unpinned}" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" <<'PY'
import json, statistics, sys
path, secs, runs, pin, commit = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
cells = sorted({(r["subscribers"], r["ticks_per_s"]) for r in rows}, key=lambda c: (c[0] * c[1], c[1]))
def med(rs, f):
    v = [f(r) for r in rs]
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None
def fmt(v, d=2):
    return "-" if v is None else (f"{v:,.0f}" if d == 0 else f"{v:.{d}f}")
def pair(t, f, d=2, ratio=True):
    r = f" ({t / f:.2f}×)" if ratio and t is not None and f else ""
    return f"{fmt(t, d)} / {fmt(f, d)}{r}"
print(f"Per-write floor, commit {commit}: {secs} s measured per run, median of {runs} run(s); servers on `{pin}`.")
print("Each cell: **tickgate / floor (tickgate÷floor)**. writes: tickgate `tickgate_socket_flushes_total`, floor `write` calls, in the window; "
      "bytes/write: tickgate `tickgate_bytes_sent_total` (WebSocket payload), floor bytes the kernel took (frames with their 2-byte header).\n")
print("| subscribers | ticks/s | delivered records/s | p50 µs | p99 µs | server CPU s | writes | bytes/write | CPU µs per write | ratio per run |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n, m in cells:
    t = [r for r in rows if (r["subscribers"], r["ticks_per_s"]) == (n, m) and r["server"] == "tickgate"]
    f = [r for r in rows if (r["subscribers"], r["ticks_per_s"]) == (n, m) and r["server"] == "floor"]
    g = lambda rs, fn: med(rs, fn)
    bpw = lambda r: r["window"]["bytes"] / r["window"]["writes"] if r["window"]["writes"] else None
    per_run = []
    for run in sorted({r["run"] for r in t} & {r["run"] for r in f}):
        a = next(r for r in t if r["run"] == run)["cpu_us_per_write"]
        b = next(r for r in f if r["run"] == run)["cpu_us_per_write"]
        if a is not None and b:
            per_run.append(f"{a / b:.2f}")
    print("| " + " | ".join([
        f"{n:,}", f"{m:,}",
        pair(g(t, lambda r: r["summary"]["records_per_s"]), g(f, lambda r: r["summary"]["records_per_s"]), 0),
        pair(g(t, lambda r: r["summary"]["p50_us"]), g(f, lambda r: r["summary"]["p50_us"]), 0, False),
        pair(g(t, lambda r: r["summary"]["p99_us"]), g(f, lambda r: r["summary"]["p99_us"]), 0, False),
        pair(g(t, lambda r: r["window"]["cpu_s"]), g(f, lambda r: r["window"]["cpu_s"])),
        pair(g(t, lambda r: r["window"]["writes"]), g(f, lambda r: r["window"]["writes"]), 0),
        pair(g(t, bpw), g(f, bpw), 0, False),
        "**" + pair(g(t, lambda r: r["cpu_us_per_write"]), g(f, lambda r: r["cpu_us_per_write"]), 3) + "**",
        ", ".join(per_run) or "-",
    ]) + " |")
PY
echo "raw results: $OUT" >&2
if [ "$ERRORS" -gt 0 ]; then echo "$ERRORS load runs failed" >&2; exit 1; fi

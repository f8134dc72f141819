#!/usr/bin/env bash
# Failover through HAProxy (issue #14): the clients of a killed edge reconnect through the
# balancer and resume on the others; the reconnect curve. Per round, all started here on
# free ports: nats-server with JetStream, the feed handler (`tickgate publish --nats`, its
# synthetic source at RATE ticks/s over K instruments), E edges (`source = "nats"`, shared
# signing key, the embedded issuer) and HAProxy from deploy/haproxy/haproxy.cfg itself
# (its `server` lines cut to E, plus a stats socket to wait for every server to be UP).
# Then `tickgate load --role failover` holds N connections through HAProxy (leastconn:
# N/E per edge), every connection on every instrument; after STEADY seconds it SIGKILLs
# edge 1 and watches SECS seconds: every connection that closes reconnects with jittered
# exponential backoff (first attempt below 250 ms) and `resume`; it is *streaming again* at
# its first live record, *clean* when its tracker saw no gap, duplicate or stray record and
# no `gap` message came. Printed: the curve (seconds since the kill -> % of the killed
# edge's clients streaming again), the time until all were, and the live latency of all
# clients before and after the kill.
#
#   benches/failover.sh [--clients N] [--edges E] [--rate R] [--instruments K]
#                       [--steady S] [--seconds S] [--rounds R]
#
# Defaults: 2,000 clients over 2 edges (1,000 on the killed one: the issue's case), 100
# ticks/s over 10 instruments, 5 s steady, 20 s after the kill, 1 round. Pinning (2 cores,
# nothing isolated): the edges on core 0; HAProxy, nats-server, the handler and the client
# on core 1. Output: the table, and docs/benchmarks-failover.jsonl (OUT_DIR=... elsewhere),
# one line per round with the whole summary. It never fails on timing (the 10 s target is
# reported, not enforced), only on a run that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
N=2000; E=2; RATE=100; K=10; STEADY=5; SECS=20; ROUNDS=1
source benches/lib.sh
bench_args "clients=N edges=E rate=RATE instruments=K steady=STEADY seconds=SECS rounds=ROUNDS" "$@"
case $E in 2|3) ;; *) echo "--edges must be 2 or 3 (the deploy file has three server lines)" >&2; exit 2 ;; esac
bench_setup nats-server haproxy curl python3
work=$(mktemp -d)
PIDS=()
# (The braces keep the shell's "Killed" job notices out of the output.)
stop_all() { { [ ${#PIDS[@]} -eq 0 ] || kill -KILL "${PIDS[@]}" || true; wait || true; } 2>/dev/null; PIDS=(); }
trap 'stop_all; rm -rf "$work"' EXIT
SECRET=failover-bench-secret
syms=$(for ((i = 0; i < K; i++)); do printf '"S%d",' "$i"; done | sed 's/,$//')
mkdir -p "$OUT_DIR"; OUT="$OUT_DIR/benchmarks-failover.jsonl"; : >"$OUT"
FAILED=0
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: $N clients over $E edges through HAProxy, $RATE ticks/s over $K instruments" >&2
  rd=$work/r$r; mkdir -p "$rd/handler" "$rd/feeds"
  printf 'name = "FO"\nid = 21\nsource = "synthetic"\nsymbols = [%s]\n[synthetic]\nseed = 1\nrate_per_s = %s.0\n' "$syms" "$RATE" >"$rd/handler/fo.toml"
  printf 'name = "FO"\nid = 21\nsource = "nats"\nsymbols = [%s]\n' "$syms" >"$rd/feeds/fo.toml"
  NP=$(free_port); LB=$(free_port)
  "${PIN1[@]}" nats-server -a 127.0.0.1 -p "$NP" -js -sd "$rd/js" >"$rd/nats.log" 2>&1 &
  NATS_PID=$!; PIDS+=($!)
  wait_port "$NP" || { echo "nats-server not listening: $(tail -3 "$rd/nats.log")" >&2; exit 1; }
  "$BIN" keygen --out "$rd/signing.pem" >/dev/null
  RUST_LOG=warn "${PIN1[@]}" "$BIN" publish --nats "nats://127.0.0.1:$NP" --feed FO --feeds-dir "$rd/handler" >/dev/null 2>"$rd/handler.err" &
  PIDS+=($!)
  EDGE_PIDS=(); HAENV=(TICKGATE_LB_BIND="127.0.0.1:$LB")
  for e in $(seq 1 "$E"); do
    P=$(free_port); A=$(free_port)
    mkdir -p "$rd/edge$e"
    cat >"$rd/edge$e/tg.toml" <<EOF
listen = "127.0.0.1:$P"
admin_listen = "127.0.0.1:$A"
feeds_dir = "$rd/feeds"
[issuer]
issuer = "http://127.0.0.1:$LB"
signing_key_files = ["$rd/signing.pem"]
key_rotation_s = 0
clients = [{ id = "demo", secret = "$SECRET", scopes = ["md:read:*"] }]
[server]
state_dir = "$rd/edge$e/state"
[nats]
servers = ["nats://127.0.0.1:$NP"]
EOF
    RUST_LOG=warn "${PIN0[@]}" "$BIN" serve --config "$rd/edge$e/tg.toml" >"$rd/edge$e/log" 2>&1 &
    EDGE_PIDS+=($!); PIDS+=($!)
    HAENV+=(TICKGATE_EDGE$e="127.0.0.1:$P" TICKGATE_EDGE${e}_ADMIN_PORT="$A")
    echo "http://127.0.0.1:$A" >"$rd/edge$e/admin"
  done
  for e in $(seq 1 "$E"); do
    wait_ready "$(cat "$rd/edge$e/admin")" || { echo "edge $e not ready: $(tail -3 "$rd/edge$e/log")" >&2; exit 1; }
  done
  # The deploy file, with its server lines cut to the edges run here and a stats socket.
  sed -e "/server edge[$((E + 1))-9]/d" -e "s|^global\$|global\n    stats socket $rd/haproxy.sock mode 600 level admin|" \
    deploy/haproxy/haproxy.cfg >"$rd/haproxy.cfg"
  env "${HAENV[@]}" "${PIN1[@]}" haproxy -db -f "$rd/haproxy.cfg" >"$rd/haproxy.log" 2>&1 &
  HA_PID=$!; PIDS+=($!)
  # Every server UP (srv_op_state 2) before the clients come, so leastconn spreads them.
  python3 - "$rd/haproxy.sock" "$E" <<'PY' || { echo "HAProxy servers not all UP: $(tail -3 "$rd/haproxy.log")" >&2; exit 1; }
import socket, sys, time
for _ in range(600):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(b"show servers state tickgate_edges\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        rows = [l.split() for l in data.decode().splitlines() if not l.startswith("#")]
        if sum(1 for f in rows if len(f) > 6 and f[5] == "2") == int(sys.argv[2]):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
  # Who used the cores during the run (CPU-s from here to the end): the edges that
  # survive, HAProxy, nats-server.
  c0=$(for p in "${EDGE_PIDS[@]:1}" "$HA_PID" "$NATS_PID"; do cpu "$p"; done | xargs); w0=$(date +%s.%N)
  "${PIN1[@]}" "$BIN" load --role failover --url "ws://127.0.0.1:$LB/v1/stream" --issuer "http://127.0.0.1:$LB" \
    --client-id demo --client-secret "$SECRET" --feed FO --symbols '*' --connections "$N" \
    --warmup "$STEADY" --seconds "$SECS" --kill-pid "${EDGE_PIDS[0]}" >"$rd/failover.json" 2>"$rd/failover.err" \
    || { echo "failover run failed: $(tail -3 "$rd/failover.err")" >&2; FAILED=1; }
  c1=$(for p in "${EDGE_PIDS[@]:1}" "$HA_PID" "$NATS_PID"; do cpu "$p"; done | xargs); w1=$(date +%s.%N)
  grep -E "^t=|killed|streaming \(" "$rd/failover.err" >&2 || true
  python3 - "$rd/failover.json" "$N" "$E" "$RATE" "$K" "$r" "$c0" "$c1" "$w0" "$w1" "$(getconf CLK_TCK)" >>"$OUT" <<'PY' || true
import json, sys
f, n, e, rate, k, r, c0, c1, w0, w1, hz = sys.argv[1:]
j = json.load(open(f))
d = [(int(b) - int(a)) / int(hz) for a, b in zip(c0.split(), c1.split())]
wall = float(w1) - float(w0)
j.update({"clients": int(n), "edges": int(e), "ticks_per_s": int(rate), "instruments": int(k), "round": int(r),
          "wall_s": wall, "surviving_edges_cpu_s": sum(d[:-2]), "haproxy_cpu_s": d[-2], "nats_cpu_s": d[-1]})
print(json.dumps(j))
PY
  stop_all
done
python3 - "$OUT" "$SECS" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
if not rows:
    sys.exit(0)
med = lambda xs: st.median(xs) if xs else float("nan")
n = len(rows)
print(f"\n{rows[0]['clients']} clients over {rows[0]['edges']} edges, {rows[0]['ticks_per_s']} ticks/s; "
      f"{n} round(s); median over rounds")
print("\n| since the kill | resubscribed | streaming again (% of the killed edge's clients) |")
print("|---:|---:|---:|")
for i in range(int(sys.argv[2])):
    pts = [r["curve"][i] for r in rows if len(r["curve"]) > i]
    if not pts:
        break
    print(f"| {pts[0]['t_s']} s | {med([p['resubscribed'] for p in pts]):.0f} | "
          f"{med([p['streaming_again'] for p in pts]):.0f} ({100 * med([p['fraction'] for p in pts]):.1f} %) |")
    if all(p["fraction"] >= 1.0 for p in pts) and pts[0]["t_s"] >= 3:
        break
fmt = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"
for r in rows:
    print(f"\nround {r['round']}: {r['moved']} of {r['connections']} clients were on the killed edge; "
          f"{r['streaming_again']} streaming again, {r['resumed_clean']} resumed clean; "
          f"first close {fmt(r['first_close_s'], ' s')}, p50 {fmt(r['streaming_p50_s'], ' s')}, "
          f"p99 {fmt(r['streaming_p99_s'], ' s')}, all {fmt(r['all_streaming_s'], ' s')} after the kill; "
          f"{r['replayed_records']} records replayed; {r['reconnect_attempts']} attempts "
          f"({r['failed_attempts']} failed); gaps {r['gaps_after_kill']}, anomalies {r['anomalies_after_kill']}; "
          f"target (all back, clean, <= 10 s): {'met' if r['within_10s'] else 'NOT met'}")
    b, a = r["before"], r["after"]
    print(f"  live latency before: {b['records_per_s']:.0f} records/s, p50 {b['p50_us']/1e3:.2f} ms, p99 {b['p99_us']/1e3:.2f} ms; "
          f"after the kill: {a['records_per_s']:.0f}/s, p50 {a['p50_us']/1e3:.2f} ms, p99 {a['p99_us']/1e3:.2f} ms, max {a['max_us']/1e3:.0f} ms")
    if r.get("wall_s"):
        w = r["wall_s"]
        print(f"  cores used over the run ({w:.0f} s): surviving edge(s) {r['surviving_edges_cpu_s']/w:.2f}, "
              f"HAProxy {r['haproxy_cpu_s']/w:.2f}, nats-server {r['nats_cpu_s']/w:.2f}, "
              f"client {(r.get('client_cpu_s') or 0)/w:.2f}")
PY
exit $FAILED

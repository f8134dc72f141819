#!/usr/bin/env bash
# A/B of two builds of tickgate in one run, for refactors that must not cost speed: the
# criterion benches `dispatch` (fan-out core, codec, resume log, index) and `ingest`
# (publish and replay ingest, each with its own peer), and `benches/compare.sh --quick`
# (whole server against nats-server), and `cells` (whole server, old against new directly:
# server CPU-seconds per million deliveries, no third server in between), alternating old
# and new so that machine noise hits both alike. Prints, per measurement, the median of
# each side, new/old and each side's range.
#
#   [PARTS="dispatch ingest compare cells"] [COMPARE_ROUNDS=1] [AB_CELLS="100:1000 1000:100"]
#   [AB_SECONDS=8] benches/ab.sh OLD_CHECKOUT [ROUNDS]
#
# `cells`: per cell N:M, the side's release binary serves one `source = "publish"` feed
# (one instrument) pinned to core 0; the NEW build's `tickgate load` opens N subscribers
# and a publisher of M ticks/s pinned to core 1 (the same load generator for both sides).
#       run from the new checkout, both already built:
#       (cd OLD && cargo build --release && cargo bench --no-run --bench dispatch --bench ingest)
#
# Nothing here fails on timing; it is a measurement. Keep the machine otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(cd "$1" && pwd); NEW=$PWD; ROUNDS=${2:-2}; PARTS=${PARTS:-dispatch ingest compare cells}
AB_CELLS=${AB_CELLS:-"100:1000 1000:100"}; AB_SECONDS=${AB_SECONDS:-8}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bin() { # the newest criterion/harness bench binary of a checkout
  ls -t "$1"/target/release/deps/"$2"-* 2>/dev/null | grep -v '\.d$' | head -1
}
for side in OLD NEW; do
  dir=${!side}
  for b in dispatch ingest; do
    [[ " $PARTS " == *" $b "* ]] || continue
    [ -x "$(bin "$dir" $b)" ] || { echo "$side: no $b bench binary in $dir (build it first)"; exit 2; }
  done
  [ -x "$dir/target/release/tickgate" ] || { echo "$side: no release binary in $dir"; exit 2; }
done
ulimit -n 20000 2>/dev/null || true
PIN_SRV=(); PIN_LOAD=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then PIN_SRV=(taskset -c 0); PIN_LOAD=(taskset -c 1); fi
# cell BIN N M OUT: one server (BIN) with N subscribers and a publisher of M ticks/s; the
# load generator's JSON summary goes to OUT.
cell() {
  local bin=$1 n=$2 m=$3 out=$4 d="$work/cell" srv pub load
  rm -rf "$d"; mkdir -p "$d/feeds"
  printf 'name = "CMP"\nid = 100\nsource = "publish"\npolicy = "disconnect"\nsymbols = ["S0"]\n' >"$d/feeds/cmp.toml"
  printf 'listen = "127.0.0.1:9480"\nadmin_listen = "127.0.0.1:9481"\nfeeds_dir = "%s/feeds"\n[limits]\nmax_outbound_bytes = 1048576\nmax_connections = 100000\nmax_connections_per_ip = 100000\nmax_connections_per_subject = 100000\nconnect_rate_per_ip = 100000\nconnect_burst_per_ip = 100000\n' "$d" >"$d/tg.toml"
  RUST_LOG=warn "${PIN_SRV[@]}" "$bin" serve --config "$d/tg.toml" --insecure-no-auth >"$d/tg.log" 2>&1 &
  srv=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:9481/readyz >/dev/null && break; sleep 0.1; done
  "${PIN_LOAD[@]}" "$NEW/target/release/tickgate" load --url ws://127.0.0.1:9480/v1/stream --no-token --feed CMP \
    --symbols S0 --connections "$n" --seconds "$AB_SECONDS" --warmup 2 --admin http://127.0.0.1:9481 --server-pid "$srv" >"$out" 2>"$d/load.err" &
  load=$!
  # The publisher starts once the subscribers are connecting; the warm-up covers the rest.
  sleep 1
  "${PIN_LOAD[@]}" "$NEW/target/release/tickgate" load --role publisher --target tickgate --url ws://127.0.0.1:9480/v1/stream \
    --no-token --server-seq --feed CMP --feed-id 100 --symbols S0 --rate "$m" --seconds 0 >/dev/null 2>"$d/pub.err" &
  pub=$!
  wait "$load" || echo "load run failed: $(tail -2 "$d/load.err")" >&2
  # The measurement is over: no graceful shutdown (its drain would only cost time).
  kill -KILL "$pub" "$srv" 2>/dev/null || true; wait "$pub" "$srv" 2>/dev/null || true
}
for r in $(seq 1 "$ROUNDS"); do
  for side in OLD NEW; do
    dir=${!side}; out="$work/$side.$r"; mkdir -p "$out"
    : >"$out/ingest.log"
    if [[ " $PARTS " == *" dispatch "* ]]; then
      echo "== round $r $side: dispatch"
      (cd "$dir" && CRITERION_HOME="$out/criterion" "$(bin "$dir" dispatch)" --bench \
        --warm-up-time 1 --measurement-time 2 --noplot >"$out/dispatch.log" 2>&1)
    fi
    if [[ " $PARTS " == *" ingest "* ]]; then
      echo "== round $r $side: ingest"
      (cd "$dir" && "$(bin "$dir" ingest)" --bench >"$out/ingest.log" 2>&1)
    fi
    if [[ " $PARTS " == *" compare "* ]] && [ "$r" -le "${COMPARE_ROUNDS:-1}" ]; then
      echo "== round $r $side: compare.sh --quick"
      TICKGATE_BIN="$dir/target/release/tickgate" OUT_DIR="$out/compare" benches/compare.sh --quick >"$out/compare.log" 2>&1
    fi
    if [[ " $PARTS " == *" cells "* ]]; then
      for c in $AB_CELLS; do
        echo "== round $r $side: cell $c"
        cell "$dir/target/release/tickgate" "${c%%:*}" "${c##*:}" "$out/cell-${c%%:*}x${c##*:}.json"
      done
    fi
  done
done
python3 - "$work" "$ROUNDS" <<'PY'
import json, os, sys, glob, statistics as st
work, rounds = sys.argv[1], int(sys.argv[2])
rows = {}  # name -> {side: [values]}, lower is better unless name says /s
def add(name, side, v):
    rows.setdefault(name, {"OLD": [], "NEW": []})[side].append(v)
for side in ("OLD", "NEW"):
    for r in range(1, rounds + 1):
        d = f"{work}/{side}.{r}"
        for est in glob.glob(f"{d}/criterion/**/new/estimates.json", recursive=True):
            rel = os.path.relpath(os.path.dirname(os.path.dirname(est)), f"{d}/criterion")
            add(f"criterion {rel} (ns)", side, json.load(open(est))["median"]["point_estimate"])
        for line in open(f"{d}/ingest.log"):
            if line.startswith("{"):
                j = json.loads(line)
                name = f"ingest {j['bench']}" + (f" batch {j['batch']}" if "batch" in j else "")
                add(f"{name} tickgate/peer records/s", side, j["tickgate_rps"] / j["peer_rps"])
        for cf in sorted(glob.glob(f"{d}/cell-*.json")):
            try:
                j = json.load(open(cf))
            except ValueError:
                continue
            cell = os.path.basename(cf)[5:-5]
            if j.get("server_cpu_s_per_million"):
                add(f"cells {cell}/s: server CPU-s per M deliveries", side, j["server_cpu_s_per_million"])
                # Per frame written (one WebSocket message, one socket write when nothing is
                # held): how many records share a frame depends on timing and swings CPU per
                # record by tens of percent from run to run; the cost per write does not.
                if j.get("records_per_frame"):
                    add(f"cells {cell}/s: server CPU-us per frame", side,
                        j["server_cpu_s_per_million"] * j["records_per_frame"])
            if j.get("p99_us"):
                add(f"cells {cell}/s: p99 (us)", side, j["p99_us"])
            # Overload behaviour: subscribers reading as fast as they could that were closed
            # (4008 or otherwise), delivered records/s, silent loss, memory at the end.
            add(f"cells {cell}/s: subscribers closed early", side, j.get("failed", 0))
            add(f"cells {cell}/s: delivered records/s", side, j.get("records_per_s", 0))
            add(f"cells {cell}/s: delivery violations", side, j.get("anomalies", 0))
            if j.get("server_rss_bytes"):
                add(f"cells {cell}/s: server RSS at the end (MB)", side, j["server_rss_bytes"] / 1e6)
        cj = f"{d}/compare/benchmarks-compare.jsonl"
        if os.path.exists(cj):
            cells = {}
            for line in open(cj):
                j = json.loads(line); s = j.get("summary") or {}
                key = (j["subscribers"], j["ticks_per_s"], j["instruments"])
                cells.setdefault(key, {})[j["server"]] = s
            for (n, m, k), by in sorted(cells.items()):
                t, p = by.get("tickgate"), by.get("nats")
                if t and p and t.get("server_cpu_s_per_million") and p.get("server_cpu_s_per_million"):
                    add(f"compare {n}x{m}/s x{k} instr: CPU-s per M, tickgate/nats", side,
                        t["server_cpu_s_per_million"] / p["server_cpu_s_per_million"])
                if t and p and p.get("p99_us"):
                    add(f"compare {n}x{m}/s x{k} instr: p99, tickgate/nats", side, t["p99_us"] / p["p99_us"])
print("\n| measurement | old (median) | new (median) | new/old | old range | new range |")
print("|---|---:|---:|---:|---:|---:|")
for name in sorted(rows):
    o, n = rows[name]["OLD"], rows[name]["NEW"]
    if o and n:
        mo, mn = st.median(o), st.median(n)
        ratio = f"{mn/mo:.3f}" if mo else "-"
        print(f"| {name} | {mo:.4g} | {mn:.4g} | {ratio} | {min(o):.4g}-{max(o):.4g} | {min(n):.4g}-{max(n):.4g} |")
PY

#!/usr/bin/env bash
# A/B of two builds of tickgate in one run, for refactors that must not cost speed: the
# criterion benches `dispatch` (fan-out core, codec, resume log, index) and `ingest`
# (publish and replay ingest, each with its own peer), and `benches/compare.sh --quick`
# (whole server against nats-server), alternating old and new so that machine noise hits
# both alike. Prints, per measurement, the median of each side and new/old.
#
#   [PARTS="dispatch ingest compare"] [COMPARE_ROUNDS=1] benches/ab.sh OLD_CHECKOUT [ROUNDS]
#       run from the new checkout, both already built:
#       (cd OLD && cargo build --release && cargo bench --no-run --bench dispatch --bench ingest)
#
# Nothing here fails on timing; it is a measurement. Keep the machine otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(cd "$1" && pwd); NEW=$PWD; ROUNDS=${2:-2}; PARTS=${PARTS:-dispatch ingest compare}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bin() { # the newest criterion/harness bench binary of a checkout
  ls -t "$1"/target/release/deps/"$2"-* 2>/dev/null | grep -v '\.d$' | head -1
}
for side in OLD NEW; do
  dir=${!side}
  for b in dispatch ingest; do [ -x "$(bin "$dir" $b)" ] || { echo "$side: no $b bench binary in $dir (build it first)"; exit 2; }; done
  [ -x "$dir/target/release/tickgate" ] || { echo "$side: no release binary in $dir"; exit 2; }
done
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
print("\n| measurement | old (median) | new (median) | new/old |")
print("|---|---:|---:|---:|")
for name in sorted(rows):
    o, n = rows[name]["OLD"], rows[name]["NEW"]
    if o and n:
        mo, mn = st.median(o), st.median(n)
        print(f"| {name} | {mo:.4g} | {mn:.4g} | {mn/mo:.3f} |")
PY

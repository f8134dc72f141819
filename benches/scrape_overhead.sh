#!/usr/bin/env bash
# Does a Prometheus scrape every second cost the delivery path anything? Runs the same load
# (N subscribers x the bench feed) with and without a 1 s scrape loop, alternated ROUNDS
# times, and times the scrapes themselves.
#   benches/scrape_overhead.sh [N] [SECONDS] [ROUNDS]     default: 500 15 2
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}; SECS=${2:-15}; ROUNDS=${3:-2}
cargo build --release -q
BIN=target/release/tickgate
TICKGATE_DEMO_SECRET=bench RUST_LOG=warn $BIN serve --config benches/bench.toml >/dev/null 2>&1 &
srv=$!; scr=""
trap 'kill $srv $scr 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:9081/readyz >/dev/null && break; sleep 0.1; done
for r in $(seq "$ROUNDS"); do
  for mode in off on; do
    times=/tmp/tickgate-scrape-times.$$
    : > "$times"
    if [ $mode = on ]; then
      ( while true; do curl -s -o /dev/null -w '%{time_total}\n' http://127.0.0.1:9081/metrics >> "$times"; sleep 1; done ) &
      scr=$!
    fi
    out=$(TICKGATE_CLIENT_SECRET=bench $BIN load --url ws://127.0.0.1:9080/v1/stream --issuer http://127.0.0.1:9080 \
          --connections "$N" --feed BENCH --symbols '*' --seconds "$SECS" --warmup 3 2>/dev/null)
    if [ $mode = on ]; then kill $scr; wait $scr 2>/dev/null || true; scr=""; fi
    med=$(sort -n "$times" | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "null"}')
    echo "{\"round\": $r, \"scrape\": \"$mode\", \"scrapes\": $(wc -l < "$times"), \"scrape_median_s\": $med, \"summary\": $(echo "$out" | tr -d '\n')}"
    rm -f "$times"
  done
done

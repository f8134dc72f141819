#!/usr/bin/env bash
# Starts a release tickgate with the bench feed (10 instruments, RATE ticks/s in total),
# runs `tickgate load` once per subscriber count with every subscriber on all 10
# instruments, and prints one JSON summary per run. Server and load generator share
# the machine; compare runs made in the same invocation.
#
#   benches/load.sh [RATE] [SECONDS] [N ...]      default: 1000 10 100 250 500 1000
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1000}; SECS=${2:-10}; shift $(( $# > 2 ? 2 : $# )) || true
COUNTS=("$@"); [ ${#COUNTS[@]} -gt 0 ] || COUNTS=(100 250 500 1000)
cargo build --release -q
BIN=target/release/tickgate
work=$(mktemp -d); trap 'kill $srv 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/feeds"
sed "s/^rate_per_s = .*/rate_per_s = $RATE.0/" benches/feeds/bench.toml > "$work/feeds/bench.toml"
sed "s|^feeds_dir = .*|feeds_dir = \"$work/feeds\"|" benches/bench.toml > "$work/bench.toml"
TICKGATE_DEMO_SECRET=bench RUST_LOG=warn $BIN serve --config "$work/bench.toml" >"$work/serve.log" 2>&1 &
srv=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:9081/readyz >/dev/null && break; sleep 0.1; done
for n in "${COUNTS[@]}"; do
  out=$(TICKGATE_CLIENT_SECRET=bench $BIN load --url ws://127.0.0.1:9080/v1/stream \
        --issuer http://127.0.0.1:9080 --connections "$n" --feed BENCH --symbols '*' \
        --seconds "$SECS" --warmup 3 --admin http://127.0.0.1:9081 2>/dev/null)
  echo "{\"subscribers\": $n, \"ticks_per_s\": $RATE, \"summary\": $(echo "$out" | tr -d '\n')}"
done

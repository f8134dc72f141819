#!/usr/bin/env bash
# Proof that authorization costs the delivery path nothing: the same workload with auth on
# (real tokens, 60 s lifetimes so every connection has a live expiry timer, and in-band
# refreshes every REFRESH seconds per connection) and with auth off (the benchmark-only
# --insecure-no-auth mode), alternated ROUNDS times. Prints one JSON line per run.
#
#   benches/auth_overhead.sh [CONNECTIONS] [SECONDS] [ROUNDS] [REFRESH]   default: 10000 20 2 20
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; SECS=${2:-20}; ROUNDS=${3:-2}; REFRESH=${4:-20}
cargo build --release -q
BIN=target/release/tickgate
work=$(mktemp -d); srv=""
trap 'kill $srv 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/feeds"
# 200 ticks/s over 10 instruments; each connection takes one instrument: 20 records/s each.
sed "s/^rate_per_s = .*/rate_per_s = 200.0/" benches/feeds/bench.toml > "$work/feeds/bench.toml"
cat > "$work/on.toml" <<EOT
listen = "127.0.0.1:9080"
admin_listen = "127.0.0.1:9081"
feeds_dir = "$work/feeds"
[issuer]
token_ttl_s = 60
clients = [{ id = "bench", secret = "bench", scopes = ["md:read:*"] }]
[limits]
max_connections = 100000
EOT
start() {
  RUST_LOG=warn $BIN serve --config "$work/on.toml" "$@" >"$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:9081/readyz >/dev/null && return; sleep 0.1; done
  echo "server did not start" >&2; cat "$work/serve.log" >&2; exit 1
}
stop() { kill -INT $srv; wait $srv 2>/dev/null || true; srv=""; }
SYMS=B0,B1,B2,B3,B4,B5,B6,B7,B8,B9
for r in $(seq "$ROUNDS"); do
  for mode in on off; do
    if [ $mode = on ]; then
      start
      out=$($BIN load --url ws://127.0.0.1:9080/v1/stream --issuer http://127.0.0.1:9080 --client-id bench \
            --client-secret bench --refresh-every "$REFRESH" --connections "$N" --feed BENCH --symbols $SYMS \
            --spread --seconds "$SECS" --warmup 5 --source-ips 16 --admin http://127.0.0.1:9081 2>/dev/null)
    else
      start --insecure-no-auth
      out=$($BIN load --url ws://127.0.0.1:9080/v1/stream --no-token --connections "$N" --feed BENCH \
            --symbols $SYMS --spread --seconds "$SECS" --warmup 5 --source-ips 16 --admin http://127.0.0.1:9081 2>/dev/null)
    fi
    stop
    echo "{\"round\": $r, \"auth\": \"$mode\", \"connections\": $N, \"summary\": $(echo "$out" | tr -d '\n')}"
  done
done

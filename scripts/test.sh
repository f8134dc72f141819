#!/usr/bin/env bash
# Runs every test. On a fresh Debian machine it first installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Tools the test suite drives for real: "command:Debian package".
# chromium, node and npm: the trading screen's browser tests and the JS client's tests.
for pair in curl:curl prometheus:prometheus promtool:prometheus nats-server:nats-server haproxy:haproxy ip:iproute2 \
            chromium:chromium node:nodejs npm:npm python3:python3; do
  tool=${pair%%:*}; pkg=${pair##*:}
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# The Python client's tests run in a venv (clients/python/test.sh makes it).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u | sed '/^$/d')
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The integration tests share one process, and expiry_at_scale alone opens 10,000 sockets.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The integration tests are one binary (`--test it`, tests/it/main.rs). The only tests
# `#[ignore]`d are those that need nats-server, haproxy, prometheus or promtool, installed above
# (`nats_netns` needs root for `ip netns` too, and says `skipped` without it):
# `--include-ignored` runs them too. Arguments before a `--` go to cargo, those after it to
# the test binaries (a name filter, `--nocapture`): `./scripts/test.sh -- delivery::`.
cargo_args=() test_args=()
seen_dashdash=0
for a in "$@"; do
  if [ "$seen_dashdash" -eq 0 ] && [ "$a" = "--" ]; then seen_dashdash=1; continue; fi
  if [ "$seen_dashdash" -eq 0 ]; then cargo_args+=("$a"); else test_args+=("$a"); fi
done
cargo test --workspace --all-targets --locked "${cargo_args[@]}" -- --include-ignored "${test_args[@]}"

# The clients and the trading screen, against the binary the run above built. Skipped when
# the run was narrowed (arguments given): `./scripts/test.sh -- delivery::` runs only that.
if [ "$#" -eq 0 ]; then
  export TICKGATE_BIN="$PWD/target/debug/tickgate"
  echo "=== Python client (clients/python)"
  clients/python/test.sh
  echo "=== JavaScript client (clients/js)"
  clients/js/test.sh
  echo "=== trading screen in chromium (tests/browser)"
  tests/browser/test.sh
fi

#!/usr/bin/env bash
# Runs every test. On a fresh Debian machine it first installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Tools the test suite drives for real: "command:Debian package".
for pair in curl:curl prometheus:prometheus promtool:prometheus nats-server:nats-server haproxy:haproxy ip:iproute2; do
  tool=${pair%%:*}; pkg=${pair##*:}
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$pkg")
done
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

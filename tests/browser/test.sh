#!/usr/bin/env bash
# The trading screen in a real browser: Debian's chromium, headless, driven by playwright-core.
# Uses the server binary in $TICKGATE_BIN (default: the workspace's target/debug/tickgate);
# screenshots go to target/browser/.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
export TICKGATE_BIN="${TICKGATE_BIN:-$root/target/debug/tickgate}"
export TICKGATE_ARTEFACTS="${TICKGATE_ARTEFACTS:-$root/target/browser}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$TICKGATE_BIN" ] || { echo "no server binary at $TICKGATE_BIN (cargo build first)" >&2; exit 1; }
[ -x "$CHROMIUM" ] || { echo "no chromium at $CHROMIUM (apt-get install chromium)" >&2; exit 1; }
if [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
mkdir -p "$TICKGATE_ARTEFACTS"
exec node --test --test-concurrency=1 screen.test.mjs

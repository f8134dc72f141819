#!/usr/bin/env bash
# Short, bounded coverage-guided fuzz run (CI): builds the targets in fuzz/ and runs each
# one for FUZZ_SECONDS (default 10) over its committed corpus (fuzz/corpus/<target>) and
# its past crashes (fuzz/regressions/<target>). Fails on any crash, panic, leak or hang.
# cargo-fuzz needs nightly compiler flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them. New inputs go to a scratch folder, so the committed corpus is never changed here.
# Usage: scripts/fuzz.sh [TARGET...]   (default: every target). Long runs: docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-10}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo fuzz list)

start=$SECONDS
cargo fuzz build
echo "fuzz targets built in $((SECONDS - start)) s"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  dirs=("$scratch/$t")
  mkdir -p "$scratch/$t"
  for d in "fuzz/corpus/$t" "fuzz/regressions/$t"; do
    if [ -d "$d" ]; then dirs+=("$d"); fi
  done
  echo "== fuzz $t for ${seconds}s"
  # -timeout: one input running 10 s is a hang and fails the run like a crash.
  # -malloc_limit_mb: one allocation of 4 MB or more fails it too (an input-sized claim
  # trusted for an allocation; two such findings are under fuzz/regressions).
  log="$scratch/$t.log"
  rc=0
  cargo fuzz run "$t" "${dirs[@]}" -- -max_total_time="$seconds" -timeout=10 -malloc_limit_mb=4 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz target $t failed (exit $rc); the input is under fuzz/artifacts/$t/"
    exit "$rc"
  fi
done

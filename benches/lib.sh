# Shared by the shell benches that start their own servers (benches/failover.sh,
# benches/two_edges.sh): `source "$(dirname "$0")/lib.sh"` after `set -euo pipefail`.

# bench_args "FLAG=VAR ..." "$@": sets VAR from each `--FLAG VALUE`; -h/--help prints the
# calling script's header comment (up to its `set -euo` line) and exits.
bench_args() {
  local spec=$1 f found
  shift
  while [ $# -gt 0 ]; do
    if [ "$1" = -h ] || [ "$1" = --help ]; then
      # $0 may be relative to where the script was started from, before its `cd`.
      local me=$0
      [ -f "$me" ] || me=benches/${0##*/}
      sed -n '2,/^set -euo/p' "$me" | sed '$d; s/^# \{0,1\}//'
      exit 0
    fi
    found=""
    for f in $spec; do
      if [ "$1" = "--${f%%=*}" ]; then
        [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
        printf -v "${f#*=}" '%s' "$2"
        found=1
        shift
        break
      fi
    done
    [ -n "$found" ] || { echo "unknown argument: $1" >&2; exit 2; }
    shift
  done
}

# bench_setup TOOL...: checks the tools are on PATH, builds the release binary (unless
# TICKGATE_BIN names one), raises the descriptor limit (a client is one socket in the load
# generator and two in HAProxy) and sets BIN, OUT_DIR (default docs), and PIN0/PIN1 (taskset
# to core 0 / core 1 on a machine with two cores or more; nothing with one).
bench_setup() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (./scripts/test.sh installs nats-server and haproxy)" >&2; exit 2; }
  done
  OUT_DIR=${OUT_DIR:-docs}
  [ -n "${TICKGATE_BIN:-}" ] || cargo build --release -q
  BIN=${TICKGATE_BIN:-$PWD/target/release/tickgate}
  ulimit -n 20000 2>/dev/null || true
  PIN0=(); PIN1=()
  if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); fi
}

# bench_limits: the `[limits]` table of a benchmark server's config (compare.sh's): the
# 1 MiB outbound budget per connection, and no connection or connect-rate limit in the way.
bench_limits() {
  printf '[limits]\nmax_outbound_bytes = 1048576\nmax_connections = 100000\nmax_connections_per_ip = 100000\n'
  printf 'max_connections_per_subject = 100000\nconnect_rate_per_ip = 100000\nconnect_burst_per_ip = 100000\n'
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready ADMIN_URL: polls its /readyz for up to 30 s; fails if it never says 200.
wait_ready() { for _ in $(seq 600); do curl -sf "$1/readyz" >/dev/null && return 0; sleep 0.05; done; return 1; }

# wait_port PORT: polls until something listens on 127.0.0.1:PORT (up to 10 s).
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# cpu PID: its CPU time (user + system) in clock ticks (getconf CLK_TCK per second); 0 once gone.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

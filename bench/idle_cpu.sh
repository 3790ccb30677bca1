#!/usr/bin/env bash
# CPU an idle gateway spends (docs/operations.md "Idle cost"): starts BIN with SHARDS
# shards on free loopback ports, lets it settle 2 s, then reads the CPU time of all its
# threads from /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts in 10 ms
# ticks, too coarse for an idle gateway) over SECONDS and prints the share of one core. Run
# it with the machine otherwise quiet; repeat and take the median.
# CONNS=N: the same with N idle JWT connections held open (one generator, `ringgate-bench
# idle`, pinned to CPU 1; the gateway on CPU 0), measured once all are open.
# Usage: bench/idle_cpu.sh [BIN=target/release/ringgate] [SECONDS=10] [SHARDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/ringgate}
SECONDS_=${2:-10}
SHARDS=${3:-2}
CONNS=${CONNS:-0}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release (or pass the binary)" >&2; exit 2; }
SECRET=bench-secret-0123456789abcdef
source bench/no_limits.sh
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 "$BIN" serve --shards "$SHARDS" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:0 \
  --jwt-secret $SECRET >/dev/null 2>&1 &
GW=$!
GEN=
trap 'kill $GW $GEN 2>/dev/null || true; wait $GW 2>/dev/null || true' EXIT
sleep 2
kill -0 $GW 2>/dev/null || { echo "the gateway did not start" >&2; exit 1; }
if [ "$CONNS" -gt 0 ]; then
  BENCH=$(dirname "$BIN")/ringgate-bench
  [ -x "$BENCH" ] || BENCH=target/release/ringgate-bench
  # Held 3 s past the window: the ramp (well under 2 s here) and the window both fit.
  taskset -c 1 "$BENCH" idle -n "$CONNS" --target 127.0.0.1:$PORT --route ws --secret $SECRET \
    --source-ips 8 --hold $((SECONDS_ + 3)) --timeout $((SECONDS_ + 60)) -q >/dev/null 2>&1 &
  GEN=$!
  sleep 2
fi
cpu_ns() { cat /proc/$GW/task/*/schedstat | awk '{ s += $1 } END { printf "%d", s }'; }
t0=$(cpu_ns)
sleep "$SECONDS_"
t1=$(cpu_ns)
awk -v d=$((t1 - t0)) -v s="$SECONDS_" -v n="$SHARDS" -v c="$CONNS" -v bin="$BIN" \
  'BEGIN { printf "%s: %d shards, %d idle connections, for %d s: %.4f s of CPU = %.3f%% of one core\n", bin, n, c, s, d / 1e9, 100 * d / 1e9 / s }'
[ -z "$GEN" ] || wait $GEN || true

#!/usr/bin/env bash
# CPU an idle gateway spends with no connections (README "Idle cost"): starts BIN with SHARDS
# shards on free loopback ports, lets it settle 2 s, then reads the CPU time of all its
# threads from /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts in 10 ms
# ticks, too coarse for an idle gateway) over SECONDS and prints the share of one core. Run
# it with the machine otherwise quiet; repeat and take the median.
# Usage: bench/idle_cpu.sh [BIN=target/release/ringgate] [SECONDS=10] [SHARDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/ringgate}
SECONDS_=${2:-10}
SHARDS=${3:-2}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release (or pass the binary)" >&2; exit 2; }
"$BIN" serve --shards "$SHARDS" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >/dev/null 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true; wait $GW 2>/dev/null || true' EXIT
sleep 2
kill -0 $GW 2>/dev/null || { echo "the gateway did not start" >&2; exit 1; }
cpu_ns() { cat /proc/$GW/task/*/schedstat | awk '{ s += $1 } END { printf "%d", s }'; }
t0=$(cpu_ns)
sleep "$SECONDS_"
t1=$(cpu_ns)
awk -v d=$((t1 - t0)) -v s="$SECONDS_" -v n="$SHARDS" -v bin="$BIN" \
  'BEGIN { printf "%s: %d shards idle for %d s: %.4f s of CPU = %.3f%% of one core\n", bin, n, s, d / 1e9, 100 * d / 1e9 / s }'

#!/usr/bin/env bash
# CPU an idle gateway spends with no connections (README "Idle cost"): starts BIN with SHARDS
# shards on free loopback ports, lets it settle 2 s, then reads its utime+stime from
# /proc/PID/stat over SECONDS and prints the share of one core. Run it with the machine
# otherwise quiet; repeat and take the median.
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
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$GW/stat"; }
HZ=$(getconf CLK_TCK)
t0=$(ticks)
sleep "$SECONDS_"
t1=$(ticks)
awk -v d=$((t1 - t0)) -v hz="$HZ" -v s="$SECONDS_" -v n="$SHARDS" -v bin="$BIN" \
  'BEGIN { printf "%s: %d shards idle for %d s: %.3f s of CPU = %.2f%% of one core\n", bin, n, s, d / hz, 100 * d / hz / s }'

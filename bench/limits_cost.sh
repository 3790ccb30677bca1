#!/usr/bin/env bash
# What the rate limits cost, alternated in one run (README "Limits"): three gateways
#   base: an older build without the limits (BASE_BIN, e.g. a worktree of 900e295),
#   on:   this build with every limit on but set far above the load (checked on every frame
#         and send, never refusing),
#   off:  this build with every limit 0,
# each under `send` (100 users x 16 in flight, 2 shards) and `echo` (100 connections x 16 in
# flight, 1 shard, generator on CPU 1). Prints one JSON line per run to stdout; take medians.
# Usage: BASE_BIN=/path/to/old/target/release bench/limits_cost.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
NEW=target/release
BASE=${BASE_BIN:?set BASE_BIN to the target/release directory of a build without limits}
HIGH="--ip-connect-rate 1000000 --ip-connect-burst 1000000 --ip-max-open 1000000 --conn-frame-rate 100000000 --conn-frame-burst 100000000 --user-send-rate 100000000 --user-send-burst 100000000"
OFF="--ip-connect-rate 0 --ip-max-open 0 --conn-frame-rate 0 --user-send-rate 0"
for round in $(seq "$ROUNDS"); do
  for side in base on off; do
    case $side in
      base) BIN=$BASE; EXTRA="" ;;
      on) BIN=$NEW; EXTRA=$HIGH ;;
      off) BIN=$NEW; EXTRA=$OFF ;;
    esac
    # shellcheck disable=SC2086
    "$BIN/ringgate" --shards 2 --listen 127.0.0.1:28180 --admin-listen 127.0.0.1:29190 $EXTRA >/dev/null 2>&1 &
    GW=$!; sleep 0.5
    echo "$round $side send $("$BIN/ringgate-bench" send --target 127.0.0.1:28180 --users 100 --inflight 16 --duration 6 --warmup 2 --source-ips 4 --gateway-pid $GW --json -q 2>&1 | tail -1)"
    kill $GW; wait $GW 2>/dev/null || true
    # shellcheck disable=SC2086
    "$BIN/ringgate" --shards 1 --echo-route true --listen 127.0.0.1:28080 --admin-listen 127.0.0.1:29090 $EXTRA >/dev/null 2>&1 &
    GW=$!; sleep 0.5
    echo "$round $side echo $(taskset -c 1 "$BIN/ringgate-bench" echo -c 100 -s 64 --inflight 16 --duration 6 --warmup 2 --target 127.0.0.1:28080 --route echo --gateway-pid $GW --json -q 2>&1 | tail -1)"
    kill $GW; wait $GW 2>/dev/null || true
  done
done

#!/usr/bin/env bash
# 1:1 delivery across two gateway nodes sharing one Redis (SPEC section 5): every pair of users
# spans the two nodes (even users on node A, odd users on node B), so every message is appended
# by one node and pushed to the other through Redis. For comparison, --same puts both users of
# every pair on node A (same Redis, same processes running).
#
#   redis-server --port 6390 --save "" --appendonly yes --appendfsync always --daemonize yes
#   bench/send_nodes.sh --redis-url redis://127.0.0.1:6390 [--users 100] [--inflight 16] [--shards 1] [--same]
#
# Prints the generator's report (accepted/s, send->accepted and send->msg percentiles, missing,
# duplicates). Loopback only; every run uses its own key prefix.
set -euo pipefail
source "$(dirname "$0")/no_limits.sh"
cd "$(dirname "$0")/.."

REDIS="" U=100 K=16 SHARDS=1 DUR=8 WARM=2 SAME=0 PORT=18480 ADMIN=18490
while [ $# -gt 0 ]; do
  case $1 in
    --redis-url) REDIS=$2; shift 2 ;;
    --users) U=$2; shift 2 ;;
    --inflight) K=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    --duration) DUR=$2; shift 2 ;;
    --same) SAME=1; shift ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$REDIS" ] || { echo "--redis-url is required (see --help)" >&2; exit 2; }
GW=target/release/ringgate
BENCH=target/release/ringgate-bench
[ -x "$GW" ] && [ -x "$BENCH" ] || cargo build --release --workspace --quiet
OUT=$(mktemp -d /tmp/ringgate-send-nodes.XXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
prefix="rgnodes:$$:"
for n in 0 1; do
  "$GW" serve --listen 127.0.0.1:$((PORT + n)) --admin-listen 127.0.0.1:$((ADMIN + n)) \
    --shards "$SHARDS" --node-id "node$n" --redis-url "$REDIS" --redis-key-prefix "$prefix" \
    >"$OUT/node$n.log" 2>&1 &
  pids+=($!)
done
for n in 0 1; do
  for _ in $(seq 100); do grep -q 'listening on' "$OUT/node$n.log" && break; sleep 0.1; done
  grep -q 'listening on' "$OUT/node$n.log" || { echo "node $n did not start:"; cat "$OUT/node$n.log"; exit 1; }
done
odd=(--odd-target 127.0.0.1:$((PORT + 1)))
[ "$SAME" = 1 ] && odd=()
"$BENCH" send --target 127.0.0.1:$PORT "${odd[@]}" --users "$U" --inflight "$K" \
  --duration "$DUR" --warmup "$WARM" --gateway-pid "${pids[0]},${pids[1]}" "$@"
for n in 0 1; do
  echo "node$n: cross-node out $(curl -s 127.0.0.1:$((ADMIN + n))/metrics | awk '/^ringgate_cross_node_out_total/ {s+=$2} END {print s+0}')"
done

#!/usr/bin/env bash
# Bounded smoke run of the load generator against a real gateway: proves bench/ works end to
# end (idle with JWTs, echo on /echo and on /ws, a room fan-out through the backend API). It checks counts via the tools' exit codes
# (any failed connection or missing reply fails); it asserts no timing.
set -euo pipefail
source "$(dirname "$0")/../bench/no_limits.sh"
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
GW=target/$PROFILE/ringgate
BENCH=target/$PROFILE/ringgate-bench
[ -x "$GW" ] && [ -x "$BENCH" ] || cargo build --workspace --quiet $([ "$PROFILE" = release ] && echo --release)
SECRET=smoke-secret-0123456789abcdef
LOG=$(mktemp)
"$GW" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards 2 --jwt-secret "$SECRET" \
  --echo-route true --api-key smoke-test-api-key >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$LOG" && break; sleep 0.1; done
TARGET=$(grep -o 'ws://[0-9.:]*' "$LOG" | head -1 | sed 's#ws://##')
ADMIN=$(grep -o 'admin http://[0-9.:]*' "$LOG" | head -1 | sed 's#admin http://##')
[ -n "$TARGET" ] || { echo "gateway did not start:"; cat "$LOG"; exit 1; }
echo "gateway pid $PID on $TARGET (admin $ADMIN)"

"$BENCH" idle -n 500 --target "$TARGET" --secret "$SECRET" --source-ips 4 --hold 2 --timeout 60 \
  --gateway-pid "$PID" -q
"$BENCH" echo -c 20 -s 64 --inflight 4 --duration 2 --warmup 1 --target "$TARGET" --route echo -q
"$BENCH" echo -c 10 --duration 1 --warmup 1 --target "$TARGET" --route ws --secret "$SECRET" -q
# Every member gets every publish exactly once (exit 1 otherwise).
"$BENCH" fanout --members 200 --publishes 10 --rate 20 --target "$TARGET" --admin "$ADMIN" \
  --api-key smoke-test-api-key --secret "$SECRET" --timeout 30 --grace 10 -q
# The gateway counted what the tools did.
accepted=$(curl -s "http://$ADMIN/metrics" | awk '/^ringgate_connections_accepted_total/ {s+=$2} END {print s}')
echo "gateway accepted $accepted upgrades"
[ "$accepted" -ge 730 ] || { echo "expected >= 730 accepted upgrades, got $accepted"; exit 1; }
kill -TERM $PID
wait $PID
echo "bench smoke: ok (gateway exited 0 after SIGTERM)"

# The connect ramp across processes (issue: a million again): 4 gateways sharing one port x 4
# load generators x 4,000 JWT connections. Fails on any failed connection (a 408 handshake
# timeout among them), on fewer than all open at once, or on a gateway shard whose tick ran
# over a second late; it asserts no rate.
RINGGATE_BIN=$GW BENCH_BIN=$BENCH bash bench/scale.sh -g 4 -l 4 -n 4000 --hold 3 --check
echo "bench smoke: multi-process ramp ok"

# A floor server on a free port: started, reached by the generator (which exits 1 on any failed
# connection, lost or wrong reply), stopped by SIGTERM; one line of its log must match $1. On
# any failure its log is printed, and the server is stopped whatever ends the script.
floor_run() { # expected-line-regex floor-args... -- generator-args...
  local expect=$1; shift
  local args=()
  while [ "$1" != -- ]; do args+=("$1"); shift; done; shift
  FPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  FLOG=$(mktemp)
  "$BENCH" "${args[@]}" --listen "127.0.0.1:$FPORT" >/dev/null 2>"$FLOG" &
  FPID=$!
  trap 'kill $FPID 2>/dev/null || true; rm -f "$FLOG" "$LOG"' EXIT
  floor_failed() { echo "${args[*]}: $1; its log:"; cat "$FLOG"; exit 1; }
  for _ in $(seq 100); do grep -q listening "$FLOG" && break; sleep 0.1; done
  grep -q listening "$FLOG" || floor_failed "did not start"
  "$BENCH" "$@" --target "127.0.0.1:$FPORT" --route echo --gateway-pid "$FPID" -q \
    || floor_failed "the generator failed against it"
  kill -TERM $FPID 2>/dev/null || true
  for _ in $(seq 50); do kill -0 $FPID 2>/dev/null || break; sleep 0.1; done
  kill -0 $FPID 2>/dev/null && floor_failed "did not exit on SIGTERM"
  wait $FPID || floor_failed "exited with an error"
  grep -Eq "$expect" "$FLOG" || floor_failed "no line matches '$expect'"
  trap - EXIT
  rm -f "$FLOG"
}

# The connect benchmark's floor server: 300 upgrades, all held, counted on exit.
floor_run "^upgrade-floor: 300 upgrades" upgrade-floor -- idle -n 300 --hold 1 --timeout 30
echo "bench smoke: upgrade-floor ok"
# The echo benchmark's floor server on each loop: every frame echoed, counted on exit.
for io in epoll uring; do
  floor_run "^echo-floor: [1-9][0-9]* frames echoed" echo-floor --io $io -- \
    echo -c 20 -s 64 --inflight 4 --duration 1 --warmup 1
done
echo "bench smoke: echo-floor ok"

# The store benchmark against a throwaway redis-server on a free port (bounded: 2,000 messages).
RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RDIR=$(mktemp -d)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
  --dir "$RDIR" --daemonize yes >/dev/null
trap 'redis-cli -p $RPORT shutdown nosave >/dev/null 2>&1 || true; rm -rf "$RDIR"' EXIT
for _ in $(seq 100); do [ "$(redis-cli -p "$RPORT" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
"$BENCH" store --redis-url "redis://127.0.0.1:$RPORT" --users 40 --messages 50
echo "bench smoke: store ok"
# Redis' floor in each shape (bounded: 2,000 messages each); it cleans up its keys.
for shape in "" --script --append-only; do
  "$BENCH" redis-floor --redis "127.0.0.1:$RPORT" --users 40 --messages 50 $shape
done
# The fenced floor does its per-pair work once per pair and call: 2 connections x 16 calls
# (1,000 messages each, 64 per call) x the 20 users of each call = 640 each of fence reads,
# fence writes, lengths and directory reads; one dedup record per message.
redis-cli -p "$RPORT" config resetstat >/dev/null
"$BENCH" redis-floor --redis "127.0.0.1:$RPORT" --users 40 --messages 50 --script --fence --batch 64
calls() {
  local n
  n=$(redis-cli -p "$RPORT" info commandstats | sed -n "s/^cmdstat_$1:calls=\([0-9]*\),.*/\1/p")
  echo "${n:-0}"
}
per_pair="$(calls hmget) $(calls hset) $(calls xlen) $(calls smembers)"
[ "$(calls hsetnx)" = 2000 ] && [ "$per_pair" = "640 640 640 640" ] ||
  { echo "redis-floor --fence: per-pair calls $per_pair (want 640 each), HSETNX $(calls hsetnx) (want 2000)"; exit 1; }
left=$(redis-cli -p "$RPORT" --scan --pattern 'rgfloor:*' | wc -l)
[ "$left" -eq 0 ] || { echo "redis-floor left $left keys behind"; exit 1; }
echo "bench smoke: redis-floor ok"
# Where the spill's Redis time goes (bounded: 2,000 messages, one round; its own redis-servers).
COST=$(BIN="$(dirname "$BENCH")" USERS=40 MESSAGES=50 python3 bench/script_cost.py 1)
echo "$COST"
grep -q "the script's own logic" <<<"$COST" || { echo "bench/script_cost.py printed no result"; exit 1; }
echo "bench smoke: script_cost ok"

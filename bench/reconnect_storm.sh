#!/usr/bin/env bash
# A reconnect storm after a gateway restart with Redis (issue 20): USERS users each have
# WAITING messages in their Redis inbox; the gateway is SIGKILLed and started again; then all
# users connect at once (JWT, one handshake in flight per user) and every replayed `msg` is
# acked. Measured: first connect to last `synced` (every waiting message replayed), the
# connect ramp, failures. Prints one JSON line per round (the generator's `idle` output).
# Usage: bench/reconnect_storm.sh [USERS=19000] [WAITING=2] [ROUNDS=1]
#   BIN=<dir with ringgate + ringgate-bench> (default target/release), SHARDS=<n> (default 2),
#   IO_DRIVER=glommio|uring (default: the gateway's own default): before/after of the accept path,
#   SOURCES=<n> source addresses (127.0.0.2 on; default 16): from one source the kernel's search
#   for a free ephemeral port grows with the connections already open, and it bounded the storm
# Redis: a redis-server this script starts on a free loopback port (appendfsync everysec).
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-19000}
WAITING=${2:-2}
ROUNDS=${3:-1}
BIN=${BIN:-target/release}
SHARDS=${SHARDS:-2}
SOURCES=${SOURCES:-16}
DRIVER=()
[ -n "${IO_DRIVER:-}" ] && DRIVER=(--io-driver "$IO_DRIVER")
[ -x "$BIN/ringgate" ] && [ -x "$BIN/ringgate-bench" ] || cargo build --release --quiet --workspace
command -v redis-server >/dev/null || { echo "FATAL: redis-server needed (apt-get install redis-server)" >&2; exit 1; }
# shellcheck source=bench/no_limits.sh
source bench/no_limits.sh
SECRET=storm-secret-0123456789abcdef
KEY=storm-api-key-0123456789
OUT=$(mktemp -d)
# Ports below the kernel's ephemeral range: the gateway is restarted on its port, and one from
# that range can be taken meanwhile as the local port of an outgoing connection.
free_port() {
  python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    p = random.randrange(10000, min(low, 32000))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass'
}
RPORT=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --dir "$OUT" --save "" --appendonly yes \
  --appendfsync everysec --daemonize yes --logfile "$OUT/redis.log"
trap 'redis-cli -p $RPORT shutdown nosave >/dev/null 2>&1 || true; kill $GW 2>/dev/null || true' EXIT

start_gateway() {
  "$BIN/ringgate" --shards "$SHARDS" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN \
    --redis-url redis://127.0.0.1:$RPORT --jwt-secret $SECRET --api-key $KEY "${DRIVER[@]}" \
    >>"$OUT/gateway.log" 2>&1 &
  GW=$!
  for _ in $(seq 100); do
    curl -sf 127.0.0.1:$ADMIN/readyz >/dev/null && return 0
    sleep 0.1
  done
  echo "FATAL: the gateway did not get ready:" >&2; tail -20 "$OUT/gateway.log" >&2; exit 1
}

for round in $(seq "$ROUNDS"); do
  redis-cli -p "$RPORT" flushall >/dev/null
  start_gateway
  # The waiting messages: POST /api/send (answered once safe in Redis), 8 keep-alive clients.
  python3 - "$ADMIN" "$KEY" "$USERS" "$WAITING" <<'PY'
import http.client, json, sys, threading
port, key, users, waiting = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
failed = []
def fill(part):
    c = http.client.HTTPConnection("127.0.0.1", int(port))
    for u in range(part, users, 8):
        for n in range(waiting):
            body = json.dumps({"to": f"u{u}", "cid": f"storm-{u}-{n}", "body": {"n": n}})
            c.request("POST", "/api/send", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status != 200: failed.append(r.status)
ts = [threading.Thread(target=fill, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
if failed: sys.exit(f"{len(failed)} sends refused: {failed[:5]}")
PY
  kill -9 $GW; wait $GW 2>/dev/null || true
  start_gateway
  "$BIN/ringgate-bench" idle -n "$USERS" --concurrency "$USERS" --hold 120 --until-synced \
    --source-ips "$SOURCES" --timeout 300 --target 127.0.0.1:$PORT --secret $SECRET --gateway-pid $GW --json -q \
    2>"$OUT/bench.err" | tail -1 > "$OUT/round.json" || { cat "$OUT/bench.err" >&2; exit 1; }
  python3 - "$OUT/round.json" "$round" "$USERS" "$WAITING" "${IO_DRIVER:-}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); users, waiting = int(sys.argv[3]), int(sys.argv[4])
print(json.dumps({"round": int(sys.argv[2]), "driver": sys.argv[5] or "default", "users": users, "waiting_each": waiting,
  "established": r["established"], "failed": r["failed"], "synced": r["synced"],
  "ramp_secs": r["ramp_secs"], "last_synced_secs": r["last_synced_secs"],
  "msgs_replayed": r["messages_by_op"].get("msg", 0), "expected_msgs": users * waiting,
  "failures": r["failures"]}))
PY
  kill $GW; wait $GW 2>/dev/null || true
done

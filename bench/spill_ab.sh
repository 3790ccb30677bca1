#!/usr/bin/env bash
# A store change's cost in one run: the spill of an older build's `ringgate-bench store`
# (BASE_BIN) and this one's (NEW_BIN, default target/release), alternated round by round,
# each on a fresh redis-server with AOF `appendfsync always` (1,000 users x 200 messages,
# 2 simulated shards). Per run: spill msg/s; Redis's script time (`INFO commandstats`, eval
# and evalsha) and its whole CPU (`INFO cpu`) per message over the run (spill, replay and
# removes); the data directory's bytes per message at the end (the AOF; its automatic rewrite
# is off here, so the bytes are what was logged). Then medians per side.
# Usage: BASE_BIN=/path/to/old/target/release bench/spill_ab.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
BASE=${BASE_BIN:?set BASE_BIN to the target/release directory of the older build}
NEW=${NEW_BIN:-target/release}
command -v redis-server >/dev/null ||
  { echo "FATAL: redis-server needed (apt-get install redis-server redis-tools)" >&2; exit 1; }
OUT=$(mktemp)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # side bin-dir
  local port dir pid line us cpu bytes
  port=$(free_port); dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly yes \
    --appendfsync always --auto-aof-rewrite-percentage 0 --daemonize no >/dev/null 2>&1 & pid=$!
  for _ in $(seq 100); do [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
  line=$("$2/ringgate-bench" store --redis-url "redis://127.0.0.1:$port" --users 1000 \
    --messages 200 --json | tail -1)
  us=$(redis-cli -p "$port" info commandstats | tr -d '\r' | grep -E '^cmdstat_(eval|evalsha):' |
    sed 's/.*usec=\([0-9]*\).*/\1/' | paste -sd+ | bc)
  cpu=$(redis-cli -p "$port" info cpu | tr -d '\r' | grep -E '^used_cpu_(user|sys):' |
    cut -d: -f2 | paste -sd+ | bc)
  bytes=$(du -sb "$dir" | cut -f1)
  kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
  python3 - "$1" "$line" "$us" "$cpu" "$bytes" <<'PY' | tee -a "$OUT"
import json, sys
side, line, us, cpu, size = sys.argv[1:]
b = json.loads(line)
n = b["messages"]
print(json.dumps({"side": side, "spill_per_s": b["spill_per_s"], "script_us": int(us) / n,
                  "redis_cpu_us": float(cpu) * 1e6 / n, "bytes": int(size) / n}))
PY
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then run base "$BASE"; run new "$NEW"; else run new "$NEW"; run base "$BASE"; fi
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda side, k: statistics.median(r[k] for r in runs if r["side"] == side)
for side in ("base", "new"):
    print("%-4s spill %8.0f msg/s  script %6.2f us/msg  redis cpu %6.2f us/msg  %4.0f B/msg" % (
        side, med(side, "spill_per_s"), med(side, "script_us"), med(side, "redis_cpu_us"), med(side, "bytes")))
print("new/base spill: %.2fx" % (med("new", "spill_per_s") / med("base", "spill_per_s")))
PY

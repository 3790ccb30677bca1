#!/usr/bin/env bash
# A change's cost in one run: an older build (BASE_BIN) and this one (NEW_BIN, default
# target/release) alternate under the same loads, each on a fresh gateway:
#   send 100 users x 16 in flight (2 shards), send 10,000 users x 1 in flight (2 shards),
#   echo 100 connections x 16 in flight (1 shard on CPU 0, generator on CPU 1).
# Rate limits off (bench/no_limits.sh). Prints one JSON line per run and, at the end, the
# medians per side: accepted/s (send) or msg/s (echo) and gateway CPU us per message.
# Usage: BASE_BIN=/path/to/old/target/release bench/before_after.sh [ROUNDS] [DURATION]
# (LOADS="send100" for a subset of the loads. BASE_ENV / NEW_ENV: environment settings for one
# side's gateway, e.g. BASE_BIN=target/release BASE_ENV=RINGGATE_HUGE_PAGES=true compares one
# build with and without a setting.)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/no_limits.sh
ROUNDS=${1:-3}
DURATION=${2:-6}
BASE=${BASE_BIN:?set BASE_BIN to the target/release directory of the older build}
NEW=${NEW_BIN:-target/release}
OUT=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # side bin load side-env
  local side=$1 bin=$2 load=$3 port line gw
  local -a side_env=()
  read -r -a side_env <<< "${4:-}"
  port=$(free_port)
  case $load in
    echo) taskset -c 0 env "${side_env[@]}" "$bin/ringgate" --shards 1 --echo-route true --listen 127.0.0.1:$port \
            --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & gw=$! ;;
    *) env "${side_env[@]}" "$bin/ringgate" --shards 2 --listen 127.0.0.1:$port --admin-listen 127.0.0.1:0 \
            >/dev/null 2>&1 & gw=$! ;;
  esac
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  case $load in
    send100) line=$("$NEW/ringgate-bench" send --target 127.0.0.1:$port --users 100 --inflight 16 \
               --duration "$DURATION" --warmup 2 --source-ips 4 --gateway-pid $gw --json -q 2>&1 | tail -1 || true) ;;
    send10k) line=$("$NEW/ringgate-bench" send --target 127.0.0.1:$port --users 10000 --inflight 1 \
               --duration "$DURATION" --warmup 3 --source-ips 8 --gateway-pid $gw --json -q 2>&1 | tail -1 || true) ;;
    echo) line=$(taskset -c 1 "$NEW/ringgate-bench" echo -c 100 -s 64 --inflight 16 --duration "$DURATION" \
               --warmup 2 --target 127.0.0.1:$port --route echo --gateway-pid $gw --json -q 2>&1 | tail -1 || true) ;;
  esac
  kill $gw; wait $gw 2>/dev/null || true
  echo "{\"side\":\"$side\",\"load\":\"$load\",\"bench\":$line}" | tee -a "$OUT/runs.jsonl"
}

for round in $(seq "$ROUNDS"); do
  for load in ${LOADS:-send100 send10k echo}; do
    if [ $((round % 2)) = 1 ]; then order="base new"; else order="new base"; fi
    for side in $order; do
      if [ $side = base ]; then run base "$BASE" $load "${BASE_ENV:-}"; else run new "$NEW" $load "${NEW_ENV:-}"; fi
    done
  done
done

python3 - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(side, load, key):
    xs = [r["bench"].get(key) for r in runs if r["side"] == side and r["load"] == load]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
print("\nmedians (new / base)")
for load, rate, cpu in [("send100", "accepted_per_sec", "gateway_cpu_us_per_msg"),
                        ("send10k", "accepted_per_sec", "gateway_cpu_us_per_msg"),
                        ("echo", "msgs_per_sec", "gateway_cpu_us_per_msg")]:
    b, n = med("base", load, rate), med("new", load, rate)
    bc, nc = med("base", load, cpu), med("new", load, cpu)
    fmt = lambda x: "n/a" if x is None else "%.2f" % x
    ratio = lambda a, c: "n/a" if not a or not c else "%.3f" % (c / a)
    print(f"  {load:8s} rate base {fmt(b)} new {fmt(n)} ({ratio(b, n)}x)   cpu us/msg base {fmt(bc)} new {fmt(nc)} ({ratio(bc, nc)}x)")
PY
echo "runs: $OUT/runs.jsonl"

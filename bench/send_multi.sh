#!/usr/bin/env bash
# 1:1 delivery (send -> accepted -> msg -> ack) with many users over several gateway processes.
#
# Every process here may be capped in open files (this project's VMs: 20,000 per process), so
# the users are spread over G gateway processes (one shard each, own port and admin port,
# pinned round-robin to the CPUs) with one load generator per gateway. Users talk in pairs on
# the same gateway: until the cluster exists (issue 6) a gateway is one node, and a message to
# a user on another node would wait in that node's inbox.
#
#   bench/send_multi.sh -g 6 -u 16000 --inflight 1           # ~100,000 connected users
#   bench/send_multi.sh -g 6 -u 16000 --rate 8000             # each generator offers 8,000 sends/s
#   bench/send_multi.sh -g 2 -u 1000 --duration 3             # a quick look
#   bench/send_multi.sh -g 2 -u 1000 --redis-url redis://127.0.0.1:6390   # durable store
#
# Prints each generator's line and the totals: connected users, accepted/s (sum), the median
# and the worst of the generators' send->accepted and send->msg p50/p99, missing, duplicates.
set -euo pipefail
source "$(dirname "$0")/no_limits.sh"
cd "$(dirname "$0")/.."

G=2 U=1000 K=1 DUR=8 WARM=2 PORT=18080 ADMIN_BASE=18200 REDIS="" RATE=0
while [ $# -gt 0 ]; do
  case $1 in
    -g) G=$2; shift 2 ;;
    -u) U=$2; shift 2 ;;
    --inflight) K=$2; shift 2 ;;
    --duration) DUR=$2; shift 2 ;;
    --warmup) WARM=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --redis-url) REDIS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$G" -le 100 ] || { echo "at most 100 gateways (ports $PORT.. and $ADMIN_BASE..)" >&2; exit 2; }
[ $((U % 2)) -eq 0 ] || { echo "-u must be even (users talk in pairs)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed to add up the results" >&2; exit 2; }

GW=target/release/ringgate
BENCH=target/release/ringgate-bench
[ -x "$GW" ] && [ -x "$BENCH" ] || cargo build --release --workspace --quiet
OUT=$(mktemp -d /tmp/ringgate-send-multi.XXXX)
NCPU=$(nproc)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

gw_pids=()
for ((i = 0; i < G; i++)); do
  extra=()
  [ -n "$REDIS" ] && extra=(--redis-url "$REDIS" --redis-key-prefix "rgmulti:$$:$i:")
  taskset -c $((i % NCPU)) "$GW" serve --listen 127.0.0.1:$((PORT + i)) \
    --admin-listen 127.0.0.1:$((ADMIN_BASE + i)) --shards 1 --node-id "gw$i" "${extra[@]}" \
    >"$OUT/gw$i.log" 2>&1 &
  pids+=($!); gw_pids+=($!)
done
for ((i = 0; i < G; i++)); do
  for _ in $(seq 100); do grep -q 'listening on' "$OUT/gw$i.log" && break; sleep 0.1; done
  grep -q 'listening on' "$OUT/gw$i.log" || { echo "gateway $i did not start:"; cat "$OUT/gw$i.log"; exit 1; }
done
echo "started $G gateways; $G generators x $U users, $K in flight each, rate $RATE/s per generator (0 = closed loop), ${WARM}s warm-up, ${DUR}s window"
gen_pids=()
for ((i = 0; i < G; i++)); do
  taskset -c $(((i + 1) % NCPU)) "$BENCH" send --target 127.0.0.1:$((PORT + i)) --users "$U" \
    --inflight "$K" --rate "$RATE" --duration "$DUR" --warmup "$WARM" --timeout 120 --handshake-timeout 60 \
    --sources "127.2.$i.2-127.2.$i.9" --user-prefix "g${i}u" --gateway-pid "${gw_pids[$i]}" \
    --json --quiet >"$OUT/gen$i.json" 2>"$OUT/gen$i.err" &
  pids+=($!); gen_pids+=($!)
done
status=0
for p in "${gen_pids[@]}"; do wait "$p" || status=1; done

python3 - "$OUT" "$G" <<'EOF'
import json, statistics, sys
out, g = sys.argv[1], int(sys.argv[2])
runs = []
for i in range(g):
    lines = [l for l in open(f"{out}/gen{i}.json") if l.startswith("{")]
    if not lines:
        print(f"generator {i}: no result (see {out}/gen{i}.err)")
        continue
    r = json.loads(lines[-1]); runs.append(r)
    a, m = r["accepted_latency_us"], r["msg_latency_us"]
    print(f"gen {i}: connected {r['connected']}, accepted/s {r['accepted_per_sec']:.0f}, "
          f"accepted p50/p99 {a['p50']/1e3:.1f}/{a['p99']/1e3:.1f} ms, msg p50/p99 {m['p50']/1e3:.1f}/{m['p99']/1e3:.1f} ms, "
          f"gateway CPU {r['gateway_cpu_us_per_msg']:.1f} us/msg, missing {r['missing']}, duplicates {r['duplicates']}, ok {r['ok']}")
if runs:
    med = lambda k, f: statistics.median(x[k][f] for x in runs) / 1e3
    worst = lambda k, f: max(x[k][f] for x in runs) / 1e3
    print(f"TOTAL: {sum(r['connected'] for r in runs)} connected users on {len(runs)} gateways, "
          f"{sum(r['accepted_per_sec'] for r in runs):.0f} accepted/s, "
          f"send->accepted p50 median {med('accepted_latency_us','p50'):.1f} ms, p99 median {med('accepted_latency_us','p99'):.1f} / worst {worst('accepted_latency_us','p99'):.1f} ms, "
          f"send->msg p99 median {med('msg_latency_us','p99'):.1f} ms, "
          f"missing {sum(r['missing'] for r in runs)}, duplicates {sum(r['duplicates'] for r in runs)}")
EOF
echo "logs: $OUT"
exit $status

#!/usr/bin/env bash
# Room fan-out beyond one process: G gateway nodes sharing one Redis (one shard each, pinned
# round-robin to the CPUs) and G load generators, each holding M members of one room on its own
# node. Generator 0 also publishes (POST /api/publish on node 0); the others only receive. Every
# body carries a host-wide monotonic timestamp, so the script merges the generators' per-offset
# slowest member into publish -> last member over the whole room.
#
#   redis-server --port 6390 --save "" --appendonly no --daemonize yes
#   bench/fanout_multi.sh --redis-url redis://127.0.0.1:6390 -g 6 -m 16700 --publishes 20 --rate 1
#
# Loopback only. Each process stays under this VM's 20,000 open files (M <= ~19,000).
set -euo pipefail
source "$(dirname "$0")/no_limits.sh"
cd "$(dirname "$0")/.."

REDIS="" G=2 M=1000 P=20 RATE=1 PORT=18780 ADMIN=18880
while [ $# -gt 0 ]; do
  case $1 in
    --redis-url) REDIS=$2; shift 2 ;;
    -g) G=$2; shift 2 ;;
    -m) M=$2; shift 2 ;;
    --publishes) P=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$REDIS" ] || { echo "--redis-url is required (see --help)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed to merge the results" >&2; exit 2; }
GW=target/release/ringgate
BENCH=target/release/ringgate-bench
[ -x "$GW" ] && [ -x "$BENCH" ] || cargo build --release --workspace --quiet
OUT=$(mktemp -d /tmp/ringgate-fanout-multi.XXXX)
NCPU=$(nproc)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
prefix="rgfanmulti:$$:"
gw_pids=()
for ((i = 0; i < G; i++)); do
  taskset -c $((i % NCPU)) "$GW" serve --listen 127.0.0.1:$((PORT + i)) --admin-listen 127.0.0.1:$((ADMIN + i)) \
    --shards 1 --node-id "fan$i" --api-key bench-api-key-0123 --redis-url "$REDIS" --redis-key-prefix "$prefix" \
    >"$OUT/gw$i.log" 2>&1 &
  pids+=($!); gw_pids+=($!)
done
for ((i = 0; i < G; i++)); do
  for _ in $(seq 100); do curl -sf 127.0.0.1:$((ADMIN + i))/readyz >/dev/null && break; sleep 0.1; done
  curl -sf 127.0.0.1:$((ADMIN + i))/readyz >/dev/null || { echo "node $i not ready:"; cat "$OUT/gw$i.log"; exit 1; }
done
echo "$G nodes ready; $G generators x $M members, $P publishes at $RATE/s"
common=(--room big --publishes "$P" --rate "$RATE" --admin 127.0.0.1:$ADMIN --api-key bench-api-key-0123 --timeout 120 --grace 30 --json)
gen=()
for ((i = 1; i < G; i++)); do
  taskset -c $(((i + 1) % NCPU)) "$BENCH" fanout --members-only --target 127.0.0.1:$((PORT + i)) -m "$M" \
    --user-prefix "g${i}m" --sources "127.3.$i.2-127.3.$i.9" --gateway-pid "${gw_pids[$i]}" "${common[@]}" \
    >"$OUT/gen$i.json" 2>"$OUT/gen$i.err" &
  pids+=($!); gen+=($!)
done
# The receivers join first; then generator 0 joins its members and publishes.
for ((i = 1; i < G; i++)); do
  for _ in $(seq 1200); do grep -q "members joined" "$OUT/gen$i.err" 2>/dev/null && break; sleep 0.1; done
done
"$BENCH" fanout --target 127.0.0.1:$PORT -m "$M" --user-prefix g0m --sources "127.3.0.2-127.3.0.9" \
  --gateway-pid "${gw_pids[0]}" "${common[@]}" >"$OUT/gen0.json" 2>"$OUT/gen0.err" || true
for p in "${gen[@]}"; do wait "$p" || true; done

python3 - "$OUT" "$G" <<'PY'
import json, sys
out, g = sys.argv[1], int(sys.argv[2])
runs = []
for i in range(g):
    lines = [l for l in open(f"{out}/gen{i}.json") if l.startswith("{")]
    if not lines:
        sys.exit(f"generator {i}: no result (see {out}/gen{i}.err)")
    runs.append(json.loads(lines[-1]))
pub = runs[0]
joined = sum(r["joined"] for r in runs)
worst, count = {}, {}
for r in runs:
    for off, n, w in r["by_offset"]:
        worst[off] = max(worst.get(off, 0), w)
        count[off] = count.get(off, 0) + n
offsets = [o for o, _, _ in pub["by_offset"]]
complete = sorted(worst[o] / 1e6 for o in offsets if count.get(o, 0) >= joined)
def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
for i, r in enumerate(runs):
    print(f"generator {i}: joined {r['joined']} deliveries {r['deliveries']} missing {r['missing']} "
          f"duplicates {r['duplicates']} holes {r['holes']} gaps {r['gaps']} last member here p99 {r['last_member_ms']['p99']:.1f} ms")
print(f"room of {joined} members over {g} nodes: {len(offsets)} publishes, {len(complete)} reached every member")
print(f"publish -> last member over the whole room: p50 {pct(complete, 0.5):.1f} ms  p99 {pct(complete, 0.99):.1f} ms  max {max(complete) if complete else float('nan'):.1f} ms")
bad = sum(r["missing"] + r["duplicates"] + r["holes"] for r in runs)
print("result", "OK" if bad == 0 and len(complete) == len(offsets) == pub["publishes"] else "FAILED")
PY

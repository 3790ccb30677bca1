#!/usr/bin/env bash
# SPEC section 8's raw-frame budgets in one run: `/echo`, 100 connections x 64-byte text, with
# 1 and 16 messages in flight, server pinned to CPU 0, the same generator on CPU 1, against
# uWebSockets' EchoServer (bench/uws.sh builds it outside this repository). Every side runs
# in each round, their order reversed every other round; the summary gives medians and
# ratios (ringgate / uWebSockets).
#   messages/s, server CPU us per message (from /proc, over the measured window) and the part
#   of it spent in the kernel (the same for every server that moves the same bytes over the
#   same sockets: a server whose kernel time alone exceeds a CPU budget cannot meet it),
#   syscalls per echoed message (perf stat -e raw_syscalls:sys_enter on the server, over
#   warmup + window: an upper bound, setup calls included).
# Usage: bench/echo_vs_uws.sh [ROUNDS] [DURATION_SECS]
#   BASE_BIN=<dir with ringgate + ringgate-bench>  adds an older ringgate build as a side
#   (before/after a change).
#   Sides: uws, ringgate (io_driver = "glommio"), ringgate-uring (io_driver =
#   "uring", the shard's own io_uring: docs/architecture.md, "Socket I/O on io_uring"), and
#   two floors (`ringgate-bench echo-floor`, the least server work the frames need): floor-epoll
#   on uWebSockets' system calls, floor-uring on the uring driver's. A CPU budget below what
#   the floor of a pattern costs cannot be met on that pattern on this kernel.
#   SIDES="ringgate-uring base" runs only those (a before/after without the references).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-6}
WARMUP=2
NEW=target/release
[ -x $NEW/ringgate ] && [ -x $NEW/ringgate-bench ] || cargo build --release --quiet --workspace
UWS=$(bash bench/uws.sh)
command -v perf >/dev/null || { echo "FATAL: perf needed for syscall counts (apt-get install linux-perf)" >&2; exit 1; }
OUT=$(mktemp -d)
if [ -z "${SIDES:-}" ]; then
  SIDES="uws ringgate ringgate-uring floor-epoll floor-uring"
  [ -n "${BASE_BIN:-}" ] && SIDES="$SIDES base"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# uWebSockets has no rate limits: ringgate's per-connection frame and per-address limits are
# off for the comparison (their own cost: bench/limits_cost.sh).
NO_LIMITS="--conn-frame-rate 0 --ip-connect-rate 0 --ip-max-open 0"

start_server() { # side -> sets SRV (pid) and PORT
  local port; port=$(free_port)
  case $1 in
    uws) (cd "$OUT" && exec taskset -c 0 "$UWS" >/dev/null 2>&1) & SRV=$!; PORT=9001 ;;
    ringgate) taskset -c 0 $NEW/ringgate --shards 1 --echo-route true --io-driver glommio $NO_LIMITS --listen 127.0.0.1:$port \
        --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & SRV=$!; PORT=$port ;;
    ringgate-uring) taskset -c 0 $NEW/ringgate --shards 1 --echo-route true --io-driver uring $NO_LIMITS \
        --listen 127.0.0.1:$port --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & SRV=$!; PORT=$port ;;
    floor-epoll|floor-uring) taskset -c 0 $NEW/ringgate-bench echo-floor --io ${1#floor-} --batch-wait-us 50 --listen 127.0.0.1:$port \
        >/dev/null 2>&1 & SRV=$!; PORT=$port ;;
    base) taskset -c 0 "$BASE_BIN/ringgate" --shards 1 --echo-route true $NO_LIMITS --listen 127.0.0.1:$port \
        --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & SRV=$!; PORT=$port ;;
  esac
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "FATAL: $1 did not listen on $PORT" >&2; exit 1
}

for round in $(seq "$ROUNDS"); do
  # Alternate the order of the sides from round to round (a fixed order skews the sides).
  sides=$SIDES
  [ $((round % 2)) = 0 ] && sides=$(echo $SIDES | tr ' ' '\n' | tac | tr '\n' ' ')
  for inflight in 1 16; do
    for side in $sides; do
      start_server $side
      perf stat -x, -e raw_syscalls:sys_enter -p $SRV -o "$OUT/perf" -- sleep $((DURATION + WARMUP)) &
      PERF=$!
      line=$(taskset -c 1 $NEW/ringgate-bench echo -c 100 -s 64 --inflight $inflight \
        --duration "$DURATION" --warmup $WARMUP --target 127.0.0.1:$PORT --route echo \
        --gateway-pid $SRV --json -q 2>&1 | tail -1)
      wait $PERF || true
      syscalls=$(awk -F, '/raw_syscalls/ {print $1}' "$OUT/perf")
      kill $SRV; wait $SRV 2>/dev/null || true
      echo "{\"round\":$round,\"side\":\"$side\",\"inflight\":$inflight,\"syscalls\":${syscalls:-null},\"bench\":$line}" | tee -a "$OUT/runs.jsonl"
    done
  done
done

python3 - "$OUT/runs.jsonl" "$DURATION" "$WARMUP" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
duration, warmup = float(sys.argv[2]), float(sys.argv[3])
def med(side, inflight, f):
    xs = [f(r) for r in runs if r["side"] == side and r["inflight"] == inflight]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
rate = lambda r: r["bench"].get("msgs_per_sec")
cpu = lambda r: r["bench"].get("gateway_cpu_us_per_msg")
kern = lambda r: r["bench"].get("gateway_kernel_us_per_msg")
# Replies over warmup + window, estimated from the window's rate.
sysc = lambda r: r["syscalls"] / (r["bench"]["msgs_per_sec"] * (duration + warmup)) if r["syscalls"] and r["bench"].get("msgs_per_sec") else None
order = ["uws", "ringgate", "ringgate-uring", "base", "floor-epoll", "floor-uring"]
sides = sorted({r["side"] for r in runs}, key=order.index)
print("\nmedians of %d rounds (server on CPU 0, generator on CPU 1, 100 conns x 64 B)" % max(r["round"] for r in runs))
for inflight in (1, 16):
    for s in sides:
        print("  inflight %2d  %-14s  %10.0f msg/s  %6.2f us/msg (kernel %5.2f)  %5.3f syscalls/msg" % (
            inflight, s, med(s, inflight, rate) or 0, med(s, inflight, cpu) or 0, med(s, inflight, kern) or 0,
            med(s, inflight, sysc) or 0))
    u = lambda f: med("uws", inflight, f)
    # The floors (what the kernel allows each pattern) print beside the gateways, without the
    # budget: a CPU budget below a floor's own CPU cannot be met by a server on that pattern.
    for s in sides[1:] if "uws" in sides else []:
        g = lambda f: med(s, inflight, f)
        budget = "" if s.startswith("floor") else "  (budget: msg/s >= 1, cpu <= 0.8)"
        if u(rate) and g(rate) and u(cpu) and g(cpu):
            print("  inflight %2d  %s/uws: msg/s %.2fx  cpu/msg %.2fx, its kernel time alone %.2fx%s" % (
                inflight, s, g(rate) / u(rate), g(cpu) / u(cpu), (g(kern) or 0) / u(cpu), budget))
    for s, f in (("ringgate-uring", "floor-uring"), ("ringgate", "floor-epoll")):
        g = lambda x: med(s, inflight, x)
        h = lambda x: med(f, inflight, x)
        if g(cpu) and h(cpu):
            print("  inflight %2d  %s/%s: cpu/msg %.2fx (what the gateway adds to its pattern's floor)" % (
                inflight, s, f, g(cpu) / h(cpu)))
PY
echo "runs: $OUT/runs.jsonl"

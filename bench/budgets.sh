#!/usr/bin/env bash
# SPEC section 8's budgets that are not about the raw echo path, each as a ratio against its
# reference measured in the same run (the echo budgets: bench/echo_vs_uws.sh). Sides alternate
# within each round, every side on a fresh server; the summary gives medians and ratios.
#   idle    memory per idle connection and connects per second, one core for the server
#           (CPU 0), the generator on CPU 1, N connections: ringgate (JWT-authenticated /ws,
#           one shard, each io_driver) against uWebSockets' EchoServer (plain upgrades).
#           W warm-up connections (default 500) are opened first and held through the run:
#           the per-connection figure is then what N more connections add (marginal), without
#           the one-time costs of the first ones (the binary's code that the ramp runs for the
#           first time becomes resident page cache). The figure from the server's start, over
#           all W + N connections, is printed beside it. Beside the connect rate: the server's
#           CPU per upgrade over the ramp (its own cost, whatever else bounds the rate), and
#           the same generator against `ringgate-bench upgrade-floor` (the least an upgrade
#           needs of a server, on CPU 0 too): the rate the generator and kernel allow.
#   fanout  one room of M members on a 2-shard gateway: publish -> last member p99, against
#           `ringgate-bench floor` (the kernel writing one frame to M loopback sockets) with
#           frames of the size ringgate's members got (the same transfers), and beside it the
#           floor with 80-byte frames that runs before 2026-12-06 compared against.
#   send    1:1 at U users x 1 in flight (2 shards, embedded store): gateway CPU per accepted
#           message, against three times the floor's CPU per delivery (send in, msg out, ack
#           in; the floor's figure counts both ends of a transfer, the gateway's only its own).
#   spill   the Redis store's spill rate (`ringgate-bench store`), against
#           `ringgate-bench redis-floor --script` (an atomic check-and-append, the least an
#           exactly-once spill can do), both on a fresh redis-server with AOF appendfsync always.
#           Beside it, at ringgate's batch size (1,024 per call), the floor itself and
#           `redis-floor --script --fence`: the floor plus the least ringgate's contract adds
#           per pair and call (order fence read and written, inbox length for the cap, node
#           directory), to tell the contract's cost from the implementation's (not budgets).
#           The same store run gives the replay rate (every inbox loaded, with its read mark).
# Usage: bench/budgets.sh [ROUNDS] [PARTS...]      (default: 3 rounds, all parts)
#   N (idle connections, default 19000), M (members, 9000), U (users, 10000) from the
#   environment. Every process here is capped at 20,000 open files, so no side exceeds it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
shift || true
PARTS=${*:-idle fanout send spill}
N=${N:-19000}
W=${W:-500}
M=${M:-9000}
U=${U:-10000}
NEW=target/release
[ -x $NEW/ringgate ] && [ -x $NEW/ringgate-bench ] || cargo build --release --quiet --workspace
source bench/no_limits.sh
S=bench-secret-0123456789abcdef
KEY=bench-api-key-0123456789
OUT=$(mktemp -d)
UWS=
case " $PARTS " in *" idle "*) UWS=$(bash bench/uws.sh) ;; esac
case " $PARTS " in *" spill "*) command -v redis-server >/dev/null ||
  { echo "FATAL: redis-server needed for the spill part (apt-get install redis-server)" >&2; exit 1; } ;; esac

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done
  echo "FATAL: nothing listens on $1" >&2; exit 1
}
record() { # part side json-line [more json fields, each with a leading comma]
  local line=${3:-null}
  [ -n "$line" ] || line=null
  echo "{\"part\":\"$1\",\"side\":\"$2\",\"bench\":$line${4:-}}" | tee -a "$OUT/runs.jsonl"
}
status_bytes() { awk -v f="$2:" '$1 == f {print $2 * 1024}' /proc/$1/status; } # pid VmRSS|RssAnon
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

idle() { # side
  local port pid line
  case $1 in
    uws) (cd "$OUT" && exec taskset -c 0 "$UWS" >/dev/null 2>&1) & pid=$!; port=9001 ;;
    ringgate-*) port=$(free_port)
      taskset -c 0 $NEW/ringgate --shards 1 --io-driver "${1#ringgate-}" --jwt-secret $S \
        --listen 127.0.0.1:$port --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & pid=$! ;;
    floor) port=$(free_port)
      taskset -c 0 $NEW/ringgate-bench upgrade-floor --listen 127.0.0.1:$port >/dev/null 2>&1 &
      pid=$! ;;
  esac
  wait_port $port
  local route=(--route ws --secret $S)
  [ "$1" = uws ] || [ "$1" = floor ] && route=(--route echo)
  local start_rss start_anon warm_pid= held=$OUT/warm-held
  start_rss=$(status_bytes $pid VmRSS); start_anon=$(status_bytes $pid RssAnon)
  if [ "$W" -gt 0 ]; then
    # The warm-up: W users of their own, held until the measured run is over.
    touch "$held"
    taskset -c 1 $NEW/ringgate-bench idle -n "$W" --target 127.0.0.1:$port "${route[@]}" \
      --user-offset 1000000 --hold 0 --hold-while "$held" --timeout 600 --json -q \
      >"$OUT/warm.json" 2>/dev/null &
    warm_pid=$!
    local open=0
    for _ in $(seq 100); do
      open=$(ss -Htn state established "( sport = :$port )" | wc -l)
      [ "$open" -ge "$W" ] && break
      sleep 0.1
    done
    [ "$open" -ge "$W" ] || echo "WARNING: only $open of $W warm-up connections open; this run will not count" >&2
    sleep 1 # the server's collection after a wave (src/alloc.rs) runs before the baseline
  fi
  line=$(taskset -c 1 $NEW/ringgate-bench idle -n "$N" --target 127.0.0.1:$port "${route[@]}" \
    --source-ips 8 --gateway-pid $pid --hold 6 --timeout 120 --json -q 2>/dev/null | tail -1 || true)
  rm -f "$held"
  local warm_alive=0 # the warm-up's connections still open when it let go (else no marginal figure)
  if [ -n "$warm_pid" ]; then
    wait $warm_pid || true
    # Counted only if it held all of them to the end, not cut short by its own timeout.
    warm_alive=$(python3 -c 'import json,sys; w = json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(0 if w["hold_truncated"] else w["alive_at_end"])' \
      "$OUT/warm.json" 2>/dev/null || echo 0)
  fi
  stop $pid
  record idle "$1" "$line" ",\"warmup\":$W,\"warm_alive\":${warm_alive:-0},\"start_rss\":${start_rss:-null},\"start_anon\":${start_anon:-null}"
}

fanout() { # side
  local port admin pid line
  case $1 in
    ringgate) port=$(free_port); admin=$(free_port)
      $NEW/ringgate --shards 2 --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin \
        --api-key $KEY >/dev/null 2>&1 & pid=$!
      wait_port $port
      line=$($NEW/ringgate-bench fanout --target 127.0.0.1:$port --admin 127.0.0.1:$admin \
        --api-key $KEY --members "$M" --publishes 40 --rate 4 --source-ips 4 --threads 2 \
        --gateway-pid $pid --json -q 2>/dev/null | tail -1 || true)
      stop $pid ;;
    # The same transfers without a gateway: frames of the bytes ringgate's members got (its
    # run comes first in round 1), and, as in runs before 2026-12-06, 80-byte frames.
    floor) local bytes
      bytes=$(python3 -c 'import json,sys
runs = [json.loads(l) for l in open(sys.argv[1])]
b = [r["bench"]["frame_bytes"] for r in runs if r["part"] == "fanout" and r["side"] == "ringgate"
     and r["bench"] and r["bench"].get("frame_bytes")]
print(round(b[-1]) if b else "")' "$OUT/runs.jsonl")
      [ -n "$bytes" ] || { echo "FATAL: no ringgate fanout run gave its frame size" >&2; exit 1; }
      line=$($NEW/ringgate-bench floor --sockets "$M" --writers 2 --rounds 40 --pause-ms 250 \
        --bytes "$bytes" --json 2>/dev/null | tail -1 || true) ;;
    floor80) line=$($NEW/ringgate-bench floor --sockets "$M" --writers 2 --rounds 40 --pause-ms 250 \
        --bytes 80 --json 2>/dev/null | tail -1 || true) ;;
  esac
  record fanout "$1" "$line"
}

send() { # side
  local port pid line
  case $1 in
    ringgate) port=$(free_port)
      $NEW/ringgate --shards 2 --listen 127.0.0.1:$port --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & pid=$!
      wait_port $port
      line=$($NEW/ringgate-bench send --target 127.0.0.1:$port --users "$U" --inflight 1 \
        --duration 6 --warmup 3 --source-ips 8 --gateway-pid $pid --json -q 2>/dev/null | tail -1 || true)
      stop $pid ;;
    # The floor holds two descriptors per socket: at most 9,000 fit in one process here; its
    # CPU per delivery moved little from 9,000 to 100,000 sockets (docs/performance.md).
    floor) line=$($NEW/ringgate-bench floor --sockets $((U > 9000 ? 9000 : U)) --writers 2 --rounds 40 \
        --pause-ms 100 --json 2>/dev/null | tail -1 || true) ;;
  esac
  record send "$1" "$line"
}

spill() { # side
  local port dir pid line
  port=$(free_port); dir=$(mktemp -d)
  redis-server --port $port --dir "$dir" --save "" --appendonly yes --appendfsync always \
    --daemonize no >/dev/null 2>&1 & pid=$!
  wait_port $port
  case $1 in
    ringgate) line=$($NEW/ringgate-bench store --redis-url redis://127.0.0.1:$port --users 1000 \
        --messages 200 --json 2>/dev/null | tail -1 || true) ;;
    floor) line=$($NEW/ringgate-bench redis-floor --redis 127.0.0.1:$port --script --json \
        2>/dev/null | tail -1 || true) ;;
    floor1024) line=$($NEW/ringgate-bench redis-floor --redis 127.0.0.1:$port --script \
        --batch 1024 --json 2>/dev/null | tail -1 || true) ;;
    fence) line=$($NEW/ringgate-bench redis-floor --redis 127.0.0.1:$port --script --fence \
        --batch 1024 --json 2>/dev/null | tail -1 || true) ;;
  esac
  stop $pid; rm -rf "$dir"
  record spill "$1" "$line"
}

for round in $(seq "$ROUNDS"); do
  for part in $PARTS; do
    case $part in
      idle) sides="uws ringgate-glommio ringgate-uring floor" ;;
      fanout) sides="ringgate floor floor80" ;;
      spill) sides="ringgate floor floor1024 fence" ;;
      *) sides="ringgate floor" ;;
    esac
    # Alternate the order of the sides from round to round.
    [ $((round % 2)) = 0 ] && sides=$(echo $sides | tr ' ' '\n' | tac | tr '\n' ' ')
    for side in $sides; do $part $side; done
  done
done

python3 - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(part, side, f):
    xs = []
    for r in runs:
        if r["part"] == part and r["side"] == side and r["bench"]:
            try:
                x = f(r["bench"])
            except (KeyError, TypeError):
                x = None
            if x is not None:
                xs.append(x)
    return statistics.median(xs) if xs else None
def ratio(a, b):
    return "n/a" if not a or not b else "%.2fx" % (a / b)
fmt = lambda x, f="%.1f": "n/a" if x is None else f % x
parts = {r["part"] for r in runs}
print("\nmedians of alternated runs (ratios: ringgate / reference)")
if "idle" in parts:
    # A run counts when nothing failed or was lost, the warm-up's connections included.
    def idle_med(side, f):
        xs = []
        for r in runs:
            b = r["bench"]
            if r["part"] != "idle" or r["side"] != side or not b or b.get("failed") != 0 or b.get("lost") != 0:
                continue
            if r.get("warm_alive", 0) < r.get("warmup", 0):
                continue
            try:
                x = f(r, b)
            except (KeyError, TypeError):
                x = None
            if x is not None:
                xs.append(x)
        return statistics.median(xs) if xs else None
    sides = ("uws", "ringgate-glommio", "ringgate-uring")
    mem = lambda r, b: b["gateway"]["rss_per_conn_end"]
    rate = lambda r, b: b["connect_rate_avg"]
    u_mem, u_rate = idle_med("uws", mem), idle_med("uws", rate)
    warm = max((r.get("warmup", 0) for r in runs if r["part"] == "idle"), default=0)
    print("  idle     per connection added after %d warm-up connections (resident memory):" % warm)
    print("  idle     uws               %s B per idle connection, %s upgrades/s (plain)" % (fmt(u_mem, "%.0f"), fmt(u_rate, "%.0f")))
    for s in sides[1:]:
        m, r = idle_med(s, mem), idle_med(s, rate)
        print("  idle     %-17s %s B per idle connection (%s, budget <= 1x), %s JWT upgrades/s (%s, budget >= 1x)" % (
            s, fmt(m, "%.0f"), ratio(m, u_mem), fmt(r, "%.0f"), ratio(r, u_rate)))
    # What an upgrade costs the server over the ramp (its CPU-time clock): the rate is shared with
    # the generator on the other CPU, this is the server's own side of it.
    cpc = lambda r, b: b["gateway"].get("cpu_us_per_connect")
    u_cpc = idle_med("uws", cpc)
    print("  idle     server CPU per upgrade over the ramp: uws %s us" % fmt(u_cpc) + "".join(
        ", %s %s us (%s)" % (s, fmt(idle_med(s, cpc)), ratio(idle_med(s, cpc), u_cpc))
        for s in sides[1:]))
    # The generator against the least server: what it and the kernel allow. A side near it is
    # bound by them, not by its own work (that is its CPU per upgrade, above).
    f_rate, f_cpc = idle_med("floor", rate), idle_med("floor", cpc)
    print("  idle     upgrade floor (the least server, same generator): %s upgrades/s, %s us CPU per upgrade; of its rate: uws %s" % (
        fmt(f_rate, "%.0f"), fmt(f_cpc), ratio(u_rate, f_rate)) + "".join(
        ", %s %s" % (s, ratio(idle_med(s, rate), f_rate)) for s in sides[1:]))
    # The same runs counting anonymous memory only (RssAnon: heap and stacks, without the
    # binaries' page-cache pages): the part a connection's state can occupy, a steadier figure.
    anon = lambda r, b: b["gateway"].get("anon_per_conn_end")
    u_anon = idle_med("uws", anon)
    print("  idle     anonymous memory only: uws %s B" % fmt(u_anon, "%.0f") + "".join(
        ", %s %s B (%s)" % (s, fmt(idle_med(s, anon), "%.0f"), ratio(idle_med(s, anon), u_anon))
        for s in sides[1:]))
    # From the server's start over all its connections: the first ones' one-time costs (code
    # first run, now resident page cache) spread over them.
    total = lambda r, b: b["requested"] + r.get("warmup", 0)
    start = lambda r, b: (b["gateway"]["rss_end"] - r["start_rss"]) / total(r, b)
    u_start = idle_med("uws", start)
    print("  idle     from the server's start (warm-up included): uws %s B" % fmt(u_start, "%.0f") + "".join(
        ", %s %s B (%s)" % (s, fmt(idle_med(s, start), "%.0f"), ratio(idle_med(s, start), u_start))
        for s in sides[1:]))
if "fanout" in parts:
    g = med("fanout", "ringgate", lambda b: b["last_member_ms"]["p99"] if b.get("missing") == 0 else None)
    f = med("fanout", "floor", lambda b: b["last_read_ms"]["p99"])
    f80 = med("fanout", "floor80", lambda b: b["last_read_ms"]["p99"])
    fb = med("fanout", "floor", lambda b: b["bytes"])
    c = med("fanout", "ringgate", lambda b: b.get("gateway_cpu_us_per_delivery"))
    gen = med("fanout", "ringgate", lambda b: b.get("generator_cpu_us_per_delivery"))
    fw = med("fanout", "floor", lambda b: b.get("writer_cpu_us_per_delivery"))
    fr = med("fanout", "floor", lambda b: b.get("reader_cpu_us_per_delivery"))
    print("  fanout   last member p99 %s ms, floor last read p99 %s ms (%s-byte frames, as ringgate's): %s (budget <= 1.2x)" % (
        fmt(g), fmt(f), fmt(fb, "%.0f"), ratio(g, f)))
    print("  fanout   against the floor with 80-byte frames (runs before 2026-12-06): %s ms, %s" % (fmt(f80), ratio(g, f80)))
    # Both sides share the 2 CPUs with their receivers: the sums are what the latency follows.
    print("  fanout   CPU per delivery: gateway %s + generator %s us, floor writers %s + reader %s us" % (
        fmt(c, "%.2f"), fmt(gen, "%.2f"), fmt(fw, "%.2f"), fmt(fr, "%.2f")))
if "send" in parts:
    g = med("send", "ringgate", lambda b: b["gateway_cpu_us_per_msg"])
    a = med("send", "ringgate", lambda b: b["accepted_per_sec"])
    f = med("send", "floor", lambda b: b["cpu_us_per_delivery"])
    f3 = 3 * f if f else None
    print("  send     %s accepted/s, gateway %s us CPU per message; floor %s us per transfer x 3 = %s us: %s (budget <= 1.3x)" % (
        fmt(a, "%.0f"), fmt(g, "%.2f"), fmt(f, "%.2f"), fmt(f3, "%.2f"), ratio(g, f3)))
if "spill" in parts:
    g = med("spill", "ringgate", lambda b: b["spill_per_s"])
    f = med("spill", "floor", lambda b: b["per_s"])
    f1 = med("spill", "floor1024", lambda b: b["per_s"])
    fc = med("spill", "fence", lambda b: b["per_s"])
    print("  spill    %s msg/s, redis-floor --script %s msg/s: %s (budget >= 0.85x; AOF always)" % (fmt(g, "%.0f"), fmt(f, "%.0f"), ratio(g, f)))
    print("  spill    at ringgate's 1,024 per call: the floor %s msg/s; the contract's least work (--fence) %s msg/s, %s of it and %s of the budget's floor; ringgate %s of it" % (
        fmt(f1, "%.0f"), fmt(fc, "%.0f"), ratio(fc, f1), ratio(fc, f), ratio(g, fc)))
    r = med("spill", "ringgate", lambda b: b["replay_per_s"])
    print("  replay   %s msg/s (each load's entries and its read mark; budget >= 500,000/s, SPEC's one absolute figure here)" % fmt(r, "%.0f"))
PY
echo "runs: $OUT/runs.jsonl"

#!/usr/bin/env bash
# Many idle connections across several gateway and load-generator processes on one host.
#
# Every process here may be capped in open files (this project's CI VMs: 20,000 per process),
# so the total is spread: G gateway processes share one public port (SO_REUSEPORT across
# processes, each with its own admin port, each pinned to one CPU), and L load generators
# open N connections each from their own loopback source addresses.
#
#   bench/scale.sh -g 64 -l 53 -n 19000 --hold 60      # toward 1,000,000 connections
#   bench/scale.sh -g 2 -l 2 -n 5000 --hold 5           # a quick look
#   bench/scale.sh -g 4 -l 4 -n 4000 --hold 3 --check   # the CI guard (tests/bench_smoke.sh)
#   bench/scale.sh -g 64 -l 53 -n 19000 --hold 30 --hold-all   # all 1,007,000 open at once
#   --pin-generators: pin load generators to CPUs in turn too (default: they float)
#
# Gateways are pinned (one per CPU in turn, like shards); load generators float, as clients on
# other hosts would not share a gateway's core: pinned (--pin-generators) they could not move
# away from a CPU that something else (the VM's agent, the sampler) loaded, and there they
# sent their requests late enough for 408s.
# --hold-all: every generator holds past its own --hold until all connections are open and
# parked (the settled memory is sampled then), or until no new one opened for 60 s (some
# failed); without it, early generators close before the last ones finish their ramp.
# --check exits 1 when a connection failed (e.g. a 408 handshake timeout), fewer than all were
# open at once, or a gateway shard's tick ran over a second late (ringgate_shard_stalls_total);
# it asserts no rate.
# Prints per-phase totals: established, failed, connections open on the gateways (from their
# /metrics), gateway RSS per connection (sum over gateways), kernel memory per connection
# (/proc/meminfo Slab; on loopback both ends' sockets count), and what stopped it if it fell short.
set -euo pipefail
source "$(dirname "$0")/no_limits.sh"
cd "$(dirname "$0")/.."

# Ports stay below the ephemeral range (32768-60999 by default) so no outgoing socket holds them.
G=4 L=4 N=5000 HOLD=10 PORT=17080 ADMIN_BASE=17100 HB=30000 RATE=0 CONC=500 CHECK=0 HOLD_ALL=0 PIN_GEN=0
while [ $# -gt 0 ]; do
  case $1 in
    -g) G=$2; shift 2 ;;
    -l) L=$2; shift 2 ;;
    -n) N=$2; shift 2 ;;
    --hold) HOLD=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --heartbeat-ms) HB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --concurrency) CONC=$2; shift 2 ;;
    --check) CHECK=1; shift ;;
    --hold-all) HOLD_ALL=1; shift ;;
    --pin-generators) PIN_GEN=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$L" -le 250 ] || { echo "at most 250 load generators (one 127.1.X.0/24 source block each)" >&2; exit 2; }

# RINGGATE_BIN / BENCH_BIN run other builds (e.g. an older commit's, to compare back to back).
GW=${RINGGATE_BIN:-target/release/ringgate}
BENCH=${BENCH_BIN:-target/release/ringgate-bench}
[ -x "$GW" ] && [ -x "$BENCH" ] || cargo build --release --workspace --quiet
SECRET=scale-secret-0123456789abcdef
OUT=$(mktemp -d /tmp/ringgate-scale.XXXX)
NCPU=$(nproc)
pids=() gw_pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  # A gateway drains for up to 10 s; one still there after 20 s is stuck (230f97e had such a
  # shard, asleep in io_uring_enter): say so and kill it, so it cannot hold the port.
  local i p alive
  for i in $(seq 200); do
    alive=0
    for p in "${gw_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for i in "${!gw_pids[@]}"; do
    if kill -0 "${gw_pids[$i]}" 2>/dev/null; then
      echo "gateway $i did not exit 20 s after SIGTERM: killed" >&2
      kill -9 "${gw_pids[$i]}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

meminfo() { awk -v k="$1:" '$1==k {print $2}' /proc/meminfo; }
# "open parked": connections open on all gateways, and how many of them are parked.
open_total() {
  # One curl for all gateways: a sampler that forks two processes per gateway every two
  # seconds took a visible share of a 2-core host from the processes it measures.
  curl -s "${metric_urls[@]}" |
    awk '/^ringgate_connections_open/ {o+=$2} /^ringgate_connections_parked/ {p+=$2} END {print o+0, p+0}'
}
rss_total() {
  # One awk over all status files (not one process per gateway, see open_total).
  awk '/^VmRSS/ {s+=$2} END {print s+0}' "${gw_status[@]}"
}

# TCP counters of the whole host (nstat -a: since boot), read before and after the run.
tcp_counters() {
  command -v nstat >/dev/null || { echo "(nstat not installed)"; return 0; }
  { nstat -az 2>/dev/null || true; } | awk '$1 ~ /^TcpExt(ListenOverflows|TCPSynRetrans|TCPTimeouts)$/ {printf "%s=%s ", substr($1, 7), $2}'
}
# Loopback packets dropped (2nd column) and softirq runs cut short (3rd) per CPU, from
# /proc/net/softnet_stat; and the CPU time of the ksoftirqd threads that take over when
# softirq work outgrows its budget (they then compete with every other runnable thread).
softnet() {
  local i=0 _a b c _r
  while read -r _a b c _r; do printf 'cpu%d=%d/%d ' $i $((16#$b)) $((16#$c)); i=$((i + 1)); done </proc/net/softnet_stat
}
ksoftirqd_secs() {
  local p s=0
  for p in $(pgrep -x 'ksoftirqd/[0-9]+'); do s=$((s + $(awk '{print $14 + $15}' /proc/$p/stat))); done
  echo $((s / $(getconf CLK_TCK)))
}
# Busy jiffies per CPU (user+nice+system+irq+softirq+steal) from /proc/stat.
cpu_busy() { awk '/^cpu[0-9]/ {printf "%s=%d ", $1, $2+$3+$4+$7+$8+$9}' /proc/stat; }
slab0=$(meminfo Slab); avail0=$(meminfo MemAvailable)
tcp0=$(tcp_counters); busy0=$(cpu_busy); softnet0=$(softnet); ksoft0=$(ksoftirqd_secs)
metric_urls=()
for ((i = 0; i < G; i++)); do metric_urls+=("http://127.0.0.1:$((ADMIN_BASE + i))/metrics"); done
gw_pids=() gw_status=()
for ((i = 0; i < G; i++)); do
  # One port shared by every gateway on purpose (SO_REUSEPORT): --share-listen says so.
  taskset -c $((i % NCPU)) "$GW" serve --listen 127.0.0.1:$PORT --share-listen true --admin-listen 127.0.0.1:$((ADMIN_BASE + i)) \
    --shards 1 --jwt-secret "$SECRET" --heartbeat-ms "$HB" --node-id "gw$i" >"$OUT/gw$i.log" 2>&1 &
  pids+=($!); gw_pids+=($!); gw_status+=("/proc/$!/status")
done
for ((i = 0; i < G; i++)); do
  for _ in $(seq 100); do grep -q 'listening on' "$OUT/gw$i.log" && break; sleep 0.1; done
  grep -q 'listening on' "$OUT/gw$i.log" || { echo "gateway $i did not start:"; cat "$OUT/gw$i.log"; exit 1; }
done
sleep 1
rss0=$(rss_total)
echo "started $G gateways (rss $((rss0 / 1024)) MiB total), $L load generators x $N connections"
HOLDING=$OUT/holding
hold_args=()
if [ "$HOLD_ALL" = 1 ]; then touch "$HOLDING"; hold_args=(--hold-while "$HOLDING"); fi
t0=$(date +%s.%N)
for ((i = 0; i < L; i++)); do
  pin=()
  [ "$PIN_GEN" = 1 ] && pin=(taskset -c $((i % NCPU)))
  "${pin[@]}" "$BENCH" idle -n "$N" --target 127.0.0.1:$PORT --secret "$SECRET" \
    --sources "127.1.$i.2-127.1.$i.9" --user-offset $((i * N)) --rate "$RATE" --concurrency "$CONC" \
    --hold "$HOLD" --timeout $((HOLD + 1800)) --handshake-timeout 60 --allow-failures --json -q "${hold_args[@]}" \
    >"$OUT/lg$i.json" 2>"$OUT/lg$i.err" &
  pids+=($!)
done
# Sample while the load generators ramp and hold.
peak=0 settled_rss= settled_since= last_rise=$(date +%s)
while true; do
  running=0
  for ((i = 0; i < L; i++)); do kill -0 "${pids[$((G + i))]}" 2>/dev/null && running=$((running + 1)); done
  read -r open parked < <(open_total)
  if [ "$open" -gt "$peak" ]; then
    peak=$open; peak_rss=$(rss_total); peak_slab=$(meminfo Slab); peak_avail=$(meminfo MemAvailable)
    peak_t=$(date +%s.%N); last_rise=$(date +%s)
  fi
  # Settled: the peak is open and every connection parked (memory given back, see alloc.rs).
  if [ "$open" -eq "$peak" ] && [ "$parked" -eq "$open" ] && [ "$open" -gt 0 ]; then
    settled_rss=$(rss_total); settled_since=${settled_since:-$(date +%s)}
  else
    settled_since=
  fi
  # --hold-all: release the generators once all are open and parked, or the ramp has ended.
  if [ -e "$HOLDING" ]; then
    # (all parked for 6 s: the allocator has given back what the park waves freed, alloc.rs)
    if { [ "$open" -eq $((L * N)) ] && [ -n "$settled_since" ] && [ $(($(date +%s) - settled_since)) -ge 6 ]; } || [ $(($(date +%s) - last_rise)) -ge 60 ]; then
      rm -f "$HOLDING"
      echo "released the generators after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s ($open open, $parked parked)"
    fi
  fi
  [ "$running" -eq 0 ] && break
  sleep 2
done
# Shard stalls (a tick over a second late) seen by the gateways, read before they stop.
stalls=0 stall_max=0 nudges=0 timeouts=0
declare -A cpu_stalls=() cpu_gap=() cpu_secs=() cpu_timeouts=()
hz=$(getconf CLK_TCK)
for ((c = 0; c < NCPU; c++)); do cpu_stalls[$c]=0 cpu_gap[$c]=0 cpu_secs[$c]=0 cpu_timeouts[$c]=0; done
for ((i = 0; i < G; i++)); do
  m=$(curl -s "http://127.0.0.1:$((ADMIN_BASE + i))/metrics")
  c=$((i % NCPU))
  s=$(awk '/^ringgate_shard_stalls_total/ {s+=$2} END {print s+0}' <<<"$m")
  t=$(awk '/^ringgate_handshake_timeouts_total/ {s+=$2} END {print s+0}' <<<"$m")
  stalls=$((stalls + s)); timeouts=$((timeouts + t))
  cpu_stalls[$c]=$((${cpu_stalls[$c]:-0} + s)); cpu_timeouts[$c]=$((${cpu_timeouts[$c]:-0} + t))
  nudges=$((nudges + $(awk '/^ringgate_shard_watchdog_nudges_total/ {s+=$2} END {print s+0}' <<<"$m")))
  v=$(awk '/^ringgate_shard_stall_max_seconds/ {if ($2>s) s=$2} END {printf "%d", s * 1000}' <<<"$m")
  [ "$v" -gt "$stall_max" ] && stall_max=$v
  [ "$v" -gt "${cpu_gap[$c]:-0}" ] && cpu_gap[$c]=$v
  cpu_secs[$c]=$((${cpu_secs[$c]:-0} + $(awk '{print $14 + $15}' /proc/${gw_pids[$i]}/stat)))
done
echo "gateway shard stalls (tick over 1 s late): $stalls, longest tick gap $stall_max ms, watchdog nudges $nudges, handshake timeouts (408) $timeouts"
for ((c = 0; c < NCPU && c < G; c++)); do
  echo "  gateways pinned to cpu$c: stalls ${cpu_stalls[$c]}, longest gap ${cpu_gap[$c]} ms, 408s ${cpu_timeouts[$c]}, cpu time $((${cpu_secs[$c]} / hz)) s"
done
echo "host TCP counters before: $tcp0"
echo "host TCP counters after:  $(tcp_counters)"
echo "loopback backlog dropped/squeezed per CPU before: $softnet0"
echo "loopback backlog dropped/squeezed per CPU after:  $(softnet)"
echo "ksoftirqd CPU time: $(($(ksoftirqd_secs) - ksoft0)) s"
echo "busy jiffies per CPU before: $busy0"
echo "busy jiffies per CPU after:  $(cpu_busy) (${hz}/s)"
python3 - "$OUT" "$L" "$NCPU" <<'PY'
import json, sys, glob
out, L, ncpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
est = failed = 0; fails = {}; rates = []; pings = 0; by_cpu = {}
for i in range(L):
    lines = [l for l in open(f"{out}/lg{i}.json") if l.startswith("{")]
    if not lines:
        print(f"load generator {i} printed no result:", open(f"{out}/lg{i}.err").read()[-500:]); continue
    r = json.loads(lines[-1])
    est += r["established"]; failed += r["failed"]; pings += r.get("pings_answered", 0)
    rates.append(r["connect_rate_avg"])
    c = by_cpu.setdefault(i % ncpu, {"failed": 0, "p99": []})
    c["failed"] += r["failed"]; c["p99"].append(r["handshake_ms"]["p99"])
    for k, v in r["failures"].items(): fails[k] = fails.get(k, 0) + v
print(f"load generators: established {est}, failed {failed} {fails}, pings answered {pings}")
open(f"{out}/failed", "w").write(str(failed))
rates.sort()
print(f"connect rate per generator (avg over its ramp): median {rates[len(rates)//2]:.0f}/s" if rates else "")
for cpu, c in sorted(by_cpu.items()):
    p99 = sorted(c["p99"])
    print(f"  generators number {cpu} mod {ncpu} (pinned to cpu{cpu} with --pin-generators): failed {c['failed']}, handshake p99 median {p99[len(p99)//2]:.0f} ms")
PY
echo "peak connections open on the gateways: $peak (after $(python3 -c "print(round($peak_t-$t0,1))") s)"
if [ "$peak" -gt 0 ]; then
  echo "gateway RSS: $((rss0 / 1024)) -> $((peak_rss / 1024)) MiB total, $(((peak_rss - rss0) * 1024 / peak)) B per connection"
  [ -n "$settled_rss" ] && echo "gateway RSS with all $peak parked (last sample): $((settled_rss / 1024)) MiB, $(((settled_rss - rss0) * 1024 / peak)) B per connection"
  echo "kernel Slab: $((slab0 / 1024)) -> $((peak_slab / 1024)) MiB, $(((peak_slab - slab0) * 1024 / peak)) B per connection (both loopback ends)"
  echo "MemAvailable: $((avail0 / 1024)) -> $((peak_avail / 1024)) MiB"
fi
grep -h "accept failed" "$OUT"/gw*.log | sort | uniq -c | head -5 || true
echo "logs and per-process JSON in $OUT"
if [ "$CHECK" = 1 ]; then
  failed=$(cat "$OUT/failed" 2>/dev/null || echo unknown)
  want=$((L * N))
  problems=()
  [ "$failed" = 0 ] || problems+=("$failed connections failed")
  [ "$peak" -ge "$want" ] || problems+=("only $peak of $want open at once")
  [ "$stalls" = 0 ] || problems+=("$stalls shard stalls (longest tick gap $stall_max ms)")
  if [ ${#problems[@]} -gt 0 ]; then
    printf 'scale check FAILED: %s\n' "${problems[@]}"
    exit 1
  fi
  echo "scale check: ok ($want connections over $G gateways, 0 failed, no shard stall)"
fi

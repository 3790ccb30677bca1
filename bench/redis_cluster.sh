#!/usr/bin/env bash
# A local Redis Cluster of N primaries (no replicas) on loopback, for the benches that take a
# `--redis-url`: prints the `redis-cluster://` URL to use. Data in /tmp/ringgate-rcluster.<port>.
#
#   bench/redis_cluster.sh start [--primaries 3] [--port 7100] [--fsync always|everysec|none]
#   bench/redis_cluster.sh stop [--primaries 3] [--port 7100]
#
# Ports PORT..PORT+N-1 and their bus ports (+10000) must be free. Needs redis-server and
# redis-cli >= 7.0.
set -euo pipefail
source "$(dirname "$0")/no_limits.sh"

CMD=${1:-}; shift || true
N=3 PORT=7100 FSYNC=always
while [ $# -gt 0 ]; do
  case $1 in
    --primaries) N=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --fsync) FSYNC=$2; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ports=$(seq "$PORT" $((PORT + N - 1)))
case $CMD in
  start)
    nodes=()
    for p in $ports; do
      dir=/tmp/ringgate-rcluster.$p
      rm -rf "$dir"; mkdir -p "$dir"
      if [ "$FSYNC" = none ]; then persist=(--appendonly no); else persist=(--appendonly yes --appendfsync "$FSYNC"); fi
      redis-server --port "$p" --bind 127.0.0.1 --save "" "${persist[@]}" --dir "$dir" \
        --cluster-enabled yes --cluster-node-timeout 2000 --daemonize yes --logfile "$dir/log"
      nodes+=("127.0.0.1:$p")
    done
    for p in $ports; do
      until [ "$(redis-cli -p "$p" PING 2>/dev/null)" = PONG ]; do sleep 0.05; done
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for p in $ports; do
      until redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
    done
    url="redis-cluster://127.0.0.1:$PORT?"
    for p in $ports; do [ "$p" = "$PORT" ] || url+="node=127.0.0.1:$p&"; done
    echo "${url%&}"
    ;;
  stop)
    for p in $ports; do redis-cli -p "$p" SHUTDOWN NOSAVE >/dev/null 2>&1 || true; rm -rf "/tmp/ringgate-rcluster.$p"; done
    ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac

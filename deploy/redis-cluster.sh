#!/usr/bin/env bash
# A local Redis Cluster of three primaries (no replicas) for development and CI:
#
#   deploy/redis-cluster.sh start   # prints the REDIS_URL to use, e.g.
#                                   # redis+cluster://127.0.0.1:7001?addr=127.0.0.1:7002&addr=127.0.0.1:7003
#   deploy/redis-cluster.sh stop
#
# Ports: REDIS_CLUSTER_PORTS (default "7001 7002 7003"); data and logs under
# REDIS_CLUSTER_DIR (default /tmp/upcoach-redis-cluster). Nothing is kept on disk:
# `start` after `stop` makes a fresh, empty cluster. `start` on a running, healthy
# cluster leaves it as it is.
set -euo pipefail

ports=(${REDIS_CLUSTER_PORTS:-7001 7002 7003})
dir=${REDIS_CLUSTER_DIR:-/tmp/upcoach-redis-cluster}

url() {
  local first=${ports[0]} rest=() p
  for p in "${ports[@]:1}"; do rest+=("addr=127.0.0.1:$p"); done
  local query
  query=$(IFS='&'; echo "${rest[*]}")
  echo "redis+cluster://127.0.0.1:$first${query:+?$query}"
}

healthy() {
  redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

stop() {
  local p
  for p in "${ports[@]}"; do
    redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}

start() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
    echo "redis-server and redis-cli are needed (Debian package redis-server)" >&2
    exit 1
  }
  if healthy; then
    url
    return
  fi
  stop
  mkdir -p "$dir"
  local p
  for p in "${ports[@]}"; do
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind 127.0.0.1 --daemonize yes \
      --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" \
      --cluster-node-timeout 5000 --save "" --appendonly no \
      --dir "$dir/$p" --logfile "$dir/$p/redis.log" >/dev/null
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 1 50); do
      redis-cli -p "$p" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  local nodes=()
  for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2
    exit 1
  }
  # Every node must agree the cluster is whole before clients use it.
  for p in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -p "$p" cluster info | grep -q '^cluster_state:ok' || {
      echo "node $p does not report cluster_state:ok" >&2
      exit 1
    }
  done
  url
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Two (or more) upcoach reference-server processes behind nginx, sharing Redis and
# PostgreSQL: round robin, no sticky sessions, WebSocket and SSE proxied.
#
#   REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
#     deploy/scale-out.sh [--processes N] [--listen 127.0.0.1:8080] [-- server flags, e.g. --dev]
#
# Builds the server (release), starts the processes on 127.0.0.1 at the ports after the
# listen port (never on the listen host: clients reach them only through nginx),
# renders deploy/nginx/upcoach.conf.in into target/scale-out/ and runs nginx in the
# foreground; Ctrl-C stops everything. nginx connects to the processes from 127.0.0.2,
# and only that address is in their TRUSTED_PROXIES. AUTH_SIGNING_KEY is made up (and
# shared) when unset, so a token from one process is good on every other.
# Needs nginx (Debian: apt-get install nginx-light).
set -euo pipefail
cd "$(dirname "$0")/.."

processes=2
listen=127.0.0.1:8080
server_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes=$2; shift 2 ;;
    --listen) listen=$2; shift 2 ;;
    --) shift; server_args=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
: "${REDIS_URL:?set REDIS_URL: the processes share Redis}"
: "${DATABASE_URL:?set DATABASE_URL: the processes share PostgreSQL}"
command -v nginx >/dev/null || { echo "nginx is missing (apt-get install nginx-light)" >&2; exit 1; }
if [ -z "${AUTH_SIGNING_KEY:-}" ]; then
  AUTH_SIGNING_KEY=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
fi
export REDIS_URL DATABASE_URL AUTH_SIGNING_KEY
export TRUSTED_PROXIES=127.0.0.2
export UPCOACH_PUBLIC_URL=${UPCOACH_PUBLIC_URL:-http://$listen}

cargo build --release -q -p upcoach-server
target_dir=${CARGO_TARGET_DIR:-target}
run_dir=$PWD/target/scale-out
mkdir -p "$run_dir"
port=${listen##*:}
pids=()
servers=""
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
for i in $(seq 1 "$processes"); do
  addr=127.0.0.1:$((port + i))
  UPCOACH_ADDR=$addr "$target_dir/release/upcoach-server" "${server_args[@]}" \
    2> "$run_dir/server-$i.log" &
  pids+=($!)
  servers+="        server $addr max_fails=1 fail_timeout=2s;"$'\n'
  echo "process $i: http://$addr (log: $run_dir/server-$i.log)"
done
sed -e "s|@LISTEN@|$listen|g" -e "s|@PROXY_BIND@|127.0.0.2|g" -e "s|@RUN_DIR@|$run_dir|g" \
  deploy/nginx/upcoach.conf.in | awk -v servers="${servers%$'\n'}" '{ if ($0 == "@SERVERS@") print servers; else print }' \
  > "$run_dir/nginx.conf"
echo "nginx: http://$listen (config: $run_dir/nginx.conf)"
nginx -p "$run_dir" -c "$run_dir/nginx.conf" -e "$run_dir/error.log" -g 'daemon off;' &
pids+=($!)
wait -n "${pids[@]}"
echo "a process ended; stopping the rest" >&2

#!/usr/bin/env bash
# HTTP throughput of the reference server's GET /health with the timing layer on and off,
# beside a bare hyper server and the same bare server behind upcoach's rate-limit layer,
# in the same run, with wrk on loopback.
#
#   benches/http_load.sh                 # 3 rounds of 10 s, 64 connections
#   ROUNDS=5 DURATION=20s CONNECTIONS=128 benches/http_load.sh
#
# The load generator and the servers share this machine's cores, so absolute figures are
# pessimistic; the ratios are the result. Needs wrk (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-18181}
URL="http://127.0.0.1:$PORT/health"

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet -p upcoach-server --bins
cargo build --release --quiet --example bare_hyper
SERVER=target/release/upcoach-server
BARE=target/release/examples/bare_hyper

wait_for_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $PORT" >&2
  return 1
}

# run NAME COMMAND... : start the server, load it, stop it, print requests/s.
run() {
  local name=$1; shift
  env -u REDIS_URL -u DATABASE_URL UPCOACH_ADDR="127.0.0.1:$PORT" RUST_LOG=warn "$@" >/dev/null 2>&1 &
  local pid=$!
  wait_for_port
  wrk -t1 -c"$CONNECTIONS" -d2s "$URL" >/dev/null   # warm-up
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$URL")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$name $rps $p99"
}

results=$(mktemp)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run layer_on  env PERFORMANCE_MONITORING_ENABLED=true  "$SERVER" | tee -a "$results" >&2
  run layer_off env PERFORMANCE_MONITORING_ENABLED=false "$SERVER" | tee -a "$results" >&2
  run bare_hyper "$BARE" | tee -a "$results" >&2
  run bare_limited env BARE_WITH_RATE_LIMIT=1 "$BARE" | tee -a "$results" >&2
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
on=$(awk '$1=="layer_on" {print $2}' "$results" | median)
off=$(awk '$1=="layer_off" {print $2}' "$results" | median)
bare=$(awk '$1=="bare_hyper" {print $2}' "$results" | median)
limited=$(awk '$1=="bare_limited" {print $2}' "$results" | median)
echo
echo "GET /health, $CONNECTIONS connections, $ROUNDS rounds of $DURATION (median requests/s):"
printf '  layer on   %10.0f\n  layer off  %10.0f\n  bare hyper %10.0f\n  bare + rate-limit layer %10.0f\n' "$on" "$off" "$bare" "$limited"
awk -v on="$on" -v off="$off" -v bare="$bare" 'BEGIN {
  printf "  on/off     %10.3f   (goal >= 0.95)\n  off/bare   %10.3f\n  on/bare    %10.3f\n", on/off, off/bare, on/bare }'
# Each round runs the three servers back to back, so a round's own ratios cancel the
# machine's slower and faster minutes; their median is the steadier figure.
paired() {
  awk -v a="$1" -v b="$2" '$1==a {x[++n]=$2} $1==b {y[++m]=$2} END {for (i=1; i<=n; i++) print x[i]/y[i]}' "$results" | median
}
echo "Median of the rounds' own ratios:"
printf '  on/off     %10.3f\n  off/bare   %10.3f\n  limited/bare %8.3f   (goal >= 0.95)\n' "$(paired layer_on layer_off)" "$(paired layer_off bare_hyper)" "$(paired bare_limited bare_hyper)"
rm -f "$results"

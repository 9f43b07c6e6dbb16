#!/usr/bin/env bash
# HTTP throughput of the reference server's GET /health with the timing layer on and off,
# beside a bare hyper server and the same bare server behind upcoach's rate-limit layer,
# and of an authenticated GET the response cache answers (an admin bearer on
# /api/analytics/security-events), in the same run, with wrk on loopback.
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
AUTH_PATH=${AUTH_PATH:-/api/analytics/security-events}

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

# run NAME COMMAND... : start the server, load it, stop it, print requests/s. With
# AUTHED=1, the load is GET $AUTH_PATH with an admin bearer from POST /dev/token (the
# server must run with --dev); no token, or a refused one, stops the script.
run() {
  local name=$1; shift
  env -u REDIS_URL -u DATABASE_URL UPCOACH_ADDR="127.0.0.1:$PORT" RUST_LOG=warn "$@" >/dev/null 2>&1 &
  local pid=$!
  wait_for_port
  local url=$URL header=()
  if [[ ${AUTHED:-0} == 1 ]]; then
    url="http://127.0.0.1:$PORT$AUTH_PATH"
    local token
    token=$(curl -s -XPOST "http://127.0.0.1:$PORT/dev/token" -H 'content-type: application/json' -d '{"roles":["admin"]}' \
      | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
    [[ -n $token ]] || { echo "no token from POST /dev/token (is --dev on?)" >&2; kill -TERM "$pid"; return 1; }
    header=(-H "Authorization: Bearer $token")
    # Only 2xx answers count: wrk reports the others as "Non-2xx".
    curl -sf -o /dev/null "${header[@]}" "$url" || { echo "$url refused the token" >&2; kill -TERM "$pid"; return 1; }
  fi
  wrk -t1 -c"$CONNECTIONS" -d2s "${header[@]}" "$url" >/dev/null   # warm-up
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "$url")
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
  # An authenticated GET the response cache answers (X-Cache: HIT after the first):
  # every request still verifies its bearer, a token seen before from memory.
  AUTHED=1 run authed_cached "$SERVER" --dev | tee -a "$results" >&2
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
on=$(awk '$1=="layer_on" {print $2}' "$results" | median)
off=$(awk '$1=="layer_off" {print $2}' "$results" | median)
bare=$(awk '$1=="bare_hyper" {print $2}' "$results" | median)
limited=$(awk '$1=="bare_limited" {print $2}' "$results" | median)
authed=$(awk '$1=="authed_cached" {print $2}' "$results" | median)
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
echo "GET $AUTH_PATH with an admin bearer, cached (median requests/s):"
printf '  ours       %10.0f\n  ours/bare  %10.3f   (goal >= 0.7)\n' "$authed" "$(paired authed_cached bare_hyper)"
rm -f "$results"

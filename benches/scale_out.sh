#!/usr/bin/env bash
# What the nginx hop costs: GET /health and a static file (/dashboard/icon.svg) through
# nginx to two reference-server processes (deploy/scale-out.sh), against one of those
# processes directly, alternating in the same run, with wrk on loopback.
#
#   REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
#     benches/scale_out.sh                # 3 rounds of 8 s, 64 connections
#   ROUNDS=5 DURATION=20s CONNECTIONS=128 benches/scale_out.sh
#
# nginx, both processes and wrk share this machine's cores, so the ratio (through nginx
# / direct) is the result, not the absolute figures. Needs nginx and wrk
# (apt-get install nginx-light wrk).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
LISTEN=${LISTEN:-127.0.0.1:18280}
host=${LISTEN%:*} port=${LISTEN##*:}
direct=$host:$((port + 1))

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
mkdir -p target/scale-out
deploy/scale-out.sh --listen "$LISTEN" > target/scale-out/bench.log 2>&1 &
deploy=$!
trap 'kill $deploy 2>/dev/null; wait $deploy 2>/dev/null || true' EXIT
for target in "$LISTEN" "$direct"; do
  for _ in $(seq 1 1200); do
    curl -fsS -o /dev/null "http://$target/health" 2>/dev/null && break
    kill -0 $deploy 2>/dev/null || { cat target/scale-out/bench.log >&2; exit 1; }
    sleep 0.25
  done
done

# load URL: prints "requests/s p99"
load() {
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$1" | awk '
    /Requests\/sec/ { rps = $2 }
    /^ +99%/ { p99 = $2 }
    /Non-2xx/ { bad = $NF }
    END { if (bad) { print "non-2xx answers: " bad > "/dev/stderr"; exit 1 } print rps, p99 }'
}

printf '%-22s %6s %14s %10s\n' path round req/s p99
for path in /health /dashboard/icon.svg; do
  ratios=()
  for round in $(seq 1 "$ROUNDS"); do
    read -r d_rps d_p99 < <(load "http://$direct$path")
    read -r n_rps n_p99 < <(load "http://$LISTEN$path")
    ratio=$(awk -v n="$n_rps" -v d="$d_rps" 'BEGIN { printf "%.3f", n / d }')
    ratios+=("$ratio")
    printf '%-22s %6s %14s %10s   one process direct\n' "$path" "$round" "$d_rps" "$d_p99"
    printf '%-22s %6s %14s %10s   nginx, two processes (%sx)\n' "$path" "$round" "$n_rps" "$n_p99" "$ratio"
  done
  median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  echo "$path: through nginx / direct, median of $ROUNDS rounds: ${median}x"
done

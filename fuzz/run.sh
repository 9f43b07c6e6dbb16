#!/usr/bin/env bash
# Runs every fuzz target of upcoach for a while: `fuzz/run.sh [seconds-per-target] [target...]`
# (default 60 seconds, every target). Stable Rust: cargo-fuzz's nightly flags are allowed
# by RUSTC_BOOTSTRAP=1. Installs cargo-fuzz if it is missing.
#
# Each target starts from its seeds (fuzz/seeds/<target>) and from every input kept
# after a finding (fuzz/regressions/<target>); what it learns goes to fuzz/corpus/<target>
# (not committed). A crash stops that target, leaves the input in
# fuzz/artifacts/<target>/, and makes this script exit 1 after the others ran. Copy the
# input to fuzz/regressions/<target>/ once fixed: `cargo test --test fuzz_regressions`
# replays it from then on, on stable Rust, without libFuzzer.
#
# The last lines printed are one per target: seconds, executions, corpus size, outcome.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true

if ! command -v cargo-fuzz >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  cargo install cargo-fuzz --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# No sanitizer: the workspace forbids `unsafe`, so AddressSanitizer would find little in
# our code at twice the cost; libFuzzer still catches panics, timeouts and memory growth.
fuzz=(cargo fuzz)
build_flags=(--sanitizer none)
# UPCOACH_FUZZ_DEV=1 builds without optimisation: a cold build takes a fraction of the
# time and each input runs several times slower, which suits a short smoke run (CI).
if [ "${UPCOACH_FUZZ_DEV:-0}" = 1 ]; then
  build_flags+=(--dev)
fi

"${fuzz[@]}" build "${build_flags[@]}"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi

summary=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  inputs=("corpus/$target")
  for dir in "seeds/$target" "regressions/$target"; do
    [ -d "$dir" ] && inputs+=("$dir")
  done
  dict=()
  [ -f "dicts/$target.dict" ] && dict=("-dict=dicts/$target.dict")
  log="corpus/$target.log"
  started=$(date +%s)
  if "${fuzz[@]}" run "${build_flags[@]}" "$target" "${inputs[@]}" -- \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -max_len=16384 \
      -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
    outcome=ok
  else
    outcome="FAILED (see fuzz/$log and fuzz/artifacts/$target/)"
    failed=1
  fi
  took=$(($(date +%s) - started))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  corpus=$(find "corpus/$target" -type f | wc -l)
  line="$target: ${took}s, ${execs:-?} executions, corpus ${corpus}, $outcome"
  echo "$line"
  summary+=("$line")
done

echo
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"

#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30), starting from and adding
# to the corpus kept in fuzz/corpus/<target>/. A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/. Needs the nightly toolchain (cargo-fuzz's sanitizers) and
# cargo-fuzz, which this script installs if it is missing.
#   bash scripts/fuzz.sh          # 30 s per target (what .ci/run does)
#   bash scripts/fuzz.sh 600      # 10 min per target
#   bash scripts/fuzz.sh 60 path  # one target
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
only=${2:-}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)" >&2
  cargo install cargo-fuzz --locked
fi
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/keygate-fuzz-target}"
cd fuzz
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
  if [ -n "$only" ] && [ "$t" != "$only" ]; then continue; fi
  mkdir -p "corpus/$t"
  echo "== fuzz $t (${secs}s)"
  log=$(mktemp)
  # -timeout: an input that runs 10 s is a hang, reported as such (the default waits 20 min).
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $t failed: its input is in fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$log" | tr '\n' ' '; echo
  rm -f "$log"
done

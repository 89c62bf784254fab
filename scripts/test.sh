#!/usr/bin/env bash
# The test command of the README: every unit, property, API and CLI test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing; installing it (cargo install cargo-nextest --locked)" >&2
  cargo install cargo-nextest --locked
fi
cargo nextest run --workspace --locked --no-fail-fast
# Doc tests are not run by nextest.
cargo test --workspace --locked --doc -q

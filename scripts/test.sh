#!/usr/bin/env bash
# The test command of the README: every unit, property, API and CLI test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}"
# nginx, Caddy, Chromium and the browser test's npm packages, if missing.
bash scripts/deps.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing; installing it (cargo install cargo-nextest --locked)" >&2
  cargo install cargo-nextest --locked
fi
# Doc tests first (nextest does not run them), so the run ends on nextest's summary line.
doclog=$(mktemp)
if ! cargo test --workspace --locked --doc >"$doclog" 2>&1; then
  cat "$doclog"; echo "doc tests failed" >&2; exit 1
fi
rm -f "$doclog"
cargo nextest run --workspace --locked --no-fail-fast

#!/usr/bin/env bash
# Load test of the OAuth endpoints on one embedded (SQLite) node: the refresh grant (every call
# rotates the refresh token: one read, a conditional update and an insert in one transaction,
# and an Ed25519 signature), introspection (client authentication, signature check, two
# reads), and forward-auth with an OAuth access token next to the same call with an sk key
# (the baseline: the token path is the key path once the token is cached). keygate on core 0,
# wrk on core 1.
#
#   bash bench/oauth.sh                  # 10 s per measurement
#   DURATION=30s bash bench/oauth.sh
#
# Prints a Markdown table (also written to bench/out/oauth.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
THREADS=${THREADS:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
python3 -c 'import requests' 2>/dev/null || { echo "python3 with requests is needed for the setup" >&2; exit 1; }
cargo build --release -q -p keygate
BIN=$CARGO_TARGET_DIR/release
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

PORT=$(free_port)
BASE="http://127.0.0.1:$PORT"
env KEYGATE_LISTEN="127.0.0.1:$PORT" KEYGATE_LOG__LEVEL=warn KEYGATE_DATABASE_URL="sqlite://$WORK/kg.db" \
  KEYGATE_AUDIT__DIR="$WORK/audit" taskset -c 0 "$BIN/keygate" serve >"$WORK/root" 2>"$WORK/log" &
wait_http "$BASE/v1/status"
eval "$(python3 bench/oauth_setup.py "$BASE" "$(head -1 "$WORK/root")" "$THREADS")"
export REFRESH CLIENT_ID

rps() { sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$1"; }
p99() { sed -n 's/^ *99% *\(.*\)$/\1/p' "$1"; }
non2xx() { local n; n=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$1"); echo "${n:-0}"; }

taskset -c 1 wrk -t"$THREADS" -c"$THREADS" -d"$DURATION" --latency -s bench/oauth-refresh.lua "$BASE" >"$WORK/refresh.txt"
cat >"$WORK/introspect.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s:%s' "$CONF_ID" "$CONF_SECRET" | base64 -w0)"
wrk.body = "token=$ACCESS"
LUA
taskset -c 1 wrk -t2 -c32 -d"$DURATION" --latency -s "$WORK/introspect.lua" "$BASE/oauth/introspect" >"$WORK/introspect.txt"
taskset -c 1 wrk -t2 -c32 -d"$DURATION" --latency -H "authorization: Bearer $ACCESS" -H "x-keygate-scope: docs:read" "$BASE/v1/auth" >"$WORK/auth-token.txt"
taskset -c 1 wrk -t2 -c32 -d"$DURATION" --latency -H "authorization: Bearer $SK" -H "x-keygate-scope: docs:read" "$BASE/v1/auth" >"$WORK/auth-sk.txt"

fails=$(sed -n 's/^refresh failures: *//p' "$WORK/refresh.txt")
{
  echo "| what (keygate on core 0, wrk on core 1, $DURATION each) | req/s | p99 | refused |"
  echo "|---|---|---|---|"
  echo "| \`POST /oauth/token\` refresh grant, $THREADS token families | $(rps "$WORK/refresh.txt") | $(p99 "$WORK/refresh.txt") | ${fails:-?} |"
  echo "| \`POST /oauth/introspect\` (confidential client, access token) | $(rps "$WORK/introspect.txt") | $(p99 "$WORK/introspect.txt") | $(non2xx "$WORK/introspect.txt") |"
  echo "| \`GET /v1/auth\` with an OAuth access token | $(rps "$WORK/auth-token.txt") | $(p99 "$WORK/auth-token.txt") | $(non2xx "$WORK/auth-token.txt") |"
  echo "| \`GET /v1/auth\` with an \`sk\` key (baseline) | $(rps "$WORK/auth-sk.txt") | $(p99 "$WORK/auth-sk.txt") | $(non2xx "$WORK/auth-sk.txt") |"
} | tee "$OUT/oauth.md"

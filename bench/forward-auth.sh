#!/usr/bin/env bash
# Load test of the forward-auth path (GET /v1/auth) against a bare axum "ok" server, in one
# run, on this machine. Each server is pinned to core 0, wrk to core 1, same wrk settings.
#
#   bash bench/forward-auth.sh            # 10 s per run
#   DURATION=30s CONNECTIONS=64 bash bench/forward-auth.sh
#
# Prints a Markdown table (also written to bench/out/forward-auth.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p keygate
cargo build --release -q -p keygate-server --example baseline
BIN=$CARGO_TARGET_DIR/release
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

BPORT=$(free_port)
taskset -c 0 "$BIN/examples/baseline" "127.0.0.1:$BPORT" 2>/dev/null &
KPORT=$(free_port)
KEYGATE_LISTEN=127.0.0.1:$KPORT KEYGATE_DATABASE_URL="sqlite://$WORK/kg.db" KEYGATE_LOG__LEVEL=warn \
  taskset -c 0 "$BIN/keygate" serve >"$WORK/root" 2>"$WORK/log" &
wait_http "http://127.0.0.1:$BPORT/"
wait_http "http://127.0.0.1:$KPORT/v1/status"
ROOT=$(head -1 "$WORK/root")

# A publishable key with every check switched on: origin list, scopes, IP allow-list, a rate
# limit and a budget (both high enough not to refuse during the run).
PK=$(curl -fs -X POST "http://127.0.0.1:$KPORT/v1/keys" -H "authorization: Bearer $ROOT" \
  -H 'content-type: application/json' \
  -d '{"kind":"pk","name":"bench","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
       "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

run() { # name url [headers...]
  local name=$1 url=$2; shift 2
  local args=()
  for h in "$@"; do args+=(-H "$h"); done
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${args[@]}" "$url" >"$OUT/$name.txt"
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$name.txt")
  p50=$(awk '$1=="50%" {print $2}' "$OUT/$name.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/$name.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/$name.txt")
  echo "$name $rps $p50 $p99 ${non2xx:-0}"
}

# Both servers get the same request headers, so request parsing costs the same.
HDRS=("Authorization: Bearer $PK" "Origin: https://claude.ai" "X-Keygate-Scope: ocr:read" "X-Forwarded-For: 127.0.0.1")
B=$(run baseline "http://127.0.0.1:$BPORT/v1/auth" "${HDRS[@]}")
K=$(run keygate-auth "http://127.0.0.1:$KPORT/v1/auth" "${HDRS[@]}")
read -r _ brps bp50 bp99 bnon <<<"$B"
read -r _ krps kp50 kp99 knon <<<"$K"
[ "$knon" = "0" ] || { echo "keygate answered $knon non-2xx responses: the run is invalid" >&2; exit 1; }
RATIO=$(python3 -c "print(f'{$krps/$brps:.2f}')")
{
  echo "| server (1 core, wrk -t1 -c$CONNECTIONS -d$DURATION) | req/s | p50 | p99 |"
  echo "|---|---|---|---|"
  echo "| bare axum \"ok\" (baseline) | $brps | $bp50 | $bp99 |"
  echo "| keygate \`GET /v1/auth\`, pk key, all checks | $krps | $kp50 | $kp99 |"
  echo
  echo "keygate / baseline throughput: **$RATIO**"
} | tee "$OUT/forward-auth.md"

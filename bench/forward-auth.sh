#!/usr/bin/env bash
# Load test of the forward-auth path (GET /v1/auth) against a bare axum "ok" server, in one
# run, on this machine. Each server is pinned to core 0, wrk to core 1, same wrk settings.
#
#   bash bench/forward-auth.sh            # 5 rounds of 10 s per server, interleaved
#   ROUNDS=5 DURATION=30s CONNECTIONS=64 bash bench/forward-auth.sh
#   KEYGATE_BIN=/path/to/another/keygate bash bench/forward-auth.sh   # that build, not rebuilt
#
# The two servers are measured alternately (baseline, keygate, baseline, …) and the median of
# the per-round ratios is reported, because a shared 2-core VM drifts by ±10 % between runs.
#
# Prints a Markdown table (also written to bench/out/forward-auth.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-5}
# SHARED=1 adds a third server: keygate on the shared PostgreSQL + Redis (127.0.0.1:5432/6379).
SHARED=${SHARED:-0}
# AUDIT=1 adds keygate with the audit log switched off, to measure what the audit log costs,
# and keygate with shipping deferred (ship interval 10 min), to measure the hot path alone.
AUDIT=${AUDIT:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -n "${KEYGATE_BIN:-}" ] || cargo build --release -q -p keygate
cargo build --release -q -p keygate-server --example baseline
BIN=$CARGO_TARGET_DIR/release
KG=${KEYGATE_BIN:-$BIN/keygate}
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

# keygate on core 0 with extra environment: start_keygate NAME PORT [VAR=value …]; its stdout
# (the root key) goes to $WORK/NAME.root.
start_keygate() {
  local name=$1 port=$2; shift 2
  env KEYGATE_LISTEN="127.0.0.1:$port" KEYGATE_LOG__LEVEL=warn KEYGATE_AUDIT__DIR="$WORK/$name.audit" KEYGATE_PROXY__TRUSTED="[\"127.0.0.1/32\"]" "$@" \
    taskset -c 0 "$KG" serve >"$WORK/$name.root" 2>"$WORK/$name.log" &
  wait_http "http://127.0.0.1:$port/v1/status"
}
# A publishable key with every check switched on: origin list, scopes, IP allow-list, a rate
# limit and a budget (both high enough not to refuse during the run). bench_pk NAME PORT
bench_pk() {
  curl -fs -X POST "http://127.0.0.1:$2/v1/keys" -H "authorization: Bearer $(head -1 "$WORK/$1.root")" \
    -H 'content-type: application/json' \
    -d '{"kind":"pk","name":"bench","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
         "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

BPORT=$(free_port)
taskset -c 0 "$BIN/examples/baseline" "127.0.0.1:$BPORT" 2>/dev/null &
wait_http "http://127.0.0.1:$BPORT/"
KPORT=$(free_port)
start_keygate embedded "$KPORT" KEYGATE_DATABASE_URL="sqlite://$WORK/kg.db"
PK=$(bench_pk embedded "$KPORT")
if [ "$AUDIT" = 1 ]; then
  NPORT=$(free_port)
  start_keygate noaudit "$NPORT" KEYGATE_DATABASE_URL="sqlite://$WORK/noaudit.db" KEYGATE_AUDIT__ENABLED=false
  NPK=$(bench_pk noaudit "$NPORT")
  DPORT=$(free_port)
  start_keygate deferred "$DPORT" KEYGATE_DATABASE_URL="sqlite://$WORK/deferred.db" KEYGATE_AUDIT__SHIP_INTERVAL_MS=600000
  DPK=$(bench_pk deferred "$DPORT")
fi
if [ "$SHARED" = 1 ]; then
  SCHEMA="kgbench_$$"
  psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $SCHEMA" >/dev/null
  trap 'kill $(jobs -p) 2>/dev/null || true; psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS '"$SCHEMA"' CASCADE" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
  SPORT=$(free_port)
  start_keygate shared "$SPORT" \
    KEYGATE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D$SCHEMA" \
    KEYGATE_REDIS_URL=redis://127.0.0.1:6379 KEYGATE_REDIS_PREFIX="kgbench$$"
  SPK=$(bench_pk shared "$SPORT")
fi

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
: >"$OUT/rounds.txt"
: >"$OUT/shared-rounds.txt"
: >"$OUT/audit-rounds.txt"
# Warm both up (connections, caches, leases, CPU frequency) before measuring.
taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d3s "http://127.0.0.1:$BPORT/v1/auth" >/dev/null
taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d3s -H "Authorization: Bearer $PK" -H "Origin: https://claude.ai" \
  -H "X-Keygate-Scope: ocr:read" -H "X-Forwarded-For: 127.0.0.1" "http://127.0.0.1:$KPORT/v1/auth" >/dev/null
for i in $(seq "$ROUNDS"); do
  B=$(run "baseline-$i" "http://127.0.0.1:$BPORT/v1/auth" "${HDRS[@]}")
  K=$(run "keygate-auth-$i" "http://127.0.0.1:$KPORT/v1/auth" "${HDRS[@]}")
  read -r _ brps bp50 bp99 bnon <<<"$B"
  read -r _ krps kp50 kp99 knon <<<"$K"
  [ "$knon" = "0" ] || { echo "keygate answered $knon non-2xx responses: the run is invalid" >&2; exit 1; }
  echo "$brps $bp50 $bp99 $krps $kp50 $kp99" >>"$OUT/rounds.txt"
  if [ "$SHARED" = 1 ]; then
    S=$(run "keygate-shared-$i" "http://127.0.0.1:$SPORT/v1/auth" "Authorization: Bearer $SPK" \
      "Origin: https://claude.ai" "X-Keygate-Scope: ocr:read" "X-Forwarded-For: 127.0.0.1")
    read -r _ srps sp50 sp99 snon <<<"$S"
    [ "$snon" = "0" ] || { echo "shared keygate answered $snon non-2xx responses" >&2; exit 1; }
    echo "$krps $srps $sp50 $sp99" >>"$OUT/shared-rounds.txt"
  fi
  if [ "$AUDIT" = 1 ]; then
    N=$(run "keygate-noaudit-$i" "http://127.0.0.1:$NPORT/v1/auth" "Authorization: Bearer $NPK" \
      "Origin: https://claude.ai" "X-Keygate-Scope: ocr:read" "X-Forwarded-For: 127.0.0.1")
    read -r _ nrps np50 np99 nnon <<<"$N"
    [ "$nnon" = "0" ] || { echo "keygate without audit answered $nnon non-2xx responses" >&2; exit 1; }
    D=$(run "keygate-deferred-$i" "http://127.0.0.1:$DPORT/v1/auth" "Authorization: Bearer $DPK" \
      "Origin: https://claude.ai" "X-Keygate-Scope: ocr:read" "X-Forwarded-For: 127.0.0.1")
    read -r _ drps dp50 dp99 dnon <<<"$D"
    [ "$dnon" = "0" ] || { echo "keygate with deferred shipping answered $dnon non-2xx responses" >&2; exit 1; }
    echo "$krps $nrps $kp50 $np50 $kp99 $np99 $drps" >>"$OUT/audit-rounds.txt"
  fi
done
python3 - "$OUT/rounds.txt" "$CONNECTIONS" "$DURATION" <<'PY' | tee "$OUT/forward-auth.md"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ratios = sorted(float(r[3]) / float(r[0]) for r in rows)
mid = rows[[float(r[3]) / float(r[0]) for r in rows].index(statistics.median_low(ratios))]
print(f"| server (1 core each, wrk -t1 -c{sys.argv[2]} -d{sys.argv[3]}, median of {len(rows)} interleaved rounds) | req/s | p50 | p99 |")
print("|---|---|---|---|")
print(f"| bare axum \"ok\" (baseline) | {float(mid[0]):.0f} | {mid[1]} | {mid[2]} |")
print(f"| keygate `GET /v1/auth`, pk key, all checks | {float(mid[3]):.0f} | {mid[4]} | {mid[5]} |")
print()
print(f"keygate / baseline throughput: **{statistics.median_low(ratios):.2f}** (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
PY
if [ "$SHARED" = 1 ]; then
python3 - "$OUT/shared-rounds.txt" <<'PY' | tee "$OUT/shared.md"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ratios = sorted(float(r[1]) / float(r[0]) for r in rows)
print(f"shared mode (PostgreSQL + Redis, metered decisions batched to Redis): "
      f"{statistics.median(float(r[1]) for r in rows):.0f} req/s, p50 {rows[0][2]}; "
      f"shared / embedded throughput: **{statistics.median_low(ratios):.2f}** "
      f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
PY
fi
if [ "$AUDIT" = 1 ]; then
python3 - "$OUT/audit-rounds.txt" <<'PY' | tee "$OUT/audit.md"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ratios = sorted(float(r[0]) / float(r[1]) for r in rows)
print(f"audit log on / off (keygate `GET /v1/auth`, same rounds): "
      f"{statistics.median(float(r[0]) for r in rows):.0f} vs {statistics.median(float(r[1]) for r in rows):.0f} req/s; "
      f"ratio **{statistics.median_low(ratios):.2f}** (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
hot = sorted(float(r[6]) / float(r[1]) for r in rows)
print(f"hot path alone (audit on, shipping deferred) / off: **{statistics.median_low(hot):.2f}** "
      f"(rounds: {', '.join(f'{r:.2f}' for r in hot)}); p99 with audit on {rows[0][4]}, off {rows[0][5]}")
PY
fi

#!/usr/bin/env bash
# What the audit log costs forward-auth, measured with both servers loaded at the same time.
#
#   bash bench/audit-ab.sh                 # 5 rounds of 8 s
#   ROUNDS=9 DURATION=10 bash bench/audit-ab.sh
#   KEYGATE_BIN=/path/to/an/older/keygate bash bench/audit-ab.sh   # another build, not rebuilt
#   BASE_BIN=/path/to/an/older/keygate bash bench/audit-ab.sh      # also: this build / that one,
#                                                                  # both with the audit log on
#   SHARED=1 BASE_BIN=… bash bench/audit-ab.sh    # only this build / that one, both on the shared
#                                                 # PostgreSQL + Redis (a schema and a Redis
#                                                 # prefix each)
#   GATEWAY=1 BASE_BIN=… bash bench/audit-ab.sh   # only this build / that one on a gateway route
#                                                 # to one upstream (no other pairs in between:
#                                                 # a server loaded more often ships a longer
#                                                 # backlog, which skews the ratio)
#
# keygate with the audit log off and keygate with it on (and, in the same rounds, on with
# shipping deferred: the hot path alone) share core 0; each gets its own wrk on core 1, and
# both are loaded at once. The scheduler gives each server half the core, so the ratio of
# their throughputs is the ratio of what a request costs each, and whatever the host does to
# the VM during a round (this one drifts by ±20 % between runs) hits both alike. One round is
# one pair run at once; the median of the per-round ratios is reported.
#
# Prints a Markdown line (also written to bench/out/audit-ab.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
if [ -n "${KEYGATE_BIN:-}" ]; then BIN=$KEYGATE_BIN; else
  cargo build --release -q -p keygate
  BIN=$CARGO_TARGET_DIR/release/keygate
fi
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME [VAR=value …]: keygate ($SERVER_BIN, default $BIN) on core 0 with a publishable key like forward-auth.sh's;
# writes "PORT KEY" to $WORK/NAME.
start() {
  local name=$1 port; shift
  port=$(free_port)
  env KEYGATE_LISTEN="127.0.0.1:$port" KEYGATE_LOG__LEVEL=warn KEYGATE_AUDIT__DIR="$WORK/$name.audit" KEYGATE_PROXY__TRUSTED="[\"127.0.0.1/32\"]" \
    KEYGATE_DATABASE_URL="sqlite://$WORK/$name.db" "$@" setsid taskset -c 0 "${SERVER_BIN:-$BIN}" serve >"$WORK/$name.root" 2>"$WORK/$name.log" &
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/v1/status" && break; sleep 0.1; done
  local key
  key=$(curl -fs -X POST "http://127.0.0.1:$port/v1/keys" -H "authorization: Bearer $(head -1 "$WORK/$name.root")" \
    -H 'content-type: application/json' \
    -d '{"kind":"pk","name":"bench","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
         "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  echo "$port $key" >"$WORK/$name"
}

# load NAME SECONDS [URL_PATH]: wrk on core 1 (default path /v1/auth); prints requests/s, fails the run on any non-2xx answer.
load() {
  local port key
  read -r port key <"$WORK/$1"
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$2s" -H "Authorization: Bearer $key" -H "Origin: https://claude.ai" \
    -H "X-Keygate-Scope: ocr:read" -H "X-Forwarded-For: 127.0.0.1" "http://127.0.0.1:$port${3:-/v1/auth}" >"$WORK/$1.wrk"
  if grep -q Non-2xx "$WORK/$1.wrk"; then echo "$1 answered non-2xx responses: the run is invalid" >&2; exit 1; fi
  awk '/Requests\/sec/ {print $2}' "$WORK/$1.wrk"
}

# pair A B [URL_PATH]: both loaded at once; prints "rps(A) rps(B)".
pair() {
  load "$1" "$DURATION" "${3:-}" >"$WORK/$1.rps" &
  local a=$!
  load "$2" "$DURATION" "${3:-}" >"$WORK/$2.rps" &
  local b=$!
  wait "$a" "$b"
  echo "$(cat "$WORK/$1.rps") $(cat "$WORK/$2.rps")"
}

# With BASE_BIN, a gateway route to one upstream (the bare axum server, on core 1 beside the
# wrk runs) on both builds being compared.
ROUTES=()
GATEWAY=${GATEWAY:-0}
if [ "$GATEWAY" = 1 ] && [ -z "${BASE_BIN:-}" ]; then echo "GATEWAY=1 needs BASE_BIN" >&2; exit 1; fi
if [ "$GATEWAY" = 1 ]; then
  UPSTREAM_BIN=${UPSTREAM_BIN:-$(dirname "$BIN")/examples/baseline}
  [ -n "${KEYGATE_BIN:-}" ] || cargo build --release -q -p keygate-server --example baseline
  UP=$(free_port)
  taskset -c 1 "$UPSTREAM_BIN" "127.0.0.1:$UP" 2>/dev/null &
  ROUTES=(KEYGATE_ROUTES="[{path=\"/api/*\", upstream=\"http://127.0.0.1:$UP\", scope=\"ocr:read\", cost=1}]")
fi
SHARED=${SHARED:-0}
if [ "$SHARED" = 1 ] && [ -z "${BASE_BIN:-}" ]; then echo "SHARED=1 needs BASE_BIN" >&2; exit 1; fi
if [ "$SHARED" = 1 ]; then
  for n in on base; do
    psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA kgab_${n}_$$" >/dev/null
  done
  trap 'cleanup; for n in on base; do psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS kgab_${n}_$$ CASCADE" >/dev/null 2>&1; done' EXIT
  shared_env() {
    echo "KEYGATE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3Dkgab_$1_$$"
    echo "KEYGATE_REDIS_URL=redis://127.0.0.1:6379"
    echo "KEYGATE_REDIS_PREFIX=kgab$1$$"
  }
  mapfile -t ENV_ON < <(shared_env on)
  mapfile -t ENV_BASE < <(shared_env base)
  start on "${ENV_ON[@]}"
  SERVER_BIN=$BASE_BIN start base "${ENV_BASE[@]}"
  names="on base"
elif [ "$GATEWAY" = 1 ]; then
  start on "${ROUTES[@]}"
  names="on"
else
  start off KEYGATE_AUDIT__ENABLED=false
  start on
  start deferred KEYGATE_AUDIT__SHIP_INTERVAL_MS=600000
  names="off on deferred"
fi
if [ -n "${BASE_BIN:-}" ] && [ "$SHARED" != 1 ]; then
  SERVER_BIN=$BASE_BIN start base "${ROUTES[@]}"
  names="$names base"
fi
for n in $names; do
  if [ "$GATEWAY" = 1 ]; then load "$n" 3 /api/x >/dev/null; else load "$n" 3 >/dev/null; fi # warm up
done
: >"$OUT/audit-ab-rounds.txt"
for _ in $(seq "$ROUNDS"); do
  if [ "$GATEWAY" = 1 ]; then
    echo "gateway $(pair base on /api/x)" >>"$OUT/audit-ab-rounds.txt"
    continue
  fi
  if [ "$SHARED" = 1 ]; then
    echo "shared $(pair base on)" >>"$OUT/audit-ab-rounds.txt"
    continue
  fi
  echo "on $(pair off on)" >>"$OUT/audit-ab-rounds.txt"
  echo "deferred $(pair off deferred)" >>"$OUT/audit-ab-rounds.txt"
  if [ -n "${BASE_BIN:-}" ]; then echo "build $(pair base on)" >>"$OUT/audit-ab-rounds.txt"; fi
done
python3 - "$OUT/audit-ab-rounds.txt" "$CONNECTIONS" "$DURATION" <<'PY' | tee "$OUT/audit-ab.md"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def ratios(kind):
    return sorted(float(r[2]) / float(r[1]) for r in rows if r[0] == kind)
on, hot = ratios("on"), ratios("deferred")
fmt = lambda rs: ", ".join(f"{r:.2f}" for r in rs)
f3 = lambda rs: ", ".join(f"{r:.3f}" for r in rs)
sh = ratios("shared")
if sh:
    print(f"shared mode (PostgreSQL + Redis), this build / BASE_BIN, both with audit on (median of "
          f"{len(sh)} rounds): **{statistics.median(sh):.3f}** (rounds: {f3(sh)})")
    sys.exit(0)
gw = ratios("gateway")
if gw:
    print(f"gateway route to one upstream, this build / BASE_BIN, both with audit on (median of "
          f"{len(gw)} rounds): **{statistics.median(gw):.3f}** (rounds: {f3(gw)})")
    sys.exit(0)
print(f"audit on / off, both loaded at once on one core (wrk -t1 -c{sys.argv[2]} each, {sys.argv[3]} s, "
      f"median of {len(on)} rounds): **{statistics.median(on):.2f}** (rounds: {fmt(on)}); "
      f"hot path alone (shipping deferred) / off: **{statistics.median(hot):.2f}** (rounds: {fmt(hot)})")
build = ratios("build")
if build:
    print(f"this build / BASE_BIN, both with audit on: **{statistics.median(build):.3f}** (rounds: {f3(build)})")
PY

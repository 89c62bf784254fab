#!/usr/bin/env bash
# keygate against its peers, every path in one run on this machine:
#
#   forward-auth   keygate GET /v1/auth, pk key, every check, audit on   vs a bare axum "ok" server
#   gateway        keygate gateway route, pk key, every check, to one upstream
#                                                  vs nginx proxy_pass to the same upstream
#                                                  (and the upstream directly, for the added p99)
#   oauth-cc       keygate POST /oauth/token, client_credentials, confidential client
#                                                  vs panva's oidc-provider (Node, in-memory
#                                                  adapter, EdDSA at+jwt tokens: bench/peers)
#   refresh        keygate refresh grant, 8 token families (rotation on every use)
#   introspect     keygate POST /oauth/introspect of an access token (Ory Hydra publishes 21k/s)
#   shared         keygate on PostgreSQL + Redis, GET /v1/auth       vs keygate embedded (SQLite);
#                  once on the machine's Redis (unpinned), once on a private redis-server
#                  pinned to core 1 (beside wrk)
#
# Every server runs on core 0 with one worker (nginx: worker_processes 1; keygate and axum see
# one core), wrk on core 1. Rounds are interleaved (each path's keygate run next to its peer's)
# and the table gives medians over rounds, ratios as the median of the per-round ratios. Peers
# are installed when missing (nginx and wrk through scripts/deps.sh, oidc-provider by npm).
#
#   bash bench/compare.sh                      # 3 rounds of 10 s per run
#   ROUNDS=5 DURATION=20s bash bench/compare.sh
#   ONLY="oauth-cc introspect" bash bench/compare.sh
#
# Prints a Markdown table (also written to bench/out/compare.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
ONLY=${ONLY:-forward-auth gateway oauth-cc refresh introspect shared}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
bash scripts/deps.sh
cargo build --release -q -p keygate
cargo build --release -q -p keygate-server --example baseline
[ -d bench/peers/node_modules/oidc-provider ] || (cd bench/peers && npm ci --no-audit --no-fund --loglevel=error)
BIN=$CARGO_TARGET_DIR/release
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
SCHEMA=kgcmp_$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  rm -rf "$WORK"
  for sc in "$SCHEMA" "${SCHEMA}_p"; do
    psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS $sc CASCADE" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 150); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }
want() { [[ " $ONLY " == *" $1 "* ]]; }

# The upstream (and the forward-auth baseline): a bare axum server answering "ok".
UP=$(free_port)
taskset -c 0 "$BIN/examples/baseline" "127.0.0.1:$UP" 2>/dev/null &

# nginx proxy_pass to the upstream, one worker (keygate gets one core too).
NGX=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1;
pid $WORK/nginx/pid; error_log $WORK/nginx/error.log error;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body; proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/f; uwsgi_temp_path $WORK/nginx/u; scgi_temp_path $WORK/nginx/s;
  upstream app { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" &

# keygate NAME PORT [VAR=value …]: a node on core 0 with the gateway route.
keygate() {
  local name=$1 port=$2; shift 2
  env KEYGATE_LISTEN="127.0.0.1:$port" KEYGATE_LOG__LEVEL=warn KEYGATE_AUDIT__DIR="$WORK/$name.audit" \
    KEYGATE_PROXY__TRUSTED='["127.0.0.1/32"]' KEYGATE_DATABASE_URL="sqlite://$WORK/$name.db" \
    KEYGATE_ROUTES="[{path=\"/api/*\", upstream=\"http://127.0.0.1:$UP\", scope=\"ocr:read\", cost=1}]" \
    "$@" taskset -c 0 "$BIN/keygate" serve >"$WORK/$name.root" 2>"$WORK/$name.log" &
  wait_http "http://127.0.0.1:$port/v1/status"
}
# pk PORT NAME: a publishable key with every check on and limits that never bind.
pk() {
  curl -fs -X POST "http://127.0.0.1:$1/v1/keys" -H "authorization: Bearer $(head -1 "$WORK/$2.root")" \
    -H 'content-type: application/json' \
    -d '{"kind":"pk","name":"bench","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
         "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}
KG=$(free_port)
keygate embedded "$KG"
PK=$(pk "$KG" embedded)
eval "$(python3 bench/oauth_setup.py "http://127.0.0.1:$KG" "$(head -1 "$WORK/embedded.root")" 8)"
export REFRESH CLIENT_ID

if want oauth-cc; then
  OIDC=$(free_port)
  OIDC_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
  taskset -c 0 node bench/peers/oidc-provider.mjs "$OIDC" bench "$OIDC_SECRET" 2>"$WORK/oidc.log" &
  wait_http "http://127.0.0.1:$OIDC/.well-known/openid-configuration"
fi
if want shared; then
  psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $SCHEMA" >/dev/null
  SH=$(free_port)
  keygate shared "$SH" KEYGATE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D$SCHEMA" \
    KEYGATE_REDIS_URL=redis://127.0.0.1:6379 KEYGATE_REDIS_PREFIX="$SCHEMA"
  SHARED_PK=$(pk "$SH" shared)
  # The same on a private Redis pinned to core 1.
  RP=$(free_port)
  taskset -c 1 redis-server --bind 127.0.0.1 --port "$RP" --save "" --appendonly no >/dev/null &
  for _ in $(seq 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
  psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA ${SCHEMA}_p" >/dev/null
  SHP=$(free_port)
  keygate shared-pinned "$SHP" KEYGATE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D${SCHEMA}_p" \
    KEYGATE_REDIS_URL="redis://127.0.0.1:$RP" KEYGATE_REDIS_PREFIX="$SCHEMA"
  SHARED_PINNED_PK=$(pk "$SHP" shared-pinned)
fi

# client_credentials as wrk sends it (the same form for both servers).
cc_lua() { # FILE ID SECRET PATH
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.path = "$4"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s:%s' "$2" "$3" | base64 -w0)"
wrk.body = "grant_type=client_credentials&scope=docs:read"
LUA
}
cc_lua "$WORK/cc-keygate.lua" "$CONF_ID" "$CONF_SECRET" /oauth/token
[ -z "${OIDC:-}" ] || cc_lua "$WORK/cc-oidc.lua" bench "$OIDC_SECRET" /token
cat >"$WORK/introspect.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s:%s' "$CONF_ID" "$CONF_SECRET" | base64 -w0)"
wrk.body = "token=$ACCESS"
LUA

# run NAME URL [wrk args…]: one measurement; prints "NAME req/s p50 p99"; any non-2xx answer
# (or a refused refresh) makes the run invalid.
run() {
  local name=$1 url=$2; shift 2
  taskset -c 1 wrk -d"$DURATION" --latency "$@" "$url" >"$WORK/$name.txt"
  if grep -q Non-2xx "$WORK/$name.txt" || grep -q '^refresh failures: [1-9]' "$WORK/$name.txt"; then
    echo "$name: refused answers; the run is invalid" >&2; cat "$WORK/$name.txt" >&2; exit 1
  fi
  echo "$name $(awk '/Requests\/sec/ {print $2}' "$WORK/$name.txt") $(awk '$1=="50%" {print $2}' "$WORK/$name.txt") $(awk '$1=="99%" {print $2}' "$WORK/$name.txt")"
}
PKH=(-H "Authorization: Bearer $PK" -H "Origin: https://claude.ai" -H "X-Keygate-Scope: ocr:read")
W=(-t1 -c"$CONNECTIONS")
round() {
  if want forward-auth || want shared; then run fa-keygate "http://127.0.0.1:$KG/v1/auth" "${W[@]}" "${PKH[@]}"; fi
  if want forward-auth; then run fa-axum "http://127.0.0.1:$UP/v1/auth" "${W[@]}" "${PKH[@]}"; fi
  if want gateway; then
    run gw-direct "http://127.0.0.1:$UP/api/x" "${W[@]}" "${PKH[@]}"
    run gw-nginx "http://127.0.0.1:$NGX/api/x" "${W[@]}" "${PKH[@]}"
    run gw-keygate "http://127.0.0.1:$KG/api/x" "${W[@]}" "${PKH[@]}"
  fi
  if want oauth-cc; then
    run cc-keygate "http://127.0.0.1:$KG/oauth/token" "${W[@]}" -s "$WORK/cc-keygate.lua"
    run cc-oidc "http://127.0.0.1:$OIDC/token" "${W[@]}" -s "$WORK/cc-oidc.lua"
  fi
  if want refresh; then
    # New families each run: the last rotation of a run may be cut off before wrk reads it.
    eval "$(python3 bench/oauth_setup.py "http://127.0.0.1:$KG" "$(head -1 "$WORK/embedded.root")" 8 "$CLIENT_ID")"
    run refresh "http://127.0.0.1:$KG" -t8 -c8 -s bench/oauth-refresh.lua
  fi
  if want introspect; then run introspect "http://127.0.0.1:$KG/oauth/introspect" "${W[@]}" -s "$WORK/introspect.lua"; fi
  if want shared; then
    run shared "http://127.0.0.1:$SH/v1/auth" "${W[@]}" -H "Authorization: Bearer $SHARED_PK" \
      -H "Origin: https://claude.ai" -H "X-Keygate-Scope: ocr:read"
    run shared-pinned "http://127.0.0.1:$SHP/v1/auth" "${W[@]}" -H "Authorization: Bearer $SHARED_PINNED_PK" \
      -H "Origin: https://claude.ai" -H "X-Keygate-Scope: ocr:read"
  fi
}
DURATION_REAL=$DURATION; DURATION=2s; round >/dev/null; DURATION=$DURATION_REAL # warm up
: >"$OUT/compare-rounds.txt"
for i in $(seq "$ROUNDS"); do echo "round $i" >>"$OUT/compare-rounds.txt"; round >>"$OUT/compare-rounds.txt"; done

python3 - "$OUT/compare-rounds.txt" "$DURATION" "$ROUNDS" "$CONNECTIONS" "$(git rev-parse --short HEAD)" <<'PY' | tee "$OUT/compare.md"
import statistics, subprocess, sys
path, duration, rounds, conns, commit = sys.argv[1:]
def ms(s):
    return float(s[:-2]) / 1000 if s.endswith("us") else float(s[:-2]) if s.endswith("ms") else float(s[:-1]) * 1000
by_round, cur = [], None
for l in open(path):
    f = l.split()
    if f[0] == "round":
        cur = {}; by_round.append(cur); continue
    cur[f[0]] = (float(f[1]), ms(f[2]), ms(f[3]))
def med(name, i=0):
    v = [r[name][i] for r in by_round if name in r]
    return statistics.median(v) if v else None
def ratio(a, b):
    v = [r[a][0] / r[b][0] for r in by_round if a in r and b in r]
    return (statistics.median(v), min(v), max(v)) if v else None
cpu = subprocess.run("lscpu | sed -n 's/^Model name: *//p'", shell=True, capture_output=True, text=True).stdout.strip()
print(f"`bench/compare.sh` at {commit}: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
      f"servers on core 0 (one worker each), wrk on core 1 (-t1 -c{conns}, refresh -t8 -c8), {duration} per run, "
      f"median of {rounds} interleaved rounds.\n")
print("| path | keygate req/s (p50 / p99) | peer, same run | ratio (range) | goal | met |")
print("|---|---|---|---|---|---|")
def cell(n):
    return f"{med(n):,.0f} ({med(n, 1):.2f} / {med(n, 2):.2f} ms)"
def row(label, k, peer_name, p, goal, ok):
    r = ratio(k, p) if p else None
    rs = f"**{r[0]:.2f}** ({r[1]:.2f}–{r[2]:.2f})" if r else "—"
    print(f"| {label} | {cell(k)} | {peer_name + ' ' + cell(p) if p else peer_name} | {rs} | {goal} | {ok(r) if r else ok(None)} |")
yes = lambda b: "yes" if b else "**no**"
have = lambda n: any(n in r for r in by_round)
if have("fa-axum"):
    row("forward-auth `GET /v1/auth`, pk key, every check, audit on", "fa-keygate", "bare axum \"ok\"", "fa-axum", "≥ 0.95", lambda r: yes(r[0] >= 0.95))
if have("gw-keygate"):
    added = med("gw-keygate", 2) - med("gw-direct", 2)
    row("gateway, pk key, every check, one upstream", "gw-keygate", "nginx `proxy_pass`", "gw-nginx", "≥ 1.2; < 1 ms added p99",
        lambda r: f"{yes(r[0] >= 1.2)}; p99 added {added:+.2f} ms {yes(added < 1)}")
    print(f"| upstream directly (for the added p99) | {cell('gw-direct')} | | | | |")
if have("cc-keygate"):
    row("OAuth `client_credentials`, confidential client", "cc-keygate", "oidc-provider", "cc-oidc", "≥ 5", lambda r: yes(r[0] >= 5))
if have("refresh"):
    row("refresh grant, 8 families", "refresh", "—", None, "≥ 5k req/s, p99 < 20 ms",
        lambda r: f"{yes(med('refresh') >= 5000)}; p99 {yes(med('refresh', 2) < 20)}")
if have("introspect"):
    row("introspection of an access token", "introspect", "Ory Hydra publishes 21k", None, "≥ 21k req/s",
        lambda r: yes(med("introspect") >= 21000))
if have("shared"):
    row("shared mode (PostgreSQL + Redis) / embedded, `GET /v1/auth`", "shared", "embedded", "fa-keygate", "≥ 0.8", lambda r: yes(r[0] >= 0.8))
if have("shared-pinned"):
    row("the same, Redis pinned to core 1", "shared-pinned", "embedded", "fa-keygate", "≥ 0.8", lambda r: yes(r[0] >= 0.8))
PY

#!/usr/bin/env bash
# Gateway load test, one run on this machine: one upstream (the bare axum server) measured
#   1. directly,
#   2. through nginx proxy_pass (no auth),
#   3. through nginx auth_request -> keygate /v1/auth, then nginx -> upstream (docs/nginx.conf),
#   4. through keygate's own gateway with a pk key doing every check.
# Servers share core 0, wrk runs on core 1; rounds are interleaved and medians reported.
#
#   bash bench/gateway.sh                      # 3 rounds of 10 s per setup
#   ROUNDS=5 DURATION=20s bash bench/gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
bash scripts/deps.sh
cargo build --release -q -p keygate
cargo build --release -q -p keygate-server --example baseline
BIN=$CARGO_TARGET_DIR/release
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

UP=$(free_port); KG=$(free_port); NPLAIN=$(free_port); NAUTH=$(free_port)
taskset -c 0 "$BIN/examples/baseline" "127.0.0.1:$UP" 2>/dev/null &
cat >"$WORK/keygate.toml" <<TOML
listen = "127.0.0.1:$KG"
database_url = "sqlite://$WORK/kg.db"
[log]
level = "warn"
[proxy]
trusted = ["127.0.0.1/32"]          # nginx (auth_request) is the proxy
[[routes]]
path = "/api/*"
upstream = "http://127.0.0.1:$UP"
scope = "ocr:read"
cost = 1
TOML
taskset -c 0 "$BIN/keygate" serve --config "$WORK/keygate.toml" >"$WORK/root" 2>"$WORK/kg.log" &
SERVER=$(sed -e "s/127.0.0.1:8080/127.0.0.1:$KG/; s/127.0.0.1:9000/127.0.0.1:$UP/; s/listen 8000;/listen 127.0.0.1:$NAUTH;/" docs/nginx.conf)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1;
pid $WORK/nginx/pid; error_log $WORK/nginx/error.log error;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body; proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/f; uwsgi_temp_path $WORK/nginx/u; scgi_temp_path $WORK/nginx/s;
  $SERVER
  server {
    listen 127.0.0.1:$NPLAIN;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" &
wait_http "http://127.0.0.1:$UP/"
wait_http "http://127.0.0.1:$KG/v1/status"
wait_http "http://127.0.0.1:$NPLAIN/"
ROOT=$(head -1 "$WORK/root")
PK=$(curl -fs -X POST "http://127.0.0.1:$KG/v1/keys" -H "authorization: Bearer $ROOT" \
  -H 'content-type: application/json' \
  -d '{"kind":"pk","name":"bench","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
       "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
H=(-H "Authorization: Bearer $PK" -H "Origin: https://claude.ai")

run() { # name url
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${H[@]}" "$2" >"$OUT/gw-$1.txt"
  local non; non=$(awk '/Non-2xx/ {print $NF}' "$OUT/gw-$1.txt")
  [ -z "$non" ] || { echo "$1: $non non-2xx answers; the run is invalid" >&2; cat "$OUT/gw-$1.txt" >&2; exit 1; }
  echo "$1 $(awk '/Requests\/sec/ {print $2}' "$OUT/gw-$1.txt") $(awk '$1=="50%" {print $2}' "$OUT/gw-$1.txt") $(awk '$1=="99%" {print $2}' "$OUT/gw-$1.txt")"
}
for u in "http://127.0.0.1:$UP/api/x" "http://127.0.0.1:$NPLAIN/api/x" "http://127.0.0.1:$NAUTH/api/x" "http://127.0.0.1:$KG/api/x"; do
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "${H[@]}" "$u" >/dev/null
done
: >"$OUT/gw-rounds.txt"
for i in $(seq "$ROUNDS"); do
  run direct "http://127.0.0.1:$UP/api/x" >>"$OUT/gw-rounds.txt"
  run nginx "http://127.0.0.1:$NPLAIN/api/x" >>"$OUT/gw-rounds.txt"
  run nginx-auth "http://127.0.0.1:$NAUTH/api/x" >>"$OUT/gw-rounds.txt"
  run keygate "http://127.0.0.1:$KG/api/x" >>"$OUT/gw-rounds.txt"
done
python3 - "$OUT/gw-rounds.txt" "$CONNECTIONS" "$DURATION" "$ROUNDS" <<'PY' | tee "$OUT/gateway.md"
import statistics, sys
def ms(s):
    return float(s[:-2]) / 1000 if s.endswith("us") else float(s[:-2]) if s.endswith("ms") else float(s[:-1]) * 1000
rows = {}
for l in open(sys.argv[1]):
    n, rps, p50, p99 = l.split()
    rows.setdefault(n, []).append((float(rps), ms(p50), ms(p99)))
med = {n: tuple(statistics.median(x[i] for x in v) for i in range(3)) for n, v in rows.items()}
names = {"direct": "upstream directly", "nginx": "nginx proxy_pass (no auth)",
         "nginx-auth": "nginx auth_request → keygate → upstream", "keygate": "keygate gateway, pk key, all checks"}
print(f"| setup (wrk -t1 -c{sys.argv[2]} -d{sys.argv[3]}, median of {sys.argv[4]} interleaved rounds) | req/s | p50 | p99 |")
print("|---|---|---|---|")
for n in ["direct", "nginx", "nginx-auth", "keygate"]:
    r, a, b = med[n]
    print(f"| {names[n]} | {r:,.0f} | {a:.2f} ms | {b:.2f} ms |")
k, n, na, d = med["keygate"], med["nginx"], med["nginx-auth"], med["direct"]
print()
print(f"keygate gateway / nginx proxy_pass: **{k[0]/n[0]:.2f}**; keygate gateway / nginx+auth_request: **{k[0]/na[0]:.2f}**; "
      f"p99 added over the direct upstream: **{k[2]-d[2]:+.2f} ms**")
PY

#!/usr/bin/env bash
# Soak: forward-auth at half of the measured maximum for a long time while keys are created,
# rotated and revoked throughout, on one node (embedded SQLite, or SHARED=1: PostgreSQL +
# Redis). keygate on core 0 with the audit log on, wrk and the churn on core 1. At the end:
#
#   - resident memory at the end against minute 5 (goal: within 10 %),
#   - errors answered (wrk's non-2xx, socket errors, churn calls that failed; goal: none),
#   - every answered call in the audit log: the key's usage (rolled up from the shipped audit
#     events) against the calls wrk saw answered (at least those; at most the connections'
#     in-flight calls more),
#   - the audit chain verified offline by `keygate audit verify` once the node has stopped.
#
#   bash bench/soak.sh                    # 30 minutes, embedded
#   MINUTES=10 bash bench/soak.sh
#   SHARED=1 bash bench/soak.sh
#
# Prints a Markdown table (also written to bench/out/soak[-shared].md).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-30}
SHARED=${SHARED:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keygate-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ "$MINUTES" -ge 6 ] || { echo "MINUTES must be at least 6 (minute 5 is the reference)" >&2; exit 1; }
cargo build --release -q -p keygate
BIN=$CARGO_TARGET_DIR/release/keygate
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d)
SCHEMA=kgsoak_$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  rm -rf "$WORK"
  [ "$SHARED" != 1 ] || psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
ENV=(KEYGATE_LISTEN="127.0.0.1:$PORT" KEYGATE_LOG__LEVEL=warn KEYGATE_AUDIT__DIR="$WORK/audit"
     KEYGATE_PROXY__TRUSTED='["127.0.0.1/32"]' KEYGATE_DATABASE_URL="sqlite://$WORK/kg.db")
MODE=embedded
if [ "$SHARED" = 1 ]; then
  MODE=shared
  psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $SCHEMA" >/dev/null
  ENV+=(KEYGATE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D$SCHEMA"
        KEYGATE_REDIS_URL=redis://127.0.0.1:6379 KEYGATE_REDIS_PREFIX="$SCHEMA")
fi
env "${ENV[@]}" taskset -c 0 "$BIN" serve >"$WORK/root" 2>"$WORK/log" &
KG=$!
for _ in $(seq 100); do curl -fs -o /dev/null "$BASE/v1/status" && break; sleep 0.1; done
ROOT=$(head -1 "$WORK/root")
read -r PK_ID PK < <(curl -fs -X POST "$BASE/v1/keys" -H "authorization: Bearer $ROOT" -H 'content-type: application/json' \
  -d '{"kind":"pk","name":"soak","preset":"aidemo","allowed_ips":["127.0.0.0/8"],
       "rate_limit":{"limit":1000000000,"window_seconds":60},"budget":1000000000000}' |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["id"], d["key"])')
H=(-H "Authorization: Bearer $PK" -H "Origin: https://claude.ai" -H "X-Keygate-Scope: ocr:read")

# The maximum, then about half of it: each connection waits 1 ms between its calls.
taskset -c 1 wrk -t1 -c32 -d5s "${H[@]}" "$BASE/v1/auth" >"$WORK/max.txt"
MAX=$(awk '/Requests\/sec/ {printf "%d", $2}' "$WORK/max.txt")
PROBED=$(awk '/requests in/ {print $1}' "$WORK/max.txt")   # these are in the key's usage too
echo 'function delay() return 1 end' >"$WORK/delay.lua"
# Connections for half the maximum: a guess (a connection makes about 640 calls/s with its
# 1 ms pause on an embedded node), corrected by 10 s at that guess.
CONNS=$(( (MAX / 2 + 639) / 640 ))
taskset -c 1 wrk -t1 -c"$CONNS" -d10s -s "$WORK/delay.lua" "${H[@]}" "$BASE/v1/auth" >"$WORK/calibrate.txt"
GOT=$(awk '/Requests\/sec/ {printf "%d", $2}' "$WORK/calibrate.txt")
PROBED=$(( PROBED + $(awk '/requests in/ {print $1}' "$WORK/calibrate.txt") ))
CONNS=$(( (CONNS * MAX / 2 + GOT - 1) / GOT ))

# Churn: create, rotate (1 s grace) and revoke a key every 200 ms; count what failed.
python3 - "$BASE" "$ROOT" "$WORK/stop" >"$WORK/churn" <<'PY' &
import json, os, sys, time, urllib.request
base, root, stop = sys.argv[1:]
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body or {}).encode(),
                                 headers={"authorization": f"Bearer {root}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception:
        return 0, None
ok = failed = 0
while not os.path.exists(stop):
    s, k = call("POST", "/v1/keys", {"kind": "sk", "name": "churn", "scopes": ["docs:read"]})
    steps = [s]
    if s == 201:
        s2, succ = call("POST", f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 1})
        steps.append(s2)
        if succ:
            steps.append(call("POST", f"/v1/keys/{succ['id']}/revoke")[0])
    for s in steps:
        if 200 <= s < 300: ok += 1
        else: failed += 1
    time.sleep(0.2)
print(ok, failed)
PY
CHURN=$!
# Resident memory every 10 s: "seconds kB".
( t=0; while kill -0 "$KG" 2>/dev/null; do echo "$t $(ps -o rss= -p "$KG" | tr -d ' ')"; sleep 10; t=$((t + 10)); done ) >"$WORK/rss" &
taskset -c 1 wrk -t1 -c"$CONNS" -d"${MINUTES}m" --timeout 10s --latency -s "$WORK/delay.lua" "${H[@]}" "$BASE/v1/auth" >"$WORK/wrk.txt"
touch "$WORK/stop"; wait "$CHURN"
read -r CHURN_OK CHURN_FAILED <"$WORK/churn"
ANSWERED=$(( $(awk '/requests in/ {print $1}' "$WORK/wrk.txt") + PROBED ))
NON2XX=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt"); NON2XX=${NON2XX:-0}
SOCKERR=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$WORK/wrk.txt"); SOCKERR=${SOCKERR:-0}
RATE=$(awk '/Requests\/sec/ {printf "%d", $2}' "$WORK/wrk.txt")
P99=$(awk '$1=="99%" {print $2}' "$WORK/wrk.txt")
# The audit log ships behind the answers: wait (at most 2 minutes) until the key's usage
# stops growing.
usage() {
  curl -fs "$BASE/v1/keys/$PK_ID/usage?granularity=day" -H "authorization: Bearer $ROOT" |
    python3 -c 'import json,sys; print(sum(b["requests"] for b in json.load(sys.stdin)["data"]))'
}
AUDITED=$(usage); for _ in $(seq 120); do sleep 1; n=$(usage); [ "$n" = "$AUDITED" ] && [ "$n" -ge "$ANSWERED" ] && break; AUDITED=$n; done
kill -TERM "$KG"; wait "$KG" || true
VERIFY=$(env "${ENV[@]}" "$BIN" audit verify 2>&1 | tail -1)
python3 - "$WORK/rss" "$MODE" "$MINUTES" "$MAX" "$CONNS" "$RATE" "$P99" "$ANSWERED" "$NON2XX" "$SOCKERR" "$CHURN_OK" "$CHURN_FAILED" "$AUDITED" "$VERIFY" <<'PY' | tee "$OUT/soak-$MODE.md"
import sys
rss_file, mode, minutes, mx, conns, rate, p99, answered, non2xx, sockerr, churn_ok, churn_failed, audited, verify = sys.argv[1:]
# Calls in flight when wrk stopped were answered and audited but not counted by wrk.
in_flight = int(conns) + 32
rss = [tuple(map(int, l.split())) for l in open(rss_file) if len(l.split()) == 2]
at5 = next((kb for t, kb in rss if t >= 300), rss[-1][1])
end = rss[-1][1]
answered, audited = int(answered), int(audited)
errors = int(non2xx) + int(sockerr) + int(churn_failed)
yes = lambda b: "yes" if b else "**no**"
print(f"`bench/soak.sh`, {mode}, {minutes} minutes: maximum {int(mx):,} req/s, load {conns} connections "
      f"pausing 1 ms between calls; {int(churn_ok):,} key calls (create, rotate, revoke) meanwhile.\n")
print("| check | figure | goal | met |")
print("|---|---|---|---|")
print(f"| rate held | {int(rate):,} req/s (p99 {p99}) | about half the maximum | {yes(int(rate) >= int(mx) * 0.35)} |")
print(f"| resident memory, minute 5 → end | {at5 / 1024:.1f} → {end / 1024:.1f} MB ({end / at5:.2f}) | within 10 % | {yes(end <= at5 * 1.10)} |")
print(f"| errors (non-2xx, socket errors, failed key calls) | {non2xx}, {sockerr}, {churn_failed} | none | {yes(errors == 0)} |")
print(f"| answered calls in the audit log (the key's usage) | {audited:,} for {answered:,} answered | all, and at most the {in_flight} in flight more | {yes(answered <= audited <= answered + in_flight)} |")
print(f"| `keygate audit verify` | {verify} | verifies | {yes('verified' in verify and 'broken' not in verify.lower())} |")
PY

#!/usr/bin/env bash
# Makes sure the shared PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) are up, as CI
# requires. Tests that need them (the many-node mode) use them for real; on a laptop without
# them those tests fail loudly rather than skip.
set -uo pipefail
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi
exit 0

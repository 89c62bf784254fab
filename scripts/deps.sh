#!/usr/bin/env bash
# Installs the real programs the tests drive, when they are missing: nginx and Caddy (the
# forward-auth tests), Chromium (the browser test), wrk (the load test), the browser test's
# npm packages, and Python's authlib (the OAuth client the OAuth flow test drives),
# schemathesis and openapi-spec-validator (the OpenAPI tests), aiosmtpd (the SMTP server the
# email tests read). Needs root for apt-get (as on CI); elsewhere prints what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v caddy >/dev/null || missing+=(caddy)
command -v chromium >/dev/null || missing+=(chromium)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing programs: ${missing[*]} (apt-get install ${missing[*]})" >&2
  fi
fi
if [ -f tests/browser/package.json ] && [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
if ! python3 -c 'import authlib, requests, schemathesis, openapi_spec_validator, aiosmtpd' 2>/dev/null; then
  if command -v python3 >/dev/null; then
    python3 -m pip install -q --disable-pip-version-check authlib requests schemathesis openapi-spec-validator aiosmtpd \
      || echo "could not install the Python test tools (pip install authlib requests schemathesis openapi-spec-validator aiosmtpd)" >&2
  else
    echo "missing python3 (authlib, schemathesis, openapi-spec-validator, aiosmtpd) for the OAuth, OpenAPI and email tests" >&2
  fi
fi

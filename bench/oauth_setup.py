"""Setup for bench/oauth.sh and bench/compare.sh (not measured): a user, a public and a
confidential client, and N grants obtained through the real login + consent + PKCE flow.
Prints shell assignments.

    oauth_setup.py BASE ROOT N                   # everything
    oauth_setup.py BASE ROOT N PUBLIC_CLIENT_ID  # N new grants of that client only (REFRESH):
                                                 # a refresh run leaves its families' last
                                                 # tokens unknown to the next run
"""

import base64
import hashlib
import html.parser
import os
import secrets
import sys
import urllib.parse

import requests

BASE, ROOT, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
H = {"authorization": f"Bearer {ROOT}"}


def post(path, body):
    r = requests.post(BASE + path, json=body, headers=H)
    assert r.status_code == 201, r.text
    return r.json()


class Hidden(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.fields = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a["value"]


def hidden(text):
    p = Hidden()
    p.feed(text)
    return p.fields


GRANTS_ONLY = len(sys.argv) > 4
if GRANTS_ONLY:
    public = {"client_id": sys.argv[4]}
else:
    post("/v1/users", {"email": "bench@example.com", "password": "bench password 1", "plan": "enterprise"})
    public = post("/v1/oauth/clients", {"name": "bench", "type": "public", "redirect_uris": ["http://127.0.0.1/cb"], "scopes": ["docs:read"]})
    conf = post("/v1/oauth/clients", {"name": "bench-backend", "type": "confidential", "redirect_uris": [], "scopes": ["docs:read"]})
    sk = post("/v1/keys", {"kind": "sk", "name": "bench", "scopes": ["docs:read"]})["key"]

browser = requests.Session()
refresh, access = [], None
for i in range(N):
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    q = urllib.parse.urlencode({"response_type": "code", "client_id": public["client_id"], "redirect_uri": "http://127.0.0.1/cb",
                                "scope": "docs:read", "state": str(i), "code_challenge": challenge, "code_challenge_method": "S256"})
    r = browser.get(f"{BASE}/oauth/authorize?{q}", allow_redirects=False)
    while r.status_code == 200:
        form = hidden(r.text)
        extra = {"email": "bench@example.com", "password": "bench password 1"} if form.get("action") == "login" else {"decision": "allow"}
        r = browser.post(f"{BASE}/oauth/authorize", data={**form, **extra}, allow_redirects=False)
    assert r.status_code == 303, r.text
    code = urllib.parse.parse_qs(urllib.parse.urlparse(r.headers["location"]).query)["code"][0]
    t = requests.post(f"{BASE}/oauth/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": "http://127.0.0.1/cb",
                                                   "code_verifier": verifier, "client_id": public["client_id"]}).json()
    refresh.append(t["refresh_token"])
    access = t["access_token"]

print(f"REFRESH='{' '.join(refresh)}'")
if GRANTS_ONLY:
    sys.exit(0)
print(f"CLIENT_ID={public['client_id']}")
print(f"CONF_ID={conf['client_id']}")
print(f"CONF_SECRET={conf['client_secret']}")
print(f"SK={sk}")
print(f"ACCESS={access}")

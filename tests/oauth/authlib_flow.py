"""The whole OAuth 2.0 flow against a running keygate, driven by authlib: a client library
written for any standards-following server. Started by crates/keygate-server/tests/oauth.rs,
which passes the server and the registered clients in KG_* variables.

Exits non-zero (with the failing step) if keygate does anything the RFCs do not allow.
"""

import html.parser
import os
import sys

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session, OAuthError

ISSUER = os.environ["KG_ISSUER"]
PUBLIC_ID = os.environ["KG_PUBLIC_CLIENT_ID"]
CONF_ID = os.environ["KG_CONFIDENTIAL_CLIENT_ID"]
CONF_SECRET = os.environ["KG_CONFIDENTIAL_CLIENT_SECRET"]
REDIRECT = os.environ["KG_REDIRECT_URI"]
EMAIL = os.environ["KG_EMAIL"]
PASSWORD = os.environ["KG_PASSWORD"]
API = os.environ["KG_API_URL"]


def step(msg):
    print(f"-- {msg}", flush=True)


class Form(html.parser.HTMLParser):
    """The fields of the first form on a page (hidden inputs carry the request and CSRF)."""

    def __init__(self):
        super().__init__()
        self.action = None
        self.fields = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action")
        if tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a.get("value", "")


def form_of(page):
    f = Form()
    f.feed(page.text)
    assert f.action == "/oauth/authorize", f"no authorization form in: {page.text[:300]}"
    return f.fields


def authorize(browser, session, verifier, expect_login):
    url, state = session.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier)
    r = browser.get(url, allow_redirects=False)
    if expect_login:
        assert r.status_code == 200 and "Sign in" in r.text, (r.status_code, r.text[:300])
        fields = form_of(r)
        r = browser.post(meta["authorization_endpoint"], data={**fields, "email": EMAIL, "password": PASSWORD}, allow_redirects=False)
        assert r.status_code == 200 and "Allow access" in r.text, (r.status_code, r.text[:300])
        fields = form_of(r)
        r = browser.post(meta["authorization_endpoint"], data={**fields, "decision": "allow"}, allow_redirects=False)
    # Logged in and consented before: straight back to the app.
    assert r.status_code == 303, (r.status_code, r.text[:300])
    location = r.headers["Location"]
    assert location.startswith(REDIRECT + "?"), location
    return location, state


def api_status(token):
    return requests.get(API, headers={"Authorization": f"Bearer {token}"}).status_code


step("metadata (RFC 8414)")
meta = requests.get(ISSUER + "/.well-known/oauth-authorization-server").json()
assert meta["issuer"] == ISSUER, meta
assert meta["code_challenge_methods_supported"] == ["S256"], meta
jwks = requests.get(meta["jwks_uri"]).json()
assert jwks["keys"] and jwks["keys"][0]["alg"] == "EdDSA", jwks

browser = requests.Session()  # the user's browser: keeps keygate's login cookie
app = OAuth2Session(PUBLIC_ID, scope="docs:read", redirect_uri=REDIRECT, code_challenge_method="S256", token_endpoint_auth_method="none")
verifier = generate_token(64)

step("authorize: log in with the real form, consent")
location, state = authorize(browser, app, verifier, expect_login=True)

step("exchange the code with PKCE")
token = app.fetch_token(meta["token_endpoint"], authorization_response=location, state=state, code_verifier=verifier)
assert token["token_type"].lower() == "bearer" and token["scope"] == "docs:read", token
first_refresh = token["refresh_token"]

step("call a gateway route with the access token")
r = app.get(API)
assert r.status_code == 200, (r.status_code, r.text)
assert r.json()["headers"].get("authorization") is None, "the gateway must strip the token"

step("refresh twice (the refresh token rotates)")
t2 = app.refresh_token(meta["token_endpoint"])
assert t2["refresh_token"] != first_refresh
t3 = app.refresh_token(meta["token_endpoint"])
assert t3["refresh_token"] != t2["refresh_token"]
assert api_status(t3["access_token"]) == 200

step("reuse the first refresh token: the whole family is revoked")
r = requests.post(meta["token_endpoint"], data={"grant_type": "refresh_token", "refresh_token": first_refresh, "client_id": PUBLIC_ID})
assert r.status_code == 400 and r.json()["error"] == "invalid_grant", (r.status_code, r.text)
assert api_status(t3["access_token"]) == 401, "the newest access token must be refused"
try:
    app.refresh_token(meta["token_endpoint"])
    raise AssertionError("the newest refresh token must be refused too")
except OAuthError as e:
    assert e.error == "invalid_grant", e

backend = OAuth2Session(CONF_ID, CONF_SECRET, token_endpoint_auth_method="client_secret_basic")

step("introspect (confidential client): the revoked family is inactive")
r = backend.introspect_token(meta["introspection_endpoint"], token=t3["access_token"])
assert r.status_code == 200 and r.json() == {"active": False}, r.text

step("authorize again: the login and the consent are remembered")
app2 = OAuth2Session(PUBLIC_ID, scope="docs:read", redirect_uri=REDIRECT, code_challenge_method="S256", token_endpoint_auth_method="none")
verifier2 = generate_token(64)
location, state = authorize(browser, app2, verifier2, expect_login=False)
token = app2.fetch_token(meta["token_endpoint"], authorization_response=location, state=state, code_verifier=verifier2)

step("introspect the new token: active, with its scope and client")
info = backend.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json()
assert info["active"] is True and info["scope"] == "docs:read" and info["client_id"] == PUBLIC_ID, info

step("revoke the access token (RFC 7009): refused at once, inactive")
r = app2.revoke_token(meta["revocation_endpoint"], token=token["access_token"], token_type_hint="access_token")
assert r.status_code == 200, r.text
assert api_status(token["access_token"]) == 401
assert backend.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json() == {"active": False}

step("revoke the refresh token: the grant ends")
r = app2.revoke_token(meta["revocation_endpoint"], token=token["refresh_token"], token_type_hint="refresh_token")
assert r.status_code == 200, r.text
assert backend.introspect_token(meta["introspection_endpoint"], token=token["refresh_token"]).json() == {"active": False}

print("authlib flow: all steps passed")
sys.exit(0)

//! The OAuth 2.0 authorization server over HTTP: the whole flow driven by a third-party client
//! library (authlib), one negative test per RFC 9700 rule, and tokens judged by the same
//! pipeline as keys.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use support::{eventually, upstream, TestApp};

const EMAIL: &str = "ada@example.com";
const PASSWORD: &str = "correct horse battery staple";
const PUBLIC_REDIRECT: &str = "http://127.0.0.1/cb";

struct Fixture {
    app: TestApp,
    _up: upstream::Upstream,
    public_id: String,
    conf_id: String,
    conf_secret: String,
}

async fn setup(f: impl FnOnce(&mut keygate_server::Config)) -> Fixture {
    let up = upstream::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| {
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/api/docs/*".into(),
            methods: vec![],
            upstream: Some(url),
            scope: Some("docs:read".into()),
            cost: 0,
            public: false,
            class: Default::default(),
        });
        f(c);
    })
    .await;
    let r = app
        .post("/v1/users", json!({"email": EMAIL, "password": PASSWORD}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .post(
            "/v1/oauth/clients",
            json!({"name": "Docs portal <b>", "type": "public",
                   "redirect_uris": [PUBLIC_REDIRECT], "scopes": ["docs:read", "ocr:read"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let public: Value = r.json().await.expect("json");
    assert!(public.get("client_secret").is_none(), "{public}");
    let r = app
        .post(
            "/v1/oauth/clients",
            json!({"name": "Backend", "type": "confidential",
                   "redirect_uris": ["https://app.example.com/cb"], "scopes": ["docs:read"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let conf: Value = r.json().await.expect("json");
    Fixture {
        app,
        _up: up,
        public_id: public["client_id"].as_str().expect("id").into(),
        conf_id: conf["client_id"].as_str().expect("id").into(),
        conf_secret: conf["client_secret"].as_str().expect("secret").into(),
    }
}

/// A user's browser: no automatic redirects, keeps cookies.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookies: HashMap<String, String>,
}

impl Browser {
    fn new(app: &TestApp) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            base: app.url(""),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, r: &reqwest::Response) {
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().expect("cookie");
            assert!(v.contains("HttpOnly") && v.contains("SameSite=Lax"), "{v}");
            let (k, rest) = v.split_once('=').expect("cookie");
            self.cookies
                .insert(k.into(), rest.split(';').next().unwrap_or("").into());
        }
    }

    async fn get(&mut self, path: &str) -> (StatusCode, Option<String>, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("get");
        self.finish(r).await
    }

    async fn post(&mut self, fields: &[(String, String)]) -> (StatusCode, Option<String>, String) {
        let r = self
            .http
            .post(format!("{}/oauth/authorize", self.base))
            .header("cookie", self.cookie_header())
            .form(fields)
            .send()
            .await
            .expect("post");
        self.finish(r).await
    }

    async fn finish(&mut self, r: reqwest::Response) -> (StatusCode, Option<String>, String) {
        self.keep(&r);
        let status = r.status();
        let loc = r
            .headers()
            .get("location")
            .map(|l| l.to_str().expect("location").to_owned());
        (status, loc, r.text().await.expect("body"))
    }
}

/// The hidden fields of our own forms.
fn hidden(html: &str) -> Vec<(String, String)> {
    html.split("<input type=\"hidden\" ")
        .skip(1)
        .filter_map(|s| {
            let name = s.strip_prefix("name=\"")?.split('"').next()?;
            let value = s.split("value=\"").nth(1)?.split('"').next()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn with(mut fields: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    fields.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    fields
}

fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("query")
}

fn param(location: &str, name: &str) -> Option<String> {
    let q = location.split_once('?')?.1;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn authz_path(client_id: &str, redirect: &str, extra: &[(&str, &str)]) -> String {
    let mut p = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("scope", "docs:read"),
        ("state", "xyz <&>"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    for (k, v) in extra {
        p.retain(|(pk, _)| pk != k);
        if !v.is_empty() {
            p.push((k, v));
        }
    }
    format!("/oauth/authorize?{}", query(&p))
}

/// Logs in (first time) and consents; answers the redirect location.
async fn code_for(fx: &Fixture, browser: &mut Browser, redirect: &str) -> String {
    let (status, loc, body) = browser.get(&authz_path(&fx.public_id, redirect, &[])).await;
    if status == StatusCode::SEE_OTHER {
        return loc.expect("location");
    }
    assert_eq!(status, StatusCode::OK, "{body}");
    if body.contains("Sign in") {
        let (status, _, body2) = browser
            .post(&with(
                hidden(&body),
                &[("email", EMAIL), ("password", PASSWORD)],
            ))
            .await;
        if status == StatusCode::SEE_OTHER {
            unreachable!("consent was not remembered yet");
        }
        assert_eq!(status, StatusCode::OK, "{body2}");
        assert!(body2.contains("Allow access"), "{body2}");
        let (status, loc, _) = browser
            .post(&with(hidden(&body2), &[("decision", "allow")]))
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        return loc.expect("location");
    }
    let (status, loc, _) = browser
        .post(&with(hidden(&body), &[("decision", "allow")]))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    loc.expect("location")
}

/// `client_credentials` with the secret in the body.
async fn cc_call(app: &TestApp, id: &str, secret: &str) -> (StatusCode, Value) {
    token_call(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
        ],
    )
    .await
}

async fn token_call(app: &TestApp, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = app
        .client
        .post(app.url("/oauth/token"))
        .form(form)
        .send()
        .await
        .expect("token");
    let status = r.status();
    assert_eq!(r.headers()["cache-control"], "no-store");
    (status, r.json().await.expect("json"))
}

async fn exchange(fx: &Fixture, code: &str, verifier: &str) -> (StatusCode, Value) {
    token_call(
        &fx.app,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", PUBLIC_REDIRECT),
            ("code_verifier", verifier),
            ("client_id", &fx.public_id),
        ],
    )
    .await
}

async fn auth_status(app: &TestApp, token: &str, scope: &str) -> (StatusCode, String) {
    let r = app.auth(Some(token), &[("X-Keygate-Scope", scope)]).await;
    let status = r.status();
    let code = r
        .headers()
        .get("x-keygate-code")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn authlib_drives_the_whole_flow() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import authlib, requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with authlib and requests is required on CI (scripts/deps.sh installs them)"
        );
        eprintln!("!!! SKIPPED: python3 with authlib and requests is not installed (pip install authlib requests)");
        return;
    }
    let fx = setup(|_| {}).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oauth/authlib_flow.py");
    let issuer = fx.app.url("");
    let env = [
        ("AUTHLIB_INSECURE_TRANSPORT", "1".to_owned()),
        ("KG_ISSUER", issuer.trim_end_matches('/').to_owned()),
        ("KG_PUBLIC_CLIENT_ID", fx.public_id.clone()),
        ("KG_CONFIDENTIAL_CLIENT_ID", fx.conf_id.clone()),
        ("KG_CONFIDENTIAL_CLIENT_SECRET", fx.conf_secret.clone()),
        // Registered without a port: a native app's loopback port varies (RFC 8252 §7.3).
        ("KG_REDIRECT_URI", "http://127.0.0.1:53682/cb".to_owned()),
        ("KG_EMAIL", EMAIL.to_owned()),
        ("KG_PASSWORD", PASSWORD.to_owned()),
        ("KG_API_URL", fx.app.url("/api/docs/readme")),
    ];
    // On the blocking pool: the server under test runs on this test's runtime.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .envs(env)
            .output()
    })
    .await
    .expect("join")
    .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "authlib flow failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all steps passed"), "{stdout}");
    // The reuse was an incident: one alert, one audit event.
    eventually(|| async {
        let v: Value = fx.app.get("/v1/alerts").await.json().await.expect("json");
        v["data"].as_array().is_some_and(|a| {
            a.iter()
                .filter(|x| x["kind"] == "oauth.refresh_reuse")
                .count()
                == 1
        })
    })
    .await;
    eventually(|| async {
        let v: Value = fx
            .app
            .get("/v1/audit?action=oauth.refresh_reuse")
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn authorization_endpoint_follows_the_bcp() {
    let fx = setup(|_| {}).await;
    let mut b = Browser::new(&fx.app);
    let error_of = |loc: &Option<String>| {
        let loc = loc.as_deref().expect("a redirect back to the client");
        assert!(loc.starts_with(PUBLIC_REDIRECT), "{loc}");
        // state comes back untouched, and the issuer is named (RFC 9207).
        assert_eq!(param(loc, "state").as_deref(), Some("xyz <&>"));
        assert!(param(loc, "iss").is_some());
        param(loc, "error").expect("error")
    };
    // A public client without PKCE, with `plain`, or with a malformed challenge.
    for extra in [
        &[("code_challenge", ""), ("code_challenge_method", "")][..],
        &[("code_challenge_method", "plain")],
        &[("code_challenge_method", "")],
        &[("code_challenge", "short")],
    ] {
        let (s, loc, _) = b
            .get(&authz_path(&fx.public_id, PUBLIC_REDIRECT, extra))
            .await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{extra:?}");
        assert_eq!(error_of(&loc), "invalid_request", "{extra:?}");
    }
    let (_, loc, _) = b
        .get(&authz_path(
            &fx.public_id,
            PUBLIC_REDIRECT,
            &[("response_type", "token")],
        ))
        .await;
    assert_eq!(error_of(&loc), "unsupported_response_type");
    let (_, loc, _) = b
        .get(&authz_path(
            &fx.public_id,
            PUBLIC_REDIRECT,
            &[("scope", "billing:write")],
        ))
        .await;
    assert_eq!(error_of(&loc), "invalid_scope");
    // The redirect URI cannot be trusted: an error page, never a redirect.
    for redirect in [
        "https://evil.example/cb",
        "http://127.0.0.1/cb/../evil",
        "http://127.0.0.1.evil.example/cb",
    ] {
        let (s, loc, body) = b.get(&authz_path(&fx.public_id, redirect, &[])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{redirect}");
        assert!(loc.is_none(), "{redirect}");
        assert!(body.contains("not registered"), "{body}");
    }
    let (s, loc, _) = b.get(&authz_path("cli_nope", PUBLIC_REDIRECT, &[])).await;
    assert_eq!((s, loc), (StatusCode::BAD_REQUEST, None));
    // A repeated parameter is refused.
    let dup = format!(
        "{}&scope=ocr:read",
        authz_path(&fx.public_id, PUBLIC_REDIRECT, &[])
    );
    let (s, loc, _) = b.get(&dup).await;
    assert_eq!((s, loc), (StatusCode::BAD_REQUEST, None));

    // The login form: the client's name is escaped, a wrong password sets no session.
    let (s, _, page) = b
        .get(&authz_path(&fx.public_id, PUBLIC_REDIRECT, &[]))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Docs portal &lt;b&gt;"), "{page}");
    let form = hidden(&page);
    let (s, _, again) = b
        .post(&with(
            form.clone(),
            &[("email", EMAIL), ("password", "wrong password")],
        ))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(again.contains("Wrong email or password"));
    assert!(!b.cookies.contains_key("kg_oauth_session"));
    // CSRF: a form whose token is not this browser's is refused.
    let mut forged = hidden(&again);
    for (k, v) in &mut forged {
        if k == "csrf" {
            *v = "x".repeat(32);
        }
    }
    let (s, _, _) = b
        .post(&with(forged, &[("email", EMAIL), ("password", PASSWORD)]))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let mut other_browser = Browser::new(&fx.app);
    let (s, _, _) = other_browser
        .post(&with(
            hidden(&again),
            &[("email", EMAIL), ("password", PASSWORD)],
        ))
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a form without its cookie is refused"
    );
    // Log in, then deny: access_denied goes back to the client.
    let (s, _, consent) = b
        .post(&with(
            hidden(&again),
            &[("email", EMAIL), ("password", PASSWORD)],
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{consent}");
    assert!(b.cookies.contains_key("kg_oauth_session"));
    let (s, loc, _) = b
        .post(&with(hidden(&consent), &[("decision", "deny")]))
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(error_of(&loc), "access_denied");
}

#[tokio::test]
async fn token_endpoint_follows_the_bcp() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    let mut b = Browser::new(app);
    let code = |loc: String| param(&loc, "code").expect("code");

    // Wrong verifier: refused, and the code is not burnt for the real client (whoever only
    // intercepted the code cannot deny the user their login).
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let (s, v) = exchange(&fx, &c, &"a".repeat(43)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let (s, v) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // PKCE downgrade: no verifier for a code issued with a challenge.
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let (s, v) = token_call(
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &c),
            ("redirect_uri", PUBLIC_REDIRECT),
            ("client_id", &fx.public_id),
        ],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    // The verifier sent as `plain` (the challenge itself).
    let (s, v) = exchange(&fx, &c, CHALLENGE).await;
    assert_eq!(v["error"], "invalid_grant", "{s} {v}");
    // Redirect URI differs from the authorization request's.
    let c = code(code_for(&fx, &mut b, "http://127.0.0.1:4000/cb").await);
    let (_, v) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(v["error"], "invalid_grant");
    // Another client presents this client's code.
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let r = app
        .client
        .post(app.url("/oauth/token"))
        .basic_auth(&fx.conf_id, Some(&fx.conf_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", c.as_str()),
            ("redirect_uri", PUBLIC_REDIRECT),
            ("code_verifier", VERIFIER),
        ])
        .send()
        .await
        .expect("token");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "invalid_grant");
    let (s, v) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the real client still gets its tokens: {v}"
    );
    // An expired code.
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let pool = sqlx::SqlitePool::connect(&app.db_url()).await.expect("db");
    sqlx::query("UPDATE oauth_codes SET expires_at = 0 WHERE hash = ?")
        .bind(keygate_oauth::token_hash(&c))
        .execute(&pool)
        .await
        .expect("age the code");
    let (_, v) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(v["error_description"], "the code has expired");

    // A good exchange, then the same code again: invalid_grant, and its tokens are revoked.
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let (s, t) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 3600);
    let access = t["access_token"].as_str().expect("access");
    assert_eq!(
        auth_status(app, access, "docs:read").await.0,
        StatusCode::OK
    );
    // The used code alone (seen in a log, presented by another client or without the
    // verifier) revokes nothing.
    let r = app
        .client
        .post(app.url("/oauth/token"))
        .basic_auth(&fx.conf_id, Some(&fx.conf_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", c.as_str()),
            ("redirect_uri", PUBLIC_REDIRECT),
            ("code_verifier", VERIFIER),
        ])
        .send()
        .await
        .expect("token");
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"],
        "invalid_grant"
    );
    let (_, v) = exchange(&fx, &c, &"b".repeat(43)).await;
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(
        auth_status(app, access, "docs:read").await.0,
        StatusCode::OK
    );
    // Presented again with its verifier: the replay revokes what the code issued.
    let (_, v) = exchange(&fx, &c, VERIFIER).await;
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(
        auth_status(app, access, "docs:read").await,
        (StatusCode::UNAUTHORIZED, "REVOKED".into())
    );
    let (_, v) = token_call(
        app,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", &fx.public_id),
            ("refresh_token", t["refresh_token"].as_str().expect("rt")),
        ],
    )
    .await;
    assert_eq!(v["error"], "invalid_grant");

    // A refresh token past its grant's absolute lifetime.
    let c = code(code_for(&fx, &mut b, PUBLIC_REDIRECT).await);
    let (_, t) = exchange(&fx, &c, VERIFIER).await;
    sqlx::query("UPDATE oauth_grants SET expires_at = 0")
        .execute(&pool)
        .await
        .expect("age the grants");
    let (_, v) = token_call(
        app,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", &fx.public_id),
            ("refresh_token", t["refresh_token"].as_str().expect("rt")),
        ],
    )
    .await;
    assert_eq!(v["error"], "invalid_grant");
    assert_eq!(v["error_description"], "the refresh token has expired");

    // Client authentication and parameter errors.
    let r = app
        .client
        .post(app.url("/oauth/token"))
        .basic_auth(&fx.conf_id, Some("wrong"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"keygate\"");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "invalid_client");
    let (s, v) = token_call(
        app,
        &[("grant_type", "password"), ("client_id", &fx.public_id)],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    let (_, v) = token_call(app, &[("client_id", &fx.public_id)]).await;
    assert_eq!(v["error"], "invalid_request");
    let (_, v) = token_call(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &fx.public_id),
        ],
    )
    .await;
    assert_eq!(v["error"], "unauthorized_client");
    let (_, v) = token_call(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("grant_type", "client_credentials"),
            ("client_id", &fx.conf_id),
            ("client_secret", &fx.conf_secret),
        ],
    )
    .await;
    assert_eq!(v["error"], "invalid_request");
    let r = app
        .client
        .post(app.url("/oauth/token"))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "invalid_request");
    let (_, v) = token_call(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "ocr:read"),
            ("client_id", &fx.conf_id),
            ("client_secret", &fx.conf_secret),
        ],
    )
    .await;
    assert_eq!(v["error"], "invalid_scope");
}

#[tokio::test]
async fn access_tokens_are_judged_like_keys() {
    let fx = setup(|c| {
        if let Some(free) = c.plans.get_mut("free") {
            free.rate_limit = Some(keygate_core::RateLimit {
                limit: 5,
                window_seconds: 60,
            });
        }
    })
    .await;
    let app = &fx.app;
    let mut b = Browser::new(app);
    let c = param(&code_for(&fx, &mut b, PUBLIC_REDIRECT).await, "code").expect("code");
    let (_, t) = exchange(&fx, &c, VERIFIER).await;
    let access = t["access_token"].as_str().expect("access").to_owned();

    // Forward-auth: the identity headers name the grant, the tenant and the user.
    let r = app
        .auth(Some(&access), &[("X-Keygate-Scope", "docs:read")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let grant = r.headers()["x-keygate-key-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert!(grant.starts_with("grt_"), "{grant}");
    assert_eq!(r.headers()["x-keygate-tenant"], "default");
    assert!(r.headers()["x-keygate-user"]
        .to_str()
        .expect("user")
        .starts_with("usr_"));
    assert_eq!(r.headers()["x-keygate-scopes"], "docs:read");
    // Scope: the token holds docs:read only.
    assert_eq!(
        auth_status(app, &access, "ocr:read").await,
        (StatusCode::FORBIDDEN, "FORBIDDEN_SCOPE".into())
    );
    // The verify API.
    let v: Value = app
        .post(
            "/v1/keys/verify",
            json!({"key": access, "scope": "docs:read"}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["key_id"], grant.as_str());
    assert_eq!(v["kind"], "ut");
    // The user's plan's rate limit: 5 a minute, 2 used so far (the refusal did not count).
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..4 {
        match auth_status(app, &access, "docs:read").await.0 {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, limited), (3, 1));
    // Every decision is an audit event under the grant.
    eventually(|| async {
        let v: Value = app
            .get(&format!("/v1/audit?key_id={grant}&action=request.decided"))
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().is_some_and(|a| a.len() == 7)
    })
    .await;

    // Altered, expired and foreign tokens.
    let mut parts: Vec<&str> = access.split('.').collect();
    let sig = parts[2].replace('A', "B");
    parts[2] = &sig;
    let altered = parts.join(".");
    if altered != access {
        assert_eq!(
            auth_status(app, &altered, "docs:read").await,
            (StatusCode::UNAUTHORIZED, "UNKNOWN_KEY".into())
        );
    }
    let state = app.app_state();
    let g = keygate_store::OAuthGrant {
        id: grant.clone(),
        client_id: fx.public_id.clone(),
        tenant_id: "default".into(),
        user_id: None,
        scope: "docs:read".into(),
        created_at_ms: 0,
        expires_at_ms: 0,
        revoked_at_ms: None,
        revoked_reason: None,
    };
    let two_hours_ago = keygate_engine::clock::now_ms() - 7_200_000;
    let (expired, _, _) = state
        .oauth
        .mint_access(&state.config, &g, "docs:read", two_hours_ago)
        .expect("mint");
    assert_eq!(
        auth_status(app, &expired, "docs:read").await,
        (StatusCode::UNAUTHORIZED, "EXPIRED".into())
    );
    let r = app
        .client
        .post(app.url("/oauth/introspect"))
        .bearer_auth(&app.root)
        .form(&[("token", expired.as_str())])
        .send()
        .await
        .expect("introspect");
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"active": false})
    );
    assert_eq!(
        auth_status(app, "eyJ.eyJ.x", "docs:read").await.0,
        StatusCode::UNAUTHORIZED
    );

    // client_credentials: an `sk`-like token of the client's tenant, no user, no refresh.
    let (s, cc) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
    assert_eq!(s, StatusCode::OK, "{cc}");
    assert!(cc.get("refresh_token").is_none());
    let cc_token = cc["access_token"].as_str().expect("access");
    let r = app
        .auth(Some(cc_token), &[("X-Keygate-Scope", "docs:read")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // No user: the header is sent empty (see forward-auth).
    assert_eq!(r.headers()["x-keygate-user"], "");

    // Introspection with an `sk` key: the operator's sees every tenant; a key without the
    // scope is refused.
    let r = app
        .client
        .post(app.url("/oauth/introspect"))
        .bearer_auth(&app.root)
        .form(&[("token", cc_token)])
        .send()
        .await
        .expect("introspect");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["client_id"], fx.conf_id.as_str());
    let (weak, _) = app
        .create_key(json!({"kind": "sk", "name": "weak", "scopes": ["docs:read"]}))
        .await;
    let r = app
        .client
        .post(app.url("/oauth/introspect"))
        .bearer_auth(&weak)
        .form(&[("token", cc_token)])
        .send()
        .await
        .expect("introspect");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A public client cannot introspect.
    let r = app
        .client
        .post(app.url("/oauth/introspect"))
        .form(&[("token", cc_token), ("client_id", fx.public_id.as_str())])
        .send()
        .await
        .expect("introspect");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A token is for the resource API: management routes refuse it, whatever its scopes
    // (it must not mint keys that outlive it).
    let r = app
        .post(
            "/v1/oauth/clients",
            json!({"name": "Reader", "type": "confidential", "scopes": ["keys:read"]}),
        )
        .await;
    let reader: Value = r.json().await.expect("json");
    let (_, rt) = token_call(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", reader["client_id"].as_str().expect("id")),
            (
                "client_secret",
                reader["client_secret"].as_str().expect("secret"),
            ),
        ],
    )
    .await;
    let r = app
        .as_key(rt["access_token"].as_str().expect("token"))
        .get(app.url("/v1/keys"))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(support::error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    // … and the audit log says so (the decision itself refused it).
    eventually(|| async {
        let v: Value = app
            .get("/v1/audit?code=BLOCKED_FOR_KEY_TYPE&action=request.decided")
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/v1/keys"))
            })
        })
    })
    .await;

    // Deleting the client revokes its grants at once.
    assert_eq!(
        app.delete(&format!("/v1/oauth/clients/{}", fx.conf_id))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        auth_status(app, cc_token, "docs:read").await,
        (StatusCode::UNAUTHORIZED, "REVOKED".into())
    );
}

#[tokio::test]
async fn signing_key_rotation_keeps_old_tokens_valid() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    let cc = || async {
        let (s, v) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
        assert_eq!(s, StatusCode::OK);
        v["access_token"].as_str().expect("token").to_owned()
    };
    let kid_of = |t: &str| {
        use base64::Engine;
        let head = t.split('.').next().expect("header");
        let h: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(head)
                .expect("b64"),
        )
        .expect("json");
        assert_eq!(h["typ"], "at+jwt");
        assert_eq!(h["alg"], "EdDSA");
        h["kid"].as_str().expect("kid").to_owned()
    };
    let old = cc().await;
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
    let r = app.post("/v1/oauth/signing-keys/rotate", json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let new_kid = r.json::<Value>().await.expect("json")["kid"]
        .as_str()
        .expect("kid")
        .to_owned();
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(
        kids.contains(&new_kid.as_str()) && kids.contains(&kid_of(&old).as_str()),
        "{kids:?}"
    );
    let new = cc().await;
    assert_eq!(kid_of(&new), new_kid);
    assert_eq!(auth_status(app, &old, "docs:read").await.0, StatusCode::OK);
    assert_eq!(auth_status(app, &new, "docs:read").await.0, StatusCode::OK);
    // Only the operator may rotate.
    let (admin, _) = app
        .create_key(json!({"kind": "sk", "name": "a", "scopes": ["oauth:write"]}))
        .await;
    let r = app
        .as_key(&admin)
        .post(app.url("/v1/oauth/signing-keys/rotate"))
        .send()
        .await
        .expect("rotate");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Metadata names the S256 method only.
    let m: Value = app
        .get("/.well-known/oauth-authorization-server")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(m["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(m["issuer"], app.url("").trim_end_matches('/'));
}

#[tokio::test]
async fn client_registration_checks_its_input() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    for (body, why) in [
        (
            json!({"name": "x", "type": "public", "redirect_uris": [], "scopes": ["docs:read"]}),
            "needs at least one redirect",
        ),
        (
            json!({"name": "x", "type": "public", "redirect_uris": ["http://app.example.com/cb"], "scopes": ["docs:read"]}),
            "loopback",
        ),
        (
            json!({"name": "x", "type": "public", "redirect_uris": ["https://a.example/cb#f"], "scopes": ["docs:read"]}),
            "fragment",
        ),
        (
            json!({"name": "x", "type": "public", "redirect_uris": ["https://a.example/cb"], "scopes": ["*"]}),
            "cannot hold",
        ),
        (
            json!({"name": "x", "type": "other", "redirect_uris": ["https://a.example/cb"], "scopes": ["a"]}),
            "type must be",
        ),
        (
            json!({"name": "x", "type": "public", "redirect_uris": ["https://a.example/cb"], "scopes": ["bad scope"]}),
            "invalid scope",
        ),
    ] {
        let r = app.post("/v1/oauth/clients", body.clone()).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "INVALID_REQUEST");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(why),
            "{v}"
        );
    }
    // Nothing was stored; the list shows the two fixture clients, without secrets.
    let v: Value = app
        .get("/v1/oauth/clients")
        .await
        .json()
        .await
        .expect("json");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert!(data.iter().all(|c| c.get("client_secret").is_none()));
    // A `pk` key is blocked; another tenant's admin sees nothing of ours.
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "p", "scopes": ["docs:read"], "allowed_origins": ["https://a.example"]}))
        .await;
    let r = app
        .as_key(&pk)
        .get(app.url("/v1/oauth/clients"))
        .header("origin", "https://a.example")
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let t: Value = app
        .post("/v1/tenants", json!({"name": "other"}))
        .await
        .json()
        .await
        .expect("json");
    let other = t["admin_key"]["key"]
        .as_str()
        .expect("admin key")
        .to_owned();
    let r = app
        .as_key(&other)
        .get(app.url(&format!("/v1/oauth/clients/{}", fx.public_id)))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The secret is stored as a hash only.
    let pool = sqlx::SqlitePool::connect(&app.db_url()).await.expect("db");
    let stored: Option<String> =
        sqlx::query_scalar("SELECT secret_hash FROM oauth_clients WHERE id = ?")
            .bind(&fx.conf_id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(stored, Some(keygate_oauth::token_hash(&fx.conf_secret)));
}

#[tokio::test]
async fn failed_sign_ins_slow_the_account_down_but_never_lock_its_owner_out() {
    let fx = setup(|c| {
        c.login.account_free_failures = 3;
        c.login.base_delay_ms = 300;
        c.login.account_max_delay_ms = 600;
        c.login.network_free_failures = 1_000;
    })
    .await;
    let mut b = Browser::new(&fx.app);
    let (_, _, mut page) = b
        .get(&authz_path(&fx.public_id, PUBLIC_REDIRECT, &[]))
        .await;
    // Someone who knows the email guesses as fast as they can: the first 3 failures are free,
    // then each guess must wait (refused unchecked, 429 with Retry-After, while it does).
    let mut judged = 0;
    let mut throttled = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while judged < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "10 guesses within 20 s"
        );
        let r = b
            .http
            .post(format!("{}/oauth/authorize", b.base))
            .header("cookie", b.cookie_header())
            .form(&with(
                hidden(&page),
                &[("email", EMAIL), ("password", &format!("guess {judged}"))],
            ))
            .send()
            .await
            .expect("post");
        b.keep(&r);
        let status = r.status();
        let retry_after = r.headers().get("retry-after").cloned();
        page = r.text().await.expect("body");
        match status {
            StatusCode::UNAUTHORIZED => judged += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(judged > 3, "the first failures are free");
                let secs: u64 = retry_after
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .expect("Retry-After");
                assert_eq!(secs, 1, "a wait of at most 600 ms, rounded up");
                assert!(page.contains("Too many failed sign-ins"));
                throttled += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other}: {page}"),
        }
    }
    assert!(throttled > 0, "guessing was slowed down");
    // While the account waits, even the right password is not checked.
    let (s, _, next) = b
        .post(&with(
            hidden(&page),
            &[("email", EMAIL), ("password", PASSWORD)],
        ))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(!b.cookies.contains_key("kg_oauth_session"));
    page = next;
    // After ten failures the owner still gets in once the (capped) wait is over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (s, location, next) = b
            .post(&with(
                hidden(&page),
                &[("email", EMAIL), ("password", PASSWORD)],
            ))
            .await;
        if s != StatusCode::TOO_MANY_REQUESTS {
            assert!(
                b.cookies.contains_key("kg_oauth_session"),
                "{s} {location:?}: {next}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "locked out: {next}");
        page = next;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The key id `/v1/auth` answers for a token it allows.
async fn key_id_of(app: &TestApp, token: &str) -> String {
    let r = app
        .auth(Some(token), &[("X-Keygate-Scope", "docs:read")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.headers()["x-keygate-key-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test]
async fn tokens_issued_on_one_node_work_and_die_on_every_node() {
    // Several nodes must share one issuer (the default is each node's own address).
    let issuer = "https://auth.keygate.test";
    let a = TestApp::spawn_postgres(|c| c.oauth.issuer = issuer.into()).await;
    let b = TestApp::spawn_on(a.db_url(), |c| c.oauth.issuer = issuer.into())
        .await
        .with_root(a.root.clone());
    let r = a
        .post(
            "/v1/oauth/clients",
            json!({"name": "Backend", "type": "confidential", "scopes": ["docs:read"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let client: Value = r.json().await.expect("json");
    let (id, secret) = (
        client["client_id"].as_str().expect("id"),
        client["client_secret"].as_str().expect("secret"),
    );
    let (s, t) = cc_call(&a, id, secret).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let token = t["access_token"].as_str().expect("token");
    // Both nodes publish the same keys and accept the token.
    let ja: Value = a
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    let jb: Value = b
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(ja, jb);
    assert_eq!(auth_status(&b, token, "docs:read").await.0, StatusCode::OK);
    // Every client_credentials token of a client is of its one standing grant, whichever node
    // issued it: one key id (one rate window), and no row written per token.
    let cc = |node: &'static str| {
        let app = if node == "a" { &a } else { &b };
        async move {
            let (s, t) = cc_call(app, id, secret).await;
            assert_eq!(s, StatusCode::OK, "{t}");
            t["access_token"].as_str().expect("token").to_owned()
        }
    };
    let (second, third) = (cc("a").await, cc("b").await);
    let grant = key_id_of(&b, token).await;
    assert!(grant.starts_with("grt_"), "{grant}");
    assert_eq!(key_id_of(&a, &second).await, grant);
    assert_eq!(key_id_of(&b, &third).await, grant);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&a.db_url()).await.expect("database");
    let grants: i64 = sqlx::query_scalar("SELECT count(*) FROM oauth_grants WHERE client_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(grants, 1);
    // Each token issued is an audit event naming its jti.
    eventually(|| async {
        let v: Value = a
            .get("/v1/audit?action=oauth.client_credentials")
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().is_some_and(|e| e.len() == 3)
    })
    .await;
    // Revoked on A: refused on B at once (the change feed, not the cache TTL).
    let r = a
        .client
        .post(a.url("/oauth/revoke"))
        .basic_auth(id, Some(secret))
        .form(&[("token", token)])
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), StatusCode::OK);
    eventually(|| async {
        auth_status(&b, token, "docs:read").await == (StatusCode::UNAUTHORIZED, "REVOKED".into())
    })
    .await;
    assert_eq!(
        auth_status(&a, token, "docs:read").await,
        (StatusCode::UNAUTHORIZED, "REVOKED".into())
    );
    // Introspection on B, which had the token cached, says so too.
    let introspect = |app: &TestApp, t: &str| {
        app.client
            .post(app.url("/oauth/introspect"))
            .basic_auth(id, Some(secret))
            .form(&[("token", t)])
            .send()
    };
    let v: Value = introspect(&b, token)
        .await
        .expect("introspect")
        .json()
        .await
        .expect("json");
    assert_eq!(v, json!({"active": false}));
    let v: Value = introspect(&b, &third)
        .await
        .expect("introspect")
        .json()
        .await
        .expect("json");
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["grant_id"], grant.as_str());
    // Revoking one token leaves the client's others working.
    assert_eq!(auth_status(&b, &third, "docs:read").await.0, StatusCode::OK);
    // Deleted on A: B, which holds the client in its cache, refuses it at once, and every
    // token of it.
    assert_eq!(
        a.delete(&format!("/v1/oauth/clients/{id}")).await.status(),
        StatusCode::NO_CONTENT
    );
    eventually(|| async {
        let (s, v) = cc_call(&b, id, secret).await;
        s == StatusCode::UNAUTHORIZED && v["error"] == "invalid_client"
    })
    .await;
    for t in [&second, &third] {
        assert_eq!(
            auth_status(&b, t, "docs:read").await,
            (StatusCode::UNAUTHORIZED, "REVOKED".into())
        );
    }
}

#[tokio::test]
async fn a_client_deleted_behind_a_nodes_back_gets_no_new_grant() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    // The node caches the client (an introspection authenticates it) before any token.
    let r = app
        .client
        .post(app.url("/oauth/introspect"))
        .basic_auth(&fx.conf_id, Some(&fx.conf_secret))
        .form(&[("token", "nothing")])
        .send()
        .await
        .expect("introspect");
    assert_eq!(r.status(), StatusCode::OK);
    // Deleted in the store with no change-feed message (as if it were lost): the cached
    // client authenticates, but no standing grant is made for a client that is gone.
    let gone = app
        .app_state()
        .store
        .delete_client(&fx.conf_id, keygate_engine::clock::now_ms())
        .await
        .expect("delete");
    assert_eq!(gone.first(), Some(&fx.conf_id));
    let (s, v) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"], "invalid_client");
    // … and stays refused.
    let (s, _) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_access_token_refused_on_a_management_route_is_told_tokens_may_not_call_it() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    let (_, t) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
    let token = t["access_token"].as_str().expect("token");
    for path in ["/v1/keys", "/v1/audit", "/v1/webhooks", "/v1/oauth/clients"] {
        let r = app
            .as_key(token)
            .get(app.url(path))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "BLOCKED_FOR_KEY_TYPE", "{path}: {v}");
        assert_eq!(
            v["error"]["message"], "OAuth access tokens may not call this endpoint",
            "{path}: {v}"
        );
        assert!(v["error"]["request_id"].as_str().is_some(), "{v}");
    }
    // A publishable key keeps its own message.
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "p", "scopes": ["docs:read"], "allowed_origins": ["https://a.example"]}))
        .await;
    let r = app
        .as_key(&pk)
        .get(app.url("/v1/keys"))
        .header("origin", "https://a.example")
        .send()
        .await
        .expect("request");
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["error"]["message"],
        "publishable keys may not call this endpoint"
    );
}

#[tokio::test]
async fn a_key_cannot_delete_an_oauth_client_whose_scopes_it_does_not_hold() {
    let fx = setup(|_| {}).await;
    let app = &fx.app;
    // A live token of the confidential client (scope docs:read).
    let (_, t) = cc_call(app, &fx.conf_id, &fx.conf_secret).await;
    let token = t["access_token"].as_str().expect("token").to_owned();
    assert_eq!(
        auth_status(app, &token, "docs:read").await.0,
        StatusCode::OK
    );
    let (narrow, _) = app
        .create_key(
            json!({"kind": "sk", "name": "oauth admin", "scopes": ["oauth:write", "oauth:read"]}),
        )
        .await;
    for id in [&fx.conf_id, &fx.public_id] {
        let r = app
            .as_key(&narrow)
            .delete(app.url(&format!("/v1/oauth/clients/{id}")))
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{id}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "FORBIDDEN_SCOPE", "{v}");
        assert!(v["error"]["request_id"].as_str().is_some(), "{v}");
        // The client is still there, and so are its grants.
        let r = app
            .as_key(&narrow)
            .get(app.url(&format!("/v1/oauth/clients/{id}")))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::OK, "{id}");
    }
    assert_eq!(
        auth_status(app, &token, "docs:read").await.0,
        StatusCode::OK
    );
    // A key holding every scope of the client may delete it.
    let (covering, _) = app
        .create_key(
            json!({"kind": "sk", "name": "docs admin", "scopes": ["oauth:write", "docs:read"]}),
        )
        .await;
    let r = app
        .as_key(&covering)
        .delete(app.url(&format!("/v1/oauth/clients/{}", fx.conf_id)))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .as_key(&covering)
        .delete(app.url(&format!("/v1/oauth/clients/{}", fx.public_id)))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "ocr:read is not covered");
}

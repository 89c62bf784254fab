//! Regression tests of the attacks in issue 17, each through the real entry point: the gateway
//! in front of a real WSGI upstream (Python's `wsgiref`), forward-auth, and the verify API.

mod support;

use keygate_core::RouteClass;
use keygate_engine::config::RouteConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{error_code, eventually, wsgi, TestApp};

fn route(path: &str, upstream: Option<&str>, scope: Option<&str>, cost: u64) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        methods: vec![],
        upstream: upstream.map(Into::into),
        scope: scope.map(Into::into),
        cost,
        public: false,
        class: RouteClass::Normal,
    }
}

/// The route table of the report: an admin area, a scoped area, an expensive one, and a
/// catch-all below them.
fn svc_routes(c: &mut keygate_server::Config, upstream: Option<&str>) {
    c.routes.push(RouteConfig {
        class: RouteClass::Admin,
        ..route("/svc/admin/*", upstream, None, 1)
    });
    c.routes
        .push(route("/svc/ocr/*", upstream, Some("ocr:read"), 1));
    c.routes
        .push(route("/svc/expensive/*", upstream, None, 100));
    c.routes.push(route("/svc/$batch", upstream, None, 50));
    c.routes
        .push(route("/svc/*", upstream, Some("docs:read"), 1));
}

async fn pk_key(app: &TestApp) -> String {
    app.create_key(
        json!({"kind": "pk", "name": "web", "scopes": ["docs:read", "ocr:read"],
        "allowed_origins": ["https://app.example.com"]}),
    )
    .await
    .0
}

/// A GET with `path` exactly as written (reqwest's URL parser would resolve `%2e%2e` itself):
/// returns the status and the JSON body.
async fn raw_get(app: &TestApp, path: &str, key: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         origin: https://app.example.com\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn send(app: &TestApp, path: &str, key: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(key)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn a_path_spelled_differently_is_judged_as_the_path_the_upstream_reads() {
    let up = wsgi::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| svc_routes(c, Some(&url))).await;
    let pk = pk_key(&app).await;
    // Spellings of /svc/admin/users that a decoding or case-insensitive upstream reads as
    // the admin area: refused as the admin area (pk keys are blocked there).
    for path in [
        "/svc/%61dmin/users",
        "/svc/Admin/users",
        "/svc/ADMIN/users",
        "/svc/admin.json",
        "/svc/adm%C4%B1n/users",
    ] {
        let r = send(&app, path, &pk).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE", "{path}");
    }
    // What has no safe normal form is refused before any route is looked at.
    for path in [
        "/svc/admin;x=1/users",
        "/svc/x/..;/admin/users",
        "/svc/x/%2e%2e/admin/users",
        "/svc/a%2fb",
        "/svc/%c0%af",
        "/svc/admin%3Bx/users",
        "/svc/%2561dmin/users",
        "/svc/admin./users",
        "//",
    ] {
        let (status, body) = raw_get(&app, path, &pk).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "INVALID_REQUEST", "{path}");
    }
    // A docs:read key does not pass the ocr:read route by spelling it %6Fcr.
    let (docs, _) = app
        .create_key(json!({"kind": "sk", "name": "docs", "scopes": ["docs:read"]}))
        .await;
    let r = send(&app, "/svc/%6Fcr/x", &docs).await;
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
    // The price is the route's the upstream serves, and the upstream gets the normal path.
    let (rich, _) = app
        .create_key(json!({"kind": "sk", "name": "rich", "scopes": ["*"], "budget": 1000}))
        .await;
    let r = send(&app, "/svc/%65xpensive/x%3fy", &rich).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-credits-remaining"], "900");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["PATH_INFO"], "/svc/expensive/x?y");
    // Encoded sub-delimiters are what a decoding upstream serves: `%24batch` is `$batch`.
    let r = send(&app, "/svc/%24batch", &rich).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-credits-remaining"], "850");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["PATH_INFO"], "/svc/$batch");
}

#[tokio::test]
async fn forward_auth_and_verify_judge_the_same_normal_path() {
    let app = TestApp::spawn_with(|c| svc_routes(c, None)).await;
    let pk = pk_key(&app).await;
    let origin = ("origin", "https://app.example.com");
    let r = app
        .auth(
            Some(&pk),
            &[origin, ("x-original-uri", "/svc/%61dmin/users")],
        )
        .await;
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    let r = app
        .auth(
            Some(&pk),
            &[origin, ("x-original-uri", "/svc/x/..;/admin/users")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    for (path, status, code) in [
        ("/svc/%61dmin/x", 200, "BLOCKED_FOR_KEY_TYPE"),
        ("/svc/Admin/x", 200, "BLOCKED_FOR_KEY_TYPE"),
        ("/svc/ocr/../admin/x", 400, "INVALID_REQUEST"),
        ("/svc/admin;a=b/x", 400, "INVALID_REQUEST"),
    ] {
        let r = app
            .post(
                "/v1/keys/verify",
                json!({"key": pk, "method": "GET", "path": path,
                       "origin": "https://app.example.com"}),
            )
            .await;
        assert_eq!(r.status().as_u16(), status, "{path}");
        let v: Value = r.json().await.expect("json");
        let got = v["code"].as_str().or(v["error"]["code"].as_str());
        assert_eq!(got, Some(code), "{path}: {v}");
    }
}

async fn tenant_with_pool(app: &TestApp, credits: u64) -> (String, String) {
    let r = app
        .post("/v1/tenants", json!({"name": "Pool", "credits": credits}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["admin_key"]["key"].as_str().expect("key").to_owned(),
    )
}

async fn pool(app: &TestApp, tenant: &str) -> Value {
    let v: Value = app
        .get(&format!("/v1/tenants/{tenant}"))
        .await
        .json()
        .await
        .expect("json");
    v["credits"].clone()
}

#[tokio::test]
async fn a_client_cannot_set_its_own_price_scope_or_address() {
    // Nobody is a trusted proxy: the test client is a client like any other.
    let app = TestApp::spawn_with(|c| c.proxy.trusted.clear()).await;
    let (tenant, admin) = tenant_with_pool(&app, 100_000).await;
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&admin)
        .json(
            &json!({"kind": "pk", "name": "web", "scopes": ["docs:read"],
                       "allowed_origins": ["https://app.example.com"]}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let pk = r.json::<Value>().await.expect("json")["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let origin = ("origin", "https://app.example.com");
    for h in [
        ("x-keygate-cost", "99999"),
        ("x-keygate-scope", "ocr:read"),
        ("x-original-uri", "/anything"),
        ("x-forwarded-uri", "/anything"),
        ("x-original-method", "GET"),
    ] {
        let r = app.auth(Some(&pk), &[origin, h]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{h:?}");
        assert_eq!(error_code(r).await, "INVALID_REQUEST", "{h:?}");
    }
    assert_eq!(pool(&app, &tenant).await, 100_000, "nothing was charged");
    // An IP-locked key: X-Forwarded-For and X-Real-IP from a client change nothing.
    let (locked, _) = app
        .create_key(json!({"kind": "sk", "name": "ip", "allowed_ips": ["10.1.2.3"]}))
        .await;
    for h in [("x-forwarded-for", "10.1.2.3"), ("x-real-ip", "10.1.2.3")] {
        let r = app.auth(Some(&locked), &[h]).await;
        assert_eq!(error_code(r).await, "IP_NOT_ALLOWED", "{h:?}");
    }
}

#[tokio::test]
async fn forwarding_headers_count_from_a_trusted_proxy_only() {
    // 127.0.0.1 is the proxy; a client connecting from 127.0.0.2 is not.
    let app = TestApp::spawn_with(|c| c.proxy.trusted = vec!["127.0.0.1/32".into()]).await;
    let (locked, _) = app
        .create_key(json!({"kind": "sk", "name": "ip", "allowed_ips": ["10.1.2.3"]}))
        .await;
    let stranger = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().ok())
        .build()
        .expect("client");
    let r = stranger
        .get(app.url("/v1/auth"))
        .bearer_auth(&locked)
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "IP_NOT_ALLOWED");
    let r = stranger
        .get(app.url("/v1/auth"))
        .bearer_auth(&locked)
        .header("x-keygate-cost", "0")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The proxy's word counts: the client is the right-most address that is not a proxy.
    let r = app
        .auth(Some(&locked), &[("x-forwarded-for", "6.6.6.6, 10.1.2.3")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .auth(Some(&locked), &[("x-forwarded-for", "10.1.2.3, 6.6.6.6")])
        .await;
    assert_eq!(error_code(r).await, "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn forward_auth_on_its_own_listener_is_not_on_the_public_one() {
    let app = TestApp::spawn_with(|c| c.forward_auth.listen = "127.0.0.1:0".into()).await;
    let r = app.auth(Some(&app.root), &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let addr = app
        .addr_of(keygate_server::server::Role::ForwardAuth)
        .expect("forward-auth listener");
    let r = app
        .client
        .get(format!("http://{addr}/v1/auth"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .get(format!("http://{addr}/v1/keys"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "only forward-auth there");
}

#[tokio::test]
async fn identity_headers_spelled_with_underscores_never_reach_a_wsgi_upstream() {
    let up = wsgi::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| c.routes.push(route("/api/*", Some(&url), None, 0))).await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "svc", "scopes": ["*"]}))
        .await;
    let r = app
        .client
        .post(app.url("/api/x"))
        .bearer_auth(&key)
        .header("X_Keygate_User", "usr_admin")
        .header("X-Keygate_Tenant", "other")
        .header("X_Keygate_Key_Id", "key_forged")
        .header("X_Forwarded_For", "10.0.0.1")
        .header("X_Real_IP", "10.0.0.1")
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X_HTTP_Method_Override", "DELETE")
        .header("X-Rewrite-URL", "/api/admin")
        .header("X-Original-URL", "/api/admin")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert!(v.get("HTTP_X_KEYGATE_USER").is_none(), "{v}");
    assert_eq!(v["HTTP_X_KEYGATE_TENANT"], "default", "{v}");
    assert_eq!(v["HTTP_X_KEYGATE_KEY_ID"], rec["id"], "{v}");
    assert_eq!(v["HTTP_X_FORWARDED_FOR"], "127.0.0.1", "{v}");
    assert!(v.get("HTTP_X_REAL_IP").is_none(), "{v}");
    for h in [
        "HTTP_X_HTTP_METHOD_OVERRIDE",
        "HTTP_X_REWRITE_URL",
        "HTTP_X_ORIGINAL_URL",
    ] {
        assert!(v.get(h).is_none(), "{h} reached the upstream: {v}");
    }
    assert_eq!(v["REQUEST_METHOD"], "POST");
    // A trusted proxy's chain is carried on whole, however many lines it came in.
    let r = app
        .client
        .get(app.url("/api/x"))
        .bearer_auth(&key)
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "198.51.100.2")
        .send()
        .await
        .expect("request");
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["HTTP_X_FORWARDED_FOR"],
        "198.51.100.1, 198.51.100.2, 127.0.0.1"
    );
}

#[tokio::test]
async fn a_method_override_is_judged_as_the_method() {
    let app = TestApp::spawn_with(|c| svc_routes(c, None)).await;
    let pk = pk_key(&app).await;
    let origin = ("origin", "https://app.example.com");
    let uri = ("x-original-uri", "/svc/docs/1");
    let post = ("x-original-method", "POST");
    let r = app.auth(Some(&pk), &[origin, uri, post]).await;
    assert_eq!(r.status(), StatusCode::OK);
    for h in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        let r = app
            .auth(Some(&pk), &[origin, uri, post, (h, "DELETE")])
            .await;
        assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE", "{h}");
    }
}

#[tokio::test]
async fn an_overridden_method_and_the_real_one_must_agree() {
    let app = TestApp::spawn_with(|c| {
        c.routes.push(RouteConfig {
            methods: vec!["GET".into()],
            public: true,
            ..route("/pub/*", None, None, 0)
        });
        c.routes.push(RouteConfig {
            methods: vec!["POST".into()],
            ..route("/v1/ocr/*", None, Some("ocr:read"), 5)
        });
        svc_routes(c, None);
    })
    .await;
    let pk = pk_key(&app).await;
    let origin = ("origin", "https://app.example.com");
    let refused = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        error_code(r).await
    };
    // A real DELETE stays a DELETE whatever the override says.
    let r = app
        .auth(
            Some(&pk),
            &[
                origin,
                ("x-original-uri", "/svc/docs/1"),
                ("x-original-method", "DELETE"),
                ("x-http-method-override", "GET"),
            ],
        )
        .await;
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    // A POST-only route cannot be left for "no route" by overriding to GET.
    let r = app
        .auth(
            Some(&pk),
            &[
                origin,
                ("x-original-uri", "/v1/ocr/scan"),
                ("x-original-method", "POST"),
                ("x-http-method-override", "GET"),
            ],
        )
        .await;
    assert_eq!(refused(r).await, "INVALID_REQUEST");
    // A GET-only public route does not open to a POST that asks to be a GET.
    let r = app
        .auth(
            None,
            &[
                ("x-original-uri", "/pub/x"),
                ("x-original-method", "POST"),
                ("x-http-method-override", "GET"),
            ],
        )
        .await;
    assert_eq!(refused(r).await, "INVALID_REQUEST");
    // Lists and disagreeing overrides are refused, not guessed.
    for hs in [
        vec![("x-http-method-override", "DELETE, GET")],
        vec![
            ("x-http-method-override", "POST"),
            ("x-http-method", "DELETE"),
        ],
    ] {
        let mut all = vec![
            origin,
            ("x-original-uri", "/svc/docs/1"),
            ("x-original-method", "POST"),
        ];
        all.extend(hs);
        assert_eq!(
            refused(app.auth(Some(&pk), &all).await).await,
            "INVALID_REQUEST"
        );
    }
    // Laravel's `_method` query parameter counts as an override.
    let r = app
        .auth(
            Some(&pk),
            &[
                origin,
                ("x-original-uri", "/svc/docs/1?_method=DELETE"),
                ("x-original-method", "POST"),
            ],
        )
        .await;
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
}

#[tokio::test]
async fn the_gateway_judges_a_method_override_in_the_query() {
    let up = wsgi::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| svc_routes(c, Some(&url))).await;
    let pk = pk_key(&app).await;
    let r = app
        .client
        .post(app.url("/svc/docs/1?_method=DELETE"))
        .bearer_auth(&pk)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
}

#[tokio::test]
async fn a_forwarded_for_chain_that_cannot_be_read_never_names_the_proxy() {
    // The test client (127.0.0.1) is the trusted proxy; the key is locked to its network.
    let app = TestApp::spawn().await;
    let (locked, _) = app
        .create_key(json!({"kind": "sk", "name": "ip", "allowed_ips": ["127.0.0.0/8"]}))
        .await;
    let send = |value: &'static [u8]| {
        app.client
            .get(app.url("/v1/auth"))
            .bearer_auth(&locked)
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(value).expect("value"),
            )
            .send()
    };
    // nginx appends its client to the client's own line: the byte before it must not hide it.
    let r = send(b"\xff, 203.0.113.5").await.expect("request");
    assert_eq!(error_code(r).await, "IP_NOT_ALLOWED");
    // Nothing readable: the client is unknown, not the proxy.
    let r = send(b"junk").await.expect("request");
    assert_eq!(error_code(r).await, "IP_NOT_ALLOWED");
    let r = send(b"127.0.0.9").await.expect("request");
    assert_eq!(r.status(), StatusCode::OK);
}

/// The `request.decided` events the audit log lists with `code`.
async fn decided_with_code(app: &TestApp, code: &str) -> Vec<Value> {
    let v: Value = app
        .get("/v1/audit?action=request.decided&limit=500")
        .await
        .json()
        .await
        .expect("json");
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|e| e["code"] == code)
        .cloned()
        .collect()
}

#[tokio::test]
async fn refusals_of_a_public_key_cannot_fill_the_audit_log() {
    let app = TestApp::spawn_with(|c| c.audit.refusals_per_key_per_minute = 5).await;
    let pk = pk_key(&app).await;
    for _ in 0..40 {
        let r = app
            .auth(Some(&pk), &[("origin", "https://evil.example")])
            .await;
        assert_eq!(error_code(r).await, "ORIGIN_NOT_ALLOWED");
    }
    let refused = || async { decided_with_code(&app, "ORIGIN_NOT_ALLOWED").await.len() };
    eventually(|| async { refused().await >= 5 }).await;
    let n = refused().await;
    assert!(n <= 10, "{n} refusals of one key logged");
    // Allowed requests of the key are all logged still.
    let r = app
        .auth(Some(&pk), &[("origin", "https://app.example.com")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn keyless_refusals_cannot_fill_the_audit_log() {
    let app = TestApp::spawn_with(|c| {
        c.audit.keyless_per_ip_per_minute = 10;
        c.limits.max_header_bytes = 256 * 1024;
    })
    .await;
    let origin = format!("https://{}.example.com", "a".repeat(20_000));
    let path = format!("/x/{}", "p".repeat(20_000));
    for _ in 0..50 {
        let r = app
            .auth(None, &[("origin", &origin), ("x-original-uri", &path)])
            .await;
        assert_eq!(error_code(r).await, "MISSING_KEY");
    }
    let keyless = || decided_with_code(&app, "MISSING_KEY");
    eventually(|| async { keyless().await.len() >= 10 }).await;
    let events = keyless().await;
    // At most two windows' worth, however the minute fell.
    assert!(events.len() <= 20, "{} keyless events logged", events.len());
    for e in &events {
        assert!(e["origin"].as_str().is_some_and(|o| o.len() <= 256), "{e}");
        assert!(e["path"].as_str().is_some_and(|p| p.len() <= 1024), "{e}");
    }
}

#[tokio::test]
async fn the_configured_header_limit_is_the_limit() {
    let app = TestApp::spawn().await;
    let big = "a".repeat(66_000);
    let r = app.auth(Some(&app.root), &[("x-pad", &big)]).await;
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let small = "a".repeat(60_000);
    let r = app.auth(Some(&app.root), &[("x-pad", &small)]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn two_credentials_or_two_origins_are_refused() {
    let app = TestApp::spawn().await;
    let (other, _) = app.create_key(json!({"kind": "sk", "name": "other"})).await;
    let root = format!("Bearer {}", app.root);
    let other = format!("Bearer {other}");
    let r = app
        .auth(None, &[("authorization", &root), ("authorization", &other)])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "INVALID_REQUEST");
    let r = app
        .auth(
            Some(&app.root),
            &[
                ("origin", "https://a.example"),
                ("origin", "https://b.example"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .client
        .get(app.url("/v1/keys"))
        .header("authorization", &root)
        .header("authorization", &root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "management calls too");
}

#[tokio::test]
async fn metrics_need_an_operator_key_or_their_own_listener() {
    let app = TestApp::spawn_with(|c| c.metrics.listen = "127.0.0.1:0".into()).await;
    let r = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.expect("body").contains("keygate_"));
    let (_, admin) = tenant_with_pool(&app, 10).await;
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a tenant's admin is not the operator"
    );
    let addr = app
        .addr_of(keygate_server::server::Role::Metrics)
        .expect("metrics listener");
    let r = app
        .client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .get(format!("http://{addr}/v1/keys"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

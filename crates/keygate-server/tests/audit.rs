//! The audit log over real HTTP: every decision and change is an event, tenants see only
//! their own, the chains verify, usage adds up, and nothing survives that should not.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{error_code, eventually, TestApp};

/// All events the caller can see for `query`, every page.
async fn events(app: &TestApp, key: &str, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let sep = if query.is_empty() { "" } else { "&" };
        let r = app
            .as_key(key)
            .get(app.url(&format!("/v1/audit?limit=2{sep}{query}{cursor}")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.expect("json");
        out.extend(v["data"].as_array().expect("data").iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// The `request.decided` events of key `id`, every page.
async fn decided(app: &TestApp, id: &str) -> Vec<Value> {
    events(
        app,
        &app.root,
        &format!("key_id={id}&action=request.decided"),
    )
    .await
}

fn find<'a>(evs: &'a [Value], action: &str, code: Option<&str>) -> Option<&'a Value> {
    evs.iter()
        .find(|e| e["action"] == action && code.is_none_or(|c| e["code"] == c))
}

#[tokio::test]
async fn every_decision_and_change_is_an_event_and_the_chain_verifies() {
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "ocr", "scopes": ["ocr:read"], "budget": 100}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    let ok = app
        .auth(
            Some(&key),
            &[
                ("x-keygate-scope", "ocr:read"),
                ("x-forwarded-uri", "/v1/ocr/scan?lang=de"),
                ("x-forwarded-method", "POST"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let rid = ok.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let denied = app
        .auth(Some(&key), &[("x-keygate-scope", "llm:generate")])
        .await;
    assert_eq!(error_code(denied).await, "FORBIDDEN_SCOPE");
    let r = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(error_code(app.auth(Some(&key), &[]).await).await, "REVOKED");

    let mut evs = Vec::new();
    eventually(|| {
        let app = &app;
        let id = id.clone();
        async move { events(app, &app.root, &format!("key_id={id}")).await.len() >= 5 }
    })
    .await;
    evs.extend(events(&app, &app.root, &format!("key_id={id}")).await);
    assert_eq!(
        evs.len(),
        5,
        "created, valid, forbidden, revoked, refused: {evs:#?}"
    );
    let created = find(&evs, "key.created", None).expect("key.created");
    assert_eq!(created["detail"]["scopes"], json!(["ocr:read"]));
    assert!(created["actor"]
        .as_str()
        .expect("actor")
        .starts_with("key_"));
    let valid = find(&evs, "request.decided", Some("VALID")).expect("valid");
    assert_eq!(valid["request_id"], rid.as_str());
    assert_eq!(valid["path"], "/v1/ocr/scan");
    assert_eq!(valid["method"], "POST");
    assert_eq!(valid["ip"], "203.0.113.9");
    assert_eq!(valid["scope"], "ocr:read");
    assert_eq!(valid["credits"], 1);
    assert_eq!(valid["status"], 200);
    assert_eq!(valid["tenant_id"], "default");
    assert_eq!(valid["kind"], "sk");
    let forbidden = find(&evs, "request.decided", Some("FORBIDDEN_SCOPE")).expect("forbidden");
    assert_eq!(
        (forbidden["status"].clone(), forbidden["credits"].clone()),
        (json!(403), json!(0))
    );
    assert!(find(&evs, "key.revoked", None).is_some());
    assert_eq!(
        find(&evs, "request.decided", Some("REVOKED")).expect("revoked")["status"],
        401
    );
    // Newest first, chained: each event names its predecessor's hash on the same node.
    let all = events(&app, &app.root, "").await;
    for pair in all.windows(2) {
        if pair[0]["node"] == pair[1]["node"]
            && pair[0]["seq"].as_i64() == pair[1]["seq"].as_i64().map(|s| s + 1)
        {
            assert_eq!(pair[0]["prev_hash"], pair[1]["hash"]);
        }
    }
    let body = serde_json::to_string(&all).expect("json");
    assert!(
        !body.contains(&key),
        "the plaintext key is never in the audit log"
    );
    assert!(!body.contains(&key[6..]));

    // Filters: by code, by action, by time.
    let codes = events(&app, &app.root, "code=REVOKED").await;
    assert!(codes.iter().all(|e| e["code"] == "REVOKED") && !codes.is_empty());
    let actions = events(&app, &app.root, "action=key.revoked").await;
    assert_eq!(actions.len(), 1);
    let future = events(&app, &app.root, "since=2999-01-01T00:00:00Z").await;
    assert!(future.is_empty());

    let v: Value = app
        .get("/v1/audit/verify")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checked"].as_u64().expect("checked") >= 5);

    // Usage of the key: two VALID credits? No: one VALID (1 credit), one FORBIDDEN, one REVOKED.
    let u: Value = app
        .get(&format!("/v1/keys/{id}/usage?granularity=minute"))
        .await
        .json()
        .await
        .expect("json");
    let total = |code: &str, field: &str| -> u64 {
        u["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter(|b| b["code"] == code)
            .map(|b| b[field].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(total("VALID", "requests"), 1);
    assert_eq!(total("VALID", "credits"), 1);
    assert_eq!(total("FORBIDDEN_SCOPE", "requests"), 1);
    assert_eq!(total("REVOKED", "requests"), 1);
    let t: Value = app
        .get("/v1/tenants/default/usage?granularity=day")
        .await
        .json()
        .await
        .expect("json");
    assert!(t["data"].as_array().expect("data").len() >= 3);
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_events_and_cannot_verify() {
    let app = TestApp::spawn().await;
    let t: Value = app
        .post("/v1/tenants", json!({"name": "Acme"}))
        .await
        .json()
        .await
        .expect("json");
    let tid = t["id"].as_str().expect("id").to_string();
    let admin = t["admin_key"]["key"].as_str().expect("key").to_string();
    let (root_key, _) = app.create_key(json!({"kind": "sk", "name": "ops"})).await;
    app.auth(Some(&root_key), &[]).await;
    app.auth(Some(&admin), &[]).await;
    eventually(|| {
        let (app, admin) = (&app, admin.clone());
        async move { events(app, &admin, "action=request.decided").await.len() >= 2 }
    })
    .await;
    let mine = events(&app, &admin, "").await;
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|e| e["tenant_id"] == tid.as_str()),
        "{mine:#?}"
    );
    assert!(find(&mine, "tenant.created", None).is_some());
    // Another tenant's events look like a tenant that does not exist.
    let r = app
        .as_key(&admin)
        .get(app.url("/v1/audit?tenant_id=default"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app
        .as_key(&admin)
        .get(app.url("/v1/audit/verify"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The operator sees both tenants.
    let all = events(&app, &app.root, "action=request.decided").await;
    assert!(all.iter().any(|e| e["tenant_id"] == "default"));
    assert!(all.iter().any(|e| e["tenant_id"] == tid.as_str()));
}

#[tokio::test]
async fn bad_audit_queries_get_400_in_the_error_shape() {
    let app = TestApp::spawn().await;
    for q in [
        "/v1/audit?since=yesterday",
        "/v1/audit?limit=0",
        "/v1/audit?colour=red",
        "/v1/tenants/default/usage?granularity=week",
        "/v1/tenants/default/usage?since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z",
    ] {
        let r = app.get(q).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(error_code(r).await, "INVALID_REQUEST", "{q}");
    }
    let r = app.get("/v1/keys/key_nope/usage").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_chain_continues_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = TestApp::spawn_in(dir.path(), |_| {}).await;
    let root = app.root.clone();
    let (key, _) = app.create_key(json!({"kind": "sk", "name": "k"})).await;
    for _ in 0..5 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    app.stop().await; // graceful: ships everything
    let app = TestApp::spawn_in(dir.path(), |_| {})
        .await
        .with_root(root.clone());
    for _ in 0..5 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    let query = "action=request.decided&code=VALID";
    eventually(|| {
        let app = &app;
        async move {
            events(app, &app.root, query)
                .await
                .iter()
                .filter(|e| e["path"].is_null())
                .count()
                >= 10
        }
    })
    .await;
    let valid = events(&app, &app.root, query).await;
    // Forward-auth calls (no path given) of the key: five before the restart, five after.
    let of_key = valid.iter().filter(|e| e["path"].is_null()).count();
    assert_eq!(of_key, 10, "{valid:#?}");
    let nodes: std::collections::BTreeSet<&str> =
        valid.iter().filter_map(|e| e["node"].as_str()).collect();
    assert_eq!(nodes.len(), 1, "one node id across restarts: {nodes:?}");
    let v: Value = app
        .get("/v1/audit/verify")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test]
async fn verify_api_paths_lose_their_query_and_odd_bytes_do_not_stop_shipping_on_postgresql() {
    let app = TestApp::spawn_postgres(|_| {}).await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "k", "scopes": ["ocr:read"]}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    // A path with a NUL has no normal form (400, nothing logged); a NUL in the scope is
    // judged and logged.
    let r = app
        .post(
            "/v1/keys/verify",
            json!({"key": key, "method": "POST", "path": "/v1/ocr/\u{0}nul"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    for (path, scope) in [
        ("/v1/ocr/scan?api_key=s3cr3t-in-query", "ocr:read"),
        ("/v1/ocr/nul", "ocr:\u{0}nul"),
    ] {
        let r = app
            .post(
                "/v1/keys/verify",
                json!({"key": key, "method": "POST", "path": path, "scope": scope}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    // A later event still arrives: the NUL did not wedge the shipper (PostgreSQL refuses NUL
    // in TEXT; it is stored as U+FFFD).
    let (_, later) = app.create_key(json!({"kind": "sk", "name": "later"})).await;
    let later = later["id"].as_str().expect("id").to_string();
    eventually(|| {
        let (app, later) = (&app, later.clone());
        async move {
            !events(app, &app.root, &format!("key_id={later}"))
                .await
                .is_empty()
        }
    })
    .await;
    let evs = decided(&app, &id).await;
    let paths: Vec<&str> = evs.iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.contains(&"/v1/ocr/scan"), "{paths:?}");
    let scopes: Vec<&str> = evs.iter().filter_map(|e| e["scope"].as_str()).collect();
    assert!(scopes.contains(&"ocr:\u{fffd}nul"), "{scopes:?}");
    let all = serde_json::to_string(&events(&app, &app.root, "").await).expect("json");
    assert!(!all.contains("s3cr3t-in-query"));
    let v: Value = app
        .get("/v1/audit/verify")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["ok"], true, "{v}");
}

/// Forward-auth answers are held by their connection until their line is written: pipelined
/// requests on one connection still get their answers whole and in order, a `Connection:
/// close` request gets its answer before the end, and every answered request is an event.
#[tokio::test]
async fn pipelined_forward_auth_answers_arrive_in_order_and_each_is_an_event() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "pipe", "scopes": ["ocr:read"]}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    let request = |scope: &str, close: bool| {
        format!(
            "GET /v1/auth HTTP/1.1\r\nhost: kg\r\nauthorization: Bearer {key}\r\n\
             x-keygate-scope: {scope}\r\n{}\r\n",
            if close { "connection: close\r\n" } else { "" }
        )
    };
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    // Three requests in one write: allowed, refused (scope), allowed and closing.
    let burst = [
        request("ocr:read", false),
        request("llm:generate", false),
        request("ocr:read", true),
    ]
    .concat();
    conn.write_all(burst.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut got),
    )
    .await
    .expect("the server ends the connection after the closing request")
    .expect("read");
    let got = String::from_utf8(got).expect("utf-8");
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &got[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{got}");
    let codes: Vec<&str> = got
        .lines()
        .filter_map(|l| l.strip_prefix("x-keygate-code: "))
        .collect();
    assert_eq!(codes, ["VALID", "FORBIDDEN_SCOPE", "VALID"], "{got}");
    eventually(|| {
        let app = &app;
        let id = id.clone();
        async move { decided(app, &id).await.len() >= 3 }
    })
    .await;
    let evs = decided(&app, &id).await;
    let mut codes: Vec<&str> = evs.iter().filter_map(|e| e["code"].as_str()).collect();
    codes.sort_unstable();
    assert_eq!(codes, ["FORBIDDEN_SCOPE", "VALID", "VALID"], "{evs:#?}");
}

#[tokio::test]
async fn a_user_token_reads_only_its_own_users_events() {
    let app = TestApp::spawn().await;
    let user = |email: &str| {
        let app = &app;
        let email = email.to_owned();
        async move {
            let r = app.post("/v1/users", json!({"email": email})).await;
            assert_eq!(r.status(), StatusCode::CREATED);
            let v: Value = r.json().await.expect("json");
            v["id"].as_str().expect("id").to_owned()
        }
    };
    let (ada, bob) = (user("ada@example.com").await, user("bob@example.com").await);
    let (ada_token, rec) = app
        .create_key(
            json!({"kind": "ut", "name": "ada's audit", "user_id": ada, "scopes": ["audit:read"]}),
        )
        .await;
    let ada_token_id = rec["id"].as_str().expect("id").to_owned();
    let (ada_other, rec) = app
        .create_key(
            json!({"kind": "ut", "name": "ada's app", "user_id": ada, "scopes": ["docs:read"]}),
        )
        .await;
    let ada_other_id = rec["id"].as_str().expect("id").to_owned();
    let (bob_key, rec) = app
        .create_key(
            json!({"kind": "ut", "name": "bob's app", "user_id": bob, "scopes": ["docs:read"]}),
        )
        .await;
    let bob_key_id = rec["id"].as_str().expect("id").to_owned();
    let (server, rec) = app
        .create_key(json!({"kind": "sk", "name": "server"}))
        .await;
    let server_id = rec["id"].as_str().expect("id").to_owned();
    for k in [&ada_other, &bob_key, &server] {
        assert_eq!(app.auth(Some(k), &[]).await.status(), StatusCode::OK);
    }
    // The admin (an sk key) reads the whole tenant, once it is all shipped.
    eventually(|| async {
        let all = events(&app, &app.root, "action=request.decided").await;
        [&ada_other_id, &bob_key_id, &server_id]
            .iter()
            .all(|id| all.iter().any(|e| e["key_id"] == id.as_str()))
    })
    .await;
    let all = events(&app, &app.root, "").await;
    assert!(all
        .iter()
        .any(|e| e["action"] == "user.created" && e["user_id"] == bob.as_str()));

    let mine = events(&app, &ada_token, "").await;
    let ada_keys = [ada_token_id.as_str(), ada_other_id.as_str()];
    let hers = |id: &Value| id == ada.as_str() || ada_keys.iter().any(|k| id == *k);
    for e in &mine {
        assert!(
            hers(&e["actor"]) || hers(&e["key_id"]) || e["user_id"] == ada.as_str(),
            "not ada's: {e}"
        );
    }
    // Her keys' creation (by the admin) and use are there; nobody else's events are.
    assert!(mine
        .iter()
        .any(|e| e["action"] == "key.created" && e["key_id"] == ada_other_id.as_str()));
    assert!(mine
        .iter()
        .any(|e| e["action"] == "request.decided" && e["key_id"] == ada_other_id.as_str()));
    assert!(mine
        .iter()
        .any(|e| e["user_id"] == ada.as_str() && e["action"] == "user.created"));
    for other in [&bob_key_id, &server_id, &bob] {
        assert!(
            !mine
                .iter()
                .any(|e| e["key_id"] == other.as_str() || e["user_id"] == other.as_str()),
            "{other} is not ada's"
        );
    }
    // Naming someone else's key or user in the filters does not widen it.
    assert!(events(&app, &ada_token, &format!("key_id={bob_key_id}"))
        .await
        .is_empty());
    assert!(events(&app, &ada_token, &format!("user_id={bob}"))
        .await
        .is_empty());
    assert!(events(&app, &ada_token, &format!("key_id={server_id}"))
        .await
        .is_empty());
    assert!(mine.len() < all.len());
    // What covers the whole tenant (its usage and alerts) is not hers to read.
    for path in ["/v1/tenants/default/usage", "/v1/alerts"] {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&ada_token)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            app.get(path).await.status(),
            StatusCode::OK,
            "{path} for the admin"
        );
    }
}

/// The value of one counter line (`name{labels} value`) in `/metrics`, 0 when absent.
async fn counter(app: &TestApp, line: &str) -> u64 {
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn public_route_calls_are_decisions_audited_and_counted() {
    let up = support::upstream::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| {
        c.gateway.public_rate_limit = keygate_core::RateLimit {
            limit: 3,
            window_seconds: 60,
        };
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/api/health".into(),
            methods: vec!["GET".into()],
            upstream: None,
            scope: None,
            cost: 0,
            public: true,
            class: Default::default(),
        });
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/pub/*".into(),
            methods: vec![],
            upstream: Some(url),
            scope: None,
            cost: 0,
            public: true,
            class: Default::default(),
        });
    })
    .await;
    let valid = "keygate_decisions_total{code=\"VALID\"}";
    let limited = "keygate_decisions_total{code=\"RATE_LIMITED\"}";
    let (valid_before, limited_before) = (counter(&app, valid).await, counter(&app, limited).await);
    let health = [
        ("x-original-method", "GET"),
        ("x-original-uri", "/api/health"),
    ];
    for _ in 0..2 {
        assert_eq!(app.auth(None, &health).await.status(), StatusCode::OK);
    }
    // The third call of the minute from this address goes through the gateway; the fourth is
    // one too many.
    let r = app
        .client
        .get(app.url("/pub/page"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.auth(None, &health).await;
    assert_eq!(error_code(r).await, "RATE_LIMITED");
    // Three allowed calls, plus the root key's own two /metrics calls after the first read;
    // one refusal.
    assert_eq!(counter(&app, valid).await, valid_before + 3 + 2);
    assert_eq!(counter(&app, limited).await, limited_before + 1);
    eventually(|| async {
        let evs = events(&app, &app.root, "action=request.decided").await;
        let public: Vec<&Value> = evs
            .iter()
            .filter(|e| e["path"] == "/api/health" || e["path"] == "/pub/page")
            .collect();
        let codes = |c: &str| public.iter().filter(|e| e["code"] == c).count();
        public.len() == 4
            && codes("VALID") == 3
            && codes("RATE_LIMITED") == 1
            && public
                .iter()
                .all(|e| e["actor"] == "anonymous" && e["key_id"].is_null())
    })
    .await;
}

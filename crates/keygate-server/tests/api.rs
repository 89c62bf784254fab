//! API tests over real HTTP: the app on port 0 with a fresh SQLite file each.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{error_code, TestApp};

#[tokio::test]
async fn status_is_public() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(app.url("/v1/status"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    assert!(body["version"].is_string());
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys() {
    let app = TestApp::spawn().await;
    let r = app.auth(None, &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["x-keygate-code"], "MISSING_KEY");
    assert_eq!(error_code(r).await, "MISSING_KEY");

    for bad in ["nope", "kg_sk_short", "Basic abc"] {
        let r = app
            .client
            .get(app.url("/v1/auth"))
            .header(
                "authorization",
                if bad.starts_with("Basic") {
                    bad.to_string()
                } else {
                    format!("Bearer {bad}")
                },
            )
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(error_code(r).await, "MALFORMED_KEY", "{bad}");
    }
    // One changed character: checksum fails offline.
    let mut k: Vec<char> = app.root.chars().collect();
    let i = 12;
    k[i] = if k[i] == 'a' { 'b' } else { 'a' };
    let k: String = k.into_iter().collect();
    let r = app.auth(Some(&k), &[]).await;
    assert_eq!(error_code(r).await, "MALFORMED_KEY");
    // A well-formed key nobody issued.
    let fake = keygate_core::KeyFormat::default().generate(keygate_core::Kind::Sk, |b| b.fill(7));
    let r = app.auth(Some(&fake), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "UNKNOWN_KEY");
    assert!(body["error"]["request_id"]
        .as_str()
        .is_some_and(|s| s.starts_with("req_")));
}

#[tokio::test]
async fn create_read_list_and_identity_headers() {
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "backend", "scopes": ["ocr:read", "docs:read"], "metadata": {"team": "ocr"}}))
        .await;
    assert!(key.starts_with("kg_sk_"));
    assert_eq!(rec["start"], &key[..10]);
    assert_eq!(rec["status"], "active");
    assert_eq!(rec["metadata"]["team"], "ocr");
    let id = rec["id"].as_str().expect("id");

    let got: Value = app
        .get(&format!("/v1/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(got["id"], id);
    assert!(
        got.get("key").is_none(),
        "the plaintext is never shown again"
    );
    assert!(!got.to_string().contains(&key));

    let r = app
        .auth(Some(&key), &[("x-keygate-scope", "ocr:read")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-keygate-key-id"], id);
    assert_eq!(r.headers()["x-keygate-tenant"], "default");
    assert_eq!(r.headers()["x-keygate-scopes"], "docs:read ocr:read");

    let r = app
        .auth(Some(&key), &[("x-keygate-scope", "ocr:write")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");

    // last_used_at is written behind the hot path, within about a second.
    support::eventually(|| async {
        let got: Value = app
            .get(&format!("/v1/keys/{id}"))
            .await
            .json()
            .await
            .expect("json");
        got["last_used_at"].is_string()
    })
    .await;
}

#[tokio::test]
async fn list_paginates_with_a_cursor_and_filters() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        app.create_key(json!({"kind": "sk", "name": format!("k{i}"), "scopes": ["a:b"]}))
            .await;
    }
    app.create_key(json!({"kind": "pk", "name": "browser", "preset": "default"}))
        .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?limit=2&kind=sk&cursor={c}"),
            None => "/v1/keys?limit=2&kind=sk".to_string(),
        };
        let page: Value = app.get(&path).await.json().await.expect("json");
        for k in page["data"].as_array().expect("data") {
            assert_eq!(k["kind"], "sk");
            seen.push(k["id"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    // 5 created + the root key, newest first, no repeats.
    assert_eq!(seen.len(), 6);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted);
    let r = app.get("/v1/keys?limit=501").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let named: Value = app
        .get("/v1/keys?name=BROW")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(named["data"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let before = app.key_count().await;
    let post = |body: &'static str, ct: Option<&'static str>| {
        let mut req = app
            .client
            .post(app.url("/v1/keys"))
            .bearer_auth(&app.root)
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    let cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("{not json", Some("application/json"), 400),
        ("{\"kind\": 5, \"name\": \"x\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"scope\": [\"a\"]}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\"}", None, 415),
        ("{\"kind\": \"xx\", \"name\": \"x\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"allowed_ips\": [\"10.0.0.0/33\"]}", Some("application/json"), 422),
        ("{\"kind\": \"pk\", \"name\": \"x\", \"scopes\": [\"a\"], \"allowed_origins\": [\"claude.ai\"]}", Some("application/json"), 422),
        ("{\"kind\": \"pk\", \"name\": \"x\", \"preset\": \"gold\"}", Some("application/json"), 422),
        ("{\"kind\": \"pk\", \"name\": \"x\", \"preset\": \"widget\"}", Some("application/json"), 422),
        ("{\"kind\": \"pk\", \"name\": \"x\"}", Some("application/json"), 422),
        ("{\"kind\": \"pk\", \"name\": \"x\", \"scopes\": [\"*\"]}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"user_id\": \"usr_1\"}", Some("application/json"), 422),
        ("{\"kind\": \"ut\", \"name\": \"x\", \"scopes\": [\"a\"]}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"rate_limit\": {\"limit\": 0, \"window_seconds\": 60}}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"expires_at\": \"2001-01-01T00:00:00Z\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"expires_at\": \"tomorrow\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"ttl_seconds\": 5, \"expires_at\": \"2099-01-01T00:00:00Z\"}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"metadata\": [1]}", Some("application/json"), 422),
        ("{\"kind\": \"sk\", \"name\": \"x\", \"tenant_id\": \"tnt_nope\"}", Some("application/json"), 404),
    ];
    for (body, ct, status) in cases {
        let r = post(body, ct).await.expect("request");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("json error body");
        assert!(v["error"]["code"].is_string(), "{body}");
        assert!(v["error"]["message"].is_string(), "{body}");
        assert!(v["error"]["request_id"].is_string(), "{body}");
    }
    // Oversized body.
    let big = format!(
        "{{\"kind\":\"sk\",\"name\":\"x\",\"metadata\":{{\"a\":\"{}\"}}}}",
        "x".repeat(200_000)
    );
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&app.root)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(r).await, "PAYLOAD_TOO_LARGE");
    assert_eq!(app.key_count().await, before, "nothing was written");
    // Unknown route and wrong method answer in the same shape.
    assert_eq!(error_code(app.get("/v1/nothing").await).await, "NOT_FOUND");
    let r = app
        .client
        .put(app.url("/v1/keys"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn budget_of_five_grants_exactly_five_of_fifty_concurrent_calls() {
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "metered", "scopes": ["ocr:read"], "budget": 5}))
        .await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = app.client.clone();
        let url = app.url("/v1/auth");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(key)
                .header("x-keygate-cost", "1")
                .send()
                .await
                .expect("request")
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status().as_u16() {
            200 => ok += 1,
            402 => {
                assert_eq!(error_code(r).await, "BUDGET_EXHAUSTED");
                exhausted += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((ok, exhausted), (5, 45));
    let id = rec["id"].as_str().expect("id");
    let v: Value = app
        .get(&format!("/v1/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["budget"], json!({"limit": 5, "spent": 5, "remaining": 0}));
    // Raising the budget lets it spend again, exactly the difference.
    let r = app
        .patch(&format!("/v1/keys/{id}"), json!({"budget": 7}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut granted = 0;
    for _ in 0..5 {
        if app.auth(Some(&key), &[]).await.status() == StatusCode::OK {
            granted += 1;
        }
    }
    assert_eq!(granted, 2);
}

#[tokio::test]
async fn rate_limit_three_per_minute_refuses_the_fourth_with_retry_after() {
    let app = TestApp::spawn().await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "limited", "rate_limit": {"limit": 3, "window_seconds": 60}}))
        .await;
    for i in 0..3 {
        let r = app.auth(Some(&key), &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "call {i}");
        assert_eq!(r.headers()["ratelimit-policy"], "\"key\";q=3;w=60");
        let rl = r.headers()["ratelimit"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert!(rl.starts_with(&format!("\"key\";r={};t=", 2 - i)), "{rl}");
    }
    let r = app.auth(Some(&key), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(error_code(r).await, "RATE_LIMITED");
}

#[tokio::test]
async fn rotation_keeps_the_old_key_during_grace_and_not_after() {
    let app = TestApp::spawn().await;
    let (old, rec) = app
        .create_key(json!({"kind": "sk", "name": "rotating", "budget": 100}))
        .await;
    let id = rec["id"].as_str().expect("id");
    let r = app
        .post(
            &format!("/v1/keys/{id}/rotate"),
            json!({"grace_seconds": 3600}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    let new = v["key"].as_str().expect("key").to_string();
    assert_ne!(new, old);
    assert_eq!(v["rotated_from"], id);
    assert_eq!(app.auth(Some(&old), &[]).await.status(), StatusCode::OK);
    assert_eq!(app.auth(Some(&new), &[]).await.status(), StatusCode::OK);
    let old_view: Value = app
        .get(&format!("/v1/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(old_view["status"], "grace");
    // The family shares one budget: two calls were drawn from it.
    assert_eq!(v["budget"]["limit"], 100);
    // A rotated key cannot be rotated again.
    let r = app.post(&format!("/v1/keys/{id}/rotate"), json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // Grace 0: the old key stops at once.
    let (old2, rec2) = app
        .create_key(json!({"kind": "sk", "name": "rotating-now"}))
        .await;
    let id2 = rec2["id"].as_str().expect("id");
    let r = app
        .post(
            &format!("/v1/keys/{id2}/rotate"),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let new2 = r.json::<Value>().await.expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    let r = app.auth(Some(&old2), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(r).await, "EXPIRED");
    assert_eq!(app.auth(Some(&new2), &[]).await.status(), StatusCode::OK);
    // Rotate with an empty body uses the configured default grace.
    let (_, rec3) = app
        .create_key(json!({"kind": "sk", "name": "default-grace"}))
        .await;
    let r = app
        .client
        .post(app.url(&format!(
            "/v1/keys/{}/rotate",
            rec3["id"].as_str().expect("id")
        )))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn revoke_takes_effect_on_the_next_request() {
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "doomed"}))
        .await;
    let id = rec["id"].as_str().expect("id");
    assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    let r = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["status"], "revoked");
    let r = app.auth(Some(&key), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(r).await, "REVOKED");
    // DELETE revokes too, and a revoked key cannot be changed.
    let (key2, rec2) = app
        .create_key(json!({"kind": "sk", "name": "doomed2"}))
        .await;
    let id2 = rec2["id"].as_str().expect("id");
    assert_eq!(app.auth(Some(&key2), &[]).await.status(), StatusCode::OK);
    let r = app
        .client
        .delete(app.url(&format!("/v1/keys/{id2}")))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        error_code(app.auth(Some(&key2), &[]).await).await,
        "REVOKED"
    );
    let r = app
        .patch(&format!("/v1/keys/{id2}"), json!({"name": "back"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn publishable_keys_are_origin_locked_and_blocked_from_admin_and_delete() {
    let app = TestApp::spawn().await;
    let (pk, rec) = app
        .create_key(json!({"kind": "pk", "name": "canvas", "preset": "aidemo"}))
        .await;
    assert_eq!(rec["allowed_origins"].as_array().map(Vec::len), Some(4));
    assert_eq!(rec["budget"]["limit"], 2000);
    assert_eq!(
        rec["rate_limit"],
        json!({"limit": 60, "window_seconds": 60})
    );
    let ok = app
        .auth(
            Some(&pk),
            &[
                ("origin", "https://claude.ai"),
                ("x-keygate-scope", "ocr:read"),
            ],
        )
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let r = app
        .auth(Some(&pk), &[("x-keygate-scope", "ocr:read")])
        .await;
    assert_eq!(error_code(r).await, "ORIGIN_NOT_ALLOWED");
    let r = app
        .auth(
            Some(&pk),
            &[
                ("origin", "https://evil.example"),
                ("x-keygate-scope", "ocr:read"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "ORIGIN_NOT_ALLOWED");
    // DELETE through forward-auth, with the scope the route needs: still blocked.
    let r = app
        .auth(
            Some(&pk),
            &[
                ("origin", "https://claude.ai"),
                ("x-original-method", "DELETE"),
                ("x-original-uri", "/docs/1"),
                ("x-keygate-scope", "docs:read"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    // The management API itself.
    let r = app
        .client
        .get(app.url("/v1/keys"))
        .bearer_auth(&pk)
        .header("origin", "https://claude.ai")
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    let id = rec["id"].as_str().expect("id");
    let r = app
        .client
        .delete(app.url(&format!("/v1/keys/{id}")))
        .bearer_auth(&pk)
        .header("origin", "https://claude.ai")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    // Widget preset with its own origins, wildcard included.
    let (w, _) = app
        .create_key(json!({"kind": "pk", "name": "widget", "preset": "widget", "allowed_origins": ["https://*.shop.example"]}))
        .await;
    let r = app
        .auth(
            Some(&w),
            &[
                ("origin", "https://eu.shop.example"),
                ("x-keygate-scope", "chat:run"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .auth(
            Some(&w),
            &[
                ("origin", "https://shop.example"),
                ("x-keygate-scope", "chat:run"),
            ],
        )
        .await;
    assert_eq!(error_code(r).await, "ORIGIN_NOT_ALLOWED");
}

#[tokio::test]
async fn ip_allowlist_uses_the_proxys_forwarded_address() {
    let app = TestApp::spawn().await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "office", "allowed_ips": ["203.0.113.0/24", "2001:db8::/32"]}))
        .await;
    let r = app
        .auth(Some(&key), &[("x-forwarded-for", "203.0.113.9")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .auth(Some(&key), &[("x-forwarded-for", "2001:db8::7")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // The client cannot smuggle an allowed address in front of what the proxy saw.
    let r = app
        .auth(
            Some(&key),
            &[("x-forwarded-for", "203.0.113.9, 198.51.100.1")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "IP_NOT_ALLOWED");
    // No forwarded header: the TCP peer (127.0.0.1) is judged.
    assert_eq!(
        error_code(app.auth(Some(&key), &[]).await).await,
        "IP_NOT_ALLOWED"
    );
}

#[tokio::test]
async fn expiry_and_tenant_mismatch() {
    let app = TestApp::spawn().await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "short", "ttl_seconds": 1}))
        .await;
    support::eventually(|| async {
        app.auth(Some(&key), &[]).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(error_code(app.auth(Some(&key), &[]).await).await, "EXPIRED");
    let (key, _) = app.create_key(json!({"kind": "sk", "name": "t"})).await;
    let r = app.auth(Some(&key), &[("x-tenant-id", "tnt_other")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "TENANT_MISMATCH");
    assert_eq!(
        app.auth(Some(&key), &[("x-tenant-id", "default")])
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn tenants_are_isolated_and_pools_are_never_overspent() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/tenants",
            json!({"name": "Acme", "plan": "free", "credits": 3}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let acme: Value = r.json().await.expect("json");
    let acme_id = acme["id"].as_str().expect("id").to_string();
    assert_eq!(acme["credits"], 3);
    let acme_admin = acme["admin_key"]["key"]
        .as_str()
        .expect("admin key")
        .to_string();
    let (other, other_rec) = app
        .create_key(json!({"kind": "sk", "name": "operator-side"}))
        .await;
    let other_id = other_rec["id"].as_str().expect("id");

    // The tenant admin works inside its tenant only.
    let r = app
        .as_key(&acme_admin)
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "svc", "scopes": ["ocr:read"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let svc: Value = r.json().await.expect("json");
    assert_eq!(svc["tenant_id"], acme_id.as_str());
    let svc_key = svc["key"].as_str().expect("key").to_string();
    let r = app
        .as_key(&acme_admin)
        .get(app.url(&format!("/v1/keys/{other_id}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app
        .as_key(&acme_admin)
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "x", "tenant_id": "default"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let listed: Value = app
        .as_key(&acme_admin)
        .get(app.url("/v1/keys"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .all(|k| k["tenant_id"] == acme_id.as_str()));
    let r = app
        .as_key(&acme_admin)
        .post(app.url("/v1/tenants"))
        .json(&json!({"name": "Evil"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Verify from Acme's admin: another tenant's key looks unknown; its own is judged.
    let v: Value = app
        .as_key(&acme_admin)
        .post(app.url("/v1/keys/verify"))
        .json(&json!({"key": other}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(v["valid"], false);
    assert_eq!(v["code"], "UNKNOWN_KEY");
    assert!(v["key_id"].is_null());
    // A tenant cannot mint its own credits.
    let r = app
        .as_key(&acme_admin)
        .post(app.url(&format!("/v1/tenants/{acme_id}/credits")))
        .json(&json!({"amount": 100}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // The pool of 3 pays for exactly 3 calls of cost 1.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = app
            .auth(Some(&svc_key), &[("x-keygate-scope", "ocr:read")])
            .await;
        statuses.push(r.status().as_u16());
        if r.status() == StatusCode::PAYMENT_REQUIRED {
            assert_eq!(error_code(r).await, "INSUFFICIENT_CREDITS");
        } else {
            assert!(r.headers().contains_key("x-credits-remaining"));
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 402, 402]);
    // The operator tops up; calls pass again.
    let r = app
        .post(
            &format!("/v1/tenants/{acme_id}/credits"),
            json!({"amount": 2}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["credits"], 2);
    assert_eq!(app.auth(Some(&svc_key), &[]).await.status(), StatusCode::OK);
    assert_eq!(app.auth(Some(&svc_key), &[]).await.status(), StatusCode::OK);
    assert_eq!(
        app.auth(Some(&svc_key), &[]).await.status(),
        StatusCode::PAYMENT_REQUIRED
    );
    let t: Value = app
        .get(&format!("/v1/tenants/{acme_id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(t["credits"], 0);
    let r = app
        .post(
            &format!("/v1/tenants/{acme_id}/credits"),
            json!({"amount": "lots"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn scopes_gate_the_management_api() {
    let app = TestApp::spawn().await;
    let (reader, _) = app
        .create_key(json!({"kind": "sk", "name": "reader", "scopes": ["keys:read"]}))
        .await;
    let r = app
        .as_key(&reader)
        .get(app.url("/v1/keys"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .as_key(&reader)
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "x"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
}

#[tokio::test]
async fn user_tokens_follow_the_users_plan() {
    let app = TestApp::spawn_with(|c| {
        c.plans.insert(
            "viewer".into(),
            keygate_engine::config::PlanConfig {
                api_access: false,
                ..Default::default()
            },
        );
        c.plans.insert(
            "starter".into(),
            keygate_engine::config::PlanConfig {
                rate_limit: Some(keygate_core::RateLimit {
                    limit: 2,
                    window_seconds: 60,
                }),
                scopes: Some(vec!["docs:read".into(), "docs:write".into()]),
                ..Default::default()
            },
        );
    })
    .await;
    let r = app
        .post(
            "/v1/users",
            json!({"email": "Ada@Example.com", "password": "correct horse", "plan": "starter"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let ada: Value = r.json().await.expect("json");
    assert_eq!(ada["email"], "ada@example.com");
    assert!(ada.get("password_hash").is_none());
    let r = app
        .post("/v1/users", json!({"email": "ada@example.com"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (ut, rec) = app
        .create_key(json!({"kind": "ut", "name": "ada", "user_id": ada["id"]}))
        .await;
    assert_eq!(rec["scopes"], json!(["docs:read", "docs:write"]));
    let r = app
        .post(
            "/v1/keys",
            json!({"kind": "ut", "name": "x", "user_id": ada["id"], "scopes": ["billing:write"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.auth(Some(&ut), &[]).await.status(), StatusCode::OK);
    let r = app.auth(Some(&ut), &[]).await;
    assert_eq!(r.headers()["ratelimit-policy"], "\"key\";q=2;w=60");
    assert_eq!(
        app.auth(Some(&ut), &[]).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let bob: Value = app
        .post(
            "/v1/users",
            json!({"email": "bob@example.com", "plan": "viewer"}),
        )
        .await
        .json()
        .await
        .expect("json");
    let (bt, _) = app
        .create_key(
            json!({"kind": "ut", "name": "bob", "user_id": bob["id"], "scopes": ["docs:read"]}),
        )
        .await;
    let r = app.auth(Some(&bt), &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "PLAN_FEATURE");
    let users: Value = app.get("/v1/users").await.json().await.expect("json");
    assert_eq!(users["data"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn verify_api_answers_in_the_documented_shape() {
    let app = TestApp::spawn_with(|c| {
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/v1/ocr/*".into(),
            methods: vec!["POST".into()],
            upstream: None,
            scope: Some("ocr:read".into()),
            cost: 5,
            public: false,
            class: Default::default(),
        });
    })
    .await;
    let (pk, rec) = app
        .create_key(json!({"kind": "pk", "name": "v", "scopes": ["ocr:read"], "budget": 12, "allowed_origins": ["https://app.example.com"], "rate_limit": {"limit": 10, "window_seconds": 60}}))
        .await;
    let verify = |body: Value| app.post("/v1/keys/verify", body);
    let v: Value = verify(json!({"key": pk, "method": "POST", "path": "/v1/ocr/scan?x=1", "origin": "https://app.example.com"})).await.json().await.expect("json");
    assert_eq!(v["valid"], true);
    assert_eq!(v["code"], "VALID");
    assert_eq!(v["key_id"], rec["id"]);
    assert_eq!(v["tenant_id"], "default");
    assert_eq!(v["kind"], "pk");
    assert_eq!(v["scopes"], json!(["ocr:read"]));
    assert_eq!(v["ratelimit"]["limit"], 10);
    assert_eq!(v["ratelimit"]["remaining"], 9);
    assert_eq!(v["budget"], json!({"limit": 12, "remaining": 7}));
    assert!(v["expires_at"].is_null());
    let v: Value =
        verify(json!({"key": pk, "scope": "ocr:write", "origin": "https://app.example.com"}))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(
        (v["valid"].clone(), v["code"].clone()),
        (json!(false), json!("FORBIDDEN_SCOPE"))
    );
    let v: Value = verify(json!({"key": pk, "method": "POST", "path": "/v1/ocr/scan", "origin": "https://app.example.com"})).await.json().await.expect("json");
    assert_eq!(v["budget"]["remaining"], 2);
    let v: Value = verify(json!({"key": pk, "method": "POST", "path": "/v1/ocr/scan", "origin": "https://app.example.com"})).await.json().await.expect("json");
    assert_eq!(v["code"], "BUDGET_EXHAUSTED");
    let v: Value = verify(json!({"key": "kg_pk_nope"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["code"], "MALFORMED_KEY");
    let r = verify(json!({"key": pk, "ip": "999.1.1.1"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = verify(json!({"key": pk, "method": "POST"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A key without keys:verify cannot call it.
    let (plain, _) = app
        .create_key(json!({"kind": "sk", "name": "p", "scopes": ["ocr:read"]}))
        .await;
    let r = app
        .as_key(&plain)
        .post(app.url("/v1/keys/verify"))
        .json(&json!({"key": pk}))
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
}

#[tokio::test]
async fn forward_auth_uses_the_route_table() {
    let app = TestApp::spawn_with(|c| {
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/api/ocr/*".into(),
            methods: vec![],
            upstream: None,
            scope: Some("ocr:read".into()),
            cost: 2,
            public: false,
            class: Default::default(),
        });
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
            path: "/api/billing/*".into(),
            methods: vec![],
            upstream: None,
            scope: Some("ocr:read".into()),
            cost: 0,
            public: false,
            class: keygate_core::RouteClass::Billing,
        });
    })
    .await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "docs", "scopes": ["docs:read"], "budget": 10}))
        .await;
    let r = app
        .auth(
            None,
            &[
                ("x-original-method", "GET"),
                ("x-original-uri", "/api/health"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "public route needs no key");
    let r = app
        .auth(
            Some(&key),
            &[
                ("x-original-method", "POST"),
                ("x-original-uri", "/api/ocr/scan"),
            ],
        )
        .await;
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
    let r = app
        .auth(
            Some(&key),
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/other?q=1"),
                ("x-keygate-scope", "docs:read"),
                ("x-keygate-cost", "4"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-credits-remaining"], "6");
    let (ocr, _) = app.create_key(json!({"kind": "pk", "name": "ocr", "scopes": ["ocr:read"], "allowed_origins": ["https://a.example"]})).await;
    let r = app
        .auth(
            Some(&ocr),
            &[
                ("origin", "https://a.example"),
                ("x-original-method", "GET"),
                ("x-original-uri", "/api/billing/invoices"),
            ],
        )
        .await;
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    let r = app.auth(Some(&key), &[("x-keygate-cost", "many")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_restart_never_refills_a_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = TestApp::spawn_in(dir.path(), |_| {}).await;
    let root = app.root.clone();
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "b", "budget": 5}))
        .await;
    for _ in 0..3 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    app.stop().await;
    let app = TestApp::spawn_in(dir.path(), |_| {})
        .await
        .with_root(root.clone());
    let granted = app.count_ok(&key, 10).await;
    assert_eq!(granted, 2, "graceful restart: exactly the rest");
    // A crash (no graceful shutdown, leases not returned) may lose credits, never add them.
    let (key2, _) = app
        .create_key(json!({"kind": "sk", "name": "c", "budget": 500}))
        .await;
    assert_eq!(app.count_ok(&key2, 100).await, 100);
    app.crash();
    let app = TestApp::spawn_in(dir.path(), |_| {}).await.with_root(root);
    let after = app.count_ok(&key2, 500).await;
    assert!(after <= 400, "over-granted after a crash: {after}");
    assert!(after >= 390, "lost more than one lease: {after}");
}

#[tokio::test]
async fn the_database_never_holds_a_plaintext_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = TestApp::spawn_in(dir.path(), |_| {}).await;
    let mut keys = vec![app.root.clone()];
    for kind in ["sk", "pk"] {
        let body = if kind == "pk" {
            json!({"kind": kind, "name": "k", "preset": "default"})
        } else {
            json!({"kind": kind, "name": "k"})
        };
        let (k, rec) = app.create_key(body).await;
        keys.push(k.clone());
        app.auth(Some(&k), &[("origin", "https://claude.ai")]).await;
        let r = app
            .post(
                &format!("/v1/keys/{}/rotate", rec["id"].as_str().expect("id")),
                json!({"grace_seconds": 10}),
            )
            .await;
        keys.push(
            r.json::<Value>().await.expect("json")["key"]
                .as_str()
                .expect("key")
                .to_string(),
        );
    }
    let r = app.post("/v1/tenants", json!({"name": "T"})).await;
    keys.push(
        r.json::<Value>().await.expect("json")["admin_key"]["key"]
            .as_str()
            .expect("key")
            .to_string(),
    );
    app.stop().await;
    // The database files and the audit directory (its segments, if any are left).
    let mut bytes = Vec::new();
    let mut dirs = vec![dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).expect("dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                // SQLite may still be removing its `-wal`/`-shm` files as the last pool
                // connection closes: a file gone by now holds nothing.
                match std::fs::read(&p) {
                    Ok(b) => bytes.extend(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("read {}: {e}", p.display()),
                }
            }
        }
    }
    assert!(bytes.len() > 4096);
    for k in &keys {
        assert!(
            !contains(&bytes, k.as_bytes()),
            "plaintext key found in the database files"
        );
        // Not even the random body without the prefix.
        assert!(!contains(&bytes, &k.as_bytes()[6..]));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_key_cannot_grant_or_manage_more_than_it_holds() {
    let app = TestApp::spawn().await;
    let (writer, wrec) = app
        .create_key(json!({"kind": "sk", "name": "writer", "scopes": ["keys:write", "keys:read", "ocr:read"]}))
        .await;
    let w = app.as_key(&writer);
    // No scope list: the new key gets the caller's scopes, not "*".
    let r = w
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "child"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let child: Value = r.json().await.expect("json");
    assert_eq!(
        child["scopes"],
        json!(["keys:read", "keys:write", "ocr:read"])
    );
    for body in [
        json!({"kind": "sk", "name": "x", "scopes": ["*"]}),
        json!({"kind": "sk", "name": "x", "scopes": ["tenants:write"]}),
        json!({"kind": "pk", "name": "x", "preset": "default"}),
    ] {
        let r = w
            .post(app.url("/v1/keys"))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
    }
    // It cannot widen itself, nor rotate, revoke or change a stronger key.
    let wid = wrec["id"].as_str().expect("id");
    let r = app
        .client
        .patch(app.url(&format!("/v1/keys/{wid}")))
        .bearer_auth(&writer)
        .json(&json!({"scopes": ["*"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let root_id = app
        .get("/v1/keys?limit=500")
        .await
        .json::<Value>()
        .await
        .expect("json")["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|k| k["name"] == "root")
        .expect("root key listed")["id"]
        .as_str()
        .expect("id")
        .to_string();
    for path in [
        format!("/v1/keys/{root_id}/rotate"),
        format!("/v1/keys/{root_id}/revoke"),
    ] {
        let r = w
            .post(app.url(&path))
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        app.auth(Some(&app.root), &[]).await.status(),
        StatusCode::OK,
        "root still works"
    );
    // Narrowing its own scopes is fine.
    let r = app
        .client
        .patch(app.url(&format!("/v1/keys/{wid}")))
        .bearer_auth(&writer)
        .json(&json!({"scopes": ["keys:write", "keys:read"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn patch_never_revives_a_revoked_or_rotated_key() {
    let app = TestApp::spawn().await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "k", "ttl_seconds": 3600}))
        .await;
    let id = rec["id"].as_str().expect("id");
    let r = app
        .post(
            &format!("/v1/keys/{id}/rotate"),
            json!({"grace_seconds": 60}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .patch(&format!("/v1/keys/{id}"), json!({"expires_at": null}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT, "grace cannot be extended");
    let r = app
        .patch(&format!("/v1/keys/{id}"), json!({"name": "renamed"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["status"], "grace", "a PATCH does not change the status");
    app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    let r = app
        .patch(&format!("/v1/keys/{id}"), json!({"name": "back"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(app.auth(Some(&key), &[]).await).await, "REVOKED");
    // A bad id is a JSON error too.
    let r = app.get("/v1/keys/%FF").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "INVALID_REQUEST");
}

#[tokio::test]
async fn forward_auth_refuses_unclean_paths_and_trusts_forwarded_headers_first() {
    let app = TestApp::spawn_with(|c| {
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/api/public/*".into(),
            methods: vec![],
            upstream: None,
            scope: None,
            cost: 0,
            public: true,
            class: Default::default(),
        });
        c.routes.push(keygate_engine::config::RouteConfig {
            path: "/api/admin/*".into(),
            methods: vec![],
            upstream: None,
            scope: Some("admin:all".into()),
            cost: 0,
            public: false,
            class: Default::default(),
        });
        c.gateway.public_rate_limit = keygate_core::RateLimit {
            limit: 2,
            window_seconds: 60,
        };
    })
    .await;
    for uri in [
        "/api/public/../admin/users",
        "/api/public/%2e%2e/admin",
        "/api//admin/x",
    ] {
        let r = app
            .auth(
                None,
                &[("x-original-method", "GET"), ("x-original-uri", uri)],
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{uri}");
    }
    // Behind Traefik (which sets X-Forwarded-Uri), a client-sent X-Original-URI is ignored.
    let r = app
        .auth(
            None,
            &[
                ("x-original-uri", "/api/public/x"),
                ("x-forwarded-uri", "/api/admin/users"),
                ("x-forwarded-method", "GET"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Envoy's path_prefix form: /v1/auth/<original path>.
    let r = app
        .client
        .get(app.url("/v1/auth/api/public/page"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .get(app.url("/v1/auth/api/admin/users"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Public routes are limited per client IP (one call was used above).
    let r = app.auth(None, &[("x-original-uri", "/api/public/x")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.auth(None, &[("x-original-uri", "/api/public/x")]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let r = app
        .auth(
            None,
            &[
                ("x-original-uri", "/api/public/x"),
                ("x-forwarded-for", "198.51.100.4"),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "another client IP has its own window"
    );
}

#[tokio::test]
async fn top_ups_are_capped() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/tenants",
            json!({"name": "Too rich", "credits": 1_000_000_000_000_001u64}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let t: Value = app
        .post(
            "/v1/tenants",
            json!({"name": "Rich", "credits": 999_999_999_999_990u64}),
        )
        .await
        .json()
        .await
        .expect("json");
    let id = t["id"].as_str().expect("id");
    let r = app
        .post(&format!("/v1/tenants/{id}/credits"), json!({"amount": 10}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(&format!("/v1/tenants/{id}/credits"), json!({"amount": 1}))
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let t: Value = app
        .get(&format!("/v1/tenants/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(t["credits"], 1_000_000_000_000_000u64);
}

#[tokio::test]
async fn the_same_api_runs_on_postgresql() {
    let app = TestApp::spawn_postgres(|_| {}).await;
    let status: Value = app
        .client
        .get(app.url("/v1/status"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(status["store"], "postgres");
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "pg", "scopes": ["ocr:read"], "budget": 5}))
        .await;
    let id = rec["id"].as_str().expect("id");
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let client = app.client.clone();
        let url = app.url("/v1/auth");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("request")
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("task") == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 5, "exactly the budget on PostgreSQL too");
    let r = app
        .post(
            &format!("/v1/keys/{id}/rotate"),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(error_code(app.auth(Some(&key), &[]).await).await, "EXPIRED");
    let listed: Value = app
        .get("/v1/keys?name=pg")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2));
    let t: Value = app
        .post("/v1/tenants", json!({"name": "PG", "credits": 2}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(t["credits"], 2);
}

#[tokio::test]
async fn a_revoke_on_one_node_reaches_the_other_at_once() {
    let a = TestApp::spawn_postgres(|_| {}).await;
    let b = TestApp::spawn_on(a.db_url(), |_| {})
        .await
        .with_root(a.root.clone());
    let mut lat = Vec::new();
    for i in 0..100 {
        let (key, rec) = a
            .create_key(json!({"kind": "sk", "name": format!("k{i}")}))
            .await;
        // B caches the key as valid.
        assert_eq!(b.auth(Some(&key), &[]).await.status(), StatusCode::OK);
        let r = a
            .post(
                &format!("/v1/keys/{}/revoke", rec["id"].as_str().expect("id")),
                json!({}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let start = std::time::Instant::now();
        loop {
            let r = b.auth(Some(&key), &[]).await;
            if r.status() == StatusCode::UNAUTHORIZED {
                assert_eq!(error_code(r).await, "REVOKED");
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "revocation never reached node B"
            );
        }
        lat.push(start.elapsed());
    }
    lat.sort();
    println!(
        "revoke propagation over 100 trials: p50 {:?}, p99 {:?}, max {:?}",
        lat[49], lat[98], lat[99]
    );
    // A rotation and a top-up propagate too.
    let (key, rec) = a.create_key(json!({"kind": "sk", "name": "rot"})).await;
    assert_eq!(b.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    let r = a
        .post(
            &format!("/v1/keys/{}/rotate", rec["id"].as_str().expect("id")),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    support::eventually(|| async {
        b.auth(Some(&key), &[]).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[tokio::test]
async fn metrics_and_health_are_exposed() {
    let app = TestApp::spawn().await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "m", "scopes": ["a:b"]}))
        .await;
    assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    assert_eq!(
        app.auth(Some(&key), &[("x-keygate-scope", "c:d")])
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&app.root)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    for needle in [
        "keygate_decisions_total{code=\"VALID\"}",
        "keygate_decisions_total{code=\"FORBIDDEN_SCOPE\"}",
        "keygate_decision_seconds_bucket",
        "keygate_key_cache_hits_total",
        "keygate_key_cache_misses_total",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
    let r = app
        .client
        .get(app.url("/v1/health/ready"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["store"], "ok");
    let r = app
        .client
        .get(app.url("/v1/health/live"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
}

/// What the lists of keys, tenants, users and OAuth clients show.
async fn listed(app: &TestApp) -> Vec<Value> {
    let mut out = Vec::new();
    for path in ["/v1/keys", "/v1/tenants", "/v1/users", "/v1/oauth/clients"] {
        let v: Value = app.get(path).await.json().await.expect("json");
        out.push(v["data"].clone());
    }
    out
}

#[tokio::test]
async fn display_names_with_control_or_bidi_characters_are_refused_everywhere_and_change_nothing() {
    let app = TestApp::spawn().await;
    let (_, rec) = app.create_key(json!({"kind": "sk", "name": "plain"})).await;
    let id = rec["id"].as_str().expect("id").to_string();
    let snapshot = listed(&app).await;
    for bad in [
        "nul\u{0}byte",
        "esc\u{1b}[31mred",
        "bell\u{7}",
        "c1\u{9b}",
        "key_\u{202E}gpj.exe",
        "\u{2066}isolated\u{2069}",
        "mark\u{200F}",
        "arabic\u{061C}mark",
    ] {
        let attempts = [
            (
                "POST",
                "/v1/keys".to_string(),
                json!({"kind": "sk", "name": bad}),
                "control",
            ),
            (
                "PATCH",
                format!("/v1/keys/{id}"),
                json!({"name": bad}),
                "control",
            ),
            (
                "POST",
                "/v1/tenants".to_string(),
                json!({"name": bad}),
                "control",
            ),
            (
                "POST",
                "/v1/users".to_string(),
                json!({"email": "eve@example.com", "name": bad}),
                "control",
            ),
            // The dashboard shows the email and names the user's session keys after it.
            (
                "POST",
                "/v1/users".to_string(),
                json!({"email": format!("eve{bad}@example.com")}),
                "email",
            ),
            (
                "POST",
                "/v1/oauth/clients".to_string(),
                json!({"name": bad, "type": "confidential", "scopes": ["docs:read"]}),
                "control",
            ),
        ];
        for (method, path, body, why) in attempts {
            let r = if method == "PATCH" {
                app.patch(&path, body.clone()).await
            } else {
                app.post(&path, body.clone()).await
            };
            let what = format!("{method} {path} {body}");
            assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{what}");
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{what}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(why)),
                "{what}: {v}"
            );
            assert!(v["error"]["request_id"].as_str().is_some(), "{v}");
        }
    }
    assert_eq!(
        listed(&app).await,
        snapshot,
        "nothing was stored or changed"
    );
    // Names in any script, and with joiners, are still fine.
    let (_, rec) = app
        .create_key(json!({"kind": "sk", "name": "مفتاح 👩\u{200D}💻"}))
        .await;
    assert_eq!(rec["name"], "مفتاح 👩\u{200D}💻");
}

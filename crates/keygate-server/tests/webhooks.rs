//! Webhooks against a real HTTP receiver that checks every signature the way the Standard
//! Webhooks spec says (written here from the spec, not with keygate's code).

mod support;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use support::{error_code, eventually, TestApp};

/// What the receiver got: (webhook-id, signature valid, body).
type Seen = Arc<Mutex<Vec<(String, bool, Value)>>>;

struct Receiver {
    url: String,
    seen: Seen,
    /// Statuses to answer with, in order; 200 once it is empty.
    script: Arc<Mutex<VecDeque<u16>>>,
    secret: Arc<Mutex<String>>,
}

#[derive(Clone)]
struct Ctx {
    seen: Seen,
    script: Arc<Mutex<VecDeque<u16>>>,
    secret: Arc<Mutex<String>>,
}

fn valid(secret: &str, h: &HeaderMap, body: &[u8]) -> bool {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (id, ts, sigs) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    );
    let Ok(ts_n) = ts.parse::<i64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if (now - ts_n).abs() > 300 {
        return false;
    }
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sigs.split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

async fn receive(State(c): State<Ctx>, h: HeaderMap, body: Bytes) -> AxumStatus {
    let secret = c.secret.lock().expect("lock").clone();
    let ok = valid(&secret, &h, &body);
    let id = h
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    c.seen.lock().expect("lock").push((id, ok, v));
    let status = c.script.lock().expect("lock").pop_front().unwrap_or(200);
    AxumStatus::from_u16(status).unwrap_or(AxumStatus::OK)
}

impl Receiver {
    async fn start_on(listener: tokio::net::TcpListener) -> Self {
        let ctx = Ctx {
            seen: Arc::default(),
            script: Arc::default(),
            secret: Arc::default(),
        };
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(ctx.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url,
            seen: ctx.seen,
            script: ctx.script,
            secret: ctx.secret,
        }
    }

    async fn start() -> Self {
        Self::start_on(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        )
        .await
    }

    fn seen(&self) -> Vec<(String, bool, Value)> {
        self.seen.lock().expect("lock").clone()
    }
}

/// The receivers listen on 127.0.0.1, which a production keygate refuses to call.
fn fast_retries(c: &mut keygate_server::Config) {
    c.webhooks.retry_backoff_ms = vec![50, 50, 50];
    c.webhooks.poll_ms = 20;
    c.webhooks.allow_private_networks = true;
}

async fn endpoint(app: &TestApp, url: &str, events: Value) -> (String, String) {
    let r = app
        .post("/v1/webhooks", json!({"url": url, "events": events}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    let secret = v["secret"].as_str().expect("secret once").to_string();
    assert!(secret.starts_with("whsec_"));
    (v["id"].as_str().expect("id").to_string(), secret)
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let v: Value = app
        .get(&format!("/v1/webhooks/{id}/deliveries"))
        .await
        .json()
        .await
        .expect("json");
    v["data"].as_array().expect("data").clone()
}

#[tokio::test]
async fn a_key_event_arrives_signed_and_is_retried_until_taken() {
    let rx = Receiver::start().await;
    let app = TestApp::spawn_with(fast_retries).await;
    let (wid, secret) = endpoint(&app, &rx.url, json!(["key.created", "key.revoked"])).await;
    *rx.secret.lock().expect("lock") = secret;
    rx.script.lock().expect("lock").extend([500, 503]);
    let (_, rec) = app
        .create_key(json!({"kind": "sk", "name": "hooked"}))
        .await;
    let key_id = rec["id"].as_str().expect("id").to_string();
    eventually(|| async { rx.seen().len() >= 3 }).await;
    let seen = rx.seen();
    assert!(
        seen.iter().all(|(_, ok, _)| *ok),
        "every signature verifies"
    );
    assert!(
        seen.iter().all(|(id, _, _)| id == &seen[0].0),
        "one webhook-id for every attempt"
    );
    let body = &seen[2].2;
    assert_eq!(body["type"], "key.created");
    assert_eq!(body["id"], seen[0].0.as_str());
    assert_eq!(body["data"]["key_id"], key_id.as_str());
    assert_eq!(body["data"]["tenant_id"], "default");
    eventually(|| async {
        deliveries(&app, &wid)
            .await
            .first()
            .is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    let d = &deliveries(&app, &wid).await[0];
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["last_status"], 200);
    // The secret is shown once.
    let v: Value = app
        .get(&format!("/v1/webhooks/{wid}"))
        .await
        .json()
        .await
        .expect("json");
    assert!(v.get("secret").is_none());
    // A tenant's other events do not go to an endpoint that did not ask for them.
    let r = app.post("/v1/tenants", json!({"name": "Other"})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(rx.seen().len(), 3, "nothing else was sent");
}

#[tokio::test]
async fn a_410_disables_the_endpoint_and_a_test_send_goes_through_after_re_enabling() {
    let rx = Receiver::start().await;
    let app = TestApp::spawn_with(fast_retries).await;
    let (wid, secret) = endpoint(&app, &rx.url, json!(["*"])).await;
    *rx.secret.lock().expect("lock") = secret;
    rx.script.lock().expect("lock").push_back(410);
    let r = app
        .post(&format!("/v1/webhooks/{wid}/test"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    eventually(|| async {
        let v: Value = app
            .get(&format!("/v1/webhooks/{wid}"))
            .await
            .json()
            .await
            .expect("json");
        v["enabled"] == false && v["disabled_reason"] == "410 Gone"
    })
    .await;
    let r = app
        .patch(&format!("/v1/webhooks/{wid}"), json!({"enabled": true}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(&format!("/v1/webhooks/{wid}/test"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    eventually(|| async { rx.seen().len() >= 2 }).await;
    let seen = rx.seen();
    assert_eq!(seen[1].2["type"], "webhook.test");
    assert!(seen[1].1, "signed");
    eventually(|| async {
        let ds = deliveries(&app, &wid).await;
        ds.len() == 2 && ds[0]["status"] == "delivered" && ds[1]["status"] == "failed"
    })
    .await;
}

#[tokio::test]
async fn a_delivery_waits_out_a_restart_and_arrives_afterwards() {
    // The receiver's port is reserved, then closed: the first attempts are refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let slow = |c: &mut keygate_server::Config| {
        c.webhooks.retry_backoff_ms = vec![300, 300, 300, 300, 300, 300, 300, 300];
        c.webhooks.poll_ms = 20;
        c.webhooks.allow_private_networks = true;
    };
    let app = TestApp::spawn_in(dir.path(), slow).await;
    let root = app.root.clone();
    let (wid, secret) =
        endpoint(&app, &format!("http://{addr}/hook"), json!(["key.revoked"])).await;
    let (_, rec) = app
        .create_key(json!({"kind": "sk", "name": "doomed"}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    let r = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    eventually(|| async {
        deliveries(&app, &wid)
            .await
            .first()
            .is_some_and(|d| d["attempts"].as_u64() >= Some(1) && d["status"] == "pending")
    })
    .await;
    app.stop().await;
    let rx = Receiver::start_on(tokio::net::TcpListener::bind(addr).await.expect("rebind")).await;
    *rx.secret.lock().expect("lock") = secret;
    let app = TestApp::spawn_in(dir.path(), slow).await.with_root(root);
    eventually(|| async { !rx.seen().is_empty() }).await;
    let (_, ok, body) = &rx.seen()[0];
    assert!(ok);
    assert_eq!(body["type"], "key.revoked");
    assert_eq!(body["data"]["key_id"], id.as_str());
    drop(app);
}

#[tokio::test]
async fn bad_webhook_input_is_refused_and_other_tenants_endpoints_are_invisible() {
    let app = TestApp::spawn().await;
    for body in [
        json!({"url": "ftp://example.com/hook"}),
        json!({"url": "not a url"}),
        json!({"url": "https://example.com/hook", "events": ["key.exploded"]}),
        json!({"url": "https://example.com/hook", "events": []}),
        // Without webhooks.allow_private_networks: TLS only, no internal addresses, no
        // credentials in the URL.
        json!({"url": "http://example.com/hook"}),
        json!({"url": "https://127.0.0.1/hook"}),
        json!({"url": "https://10.1.2.3/hook"}),
        json!({"url": "https://[::1]/hook"}),
        json!({"url": "https://169.254.169.254/latest"}),
        json!({"url": "https://localhost/hook"}),
        json!({"url": "https://user:pw@example.com/hook"}),
    ] {
        let r = app.post("/v1/webhooks", body.clone()).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_code(r).await, "INVALID_REQUEST");
    }
    let r = app
        .post(
            "/v1/webhooks",
            json!({"url": "https://x.example/h", "colour": 1}),
        )
        .await;
    assert_eq!(error_code(r).await, "INVALID_REQUEST");
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "browser", "preset": "aidemo"}))
        .await;
    let r = app
        .as_key(&pk)
        .post(app.url("/v1/webhooks"))
        .header("origin", "https://claude.ai")
        .json(&json!({"url": "https://x.example/h"}))
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    let (wid, _) = endpoint(&app, "https://x.example/h", json!(["*"])).await;
    let t: Value = app
        .post("/v1/tenants", json!({"name": "Acme"}))
        .await
        .json()
        .await
        .expect("json");
    let admin = t["admin_key"]["key"].as_str().expect("key").to_string();
    let r = app
        .as_key(&admin)
        .get(app.url(&format!("/v1/webhooks/{wid}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app
        .as_key(&admin)
        .delete(app.url(&format!("/v1/webhooks/{wid}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app.delete(&format!("/v1/webhooks/{wid}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Webhook changes are audit events.
    eventually(|| async {
        let v: Value = app
            .get("/v1/audit?action=webhook.deleted")
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn a_due_key_rotates_once_its_successor_is_delivered_and_the_plaintext_is_stored_nowhere() {
    let rx = Receiver::start().await;
    let app = TestApp::spawn_with(|c| {
        fast_retries(c);
        c.rotation.check_seconds = 1;
    })
    .await;
    let (old_key, rec) = app
        .create_key(json!({"kind": "sk", "name": "rotating", "rotation_days": 1}))
        .await;
    let old_id = rec["id"].as_str().expect("id").to_string();
    // Two days pass (for this key).
    let url = format!("sqlite://{}", app.db_path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
    let two_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        - 2 * 86_400_000;
    sqlx::query("UPDATE keys SET created_at = ? WHERE id = ?")
        .bind(two_days_ago)
        .bind(&old_id)
        .execute(&pool)
        .await
        .expect("age the key");
    // Nobody to deliver the successor to: nothing rotates, an alert says why.
    eventually(|| async {
        let v: Value = app.get("/v1/alerts").await.json().await.expect("json");
        v["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["data"]["rule"] == "rotation_blocked"))
    })
    .await;
    let v: Value = app
        .get(&format!("/v1/keys/{old_id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "active");

    // The new plaintext goes only to endpoints that name key.rotated.successor, set up by a
    // key holding every scope; `*` subscribers do not get it.
    let (limited, _) = app
        .create_key(json!({"kind": "sk", "name": "hooks", "scopes": ["webhooks:write"]}))
        .await;
    let r = app
        .as_key(&limited)
        .post(app.url("/v1/webhooks"))
        .json(&json!({"url": rx.url, "events": ["key.rotated.successor"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let everything = Receiver::start().await;
    let (_, all_secret) = endpoint(&app, &everything.url, json!(["*"])).await;
    *everything.secret.lock().expect("lock") = all_secret;
    let (wid, secret) = endpoint(&app, &rx.url, json!(["key.rotated.successor"])).await;
    *rx.secret.lock().expect("lock") = secret;
    eventually(|| async { !rx.seen().is_empty() }).await;
    let (_, ok, body) = rx.seen()[0].clone();
    assert!(ok, "signed");
    assert_eq!(body["type"], "key.rotated");
    assert_eq!(body["data"]["key_id"], old_id.as_str());
    assert_eq!(body["data"]["automatic"], true);
    let new_key = body["data"]["key"]
        .as_str()
        .expect("the new key")
        .to_string();
    assert!(new_key.starts_with("kg_sk_"));
    // The successor works; the old key works through its grace period.
    eventually(|| async { app.auth(Some(&new_key), &[]).await.status() == StatusCode::OK }).await;
    assert_eq!(app.auth(Some(&old_key), &[]).await.status(), StatusCode::OK);
    let v: Value = app
        .get(&format!("/v1/keys/{old_id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "grace");
    assert_eq!(v["rotated_to"], body["data"]["successor_id"]);
    // Exactly one rotation, logged without the key.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(rx.seen().len(), 1);
    assert!(
        everything
            .seen()
            .iter()
            .all(|(_, _, b)| b["data"].get("key").is_none()),
        "a * subscriber never gets a plaintext key"
    );
    let ds = deliveries(&app, &wid).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["status"], "delivered");
    let rows: Vec<(String,)> = sqlx::query_as("SELECT payload FROM webhook_deliveries")
        .fetch_all(&pool)
        .await
        .expect("deliveries");
    assert!(rows.iter().all(|(p,)| !p.contains(&new_key[6..])));
    pool.close().await;
    // Not in the database files, not in the audit log.
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(b) = std::fs::read(format!("{}{suffix}", app.db_path.display())) {
            bytes.extend(b);
        }
    }
    let audit: Value = app
        .get("/v1/audit?limit=500")
        .await
        .json()
        .await
        .expect("json");
    bytes.extend(audit.to_string().into_bytes());
    assert!(!bytes.windows(32).any(|w| w == &new_key.as_bytes()[6..38]));
}

/// Asserts a refusal in the documented shape: `status`, `code`, a message and a request id.
async fn refused(r: reqwest::Response, status: StatusCode, code: &str, what: &str) -> Value {
    assert_eq!(r.status(), status, "{what}");
    let v: Value = r.json().await.expect("json error body");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(
        v["error"]["request_id"]
            .as_str()
            .is_some_and(|m| m.starts_with("req_")),
        "{what}: {v}"
    );
    v
}

#[tokio::test]
async fn webhook_urls_that_reach_inside_through_other_address_spellings_are_refused() {
    let app = TestApp::spawn().await;
    for url in [
        // Spellings the URL parser turns into 127.0.0.1.
        "https://2130706433/hook",
        "https://0x7f000001/hook",
        "https://0177.0.0.1/hook",
        "https://127.1/hook",
        // Translation prefixes that lead to IPv4 loopback, and special-purpose ranges.
        "https://[64:ff9b::7f00:1]/hook",
        "https://[64:ff9b:1::a00:1]/hook",
        "https://[2002:7f00:1::]/hook",
        "https://[::ffff:7f00:1]/hook",
        "https://[::127.0.0.1]/hook",
        "https://[2001:2::1]/hook",
        "https://198.18.0.1/hook",
        "https://192.0.0.1/hook",
    ] {
        let r = app.post("/v1/webhooks", json!({"url": url})).await;
        let v = refused(r, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST", url).await;
        assert_eq!(v["error"]["message"], "url must point at a public address");
    }
    let v: Value = app.get("/v1/webhooks").await.json().await.expect("json");
    assert_eq!(v["data"], json!([]), "no endpoint was created");
}

#[tokio::test]
async fn a_stored_endpoint_on_an_inside_address_is_not_called_once_private_networks_are_off() {
    // Set up while private networks were allowed; then the deployment turns them off.
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = |c: &mut keygate_server::Config| {
        fast_retries(c);
        c.webhooks.retry_backoff_ms = vec![];
    };
    let app = TestApp::spawn_in(dir.path(), allowed).await;
    let root = app.root.clone();
    let (wid, _) = endpoint(&app, "https://2130706433:9/hook", json!(["*"])).await;
    app.stop().await;
    let app = TestApp::spawn_in(dir.path(), |c| {
        allowed(c);
        c.webhooks.allow_private_networks = false;
    })
    .await
    .with_root(root);
    let r = app
        .post(&format!("/v1/webhooks/{wid}/test"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    eventually(|| async {
        deliveries(&app, &wid)
            .await
            .first()
            .is_some_and(|d| d["status"] == "failed")
    })
    .await;
    let d = &deliveries(&app, &wid).await[0];
    assert_eq!(
        d["last_error"], "url must point at a public address",
        "refused before connecting: {d}"
    );
}

#[tokio::test]
async fn a_key_without_every_scope_cannot_switch_off_or_delete_the_successor_endpoint() {
    let app = TestApp::spawn().await;
    let (successor, _) = endpoint(
        &app,
        "https://hooks.example.com/successor",
        json!(["key.rotated.successor"]),
    )
    .await;
    let (ordinary, _) = endpoint(&app, "https://hooks.example.com/all", json!(["*"])).await;
    let (limited, _) = app
        .create_key(
            json!({"kind": "sk", "name": "hooks", "scopes": ["webhooks:write", "webhooks:read"]}),
        )
        .await;
    let r = app
        .client
        .patch(app.url(&format!("/v1/webhooks/{successor}")))
        .bearer_auth(&limited)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .expect("patch");
    refused(r, StatusCode::FORBIDDEN, "FORBIDDEN_SCOPE", "switch off").await;
    let r = app
        .as_key(&limited)
        .delete(app.url(&format!("/v1/webhooks/{successor}")))
        .send()
        .await
        .expect("delete");
    refused(r, StatusCode::FORBIDDEN, "FORBIDDEN_SCOPE", "delete").await;
    // Nothing changed: the endpoint is there and still on.
    let v: Value = app
        .get(&format!("/v1/webhooks/{successor}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["enabled"], true, "{v}");
    assert_eq!(v["events"], json!(["key.rotated.successor"]));
    // Other endpoints are the limited key's to manage, and the successor endpoint is `*`'s.
    let r = app
        .client
        .patch(app.url(&format!("/v1/webhooks/{ordinary}")))
        .bearer_auth(&limited)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .as_key(&limited)
        .delete(app.url(&format!("/v1/webhooks/{ordinary}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .patch(
            &format!("/v1/webhooks/{successor}"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.delete(&format!("/v1/webhooks/{successor}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_budget_crossing_the_warning_and_running_out_at_once_raises_both_events() {
    let rx = Receiver::start().await;
    let app = TestApp::spawn_with(fast_retries).await;
    let (_, secret) = endpoint(&app, &rx.url, json!(["key.budget_warning"])).await;
    *rx.secret.lock().expect("lock") = secret;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "metered", "budget": 10}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    // One call spends the whole budget (0 % to 100 %), the next is refused.
    let v: Value = app
        .post("/v1/keys/verify", json!({"key": key, "cost": 10}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["valid"], true, "{v}");
    let v: Value = app
        .post("/v1/keys/verify", json!({"key": key, "cost": 1}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["code"], "BUDGET_EXHAUSTED", "{v}");
    // The warning subscriber hears of it, and both alerts are listed.
    eventually(|| async {
        rx.seen()
            .iter()
            .any(|(_, ok, b)| *ok && b["type"] == "key.budget_warning")
    })
    .await;
    let warning = rx
        .seen()
        .into_iter()
        .find(|(_, _, b)| b["type"] == "key.budget_warning")
        .expect("warning")
        .2;
    assert_eq!(warning["data"]["key_id"], id.as_str());
    assert_eq!(warning["data"]["detail"]["percent"], 100);
    let kinds = || async {
        let v: Value = app.get("/v1/alerts").await.json().await.expect("json");
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter(|a| a["key_id"] == id.as_str())
            .map(|a| a["kind"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    eventually(|| async { kinds().await.len() >= 2 }).await;
    let mut got = kinds().await;
    got.sort();
    assert_eq!(got, ["key.budget_exhausted", "key.budget_warning"]);
    assert!(rx
        .seen()
        .iter()
        .all(|(_, _, b)| b["type"] == "key.budget_warning"));
}

/// `keygate_task_restarts_total{task="…"}` on `/metrics`.
async fn restarts(app: &TestApp, task: &str) -> u64 {
    let text = app.get("/metrics").await.text().await.expect("body");
    let line = format!("keygate_task_restarts_total{{task=\"{task}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_background_task_survives_a_panic_and_its_work_goes_on() {
    use keygate_engine::supervisor;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = |c: &mut keygate_server::Config| {
        fast_retries(c);
        c.rotation.check_seconds = 1;
        c.oauth.signing_key_rotation_days = 1;
    };
    // A first start makes the signing key and a key due for rotation; both are then aged two
    // days, so that each task has work the moment it runs again.
    let first = TestApp::spawn_in(dir.path(), settings).await;
    let root = first.root.clone();
    let (_, rec) = first
        .create_key(json!({"kind": "sk", "name": "rotating", "rotation_days": 1}))
        .await;
    let due = rec["id"].as_str().expect("id").to_string();
    let db = first.db_path.clone();
    first.stop().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open");
    let two_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        - 2 * 86_400_000;
    for sql in [
        "UPDATE keys SET created_at = ?",
        "UPDATE oauth_signing_keys SET created_at = ?",
    ] {
        sqlx::query(sql)
            .bind(two_days_ago)
            .execute(&pool)
            .await
            .expect("age");
    }
    pool.close().await;

    // Each kind of task panics the first time it reaches its checkpoint.
    let tasks = [
        keygate_engine::audit::SHIPPER_TASK,
        keygate_engine::webhooks::DELIVERIES_TASK,
        keygate_engine::alerts::ALERTS_TASK,
        keygate_engine::rotation::ROTATION_TASK,
        keygate_engine::oauth::SIGNING_KEYS_TASK,
    ];
    for t in tasks {
        supervisor::panic_next(t);
    }
    let app = TestApp::spawn_in(dir.path(), settings)
        .await
        .with_root(root);
    for t in tasks {
        eventually(|| async { restarts(&app, t).await == 1 }).await;
    }

    // Deliveries: a new key's event reaches the endpoint.
    let rx = Receiver::start().await;
    let (_, secret) = endpoint(&app, &rx.url, json!(["key.created"])).await;
    *rx.secret.lock().expect("lock") = secret;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "after", "budget": 10}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    eventually(|| async {
        rx.seen()
            .iter()
            .any(|(_, ok, v)| *ok && v["data"]["key_id"] == id.as_str())
    })
    .await;
    // Shipper and alerts: decisions are shipped to the store, and 8 of 10 credits raise the
    // budget warning.
    for _ in 0..8 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    eventually(|| async {
        let v: Value = app
            .get(&format!("/v1/audit?key_id={id}&action=request.decided"))
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().map(Vec::len) == Some(8)
    })
    .await;
    eventually(|| async {
        let v: Value = app.get("/v1/alerts").await.json().await.expect("json");
        v["data"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["kind"] == "key.budget_warning" && x["key_id"] == id.as_str())
        })
    })
    .await;
    // Rotation: the due key has no endpoint for its successor, so an alert says so.
    eventually(|| async {
        let v: Value = app.get("/v1/alerts").await.json().await.expect("json");
        v["data"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["data"]["rule"] == "rotation_blocked" && x["key_id"] == due.as_str())
        })
    })
    .await;
    // Signing keys: the aged key was replaced; both are published.
    eventually(|| async {
        let v: Value = app
            .get("/.well-known/jwks.json")
            .await
            .json()
            .await
            .expect("json");
        v["keys"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    for t in tasks {
        assert_eq!(restarts(&app, t).await, 1, "{t} restarted once");
    }
}

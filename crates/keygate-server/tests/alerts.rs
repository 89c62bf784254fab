//! Alert rules driven by real traffic over HTTP: each alert is listed once, is an audit event,
//! and (for the webhook event types) reaches a subscribed endpoint.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{eventually, TestApp};

async fn alerts(app: &TestApp) -> Vec<Value> {
    let v: Value = app
        .get("/v1/alerts?limit=500")
        .await
        .json()
        .await
        .expect("json");
    v["data"].as_array().expect("data").clone()
}

fn count(all: &[Value], kind: &str, rule: Option<&str>) -> usize {
    all.iter()
        .filter(|a| a["kind"] == kind && rule.is_none_or(|r| a["data"]["rule"] == r))
        .count()
}

async fn wait_for(app: &TestApp, kind: &str, rule: Option<&str>) {
    eventually(|| async { count(&alerts(app).await, kind, rule) >= 1 }).await;
}

#[tokio::test]
async fn budget_credit_and_expiry_alerts_come_once_each() {
    let app = TestApp::spawn_with(|c| c.alerts.tenant_credits_low = 100).await;
    let t: Value = app
        .post("/v1/tenants", json!({"name": "Small", "credits": 150}))
        .await
        .json()
        .await
        .expect("json");
    let tid = t["id"].as_str().expect("id").to_string();
    let admin = t["admin_key"]["key"].as_str().expect("key").to_string();
    let r = app
        .as_key(&admin)
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "metered", "budget": 10}))
        .send()
        .await
        .expect("request");
    let key = r.json::<Value>().await.expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    // 8 of 10 credits: the 80 % warning.
    for _ in 0..8 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    wait_for(&app, "key.budget_warning", None).await;
    for _ in 0..2 {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    }
    // The 11th is refused: the budget is spent.
    for _ in 0..3 {
        assert_eq!(
            app.auth(Some(&key), &[]).await.status(),
            StatusCode::PAYMENT_REQUIRED
        );
    }
    wait_for(&app, "key.budget_exhausted", None).await;
    // 150 - 10 drawn = 140 > 100: no credits alert yet; a second key spends 50 more.
    let r = app
        .as_key(&admin)
        .post(app.url("/v1/keys"))
        .json(&json!({"kind": "sk", "name": "bulk"}))
        .send()
        .await
        .expect("request");
    let bulk = r.json::<Value>().await.expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    for _ in 0..50 {
        assert_eq!(app.auth(Some(&bulk), &[]).await.status(), StatusCode::OK);
    }
    wait_for(&app, "tenant.credits_low", None).await;
    // A key that expires in two days.
    app.create_key(json!({"kind": "sk", "name": "short", "ttl_seconds": 172_800}))
        .await;
    keygate_engine::alerts::check_expiring(&app.app_state()).await;
    keygate_engine::alerts::check_expiring(&app.app_state()).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let all = alerts(&app).await;
    assert_eq!(count(&all, "key.budget_warning", None), 1, "{all:#?}");
    assert_eq!(count(&all, "key.budget_exhausted", None), 1, "{all:#?}");
    assert_eq!(count(&all, "tenant.credits_low", None), 1, "{all:#?}");
    assert_eq!(count(&all, "key.expiring", None), 1, "{all:#?}");
    let warning = all
        .iter()
        .find(|a| a["kind"] == "key.budget_warning")
        .expect("warning");
    assert_eq!(warning["tenant_id"], tid.as_str());
    assert!(warning["data"]["percent"].as_u64() >= Some(80));
    // Each alert is an audit event too; the tenant sees its own alerts and no one else's.
    let v: Value = app
        .get("/v1/audit?action=key.budget_warning")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["data"].as_array().expect("data").len(), 1);
    let mine: Value = app
        .as_key(&admin)
        .get(app.url("/v1/alerts"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let mine = mine["data"].as_array().expect("data");
    assert!(mine.iter().all(|a| a["tenant_id"] == tid.as_str()));
    assert_eq!(
        mine.len(),
        3,
        "budget warning, budget spent, credits low: {mine:#?}"
    );
}

#[tokio::test]
async fn unusual_activity_refusal_bursts_new_networks_and_rate_spikes() {
    let app = TestApp::spawn_with(|c| {
        c.alerts.refusal_burst = 5;
        c.alerts.spike_min_requests = 20;
    })
    .await;
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "widget", "preset": "aidemo"}))
        .await;
    // Someone tries the publishable key from a page it does not allow, again and again.
    for _ in 0..12 {
        let r = app
            .auth(Some(&pk), &[("origin", "https://evil.example")])
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    wait_for(&app, "alert.unusual_activity", Some("refusal_burst")).await;

    // A server key used from one network, then another.
    let (sk, _) = app
        .create_key(json!({"kind": "sk", "name": "server"}))
        .await;
    for ip in ["203.0.113.5", "203.0.113.77"] {
        let r = app.auth(Some(&sk), &[("x-forwarded-for", ip)]).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        count(
            &alerts(&app).await,
            "alert.unusual_activity",
            Some("new_network")
        ),
        0,
        "a first network, and the same /24 again, are not news"
    );
    let r = app
        .auth(Some(&sk), &[("x-forwarded-for", "198.51.100.7")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    wait_for(&app, "alert.unusual_activity", Some("new_network")).await;

    // A key with no history makes 25 requests in a minute: a spike.
    let (busy, _) = app.create_key(json!({"kind": "sk", "name": "busy"})).await;
    for _ in 0..25 {
        assert_eq!(app.auth(Some(&busy), &[]).await.status(), StatusCode::OK);
    }
    wait_for(&app, "alert.unusual_activity", Some("rate_spike")).await;
    let all = alerts(&app).await;
    assert_eq!(
        count(&all, "alert.unusual_activity", Some("refusal_burst")),
        1
    );
    assert_eq!(
        count(&all, "alert.unusual_activity", Some("new_network")),
        1
    );
    let net = all
        .iter()
        .find(|a| a["data"]["rule"] == "new_network")
        .expect("network alert");
    assert_eq!(net["data"]["network"], "198.51.100.0/24");
}

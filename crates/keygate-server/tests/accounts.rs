//! Accounts: sign-up, plans and their features, plan changes and trials that end, on SQLite
//! and on two nodes sharing PostgreSQL and Redis.

mod support;

use keygate_engine::config::{Feature, PlanConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{csrf_of, error_code, eventually, thing, TestApp};

const PASSWORD: &str = "plum-violin-87-harbour";

/// Sign-up on, three sign-ups an hour per address, a `things` route, and plans without the
/// API (`noapi`) or without webhooks (`nohooks`).
fn accounts(c: &mut keygate_server::Config) {
    c.signup.enabled = true;
    c.signup.per_ip_per_hour = 3;
    c.signup.plan_check_seconds = 1;
    c.routes.push(support::things_route());
    // The upstream's own admin routes: a stranger's first key must get none of their scopes.
    c.routes.push(keygate_engine::config::RouteConfig {
        path: "/v1/admin/*".into(),
        methods: vec![],
        upstream: None,
        scope: Some("admin:all".into()),
        cost: 0,
        public: false,
        class: keygate_core::RouteClass::Admin,
    });
    c.plans.insert(
        "noapi".into(),
        PlanConfig {
            features: Some(vec![Feature::Webhooks]),
            ..PlanConfig::default()
        },
    );
    c.plans.insert(
        "monthly".into(),
        PlanConfig {
            credits: Some(100),
            monthly_credits: Some(500),
            ..PlanConfig::default()
        },
    );
    c.plans.insert(
        "narrow".into(),
        PlanConfig {
            scopes: Some(vec!["other:read".into()]),
            ..PlanConfig::default()
        },
    );
    c.plans.insert(
        "capped".into(),
        PlanConfig {
            features: Some(vec![Feature::Api]),
            max_keys: Some(5),
            max_budget: Some(500),
            max_ttl_days: Some(30),
            rate_limit: Some(keygate_core::RateLimit {
                limit: 60,
                window_seconds: 60,
            }),
            ..PlanConfig::default()
        },
    );
    c.plans.insert(
        "nohooks".into(),
        PlanConfig {
            features: Some(vec![Feature::Api]),
            ..PlanConfig::default()
        },
    );
}

async fn sign_up(app: &TestApp, from: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/signup"))
        .header("X-Forwarded-For", from)
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// A new account of `email`, signed up from `from`: its first key and its id.
async fn account(app: &TestApp, from: &str, email: &str) -> (String, String) {
    let v: Value = sign_up(app, from, json!({"email": email, "password": PASSWORD}))
        .await
        .json()
        .await
        .expect("json");
    (
        v["key"].as_str().expect("key").to_owned(),
        v["account"]["id"].as_str().expect("id").to_owned(),
    )
}

async fn tenant_count(app: &TestApp) -> usize {
    let v: Value = app.get("/v1/tenants").await.json().await.expect("json");
    v["data"].as_array().map_or(0, Vec::len)
}

async fn actions(app: &TestApp, tenant: &str) -> Vec<String> {
    let v: Value = app
        .get(&format!("/v1/audit?tenant_id={tenant}&limit=100"))
        .await
        .json()
        .await
        .expect("json");
    v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["action"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn signing_up_makes_an_account_its_owner_and_a_key_that_works_at_once() {
    let app = TestApp::spawn_with(accounts).await;
    let before = tenant_count(&app).await;
    let started = Instant::now();
    let r = sign_up(
        &app,
        "203.0.113.1",
        json!({"email": "Ada@Example.com", "password": PASSWORD, "name": "Ada", "organisation": "Engines Ltd"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    let key = v["key"].as_str().expect("a key, once").to_owned();
    assert!(key.starts_with("kg_ut_"), "{key}");
    assert_eq!(v["account"]["name"], "Engines Ltd");
    assert_eq!(v["account"]["plan"], "trial");
    assert_eq!(v["account"]["credits"], 1000);
    assert!(v["account"]["trial_ends_at"].is_string(), "{v}");
    assert_eq!(v["user"]["email"], "ada@example.com");
    assert_eq!(v["user"]["role"], "owner");
    assert_eq!(
        v["user"]["verified"], false,
        "no email confirmed the address"
    );
    let verified: Value = app
        .post("/v1/keys/verify", json!({"key": key}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(verified["scopes"], json!(["things:read"]), "{verified}");
    assert!(
        v.to_string().find("password").is_none(),
        "no password or hash: {v}"
    );
    // The first call works at once, on the route the key was made for.
    let r = thing(&app, &key).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.headers());
    println!("sign-up to first allowed call: {:?}", started.elapsed());
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    // The audit log is shipped to the store behind the answers: wait for it.
    eventually(|| async {
        let events = actions(&app, &tenant).await;
        ["tenant.created", "user.created", "key.created"]
            .iter()
            .all(|a| events.iter().any(|e| e == a))
    })
    .await;
    assert_eq!(tenant_count(&app).await, before + 1);

    // The same address again: the same status and shape, no account, no key.
    let r = sign_up(
        &app,
        "203.0.113.2",
        json!({"email": "ada@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v, json!({"account": null, "user": null, "key": null}));
    assert_eq!(tenant_count(&app).await, before + 1);
    app.stop().await;
}

#[tokio::test]
async fn bad_sign_ups_get_clear_errors_change_nothing_and_are_limited_per_address() {
    let app = TestApp::spawn_with(accounts).await;
    let before = tenant_count(&app).await;
    for (i, (body, says)) in [
        (
            json!({"email": "not-an-address", "password": PASSWORD}),
            "email",
        ),
        (
            json!({"email": "a@example.com", "password": "password123"}),
            "password",
        ),
        (
            json!({"email": "a@example.com", "password": "short"}),
            "password",
        ),
        (
            json!({"email": "ada.lovelace@example.com", "password": "lovelaceexample"}),
            "password",
        ),
        (
            json!({"email": "a@example.com", "password": PASSWORD, "name": "x\u{202e}y"}),
            "name",
        ),
        (
            json!({"email": "a@example.com", "password": PASSWORD, "plan": "enterprise"}),
            "",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = sign_up(&app, &format!("198.51.100.{i}"), body.clone()).await;
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        let v: Value = r.json().await.expect("json error");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {v}");
    }
    let r = app
        .client
        .post(app.url("/v1/signup"))
        .header("Content-Type", "text/plain")
        .body("email=a@example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(tenant_count(&app).await, before, "nothing was made");

    // Three an hour from one address, whatever they carry; another address is not affected.
    for _ in 0..3 {
        let r = sign_up(&app, "192.0.2.9", json!({"email": "x", "password": "y"})).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    let r = sign_up(
        &app,
        "192.0.2.9",
        json!({"email": "b@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    // A sliding window of an hour: the weight of the previous hour can push the wait past
    // this hour's end, never past two.
    assert!((1..=7200).contains(&wait), "{wait}");
    assert_eq!(error_code(r).await, "RATE_LIMITED");
    let r = sign_up(
        &app,
        "192.0.2.10",
        json!({"email": "b@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    app.stop().await;

    // Off unless the operator turns it on.
    let app = TestApp::spawn().await;
    let r = sign_up(
        &app,
        "192.0.2.11",
        json!({"email": "c@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn a_plan_lacking_a_feature_answers_plan_feature_and_a_plan_change_applies_at_once() {
    let app = TestApp::spawn_with(accounts).await;
    let (ut, tenant) = account(&app, "203.0.113.5", "b@example.com").await;
    let (sk, _) = app
        .create_key(json!({"kind": "sk", "name": "hooks", "tenant_id": tenant, "scopes": ["webhooks:read", "webhooks:write"]}))
        .await;
    let add_hook = |key: String| {
        let app = &app;
        async move {
            app.as_key(&key)
                .post(app.url("/v1/webhooks"))
                .json(&json!({"url": "https://hooks.example.com/k", "events": ["*"]}))
                .send()
                .await
                .expect("request")
        }
    };
    let list_hooks = |key: String| {
        let app = &app;
        async move {
            app.as_key(&key)
                .get(app.url("/v1/webhooks"))
                .send()
                .await
                .expect("request")
        }
    };
    // A user of the account with a plan of their own: it stays theirs when the account's
    // plan changes, and their key still needs the account's plan to have the API.
    let bob: Value = app
        .post(
            "/v1/users",
            json!({"email": "bob@example.com", "plan": "pro", "tenant_id": tenant}),
        )
        .await
        .json()
        .await
        .expect("json");
    let (bob_key, _) = app
        .create_key(json!({"kind": "ut", "name": "bob", "tenant_id": tenant, "user_id": bob["id"], "scopes": ["things:read"]}))
        .await;
    assert_eq!(thing(&app, &ut).await.status(), StatusCode::OK);
    assert_eq!(thing(&app, &bob_key).await.status(), StatusCode::OK);
    assert_eq!(add_hook(sk.clone()).await.status(), StatusCode::CREATED);

    // No webhooks on this plan: the webhook routes say why; the API still answers.
    let r = app
        .patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "nohooks"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let t: Value = r.json().await.expect("json");
    assert_eq!(
        (t["plan"].as_str(), &t["trial_ends_at"]),
        (Some("nohooks"), &Value::Null)
    );
    let r = add_hook(sk.clone()).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "PLAN_FEATURE");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("webhooks"),
        "{e}"
    );
    // What the account made stays listable (and deletable) on the way down.
    let listed: Value = list_hooks(sk.clone()).await.json().await.expect("json");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(thing(&app, &ut).await.status(), StatusCode::OK);

    // No API: the keys that worked a moment ago (and are cached) are refused at once, the
    // key of a user whose own plan has the API too.
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "noapi"}))
        .await;
    for key in [&ut, &bob_key] {
        let r = thing(&app, key).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["x-keygate-code"], "PLAN_FEATURE");
    }
    let bob: Value = app
        .get(&format!(
            "/v1/users/{}",
            bob["id"].as_str().unwrap_or_default()
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(bob["plan"], "pro", "a plan of their own stays");
    let r = app
        .patch(
            &format!("/v1/tenants/{tenant}"),
            json!({"plan": "trial", "name": "Back"}),
        )
        .await;
    let t: Value = r.json().await.expect("json");
    assert_eq!(
        (t["plan"].as_str(), t["name"].as_str()),
        (Some("trial"), Some("Back"))
    );
    assert!(t["trial_ends_at"].is_string());
    assert_eq!(thing(&app, &ut).await.status(), StatusCode::OK);
    // The same plan again (a retried request) grants nothing and restarts nothing (the call
    // above spent a credit since).
    let again: Value = app
        .patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "trial"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (&again["trial_ends_at"], &again["plan_started_at"]),
        (&t["trial_ends_at"], &t["plan_started_at"])
    );
    assert!(
        again["credits"].as_u64() <= t["credits"].as_u64(),
        "{again} {t}"
    );
    eventually(|| async {
        let events = actions(&app, &tenant).await;
        events
            .iter()
            .filter(|a| *a == "tenant.plan_changed")
            .count()
            == 3
    })
    .await;

    // Only the operator changes plans; bad input changes nothing.
    let (admin, _) = app
        .create_key(json!({"kind": "sk", "name": "admin", "tenant_id": tenant, "scopes": ["*"]}))
        .await;
    let r = app
        .client
        .patch(app.url(&format!("/v1/tenants/{tenant}")))
        .bearer_auth(&admin)
        .json(&json!({"plan": "enterprise"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    for (body, status) in [
        (json!({"plan": "gold"}), StatusCode::BAD_REQUEST),
        (json!({"credits": 5}), StatusCode::BAD_REQUEST),
        (json!({"name": ""}), StatusCode::BAD_REQUEST),
    ] {
        let r = app
            .patch(&format!("/v1/tenants/{tenant}"), body.clone())
            .await;
        assert_eq!(r.status().as_u16() / 100, status.as_u16() / 100, "{body}");
    }
    let r = app
        .patch("/v1/tenants/tnt_nope", json!({"plan": "trial"}))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let t: Value = app
        .get(&format!("/v1/tenants/{tenant}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (t["plan"].as_str(), t["name"].as_str()),
        (Some("trial"), Some("Back"))
    );
    app.stop().await;
}

/// Moves a tenant's trial end to `at_ms` behind keygate's back (a trial of days cannot be
/// waited for in a test).
async fn set_trial_end(db_url: &str, tenant: &str, at_ms: i64) {
    set_time(db_url, tenant, "trial_ends_at", at_ms).await;
}

/// Sets a tenant's time `column` (`trial_ends_at`, `plan_started_at`) to `at_ms`.
async fn set_time(db_url: &str, tenant: &str, column: &str, at_ms: i64) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(db_url).await.expect("database");
    let n = sqlx::query(&format!("UPDATE tenants SET {column} = $1 WHERE id = $2"))
        .bind(at_ms)
        .bind(tenant)
        .execute(&pool)
        .await
        .expect("update")
        .rows_affected();
    assert_eq!(n, 1);
    pool.close().await;
}

async fn tenant_of(app: &TestApp, tenant: &str) -> Value {
    app.get(&format!("/v1/tenants/{tenant}"))
        .await
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn a_trial_warns_three_days_before_and_then_becomes_its_next_plan() {
    let app = TestApp::spawn_with(accounts).await;
    let (ut, tenant) = account(&app, "203.0.113.6", "c@example.com").await;
    let now = keygate_engine::clock::now_ms();
    let warned = || async {
        let v: Value = app.get("/v1/alerts").await.json().await.expect("json");
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["kind"] == "tenant.trial_ending"
                    && a["tenant_id"].as_str() == Some(tenant.as_str())
            })
            .count()
    };
    // Four days out: no warning (the check runs every second; let it run twice).
    set_trial_end(&app.db_url(), &tenant, now + 4 * 86_400_000).await;
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(warned().await, 0, "warned more than three days before");
    set_trial_end(&app.db_url(), &tenant, now + 86_400_000).await;
    eventually(|| async { warned().await > 0 }).await;
    // Two more rounds of the check: still one warning for this trial end.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(warned().await, 1, "warned once");
    set_trial_end(&app.db_url(), &tenant, now - 1).await;
    eventually(|| async { tenant_of(&app, &tenant).await["plan"] == "free" }).await;
    let t = tenant_of(&app, &tenant).await;
    assert_eq!(t["trial_ends_at"], Value::Null);
    // 1,000 left of the trial's grant plus the free plan's 1,000 (less the calls made).
    assert_eq!(t["credits"], 2000);
    assert_eq!(thing(&app, &ut).await.status(), StatusCode::OK);
    eventually(|| async {
        let events = actions(&app, &tenant).await;
        events
            .iter()
            .filter(|a| *a == "tenant.plan_changed")
            .count()
            == 1
    })
    .await;
    app.stop().await;
}

/// Two nodes on PostgreSQL and Redis: a plan change on one reaches keys cached on the other at
/// once, and a trial ends once although both nodes look for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_a_plan_change_at_once_and_end_a_trial_once() {
    let redis =
        std::env::var("KEYGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("kgacc{}", keygate_engine::ids::random_base62(8));
    let (r, p) = (redis.clone(), prefix.clone());
    let a = TestApp::spawn_postgres(move |c| {
        accounts(c);
        c.redis_url = r;
        c.redis_prefix = p;
    })
    .await;
    let b = TestApp::spawn_on(a.db_url(), move |c| {
        accounts(c);
        c.redis_url = redis;
        c.redis_prefix = prefix;
    })
    .await
    .with_root(a.root.clone());
    let (ut, tenant) = account(&a, "203.0.113.7", "d@example.com").await;
    assert_eq!(thing(&b, &ut).await.status(), StatusCode::OK, "cached on b");
    let r = a
        .patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "noapi"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let changed = Instant::now();
    while thing(&b, &ut).await.status() == StatusCode::OK {
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "b still answers 200 a second after the change (the feed would take milliseconds)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "plan change on a refused on b after {:?}",
        changed.elapsed()
    );
    assert_eq!(
        thing(&b, &ut).await.headers()["x-keygate-code"],
        "PLAN_FEATURE"
    );

    a.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "trial"}))
        .await;
    set_trial_end(&a.db_url(), &tenant, keygate_engine::clock::now_ms() - 1).await;
    eventually(|| async { tenant_of(&b, &tenant).await["plan"] == "free" }).await;
    let count = || async {
        let events = actions(&a, &tenant).await;
        events
            .iter()
            .filter(|e| *e == "tenant.plan_changed")
            .count()
    };
    eventually(|| async { count().await >= 3 }).await;

    // A monthly plan started two months ago: the pool is refilled to 500, once.
    a.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "monthly"}))
        .await;
    let two_months = 62 * 86_400_000;
    set_time(
        &a.db_url(),
        &tenant,
        "plan_started_at",
        keygate_engine::clock::now_ms() - two_months,
    )
    .await;
    eventually(|| async { tenant_of(&b, &tenant).await["credits"] == 500 }).await;
    let refills = || async {
        let events = actions(&a, &tenant).await;
        events
            .iter()
            .filter(|e| *e == "tenant.credits_refilled")
            .count()
    };
    eventually(|| async { refills().await >= 1 }).await;
    // What must not happen cannot be waited for: give both nodes (checking every second) two
    // more rounds, then count again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(count().await, 4, "noapi, trial, free once, monthly");
    assert_eq!(refills().await, 1, "one refill for the month, on one node");
    assert_eq!(tenant_of(&a, &tenant).await["credits"], 500);
    a.stop().await;
    b.stop().await;
}

/// The value of cookie `name` set by `r`.
fn set_cookie(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .expect("cookie")
        .to_owned()
}

/// The page a person fills in: the sign-in page offers it, and it shows the first key once
/// with a command that works as shown.
#[tokio::test]
async fn the_sign_up_page_shows_the_first_key_once_with_a_working_first_request() {
    let app = TestApp::spawn_with(accounts).await;
    let login = app
        .client
        .get(app.url("/dashboard/login"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("page");
    assert!(
        login.contains("href=\"/dashboard/signup\""),
        "linked from sign-in"
    );
    let page = app
        .client
        .get(app.url("/dashboard/signup"))
        .send()
        .await
        .expect("request");
    let cookie = set_cookie(&page, "kg_dash_csrf");
    let csrf = csrf_of(&page.text().await.expect("page"));
    let submit = |form: Vec<(&'static str, String)>, cookie: String| {
        app.client
            .post(app.url("/dashboard/signup"))
            .header("Cookie", format!("kg_dash_csrf={cookie}"))
            .header("X-Forwarded-For", "203.0.113.30")
            .form(&form)
    };
    // A weak password: the form comes back with the reason and what was typed, minus the
    // password.
    let r = submit(
        vec![
            ("csrf", csrf.clone()),
            ("email", "eve@example.com".into()),
            ("password", "password123".into()),
            ("organisation", "<b>Eve</b> & Co".into()),
        ],
        cookie.clone(),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let again = r.text().await.expect("page");
    assert!(again.contains("too easy to guess"), "{again}");
    assert!(
        again.contains("value=\"&lt;b&gt;Eve&lt;/b&gt; &amp; Co\""),
        "escaped: {again}"
    );
    assert!(!again.contains("password123"));
    // A forged form (no matching cookie) makes nothing.
    let r = submit(
        vec![
            ("csrf", "forged".into()),
            ("email", "eve@example.com".into()),
            ("password", PASSWORD.into()),
        ],
        cookie.clone(),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let r = submit(
        vec![
            ("csrf", csrf),
            ("email", "eve@example.com".into()),
            ("password", PASSWORD.into()),
            ("organisation", "Eve & Co".into()),
        ],
        cookie,
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["cache-control"], "no-store");
    // The new owner is signed in: the page sets a session cookie that opens their keys.
    let session = set_cookie_value(&r, "kg_dash").expect("a session cookie");
    let done = r.text().await.expect("page");
    assert!(done.contains("You are signed in"), "{done}");
    let keys = app
        .client
        .get(app.url("/dashboard/keys"))
        .header("Cookie", format!("kg_dash={session}"))
        .send()
        .await
        .expect("keys page");
    assert_eq!(keys.status(), StatusCode::OK);
    assert!(keys.text().await.expect("page").contains("first key"));
    let key = done
        .split("id=\"secret\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the key on the page")
        .to_owned();
    assert!(key.starts_with("kg_ut_"), "{key}");
    let curl = done
        .split("id=\"curl\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the first request on the page")
        .replace("&#x27;", "'")
        .replace("&#39;", "'");
    let expected = format!(
        "curl -H 'Authorization: Bearer {key}' http://{}/v1/things/",
        app.addr
    );
    assert_eq!(curl, expected);
    // The command as shown: the route it names accepts the key.
    let r = app
        .auth(Some(&key), &[("X-Original-URI", "/v1/things/")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

/// A plan with a shorter scope list narrows the keys its users made before it started.
#[tokio::test]
async fn a_plan_with_fewer_scopes_narrows_the_keys_made_before_it() {
    let app = TestApp::spawn_with(accounts).await;
    let (ut, tenant) = account(&app, "203.0.113.40", "f@example.com").await;
    assert_eq!(thing(&app, &ut).await.status(), StatusCode::OK);
    let r = app
        .patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "narrow"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = thing(&app, &ut).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.headers()["x-keygate-code"], "FORBIDDEN_SCOPE");
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "trial"}))
        .await;
    assert_eq!(
        thing(&app, &ut).await.status(),
        StatusCode::OK,
        "the key's own scopes are kept"
    );
    app.stop().await;
}

/// `POST /v1/keys` as `key`: status and body.
async fn make(app: &TestApp, key: &str, body: Value) -> (StatusCode, Value) {
    let r = app
        .as_key(key)
        .post(app.url("/v1/keys"))
        .json(&body)
        .send()
        .await
        .expect("create");
    (r.status(), r.json().await.expect("json"))
}

/// `PATCH /v1/keys/{id}` as `key`: status and body.
async fn change(app: &TestApp, key: &str, id: &str, body: Value) -> (StatusCode, Value) {
    let r = app
        .client
        .patch(app.url(&format!("/v1/keys/{id}")))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("patch");
    (r.status(), r.json().await.expect("json"))
}

#[tokio::test]
async fn users_make_their_own_keys_within_the_plan_and_cannot_break_its_ceilings() {
    let app = TestApp::spawn_with(accounts).await;
    let (_, tenant) = account(&app, "203.0.113.50", "own@example.com").await;
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "capped"}))
        .await;
    let users: Value = app
        .get(&format!("/v1/users?tenant_id={tenant}"))
        .await
        .json()
        .await
        .expect("users");
    let owner_id = users["data"][0]["id"].as_str().expect("owner").to_owned();
    // A member of the account, made by the operator.
    let r = app
        .post(
            "/v1/users",
            json!({"email": "mem@example.com", "tenant_id": tenant, "plan": "capped"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let member_id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // What a password session holds: keys:read and keys:write, and the plan's API scopes.
    let token_of = |user: &str| {
        json!({"kind": "ut", "name": "session-like", "tenant_id": tenant, "user_id": user,
               "scopes": ["keys:read", "keys:write", "things:read"]})
    };
    let (owner, owner_key) = app.create_key(token_of(&owner_id)).await;
    let (member, _) = app.create_key(token_of(&member_id)).await;
    // Live keys now: the first key and these two (max_keys is 5).

    // Nothing asked beyond scopes: the plan's ceilings become the key's limits.
    let (st, v) = make(
        &app,
        &member,
        json!({"kind": "ut", "name": "mine", "scopes": ["things:read"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mine = v["id"].as_str().expect("id").to_owned();
    assert_eq!(v["user_id"], member_id.as_str());
    assert_eq!(v["budget"]["limit"], 500);
    assert_eq!(v["rate_limit"], json!({"limit": 60, "window_seconds": 60}));
    let expires = keygate_engine::clock::parse_rfc3339(v["expires_at"].as_str().expect("expiry"))
        .expect("time");
    let in_30_days = keygate_engine::clock::now_ms() + 30 * 86_400_000;
    assert!((in_30_days - expires).abs() < 60_000, "{v}");

    // Each ceiling, tried from above: refused, and nothing made.
    let before = app.key_count().await;
    for (body, code) in [
        (
            json!({"kind": "ut", "name": "x", "scopes": ["things:read"], "budget": 501}),
            "INVALID_REQUEST",
        ),
        (
            json!({"kind": "ut", "name": "x", "scopes": ["things:read"], "ttl_seconds": 31 * 86_400}),
            "INVALID_REQUEST",
        ),
        (
            json!({"kind": "ut", "name": "x", "scopes": ["things:read"], "rate_limit": {"limit": 2, "window_seconds": 1}}),
            "INVALID_REQUEST",
        ),
        (
            json!({"kind": "ut", "name": "x", "scopes": ["admin:all"]}),
            "FORBIDDEN_SCOPE",
        ),
        (
            json!({"kind": "sk", "name": "x", "scopes": ["things:read"]}),
            "FORBIDDEN_SCOPE",
        ),
        (
            json!({"kind": "ut", "name": "x", "scopes": ["things:read"], "user_id": owner_id}),
            "NOT_FOUND",
        ),
        (
            json!({"kind": "ut", "name": "x", "scopes": ["things:read"], "metadata": {"dashboard_session": true}}),
            "INVALID_REQUEST",
        ),
    ] {
        let (st, v) = make(&app, &member, body.clone()).await;
        assert!(st.is_client_error(), "{body}: {st} {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
    }
    // The owner may make an sk only where the plan has sk_keys.
    let (st, v) = make(
        &app,
        &owner,
        json!({"kind": "sk", "name": "x", "scopes": ["things:read"]}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("PLAN_FEATURE")),
        "{v}"
    );
    assert_eq!(app.key_count().await, before);

    // The fifth live key fits; a sixth does not.
    let (st, v) = make(
        &app,
        &owner,
        json!({"kind": "pk", "name": "widget", "preset": "aidemo", "scopes": ["things:read"]}),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a preset's budget of 2000 passes the plan's: {v}"
    );
    let (st, v) = make(
        &app,
        &owner,
        json!({"kind": "pk", "name": "widget", "scopes": ["things:read"],
                                            "allowed_origins": ["https://app.example"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["budget"]["limit"], 500);
    let (st, v) = make(
        &app,
        &owner,
        json!({"kind": "ut", "name": "sixth", "scopes": ["things:read"]}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("PLAN_FEATURE")),
        "{v}"
    );

    // A member sees and changes its own keys only; the owner sees the account's.
    let listed = |key: String| {
        let app = &app;
        async move {
            let v: Value = app
                .as_key(&key)
                .get(app.url("/v1/keys?limit=100"))
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("json");
            v["data"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|k| k["id"].as_str().expect("id").to_owned())
                .collect::<Vec<_>>()
        }
    };
    let member_sees = listed(member.clone()).await;
    assert!(
        member_sees.contains(&mine)
            && !member_sees
                .iter()
                .any(|k| k == owner_key["id"].as_str().expect("id"))
    );
    assert!(
        listed(owner.clone()).await.contains(&mine),
        "the owner sees a member's key"
    );
    let owners = owner_key["id"].as_str().expect("id");
    let (st, _) = change(&app, &member, owners, json!({"budget": 1})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A change by a user only tightens; loosening what the key has is refused, unchanged.
    for loosen in [
        json!({"budget": 501}),
        json!({"budget": null}),
        json!({"expires_at": null}),
        json!({"rate_limit": null}),
        json!({"rate_limit": {"limit": 600, "window_seconds": 60}}),
        json!({"scopes": ["things:read", "admin:all"]}),
    ] {
        let (st, v) = change(&app, &member, &mine, loosen.clone()).await;
        assert!(st.is_client_error(), "{loosen}: {st} {v}");
    }
    let (st, v) = change(
        &app,
        &member,
        &mine,
        json!({"budget": 100, "rate_limit": {"limit": 10, "window_seconds": 60}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["budget"]["limit"], 100);
    // An admin's key made for the member: the member cannot loosen it either.
    let (_, admin_made) = app
        .create_key(
            json!({"kind": "ut", "name": "by admin", "tenant_id": tenant, "user_id": member_id,
                           "scopes": ["things:read"], "budget": 50}),
        )
        .await;
    let id = admin_made["id"].as_str().expect("id");
    let (st, _) = change(&app, &member, id, json!({"budget": 60})).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let k: Value = app
        .get(&format!("/v1/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(k["budget"]["limit"], 50);
    app.stop().await;
}

#[tokio::test]
async fn a_signed_in_user_makes_a_key_in_the_dashboard_and_sessions_do_not_count_as_keys() {
    let app = TestApp::spawn_with(accounts).await;
    let (_, tenant) = account(&app, "203.0.113.60", "dash@example.com").await;
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "capped"}))
        .await;
    // Six sign-ins: six session keys, none of them counted against max_keys (5).
    let mut s = support::Session::new();
    for _ in 0..6 {
        s = support::Session::new();
        let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
        let req = s.http.post(app.url("/dashboard/login")).form(&[
            ("csrf", csrf_of(&page).as_str()),
            ("method", "password"),
            ("tenant", tenant.as_str()),
            ("email", "dash@example.com"),
            ("password", PASSWORD),
        ]);
        let (st, _, _) = s.send(req).await;
        assert_eq!(st, StatusCode::SEE_OTHER);
    }
    let (_, _, keys) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    let csrf = csrf_of(&keys);
    let http = s.http.clone();
    let form = |name: &'static str, budget: &'static str, csrf: String| {
        http.post(app.url("/dashboard/keys")).form(&[
            ("csrf", csrf.as_str()),
            ("name", name),
            ("kind", "ut"),
            ("scopes", "things:read"),
            ("budget", budget),
        ])
    };
    let req = form("too rich", "9999", csrf.clone());
    let (st, _, page) = s.send(req).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        page.contains("budget exceeds what your plan allows"),
        "{page}"
    );
    let req = form("from the dashboard", "100", csrf);
    let (st, _, page) = s.send(req).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let key = page
        .split("kg_ut_")
        .nth(1)
        .and_then(|rest| rest.split(['<', '"', ' ']).next())
        .map(|k| format!("kg_ut_{k}"))
        .expect("the new key on the page");
    assert_eq!(thing(&app, &key).await.status(), StatusCode::OK);

    // A session's key never leaves its cookie: no user token rotates or changes it.
    let sessions: Value = app
        .get(&format!(
            "/v1/keys?tenant_id={tenant}&name=dashboard%20session"
        ))
        .await
        .json()
        .await
        .expect("json");
    let session_key = &sessions["data"][0];
    let (owner, _) = app
        .create_key(json!({"kind": "ut", "name": "owner", "tenant_id": tenant,
                           "user_id": session_key["user_id"], "scopes": ["keys:write", "things:read"]}))
        .await;
    let id = session_key["id"].as_str().expect("id");
    let r = app
        .as_key(&owner)
        .post(app.url(&format!("/v1/keys/{id}/rotate")))
        .send()
        .await
        .expect("rotate");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (st, _) = change(&app, &owner, id, json!({"name": "mine now"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    app.stop().await;
}

#[tokio::test]
async fn oauth_clients_and_an_owners_sk_keys_need_their_plan_features() {
    let app = TestApp::spawn_with(accounts).await;
    let (_, tenant) = account(&app, "203.0.113.70", "feat@example.com").await;
    let (admin, _) = app
        .create_key(
            json!({"kind": "sk", "name": "tenant admin", "tenant_id": tenant,
                           "scopes": ["oauth:write", "oauth:read", "things:read"]}),
        )
        .await;
    let client = || {
        app.as_key(&admin)
            .post(app.url("/v1/oauth/clients"))
            .json(&json!({"name": "app", "type": "public",
                          "redirect_uris": ["https://app.example/cb"], "scopes": ["things:read"]}))
            .send()
    };
    // The trial has every feature.
    let r = client().await.expect("create");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.expect("body")
    );
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "nohooks"}))
        .await;
    let r = client().await.expect("create");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "PLAN_FEATURE");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("oauth"),
        "{v}"
    );

    // The owner's own sk key: on the trial (every feature), yes; a member never.
    let (_, tenant) = account(&app, "203.0.113.71", "sk@example.com").await;
    let users: Value = app
        .get(&format!("/v1/users?tenant_id={tenant}"))
        .await
        .json()
        .await
        .expect("users");
    let owner_id = users["data"][0]["id"].as_str().expect("owner").to_owned();
    let (owner, _) = app
        .create_key(
            json!({"kind": "ut", "name": "o", "tenant_id": tenant, "user_id": owner_id,
                           "scopes": ["keys:write", "things:read"]}),
        )
        .await;
    let (st, v) = make(
        &app,
        &owner,
        json!({"kind": "sk", "name": "server", "scopes": ["things:read"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["kind"].as_str(), v["user_id"].as_str()),
        (Some("sk"), None)
    );
    app.stop().await;
}

/// The value a response sets for cookie `name`, if it sets one.
fn set_cookie_value(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get_all("set-cookie").iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let (k, rest) = v.split_once('=')?;
        let value = rest.split(';').next()?;
        (k == name && !value.is_empty()).then(|| value.to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_makes_never_pass_max_keys() {
    parallel_makes(TestApp::spawn_with(accounts).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_makes_never_pass_max_keys_on_postgres() {
    parallel_makes(TestApp::spawn_postgres(accounts).await).await;
}

async fn parallel_makes(app: TestApp) {
    let (_, tenant) = account(&app, "203.0.113.80", "race@example.com").await;
    app.patch(&format!("/v1/tenants/{tenant}"), json!({"plan": "capped"}))
        .await;
    let users: Value = app
        .get(&format!("/v1/users?tenant_id={tenant}"))
        .await
        .json()
        .await
        .expect("users");
    let (owner, _) = app
        .create_key(json!({"kind": "ut", "name": "owner", "tenant_id": tenant,
                           "user_id": users["data"][0]["id"], "scopes": ["keys:write", "things:read"]}))
        .await;
    // Live: the first key and this one; max_keys is 5, so 3 of 12 at once may pass.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (client, url, owner) = (app.client.clone(), app.url("/v1/keys"), owner.clone());
        set.spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(owner)
                .json(&json!({"kind": "ut", "name": format!("k{i}"), "scopes": ["things:read"]}))
                .send()
                .await
                .expect("create");
            (r.status(), r.json::<Value>().await.expect("json"))
        });
    }
    let answers = set.join_all().await;
    let made = answers
        .iter()
        .filter(|(st, _)| *st == StatusCode::CREATED)
        .count();
    assert_eq!(made, 3, "{answers:?}");
    for (st, v) in answers.iter().filter(|(st, _)| *st != StatusCode::CREATED) {
        assert_eq!(
            (*st, v["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("PLAN_FEATURE")),
            "{v}"
        );
    }
    app.stop().await;
}

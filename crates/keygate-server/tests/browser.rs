//! CORS for publishable keys in a real browser: headless Chromium (Debian's, driven by
//! playwright-core from tests/browser) loads pages from an allowed and a disallowed origin and
//! calls the gateway with `fetch` and a `pk` key (a JSON POST, so Chromium sends a preflight).

mod support;

use keygate_engine::config::RouteConfig;
use serde_json::{json, Value};
use std::path::Path;
use support::{upstream, TestApp};

/// `POST /api/ocr/*` to `upstream`, scope `ocr:read`, cost 1.
fn ocr_route(upstream: String) -> RouteConfig {
    RouteConfig {
        path: "/api/ocr/*".into(),
        methods: vec!["POST".into()],
        upstream: Some(upstream),
        scope: Some("ocr:read".into()),
        cost: 1,
        public: false,
        class: Default::default(),
    }
}

#[tokio::test]
async fn a_browser_page_calls_the_gateway_with_a_publishable_key() {
    let up = upstream::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| {
        c.routes.push(ocr_route(url));
    })
    .await;
    // The pages: a blank document served on 127.0.0.1, reached as two origins.
    let pages = axum::Router::new()
        .fallback(|| async { axum::response::Html("<!doctype html><title>page</title>") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, pages).await;
    });
    let allowed = format!("http://localhost:{port}");
    let other = format!("http://127.0.0.1:{port}");

    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "canvas", "preset": "aidemo", "allowed_origins": [allowed]}))
        .await;
    let (revoked, rec) = app
        .create_key(
            json!({"kind": "pk", "name": "old", "preset": "aidemo", "allowed_origins": [allowed]}),
        )
        .await;
    app.post(
        &format!("/v1/keys/{}/revoke", rec["id"].as_str().expect("id")),
        json!({}),
    )
    .await;

    let gw = app.url("/api/ocr/scan");
    let cfg = json!({"cases": [
        {"name": "allowed", "page": format!("{allowed}/"), "url": gw, "key": pk},
        {"name": "other_origin", "page": format!("{other}/"), "url": gw, "key": pk},
        {"name": "revoked", "page": format!("{allowed}/"), "url": gw, "key": revoked},
    ]});
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "tests/browser/node_modules is missing: run `bash scripts/deps.sh` (npm ci in tests/browser)"
    );
    // Off the test's runtime thread: the servers must keep running while the browser works.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("fetch.mjs")
            .arg(cfg.to_string())
            .current_dir(&dir)
            .output()
    })
    .await
    .expect("task")
    .expect("node runs (is Node.js installed?)");
    assert!(
        out.status.success(),
        "browser driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_slice(&out.stdout).expect("driver prints JSON");

    let ok = &res["allowed"];
    assert_eq!(ok["fetched"], true, "{ok}");
    assert_eq!(ok["status"], 200, "{ok}");
    let body: Value =
        serde_json::from_str(ok["body"].as_str().expect("body")).expect("upstream JSON");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["headers"]["origin"], allowed.as_str());
    assert!(body["headers"].get("authorization").is_none());
    assert_eq!(
        ok["credits"], "1999",
        "exposed headers are readable from the page"
    );
    assert!(ok["ratelimit"]
        .as_str()
        .is_some_and(|s| s.starts_with("\"key\";r=59")));

    let blocked = &res["other_origin"];
    assert_eq!(
        blocked["fetched"], false,
        "a page from another origin must not get an answer: {blocked}"
    );

    let gone = &res["revoked"];
    assert_eq!(gone["fetched"], true, "{gone}");
    assert_eq!(gone["status"], 401);
    let body: Value =
        serde_json::from_str(gone["body"].as_str().expect("body")).expect("JSON refusal");
    assert_eq!(body["error"]["code"], "REVOKED");
    assert_eq!(up.hits(), 1, "only the allowed call reached the upstream");
}

#[tokio::test]
async fn the_dashboard_creates_shows_once_and_revokes_a_key_in_chromium() {
    let up = upstream::spawn().await;
    let url = up.url();
    let app = TestApp::spawn_with(|c| {
        c.routes.push(ocr_route(url));
    })
    .await;
    // Screenshots are test artifacts: target/tmp/dashboard/*.png.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    // A key whose rate window the edit form cannot show (per hour): an edit must keep it.
    let (_, hourly) = app
        .create_key(
            json!({"kind": "sk", "name": "hourly", "scopes": ["ocr:read"],
                           "rate_limit": {"limit": 1000, "window_seconds": 3600}}),
        )
        .await;
    let cfg = json!({
        "base": app.url("").trim_end_matches('/'),
        "root": app.root,
        "gateway": app.url("/api/ocr/scan"),
        "shots": shots.display().to_string(),
        "hourly": hourly["id"],
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("dashboard.mjs")
            .arg(cfg.to_string())
            .current_dir(&dir)
            .output()
    })
    .await
    .expect("task")
    .expect("node runs (is Node.js installed?)");
    assert!(
        out.status.success(),
        "browser driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_slice(&out.stdout).expect("driver prints JSON");
    assert!(res.get("error").is_none(), "{}", res["error"]);
    assert_eq!(
        res["steps"],
        json!(["signed in", "created", "revoked", "signed out"])
    );
    // The session cookie cannot be read by page scripts and is not sent cross-site.
    assert_eq!(res["cookie"]["httpOnly"], true, "{}", res["cookie"]);
    assert_eq!(res["cookie"]["sameSite"], "Lax");
    // Shown once, with the warning, and the key worked until it was revoked.
    let created = res["createdText"].as_str().unwrap_or("");
    assert!(created.contains("You will not see it again"), "{created}");
    assert!(res["keyPrefix"]
        .as_str()
        .is_some_and(|p| p.starts_with("kg_pk_")));
    assert_eq!(res["before"]["status"], 200, "{}", res["before"]);
    assert_eq!(res["after"]["status"], 401, "{}", res["after"]);
    assert_eq!(res["after"]["code"], "REVOKED");
    assert_eq!(up.hits(), 1);
    let before = res["keyPageBefore"].as_str().unwrap_or("");
    assert!(
        before.contains("Budget: 1 of 2000 credits spent"),
        "{before}"
    );
    assert!(before.contains("allowed (1)"), "the usage chart: {before}");
    // Both decisions and the revocation in the audit view.
    let audit = res["audit"].as_str().unwrap_or("");
    for needle in ["key.created", "key.revoked", "VALID", "REVOKED"] {
        assert!(
            audit.contains(needle),
            "{needle} missing from the audit view:\n{audit}"
        );
    }
    // The plaintext appears on the "created" page only.
    assert_eq!(res["leaks"], 0, "the key was shown again");
    assert_eq!(res["forgedStatus"], 403, "a form without the CSRF token");
    assert_eq!(
        res["afterForgedLogout"], true,
        "a forged sign-out is ignored"
    );
    let hourly = res["hourlyEdited"].as_str().unwrap_or("");
    assert!(
        hourly.contains("hourly (renamed)") && hourly.contains("1000 per 3600 s"),
        "{hourly}"
    );
    let edited = res["keyPageEdited"].as_str().unwrap_or("");
    assert!(
        edited.contains("canvas demo (edited)")
            && edited.contains("60 per 60 s")
            && edited.contains("Budget: 1 of 2000"),
        "{edited}"
    );
    assert!(
        res["narrowOverflow"].as_i64().is_some_and(|o| o <= 0),
        "{}",
        res["narrowOverflow"]
    );
    assert!(res["afterLogout"].is_null(), "{}", res["afterLogout"]);
    for name in [
        "01-sign-in",
        "02-key-created",
        "03-key-page",
        "04-audit",
        "10-keys-narrow",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }
}

/// The 30-second path of docs/accounts.md in Chromium, on `plan` (with email verification
/// when `verify`): the driver's JSON, and the upstream.
async fn thirty_seconds(plan: &str, verify: bool, shots: &str) -> (Value, upstream::Upstream) {
    let up = upstream::spawn().await;
    let smtp = support::smtp::Smtp::start().await;
    let (url, smtp_url, plan_name) = (up.url(), smtp.url(), plan.to_owned());
    let app = TestApp::spawn_with(move |c| {
        c.routes.push(ocr_route(url));
        c.signup.enabled = true;
        c.signup.plan = plan_name;
        c.signup.verify_email = verify;
        c.smtp.url = smtp_url;
        // A product that sells the API from Starter: free is the dashboard only.
        c.plans.insert(
            "basic".into(),
            keygate_engine::config::PlanConfig {
                features: Some(vec![]),
                ..Default::default()
            },
        );
    })
    .await;
    let pages = axum::Router::new()
        .fallback(|| async { axum::response::Html("<!doctype html><title>site</title>") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, pages).await;
    });
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join(shots);
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let cfg = json!({
        "base": app.url("").trim_end_matches('/'),
        "gateway": app.url("/api/ocr/scan"),
        "pageOrigin": format!("http://localhost:{port}"),
        "mailDir": smtp.dir().display().to_string(),
        "shots": shots.display().to_string(),
        "email": "ada@example.com",
        "password": "plum-violin-87-harbour",
        "verify": verify,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("signup.mjs")
            .arg(cfg.to_string())
            .current_dir(&dir)
            .output()
    })
    .await
    .expect("task")
    .expect("node runs (is Node.js installed?)");
    assert!(
        out.status.success(),
        "browser driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: Value = serde_json::from_slice(&out.stdout).expect("driver prints JSON");
    assert!(res.get("error").is_none(), "{}", res["error"]);
    app.stop().await;
    drop(smtp);
    (res, up)
}

#[tokio::test]
async fn register_verify_make_a_key_and_call_the_api_from_a_page_in_chromium() {
    let (res, up) = thirty_seconds("trial", true, "signup").await;
    assert_eq!(
        res["steps"],
        json!(["signed up", "verified", "key created", "called"])
    );
    assert_eq!(res["firstKeyPrefix"], "kg_ut_");
    assert_eq!(res["verifyStatus"], 200);
    assert_eq!(res["notice"], Value::Null, "a verified trial has the API");
    assert!(
        res["plan"]
            .as_str()
            .is_some_and(|p| p.contains("Plan: trial")),
        "{res}"
    );
    assert_eq!(res["keyPrefix"], "kg_pk_");
    assert_eq!(res["call"]["status"], 200, "{res}");
    assert_eq!(up.hits(), 1);
    // A figure for the notes, not a target: the flow's wall-clock time in this browser.
    eprintln!("the 30-second path took {} ms", res["ms"]);
}

#[tokio::test]
async fn on_a_plan_without_the_api_the_first_call_says_why_and_the_dashboard_explains_it() {
    let (res, up) = thirty_seconds("basic", false, "signup-no-api").await;
    assert_eq!(res["steps"], json!(["signed up", "key created", "called"]));
    assert_eq!(res["call"]["status"], 403, "{res}");
    let body: Value =
        serde_json::from_str(res["call"]["body"].as_str().expect("body")).expect("JSON refusal");
    assert_eq!(body["error"]["code"], "PLAN_FEATURE");
    let notice = res["notice"].as_str().unwrap_or_default();
    assert!(
        notice.contains("does not include API access") && notice.contains("starter"),
        "{notice}"
    );
    assert!(
        res["plan"]
            .as_str()
            .is_some_and(|p| p.contains("the dashboard only")),
        "{res}"
    );
    assert_eq!(up.hits(), 0);
}

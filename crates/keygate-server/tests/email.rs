//! Email through a real SMTP server (aiosmtpd): an account's keys answer `ACCOUNT_UNVERIFIED`
//! until the emailed link is opened (once); a registered address gets the same answer as a
//! new one and its owner an email; a password reset by email works once, within 30 minutes,
//! and ends every session; sign-up and reset requests are limited per client network on
//! every node sharing Redis.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::smtp::{link_in, token_of, Smtp};
use support::{csrf_of, error_code, eventually, thing, Session, TestApp};

const PASSWORD: &str = "plum-violin-87-harbour";

/// Sign-up on, with verification, email to `smtp`, and a `things` route.
fn with_email(smtp: &Smtp, verify: bool) -> impl FnOnce(&mut keygate_server::Config) {
    let url = smtp.url();
    move |c: &mut keygate_server::Config| {
        c.signup.enabled = true;
        c.signup.verify_email = verify;
        c.signup.per_ip_per_hour = 3;
        c.smtp.url = url;
        c.smtp.from = "keygate <no-reply@keygate.test>".into();
        c.routes.push(support::things_route());
    }
}

async fn sign_up(app: &TestApp, from: &str, email: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/signup"))
        .header("X-Forwarded-For", from)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect("request")
}

/// A sign-up's answer, as JSON.
async fn signed_up(app: &TestApp, from: &str, email: &str) -> Value {
    sign_up(app, from, email).await.json().await.expect("json")
}

async fn open(app: &TestApp, path: &str) -> reqwest::Response {
    app.client.get(app.url(path)).send().await.expect("request")
}

#[tokio::test]
async fn an_accounts_keys_answer_account_unverified_until_the_emailed_link_is_opened_once() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, true)).await;
    let r = sign_up(&app, "203.0.113.1", "ada@example.com").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    let key = v["key"].as_str().expect("key").to_owned();
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    assert_eq!(v["account"]["verified"], false);
    assert_eq!(v["user"]["verified"], false);

    // The API refuses the key; keygate's own API, which the dashboard calls with a session
    // key of the user, does not: the owner signs in and sees why.
    let r = thing(&app, &key).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "ACCOUNT_UNVERIFIED");
    let (st, mut session) = dashboard_sign_in(&app, &tenant, "ada@example.com", PASSWORD).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let (st, _, keys) = session
        .send(session.http.get(app.url("/dashboard/keys")))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(keys.contains("first key"), "{keys}");

    let mail = smtp.nth_to("ada@example.com", 1).await;
    assert_eq!(mail["subject"], "Verify your email address");
    assert_eq!(mail["from"], "no-reply@keygate.test");
    let link = link_in(&mail, "/v1/signup/verify?token=");
    let token = token_of(&link);
    // The store keeps the token's hash only.
    let raw = std::fs::read(&app.db_path).expect("db");
    assert!(
        !raw.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is in the database file"
    );

    // A wrong or truncated token changes nothing.
    for (bad, status) in [
        ("/v1/signup/verify?token=nope".to_owned(), 422),
        (format!("/v1/signup/verify?token={}", &token[..20]), 422),
        (format!("/v1/signup/verify?token={}", "x".repeat(200)), 422),
        ("/v1/signup/verify".to_owned(), 400),
    ] {
        let r = open(&app, &bad).await;
        assert_eq!(r.status().as_u16(), status, "{bad}");
        assert_eq!(error_code(r).await, "INVALID_REQUEST", "{bad}");
    }
    assert_eq!(
        error_code(thing(&app, &key).await).await,
        "ACCOUNT_UNVERIFIED"
    );

    // Opening the link: the key works at once (it was cached as unverified).
    let r = open(&app, &link).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["user"]["email"], "ada@example.com");
    assert_eq!(v["user"]["verified"], true);
    assert_eq!(thing(&app, &key).await.status(), StatusCode::OK);
    let t: Value = app
        .get(&format!("/v1/tenants/{tenant}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(t["verified"], true);

    // Once only.
    let r = open(&app, &link).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let verified = || async {
        let audit: Value = app
            .get(&format!("/v1/audit?tenant_id={tenant}&limit=100"))
            .await
            .json()
            .await
            .expect("json");
        audit["data"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["action"] == "user.verified")
            .count()
    };
    eventually(|| async { verified().await > 0 }).await;
    assert_eq!(verified().await, 1);
}

#[tokio::test]
async fn an_expired_verification_link_does_not_work() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, true)).await;
    let v: Value = signed_up(&app, "203.0.113.1", "bo@example.com").await;
    let key = v["key"].as_str().expect("key").to_owned();
    let link = link_in(&smtp.nth_to("bo@example.com", 1).await, "/v1/signup/verify");
    let pool = sqlx::SqlitePool::connect(&app.db_url()).await.expect("db");
    sqlx::query("UPDATE email_tokens SET expires_at = 1")
        .execute(&pool)
        .await
        .expect("expire");
    assert_eq!(
        open(&app, &link).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        error_code(thing(&app, &key).await).await,
        "ACCOUNT_UNVERIFIED"
    );
}

#[tokio::test]
async fn a_registered_address_gets_the_new_address_answer_and_its_owner_an_email() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, false)).await;
    let first = sign_up(&app, "203.0.113.1", "cy@example.com").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let again = sign_up(&app, "203.0.113.2", "Cy@Example.com").await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let v: Value = again.json().await.expect("json");
    assert_eq!(v, json!({"account": null, "user": null, "key": null}));
    // Without verification no email goes to a new address; the owner hears of the attempt.
    let mail = smtp.nth_to("cy@example.com", 1).await;
    assert_eq!(
        mail["subject"],
        "Someone tried to sign up with your address"
    );
    let text = mail["text"].as_str().expect("text");
    assert!(text.contains("/dashboard/forgot"), "{text}");
    assert!(!text.contains(PASSWORD));
    assert_eq!(smtp.to("cy@example.com").len(), 1);
}

/// Signs `email` in to the dashboard of organisation `tenant` with `password`.
async fn dashboard_sign_in(
    app: &TestApp,
    tenant: &str,
    email: &str,
    password: &str,
) -> (StatusCode, Session) {
    let mut s = Session::new();
    let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    let req = s.http.post(app.url("/dashboard/login")).form(&[
        ("csrf", csrf_of(&page).as_str()),
        ("method", "password"),
        ("tenant", tenant),
        ("email", email),
        ("password", password),
    ]);
    let (st, _, _) = s.send(req).await;
    (st, s)
}

#[tokio::test]
async fn a_password_reset_link_works_once_within_30_minutes_and_ends_every_session() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, false)).await;
    let v: Value = signed_up(&app, "203.0.113.1", "di@example.com").await;
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    let api_key = v["key"].as_str().expect("key").to_owned();
    let (st, mut session) = dashboard_sign_in(&app, &tenant, "di@example.com", PASSWORD).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let (st, _, _) = session
        .send(session.http.get(app.url("/dashboard/keys")))
        .await;
    assert_eq!(st, StatusCode::OK);

    // An unknown address gets the same answer, and no email.
    for email in ["nobody@example.com", "di@example.com"] {
        let r = app
            .client
            .post(app.url("/v1/password/forgot"))
            .json(&json!({ "email": email }))
            .send()
            .await
            .expect("forgot");
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{email}");
        assert_eq!(r.text().await.expect("body"), "");
    }
    let r = app
        .client
        .post(app.url("/v1/password/forgot"))
        .json(&json!({"email": "not an address"}))
        .send()
        .await
        .expect("forgot");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mail = smtp.nth_to("di@example.com", 1).await;
    assert_eq!(mail["subject"], "Reset your password");
    let link = link_in(&mail, "/dashboard/reset?token=");
    let token = token_of(&link);
    assert!(smtp.to("nobody@example.com").is_empty());

    // The link's page holds the token in its form and is kept by no cache.
    let r = open(&app, &link).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    assert!(r.text().await.expect("page").contains(&token));

    // A weak password is refused and does not spend the link.
    let reset = |password: &'static str, token: String| {
        app.client
            .post(app.url("/v1/password/reset"))
            .json(&json!({"token": token, "password": password}))
            .send()
    };
    let r = reset("password123", token.clone()).await.expect("reset");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = reset("wren-copper-42-lantern", token.clone())
        .await
        .expect("reset");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = reset("another-wren-43-lantern", token.clone())
        .await
        .expect("reset");
    assert_eq!(
        r.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "a link works once"
    );
    assert_eq!(error_code(r).await, "INVALID_REQUEST");

    // The session ended with its key; the old password no longer signs in, the new one does.
    let (st, loc, _) = session
        .send(session.http.get(app.url("/dashboard/keys")))
        .await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/login")
    );
    assert!(
        !session.cookies.contains_key("kg_dash"),
        "the browser forgets the session"
    );
    let (st, _) = dashboard_sign_in(&app, &tenant, "di@example.com", PASSWORD).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) =
        dashboard_sign_in(&app, &tenant, "di@example.com", "wren-copper-42-lantern").await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    // The account's API key is not a session: it still works.
    assert_eq!(thing(&app, &api_key).await.status(), StatusCode::OK);

    // Three requests an hour from one network (the malformed one counted too).
    let forgot = |from: &'static str| {
        app.client
            .post(app.url("/v1/password/forgot"))
            .header("X-Forwarded-For", from)
            .json(&json!({"email": "di@example.com"}))
            .send()
    };
    let r = forgot("127.0.0.1").await.expect("forgot");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "RATE_LIMITED");
    assert_eq!(smtp.to("di@example.com").len(), 1);

    // A link older than 30 minutes does not work.
    let r = forgot("203.0.113.9").await.expect("forgot");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let late = token_of(&link_in(&smtp.nth_to("di@example.com", 2).await, "token="));
    let pool = sqlx::SqlitePool::connect(&app.db_url()).await.expect("db");
    let (made, expires): (i64, i64) =
        sqlx::query_as("SELECT created_at, expires_at FROM email_tokens WHERE used_at IS NULL")
            .fetch_one(&pool)
            .await
            .expect("link");
    assert_eq!(expires - made, 30 * 60_000);
    sqlx::query("UPDATE email_tokens SET expires_at = 1 WHERE used_at IS NULL")
        .execute(&pool)
        .await
        .expect("expire");
    let r = reset("late-wren-44-lantern", late).await.expect("reset");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn the_dashboard_pages_ask_for_a_link_and_set_the_password() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, false)).await;
    let v: Value = signed_up(&app, "203.0.113.1", "ed@example.com").await;
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    let mut s = Session::new();
    let (_, _, login) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    assert!(login.contains("href=\"/dashboard/forgot\""), "{login}");
    let (st, _, page) = s.send(s.http.get(app.url("/dashboard/forgot"))).await;
    assert_eq!(st, StatusCode::OK);
    let req = s.http.post(app.url("/dashboard/forgot")).form(&[
        ("csrf", csrf_of(&page).as_str()),
        ("email", "ed@example.com"),
    ]);
    let (st, _, done) = s.send(req).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{done}");
    assert!(
        done.contains("an email with a link is on its way"),
        "{done}"
    );
    let link = link_in(&smtp.nth_to("ed@example.com", 1).await, "token=");
    let (st, _, form) = s.send(s.http.get(app.url(&link))).await;
    assert_eq!(st, StatusCode::OK);
    assert!(form.contains("Choose a new password"), "{form}");
    // Without the form's CSRF token nothing changes.
    let req = s.http.post(app.url("/dashboard/reset")).form(&[
        ("csrf", "forged"),
        ("token", token_of(&link).as_str()),
        ("password", "wren-copper-42-lantern"),
    ]);
    let (st, _, form) = s.send(req).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(form.contains("The form expired"), "{form}");
    let req = s.http.post(app.url("/dashboard/reset")).form(&[
        ("csrf", csrf_of(&form).as_str()),
        ("token", token_of(&link).as_str()),
        ("password", "wren-copper-42-lantern"),
    ]);
    let (st, _, done) = s.send(req).await;
    assert_eq!(st, StatusCode::OK, "{done}");
    assert!(done.contains("Your password is changed"), "{done}");
    let (st, _) =
        dashboard_sign_in(&app, &tenant, "ed@example.com", "wren-copper-42-lantern").await;
    assert_eq!(st, StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_sign_up_limit_and_see_a_verification_at_once() {
    let smtp = Smtp::start().await;
    let redis_prefix = format!("kgtest{}", std::process::id());
    let shared = |c: &mut keygate_server::Config, smtp: &Smtp, prefix: &str| {
        with_email(smtp, true)(c);
        c.redis_url = "redis://127.0.0.1:6379".into();
        c.redis_prefix = prefix.to_owned();
    };
    let a = TestApp::spawn_postgres(|c| shared(c, &smtp, &redis_prefix)).await;
    let b = TestApp::spawn_on(a.db_url(), |c| shared(c, &smtp, &redis_prefix)).await;
    let b = b.with_root(a.root.clone());

    // Three sign-ups an hour from one network, wherever they land.
    let from = "198.51.100.7";
    let mut keys = vec![];
    for (i, node) in [&a, &b, &a].into_iter().enumerate() {
        let r = sign_up(node, from, &format!("n{i}@example.com")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.expect("json");
        keys.push(v["key"].as_str().expect("key").to_owned());
    }
    for node in [&b, &a] {
        let r = sign_up(node, from, "n9@example.com").await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.headers().contains_key("retry-after"));
    }
    assert_eq!(
        sign_up(&b, "198.51.100.8", "m@example.com").await.status(),
        StatusCode::CREATED,
        "another network has its own count"
    );

    // B has the key cached as unverified; the link opened on A frees it on B at once.
    let key = &keys[0];
    assert_eq!(error_code(thing(&b, key).await).await, "ACCOUNT_UNVERIFIED");
    let link = link_in(&smtp.nth_to("n0@example.com", 1).await, "token=");
    assert_eq!(open(&a, &link).await.status(), StatusCode::OK);
    let opened = Instant::now();
    loop {
        if thing(&b, key).await.status() == StatusCode::OK {
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(2),
            "node B still refuses the key"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Far under the fallback re-read of an unsynced cache.
    assert!(opened.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn the_owner_invites_a_member_once_and_removing_them_revokes_their_keys() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, false)).await;
    let v: Value = signed_up(&app, "203.0.113.1", "boss@example.com").await;
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    let owner_id = v["user"]["id"].as_str().expect("id").to_owned();
    let manage = json!([
        "users:read",
        "users:write",
        "keys:read",
        "keys:write",
        "things:read"
    ]);
    let (owner, _) = app
        .create_key(json!({"kind": "ut", "name": "owner", "tenant_id": tenant,
                           "user_id": owner_id, "scopes": manage}))
        .await;
    let invite = |key: String, body: Value| {
        let app = &app;
        async move {
            app.as_key(&key)
                .post(app.url("/v1/users/invite"))
                .json(&body)
                .send()
                .await
                .expect("invite")
        }
    };
    for (body, status) in [
        (json!({"email": "not an address"}), 422),
        (json!({"email": "mo@example.com", "role": "owner"}), 422),
        (json!({"email": "boss@example.com"}), 409),
    ] {
        assert_eq!(
            invite(owner.clone(), body.clone()).await.status().as_u16(),
            status,
            "{body}"
        );
    }
    // Three invitations to one address an hour, whatever the account sends elsewhere.
    for _ in 0..3 {
        let r = invite(owner.clone(), json!({"email": "spam@example.com"})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = invite(owner.clone(), json!({"email": "spam@example.com"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Mo is invited twice ("I did not get it"); accepting one spends the other.
    for _ in 0..2 {
        let r = invite(owner.clone(), json!({"email": "Mo@Example.com"})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let spare = link_in(&smtp.nth_to("mo@example.com", 2).await, "token=");
    let mail = smtp.nth_to("mo@example.com", 1).await;
    assert_eq!(mail["subject"], "You are invited to a keygate account");
    assert!(mail["text"]
        .as_str()
        .expect("text")
        .contains("boss@example.com"));
    let link = link_in(&mail, "/dashboard/invite?token=");

    // Accepting: a member of the account, signed in at once.
    let mut s = Session::new();
    let (st, _, form) = s.send(s.http.get(app.url(&link))).await;
    assert_eq!(st, StatusCode::OK);
    let http = s.http.clone();
    let accept = |csrf: String, password: &'static str| {
        http.post(app.url("/dashboard/invite")).form(&[
            ("csrf", csrf.as_str()),
            ("token", token_of(&link).as_str()),
            ("name", "Mo"),
            ("password", password),
        ])
    };
    let req = accept(csrf_of(&form), "password123");
    let (st, _, form) = s.send(req).await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a weak password spends nothing"
    );
    let req = accept(csrf_of(&form), "wren-copper-42-lantern");
    let (st, loc, _) = s.send(req).await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/keys")
    );
    let (st, _, keys) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    assert_eq!(st, StatusCode::OK, "{keys}");
    // Used twice: refused, nothing made.
    let mut again = Session::new();
    let (_, _, form) = again.send(again.http.get(app.url(&link))).await;
    let req = again.http.post(app.url("/dashboard/invite")).form(&[
        ("csrf", csrf_of(&form).as_str()),
        ("token", token_of(&link).as_str()),
        ("password", "another-wren-43-lantern"),
    ]);
    let (st, _, page) = again.send(req).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("used already"), "{page}");
    let (_, _, form) = again.send(again.http.get(app.url(&spare))).await;
    let req = again.http.post(app.url("/dashboard/invite")).form(&[
        ("csrf", csrf_of(&form).as_str()),
        ("token", token_of(&spare).as_str()),
        ("password", "another-wren-43-lantern"),
    ]);
    let (st, _, _) = again.send(req).await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the other invitation was spent"
    );
    let users: Value = app
        .as_key(&owner)
        .get(app.url("/v1/users"))
        .send()
        .await
        .expect("users")
        .json()
        .await
        .expect("json");
    let members: Vec<&Value> = users["data"]
        .as_array()
        .expect("users")
        .iter()
        .filter(|u| u["email"] == "mo@example.com")
        .collect();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["role"], "member");
    let member_id = members[0]["id"].as_str().expect("id").to_owned();

    // A member neither invites nor removes.
    let (member, _) = app
        .create_key(json!({"kind": "ut", "name": "member", "tenant_id": tenant,
                           "user_id": member_id, "scopes": manage}))
        .await;
    let r = invite(member.clone(), json!({"email": "x@example.com"})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let remove = |key: String, id: String| {
        let app = &app;
        async move {
            app.client
                .delete(app.url(&format!("/v1/users/{id}")))
                .bearer_auth(&key)
                .send()
                .await
                .expect("remove")
                .status()
        }
    };
    assert_eq!(
        remove(member.clone(), owner_id.clone()).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        remove(owner.clone(), owner_id.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Another account's owner does not see the member at all.
    let other: Value = signed_up(&app, "203.0.113.2", "rival@example.com").await;
    let (rival, _) = app
        .create_key(
            json!({"kind": "ut", "name": "rival", "tenant_id": other["account"]["id"],
                           "user_id": other["user"]["id"], "scopes": manage}),
        )
        .await;
    assert_eq!(
        remove(rival, member_id.clone()).await,
        StatusCode::NOT_FOUND
    );

    // Removed: the member's keys are revoked at once, the session ends, sign-in fails.
    let (_, member_key) = app
        .create_key(json!({"kind": "ut", "name": "api", "tenant_id": tenant,
                           "user_id": member_id, "scopes": ["things:read"]}))
        .await;
    let api_key = member_key["key"].as_str().expect("key").to_owned();
    assert_eq!(thing(&app, &api_key).await.status(), StatusCode::OK);
    assert_eq!(
        remove(owner.clone(), member_id.clone()).await,
        StatusCode::NO_CONTENT
    );
    let r = thing(&app, &api_key).await;
    assert_eq!(error_code(r).await, "REVOKED");
    let (st, loc, _) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/login")
    );
    let (st, _) =
        dashboard_sign_in(&app, &tenant, "mo@example.com", "wren-copper-42-lantern").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(
        remove(owner.clone(), member_id.clone()).await,
        StatusCode::NOT_FOUND
    );
    let r = app
        .post(
            "/v1/keys",
            json!({"kind": "ut", "name": "late", "tenant_id": tenant, "user_id": member_id,
                   "scopes": ["things:read"]}),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "no key for a removed user"
    );
    let r = app
        .as_key(&owner)
        .get(app.url(&format!("/v1/users/{member_id}")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let removed = || async {
        let v: Value = app
            .get(&format!("/v1/audit?tenant_id={tenant}&action=user.removed"))
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().map_or(0, Vec::len)
    };
    eventually(|| async { removed().await == 1 }).await;

    // Invited again, the same person comes back as the same user, with no old key alive.
    let r = invite(owner.clone(), json!({"email": "mo@example.com"})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let link = link_in(&smtp.nth_to("mo@example.com", 3).await, "token=");
    let mut back = Session::new();
    let (_, _, form) = back.send(back.http.get(app.url(&link))).await;
    let req = back.http.post(app.url("/dashboard/invite")).form(&[
        ("csrf", csrf_of(&form).as_str()),
        ("token", token_of(&link).as_str()),
        ("password", "third-wren-45-lantern"),
    ]);
    let (st, _, _) = back.send(req).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let u: Value = app
        .get(&format!("/v1/users/{member_id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(u["email"], "mo@example.com");
    assert_eq!(error_code(thing(&app, &api_key).await).await, "REVOKED");
}

/// Makes a `ut` key named `name` on the dashboard's keys page, signed in as `s`: the status
/// and page.
async fn make_in_dashboard(app: &TestApp, s: &mut Session, name: &str) -> (StatusCode, String) {
    let (_, _, keys) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    let req = s.http.post(app.url("/dashboard/keys")).form(&[
        ("csrf", csrf_of(&keys).as_str()),
        ("name", name),
        ("kind", "ut"),
        ("scopes", "things:read"),
    ]);
    let (st, _, page) = s.send(req).await;
    (st, page)
}

#[tokio::test]
async fn whoever_signs_up_with_someone_elses_address_keeps_nothing_once_its_owner_resets() {
    let smtp = Smtp::start().await;
    let app = TestApp::spawn_with(with_email(&smtp, true)).await;
    let v: Value = signed_up(&app, "198.51.100.66", "victim@example.com").await;
    let tenant = v["account"]["id"].as_str().expect("id").to_owned();
    let first = v["key"].as_str().expect("key").to_owned();
    assert_eq!(
        error_code(thing(&app, &first).await).await,
        "ACCOUNT_UNVERIFIED"
    );
    // The squatter signs in (reading is allowed) but makes nothing while unverified.
    let (st, mut squat) = dashboard_sign_in(&app, &tenant, "victim@example.com", PASSWORD).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let (st, page) = make_in_dashboard(&app, &mut squat, "backdoor").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("ACCOUNT_UNVERIFIED"), "{page}");

    // The address's real owner asks for a reset: the link is the first proof.
    let r = app
        .client
        .post(app.url("/v1/password/forgot"))
        .json(&json!({"email": "victim@example.com"}))
        .send()
        .await
        .expect("forgot");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mail = smtp
        .to("victim@example.com")
        .into_iter()
        .find(|m| m["subject"] == "Reset your password");
    let mail = match mail {
        Some(m) => m,
        None => smtp.nth_to("victim@example.com", 2).await,
    };
    let token = token_of(&link_in(&mail, "token="));
    let r = app
        .client
        .post(app.url("/v1/password/reset"))
        .json(&json!({"token": token, "password": "wren-copper-42-lantern"}))
        .send()
        .await
        .expect("reset");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Every key made before the proof is gone, the squatter's session with it.
    assert_eq!(error_code(thing(&app, &first).await).await, "REVOKED");
    let (st, loc, _) = squat.send(squat.http.get(app.url("/dashboard/keys"))).await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/login")
    );
    let t: Value = app
        .get(&format!("/v1/tenants/{tenant}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(t["verified"], true, "the reset verified the account");
    let (st, mut owner) = dashboard_sign_in(
        &app,
        &tenant,
        "victim@example.com",
        "wren-copper-42-lantern",
    )
    .await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let (st, page) = make_in_dashboard(&app, &mut owner, "mine").await;
    assert_eq!(st, StatusCode::OK, "the verified owner makes keys: {page}");
}

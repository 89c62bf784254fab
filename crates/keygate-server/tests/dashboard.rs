//! The dashboard's sign-in over plain HTTP (the browser flow is in tests/browser.rs): a user's
//! password sign-in gets a key of the user for the session, limited to the user's own keys and
//! ended at sign-out; keys it must not take are refused, and every page needs a session.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{csrf_of, Session, TestApp};

#[tokio::test]
async fn a_user_signs_in_with_a_password_and_the_session_key_ends_with_the_session() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/users",
            json!({"email": "ada@example.com", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut s = Session::new();
    let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    let csrf = csrf_of(&page);
    let http = s.http.clone();
    let login = |password: &'static str, csrf: String| {
        http.post(app.url("/dashboard/login")).form(&[
            ("csrf", csrf.as_str()),
            ("method", "password"),
            ("tenant", "default"),
            ("email", "Ada@Example.com"),
            ("password", password),
        ])
    };
    let req = login("wrong password", csrf.clone());
    let (st, _, body) = s.send(req).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(body.contains("Wrong organisation, email or password"));
    assert!(!s.cookies.contains_key("kg_dash"));

    let csrf = csrf_of(&body);
    let req = login("correct horse battery", csrf);
    let (st, loc, _) = s.send(req).await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/keys")
    );
    assert!(s.cookies.contains_key("kg_dash"));

    // The session's key is a ut key of the user, listed like any key.
    let (st, _, keys) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        keys.contains("dashboard session of ada@example.com"),
        "{keys}"
    );
    let list: Value = app
        .get("/v1/keys?name=dashboard%20session")
        .await
        .json()
        .await
        .expect("json");
    let key = &list["data"][0];
    assert_eq!(key["kind"], "ut");
    assert_eq!(key["status"], "active");
    assert!(key["user_id"]
        .as_str()
        .is_some_and(|u| u.starts_with("usr_")));
    let id = key["id"].as_str().expect("id").to_owned();

    // Their own keys only: the operator's root key is not listed.
    assert!(!keys.contains(">root<"), "{keys}");
    let root_id = app
        .get("/v1/keys?name=root")
        .await
        .json::<Value>()
        .await
        .expect("json")["data"][0]["id"]
        .as_str()
        .expect("root id")
        .to_owned();
    let (st, _, _) = s
        .send(s.http.get(app.url(&format!("/dashboard/keys/{root_id}"))))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "another's key looks missing");
    // Read-only: making keys (from a preset, or secret ones) and rotating are refused.
    let csrf = csrf_of(&keys);
    for form in [
        vec![("name", "from ada"), ("kind", "pk"), ("preset", "aidemo")],
        vec![
            ("name", "escalate"),
            ("kind", "sk"),
            ("scopes", "keys:write"),
        ],
    ] {
        let mut f = form.clone();
        f.push(("csrf", csrf.as_str()));
        let (st, _, body) = s
            .send(s.http.post(app.url("/dashboard/keys")).form(&f))
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("FORBIDDEN_SCOPE"), "{body}");
    }
    let req = s
        .http
        .post(app.url(&format!("/dashboard/keys/{id}/rotate")))
        .form(&[("csrf", csrf.as_str()), ("grace_seconds", "0")]);
    let (st, _, body) = s.send(req).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    // A key an admin made for the user shows up in the user's list.
    app.create_key(json!({"kind": "ut", "name": "made for ada", "user_id": key["user_id"], "scopes": ["docs:read"]}))
        .await;
    let (_, _, keys) = s.send(s.http.get(app.url("/dashboard/keys"))).await;
    assert!(keys.contains("made for ada"), "{keys}");

    // A sign-out without the CSRF token is ignored; with it, the session key is revoked.
    let req = s
        .http
        .post(app.url("/dashboard/logout"))
        .form(&[("csrf", "forged")]);
    let (_, loc, _) = s.send(req).await;
    assert_eq!(loc, "/dashboard/keys");
    let req = s
        .http
        .post(app.url("/dashboard/logout"))
        .form(&[("csrf", csrf.as_str())]);
    let (_, loc, _) = s.send(req).await;
    assert_eq!(loc, "/dashboard/login");
    assert!(!s.cookies.contains_key("kg_dash"));
    let v: Value = app
        .get(&format!("/v1/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "revoked", "{v}");
}

#[tokio::test]
async fn the_dashboard_refuses_keys_it_should_not_take() {
    let app = TestApp::spawn().await;
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "p", "preset": "aidemo"}))
        .await;
    let mut s = Session::new();
    for (key, why) in [(pk.as_str(), "secret key"), ("kg_sk_notakey", "secret key")] {
        let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
        let csrf = csrf_of(&page);
        let req = s
            .http
            .post(app.url("/dashboard/login"))
            .form(&[("csrf", csrf.as_str()), ("key", key)]);
        let (st, _, body) = s.send(req).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{key}");
        assert!(body.contains(why), "{body}");
    }
    // A well-formed sk key that was revoked.
    let (sk, rec) = app.create_key(json!({"kind": "sk", "name": "gone"})).await;
    app.post(
        &format!("/v1/keys/{}/revoke", rec["id"].as_str().expect("id")),
        json!({}),
    )
    .await;
    let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    let req = s
        .http
        .post(app.url("/dashboard/login"))
        .form(&[("csrf", csrf_of(&page).as_str()), ("key", sk.as_str())]);
    let (st, _, body) = s.send(req).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(body.contains("REVOKED"), "{body}");
    // Without a session every page sends the browser to the sign-in page.
    for path in ["/dashboard/keys", "/dashboard/audit", "/dashboard/tenant"] {
        let (st, loc, _) = Session::new().send(s.http.get(app.url(path))).await;
        assert_eq!(
            (st, loc.as_str()),
            (StatusCode::SEE_OTHER, "/dashboard/login"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_key_list_filters_and_pages() {
    let app = TestApp::spawn().await;
    for i in 0..27 {
        app.create_key(json!({"kind": "sk", "name": format!("batch {i:02}")}))
            .await;
    }
    app.create_key(json!({"kind": "pk", "name": "lonely pk", "preset": "aidemo"}))
        .await;
    let mut s = Session::new();
    let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    let req = s.http.post(app.url("/dashboard/login")).form(&[
        ("csrf", csrf_of(&page).as_str()),
        ("key", app.root.as_str()),
    ]);
    let (st, _, _) = s.send(req).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    // Filtered by name: 25 on the first page, the rest behind "Next page", filter kept.
    let (st, _, first) = s
        .send(s.http.get(app.url("/dashboard/keys?name=batch")))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(first.matches(">batch ").count(), 25, "{first}");
    let next = first
        .split("<a href=\"")
        .find(|p| p.contains(">Next page<"))
        .and_then(|p| p.split('"').next())
        .expect("a next-page link")
        .replace("&amp;", "&");
    assert!(
        next.contains("name=batch") && next.contains("cursor="),
        "{next}"
    );
    let (_, _, second) = s.send(s.http.get(app.url(&next))).await;
    assert_eq!(second.matches(">batch ").count(), 2, "{second}");
    assert!(!second.contains("Next page"));
    // Filtered by kind.
    let (_, _, pks) = s.send(s.http.get(app.url("/dashboard/keys?kind=pk"))).await;
    assert!(
        pks.contains("lonely pk") && !pks.contains(">batch "),
        "{pks}"
    );
}

/// A password sign-in on the dashboard of `app` from client address `ip`: status and page.
async fn sign_in(app: &TestApp, ip: &str, email: &str, password: &str) -> (StatusCode, String) {
    let mut s = Session::new();
    let (_, _, page) = s.send(s.http.get(app.url("/dashboard/login"))).await;
    let req = s
        .http
        .post(app.url("/dashboard/login"))
        .header("x-forwarded-for", ip)
        .form(&[
            ("csrf", csrf_of(&page).as_str()),
            ("method", "password"),
            ("tenant", "default"),
            ("email", email),
            ("password", password),
        ]);
    let (st, _, body) = s.send(req).await;
    (st, body)
}

#[tokio::test]
async fn failed_sign_ins_are_throttled_per_network_on_every_node_sharing_the_store() {
    let throttle = |c: &mut keygate_server::Config| {
        c.login.network_free_failures = 4;
        c.login.account_free_failures = 100;
        c.login.base_delay_ms = 60_000;
        c.login.network_max_delay_ms = 60_000;
    };
    let a = TestApp::spawn_postgres(throttle).await;
    let b = TestApp::spawn_on(a.db_url(), throttle).await;
    let b = b.with_root(a.root.clone());
    for user in ["u1", "u2", "u3"] {
        let r = a
            .post(
                "/v1/users",
                json!({"email": format!("{user}@example.com"), "password": "correct horse battery"}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // One network guesses at several accounts, on both nodes: 4 free failures, then a 5th.
    let guesser = "203.0.113.7";
    for (node, user) in [(&a, "u1"), (&b, "u2"), (&a, "u1"), (&b, "u2"), (&a, "u3")] {
        let (st, body) = sign_in(node, guesser, &format!("{user}@example.com"), "guess").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    }
    // Now that network waits, on the other node too, whatever the account and password.
    let mut s = Session::new();
    let (_, _, page) = s.send(s.http.get(b.url("/dashboard/login"))).await;
    let r = s
        .http
        .post(b.url("/dashboard/login"))
        .header("cookie", s.header())
        .header("x-forwarded-for", guesser)
        .form(&[
            ("csrf", csrf_of(&page).as_str()),
            ("method", "password"),
            ("tenant", "default"),
            ("email", "u2@example.com"),
            ("password", "correct horse battery"),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((50..=60).contains(&after), "{after}");
    assert!(r
        .text()
        .await
        .expect("body")
        .contains("Too many failed sign-ins"));
    // The accounts themselves are not locked: their owners sign in from their own networks.
    for (node, user, ip) in [(&b, "u1", "198.51.100.1"), (&a, "u2", "2001:db8::1")] {
        let (st, body) = sign_in(
            node,
            ip,
            &format!("{user}@example.com"),
            "correct horse battery",
        )
        .await;
        assert_eq!(st, StatusCode::SEE_OTHER, "{user}: {body}");
    }
}

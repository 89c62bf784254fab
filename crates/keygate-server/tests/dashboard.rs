//! The dashboard's sign-in over plain HTTP (the browser flow is in tests/browser.rs): keys it
//! must not take are refused, and every page needs a session.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use support::TestApp;

struct Session {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl Session {
    fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookies: HashMap::new(),
        }
    }

    fn header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> (StatusCode, String, String) {
        let r = req
            .header("cookie", self.header())
            .send()
            .await
            .expect("send");
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().expect("cookie");
            let (k, rest) = v.split_once('=').expect("cookie");
            let value = rest.split(';').next().unwrap_or("").to_owned();
            if value.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), value);
            }
        }
        let status = r.status();
        let loc = r
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        (status, loc, r.text().await.expect("body"))
    }
}

fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf field")
        .to_owned()
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

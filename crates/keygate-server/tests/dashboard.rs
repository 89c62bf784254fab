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

//! The gateway in front of a real upstream: routing, header handling, credits, faults,
//! streaming, CORS preflights and server limits.

mod support;

use keygate_engine::config::RouteConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::{error_code, upstream, TestApp};

fn route(path: &str, upstream: &str, scope: Option<&str>, cost: u64) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        methods: vec![],
        upstream: Some(upstream.into()),
        scope: scope.map(Into::into),
        cost,
        public: false,
        class: Default::default(),
    }
}

async fn gateway_app(
    up: &upstream::Upstream,
    f: impl FnOnce(&mut keygate_server::Config),
) -> TestApp {
    let url = up.url();
    TestApp::spawn_with(|c| {
        c.routes
            .push(route("/api/ocr/*", &url, Some("ocr:read"), 5));
        c.routes.push(RouteConfig {
            public: true,
            ..route("/api/public/*", &url, None, 0)
        });
        c.routes.push(route("/status/*", &url, None, 1));
        c.routes.push(route("/slow/*", &url, None, 1));
        c.routes.push(route("/big/*", &url, None, 0));
        c.routes.push(route("/upload", &url, None, 0));
        c.routes.push(route(
            "/down/*",
            &format!("http://127.0.0.1:{}", upstream::dead_port()),
            None,
            1,
        ));
        f(c)
    })
    .await
}

#[tokio::test]
async fn allowed_requests_reach_the_upstream_with_identity_and_without_the_key() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |_| {}).await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "svc", "scopes": ["ocr:read"], "budget": 100}))
        .await;
    let r = app
        .client
        .post(app.url("/api/ocr/scan?lang=de&x=1"))
        .bearer_auth(&key)
        .header("x-keygate-key-id", "key_spoofed")
        .header("x-keygate-scopes", "*")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("x-custom", "kept")
        .header("forwarded", "for=203.0.113.9")
        .header("x-real-ip", "203.0.113.9")
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-upstream"], "yes");
    assert!(
        !r.headers().contains_key("x-secret-hop"),
        "hop-by-hop header named in Connection is dropped"
    );
    assert_eq!(r.headers()["x-credits-remaining"], "95");
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.expect("json");
    let h = &v["headers"];
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/api/ocr/scan?lang=de&x=1");
    assert_eq!(v["body_len"], 5);
    assert!(
        h.get("authorization").is_none(),
        "the key never reaches the upstream"
    );
    assert_eq!(h["x-keygate-key-id"], rec["id"]);
    assert_eq!(h["x-keygate-tenant"], "default");
    assert_eq!(h["x-keygate-scopes"], "ocr:read");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], app.addr.to_string());
    assert_eq!(h["host"], up.addr.to_string());
    assert_eq!(h["x-custom"], "kept");
    assert!(h.get("x-drop-me").is_none());
    assert!(
        h.get("forwarded").is_none() && h.get("x-real-ip").is_none(),
        "client claims about its address are dropped"
    );
    assert!(!v.to_string().contains(&key));
}

#[tokio::test]
async fn refused_requests_never_reach_the_upstream_and_spend_nothing() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |_| {}).await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "docs", "scopes": ["docs:read"], "budget": 100}))
        .await;
    let r = app
        .client
        .post(app.url("/api/ocr/scan"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "FORBIDDEN_SCOPE");
    let r = app
        .client
        .post(app.url("/api/ocr/scan"))
        .send()
        .await
        .expect("request");
    assert_eq!(error_code(r).await, "MISSING_KEY");
    assert_eq!(up.hits(), 0);
    let v: Value = app
        .get(&format!("/v1/keys/{}", rec["id"].as_str().expect("id")))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["budget"]["spent"], 0);
    // Unmatched paths are a JSON 404; keygate's own API is never shadowed by a route.
    let r = app
        .client
        .get(app.url("/nowhere"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "NOT_FOUND");
    // Dot segments are refused, not forwarded (sent raw: an HTTP client library would
    // normalise them away before sending).
    for path in [
        "/api/public/%2e%2e/ocr/scan",
        "/api/public/../ocr/scan",
        "/api//ocr/scan",
    ] {
        let line = raw_get(app.addr, path).await;
        assert!(line.contains(" 400 "), "{path}: {line}");
    }
    assert_eq!(up.hits(), 0);
}

/// Sends `GET path` over a plain socket, exactly as written; returns the status line.
async fn raw_get(addr: std::net::SocketAddr, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("write");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
    .await
    .expect("task")
}

#[tokio::test]
async fn upstream_errors_are_charged_but_gateway_faults_are_refunded() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |c| c.gateway.upstream_timeout_seconds = 1).await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "k", "budget": 10}))
        .await;
    let id = rec["id"].as_str().expect("id").to_string();
    let spent = || async {
        let v: Value = app
            .get(&format!("/v1/keys/{id}"))
            .await
            .json()
            .await
            .expect("json");
        v["budget"]["spent"].as_u64().expect("spent")
    };
    let r = app
        .client
        .get(app.url("/status/500"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "the upstream's own answer passes through"
    );
    assert_eq!(spent().await, 1);
    let r = app
        .client
        .get(app.url("/down/x"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(r).await, "BAD_GATEWAY");
    assert_eq!(spent().await, 1, "connection refused: refunded");
    let started = Instant::now();
    let r = app
        .client
        .get(app.url("/slow/3000"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(r).await, "GATEWAY_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "gave up at the configured timeout"
    );
    assert_eq!(spent().await, 1, "timeout: refunded");
    // An upstream that reads the request and hangs up without answering: 502, refunded.
    let reset = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let reset_addr = reset.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut stream in reset.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            drop(stream);
        }
    });
    drop(app);
    let reset_url = format!("http://{reset_addr}");
    let app = gateway_app(&up, |c| {
        c.routes.insert(0, route("/reset/*", &reset_url, None, 1));
    })
    .await;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "k2", "budget": 10}))
        .await;
    let r = app
        .client
        .get(app.url("/reset/x"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: Value = app
        .get(&format!("/v1/keys/{}", rec["id"].as_str().expect("id")))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["budget"]["spent"], 0, "reset: refunded");
    // The gateway is still up.
    let r = app
        .client
        .get(app.url("/status/204"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn public_routes_need_no_key_and_are_limited_per_ip() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |c| {
        c.gateway.public_rate_limit = keygate_core::RateLimit {
            limit: 2,
            window_seconds: 60,
        };
    })
    .await;
    for _ in 0..2 {
        let r = app
            .client
            .get(app.url("/api/public/page"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.expect("json");
        assert!(v["headers"].get("x-keygate-key-id").is_none());
    }
    let r = app
        .client
        .get(app.url("/api/public/page"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn bodies_stream_both_ways_and_oversized_uploads_are_refused() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |c| c.gateway.max_body_bytes = 4 * 1024 * 1024).await;
    let (key, _) = app.create_key(json!({"kind": "sk", "name": "k"})).await;
    let r = app
        .client
        .post(app.url("/upload"))
        .bearer_auth(&key)
        .body(vec![7u8; 3 * 1024 * 1024])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json")["body_len"],
        3 * 1024 * 1024
    );
    let r = app
        .client
        .post(app.url("/upload"))
        .bearer_auth(&key)
        .body(vec![7u8; 5 * 1024 * 1024])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Without Content-Length (chunked), the limit holds while streaming.
    let addr = app.addr;
    let key2 = key.clone();
    let status_line = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key2}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        s.write_all(head.as_bytes()).expect("head");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..80 {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            if s.write_all(&frame).is_err() {
                break; // the server may stop reading once the limit is hit
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string()
    })
    .await
    .expect("task");
    assert!(status_line.contains("413"), "{status_line}");
    // 32 MiB streamed down.
    let r = app
        .client
        .get(app.url("/big/32"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.expect("body");
    assert_eq!(body.len(), 32 * 1024 * 1024);
}

#[tokio::test]
async fn publishable_keys_get_cors_and_hard_blocks() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |_| {}).await;
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "web", "scopes": ["ocr:read"], "allowed_origins": ["https://app.example.com"]}))
        .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/ocr/scan"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let r = preflight("https://app.example.com").await.expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .contains("Authorization"));
    assert_eq!(r.headers()["vary"], "Origin");
    let r = preflight("https://evil.example").await.expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let r = app
        .client
        .post(app.url("/api/ocr/scan"))
        .bearer_auth(&pk)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .contains("RateLimit"));
    let r = app
        .client
        .delete(app.url("/api/ocr/scan"))
        .bearer_auth(&pk)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "BLOCKED_FOR_KEY_TYPE");
    // A newly created pk key's origin is allowed at once; a revoked one's is not.
    let (pk2, rec2) = app
        .create_key(json!({"kind": "pk", "name": "web2", "scopes": ["ocr:read"], "allowed_origins": ["https://other.example"]}))
        .await;
    assert_eq!(
        preflight("https://other.example")
            .await
            .expect("request")
            .status(),
        StatusCode::NO_CONTENT
    );
    app.post(
        &format!("/v1/keys/{}/revoke", rec2["id"].as_str().expect("id")),
        json!({}),
    )
    .await;
    assert_eq!(
        preflight("https://other.example")
            .await
            .expect("request")
            .status(),
        StatusCode::FORBIDDEN
    );
    let _ = pk2;
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_shutdown_finishes_in_flight_requests() {
    let up = upstream::spawn().await;
    let app = gateway_app(&up, |c| c.limits.header_read_timeout_seconds = 1).await;
    // A client that never finishes its request head is disconnected.
    let addr = app.addr;
    let (elapsed, text) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf[..n]).to_string(),
        )
    })
    .await
    .expect("task");
    assert!(
        elapsed < Duration::from_secs(9),
        "connection was not closed"
    );
    assert!(text.is_empty() || text.contains("408"), "{text}");

    // A request in flight when shutdown starts still gets its answer.
    let (key, _) = app.create_key(json!({"kind": "sk", "name": "k"})).await;
    let client = app.client.clone();
    let url = app.url("/slow/1500");
    let inflight = tokio::spawn(async move { client.get(url).bearer_auth(key).send().await });
    support::eventually(|| async { up.hits() >= 1 }).await;
    app.stop().await;
    let r = inflight.await.expect("task").expect("answered");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.expect("body"), "slow done");
}

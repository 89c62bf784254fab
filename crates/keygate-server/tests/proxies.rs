//! keygate's forward-auth behind the real proxies users run: nginx (`auth_request`) and Caddy
//! (`forward_auth`), each started from the snippet shipped in `docs/`, in front of a real
//! upstream. Needs the `nginx` and `caddy` binaries (Debian: nginx-light, caddy); absent, the
//! tests fail with a message that says so.

mod support;

use keygate_engine::config::RouteConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{upstream, TestApp};

struct Proxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn require(bin: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = format!("{dir}/{bin}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    panic!("`{bin}` is not installed: these tests need the real proxy (apt-get install nginx-light caddy)");
}

fn docs(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

async fn wait_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not listen on {port}");
}

async fn nginx(keygate: std::net::SocketAddr, app: std::net::SocketAddr) -> Proxy {
    let bin = require("nginx");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = docs("nginx.conf")
        .replace("127.0.0.1:8080", &keygate.to_string())
        .replace("127.0.0.1:9000", &app.to_string())
        .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"));
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{server}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("write conf");
    let mut child = Command::new(bin)
        .args(["-p", &d.to_string(), "-c", &path.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    wait_port(port, &mut child, "nginx").await;
    Proxy {
        child,
        port,
        _dir: dir,
    }
}

async fn caddy(keygate: std::net::SocketAddr, app: std::net::SocketAddr) -> Proxy {
    let bin = require("caddy");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let site = docs("Caddyfile")
        .replace("127.0.0.1:8080", &keygate.to_string())
        .replace("127.0.0.1:9000", &app.to_string())
        .replace(":8000 {", &format!("http://127.0.0.1:{port} {{"));
    let conf = format!("{{\n\tadmin off\n\tauto_https off\n}}\n{site}");
    let path = dir.path().join("Caddyfile");
    std::fs::write(&path, conf).expect("write conf");
    let mut child = Command::new(bin)
        .args([
            "run",
            "--adapter",
            "caddyfile",
            "--config",
            &path.display().to_string(),
        ])
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start caddy");
    wait_port(port, &mut child, "caddy").await;
    Proxy {
        child,
        port,
        _dir: dir,
    }
}

async fn keygate() -> TestApp {
    TestApp::spawn_with(|c| {
        c.routes.push(RouteConfig {
            path: "/api/ocr/*".into(),
            methods: vec![],
            upstream: None,
            scope: Some("ocr:read".into()),
            cost: 1,
            public: false,
            class: Default::default(),
        });
    })
    .await
}

/// The same checks through either proxy.
async fn check_proxy(app: &TestApp, up: &upstream::Upstream, port: u16) {
    let base = format!("http://127.0.0.1:{port}");
    let c = &app.client;
    let (key, rec) = app
        .create_key(json!({"kind": "sk", "name": "svc", "scopes": ["ocr:read"], "budget": 3}))
        .await;
    let (limited, _) = app
        .create_key(json!({"kind": "sk", "name": "lim", "scopes": ["ocr:read"], "rate_limit": {"limit": 1, "window_seconds": 60}}))
        .await;
    let (docs_key, _) = app
        .create_key(json!({"kind": "sk", "name": "docs", "scopes": ["docs:read"]}))
        .await;

    // Allowed: the upstream sees the identity, never the key, never spoofed identity.
    let r = c
        .get(format!("{base}/api/ocr/scan?x=1"))
        .bearer_auth(&key)
        .header("x-keygate-user", "usr_spoofed")
        // Spellings a WSGI, CGI or Rack app reads as X-Keygate-*.
        .header("X_Keygate_User", "usr_spoofed")
        .header("X-Keygate_Tenant", "tnt_spoofed")
        .header("X_Forwarded_For", "10.0.0.1")
        .header("X-Rewrite-URL", "/api/admin")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    for (name, value) in v["headers"].as_object().expect("headers") {
        let n = name.to_ascii_lowercase().replace('_', "-");
        assert!(
            !(name.contains('_') && (n.starts_with("x-keygate-") || n.starts_with("x-forwarded-"))),
            "{name}: {value} reached the app"
        );
        assert!(n != "x-rewrite-url", "{name}: {value} reached the app");
    }
    assert_eq!(v["headers"]["x-keygate-key-id"], rec["id"]);
    assert_eq!(v["headers"]["x-keygate-tenant"], "default");
    assert_eq!(v["headers"]["x-keygate-scopes"], "ocr:read");
    let user = v["headers"]
        .get("x-keygate-user")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert_eq!(user, "", "a spoofed identity header reached the app");
    assert!(
        v["headers"].get("authorization").is_none(),
        "the key reached the app"
    );

    let expect = |status: u16, code: &'static str| {
        move |r: reqwest::Response| async move {
            assert_eq!(r.status().as_u16(), status, "{code}");
            assert_eq!(r.headers()["x-keygate-code"], code);
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let v: Value = r.json().await.expect("JSON refusal body");
            assert_eq!(v["error"]["code"], code);
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{v}"
            );
            assert!(v["error"]["request_id"]
                .as_str()
                .is_some_and(|m| m.starts_with("req_")));
            retry
        }
    };
    let hits = up.hits();
    let r = c
        .get(format!("{base}/api/ocr/scan"))
        .send()
        .await
        .expect("request");
    expect(401, "MISSING_KEY")(r).await;
    let r = c
        .get(format!("{base}/api/ocr/scan"))
        .bearer_auth(&docs_key)
        .send()
        .await
        .expect("request");
    expect(403, "FORBIDDEN_SCOPE")(r).await;
    // A client cannot make a call free by sending its own cost header.
    for _ in 0..2 {
        let r = c
            .get(format!("{base}/api/ocr/scan"))
            .bearer_auth(&key)
            .header("x-keygate-cost", "0")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = c
        .get(format!("{base}/api/ocr/scan"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    expect(402, "BUDGET_EXHAUSTED")(r).await;
    let r = c
        .get(format!("{base}/api/ocr/scan"))
        .bearer_auth(&limited)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{base}/api/ocr/scan"))
        .bearer_auth(&limited)
        .send()
        .await
        .expect("request");
    let retry = expect(429, "RATE_LIMITED")(r).await;
    assert!(
        retry.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)),
        "Retry-After reaches the client"
    );
    assert_eq!(
        up.hits(),
        hits + 3,
        "only the allowed calls reached the app"
    );
}

#[tokio::test]
async fn nginx_auth_request_with_the_shipped_snippet() {
    let up = upstream::spawn().await;
    let app = keygate().await;
    let proxy = nginx(app.addr, up.addr).await;
    check_proxy(&app, &up, proxy.port).await;
}

#[tokio::test]
async fn caddy_forward_auth_with_the_shipped_snippet() {
    let up = upstream::spawn().await;
    let app = keygate().await;
    let proxy = caddy(app.addr, up.addr).await;
    check_proxy(&app, &up, proxy.port).await;
}

/// Issue 17 end to end through the shipped nginx snippet: a path spelled differently is judged
/// as the path the app reads, a client's own cost header is never believed, and a client's
/// X-Forwarded-For does not pass an IP lock.
#[tokio::test]
async fn nginx_cannot_be_talked_past_by_spelling_price_or_address() {
    let up = upstream::spawn().await;
    let app = TestApp::spawn_with(|c| {
        // Only nginx (on 127.0.0.1) is trusted; the client below connects from 127.0.0.2.
        c.proxy.trusted = vec!["127.0.0.1/32".into()];
        for (path, class, cost) in [
            ("/api/admin/*", keygate_core::RouteClass::Admin, 1),
            ("/api/expensive/*", keygate_core::RouteClass::Normal, 100),
            ("/api/*", keygate_core::RouteClass::Normal, 1),
        ] {
            c.routes.push(RouteConfig {
                path: path.into(),
                methods: vec![],
                upstream: None,
                scope: None,
                cost,
                public: false,
                class,
            });
        }
    })
    .await;
    let proxy = nginx(app.addr, up.addr).await;
    let base = format!("http://127.0.0.1:{}", proxy.port);
    let client = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().ok())
        .build()
        .expect("client");
    let (pk, _) = app
        .create_key(json!({"kind": "pk", "name": "web", "scopes": ["docs:read"],
                           "allowed_origins": ["https://app.example.com"]}))
        .await;
    let get = |path: &str, key: &str| {
        client
            .get(format!("{base}{path}"))
            .bearer_auth(key)
            .header("origin", "https://app.example.com")
    };
    let hits = up.hits();
    for path in ["/api/%61dmin/users", "/api/ADMIN/users"] {
        let r = get(path, &pk).send().await.expect("request");
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            r.headers()["x-keygate-code"],
            "BLOCKED_FOR_KEY_TYPE",
            "{path}"
        );
    }
    let r = get("/api/x/..;/admin/users", &pk)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(up.hits(), hits, "nothing reached the app");

    let (rich, _) = app
        .create_key(json!({"kind": "sk", "name": "rich", "budget": 1000}))
        .await;
    let r = get("/api/%65xpensive/x", &rich)
        .header("x-keygate-cost", "0")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-credits-remaining"], "900");

    let (locked, _) = app
        .create_key(json!({"kind": "sk", "name": "ip", "allowed_ips": ["10.1.2.3"]}))
        .await;
    let r = get("/api/x", &locked)
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.headers()["x-keygate-code"], "IP_NOT_ALLOWED");
}

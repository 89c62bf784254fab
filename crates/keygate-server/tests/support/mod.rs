//! Test harness: a real keygate on port 0 with its own SQLite file, and helpers that talk to
//! it over HTTP like a user would.
#![allow(dead_code)]

use keygate_server::{Application, Config};
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A running app.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// `[forward_auth] listen` and `[metrics] listen`, when the test set them.
    extra: Vec<(keygate_server::server::Role, std::net::SocketAddr)>,
    pub root: String,
    pub client: Client,
    pub db_path: PathBuf,
    db_url: String,
    state: keygate_server::state::AppState,
    _dir: Option<tempfile::TempDir>,
    stop_tx: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// A client that sends one key.
pub struct KeyClient<'a> {
    client: &'a Client,
    key: String,
}

impl KeyClient<'_> {
    pub fn get(&self, url: String) -> RequestBuilder {
        self.client.get(url).bearer_auth(&self.key)
    }
    pub fn post(&self, url: String) -> RequestBuilder {
        self.client.post(url).bearer_auth(&self.key)
    }
    pub fn delete(&self, url: String) -> RequestBuilder {
        self.client.delete(url).bearer_auth(&self.key)
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(f: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = Self::spawn_in(dir.path(), f).await;
        app._dir = Some(dir);
        app
    }

    pub async fn spawn_in(dir: &Path, f: impl FnOnce(&mut Config)) -> Self {
        let db_path = dir.join("keygate.db");
        let mut config = Config {
            listen: "127.0.0.1:0".into(),
            database_url: format!("sqlite://{}", db_path.display()),
            ..Config::default()
        };
        config.audit.dir = Some(dir.join("audit").display().to_string());
        // The tests play the operator's proxy (they send X-Original-URI and friends from
        // loopback); the tests of untrusted peers clear this.
        config.proxy.trusted = vec!["127.0.0.1/32".into(), "::1/128".into()];
        f(&mut config);
        let db_url = config.database_url.clone();
        let app = Application::build(config).await.expect("app builds");
        let addr = app.local_addr().expect("bound");
        let extra = [
            keygate_server::server::Role::ForwardAuth,
            keygate_server::server::Role::Metrics,
        ]
        .into_iter()
        .filter_map(|r| app.addr_of(r).map(|a| (r, a)))
        .collect();
        let root = app.root_key().unwrap_or_default().to_string();
        let state = app.state().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop_rx.await;
        }));
        TestApp {
            addr,
            extra,
            root,
            client: Client::new(),
            db_path,
            db_url,
            state,
            _dir: None,
            stop_tx: Some(stop_tx),
            handle: Some(handle),
        }
    }

    /// The app on a fresh schema of the shared PostgreSQL (127.0.0.1:5432, database `test`, or
    /// `KEYGATE_TEST_POSTGRES_URL`). Fails loudly when PostgreSQL is not there.
    pub async fn spawn_postgres(f: impl FnOnce(&mut Config)) -> Self {
        let url = Self::fresh_postgres_url().await;
        Self::spawn_on(url, f).await
    }

    /// A database URL on a fresh, empty schema of the shared PostgreSQL.
    pub async fn fresh_postgres_url() -> String {
        let base = std::env::var("KEYGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let schema = format!(
            "kg_api_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let admin = sqlx::PgPool::connect(&base).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} is required ({e}); bash scripts/services.sh starts it")
        });
        // Schemas of test processes that are gone (nextest runs each test in its own process).
        let old: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'kg_api_%'",
        )
        .fetch_all(&admin)
        .await
        .unwrap_or_default();
        for name in old {
            let pid = name.split('_').nth(2).unwrap_or("");
            if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&admin)
                    .await;
            }
        }
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-c%20search_path%3D{schema}")
    }

    /// Another node on the same database URL (see [`TestApp::db_url`]).
    pub async fn spawn_on(url: String, f: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = Self::spawn_in(dir.path(), move |c| {
            c.database_url = url;
            f(c);
        })
        .await;
        app._dir = Some(dir);
        app
    }

    /// The running node's shared state (to look behind the API in a test).
    pub fn app_state(&self) -> keygate_server::state::AppState {
        self.state.clone()
    }

    /// The database URL this node uses.
    pub fn db_url(&self) -> String {
        self.db_url.clone()
    }

    /// Keeps the root key of an earlier start of the same database.
    pub fn with_root(mut self, root: String) -> Self {
        self.root = root;
        self
    }

    /// The address of the listener serving `role`, if configured.
    pub fn addr_of(&self, role: keygate_server::server::Role) -> Option<std::net::SocketAddr> {
        self.extra.iter().find(|(r, _)| *r == role).map(|(_, a)| *a)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn as_key(&self, key: &str) -> KeyClient<'_> {
        KeyClient {
            client: &self.client,
            key: key.to_string(),
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.root)
            .send()
            .await
            .expect("request")
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.root)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(&self.root)
            .send()
            .await
            .expect("request")
    }

    pub async fn patch(&self, path: &str, body: Value) -> Response {
        self.client
            .patch(self.url(path))
            .bearer_auth(&self.root)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// `GET /v1/auth` with an optional key and extra headers.
    pub async fn auth(&self, key: Option<&str>, headers: &[(&str, &str)]) -> Response {
        let mut req = self.client.get(self.url("/v1/auth"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request")
    }

    /// Creates a key with the root key; asserts 201; returns (plaintext, record).
    pub async fn create_key(&self, body: Value) -> (String, Value) {
        let r = self.post("/v1/keys", body.clone()).await;
        let status = r.status();
        let v: Value = r.json().await.expect("json");
        assert_eq!(status, StatusCode::CREATED, "create {body}: {v}");
        (v["key"].as_str().expect("key").to_string(), v)
    }

    pub async fn key_count(&self) -> usize {
        let v: Value = self
            .get("/v1/keys?limit=500")
            .await
            .json()
            .await
            .expect("json");
        v["data"].as_array().map_or(0, Vec::len)
    }

    /// Sends `n` forward-auth calls with `key`, one after another; counts the 200s.
    pub async fn count_ok(&self, key: &str, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            if self.auth(Some(key), &[]).await.status() == StatusCode::OK {
                ok += 1;
            }
        }
        ok
    }

    /// Graceful stop: in-flight requests finish, leases go back to the store.
    pub async fn stop(self) {
        // Let go of our handle on the state first: the server drains its queues once the last
        // one is gone.
        let TestApp {
            stop_tx,
            handle,
            state,
            ..
        } = self;
        drop(state);
        if let Some(tx) = stop_tx {
            let _ = tx.send(());
        }
        if let Some(h) = handle {
            h.await.expect("join").expect("served");
        }
    }

    /// Abrupt stop: the server task is dropped mid-flight, nothing is flushed.
    pub fn crash(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
        self.stop_tx.take();
    }
}

/// `/v1/things/*`, scope `things:read`, cost 1: the API behind keygate in the accounts tests.
pub fn things_route() -> keygate_engine::config::RouteConfig {
    keygate_engine::config::RouteConfig {
        path: "/v1/things/*".into(),
        methods: vec![],
        upstream: None,
        scope: Some("things:read".into()),
        cost: 1,
        public: false,
        class: Default::default(),
    }
}

/// A forward-auth call to the `things` route with `key`.
pub async fn thing(app: &TestApp, key: &str) -> Response {
    app.auth(Some(key), &[("X-Original-URI", "/v1/things/1")])
        .await
}

/// The CSRF token of the first form of a page.
pub fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf field")
        .to_owned()
}

/// The `error.code` of a JSON refusal.
pub async fn error_code(r: Response) -> String {
    let v: Value = r.json().await.expect("json error body");
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// Polls `cond` until it holds, for at most 10 seconds.
pub async fn eventually<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 10 s");
}
/// A browser's cookie jar over plain HTTP (no redirects followed): the dashboard's forms.
pub struct Session {
    pub http: reqwest::Client,
    pub cookies: std::collections::HashMap<String, String>,
}

impl Session {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookies: std::collections::HashMap::new(),
        }
    }

    /// The `Cookie` header of the jar.
    pub fn header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends `req` with the jar's cookies and keeps those it sets: status, Location, body.
    pub async fn send(&mut self, req: reqwest::RequestBuilder) -> (StatusCode, String, String) {
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

pub mod smtp;
pub mod upstream;
pub mod wsgi;

//! Building and running the application (`Application::build` / `run_until_stopped`).

use crate::error::{ApiError, RequestId};
use crate::routes::{self, DEFAULT_TENANT};
use crate::state::{AppState, Shared};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keygate_core::{KeyFormat, KeyHasher, TenantId};
use keygate_counters::Counters;
use keygate_engine::clock::now_ms;
use keygate_engine::config::Config;
use keygate_engine::engine::{run_touch_flusher, Engine};
use keygate_engine::issue::{self, CreateKey};
use keygate_engine::supervisor::supervise;
use keygate_store::{SqlStore, Store, Tenant};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A startup failure, with a message for the operator.
#[derive(Debug)]
pub struct StartupError(pub String);

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartupError {}

/// Opens the store named by `config.database_url` and applies migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartupError> {
    let database_url = config.database_url.as_str();
    if database_url.starts_with("sqlite:") {
        let s = SqlStore::sqlite(database_url)
            .await
            .map_err(|e| StartupError(format!("cannot open {database_url}: {}", e.message)))?;
        s.migrate()
            .await
            .map_err(|e| StartupError(format!("migrating {database_url}: {}", e.message)))?;
        Ok(Arc::new(s))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let s = keygate_store::SqlStore::postgres(
            database_url,
            config.database.max_connections,
            Duration::from_secs(config.database.acquire_timeout_seconds.max(1)),
        )
        .await
        .map_err(|e| StartupError(format!("cannot connect to PostgreSQL: {}", e.message)))?;
        s.migrate()
            .await
            .map_err(|e| StartupError(format!("migrating PostgreSQL: {}", e.message)))?;
        Ok(Arc::new(s))
    } else {
        Err(StartupError(format!(
            "database_url must start with sqlite:// or postgres:// (got {database_url:?})"
        )))
    }
}

/// The key format and hasher a config describes.
pub fn key_tools(config: &Config) -> Result<(KeyFormat, KeyHasher), StartupError> {
    let format = KeyFormat::new(&config.keys.prefix).map_err(|e| StartupError(e.to_string()))?;
    let hasher = match &config.keys.pepper {
        Some(p) if !p.is_empty() => KeyHasher::with_pepper(p.as_bytes()),
        _ => KeyHasher::sha256(),
    };
    Ok((format, hasher))
}

/// Creates the `default` tenant and its root key on an empty database. Returns the root
/// key's plaintext when it was created (the one time it exists outside a response).
pub async fn bootstrap(config: &Config, store: &dyn Store) -> Result<Option<String>, StartupError> {
    let fail = |e: &dyn std::fmt::Display| StartupError(format!("bootstrap: {e}"));
    if store
        .get_tenant(&TenantId::from(DEFAULT_TENANT))
        .await
        .map_err(|e| fail(&e))?
        .is_some()
    {
        return Ok(None);
    }
    let now = now_ms();
    let plan = if config.plans.contains_key("enterprise") {
        "enterprise"
    } else {
        "free"
    };
    let created = store
        .insert_tenant(&Tenant {
            id: DEFAULT_TENANT.into(),
            name: DEFAULT_TENANT.into(),
            plan: plan.into(),
            credits: None,
            created_at_ms: now,
            plan_started_at_ms: now,
            trial_ends_at_ms: None,
            refilled_months: 0,
            verified: true,
        })
        .await;
    match created {
        Ok(()) => {}
        // Nodes started together on an empty database: another one bootstraps.
        Err(e) if e.kind == keygate_store::StoreErrorKind::Conflict => return Ok(None),
        Err(e) => return Err(fail(&e)),
    }
    let (format, hasher) = key_tools(config)?;
    let issuer = issue::Issuer {
        config,
        format: &format,
        hasher: &hasher,
    };
    let body = CreateKey {
        kind: "sk".into(),
        name: "root".into(),
        scopes: Some(vec!["*".into()]),
        ..CreateKey::default()
    };
    let (plaintext, record) =
        issue::build_key(&issuer, store, &TenantId::from(DEFAULT_TENANT), body, now)
            .await
            .map_err(|e| fail(&ApiError::from(e).message))?;
    store.insert_key(&record).await.map_err(|e| fail(&e))?;
    Ok(Some(plaintext))
}

/// A built, bound, not yet running keygate. `Debug` hides the root key.
pub struct Application {
    listener: TcpListener,
    /// `[forward_auth] listen` and `[metrics] listen`, when set.
    extra: Vec<(TcpListener, crate::server::Role)>,
    state: AppState,
    router: Router,
    root_key: Option<String>,
    touch_task: tokio::task::JoinHandle<()>,
}

/// Opens the audit log (when enabled) and settles this node's id: the configured one, else the
/// one remembered in the audit directory, else a random one.
async fn open_audit(
    config: &Config,
    store: &dyn keygate_store::Store,
) -> Result<(String, Option<Arc<keygate_engine::audit::AuditLog>>), StartupError> {
    if !config.audit.enabled {
        let id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node_{}", keygate_engine::ids::random_base62(8)));
        return Ok((id, None));
    }
    let dir = config.audit_dir();
    let node = keygate_engine::audit::node_id(config.node_id.as_deref(), &dir)
        .map_err(|e| StartupError(format!("audit directory {}: {e}", dir.display())))?;
    let sink = keygate_engine::audit::StoreSink(store);
    let log = keygate_engine::audit::AuditLog::open(&dir, &node, &sink, config.audit.segment_bytes)
        .await
        .map_err(StartupError)?;
    Ok((node, Some(Arc::new(log))))
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.local_addr())
            .field("root_key", &self.root_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Opens the store, bootstraps, binds `config.listen`.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let compiled = config.compile().map_err(|e| StartupError(e.to_string()))?;
        let store = open_store(&config).await?;
        let root_key = bootstrap(&config, &*store).await?;
        let (node_id, audit) = open_audit(&config, &*store).await?;
        let (format, hasher) = key_tools(&config)?;
        let (touch_tx, touch_rx) = mpsc::channel(65_536);
        let touch_task = {
            let (store, rx) = (store.clone(), Arc::new(tokio::sync::Mutex::new(touch_rx)));
            supervise("last-used", move || {
                run_touch_flusher(store.clone(), Arc::clone(&rx), Duration::from_secs(1))
            })
        };
        let cache = moka::sync::Cache::builder()
            .max_capacity(config.cache.max_entries)
            .time_to_live(Duration::from_secs(config.cache.ttl_seconds.max(1)))
            .build();
        let negative = moka::sync::Cache::builder()
            .max_capacity(config.cache.max_entries)
            .time_to_live(Duration::from_secs(
                config.cache.negative_ttl_seconds.max(1),
            ))
            .build();
        let shared = if config.redis_url.is_empty() {
            None
        } else {
            Some(
                keygate_counters::SharedCounters::connect(
                    &config.redis_url,
                    &config.redis_prefix,
                    store.clone(),
                )
                .await
                .map_err(|e| StartupError(format!("cannot connect to Redis: {e}")))?,
            )
        };
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| StartupError(format!("cannot listen on {}: {e}", config.listen)))?;
        let bound = listener
            .local_addr()
            .map_or_else(|_| config.listen.clone(), |a| a.to_string());
        let mut extra = Vec::new();
        for (addr, role) in [
            (
                &config.forward_auth.listen,
                crate::server::Role::ForwardAuth,
            ),
            (&config.metrics.listen, crate::server::Role::Metrics),
        ] {
            if !addr.is_empty() {
                let l = TcpListener::bind(addr.as_str())
                    .await
                    .map_err(|e| StartupError(format!("cannot listen on {addr}: {e}")))?;
                extra.push((l, role));
            }
        }
        let oauth = keygate_engine::oauth::OAuth::open(&config, &*store, &bound)
            .await
            .map_err(StartupError)?;
        let engine = Arc::new(Engine {
            oauth,
            counters: Counters::new(store.clone()),
            shared,
            metrics: keygate_engine::metrics::Metrics::new(),
            routes: compiled.routes,
            node_id,
            audit,
            webhook_wake: tokio::sync::Notify::new(),
            store,
            format,
            hasher,
            cache,
            negative,
            touch_tx,
            cors: keygate_engine::origins::CorsIndex::default(),
            cache_gen: std::sync::atomic::AtomicU64::new(0),
            feed_ok: std::sync::atomic::AtomicBool::new(true),
            mailer: keygate_engine::mail::Mailer::new(&config.smtp).map_err(StartupError)?,
            config,
        });
        let state = AppState(Arc::new(Shared {
            proxies: crate::proxy::TrustedProxies::new(compiled.trusted),
            gateway: crate::gateway::Gateway::new(&engine.config.gateway),
            engine,
        }));
        keygate_engine::origins::refresh(&state)
            .await
            .map_err(|e| StartupError(format!("loading publishable keys' origins: {e}")))?;
        let router = router(state.clone());
        Ok(Self {
            listener,
            extra,
            state,
            router,
            root_key,
            touch_task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The bound address of the listener serving `role` (`[forward_auth] listen`,
    /// `[metrics] listen`), when it is configured.
    pub fn addr_of(&self, role: crate::server::Role) -> Option<SocketAddr> {
        self.extra
            .iter()
            .find(|(_, r)| *r == role)
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// The root key, if this start created it.
    pub fn root_key(&self) -> Option<&str> {
        self.root_key.as_deref()
    }

    /// The shared state (for tests and tools).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, finishes in-flight requests, then returns unspent
    /// credit leases and writes pending last-used times.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application {
            listener,
            extra,
            state,
            router,
            touch_task,
            ..
        } = self;
        let background = keygate_engine::tasks::Background::start(&state.engine);
        // Every listener stops at the one signal.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let others: Vec<_> = extra
            .into_iter()
            .map(|(l, role)| {
                tokio::spawn(crate::server::serve(
                    l,
                    role,
                    router.clone(),
                    state.clone(),
                    stopped(),
                ))
            })
            .collect();
        let main = crate::server::serve(
            listener,
            crate::server::Role::Public,
            router,
            state.clone(),
            stopped(),
        );
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let (served, ()) = tokio::join!(main, signal);
        for o in others {
            let _ = o.await;
        }
        background.stop().await;
        drop(state);
        // The router held the last senders; once they are gone the flusher drains and exits.
        let _ = tokio::time::timeout(Duration::from_secs(5), touch_task).await;
        served
    }
}

async fn request_id(req: Request, next: Next) -> Response {
    let rid = RequestId::new();
    let header = rid.0.clone();
    let mut res = rid.scope(next.run(req)).await;
    res.headers_mut()
        .insert(crate::headers::X_REQUEST_ID, header);
    res
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method not allowed on this path",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL",
        "internal error",
    )
    .into_response()
}

/// The HTTP surface except `/v1/auth` and gateway routes (see `server::Dispatch`).
pub fn router(state: AppState) -> Router {
    use crate::dashboard;
    use routes::{
        audit, keys, oauth, oauth_clients, signup, status, tenants, users, verify, webhooks,
    };
    let body_limit = state.config.limits.max_body_bytes;
    let timeout = Duration::from_secs(state.config.limits.request_timeout_seconds.max(1));
    // Status, health and metrics take no middleware. `/v1/auth` is not routed here at all:
    // `server::Dispatch` sends it straight to the decision (the hot path).
    let hot = Router::new()
        .route("/v1/status", get(status::status))
        .route("/v1/health/live", get(status::live))
        .route("/metrics", get(crate::metrics::render_for_operator))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/docs", get(crate::openapi::docs))
        .route("/llms.txt", get(crate::openapi::llms_txt))
        .route("/v1/health/ready", get(status::ready));
    let management = Router::new()
        .route("/v1/keys/verify", post(verify::verify))
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route(
            "/v1/keys/{id}",
            get(keys::get).patch(keys::update).delete(keys::revoke),
        )
        .route("/v1/keys/{id}/rotate", post(keys::rotate))
        .route("/v1/keys/{id}/revoke", post(keys::revoke))
        .route("/v1/keys/{id}/usage", get(audit::key_usage))
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/tenants/{id}/usage", get(audit::tenant_usage))
        .route("/v1/alerts", get(audit::alerts))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::get)
                .patch(webhooks::update)
                .delete(webhooks::delete),
        )
        .route("/v1/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/v1/webhooks/{id}/test", post(webhooks::test))
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{id}", get(tenants::get).patch(tenants::update))
        .route("/v1/tenants/{id}/credits", post(tenants::top_up))
        .route("/v1/users", post(users::create).get(users::list))
        .route("/v1/account", get(tenants::account))
        .route("/v1/signup", post(signup::signup))
        .route("/v1/signup/verify", get(signup::verify_email))
        .route("/v1/password/forgot", post(signup::forgot_password))
        .route("/v1/password/reset", post(signup::reset_password))
        .route("/v1/users/invite", post(users::invite))
        .route("/v1/users/{id}", get(users::get).delete(users::remove))
        .route(
            "/v1/oauth/clients",
            post(oauth_clients::create).get(oauth_clients::list),
        )
        .route(
            "/v1/oauth/clients/{id}",
            get(oauth_clients::get).delete(oauth_clients::delete),
        )
        .route(
            "/v1/oauth/signing-keys/rotate",
            post(oauth_clients::rotate_signing_key),
        )
        .route(
            "/oauth/authorize",
            get(oauth::authorize).post(oauth::authorize_submit),
        )
        .route("/oauth/token", post(oauth::token))
        .route("/oauth/revoke", post(oauth::revoke))
        .route("/oauth/introspect", post(oauth::introspect))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata),
        )
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route("/dashboard", get(dashboard::home))
        .route(
            "/dashboard/login",
            get(dashboard::home).post(dashboard::login),
        )
        .route(
            "/dashboard/signup",
            get(dashboard::signup_form).post(dashboard::signup),
        )
        .route(
            "/dashboard/forgot",
            get(dashboard::forgot_form).post(dashboard::forgot),
        )
        .route(
            "/dashboard/invite",
            get(dashboard::invite_form).post(dashboard::invite_accept),
        )
        .route(
            "/dashboard/reset",
            get(dashboard::reset_form).post(dashboard::reset),
        )
        .route("/dashboard/logout", post(dashboard::logout))
        .route("/dashboard/app.js", get(dashboard::app_js))
        .route(
            "/dashboard/keys",
            get(dashboard::keys).post(dashboard::create_key),
        )
        .route("/dashboard/keys/{id}", get(dashboard::key))
        .route("/dashboard/keys/{id}/{action}", post(dashboard::key_action))
        .route("/dashboard/audit", get(dashboard::audit))
        .route("/dashboard/alerts", get(dashboard::alerts))
        .route(
            "/dashboard/webhooks",
            get(dashboard::webhooks).post(dashboard::webhooks_add),
        )
        .route("/dashboard/webhooks/test", post(dashboard::webhooks_test))
        .route("/dashboard/webhooks/{id}", get(dashboard::deliveries))
        .route(
            "/dashboard/oauth",
            get(dashboard::oauth).post(dashboard::oauth_create),
        )
        .route("/dashboard/tenant", get(dashboard::tenant))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| async move {
                match tokio::time::timeout(timeout, next.run(req)).await {
                    Ok(res) => res,
                    Err(_) => ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "REQUEST_TIMEOUT",
                        "the request took too long",
                    )
                    .into_response(),
                }
            },
        ));
    hot.merge(
        management
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ))
            .layer(axum::middleware::from_fn(request_id)),
    )
    .fallback(not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .with_state(state)
}

/// `METHOD /path` of every `.route(…)` in [`router`]'s source, for the tests that tie the
/// router to what describes it (the OpenAPI document, `server::OWN_PATHS`).
#[cfg(test)]
pub(crate) fn routed_from_source() -> std::collections::BTreeSet<String> {
    let src = include_str!("startup.rs");
    let router = &src[src.find("pub fn router(").unwrap_or(0)..];
    // Its body only (this function's own text names `.route(` too).
    let router = &router[..router.find("\n}\n").unwrap_or(router.len())];
    let mut routed = std::collections::BTreeSet::new();
    let mut rest = router;
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + 7..];
        let path_start = rest.find('"').map_or(0, |p| p + 1);
        let path_end = path_start + rest[path_start..].find('"').unwrap_or(0);
        let path = rest[path_start..path_end].to_owned();
        let end = rest.find("\n        .").unwrap_or(rest.len());
        let call = &rest[path_end..end];
        for (m, needle) in [
            ("GET", "get("),
            ("POST", "post("),
            ("PATCH", "patch("),
            ("DELETE", "delete("),
        ] {
            if call.contains(needle) {
                routed.insert(format!("{m} {path}"));
            }
        }
    }
    routed
}

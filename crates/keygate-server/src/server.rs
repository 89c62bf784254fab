//! The HTTP/1.1 server: the accept loop, per-connection limits, graceful shutdown, and the
//! dispatch of each request to forward-auth, the gateway or the management router.
//!
//! Built on hyper directly (not `axum::serve`) for what axum does not expose: a header read
//! timeout (slow-loris guard), a cap on the request head size, and a graceful shutdown that
//! waits for in-flight requests for a bounded time.

use crate::state::AppState;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Path prefixes keygate itself serves (a gateway route never shadows them).
const OWN_PATHS: &[&str] = &[
    "/v1/status",
    "/v1/health",
    "/metrics",
    "/v1/auth",
    "/v1/keys",
    "/v1/tenants",
    "/v1/users",
    "/v1/signup",
    "/v1/account",
    "/v1/password",
    "/v1/audit",
    "/v1/alerts",
    "/v1/webhooks",
    "/v1/oauth",
    "/oauth",
    "/.well-known/oauth-authorization-server",
    "/.well-known/jwks.json",
    "/openapi.json",
    "/docs",
    "/llms.txt",
    "/dashboard",
];

/// Whether `path` is one of keygate's own endpoints (`/v1/keys` and below, …).
pub fn is_own_path(path: &str) -> bool {
    OWN_PATHS.iter().any(|p| {
        path == *p
            || (path.len() > p.len() && path.starts_with(p) && path.as_bytes()[p.len()] == b'/')
    })
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything (`/v1/auth` too, unless `[forward_auth] listen` is set).
    Public,
    /// `[forward_auth] listen`: `/v1/auth` and the health checks.
    ForwardAuth,
    /// `[metrics] listen`: `GET /metrics` without a key.
    Metrics,
}

/// The client's address as keygate judges it (see [`crate::proxy`]), for handlers behind the
/// router.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<std::net::IpAddr>);

/// The per-connection service.
#[derive(Clone)]
struct Dispatch {
    router: Router,
    state: AppState,
    peer: SocketAddr,
    role: Role,
    /// Where forward-auth answers are held until their audit line is written (audit on).
    conn: Option<Arc<crate::held::Conn>>,
}

fn refuse(status: axum::http::StatusCode, code: &'static str, message: &'static str) -> BoxFuture {
    let res = axum::response::IntoResponse::into_response(crate::error::ApiError::new(
        status, code, message,
    ));
    Box::pin(std::future::ready(Ok(res)))
}

/// Refusals every request gets before anything else happens: a head larger than
/// `limits.max_header_bytes` (431), and two `Authorization` or `Origin` headers (400: an
/// ambiguous credential is an attack or a bug, and proxies disagree on which one wins).
fn check_head(state: &AppState, req: &Request<Body>) -> Option<BoxFuture> {
    use axum::http::{header, StatusCode};
    let h = req.headers();
    let mut size = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    // One pass (this runs on the hot path): the size, and how often the credential and the
    // origin came.
    let (mut authorization, mut origin) = (0u8, 0u8);
    for (n, v) in h {
        size += n.as_str().len() + v.len() + 4;
        if n == header::AUTHORIZATION {
            authorization = authorization.saturating_add(1);
        } else if n == header::ORIGIN {
            origin = origin.saturating_add(1);
        }
    }
    if size > state.config.limits.max_header_bytes {
        return Some(refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HEADERS_TOO_LARGE",
            "the request head is larger than limits.max_header_bytes",
        ));
    }
    if authorization > 1 || origin > 1 {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "send one Authorization header and at most one Origin header",
        ));
    }
    None
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Pipelined behind a forward-auth answer still held on this connection: nothing of
        // this request happens before that answer is released (see `crate::held::settle`).
        if let Some(conn) = self.conn.as_ref().filter(|c| c.unsettled()) {
            let (conn, this) = (Arc::clone(conn), self.clone());
            return Box::pin(async move {
                match crate::held::settle(&conn).await {
                    Ok(()) => this.dispatch(req).await,
                    Err(crate::held::Refused) => Ok(crate::held::refused()),
                }
            });
        }
        self.dispatch(req)
    }
}

impl Dispatch {
    fn dispatch(&self, req: Request<Incoming>) -> BoxFuture {
        let mut req = req.map(Body::new);
        if let Some(refusal) = check_head(&self.state, &req) {
            return refusal;
        }
        let path = req.uri().path();
        let forward_auth = path == "/v1/auth" || path.starts_with("/v1/auth/");
        let not_found = || {
            refuse(
                axum::http::StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "not found on this listener",
            )
        };
        match self.role {
            Role::Metrics if path == "/metrics" => {
                return Box::pin(async { Ok(crate::metrics::render().await) })
            }
            Role::Metrics => return not_found(),
            Role::ForwardAuth if !forward_auth && !path.starts_with("/v1/health/") => {
                return not_found()
            }
            Role::Public if forward_auth && !self.state.config.forward_auth.listen.is_empty() => {
                return not_found()
            }
            _ => {}
        }
        if forward_auth {
            // The hot path: straight to the decision, no router, no extensions.
            let state = self.state.clone();
            let peer = self.peer.ip();
            let conn = self.conn.clone();
            return Box::pin(async move {
                Ok(
                    crate::routes::verify::serve_forward_auth(&state, req, peer, conn.as_ref())
                        .await,
                )
            });
        }
        if !is_own_path(path) && !self.state.routes.is_empty() {
            let state = self.state.clone();
            let router = self.router.clone();
            let peer = self.peer;
            return Box::pin(async move { Ok(gateway_or_router(state, router, req, peer).await) });
        }
        with_peer(&self.state, &mut req, self.peer);
        let router = self.router.clone();
        Box::pin(tower::ServiceExt::oneshot(router, req))
    }
}

/// Gives a request for the router the TCP peer and the client's address.
fn with_peer(state: &AppState, req: &mut Request<Body>, peer: SocketAddr) {
    let ip = state.proxies.client_ip(req.headers(), peer.ip());
    req.extensions_mut().insert(ConnectInfo(peer));
    req.extensions_mut().insert(ClientIp(ip));
}

async fn gateway_or_router(
    state: AppState,
    router: Router,
    mut req: Request<Body>,
    peer: SocketAddr,
) -> Response<Body> {
    // One normal form for matching and forwarding; what has none is never forwarded
    // (`/public/../admin`, `/x/..;/admin`: the upstream may resolve them).
    let path = match keygate_core::normalize_path(req.uri().path()) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            return axum::response::IntoResponse::into_response(crate::error::ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                e.message(),
            ))
        }
    };
    if is_own_path(&path) {
        // `/v1/%61udit` is keygate's path in disguise: never forwarded, and the router (which
        // matches the path as sent) answers it.
        with_peer(&state, &mut req, peer);
        return match tower::ServiceExt::oneshot(router, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    if crate::cors::is_preflight(req.method(), req.headers()) {
        let requested = req
            .headers()
            .get(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let route = state
            .match_route(&requested, &path)
            .or_else(|| state.routes.iter().find(|r| state.route_matches(r, &path)));
        if route.is_some_and(|r| r.upstream.is_some()) {
            return crate::cors::preflight(&state, route, req.headers());
        }
    }
    let method = req.method().as_str().to_owned();
    match state.match_route(&method, &path) {
        Some(route) if route.upstream.is_some() => {
            crate::gateway::handle(&state, route, req, peer, &path).await
        }
        _ => {
            with_peer(&state, &mut req, peer);
            match tower::ServiceExt::oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    }
}

async fn run_connection<E: std::fmt::Display>(
    conn: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
) {
    if let Err(e) = conn.await {
        tracing::debug!("connection from {peer} ended: {e}");
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and waits up to
/// `limits.shutdown_grace_seconds` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    role: Role,
    router: Router,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.config.limits.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(
            limits.header_read_timeout_seconds.max(1),
        ))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let holds = state.audit.clone().map(|log| {
        let state = state.clone();
        crate::held::Holds::new(
            log,
            Box::new(move |allowed| {
                let state = state.clone();
                tokio::spawn(async move { state.refund(&allowed).await });
            }),
        )
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let mut svc = Dispatch { router: router.clone(), state: state.clone(), peer, role, conn: None };
                    match &holds {
                        Some(holds) => {
                            let (io, conn) = holds.accept(stream);
                            svc.conn = Some(conn);
                            let conn = graceful.watch(http.serve_connection(TokioIo::new(io), svc));
                            tokio::spawn(run_connection(conn, peer));
                        }
                        None => {
                            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
                            tokio::spawn(run_connection(conn, peer));
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = Duration::from_secs(limits.shutdown_grace_seconds);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace of {}s over; closing connections with requests in flight", grace.as_secs());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OWN_PATHS` keeps gateway routes off keygate's own endpoints, so it must cover every
    /// path the router serves, and name nothing the router (or `Dispatch`) does not serve.
    #[test]
    fn own_paths_are_the_routers_paths() {
        let routed = crate::startup::routed_from_source();
        assert!(routed.len() > 40, "{routed:?}");
        let paths: Vec<&str> = routed
            .iter()
            .filter_map(|r| r.split_once(' ').map(|(_, p)| p))
            .collect();
        for p in &paths {
            // `{id}` stands for any segment.
            let concrete = p.replace("{id}", "x").replace("{", "").replace("}", "");
            assert!(is_own_path(&concrete), "{p} is routed but not in OWN_PATHS");
        }
        // Served by `Dispatch` before the router.
        let dispatched = ["/v1/auth"];
        for own in OWN_PATHS {
            let served = dispatched.contains(own)
                || paths
                    .iter()
                    .any(|p| p == own || p.strip_prefix(own).is_some_and(|r| r.starts_with('/')));
            assert!(served, "{own} is in OWN_PATHS but nothing serves it");
        }
    }
}

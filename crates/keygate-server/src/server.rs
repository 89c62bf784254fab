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

/// The per-connection service.
#[derive(Clone)]
struct Dispatch {
    router: Router,
    state: AppState,
    peer: SocketAddr,
    /// Where forward-auth answers are held until their audit line is written (audit on).
    conn: Option<Arc<crate::held::Conn>>,
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
        let path = req.uri().path();
        if path == "/v1/auth" || path.starts_with("/v1/auth/") {
            // The hot path: straight to the decision, no router, no extensions.
            let state = self.state.clone();
            let peer = Some(self.peer.ip());
            let conn = self.conn.clone();
            return Box::pin(async move {
                let answer = crate::routes::verify::serve_forward_auth(&state, req, peer);
                Ok(match conn {
                    Some(c) => crate::held::scope(c, answer).await,
                    None => answer.await,
                })
            });
        }
        if !is_own_path(path) && !self.state.routes.is_empty() {
            let state = self.state.clone();
            let router = self.router.clone();
            let peer = self.peer;
            return Box::pin(async move { Ok(gateway_or_router(state, router, req, peer).await) });
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let router = self.router.clone();
        Box::pin(tower::ServiceExt::oneshot(router, req))
    }
}

async fn gateway_or_router(
    state: AppState,
    router: Router,
    mut req: Request<Body>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if !keygate_core::route::is_clean(&path) {
        // Never forward `/public/../admin` and friends: the upstream may resolve them.
        return axum::response::IntoResponse::into_response(crate::error::ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "the request path has dot segments, empty segments or encoded separators",
        ));
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
            .or_else(|| state.routes.iter().find(|r| r.pattern.matches(&path)));
        if route.is_some_and(|r| r.upstream.is_some()) {
            return crate::cors::preflight(&state, route, req.headers());
        }
    }
    let method = req.method().as_str().to_owned();
    match state.match_route(&method, &path) {
        Some(route) if route.upstream.is_some() => {
            crate::gateway::handle(&state, route, req, peer).await
        }
        _ => {
            req.extensions_mut().insert(ConnectInfo(peer));
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
                    let mut svc = Dispatch { router: router.clone(), state: state.clone(), peer, conn: None };
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

//! What every handler gets: the engine (`keygate_engine::Engine`, reached through `Deref`)
//! and the parts only HTTP needs: the gateway's upstream client and the trusted proxies.

use axum::http::HeaderMap;
use keygate_core::{Code, RequestFacts, RouteClass};
use keygate_engine::clock::now_ms;
use keygate_engine::Engine;
use std::sync::Arc;

/// Everything a handler needs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<Shared>);

/// The engine and the HTTP-only parts beside it.
#[derive(Debug)]
pub struct Shared {
    /// The engine (also what background tasks hold).
    pub engine: Arc<Engine>,
    /// `[proxy] trusted`.
    pub proxies: crate::proxy::TrustedProxies,
    /// The upstream client of the gateway.
    pub gateway: crate::gateway::Gateway,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl std::ops::Deref for Shared {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// The credential of an `Authorization` header: `Ok(None)` when absent, `Err` when present
/// but not `Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Code> {
    match headers.get(axum::http::header::AUTHORIZATION) {
        None => Ok(None),
        Some(v) => keygate_core::key::bearer_token(v.as_bytes()).map_err(|()| Code::MalformedKey),
    }
}

/// Facts for a management call: the route class and scope it needs, cost 0.
pub fn management_facts<'a>(
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
    ip: Option<std::net::IpAddr>,
    scope: &'a str,
    class: RouteClass,
) -> RequestFacts<'a> {
    RequestFacts {
        method,
        path: Some(path),
        route_class: class,
        scope: Some(scope),
        origin: headers
            .get(axum::http::header::ORIGIN)
            .and_then(|v| v.to_str().ok()),
        ip,
        tenant_id: headers
            .get(crate::headers::X_TENANT_ID)
            .and_then(|v| v.to_str().ok()),
        cost: 0,
        now_ms: now_ms(),
        management: true,
    }
}

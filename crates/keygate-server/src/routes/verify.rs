//! `POST /v1/keys/verify` (the verify API) and `GET /v1/auth` (forward-auth for nginx
//! `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz`). Both run the one pipeline.

use super::Ctx;
use crate::error::{ApiError, Json};
use crate::headers::*;
use crate::state::{bearer, AppState};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keygate_api::{BudgetLeft, RateView, VerifyAnswer, VerifyBody};
use keygate_core::{Code, RequestFacts, RouteClass};
use keygate_engine::clock::now_ms;
use keygate_engine::clock::rfc3339;
use std::net::IpAddr;

/// Scope to call the verify API.
pub const VERIFY: &str = "keys:verify";

/// Cost of a call when neither a route nor the caller names one.
pub const DEFAULT_COST: u64 = 1;

pub use keygate_engine::config::MAX_COST;

/// `POST /v1/keys/verify`: always 200 with `valid` and `code`, unless the caller itself is
/// refused.
#[utoipa::path(
    operation_id = "verify_verify",
    post,
    path = "/v1/keys/verify",
    tag = "verify",
    summary = "Judge a key (or OAuth access token) for a scope or a route",
    description = "Needs scope `keys:verify`.",
    request_body = VerifyBody,
    responses((status = 200, description = "Always 200 with `valid` and `code` for the key in the body", body = VerifyAnswer), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn verify(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<VerifyBody>,
) -> Result<Response, ApiError> {
    let caller = ctx
        .caller(&state, VERIFY, RouteClass::TokenManagement)
        .await?;
    let ip = body
        .ip
        .as_deref()
        .map(|s| s.trim().parse::<IpAddr>())
        .transpose()
        .map_err(|_| ApiError::invalid("ip must be an IPv4 or IPv6 address"))?;
    // The same normal form and refusals as the gateway and forward-auth.
    let path = body.path.as_deref().map(normal_path).transpose()?;
    let route = match (&body.method, &path) {
        (Some(m), Some(p)) => state.match_route(m, p),
        (None, None) => None,
        _ => return Err(ApiError::invalid("give method and path together")),
    };
    let scope = body
        .scope
        .as_deref()
        .or_else(|| route.and_then(|r| r.config.scope.as_deref()));
    if body.cost.is_some_and(|c| c > MAX_COST) {
        return Err(ApiError::invalid(format!(
            "cost must be at most {MAX_COST}"
        )));
    }
    let cost = body
        .cost
        .unwrap_or_else(|| route.map_or(DEFAULT_COST, |r| r.config.cost));
    let facts = RequestFacts {
        method: body.method.as_deref().unwrap_or("POST"),
        path: path.as_ref().map(|p| p.as_str()),
        route_class: route.map_or(RouteClass::Normal, |r| r.config.class),
        scope,
        origin: body.origin.as_deref(),
        ip,
        tenant_id: body.tenant_id.as_deref(),
        cost,
        now_ms: now_ms(),
        management: false,
    };
    let credential = if body.key.is_empty() {
        Ok(None)
    } else {
        Ok(Some(body.key.as_str()))
    };
    let visible = if caller.is_operator() {
        None
    } else {
        Some(caller.tenant())
    };
    let result = state.authorize(credential, &facts, visible).await;
    let (code, key, rate, metered) = match &result {
        Ok(a) => (Code::Valid, Some(&a.key), a.metered.rate, Some(a.metered)),
        Err(d) => (d.code, d.key.as_ref(), d.rate, None),
    };
    if code == Code::Unavailable {
        return Err(ApiError::decision(code, None));
    }
    let answer = VerifyAnswer {
        valid: code == Code::Valid,
        code: code.as_str().into(),
        key_id: key.map(|k| k.record.id.to_string()),
        tenant_id: key.map(|k| k.record.tenant_id.to_string()),
        user_id: key.and_then(|k| k.record.user_id.as_deref().map(str::to_owned)),
        kind: key.map(|k| k.record.kind.as_str().into()),
        scopes: key.map(|k| k.record.scopes.to_strings()),
        ratelimit: rate.map(|r| RateView {
            limit: r.limit,
            remaining: r.remaining,
            reset_seconds: r.reset_seconds,
            window_seconds: r.window_seconds,
        }),
        budget: key.and_then(|k| k.policy.budget).map(|limit| BudgetLeft {
            limit,
            remaining: metered.and_then(|m| m.budget_remaining),
        }),
        credits_remaining: metered.and_then(|m| m.credits_remaining),
        expires_at: key.and_then(|k| k.record.expires_at_ms).map(rfc3339),
    };
    let mut res = axum::Json(answer).into_response();
    if let Some(m) = metered {
        metered_headers(
            res.headers_mut(),
            &m,
            key.and_then(|k| k.policy_header.as_ref()),
        );
    }
    Ok(res)
}

fn strip_query(uri: &str) -> &str {
    uri.split_once('?').map_or(uri, |(p, _)| p)
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `/v1/auth` (any method, also `/v1/auth/<path>` for Envoy): the forward-auth decision for
/// `req` from TCP peer `peer`. The connection service (`server::Dispatch`) calls this directly,
/// without the router: it is the hot path.
///
/// With `conn` (audit on), the answer is held on that connection until its audit line is
/// written (`crate::held`); without, the handler waits for the line itself.
pub async fn serve_forward_auth(
    state: &AppState,
    req: axum::extract::Request,
    peer: IpAddr,
    conn: Option<&std::sync::Arc<crate::held::Conn>>,
) -> Response {
    let rid = keygate_engine::request_id::RequestId::new();
    // Only the head is needed (and `HeaderMap`, unlike the body, may be shared across awaits).
    let (parts, _body) = req.into_parts();
    // Envoy's ext_authz `path_prefix` sends `/v1/auth/<original path>` with the original method.
    let envoy = parts
        .uri
        .path_and_query()
        .and_then(|p| p.as_str().strip_prefix("/v1/auth"))
        .filter(|p| p.starts_with('/'))
        .map(|p| (parts.method.as_str(), p));
    let mut res = rid
        .clone()
        .scope(decide_forward_auth(
            state,
            &parts.headers,
            peer,
            envoy,
            conn,
        ))
        .await;
    res.headers_mut().insert(X_REQUEST_ID, rid.0);
    res
}

fn bad_request(message: &'static str) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message).into_response()
}

/// Whether two route lookups found the same route (or both none).
pub fn same_route(
    a: Option<&keygate_engine::engine::Route>,
    b: Option<&keygate_engine::engine::Route>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// The request path normalised (`keygate_core::route`), or the 400 for one that has no
/// normal form.
pub fn normal_path(path: &str) -> Result<keygate_core::NormalPath<'_>, ApiError> {
    keygate_core::normalize_path(strip_query(path))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", e.message()))
}

async fn decide_forward_auth(
    state: &AppState,
    h: &HeaderMap,
    peer: IpAddr,
    envoy: Option<(&str, &str)>,
    conn: Option<&std::sync::Arc<crate::held::Conn>>,
) -> Response {
    // Where `settle` may hold the answer (see `crate::held`).
    let on_conn = conn.map(crate::held::OnConn);
    let holder = on_conn
        .as_ref()
        .map(|c| c as &dyn keygate_engine::engine::Holder);
    // The headers that choose path, method, scope and price count only from a trusted proxy;
    // from anyone else they are refused, not ignored: ignoring them would judge a request the
    // operator's proxy meant to restrict as if it were unrestricted.
    let carried = crate::proxy::Carried::of(h);
    if carried.decision {
        if !state.proxies.trusts(peer) {
            return bad_request(
                "X-Original-*, X-Forwarded-Method/-Uri, X-Keygate-Scope and X-Keygate-Cost are \
                 accepted only from a trusted proxy ([proxy] trusted)",
            );
        }
        if carried.repeated {
            return bad_request("a forwarding header was sent twice");
        }
    }
    // X-Forwarded-Method/-Uri first: Traefik and Caddy always overwrite them, while a client
    // could smuggle an X-Original-* header through them. nginx must set both (see the docs).
    let method = header(h, &X_FORWARDED_METHOD)
        .or_else(|| header(h, &X_ORIGINAL_METHOD))
        .or(envoy.map(|e| e.0))
        .unwrap_or("GET");
    let uri = header(h, &X_FORWARDED_URI)
        .or_else(|| header(h, &X_ORIGINAL_URI))
        .or(envoy.map(|e| e.1));
    let query = uri.and_then(|u| u.split_once('?')).map(|(_, q)| q);
    let over =
        match crate::proxy::method_override(carried.method_override.then_some(h), query, method) {
            Ok(o) => o,
            Err(m) => return bad_request(m),
        };
    let path = match uri.map(normal_path).transpose() {
        Ok(p) => p,
        // `/public/../admin`, `/x/..;/admin`, encoded slashes: refuse rather than guess what
        // the upstream will make of it.
        Err(e) => return e.into_response(),
    };
    let path = path.as_ref();
    let ip = state.proxies.client_ip(h, peer);
    let route = path.and_then(|p| state.match_route(method, p));
    // An overridden method is judged with the request's own: both must lead to the same
    // route, and a DELETE either way is a DELETE (closed to `pk` keys).
    let method = match &over {
        None => method,
        Some(o) => {
            let other = path.and_then(|p| state.match_route(o, p));
            if !same_route(route, other) {
                return bad_request(
                    "the method override names a method that another route serves: send that \
                     method itself",
                );
            }
            if o == "DELETE" {
                "DELETE"
            } else {
                method
            }
        }
    };
    if route.is_some_and(|r| r.config.public) {
        // No key is asked for: the per-address limit decides, and the decision is audited
        // and counted like any other.
        let public = RequestFacts {
            method,
            path: path.map(|p| p.as_str()),
            route_class: RouteClass::Normal,
            scope: None,
            origin: header(h, &axum::http::header::ORIGIN),
            ip,
            tenant_id: None,
            cost: 0,
            now_ms: now_ms(),
            management: false,
        };
        let decided = state.decide_public(&public).await;
        return match state.settle(decided, holder).await {
            Ok(d) => {
                let mut res = StatusCode::OK.into_response();
                rate_headers(res.headers_mut(), &d, None);
                res
            }
            Err(d) => ApiError::denied(&d).into_response(),
        };
    }
    let proxy_cost = match header(h, &X_KEYGATE_COST).map(str::parse::<u64>) {
        None => None,
        Some(Ok(c)) if c <= MAX_COST => Some(c),
        Some(_) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "X-Keygate-Cost must be a whole number of at most 1000000000",
            )
            .into_response()
        }
    };
    let facts = RequestFacts {
        method,
        path: path.map(|p| p.as_str()),
        route_class: route.map_or(RouteClass::Normal, |r| r.config.class),
        scope: match route {
            Some(r) => r.config.scope.as_deref(),
            None => header(h, &X_KEYGATE_SCOPE),
        },
        origin: header(h, &axum::http::header::ORIGIN),
        ip,
        tenant_id: header(h, &X_TENANT_ID),
        cost: route.map_or(proxy_cost.unwrap_or(DEFAULT_COST), |r| r.config.cost),
        now_ms: now_ms(),
        management: false,
    };
    let decided = state.decide(bearer(h), &facts, None).await;
    match state.settle(decided, holder).await {
        Ok(a) => {
            let mut res = StatusCode::OK.into_response();
            let out = res.headers_mut();
            out.reserve(12);
            out.insert(X_KEYGATE_KEY_ID, a.key.id_header.clone());
            out.insert(X_KEYGATE_TENANT, a.key.tenant_header.clone());
            // Always sent, empty without a user: Caddy 2.6's copy_headers would otherwise pass
            // an unresolved placeholder to the app.
            out.insert(
                X_KEYGATE_USER,
                a.key
                    .user_header
                    .clone()
                    .unwrap_or(HeaderValue::from_static("")),
            );
            out.insert(X_KEYGATE_SCOPES, a.key.scopes_header.clone());
            out.insert(X_KEYGATE_CODE, HeaderValue::from_static("VALID"));
            metered_headers(out, &a.metered, a.key.policy_header.as_ref());
            res
        }
        Err(d) => ApiError::denied(&d).into_response(),
    }
}

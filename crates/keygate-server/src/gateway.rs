//! The reverse-proxy gateway: requests matching a `[[routes]]` entry with an `upstream` are
//! decided by the same pipeline as forward-auth and, if allowed, streamed to the upstream
//! through a pooled keep-alive client.
//!
//! Headers (RFC 9110 §7.6.1): hop-by-hop headers and those named in `Connection` are dropped
//! both ways; `Authorization`, every header keygate sets or trusts (`X-Keygate-*`,
//! `X-Forwarded-*`, `X-Original-*`, `X-Real-IP`, `Forwarded`, `X-Tenant-Id`, also spelled with
//! `_`) and method-override headers are removed before forwarding;
//! `X-Keygate-Key-Id`/`-Tenant`/`-User`/`-Scopes` and `X-Forwarded-For`/`-Proto`/`-Host` are
//! set (a trusted proxy's `X-Forwarded-For`, `-Proto` and `-Host` are carried on); `Host`
//! becomes the upstream's. The path forwarded is the normalised one the decision was about.
//!
//! Credits: a refused request never reaches the upstream and spends nothing. An allowed
//! request is charged when the upstream answers — whatever its status, 5xx included, since
//! keygate cannot tell whether the upstream did the work. When keygate itself has to answer
//! 502/504 (connection refused, reset or timed out before a response head), the credits are
//! given back; the rate-limit slot stays used.

use crate::cors;
use crate::error::{ApiError, RequestId};
use crate::headers::*;
use crate::state::AppState;
use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keygate_core::{NormalPath, RequestFacts, RouteClass};
use keygate_engine::clock::now_ms;
use keygate_engine::config::Upstream;
use keygate_engine::engine::Route;
use std::net::SocketAddr;
use std::time::Duration;

/// The pooled upstream client.
#[derive(Debug, Clone)]
pub struct Gateway {
    client: Client<HttpConnector, Body>,
}

impl Gateway {
    /// A client with the configured connect timeout and pool size.
    pub fn new(cfg: &keygate_engine::config::GatewayConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms.max(1))));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);
        Self { client }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the old `Keep-Alive`/`Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
    h.remove(header::TRANSFER_ENCODING);
}

fn str_header<'a>(h: &'a HeaderMap, n: &HeaderName) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

/// Serves a request that matched `route` (which has an upstream).
pub async fn handle(
    state: &AppState,
    route: &Route,
    req: Request<Body>,
    peer: SocketAddr,
    path: &NormalPath<'_>,
) -> Response<Body> {
    let rid = RequestId::new();
    let mut res = rid
        .clone()
        .scope(handle_inner(state, route, req, peer, path))
        .await;
    res.headers_mut().insert(X_REQUEST_ID, rid.0);
    res
}

async fn handle_inner(
    state: &AppState,
    route: &Route,
    req: Request<Body>,
    peer: SocketAddr,
    path: &NormalPath<'_>,
) -> Response<Body> {
    let Some(upstream) = &route.upstream else {
        return ApiError::not_found("route").into_response();
    };
    let h = req.headers();
    let ip = state.proxies.client_ip(h, peer.ip());
    let origin = str_header(h, &header::ORIGIN).map(str::to_owned);
    let now = now_ms();
    // An overridden method (which the upstream may obey: a `_method` query parameter is
    // forwarded, the headers are not) must lead to the same route; a DELETE either way is a
    // DELETE.
    let over = match crate::proxy::method_override(
        crate::proxy::Carried::of(h).method_override.then_some(h),
        req.uri().query(),
        req.method().as_str(),
    ) {
        Ok(o) => o,
        Err(m) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", m).into_response()
        }
    };
    if let Some(o) = &over {
        let other = state.match_route(o, path);
        if !crate::routes::verify::same_route(Some(route), other) {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "the method override names a method that another route serves: send that \
                 method itself",
            )
            .into_response();
        }
    }
    if route.config.public {
        // No key is asked for: the per-address limit decides, and the decision is audited
        // and counted like any other.
        let facts = RequestFacts {
            method: req.method().as_str(),
            path: Some(path.as_str()),
            route_class: RouteClass::Normal,
            scope: None,
            origin: origin.as_deref(),
            ip,
            tenant_id: None,
            cost: 0,
            now_ms: now,
            management: false,
        };
        let decided = state.decide_public(&facts).await;
        let d = match state.settle(decided, None).await {
            Ok(d) => d,
            Err(d) => {
                let mut res = ApiError::denied(&d).into_response();
                cors::decorate(res.headers_mut(), origin.as_deref(), true);
                return res;
            }
        };
        let mut res = forward(state, upstream, req, peer, path, None)
            .await
            .unwrap_or_else(|(e, _)| e.into_response());
        rate_headers(res.headers_mut(), &d, None);
        cors::decorate(res.headers_mut(), origin.as_deref(), true);
        return res;
    }
    let facts = RequestFacts {
        method: match over.as_deref() {
            Some("DELETE") => "DELETE",
            _ => req.method().as_str(),
        },
        path: Some(path.as_str()),
        route_class: route.config.class,
        scope: route.config.scope.as_deref(),
        origin: origin.as_deref(),
        ip,
        tenant_id: str_header(h, &X_TENANT_ID),
        cost: route.config.cost,
        now_ms: now,
        management: false,
    };
    let allowed = match state.authorize(crate::state::bearer(h), &facts, None).await {
        Ok(a) => a,
        Err(d) => {
            let origin_ok = d.key.as_ref().is_some_and(|k| {
                origin
                    .as_deref()
                    .is_some_and(|o| k.record.allowed_origins.allows(o))
            });
            let mut res = ApiError::denied(&d).into_response();
            cors::decorate(res.headers_mut(), origin.as_deref(), origin_ok);
            return res;
        }
    };
    let key = allowed.key.clone();
    let mut res = match forward(state, upstream, req, peer, path, Some(&allowed)).await {
        Ok(r) => r,
        Err((e, refundable)) => {
            // keygate answers for the upstream. If the upstream never answered, the call was
            // not served: refund the meter that charged it, and only what it charged.
            if refundable {
                state.refund(&allowed).await;
            }
            e.into_response()
        }
    };
    metered_headers(
        res.headers_mut(),
        &allowed.metered,
        key.policy_header.as_ref(),
    );
    let origin_ok = origin
        .as_deref()
        .is_some_and(|o| key.record.allowed_origins.allows(o));
    cors::decorate(res.headers_mut(), origin.as_deref(), origin_ok);
    res
}

fn upstream_error(code: &'static str, status: StatusCode, message: &'static str) -> ApiError {
    ApiError::new(status, code, message)
}

/// Sends the request upstream and streams the answer back.
async fn forward(
    state: &AppState,
    upstream: &Upstream,
    req: Request<Body>,
    peer: SocketAddr,
    path: &NormalPath<'_>,
    allowed: Option<&keygate_engine::engine::Allowed>,
) -> Result<Response<Body>, (ApiError, bool)> {
    // The bool: whether the upstream never answered (so the call may be refunded).
    let (mut parts, body) = req.into_parts();
    let max = state.config.gateway.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err((
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body too large",
            ),
            true,
        ));
    }
    // A request without Content-Length or Transfer-Encoding has no body (RFC 9112 §6.3): send
    // none upstream. Forwarding an "unknown length" body would make the client use chunked
    // encoding, and an upstream that does not read it must then close the connection.
    let has_body =
        parts.headers.contains_key(header::TRANSFER_ENCODING) || declared.is_some_and(|n| n > 0);
    // The path the decision was about, in its normal form, and the query as sent.
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}?{q}", path.as_str()),
        None => path.as_str().to_owned(),
    };
    let original_host = parts.headers.get(header::HOST).cloned();
    let peer_trusted = state.proxies.trusts(peer.ip());
    // A trusted proxy's chain (every line of it, as one list) is carried on with the peer
    // appended; anyone else's is replaced by the peer.
    let mut xff = String::new();
    if peer_trusted {
        for v in parts.headers.get_all(X_FORWARDED_FOR) {
            if let Ok(v) = v.to_str() {
                xff.push_str(v);
                xff.push_str(", ");
            }
        }
    }
    xff.push_str(&peer.ip().to_string());
    let xf = |n: &'static str| parts.headers.get(n).filter(|_| peer_trusted).cloned();
    let proto = xf("x-forwarded-proto").unwrap_or(HeaderValue::from_static("http"));
    let forwarded_host = xf("x-forwarded-host").or(original_host);
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    // The key, client-supplied claims about who or where it is (also spelled with `_`, which
    // WSGI, CGI and Rack read as `-`), and method overrides the upstream framework would obey
    // although keygate judged the request's own method: the upstream gets keygate's instead.
    let spoofed: Vec<HeaderName> = h
        .keys()
        .filter(|n| crate::proxy::is_trust_header(n.as_str()))
        .cloned()
        .collect();
    for n in spoofed {
        h.remove(n);
    }
    if let Some(a) = allowed {
        h.insert(X_KEYGATE_KEY_ID, a.key.id_header.clone());
        h.insert(X_KEYGATE_TENANT, a.key.tenant_header.clone());
        if let Some(u) = &a.key.user_header {
            h.insert(X_KEYGATE_USER, u.clone());
        }
        h.insert(X_KEYGATE_SCOPES, a.key.scopes_header.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(HeaderName::from_static("x-forwarded-proto"), proto);
    if let Some(host) = forwarded_host {
        h.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    h.insert(header::HOST, upstream.host_header().clone());
    parts.uri = upstream.uri_for(&path_and_query).ok_or_else(|| {
        (
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "the request path cannot be forwarded",
            ),
            true,
        )
    })?;
    parts.version = axum::http::Version::HTTP_11;
    let limited = if has_body {
        Body::new(Limited::new(
            body,
            usize::try_from(max).unwrap_or(usize::MAX),
        ))
    } else {
        Body::empty()
    };
    let out = Request::from_parts(parts, limited);
    let timeout = Duration::from_secs(state.config.gateway.upstream_timeout_seconds.max(1));
    let resp = match tokio::time::timeout(timeout, state.gateway.client.request(out)).await {
        Err(_) => {
            return Err((
                upstream_error(
                    "GATEWAY_TIMEOUT",
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer in time",
                ),
                true,
            ))
        }
        Ok(Err(e)) => {
            if is_body_too_large(&e) {
                return Err((
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "PAYLOAD_TOO_LARGE",
                        "request body too large",
                    ),
                    true,
                ));
            }
            tracing::warn!(upstream = %upstream.authority(), "upstream request failed: {e}");
            return Err((
                upstream_error(
                    "BAD_GATEWAY",
                    StatusCode::BAD_GATEWAY,
                    "the upstream could not be reached",
                ),
                true,
            ));
        }
        Ok(Ok(r)) => r,
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    let small = rparts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= SMALL_BODY);
    if small {
        // A small body of known length is read whole, so the answer leaves in one write
        // (head and body together) instead of one write per frame: on loopback each write
        // costs as much as the rest of the request. Larger bodies stream.
        if let Ok(Ok(collected)) = tokio::time::timeout(timeout, rbody.collect()).await {
            return Ok(Response::from_parts(
                rparts,
                Body::from(collected.to_bytes()),
            ));
        }
        return Err((
            upstream_error(
                "BAD_GATEWAY",
                StatusCode::BAD_GATEWAY,
                "the upstream's answer was cut short",
            ),
            false,
        ));
    }
    Ok(Response::from_parts(
        rparts,
        Body::new(rbody.map_err(axum::Error::new)),
    ))
}

/// Upstream answers up to this size (with a Content-Length) are sent on in one piece.
const SMALL_BODY: u64 = 64 * 1024;

fn is_body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

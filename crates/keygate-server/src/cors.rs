//! CORS for publishable keys.
//!
//! A browser's preflight (`OPTIONS` with `Access-Control-Request-Method`) carries no key, so it
//! is answered for origins that *some* active `pk` key allows (the index below, rebuilt from the
//! store whenever a `pk` key is created, changed, rotated or revoked). The real request carries
//! the key and is judged against that key's own origin list; its answer echoes the origin in
//! `Access-Control-Allow-Origin` (never `*` on a keyed route) only when that key allows it.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Response, StatusCode};
use axum::response::IntoResponse;
use keygate_core::Code;
use keygate_engine::engine::Route;

pub use keygate_engine::origins::{pk_changed, refresh, refresh_after_change, CorsIndex};

const EXPOSE: HeaderValue = HeaderValue::from_static(
    "RateLimit, RateLimit-Policy, Retry-After, X-Credits-Remaining, X-Request-Id, X-Keygate-Code",
);

/// Adds `Vary: Origin` to any answer to a request with an `Origin`, and the CORS headers when
/// `allowed`.
pub fn decorate(h: &mut HeaderMap, origin: Option<&str>, allowed: bool) {
    let Some(origin) = origin else { return };
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if !allowed {
        h.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        h.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
        return;
    }
    if let Ok(v) = HeaderValue::from_str(origin) {
        // keygate answers CORS for its routes: an upstream's own CORS headers (credentials
        // above all) must not widen what an echoed origin may read.
        for n in [
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
        ] {
            h.remove(n);
        }
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
    }
}

/// Whether `h` is a CORS preflight.
pub fn is_preflight(method: &axum::http::Method, h: &HeaderMap) -> bool {
    method == axum::http::Method::OPTIONS
        && h.contains_key(header::ORIGIN)
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Answers a preflight for a gateway route: 204 with the CORS headers when the origin is
/// allowed (by some active `pk` key, or any origin on a public route), else 403.
pub fn preflight(state: &AppState, route: Option<&Route>, h: &HeaderMap) -> Response<Body> {
    let origin = h
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let requested = h
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(route) = route else {
        return ApiError::not_found("route").into_response();
    };
    let method_ok = route.methods.is_empty()
        || route
            .methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(requested));
    let origin_ok = route.config.public || state.cors.allows(origin);
    if !origin_ok || !method_ok {
        let mut res = ApiError::decision(Code::OriginNotAllowed, None).into_response();
        if !method_ok {
            res = ApiError::new(
                StatusCode::FORBIDDEN,
                "METHOD_NOT_ALLOWED",
                "this route does not accept that method",
            )
            .into_response();
        }
        res.headers_mut()
            .append(header::VARY, HeaderValue::from_static("Origin"));
        return res;
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    let out = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    let methods = if route.methods.is_empty() {
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE")
    } else {
        HeaderValue::from_str(&route.methods.join(", ")).unwrap_or(HeaderValue::from_static("GET"))
    };
    out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, X-Tenant-Id"),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    out.append(header::VARY, HeaderValue::from_static("Origin"));
    res
}

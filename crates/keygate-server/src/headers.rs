//! Header names (as constants: a `&str` name is parsed and validated on every use, a
//! `HeaderName` constant is not) and the headers shared by every metered answer.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use keygate_core::RateDecision;
use keygate_counters::Metered;
use keygate_engine::login::Refused;

macro_rules! names {
    ($($id:ident = $s:literal;)*) => {
        $(#[doc = concat!("`", $s, "`")] pub const $id: HeaderName = HeaderName::from_static($s);)*
    };
}

names! {
    X_KEYGATE_KEY_ID = "x-keygate-key-id";
    X_KEYGATE_TENANT = "x-keygate-tenant";
    X_KEYGATE_USER = "x-keygate-user";
    X_KEYGATE_SCOPES = "x-keygate-scopes";
    X_KEYGATE_CODE = "x-keygate-code";
    X_KEYGATE_MESSAGE = "x-keygate-message";
    X_KEYGATE_SCOPE = "x-keygate-scope";
    X_KEYGATE_COST = "x-keygate-cost";
    X_REQUEST_ID = "x-request-id";
    X_TENANT_ID = "x-tenant-id";
    X_FORWARDED_FOR = "x-forwarded-for";
    X_REAL_IP = "x-real-ip";
    X_ORIGINAL_METHOD = "x-original-method";
    X_ORIGINAL_URI = "x-original-uri";
    X_FORWARDED_METHOD = "x-forwarded-method";
    X_FORWARDED_URI = "x-forwarded-uri";
    X_CREDITS_REMAINING = "x-credits-remaining";
    RATELIMIT = "ratelimit";
    RATELIMIT_POLICY = "ratelimit-policy";
}

/// The `RateLimit-Policy` value: `"key";q=LIMIT;w=WINDOW`.
pub use keygate_engine::engine::policy_value;

/// IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers, structured-field form):
/// `RateLimit-Policy: "key";q=30;w=60` and `RateLimit: "key";r=12;t=40`. `policy` is the
/// precomputed policy value when the caller has one.
pub fn rate_headers(h: &mut HeaderMap, r: &RateDecision, policy: Option<&HeaderValue>) {
    let p = match policy {
        Some(p) => p.clone(),
        None => policy_value(r.limit, r.window_seconds),
    };
    h.insert(RATELIMIT_POLICY, p);
    // `try_from(String)` takes the buffer over: one allocation for the value.
    if let Ok(v) = HeaderValue::try_from(format!("\"key\";r={};t={}", r.remaining, r.reset_seconds))
    {
        h.insert(RATELIMIT, v);
    }
}

/// Headers of an allowed, metered answer: RateLimit and `X-Credits-Remaining` (the smaller of
/// the key's budget and the tenant's pool, when either is limited).
pub fn metered_headers(h: &mut HeaderMap, m: &Metered, policy: Option<&HeaderValue>) {
    if let Some(r) = &m.rate {
        rate_headers(h, r, policy);
    }
    let credits = match (m.budget_remaining, m.credits_remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(c) = credits {
        h.insert(X_CREDITS_REMAINING, HeaderValue::from(c));
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for keygate's own pages: `HttpOnly`, `SameSite=Lax`, limited to
/// `path`, and `Secure` when the deployment is served over TLS (its issuer is https).
pub fn set_cookie(
    issuer: &str,
    path: &str,
    name: &str,
    value: &str,
    max_age_s: i64,
) -> HeaderValue {
    let secure = if issuer.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("kg_invalid=1"))
}

/// `Retry-After` (whole seconds, at least 1) of a refused attempt, if it has one.
pub fn login_retry_after(r: Refused) -> Option<HeaderValue> {
    match r {
        Refused::Wait(ms) => Some(HeaderValue::from(ms.div_ceil(1000).max(1))),
        Refused::Unavailable => None,
    }
}

/// The status of a refused attempt: 429, or 503 without a store.
pub fn login_refusal_status(r: Refused) -> StatusCode {
    match r {
        Refused::Wait(_) => StatusCode::TOO_MANY_REQUESTS,
        Refused::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

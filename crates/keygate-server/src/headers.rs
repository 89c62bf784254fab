//! Response headers shared by every metered answer.

use axum::http::{HeaderMap, HeaderValue};
use keygate_core::RateDecision;
use keygate_counters::Metered;

/// IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers, structured-field form):
/// `RateLimit-Policy: "key";q=30;w=60` and `RateLimit: "key";r=12;t=40`.
pub fn rate_headers(h: &mut HeaderMap, r: &RateDecision) {
    if let Ok(v) = HeaderValue::from_str(&format!("\"key\";q={};w={}", r.limit, r.window_seconds)) {
        h.insert("ratelimit-policy", v);
    }
    if let Ok(v) =
        HeaderValue::from_str(&format!("\"key\";r={};t={}", r.remaining, r.reset_seconds))
    {
        h.insert("ratelimit", v);
    }
}

/// Headers of an allowed, metered answer: RateLimit and `X-Credits-Remaining` (the smaller of
/// the key's budget and the tenant's pool, when either is limited).
pub fn metered_headers(h: &mut HeaderMap, m: &Metered) {
    if let Some(r) = &m.rate {
        rate_headers(h, r);
    }
    let credits = match (m.budget_remaining, m.credits_remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(c) = credits {
        h.insert("x-credits-remaining", HeaderValue::from(c));
    }
}

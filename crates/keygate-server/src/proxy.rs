//! Who the client is, and which headers about it count.
//!
//! Headers that carry trust — `X-Forwarded-For`, `X-Real-IP`, `X-Original-*`,
//! `X-Forwarded-Method`/`-Uri`, `X-Keygate-Scope`, `X-Keygate-Cost` — count only from a TCP
//! peer inside `[proxy] trusted`. Everyone else is the client itself.

use crate::headers::{X_FORWARDED_FOR, X_REAL_IP};
use axum::http::{HeaderMap, HeaderName};
use keygate_core::IpAllowList;
use std::net::IpAddr;

/// The configured trusted proxies (empty: nobody).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(IpAllowList);

impl TrustedProxies {
    /// From `[proxy] trusted`, parsed ([`keygate_engine::config::Config::compile`]).
    pub fn new(list: IpAllowList) -> Self {
        Self(list)
    }

    /// Whether `ip` is a trusted proxy.
    #[inline]
    pub fn trusts(&self, ip: IpAddr) -> bool {
        !self.0.is_empty() && self.0.contains(ip)
    }

    /// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
    /// right-most `X-Forwarded-For` entry (across all its header lines, each entry read on its
    /// own) that is not itself a trusted proxy — entries to its left were written by the
    /// client —, else `X-Real-IP`, else the peer. `None` (unknown: an IP allow-list refuses
    /// it) when a malformed entry comes before any untrusted one: what lies beyond it cannot
    /// be believed, and the proxy's own address must never stand in for its client.
    pub fn client_ip(&self, h: &HeaderMap, peer: IpAddr) -> Option<IpAddr> {
        if !self.trusts(peer) {
            return Some(peer);
        }
        let mut last = None;
        for v in h.get_all(X_FORWARDED_FOR).iter().rev() {
            for entry in v.as_bytes().rsplit(|b| *b == b',') {
                let ip = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|e| e.trim().parse::<IpAddr>().ok())?;
                if !self.trusts(ip) {
                    return Some(ip);
                }
                last = Some(ip);
            }
        }
        if last.is_some() {
            return last;
        }
        match h.get(X_REAL_IP) {
            None => Some(peer),
            Some(v) => v.to_str().ok().and_then(|s| s.trim().parse().ok()),
        }
    }
}

/// Request headers that only a trusted proxy may send to forward-auth: they choose the path,
/// method, scope and price the decision is about.
pub const DECISION_HEADERS: [HeaderName; 6] = [
    crate::headers::X_ORIGINAL_METHOD,
    crate::headers::X_ORIGINAL_URI,
    crate::headers::X_FORWARDED_METHOD,
    crate::headers::X_FORWARDED_URI,
    crate::headers::X_KEYGATE_SCOPE,
    crate::headers::X_KEYGATE_COST,
];

/// What a forward-auth request carries of the headers that need care, found in one pass over
/// its headers (the hot path): whether any decision header came, whether one came twice, and
/// whether a method override may be there.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    /// A header of [`DECISION_HEADERS`] is present.
    pub decision: bool,
    /// One of them is present more than once.
    pub repeated: bool,
    /// A header of [`METHOD_OVERRIDE`] is present.
    pub method_override: bool,
}

impl Carried {
    /// Reads `h` once.
    pub fn of(h: &HeaderMap) -> Self {
        let mut out = Carried::default();
        for name in h.keys() {
            if DECISION_HEADERS.iter().any(|d| d == name) {
                out.decision = true;
                if h.get_all(name).iter().nth(1).is_some() {
                    out.repeated = true;
                }
            } else if METHOD_OVERRIDE.iter().any(|m| m == name) {
                out.method_override = true;
            }
        }
        out
    }
}

/// Headers that ask the upstream framework to treat the request as another method
/// (Express's `method-override`, Symfony, Laravel).
pub const METHOD_OVERRIDE: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The method a request asks its upstream framework to serve it as instead of its own: the
/// override headers (Express's `method-override`, Symfony, OData) and a `_method` query
/// parameter (Laravel turns on Symfony's); `h` is `None` when [`Carried`] found no override
/// header. `Ok(None)` when there is none, or it names the
/// request's own method. Refused (the message) when a value is not one method name (Express
/// takes the first of `DELETE, GET`) or two values disagree (frameworks differ on which one
/// wins): a request that could be read two ways is not judged as either.
pub fn method_override(
    h: Option<&HeaderMap>,
    query: Option<&str>,
    method: &str,
) -> Result<Option<String>, &'static str> {
    let mut found: Option<String> = None;
    let mut take = |v: &str| -> Result<(), &'static str> {
        let v = v.trim();
        if v.is_empty() || v.len() > 16 || !v.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err("a method override must name one method");
        }
        match &found {
            Some(f) if !f.eq_ignore_ascii_case(v) => {
                Err("method overrides that disagree are refused")
            }
            Some(_) => Ok(()),
            None => {
                found = Some(v.to_ascii_uppercase());
                Ok(())
            }
        }
    };
    if let Some(h) = h {
        for name in &METHOD_OVERRIDE {
            for v in h.get_all(name) {
                take(
                    v.to_str()
                        .map_err(|_| "a method override must name one method")?,
                )?;
            }
        }
    }
    if let Some(q) = query {
        let named = q
            .as_bytes()
            .windows(6)
            .any(|w| w.eq_ignore_ascii_case(b"method"));
        if named || q.contains('%') {
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(q).map_err(|_| "the query string cannot be read")?;
            for (k, v) in pairs {
                if k.eq_ignore_ascii_case("_method") {
                    take(&v)?;
                }
            }
        }
    }
    Ok(found.filter(|f| !f.eq_ignore_ascii_case(method)))
}

/// Whether a request header is one keygate sets or trusts, with `_` read as `-` (WSGI, CGI and
/// Rack read `X_Keygate_User` as `HTTP_X_KEYGATE_USER`, the same as `X-Keygate-User`).
pub fn is_trust_header(name: &str) -> bool {
    // Compared in place, byte by byte: this runs for every header of every proxied request.
    fn norm(b: u8) -> u8 {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    }
    let n = name.as_bytes();
    let starts =
        |p: &str| n.len() >= p.len() && n.iter().zip(p.bytes()).all(|(a, b)| norm(*a) == b);
    let is = |p: &str| n.len() == p.len() && starts(p);
    ["x-keygate-", "x-forwarded-", "x-original-"]
        .iter()
        .any(|p| starts(p))
        || [
            "authorization",
            "forwarded",
            "x-real-ip",
            "x-tenant-id",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-rewrite-url",
        ]
        .iter()
        .any(|p| is(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(xff: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in xff {
            m.append(X_FORWARDED_FOR, HeaderValue::from_str(v).expect("value"));
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let t = TrustedProxies::new(IpAllowList::default());
        assert_eq!(
            t.client_ip(&h(&["10.1.2.3"]), ip("203.0.113.9")),
            Some(ip("203.0.113.9"))
        );
        let t = TrustedProxies::new(IpAllowList::parse(&["127.0.0.1/32"]).expect("list"));
        assert_eq!(
            t.client_ip(&h(&["10.1.2.3"]), ip("203.0.113.9")),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn behind_trusted_proxies_the_first_untrusted_hop_from_the_right() {
        let t =
            TrustedProxies::new(IpAllowList::parse(&["127.0.0.1/32", "10.0.0.0/8"]).expect("list"));
        let peer = ip("127.0.0.1");
        assert_eq!(
            t.client_ip(&h(&["6.6.6.6, 198.51.100.7, 10.0.0.5"]), peer),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            t.client_ip(&h(&["6.6.6.6", "198.51.100.7"]), peer),
            Some(ip("198.51.100.7"))
        );
        // A malformed entry before any untrusted one: unknown, never the proxy itself.
        assert_eq!(t.client_ip(&h(&["junk, 10.0.0.5"]), peer), None);
        assert_eq!(t.client_ip(&h(&["198.51.100.7, junk"]), peer), None);
        assert_eq!(t.client_ip(&HeaderMap::new(), peer), Some(peer));
        // nginx appends its client to the client's own line: a non-ASCII byte the client put
        // there must not hide the entry nginx wrote.
        let mut m = HeaderMap::new();
        m.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 198.51.100.7").expect("value"),
        );
        assert_eq!(t.client_ip(&m, peer), Some(ip("198.51.100.7")));
    }

    #[test]
    fn underscore_spellings_are_trust_headers() {
        for n in [
            "X_Keygate_User",
            "x-keygate_tenant",
            "X_FORWARDED_FOR",
            "x_real_ip",
            "X_HTTP_METHOD_OVERRIDE",
            "X-Rewrite-URL",
            "x_original_url",
        ] {
            assert!(is_trust_header(n), "{n}");
        }
        assert!(!is_trust_header("x_request_id"));
        assert!(!is_trust_header("content-type"));
    }
}

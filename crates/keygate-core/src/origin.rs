//! Origin allow-lists: exact origins (`https://app.example.com`, `http://localhost:3000`) and
//! one-level-or-deeper wildcards (`https://*.example.com`, which does not match the apex).
//!
//! Matching follows how browsers serialise the `Origin` header (RFC 6454): scheme, host and
//! port, no path; default ports (80 for http, 443 for https) are implied. Comparison is
//! ASCII case-insensitive. The opaque origin `null` never matches.

use crate::InvalidInput;

/// A parsed origin (from a request's `Origin` header), borrowing the header text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    https: bool,
    host: &'a str,
    port: Option<u16>,
}

impl<'a> Origin<'a> {
    /// Parses `scheme://host[:port]` (http or https only). Returns `None` for anything else,
    /// including `null` and origins with a path.
    pub fn parse(s: &'a str) -> Option<Self> {
        let (https, rest) = if let Some(r) = strip_prefix_ci(s, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(s, "http://") {
            (false, r)
        } else {
            return None;
        };
        let (host, port) = split_host_port(rest)?;
        if !plausible_host(host) {
            return None;
        }
        let default = if https { 443 } else { 80 };
        let port = port.filter(|&p| p != default);
        Some(Origin { https, host, port })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Splits `host[:port]`; `[v6]:port` is handled. `None` if the port is not a number.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let host = &s[..=end];
        let rest = &s[end + 1..];
        if rest.is_empty() {
            return Some((host, None));
        }
        let port = rest.strip_prefix(':')?;
        return Some((host, Some(parse_port(port)?)));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(parse_port(p)?))),
        None => Some((s, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// A one-pass check for request headers: host characters only, no empty label at either end.
/// (Patterns get the full [`valid_host`] check; a header is only ever compared with them.)
fn plausible_host(h: &str) -> bool {
    let b = h.as_bytes();
    if b.first() == Some(&b'[') {
        return valid_host(h);
    }
    !b.is_empty()
        && b[0] != b'.'
        && b[b.len() - 1] != b'.'
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
}

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// One entry of an origin allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    https: bool,
    host: HostPattern,
    port: Option<u16>,
}

impl OriginPattern {
    /// Parses `https://app.example.com`, `http://localhost:5173` or `https://*.example.com`.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let err = || {
            InvalidInput::new(format!(
                "invalid origin {:?}: expected scheme://host[:port] (http or https, no path), \
                 optionally with a leading *. wildcard label",
                s.chars().take(80).collect::<String>()
            ))
        };
        let trimmed = s.trim();
        let (https, rest) = if let Some(r) = strip_prefix_ci(trimmed, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(trimmed, "http://") {
            (false, r)
        } else {
            return Err(err());
        };
        let (host, port) = split_host_port(rest).ok_or_else(err)?;
        let default = if https { 443 } else { 80 };
        let port = port.filter(|&p| p != default);
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_host(suffix) || suffix.starts_with('[') || !suffix.contains('.') {
                return Err(err());
            }
            HostPattern::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        } else {
            if !valid_host(host) {
                return Err(err());
            }
            HostPattern::Exact(host.to_ascii_lowercase())
        };
        Ok(Self { https, host, port })
    }

    /// Whether `origin` is allowed by this pattern.
    #[inline]
    pub fn matches(&self, origin: &Origin<'_>) -> bool {
        if self.https != origin.https || self.port != origin.port {
            return false;
        }
        match &self.host {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(origin.host),
            HostPattern::Suffix(suffix) => {
                let host = origin.host.as_bytes();
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

impl std::fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.https { "https://" } else { "http://" })?;
        match &self.host {
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Suffix(s) => write!(f, "*{s}")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A key's origin allow-list; empty means "no restriction" (except for `pk`, which always
/// needs a matching origin).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OriginList {
    patterns: Vec<OriginPattern>,
    /// Canonical text of the exact patterns: a header equal to one of them (ignoring ASCII
    /// case) matches without being parsed, the common case.
    exact: Vec<String>,
}

impl OriginList {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, InvalidInput> {
        let mut patterns = items
            .iter()
            .map(|s| OriginPattern::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        patterns.dedup();
        let exact = patterns
            .iter()
            .filter(|p| matches!(p.host, HostPattern::Exact(_)))
            .map(|p| p.to_string())
            .collect();
        Ok(Self { patterns, exact })
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether the `Origin` header value `header` is on the list.
    #[inline]
    pub fn allows(&self, header: &str) -> bool {
        if self.exact.iter().any(|e| e.eq_ignore_ascii_case(header)) {
            return true;
        }
        match Origin::parse(header) {
            Some(o) => self.patterns.iter().any(|p| p.matches(&o)),
            None => false,
        }
    }

    /// The entries in canonical text form.
    pub fn to_strings(&self) -> Vec<String> {
        self.patterns.iter().map(|p| p.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> OriginList {
        OriginList::parse(items).expect("valid list")
    }

    #[test]
    fn exact_and_wildcard() {
        let l = list(&[
            "https://claude.ai",
            "https://*.example.com",
            "http://localhost:3000",
        ]);
        assert!(l.allows("https://claude.ai"));
        assert!(l.allows("https://CLAUDE.ai"));
        assert!(l.allows("https://claude.ai:443"));
        assert!(!l.allows("http://claude.ai"));
        assert!(!l.allows("https://claude.ai.evil.com"));
        assert!(!l.allows("https://evilclaude.ai"));
        assert!(l.allows("https://app.example.com"));
        assert!(l.allows("https://a.b.example.com"));
        assert!(!l.allows("https://example.com"));
        assert!(!l.allows("https://badexample.com"));
        assert!(l.allows("http://localhost:3000"));
        assert!(!l.allows("http://localhost:3001"));
        assert!(!l.allows("null"));
        assert!(!l.allows("https://claude.ai/path"));
        assert!(!l.allows(""));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "claude.ai",
            "ftp://x.com",
            "https://",
            "https://x.com/",
            "https://*.com",
            "https://a.*.com",
            "https://x.com:99999",
            "https://*",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "https://*.example.com",
            "http://localhost:3000",
            "https://claude.ai",
        ] {
            assert_eq!(OriginPattern::parse(s).expect("valid").to_string(), s);
        }
        assert_eq!(
            OriginPattern::parse("https://Claude.AI:443")
                .expect("valid")
                .to_string(),
            "https://claude.ai"
        );
    }
}

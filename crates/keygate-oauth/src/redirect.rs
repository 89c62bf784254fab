//! Redirect URIs: registered exactly and matched exactly (RFC 9700 §2.1), except that a
//! loopback URI may vary its port (RFC 8252 §7.3), because a native app gets its port from
//! the OS at run time.
//!
//! Why by hand: the rules are a handful of string checks on the URI's parts, and a URL crate
//! would normalise (case, default ports, dot segments) where the standard asks for an exact
//! string comparison.

/// Why a redirect URI cannot be registered.
pub fn problem(uri: &str) -> Option<&'static str> {
    if uri.len() > 2000 || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("redirect URIs must be at most 2000 characters, without spaces");
    }
    if uri.contains('#') {
        return Some("redirect URIs must not have a fragment");
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Some("redirect URIs must be absolute");
    };
    let host = authority(rest).map(host_of);
    match scheme {
        "https" if host.is_some_and(|h| !h.is_empty()) => None,
        "http" if host.is_some_and(is_loopback) => None,
        "http" => Some("http redirect URIs are allowed for loopback addresses only"),
        // A private-use scheme of a native app (RFC 8252 §7.1): reverse domain name.
        s if s.contains('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')) =>
        {
            None
        }
        _ => Some("redirect URIs must be https, loopback http or a reverse-domain app scheme"),
    }
}

fn authority(rest: &str) -> Option<&str> {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let a = &rest[..end];
    (!a.contains('@')).then_some(a)
}

fn host_of(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map_or("", |h| h);
    }
    authority.split(':').next().unwrap_or("")
}

fn is_loopback(host: &str) -> bool {
    host == "127.0.0.1" || host == "::1" || host == "localhost"
}

/// Splits `http://host:port/rest` of a loopback URI into (host, rest), without the port.
fn loopback_parts(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("http://")?;
    let a = authority(rest)?;
    let host = host_of(a);
    if !is_loopback(host) {
        return None;
    }
    let hostpart = if a.starts_with('[') {
        &a[..a.find(']')? + 1]
    } else {
        host
    };
    let port = &a[hostpart.len()..];
    if !(port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty()))
    {
        return None;
    }
    Some((hostpart, &rest[a.len()..]))
}

/// Whether `given` (from an authorization request) matches the registered `registered`.
pub fn matches(registered: &str, given: &str) -> bool {
    if registered == given {
        return true;
    }
    match (loopback_parts(registered), loopback_parts(given)) {
        (Some(r), Some(g)) => r == g,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_rules() {
        assert_eq!(problem("https://app.example.com/cb"), None);
        assert_eq!(problem("http://127.0.0.1/cb"), None);
        assert_eq!(problem("http://[::1]:8080/cb"), None);
        assert_eq!(
            problem("com.example.app:/cb"),
            Some("redirect URIs must be absolute")
        );
        assert_eq!(problem("com.example.app://cb"), None);
        assert!(problem("http://app.example.com/cb").is_some());
        assert!(problem("https://app.example.com/cb#x").is_some());
        assert!(problem("https://user@app.example.com/cb").is_some());
        assert!(problem("javascript://alert(1)").is_some());
        assert!(problem("/relative").is_some());
    }

    #[test]
    fn exact_match_but_loopback_ports_vary() {
        let r = "https://app.example.com/cb";
        assert!(matches(r, r));
        assert!(!matches(r, "https://app.example.com/cb/"));
        assert!(!matches(r, "https://app.example.com/cb?x=1"));
        assert!(!matches(r, "https://APP.example.com/cb"));
        assert!(!matches(r, "https://app.example.com:443/cb"));
        assert!(matches("http://127.0.0.1/cb", "http://127.0.0.1:53211/cb"));
        assert!(matches("http://127.0.0.1:8000/cb", "http://127.0.0.1:9/cb"));
        assert!(matches("http://[::1]/cb", "http://[::1]:4000/cb"));
        assert!(!matches(
            "http://127.0.0.1/cb",
            "http://127.0.0.1:53211/other"
        ));
        assert!(!matches("http://127.0.0.1/cb", "http://127.0.0.2:53211/cb"));
        assert!(!matches("http://127.0.0.1/cb", "http://127.0.0.1:x/cb"));
        assert!(!matches(
            "http://127.0.0.1/cb",
            "http://127.0.0.1.evil.com/cb"
        ));
        assert!(!matches("http://localhost/cb", "http://127.0.0.1:80/cb"));
    }
}

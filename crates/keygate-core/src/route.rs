//! Route patterns: exact paths, or a trailing `/*` prefix (`/v1/ocr/*` matches `/v1/ocr`
//! and everything below it).
//!
//! Paths are judged as sent. A path with dot segments (`.`/`..`, also percent-encoded), an
//! encoded slash or backslash, or an empty segment matches nothing: otherwise
//! `/public/../admin` could match a public route and reach `/admin` upstream.

use crate::InvalidInput;

/// A route's path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    path: String,
    prefix: bool,
}

impl PathPattern {
    /// Parses `/exact/path` or `/prefix/*` (or `/*` for everything).
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let (path, prefix) = match s.strip_suffix("/*") {
            Some(p) => (p, true),
            None => (s, false),
        };
        // `/*` (empty path, prefix) is "everything"; an empty exact path is not a route.
        let valid = s.starts_with('/')
            && !path.contains('*')
            && if path.is_empty() {
                prefix
            } else {
                is_clean(path)
            };
        if !valid {
            return Err(InvalidInput::new(format!(
                "invalid route path {:?}: use /exact/path or /prefix/*",
                s.chars().take(100).collect::<String>()
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            prefix,
        })
    }

    /// Whether `path` (no query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        if !is_clean(path) {
            return false;
        }
        if self.prefix {
            path == self.path
                || (path.len() > self.path.len()
                    && path.starts_with(&self.path)
                    && path.as_bytes()[self.path.len()] == b'/')
        } else {
            path == self.path
                || (path.len() == self.path.len() + 1
                    && path.starts_with(&self.path)
                    && path.ends_with('/'))
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix {
            write!(f, "{}/*", self.path)
        } else {
            f.write_str(&self.path)
        }
    }
}

/// Whether a request path is safe to match: absolute, no dot segments, no encoded separators
/// or dots, no empty segments (except a trailing slash), no control characters.
pub fn is_clean(path: &str) -> bool {
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b'\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") || lower.contains("%5c") {
        return false;
    }
    let inner = path[1..].strip_suffix('/').unwrap_or(&path[1..]);
    if inner.is_empty() {
        return true;
    }
    inner
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix() {
        let p = PathPattern::parse("/v1/ocr/*").expect("valid");
        assert!(p.matches("/v1/ocr"));
        assert!(p.matches("/v1/ocr/scan"));
        assert!(p.matches("/v1/ocr/a/b"));
        assert!(!p.matches("/v1/ocrx"));
        assert!(!p.matches("/v1/ocr/../admin"));
        assert!(!p.matches("/v1/ocr/%2e%2e/admin"));
        let e = PathPattern::parse("/v1/status").expect("valid");
        assert!(e.matches("/v1/status"));
        assert!(e.matches("/v1/status/"));
        assert!(!e.matches("/v1/status/x"));
        let all = PathPattern::parse("/*").expect("valid");
        assert!(all.matches("/anything/here"));
        assert!(all.matches("/"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", "v1", "/v1/*/x", "/v1/../x", "*", "/v1//x"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }
}

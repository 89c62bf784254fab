//! Request paths and route patterns.
//!
//! Every path from outside goes through [`normalize`] once, and that one form is used to match
//! routes *and* is what the gateway forwards, so keygate and the upstream read the same path.
//! The normal form follows RFC 3986 §6.2.2 and goes one step further: percent-encoded
//! unreserved characters are decoded (`%61` → `a`), and so are the sub-delimiters, `:` and `@`
//! (`%24` → `$`), which a path may hold as they are and which Werkzeug, Go and Starlette decode
//! anyway (a route `/svc/$batch` must hold for `/svc/%24batch`); every other escape is written
//! in upper case (`%3f` → `%3F`), and nothing is resolved silently. What an upstream could read
//! as a different path is refused instead of guessed: dot segments (`.`, `..`, also as `%2E`)
//! and segments ending in `.` (IIS drops it), empty segments, `;` path parameters (Tomcat reads
//! `/x/..;/admin` as `/admin`), also as `%3B`, encoded `/` or `\`, double encoding (`%2561`),
//! control characters, and escapes that are malformed or not valid UTF-8 (overlong forms
//! included).
//!
//! Patterns are exact paths, or a trailing `/*` prefix (`/v1/ocr/*` matches `/v1/ocr` and
//! everything below it). Matching is by bytes; [`PathPattern::matches_ignore_case`] is for
//! routes that must also hold against upstreams that ignore case (see `docs/security.md`).

use crate::InvalidInput;
use std::borrow::Cow;

/// Why a request path was refused by [`normalize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// It does not start with `/`.
    NotAbsolute,
    /// A `.` or `..` segment (possibly percent-encoded), or a segment ending in `.`.
    DotSegment,
    /// An empty segment (`//`), other than one trailing slash.
    EmptySegment,
    /// A `;` (path parameters: `..;`, `;jsessionid=`), raw or as `%3B`.
    PathParameter,
    /// `%2F` or `%5C`: a separator the upstream may decode.
    EncodedSeparator,
    /// A control character, space, `\`, `#` or a byte outside ASCII, raw or encoded.
    BadCharacter,
    /// A `%` not followed by two hex digits, an escaped `%` followed by two hex digits (double
    /// encoding), or escapes that are not valid UTF-8.
    BadEscape,
}

impl PathError {
    /// A message for the caller.
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with /",
            PathError::DotSegment => {
                "the request path has a . or .. segment, or a segment ending in ."
            }
            PathError::EmptySegment => "the request path has an empty segment",
            PathError::PathParameter => "the request path has a ; (path parameters are refused)",
            PathError::EncodedSeparator => "the request path has an encoded / or \\",
            PathError::BadCharacter => {
                "the request path has a control character, space, \\, # or non-ASCII byte"
            }
            PathError::BadEscape => {
                "the request path has a malformed or double percent escape, or one that is not \
                 UTF-8"
            }
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for PathError {}

/// What an escape is decoded to in the normal form: unreserved characters, sub-delimiters but
/// `;` (refused), `:` and `@` — the characters a path segment may hold as they are.
fn decoded_in_paths(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hi = hex_val(*b.get(i + 1)?)?;
    let lo = hex_val(*b.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A request path in normal form: the only thing routes match against, and what the gateway
/// forwards. Made only by [`normalize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath<'a>(Cow<'a, str>);

impl<'a> NormalPath<'a> {
    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it differs from what the client sent.
    pub fn changed(&self) -> bool {
        matches!(self.0, Cow::Owned(_))
    }

    /// An owned copy.
    pub fn into_owned(self) -> NormalPath<'static> {
        NormalPath(Cow::Owned(self.0.into_owned()))
    }
}

impl std::ops::Deref for NormalPath<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The normal form of a request path (no query string), or why it has none. Borrows when
/// the path is already normal, which is the common case.
pub fn normalize(path: &str) -> Result<NormalPath<'_>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Written lazily: only a path that changes is copied.
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let v = escape_at(b, i).ok_or(PathError::BadEscape)?;
                if v >= 0x80 {
                    // A run of escaped non-ASCII bytes must be whole UTF-8 (overlong forms and
                    // surrogates are not); it stays escaped, in upper case.
                    let mut run = Vec::new();
                    let mut j = i;
                    while let Some(v) = (b.get(j) == Some(&b'%'))
                        .then(|| escape_at(b, j))
                        .flatten()
                        .filter(|v| *v >= 0x80)
                    {
                        run.push(v);
                        j += 3;
                    }
                    std::str::from_utf8(&run).map_err(|_| PathError::BadEscape)?;
                    let upper: Vec<u8> = run
                        .iter()
                        .flat_map(|v| [b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]])
                        .collect();
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(&upper);
                    } else if b[i..j] != upper[..] {
                        out.get_or_insert_with(|| b[..i].to_vec())
                            .extend_from_slice(&upper);
                    }
                    i = j;
                    continue;
                }
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if v == b';' {
                    return Err(PathError::PathParameter);
                }
                if v == b'%' && escape_at(b, i + 2).is_some() {
                    return Err(PathError::BadEscape);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::BadCharacter);
                }
                if decoded_in_paths(v) {
                    out.get_or_insert_with(|| b[..i].to_vec()).push(v);
                } else {
                    let upper = [b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]];
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(&upper);
                    } else if b[i..i + 3] != upper {
                        out.get_or_insert_with(|| b[..i].to_vec())
                            .extend_from_slice(&upper);
                    }
                }
                i += 3;
                continue;
            }
            b';' => return Err(PathError::PathParameter),
            b'\\' | b'#' => return Err(PathError::BadCharacter),
            c if c <= b' ' || c >= 0x7f => return Err(PathError::BadCharacter),
            c => {
                if let Some(o) = out.as_mut() {
                    o.push(c);
                }
            }
        }
        i += 1;
    }
    let normal: Cow<'_, str> = match out {
        // Only ASCII was pushed (non-ASCII stays escaped), so this cannot fail.
        Some(v) => Cow::Owned(String::from_utf8(v).map_err(|_| PathError::BadCharacter)?),
        None => Cow::Borrowed(path),
    };
    // Double encoding once more, on the result: `%254%44` decodes to `%254D`, which a
    // second decoding reads as `M` (found by the `path` fuzz target).
    let nb = normal.as_bytes();
    if memchr::memmem::find_iter(nb, b"%25").any(|i| escape_at(nb, i + 2).is_some()) {
        return Err(PathError::BadEscape);
    }
    if normal.len() > 1 {
        // One trailing slash is allowed; `//` is an empty segment.
        let inner = &normal[1..];
        let inner = inner.strip_suffix('/').unwrap_or(inner);
        for seg in inner.split('/') {
            if seg.is_empty() {
                return Err(PathError::EmptySegment);
            }
            if seg.ends_with('.') {
                return Err(PathError::DotSegment);
            }
        }
    }
    Ok(NormalPath(normal))
}

/// Whether a request path is already in normal form (what [`normalize`] would return
/// unchanged).
pub fn is_clean(path: &str) -> bool {
    normalize(path).is_ok_and(|p| !p.changed())
}

/// A route's path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    path: String,
    prefix: bool,
}

impl PathPattern {
    /// Parses `/exact/path` or `/prefix/*` (or `/*` for everything). The path is kept in
    /// normal form, so `/%61dmin/*` and `/admin/*` are the same pattern.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let (path, prefix) = match s.strip_suffix("/*") {
            Some(p) => (p, true),
            None => (s, false),
        };
        let bad = || {
            InvalidInput::new(format!(
                "invalid route path {:?}: use /exact/path or /prefix/* (no dot or empty \
                 segments, no ;, no encoded separators)",
                s.chars().take(100).collect::<String>()
            ))
        };
        if !s.starts_with('/') || path.contains('*') {
            return Err(bad());
        }
        // `/*` (empty path, prefix) is "everything"; an empty exact path is not a route.
        if path.is_empty() {
            return if prefix {
                Ok(Self {
                    path: String::new(),
                    prefix,
                })
            } else {
                Err(bad())
            };
        }
        let normal = normalize(path).map_err(|_| bad())?;
        if normal.ends_with('/') && normal.len() > 1 {
            return Err(bad());
        }
        Ok(Self {
            path: normal.as_str().to_owned(),
            prefix,
        })
    }

    /// Whether the normalised `path` matches, byte for byte.
    pub fn matches(&self, path: &NormalPath<'_>) -> bool {
        self.matches_with(path, |a, b| a == b)
    }

    /// Whether `path` matches when ASCII case is ignored: for routes that must hold against
    /// an upstream that ignores case (IIS, ASP.NET, a case-insensitive file system).
    pub fn matches_ignore_case(&self, path: &NormalPath<'_>) -> bool {
        self.matches_with(path, |a, b| a.eq_ignore_ascii_case(b))
    }

    /// Whether `path` matches as a lenient upstream could read it: ignoring ASCII case,
    /// folding the non-ASCII letters that Java's and .NET's case-insensitive comparisons take
    /// for ASCII ones (`ı` for `i`, `ſ` for `s`, the Kelvin sign for `k`), and with a format
    /// suffix after the pattern's path (`/admin.json`, which Rails and Spring MVC before 5.3
    /// serve as `/admin`). For routes whose block must hold whatever the upstream.
    pub fn matches_leniently(&self, path: &NormalPath<'_>) -> bool {
        let folded = fold_confusables(path.as_str());
        let p = folded.as_bytes();
        let me = self.path.as_bytes();
        if !p
            .get(..me.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(me))
        {
            return false;
        }
        let rest = &p[me.len()..];
        let suffix = rest.first() == Some(&b'.') && !rest.contains(&b'/');
        suffix
            || if self.prefix {
                rest.is_empty() || rest[0] == b'/'
            } else {
                rest.is_empty() || rest == b"/"
            }
    }

    fn matches_with(&self, path: &NormalPath<'_>, eq: impl Fn(&[u8], &[u8]) -> bool) -> bool {
        let (p, me) = (path.as_bytes(), self.path.as_bytes());
        let head = p.get(..me.len()).is_some_and(|h| eq(h, me));
        if !head {
            return false;
        }
        let rest = &p[me.len()..];
        if self.prefix {
            rest.is_empty() || rest[0] == b'/'
        } else {
            rest.is_empty() || rest == b"/"
        }
    }
}

/// `path` with the escaped letters that some case-insensitive comparisons equate with ASCII
/// letters written as those (`%C4%B1` ı → `i`, `%C5%BF` ſ → `s`, `%E2%84%AA` K → `k`).
fn fold_confusables(path: &str) -> Cow<'_, str> {
    const FOLDS: [(&str, &str); 3] = [("%C4%B1", "i"), ("%C5%BF", "s"), ("%E2%84%AA", "k")];
    if !path.contains('%') || !FOLDS.iter().any(|(from, _)| path.contains(from)) {
        return Cow::Borrowed(path);
    }
    let mut out = path.to_owned();
    for (from, to) in FOLDS {
        out = out.replace(from, to);
    }
    Cow::Owned(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> NormalPath<'_> {
        normalize(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn exact_and_prefix() {
        let p = PathPattern::parse("/v1/ocr/*").expect("valid");
        assert!(p.matches(&n("/v1/ocr")));
        assert!(p.matches(&n("/v1/ocr/scan")));
        assert!(p.matches(&n("/v1/ocr/a/b")));
        assert!(!p.matches(&n("/v1/ocrx")));
        assert!(!p.matches(&n("/v1/OCR/scan")));
        assert!(p.matches_ignore_case(&n("/v1/OCR/scan")));
        let e = PathPattern::parse("/v1/status").expect("valid");
        assert!(e.matches(&n("/v1/status")));
        assert!(e.matches(&n("/v1/status/")));
        assert!(!e.matches(&n("/v1/status/x")));
        let all = PathPattern::parse("/*").expect("valid");
        assert!(all.matches(&n("/anything/here")));
        assert!(all.matches(&n("/")));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "",
            "v1",
            "/v1/*/x",
            "/v1/../x",
            "*",
            "/v1//x",
            "/v1;x/*",
            "/v1/%2f/*",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            PathPattern::parse("/%61dmin/*").expect("valid").to_string(),
            "/admin/*"
        );
    }

    #[test]
    fn lenient_matching_for_blocked_routes() {
        let p = PathPattern::parse("/svc/admin/*").expect("valid");
        for path in [
            "/svc/ADMIN/users",
            "/svc/admin.json",
            "/svc/Admin.xml",
            "/svc/adm%C4%B1n/users",
            "/svc/admin",
        ] {
            assert!(p.matches_leniently(&n(path)), "{path}");
        }
        for path in ["/svc/administrator", "/svc/admin.json/x", "/svc/x/admin"] {
            assert!(!p.matches_leniently(&n(path)), "{path}");
        }
    }

    #[test]
    fn decodes_unreserved_and_upper_cases_the_rest() {
        assert_eq!(n("/svc/%61dmin/users").as_str(), "/svc/admin/users");
        assert_eq!(n("/svc/%7Euser/%2d").as_str(), "/svc/~user/-");
        assert_eq!(
            n("/svc/%24batch/docs%3AbatchDelete").as_str(),
            "/svc/$batch/docs:batchDelete"
        );
        assert_eq!(n("/a%3fb%20c%25").as_str(), "/a%3Fb%20c%25");
        assert_eq!(n("/caf%c3%a9").as_str(), "/caf%C3%A9");
        assert!(!n("/plain/path").changed());
        assert!(!n("/").changed());
        assert!(!n("/trailing/").changed());
    }

    #[test]
    fn refuses_what_an_upstream_could_read_otherwise() {
        use PathError::*;
        for (p, e) in [
            ("/svc/admin;x=1/users", PathParameter),
            ("/svc/x/..;/admin/users", PathParameter),
            ("/svc/../admin", DotSegment),
            ("/svc/%2e%2e/admin", DotSegment),
            ("/svc/.%2E/admin", DotSegment),
            ("/svc/./admin", DotSegment),
            ("/svc/admin./users", DotSegment),
            ("/svc/admin%2E/users", DotSegment),
            ("//", EmptySegment),
            ("/svc/admin%3Bx/users", PathParameter),
            ("/svc/%2561dmin/users", BadEscape),
            ("/o%2E%282/%254%444", BadEscape),
            ("/x/%25%34%31", BadEscape),
            ("/o/%2bbb%67i%25%66bbbbbbbE.o2/", BadEscape),
            ("/svc//admin", EmptySegment),
            ("/svc/a%2fb", EncodedSeparator),
            ("/svc/a%5Cb", EncodedSeparator),
            ("/svc/a\\b", BadCharacter),
            ("/svc/a%00b", BadCharacter),
            ("/svc/a b", BadCharacter),
            ("/svc/a#b", BadCharacter),
            ("/svc/%zz", BadEscape),
            ("/svc/%4", BadEscape),
            ("/svc/%c0%af", BadEscape),
            ("/svc/%e0%80%ae", BadEscape),
            ("/svc/%c3", BadEscape),
            ("/svc/%ed%a0%80", BadEscape),
            ("svc", NotAbsolute),
            ("", NotAbsolute),
        ] {
            assert_eq!(normalize(p).map(|_| ()), Err(e), "{p}");
        }
    }
}

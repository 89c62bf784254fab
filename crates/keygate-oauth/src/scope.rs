//! Scope strings (RFC 6749 §3.3): space-delimited, case-sensitive tokens.

/// Parses a scope parameter into a sorted list without duplicates; `None` if a token has a
/// character RFC 6749 does not allow (or the list is absurdly long).
pub fn parse(s: &str) -> Option<Vec<String>> {
    let ok = |c: char| c == '!' || ('#'..='[').contains(&c) || (']'..='~').contains(&c);
    let mut out: Vec<String> = Vec::new();
    for t in s.split(' ').filter(|t| !t.is_empty()) {
        if t.len() > 128 || !t.chars().all(ok) {
            return None;
        }
        out.push(t.to_owned());
    }
    if out.len() > 100 {
        return None;
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The wire form of a sorted list.
pub fn join(scopes: &[String]) -> String {
    scopes.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sorts_and_dedupes() {
        assert_eq!(
            parse(" docs:read  ocr:read docs:read").as_deref(),
            Some(&["docs:read".to_owned(), "ocr:read".to_owned()][..])
        );
        assert_eq!(parse("").as_deref(), Some(&[][..]));
        assert_eq!(parse("a\"b"), None);
        assert_eq!(parse("a\\b"), None);
        assert_eq!(parse("é"), None);
    }
}

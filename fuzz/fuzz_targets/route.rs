//! Route patterns and matching: never panic; a match means the path is the pattern's path or
//! lies below it at a segment boundary (ignoring case for the case-insensitive match).
#![no_main]
use keygate_core::PathPattern;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (pattern, path) = input;
    let (Ok(p), Ok(n)) = (
        PathPattern::parse(pattern),
        keygate_core::normalize_path(path),
    ) else {
        return;
    };
    let text = p.to_string();
    let base = text.strip_suffix("/*").unwrap_or(&text);
    if p.matches(&n) {
        assert!(
            n.as_str().starts_with(base),
            "{text} matched {}",
            n.as_str()
        );
        assert!(p.matches_ignore_case(&n));
    }
    if p.matches_ignore_case(&n) {
        let lower = n.as_str().to_ascii_lowercase();
        assert!(lower.starts_with(&base.to_ascii_lowercase()));
        let rest = &n.as_str()[base.len()..];
        assert!(
            rest.is_empty() || rest.starts_with('/'),
            "{text} matched {}",
            n.as_str()
        );
    }
});

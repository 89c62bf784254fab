//! The `Authorization` header: never panics; a token it returns is a non-empty trimmed part of
//! the value after a `Bearer ` scheme.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|v: &[u8]| {
    if let Ok(Some(t)) = keygate_core::key::bearer_token(v) {
        assert!(!t.is_empty());
        assert_eq!(t, t.trim());
        assert!(v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "));
        let text = std::str::from_utf8(v).expect("a token came from UTF-8");
        assert!(text.contains(t));
    }
});

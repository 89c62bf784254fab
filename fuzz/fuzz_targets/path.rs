//! The path normaliser, differentially against the `url` crate (WHATWG URL, as browsers and
//! many servers read a path): whatever keygate accepts, `url` reads as the same bytes — no dot
//! segment it would resolve, no backslash it would turn into a slash — and the normal form is
//! a fixed point.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn decode_all(p: &str) -> Vec<u8> {
    let b = p.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fuzz_target!(|s: &str| {
    let Ok(n) = keygate_core::normalize_path(s) else {
        return;
    };
    let again = keygate_core::normalize_path(n.as_str()).expect("the normal form normalises");
    assert!(!again.changed(), "{s:?} -> {:?}", n.as_str());
    assert_eq!(decode_all(n.as_str()), decode_all(s), "{s:?}");
    if s.contains('?') {
        return;
    }
    let url = url::Url::parse(&format!("http://h{s}")).expect("an accepted path is a URL path");
    assert_eq!(
        decode_all(url.path()),
        decode_all(n.as_str()),
        "url reads {s:?} as {:?}, keygate as {:?}",
        url.path(),
        n.as_str()
    );
});

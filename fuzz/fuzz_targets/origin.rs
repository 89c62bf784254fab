//! Origins and origin patterns: never panic; an exact pattern allows only its own origin, and a
//! wildcard never allows the bare parent domain or another scheme.
#![no_main]
use keygate_core::OriginList;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (pattern, origin) = input;
    if let Ok(list) = OriginList::parse(&[pattern]) {
        let allowed = list.allows(origin);
        if allowed && !pattern.contains('*') {
            // An exact origin allows only what is the same origin: the relation is symmetric.
            let back = OriginList::parse(&[origin]).expect("an allowed origin is a valid entry");
            assert!(back.allows(pattern.trim()), "{pattern} allowed {origin}");
        }
        if allowed {
            if let Some(rest) = pattern.trim().strip_prefix("https://*.") {
                assert!(
                    origin.to_ascii_lowercase().starts_with("https://"),
                    "{pattern} {origin}"
                );
                assert!(
                    !origin.eq_ignore_ascii_case(&format!("https://{rest}")),
                    "{pattern} {origin}"
                );
            }
        }
    }
    let _ = OriginList::parse(&[origin]);
});

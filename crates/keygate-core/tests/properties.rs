//! Property tests for the parsers of outside input: keys, IP ranges, origins.

use keygate_core::{IpAllowList, KeyFormat, Kind, OriginList};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Sk), Just(Kind::Ut), Just(Kind::Pk)]
}

fn prefix() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}"
}

fn key(seed: Vec<u8>, f: &KeyFormat, k: Kind) -> String {
    let mut i = 0usize;
    f.generate(k, |buf| {
        for b in buf.iter_mut() {
            *b = seed[i % seed.len()].wrapping_add((i / seed.len()) as u8);
            i += 1;
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_keys_round_trip(p in prefix(), k in kind(), seed in prop::collection::vec(any::<u8>(), 1..64)) {
        let f = KeyFormat::new(&p).expect("valid prefix");
        let text = key(seed, &f, k);
        let parsed = f.parse(&text).expect("own keys parse");
        prop_assert_eq!(parsed.kind(), k);
        prop_assert_eq!(parsed.expose_secret(), text.as_str());
        prop_assert_eq!(text.len(), p.len() + 4 + 38);
    }

    #[test]
    fn any_single_character_change_is_rejected(
        k in kind(),
        seed in prop::collection::vec(any::<u8>(), 1..64),
        pos in any::<prop::sample::Index>(),
        replacement in any::<char>(),
    ) {
        let f = KeyFormat::default();
        let text = key(seed, &f, k);
        let mut chars: Vec<char> = text.chars().collect();
        let i = pos.index(chars.len());
        prop_assume!(chars[i] != replacement);
        chars[i] = replacement;
        let changed: String = chars.into_iter().collect();
        prop_assert!(f.parse(&changed).is_err(), "accepted {changed:?}");
    }

    #[test]
    fn the_parser_never_panics(s in "\\PC{0,80}") {
        let _ = KeyFormat::default().parse(&s);
        let _ = OriginList::parse(&[s.as_str()]);
        let _ = IpAllowList::parse(&[s.as_str()]);
        let _ = keygate_core::PathPattern::parse(&s);
        let _ = keygate_core::route::is_clean(&s);
        let l = OriginList::parse(&["https://*.example.com", "http://localhost:3000"]).expect("valid");
        let _ = l.allows(&s);
    }

    #[test]
    fn v4_cidr_matches_exactly_its_range(a in any::<u32>(), len in 0u8..=32, probe in any::<u32>()) {
        let net = Ipv4Addr::from(a);
        let list = IpAllowList::parse(&[format!("{net}/{len}")]).expect("valid cidr");
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let expected = (probe & mask) == (a & mask);
        prop_assert_eq!(list.contains(IpAddr::V4(Ipv4Addr::from(probe))), expected);
        // The same address seen through a dual-stack socket.
        let mapped = IpAddr::V6(Ipv4Addr::from(probe).to_ipv6_mapped());
        prop_assert_eq!(list.contains(mapped), expected);
    }

    #[test]
    fn v6_cidr_matches_exactly_its_range(a in any::<u128>(), len in 0u8..=128, probe in any::<u128>()) {
        let net = Ipv6Addr::from(a);
        let list = IpAllowList::parse(&[format!("{net}/{len}")]).expect("valid cidr");
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        let expected = (probe & mask) == (a & mask);
        let ip = Ipv6Addr::from(probe);
        // IPv4-mapped probes are judged as IPv4, which a v6 range never contains.
        prop_assume!(ip.to_ipv4_mapped().is_none());
        prop_assert_eq!(list.contains(IpAddr::V6(ip)), expected);
    }

    #[test]
    fn exact_origins_match_only_themselves(
        host in "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){1,3}",
        other in "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){1,3}",
        https in any::<bool>(),
        port in prop::option::of(1u16..),
    ) {
        let scheme = if https { "https" } else { "http" };
        let origin = match port { Some(p) => format!("{scheme}://{host}:{p}"), None => format!("{scheme}://{host}") };
        let list = OriginList::parse(&[origin.as_str()]).expect("valid origin");
        prop_assert!(list.allows(&origin));
        prop_assert!(list.allows(&origin.to_ascii_uppercase()));
        let other_origin = match port { Some(p) => format!("{scheme}://{other}:{p}"), None => format!("{scheme}://{other}") };
        prop_assert_eq!(list.allows(&other_origin), other == host);
        let flipped = if https { origin.replacen("https", "http", 1) } else { origin.replacen("http", "https", 1) };
        // Flipping the scheme only matches when the implied default port makes them equal… never.
        prop_assert!(!list.allows(&flipped));
        let suffixed = format!("{origin}.evil.com");
        let with_path = format!("{origin}/");
        prop_assert!(!list.allows(&suffixed));
        prop_assert!(!list.allows(&with_path));
    }

    #[test]
    fn wildcard_origins_match_subdomains_only(
        sub in "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,5}){0,2}",
        base in "[a-z][a-z0-9]{0,10}\\.[a-z]{2,5}",
        junk in "[a-z]{1,5}",
    ) {
        let list = OriginList::parse(&[format!("https://*.{base}")]).expect("valid");
        let good = format!("https://{sub}.{base}");
        let apex = format!("https://{base}");
        let glued = format!("https://{junk}{base}");
        let plain_http = format!("http://{sub}.{base}");
        let longer = format!("https://{sub}.{base}.{junk}");
        prop_assert!(list.allows(&good));
        prop_assert!(!list.allows(&apex));
        prop_assert!(!list.allows(&glued));
        prop_assert!(!list.allows(&plain_http));
        prop_assert!(!list.allows(&longer));
    }
}

/// Percent-decodes every escape (what a decoding upstream such as Werkzeug reads).
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The normal form is a fixed point, means the same bytes to a decoding upstream, and never
    /// holds what could read as another path.
    #[test]
    fn normal_paths_mean_what_the_client_sent(
        p in "/([a-zA-Z0-9./;_~-]|%[0-9a-fA-F]{2}|%c3%a9|%[0-9a-f]){0,24}"
    ) {
        if let Ok(n) = keygate_core::normalize_path(&p) {
            let again = keygate_core::normalize_path(n.as_str()).expect("normal form normalises");
            prop_assert!(!again.changed(), "{p} -> {} -> {}", n.as_str(), again.as_str());
            prop_assert_eq!(decode_all(n.as_str()), decode_all(&p));
            let decoded = decode_all(n.as_str());
            let text = String::from_utf8_lossy(&decoded);
            prop_assert!(!text.contains(';') || n.as_str().contains("%3B"), "{p}");
            for seg in n.as_str()[1..].split('/') {
                prop_assert!(seg != "." && seg != "..", "{p}");
            }
            prop_assert!(!decoded.contains(&b'\\'));
            prop_assert!(!n.as_str().to_ascii_lowercase().contains("%2f"));
        }
    }
}

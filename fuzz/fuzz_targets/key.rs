//! Key parsing: never panics; what parses has the deployment's prefix and a valid checksum, and
//! changing any one character of a real key makes it unparseable (the offline check).
#![no_main]
use keygate_core::{KeyFormat, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, [u8; 32], u8, u16)| {
    let (s, random, kind, at) = input;
    let f = KeyFormat::default();
    if f.parse(s).is_ok() {
        assert!(s.starts_with("kg_"), "{s}");
    }
    // A real key from the fuzzer's random bytes, then one character of it changed.
    let kind = [Kind::Sk, Kind::Ut, Kind::Pk][usize::from(kind % 3)];
    // The fuzzer's bytes, each pass mixed with a counter: `generate` rejects bytes that would
    // bias base62 and asks again, so a stream that repeats one rejected byte (all 0xff) would
    // never end — as the OS random source cannot.
    let mut n = 0u8;
    let key = f.generate(kind, |buf| {
        for (b, r) in buf.iter_mut().zip(random.iter().cycle()) {
            *b = r ^ n;
            n = n.wrapping_add(37);
        }
    });
    assert!(f.parse(&key).is_ok(), "{key}");
    let mut chars: Vec<char> = key.chars().collect();
    let i = usize::from(at) % chars.len();
    let replacement = if chars[i] == 'A' { 'B' } else { 'A' };
    chars[i] = replacement;
    let changed: String = chars.into_iter().collect();
    assert!(f.parse(&changed).is_err(), "{key} -> {changed}");
});

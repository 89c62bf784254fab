//! Ids and secrets from the OS CSPRNG.

/// Fills `buf` from the operating system's CSPRNG.
///
/// If the OS cannot provide randomness the process must not go on issuing keys: this is the
/// one deliberate panic, and it happens before any key is made.
pub fn os_fill(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("the OS random number generator failed");
}

/// A random base62 string.
pub fn random_base62(len: usize) -> String {
    keygate_core::base62::random_string(len, os_fill)
}

/// A new id such as `key_…`: 8 base62 characters of milliseconds since the Unix epoch (so ids
/// sort by creation time, which cursor pagination relies on) and 14 random ones.
pub fn new_id(prefix: &str, now_ms: i64) -> String {
    let mut ts = [b'0'; 8];
    let mut v = u64::try_from(now_ms).unwrap_or(0);
    for slot in ts.iter_mut().rev() {
        *slot = keygate_core::base62::ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    let ts: String = ts.iter().map(|&b| char::from(b)).collect();
    format!("{prefix}_{ts}{}", random_base62(14))
}

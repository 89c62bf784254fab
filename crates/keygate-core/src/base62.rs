//! Base62 (`0-9A-Za-z`) helpers.
//!
//! Written by hand rather than pulled from a crate: the key format needs exactly two things —
//! uniform random characters from random bytes (rejection sampling, no modulo bias) and a
//! fixed-width, zero-padded encoding of a `u32` — and both are a few lines.

/// The base62 alphabet, in GitHub's token order (digits, upper case, lower case).
pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Whether `b` is a base62 character.
#[inline]
pub fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Fills `out` with uniformly random base62 characters, drawing random bytes from `fill`.
///
/// Bytes of 248 and above are rejected (248 = 4 × 62) so that every character is equally
/// likely.
pub fn random_chars(out: &mut [u8], mut fill: impl FnMut(&mut [u8])) {
    let mut buf = [0u8; 64];
    let mut i = 0;
    while i < out.len() {
        fill(&mut buf);
        for &b in buf.iter() {
            if i == out.len() {
                break;
            }
            if b < 248 {
                out[i] = ALPHABET[(b % 62) as usize];
                i += 1;
            }
        }
    }
}

/// A random base62 string of `len` characters.
pub fn random_string(len: usize, fill: impl FnMut(&mut [u8])) -> String {
    let mut out = vec![0u8; len];
    random_chars(&mut out, fill);
    out.into_iter().map(char::from).collect()
}

/// Encodes `value` as exactly six base62 characters, zero-padded on the left
/// (62^6 > 2^32, so every `u32` fits).
pub fn encode_u32_6(mut value: u32) -> [u8; 6] {
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_fixed_width() {
        assert_eq!(&encode_u32_6(0), b"000000");
        assert_eq!(&encode_u32_6(61), b"00000z");
        assert_eq!(&encode_u32_6(62), b"000010");
        assert_eq!(&encode_u32_6(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn random_chars_are_base62() {
        let mut n = 0u8;
        let s = random_string(200, |b| {
            for x in b.iter_mut() {
                *x = n;
                n = n.wrapping_add(1);
            }
        });
        assert_eq!(s.len(), 200);
        assert!(s.bytes().all(is_base62));
    }
}

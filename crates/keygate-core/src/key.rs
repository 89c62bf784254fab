//! The key format: `{prefix}_{kind}_{32 random base62}{6 base62 CRC32}`.
//!
//! The checksum (GitHub's token scheme) covers everything before it, so a mistyped or invented
//! key is rejected offline, before any cache or database lookup. Keys are stored only as a
//! SHA-256 hash, or HMAC-SHA256 when the deployment configures a pepper.

use crate::base62;
use crate::InvalidInput;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Number of random base62 characters in a key body.
pub const RANDOM_LEN: usize = 32;
/// Number of checksum characters at the end of a key.
pub const CHECKSUM_LEN: usize = 6;
/// How many leading characters of a key are kept for display.
pub const DISPLAY_LEN: usize = 10;

/// The three kinds of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `sk`: secret key, server to server, no user.
    Sk,
    /// `ut`: user token, limits from the user's plan.
    Ut,
    /// `pk`: publishable key, safe in a browser; origin-locked, hard-blocked from admin routes.
    Pk,
}

impl Kind {
    /// The two-letter tag used in the key text and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sk => "sk",
            Kind::Ut => "ut",
            Kind::Pk => "pk",
        }
    }

    /// Parses `sk`, `ut` or `pk`.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "sk" => Ok(Kind::Sk),
            "ut" => Ok(Kind::Ut),
            "pk" => Ok(Kind::Pk),
            _ => Err(InvalidInput::new(format!(
                "kind must be one of sk, ut, pk (got {:?})",
                truncate(s, 16)
            ))),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deployment's key format (its prefix). Generates and parses keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    prefix: String,
}

/// A key that passed the offline format and checksum checks. Borrowed from the request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    kind: Kind,
    text: &'a str,
}

impl std::fmt::Debug for ParsedKey<'_> {
    // Never print the secret: only its kind and display prefix.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedKey")
            .field("kind", &self.kind)
            .field("display", &display_prefix(self.text))
            .finish()
    }
}

impl<'a> ParsedKey<'a> {
    /// The key's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The full key text (secret: hash it, never log it).
    pub fn expose_secret(&self) -> &'a str {
        self.text
    }

    /// The first characters of the key, safe to show.
    pub fn display(&self) -> &'a str {
        display_prefix(self.text)
    }
}

/// The credential of an `Authorization` header value: `Ok(None)` for an empty token, `Err(())`
/// when the value is not `Bearer <token>` (the scheme in any case, RFC 9110 §11.1) or holds a
/// byte that is not visible ASCII, space or tab. The token is trimmed of surrounding spaces.
#[allow(clippy::result_unit_err)]
pub fn bearer_token(value: &[u8]) -> Result<Option<&str>, ()> {
    if !value
        .iter()
        .all(|b| *b == b' ' || *b == b'\t' || b.is_ascii_graphic())
    {
        return Err(());
    }
    let s = std::str::from_utf8(value).map_err(|_| ())?;
    let (scheme, token) = s.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(());
    }
    let token = token.trim();
    Ok((!token.is_empty()).then_some(token))
}

/// The first [`DISPLAY_LEN`] characters of a key (or fewer if the text is shorter).
pub fn display_prefix(key: &str) -> &str {
    let end = key
        .char_indices()
        .nth(DISPLAY_LEN)
        .map_or(key.len(), |(i, _)| i);
    &key[..end]
}

fn truncate(s: &str, n: usize) -> &str {
    let end = s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

impl KeyFormat {
    /// A format with the given prefix: 1 to 16 lower-case ASCII letters or digits.
    pub fn new(prefix: &str) -> Result<Self, InvalidInput> {
        if prefix.is_empty()
            || prefix.len() > 16
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(InvalidInput::new(
                "key prefix must be 1 to 16 lower-case letters or digits",
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The deployment prefix (`kg` by default).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Total length of a key in this format.
    pub fn key_len(&self) -> usize {
        self.prefix.len() + 4 + RANDOM_LEN + CHECKSUM_LEN
    }

    /// Generates a new key of `kind`, drawing randomness from `fill` (pass the OS CSPRNG).
    pub fn generate(&self, kind: Kind, fill: impl FnMut(&mut [u8])) -> String {
        let mut out = Vec::with_capacity(self.key_len());
        out.extend_from_slice(self.prefix.as_bytes());
        out.push(b'_');
        out.extend_from_slice(kind.as_str().as_bytes());
        out.push(b'_');
        let start = out.len();
        out.resize(start + RANDOM_LEN, 0);
        base62::random_chars(&mut out[start..], fill);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&base62::encode_u32_6(crc));
        // Every byte pushed is ASCII.
        out.into_iter().map(char::from).collect()
    }

    /// Checks a key's shape and checksum offline. Errors say what is wrong without echoing it.
    pub fn parse<'a>(&self, text: &'a str) -> Result<ParsedKey<'a>, InvalidInput> {
        let bytes = text.as_bytes();
        if bytes.len() != self.key_len() {
            return Err(InvalidInput::new("key has the wrong length"));
        }
        let p = self.prefix.len();
        if &bytes[..p] != self.prefix.as_bytes() || bytes[p] != b'_' {
            return Err(InvalidInput::new("key has the wrong prefix"));
        }
        let kind = match &bytes[p + 1..p + 3] {
            b"sk" => Kind::Sk,
            b"ut" => Kind::Ut,
            b"pk" => Kind::Pk,
            _ => return Err(InvalidInput::new("key has an unknown kind")),
        };
        if bytes[p + 3] != b'_' {
            return Err(InvalidInput::new("key has the wrong shape"));
        }
        let body = &bytes[p + 4..];
        if !body.iter().all(|&b| base62::is_base62(b)) {
            return Err(InvalidInput::new("key has characters outside base62"));
        }
        let split = bytes.len() - CHECKSUM_LEN;
        let expected = base62::encode_u32_6(crc32fast::hash(&bytes[..split]));
        if expected != bytes[split..] {
            return Err(InvalidInput::new("key checksum does not match"));
        }
        Ok(ParsedKey { kind, text })
    }
}

impl Default for KeyFormat {
    fn default() -> Self {
        Self {
            prefix: "kg".to_owned(),
        }
    }
}

/// The stored form of a key: 32 bytes of SHA-256 or HMAC-SHA256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Compares two hashes in constant time.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a hash from stored bytes; `None` unless exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(KeyHash)
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Hashes keys for storage and lookup: SHA-256, or HMAC-SHA256 with a server-side pepper.
#[derive(Clone)]
pub struct KeyHasher {
    mac: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHasher")
            .field("peppered", &self.mac.is_some())
            .finish()
    }
}

impl KeyHasher {
    /// Plain SHA-256 (keys are 190 bits of entropy: a fast hash is right for them).
    pub fn sha256() -> Self {
        Self { mac: None }
    }

    /// HMAC-SHA256 keyed with `pepper`, so a stolen database alone cannot confirm a guess.
    pub fn with_pepper(pepper: &[u8]) -> Self {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(pepper).ok();
        Self { mac }
    }

    /// The stored hash of `key`.
    pub fn hash(&self, key: &str) -> KeyHash {
        match &self.mac {
            None => KeyHash(Sha256::digest(key.as_bytes()).into()),
            Some(mac) => {
                let mut m = mac.clone();
                m.update(key.as_bytes());
                KeyHash(m.finalize().into_bytes().into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_fill() -> impl FnMut(&mut [u8]) {
        let mut n = 7u8;
        move |b: &mut [u8]| {
            for x in b.iter_mut() {
                n = n.wrapping_mul(31).wrapping_add(17);
                *x = n;
            }
        }
    }

    #[test]
    fn generated_key_parses() {
        let f = KeyFormat::default();
        let k = f.generate(Kind::Pk, counter_fill());
        assert_eq!(k.len(), 44);
        assert!(k.starts_with("kg_pk_"));
        let p = f.parse(&k).expect("parses");
        assert_eq!(p.kind(), Kind::Pk);
        assert_eq!(p.display(), &k[..10]);
    }

    #[test]
    fn other_prefix_is_rejected() {
        let po = KeyFormat::new("po").expect("prefix");
        let k = po.generate(Kind::Sk, counter_fill());
        assert!(KeyFormat::default().parse(&k).is_err());
        assert!(po.parse(&k).is_ok());
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for p in ["", "KG", "k_g", "abcdefghijklmnopq"] {
            assert!(KeyFormat::new(p).is_err(), "{p}");
        }
    }

    #[test]
    fn pepper_changes_hash() {
        let a = KeyHasher::sha256().hash("x");
        let b = KeyHasher::with_pepper(b"pepper").hash("x");
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&KeyHasher::sha256().hash("x")));
    }

    #[test]
    fn debug_never_prints_secret() {
        let f = KeyFormat::default();
        let k = f.generate(Kind::Sk, counter_fill());
        let p = f.parse(&k).expect("parses");
        assert!(!format!("{p:?}").contains(&k[10..]));
    }
}

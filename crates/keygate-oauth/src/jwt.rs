//! JWT access tokens (RFC 9068) signed with Ed25519 (`EdDSA`), and the JWKS that publishes
//! their public keys.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The `typ` header of an access token (RFC 9068 §2.1).
pub const TYP: &str = "at+jwt";

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer: this server's URL.
    pub iss: String,
    /// The user id, or the client id for `client_credentials`.
    pub sub: String,
    /// The resource the token is for.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Token id.
    pub jti: String,
    /// The client.
    pub client_id: String,
    /// Granted scope, space separated.
    pub scope: String,
    /// keygate: the tenant.
    pub tenant_id: String,
    /// keygate: the grant (token family).
    pub grant_id: String,
}

/// A signing key as stored: PKCS#8 private key (base64) and public key (base64url).
#[derive(Clone)]
pub struct KeyMaterial {
    /// Key id.
    pub kid: String,
    /// PKCS#8 document, base64.
    pub pkcs8: String,
    /// Public key, base64url (JWK `x`).
    pub x: String,
    /// Whether it still signs new tokens.
    pub active: bool,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("kid", &self.kid)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Makes a new Ed25519 key pair from the OS random source: (PKCS#8 base64, public base64url).
pub fn generate_ed25519() -> Result<(String, String), String> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "no randomness for a signing key".to_owned())?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| "generated signing key is invalid".to_owned())?;
    Ok((
        STANDARD.encode(doc.as_ref()),
        URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
    ))
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    /// Not a JWT at all.
    Malformed,
    /// A JWT this server did not sign (or for another issuer or audience, or altered).
    Invalid,
    /// Signed here, but past its `exp`.
    Expired,
}

/// The key that signs: kept parsed, with its JWT header already encoded.
struct Signer {
    kid: String,
    pair: ring::signature::Ed25519KeyPair,
    /// `base64url({"alg":"EdDSA","typ":"at+jwt","kid":…})` followed by `.`.
    header: String,
}

/// The signing key in use and every public key still published.
pub struct Keyring {
    signer: Option<Signer>,
    verifiers: HashMap<String, DecodingKey>,
    jwks: serde_json::Value,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("signer", &self.signer.as_ref().map(|s| &s.kid))
            .field("verifiers", &self.verifiers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Builds the ring from stored keys (newest first; the first active one signs).
    pub fn new(keys: &[KeyMaterial]) -> Result<Self, String> {
        let mut signer = None;
        let mut verifiers = HashMap::new();
        let mut jwks = Vec::new();
        for k in keys {
            if k.active && signer.is_none() {
                let der = STANDARD
                    .decode(&k.pkcs8)
                    .map_err(|_| format!("signing key {} is not base64", k.kid))?;
                let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&der)
                    .map_err(|_| format!("signing key {} is not an Ed25519 key", k.kid))?;
                let header = serde_json::json!({"alg": "EdDSA", "typ": TYP, "kid": k.kid});
                let mut header = URL_SAFE_NO_PAD.encode(header.to_string());
                header.push('.');
                signer = Some(Signer {
                    kid: k.kid.clone(),
                    pair,
                    header,
                });
            }
            let dk = DecodingKey::from_ed_components(&k.x)
                .map_err(|e| format!("public key {}: {e}", k.kid))?;
            verifiers.insert(k.kid.clone(), dk);
            jwks.push(serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid,
                "alg": "EdDSA", "use": "sig",
            }));
        }
        Ok(Self {
            signer,
            verifiers,
            jwks: serde_json::json!({ "keys": jwks }),
        })
    }

    /// The JWKS document (RFC 7517).
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// The id of the key that signs.
    pub fn signing_kid(&self) -> Option<&str> {
        self.signer.as_ref().map(|s| s.kid.as_str())
    }

    /// Signs an access token (RFC 7515 compact serialization). Written here rather than
    /// through `jsonwebtoken::encode`, which parses the PKCS#8 key into a ring key pair again
    /// on every call; this keeps the pair and the encoded header ready, leaving the claims'
    /// JSON, two base64 encodings and the signature.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, String> {
        let s = self.signer.as_ref().ok_or("no active signing key")?;
        let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jwt = String::with_capacity(s.header.len() + payload.len() * 4 / 3 + 90);
        jwt.push_str(&s.header);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut jwt);
        let sig = s.pair.sign(jwt.as_bytes());
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut jwt);
        Ok(jwt)
    }

    /// Checks signature, `typ`, issuer, audience and expiry (no leeway: the same clock
    /// signed it).
    pub fn verify(&self, token: &str, iss: &str, aud: &str) -> Result<AccessClaims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if header.alg != Algorithm::EdDSA || header.typ.as_deref() != Some(TYP) {
            return Err(VerifyError::Invalid);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|k| self.verifiers.get(k))
            .ok_or(VerifyError::Invalid)?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = 0;
        v.set_issuer(&[iss]);
        v.set_audience(&[aud]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        match jsonwebtoken::decode::<AccessClaims>(token, key, &v) {
            Ok(d) => Ok(d.claims),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(VerifyError::Expired)
            }
            Err(_) => Err(VerifyError::Invalid),
        }
    }
}

/// Whether a bearer token looks like a JWT (three base64url parts), before any crypto.
pub fn looks_like_jwt(token: &str) -> bool {
    token.len() < 8192
        && token.starts_with("eyJ")
        && token.bytes().filter(|&b| b == b'.').count() == 2
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
        .unwrap_or(0)
    }

    fn claims(exp: i64) -> AccessClaims {
        AccessClaims {
            iss: "https://auth.example".into(),
            sub: "usr_1".into(),
            aud: "https://api.example".into(),
            exp,
            iat: exp - 3600,
            jti: "at_1".into(),
            client_id: "cli_1".into(),
            scope: "docs:read".into(),
            tenant_id: "default".into(),
            grant_id: "grt_1".into(),
        }
    }

    fn ring(active: bool) -> (Keyring, KeyMaterial) {
        let (pkcs8, x) = generate_ed25519().expect("key");
        let m = KeyMaterial {
            kid: "k1".into(),
            pkcs8,
            x,
            active,
        };
        (Keyring::new(std::slice::from_ref(&m)).expect("ring"), m)
    }

    #[test]
    fn signs_and_verifies_with_rfc9068_header() {
        let (r, _) = ring(true);
        let t = r.sign(&claims(now() + 60)).expect("sign");
        assert!(looks_like_jwt(&t));
        let h = jsonwebtoken::decode_header(&t).expect("header");
        assert_eq!(h.typ.as_deref(), Some("at+jwt"));
        assert_eq!(h.kid.as_deref(), Some("k1"));
        let c = r
            .verify(&t, "https://auth.example", "https://api.example")
            .expect("ok");
        assert_eq!(c, claims(c.exp));
        assert_eq!(r.jwks()["keys"][0]["crv"], "Ed25519");
    }

    #[test]
    fn refuses_expired_foreign_and_altered_tokens() {
        let (r, m) = ring(true);
        let expired = r.sign(&claims(now() - 1)).expect("sign");
        assert_eq!(
            r.verify(&expired, "https://auth.example", "https://api.example"),
            Err(VerifyError::Expired)
        );
        let t = r.sign(&claims(now() + 60)).expect("sign");
        assert_eq!(
            r.verify(&t, "https://other", "https://api.example"),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            r.verify(&t, "https://auth.example", "https://other"),
            Err(VerifyError::Invalid)
        );
        // Same kid, another key: the signature does not verify.
        let (other, _) = ring(true);
        let forged = other.sign(&claims(now() + 60)).expect("sign");
        assert_eq!(
            r.verify(&forged, "https://auth.example", "https://api.example"),
            Err(VerifyError::Invalid)
        );
        // A payload edited after signing.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut c = claims(now() + 60);
        c.scope = "*".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).expect("json"));
        assert_eq!(
            r.verify(
                &parts.join("."),
                "https://auth.example",
                "https://api.example"
            ),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            r.verify("nope", "https://auth.example", "https://api.example"),
            Err(VerifyError::Malformed)
        );
        // A retired key still verifies but no longer signs.
        let retired = Keyring::new(&[KeyMaterial { active: false, ..m }]).expect("ring");
        assert!(retired
            .verify(&t, "https://auth.example", "https://api.example")
            .is_ok());
        assert!(retired.sign(&claims(now() + 60)).is_err());
    }

    #[test]
    fn alg_none_and_hmac_tokens_are_refused() {
        let (r, _) = ring(true);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(now() + 60)).expect("json"));
        for alg in ["none", "HS256"] {
            let head =
                URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"at+jwt","kid":"k1"}}"#));
            let t = format!("{head}.{body}.");
            assert!(r
                .verify(&t, "https://auth.example", "https://api.example")
                .is_err());
        }
    }
}

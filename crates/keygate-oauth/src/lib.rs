//! keygate's OAuth 2.0 authorization-server rules, apart from HTTP and storage: the PKCE check
//! (RFC 7636, S256 only), redirect-URI registration and matching (exact; loopback may vary the
//! port, RFC 8252 §7.3), scope strings (RFC 6749 §3.3), the error codes, and JWT access tokens
//! (RFC 9068) signed with Ed25519.
//!
//! The issuance checks (`grant`): the authorization request, the plan's narrowing of its
//! scope, the code exchange and the refresh with its scope narrowing.
//!
//! It must never know HTTP or storage: what it decides it decides over plain data, so it can be
//! unit- and property-tested without a server.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod grant;
pub mod jwt;
pub mod pkce;
pub mod redirect;
pub mod scope;

/// The error codes of RFC 6749 §4.1.2.1 and §5.2, RFC 7009 and RFC 6750.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A parameter is missing, repeated, or malformed.
    InvalidRequest,
    /// Client authentication failed.
    InvalidClient,
    /// The code, refresh token or verifier is invalid, expired, revoked or not this client's.
    InvalidGrant,
    /// The client may not use this grant type.
    UnauthorizedClient,
    /// The grant type is not supported.
    UnsupportedGrantType,
    /// Only `response_type=code` is supported.
    UnsupportedResponseType,
    /// The scope is unknown or beyond what the client may have.
    InvalidScope,
    /// The user (or the server) refused.
    AccessDenied,
    /// Something failed on the server.
    ServerError,
    /// The server cannot answer now.
    TemporarilyUnavailable,
    /// RFC 7009: the token type cannot be revoked.
    UnsupportedTokenType,
}

impl ErrorCode {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::UnsupportedResponseType => "unsupported_response_type",
            Self::InvalidScope => "invalid_scope",
            Self::AccessDenied => "access_denied",
            Self::ServerError => "server_error",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::UnsupportedTokenType => "unsupported_token_type",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SHA-256 of a token, hex: how codes, refresh tokens and client secrets are stored.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

/// Compares two strings in constant time (for their length).
pub fn ct_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

//! The pure core of keygate.
//!
//! Everything that decides whether a request may pass lives here: the key format and its
//! offline checksum, key hashing, scopes, origin and IP/CIDR allow-lists, rate-window math and
//! the decision pipeline, and who may act on what in the management API (`access`). The crate
//! does no I/O, spawns nothing and reads no clock: the caller
//! passes `now` and the random bytes in, so every rule can be fuzzed, property-tested and
//! benchmarked alone.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod audit;
pub mod base62;
pub mod decision;
pub mod ids;
pub mod ip;
pub mod issue;
pub mod key;
pub mod name;
pub mod origin;
pub mod ratelimit;
pub mod route;
pub mod scope;

pub use audit::{verify_chain, AuditEvent, ChainBreak, ChainProblem};
pub use decision::{decide, Charge, Code, KeyPolicy, KeyStatus, RequestFacts, RouteClass};
pub use ids::{FamilyId, Id, KeyId, TenantId, UserId};
pub use ip::IpAllowList;
pub use key::{KeyFormat, KeyHash, KeyHasher, Kind, ParsedKey};
pub use name::name_problem;
pub use origin::{Origin, OriginList, OriginPattern};
pub use ratelimit::{RateDecision, RateLimit, WindowState};
pub use route::{normalize as normalize_path, NormalPath, PathError, PathPattern};
pub use scope::{Scope, ScopeSet};

/// An error from parsing a value that came from outside (a request body, config, a header).
///
/// Carries a human-readable message that names what was wrong, never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    message: String,
}

impl InvalidInput {
    /// Builds an error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message, safe to show to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InvalidInput {}

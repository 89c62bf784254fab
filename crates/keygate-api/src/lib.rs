//! The request and response shapes of keygate's HTTP API, shared by the server (which
//! answers with them and documents them in its OpenAPI document), the dashboard and the CLI.
//! Plain data: no rules (those are in `keygate-engine` and `keygate-core`), no HTTP.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// `rate_limit` in a request body.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    /// Requests per window.
    pub limit: u32,
    /// Window length.
    pub window_seconds: u32,
}

/// `POST /v1/keys` body.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// `sk`, `ut` or `pk`.
    pub kind: String,
    /// Display name.
    pub name: String,
    /// Tenant (operator only, for another tenant).
    pub tenant_id: Option<String>,
    /// Owning user (required for `ut`).
    pub user_id: Option<String>,
    /// `default`, `aidemo` or `widget`.
    pub preset: Option<String>,
    /// Scopes.
    pub scopes: Option<Vec<String>>,
    /// IPs and CIDRs.
    pub allowed_ips: Option<Vec<String>>,
    /// Origins.
    pub allowed_origins: Option<Vec<String>>,
    /// Rate limit.
    pub rate_limit: Option<RateLimitBody>,
    /// Lifetime credit budget.
    pub budget: Option<u64>,
    /// Expiry (RFC 3339).
    pub expires_at: Option<String>,
    /// Or: lifetime in seconds.
    pub ttl_seconds: Option<u64>,
    /// Automatic rotation period.
    pub rotation_days: Option<u32>,
    /// Free-form JSON object.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

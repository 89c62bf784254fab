//! JSON shapes of the API's resources.

use keygate_core::RateLimit;
pub use keygate_engine::clock::{parse_rfc3339, rfc3339};
use keygate_engine::Engine;
use keygate_store::{KeyRecord, Tenant, User};
use serde::Serialize;

/// A key's budget as shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BudgetView {
    /// The cap.
    pub limit: u64,
    /// Credits spent.
    pub spent: u64,
    /// Credits left.
    pub remaining: u64,
}

/// A key as shown by the management API (never the plaintext).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    /// `key_…`
    pub id: String,
    /// Name.
    pub name: String,
    /// `sk`, `ut`, `pk`.
    pub kind: &'static str,
    /// Tenant.
    pub tenant_id: String,
    /// User (for `ut`).
    pub user_id: Option<String>,
    /// First 10 characters of the key.
    pub start: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// IP allow-list.
    pub allowed_ips: Vec<String>,
    /// Origin allow-list.
    pub allowed_origins: Vec<String>,
    /// The key's own rate limit.
    #[schema(value_type = Option<keygate_api::RateLimitBody>)]
    pub rate_limit: Option<RateLimit>,
    /// Budget.
    pub budget: Option<BudgetView>,
    /// Expiry.
    pub expires_at: Option<String>,
    /// Automatic rotation period.
    pub rotation_days: Option<u32>,
    /// Metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `active`, `grace`, `revoked`, `expired`.
    pub status: &'static str,
    /// Predecessor.
    pub rotated_from: Option<String>,
    /// Successor.
    pub rotated_to: Option<String>,
    /// Created.
    pub created_at: String,
    /// Updated.
    pub updated_at: String,
    /// Last used (kept current within a second or so).
    pub last_used_at: Option<String>,
    /// Revoked.
    pub revoked_at: Option<String>,
}

impl KeyView {
    /// Builds the view; spent credits exclude what this node holds leased and unspent.
    pub fn new(state: &Engine, k: &KeyRecord, now_ms: i64) -> Self {
        let budget = k.budget.map(|limit| {
            let spent = k
                .budget_withdrawn
                .saturating_sub(state.counters.budget_leased(&k.family_id));
            BudgetView {
                limit,
                spent,
                remaining: limit.saturating_sub(spent),
            }
        });
        let status = k.status.at(k.expires_at_ms, now_ms).as_str();
        KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            kind: k.kind.as_str(),
            tenant_id: k.tenant_id.clone(),
            user_id: k.user_id.clone(),
            start: k.display.clone(),
            scopes: k.scopes.to_strings(),
            allowed_ips: k.allowed_ips.to_strings(),
            allowed_origins: k.allowed_origins.to_strings(),
            rate_limit: k.rate_limit,
            budget,
            expires_at: k.expires_at_ms.map(rfc3339),
            rotation_days: k.rotation_days,
            metadata: k.metadata.clone(),
            status,
            rotated_from: k.rotated_from.clone(),
            rotated_to: k.rotated_to.clone(),
            created_at: rfc3339(k.created_at_ms),
            updated_at: rfc3339(k.updated_at_ms),
            last_used_at: k.last_used_at_ms.map(rfc3339),
            revoked_at: k.revoked_at_ms.map(rfc3339),
        }
    }
}

/// A newly issued key: the plaintext, once, and the record. `Debug` hides the plaintext.
#[derive(Serialize, utoipa::ToSchema)]
pub struct IssuedKey {
    /// The plaintext key. Shown only in this response.
    pub key: String,
    /// The record.
    #[serde(flatten)]
    pub record: KeyView,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("key", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

/// A tenant as shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantView {
    /// `tnt_…` or `default`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Plan.
    pub plan: String,
    /// Pool balance; `null` = unlimited.
    pub credits: Option<u64>,
    /// Created.
    pub created_at: String,
}

impl TenantView {
    /// Builds the view; the balance includes credits this node holds leased and unspent.
    pub fn new(state: &Engine, t: &Tenant) -> Self {
        TenantView {
            id: t.id.clone(),
            name: t.name.clone(),
            plan: t.plan.clone(),
            credits: t.credits.map(|c| c + state.counters.credits_leased(&t.id)),
            created_at: rfc3339(t.created_at_ms),
        }
    }
}

/// A user as shown (never the password hash).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    /// `usr_…`
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Email.
    pub email: String,
    /// Name.
    pub name: Option<String>,
    /// Plan.
    pub plan: String,
    /// Created.
    pub created_at: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            id: u.id.clone(),
            tenant_id: u.tenant_id.clone(),
            email: u.email.clone(),
            name: u.name.clone(),
            plan: u.plan.clone(),
            created_at: rfc3339(u.created_at_ms),
        }
    }
}

/// A page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListView<T> {
    /// Items, newest first.
    pub data: Vec<T>,
    /// Pass as `?cursor=` for the next page; `null` at the end.
    pub next_cursor: Option<String>,
}

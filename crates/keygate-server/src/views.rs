//! The API's resources as shown (the shapes are `keygate-api`'s), built from records.

use keygate_api::RateLimitBody;
pub use keygate_api::{
    AlertView, AuditView, BrokenView, BudgetView, ClientView, CreatedTenant, DeliveryView,
    IssuedKey, KeyView, ListView, TenantView, UsageBucket, UsageView, UserView, VerifyView,
    WebhookView,
};
pub use keygate_engine::clock::{parse_rfc3339, rfc3339};
use keygate_engine::Engine;
use keygate_store::{KeyRecord, Tenant, User};

/// Builds the view; spent credits exclude what this node holds leased and unspent.
pub fn key_view(state: &Engine, k: &KeyRecord, now_ms: i64) -> KeyView {
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
    let status = k.status.at(k.expires_at_ms, now_ms).as_str().to_owned();
    KeyView {
        id: k.id.to_string(),
        name: k.name.clone(),
        kind: k.kind.as_str().to_owned(),
        tenant_id: k.tenant_id.to_string(),
        user_id: k.user_id.as_deref().map(str::to_owned),
        start: k.display.clone(),
        scopes: k.scopes.to_strings(),
        allowed_ips: k.allowed_ips.to_strings(),
        allowed_origins: k.allowed_origins.to_strings(),
        rate_limit: k.rate_limit.map(|r| RateLimitBody {
            limit: r.limit,
            window_seconds: r.window_seconds,
        }),
        budget,
        expires_at: k.expires_at_ms.map(rfc3339),
        rotation_days: k.rotation_days,
        metadata: k.metadata.clone(),
        status,
        rotated_from: k.rotated_from.as_deref().map(str::to_owned),
        rotated_to: k.rotated_to.as_deref().map(str::to_owned),
        created_at: rfc3339(k.created_at_ms),
        updated_at: rfc3339(k.updated_at_ms),
        last_used_at: k.last_used_at_ms.map(rfc3339),
        revoked_at: k.revoked_at_ms.map(rfc3339),
    }
}

/// Builds the view; the balance includes credits this node holds leased and unspent.
pub fn tenant_view(state: &Engine, t: &Tenant) -> TenantView {
    TenantView {
        id: t.id.to_string(),
        name: t.name.clone(),
        plan: t.plan.clone(),
        credits: t.credits.map(|c| c + state.counters.credits_leased(&t.id)),
        created_at: rfc3339(t.created_at_ms),
        plan_started_at: rfc3339(t.plan_started_at_ms),
        trial_ends_at: t.trial_ends_at_ms.map(rfc3339),
        verified: t.verified,
    }
}

pub fn user_view(u: &User) -> UserView {
    UserView {
        id: u.id.to_string(),
        tenant_id: u.tenant_id.to_string(),
        email: u.email.clone(),
        name: u.name.clone(),
        plan: u.plan.clone(),
        created_at: rfc3339(u.created_at_ms),
        role: u.role.as_str().to_owned(),
        verified: u.verified,
    }
}

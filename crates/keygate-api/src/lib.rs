//! The request and response shapes of keygate's HTTP API, shared by the server (which
//! answers with them and documents them in its OpenAPI document), the dashboard and the CLI.
//! Plain data: no rules (those are in `keygate-engine` and `keygate-core`), no HTTP.
#![forbid(unsafe_code)]

use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Cow;

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

/// A key's budget as shown.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetView {
    /// The cap.
    pub limit: u64,
    /// Credits spent.
    pub spent: u64,
    /// Credits left.
    pub remaining: u64,
}

/// A key as shown by the management API (never the plaintext).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyView {
    /// `key_…`
    pub id: String,
    /// Name.
    pub name: String,
    /// `sk`, `ut`, `pk`.
    pub kind: String,
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
    pub rate_limit: Option<RateLimitBody>,
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
    pub status: String,
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

/// A newly issued key: the plaintext, once, and the record. `Debug` hides the plaintext.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// When the current plan started.
    pub plan_started_at: String,
    /// When the trial ends and the plan's `then` takes over; `null` off a trial.
    pub trial_ends_at: Option<String>,
    /// False until the owner opens the emailed link (`[signup] verify_email`); meanwhile the
    /// account's keys answer `ACCOUNT_UNVERIFIED` on the API.
    pub verified: bool,
}

/// A user as shown (never the password hash).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// `owner` or `member` of the account.
    pub role: String,
    /// Whether the email address is verified.
    pub verified: bool,
}

/// A page of a list.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListView<T> {
    /// Items, newest first.
    pub data: Vec<T>,
    /// Pass as `?cursor=` for the next page; `null` at the end.
    pub next_cursor: Option<String>,
}

/// An audit event as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditView {
    pub id: String,
    pub at: String,
    pub node: String,
    pub seq: i64,
    pub tenant_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub kind: Option<String>,
    pub code: Option<String>,
    pub status: Option<i64>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub scope: Option<String>,
    pub ip: Option<String>,
    pub origin: Option<String>,
    pub credits: Option<i64>,
    pub latency_us: Option<i64>,
    pub request_id: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub prev_hash: String,
    pub hash: String,
}

/// `GET /v1/audit/verify` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyView {
    /// Every chain intact up to its head.
    pub ok: bool,
    /// Events checked.
    pub checked: u64,
    /// Chains (nodes) checked.
    pub nodes: u64,
    /// The first broken place.
    pub broken: Option<BrokenView>,
}

/// Where a chain breaks.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokenView {
    /// Node.
    pub node: String,
    /// Sequence number in the node's chain.
    pub seq: i64,
    /// `changed`, `missing` or `inserted`.
    pub problem: String,
}

/// One bucket of usage.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageBucket {
    /// Start of the bucket.
    pub at: String,
    /// Decision code.
    pub code: String,
    /// Requests decided.
    pub requests: u64,
    /// Credits drawn.
    pub credits: u64,
}

/// A usage answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageView {
    /// `minute`, `hour` or `day`.
    pub granularity: String,
    /// Buckets (only those with traffic), oldest first, one per code.
    pub data: Vec<UsageBucket>,
}

/// An alert as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertView {
    pub id: String,
    pub at: String,
    pub tenant_id: String,
    pub key_id: Option<String>,
    pub kind: String,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// An endpoint as the API shows it (the secret only on creation).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub tenant_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A delivery attempt record.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: u32,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
}

/// A client as the API shows it (the secret only on creation).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub client_type: String,
    pub redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
    pub tenant_id: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// `POST /v1/tenants` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedTenant {
    #[serde(flatten)]
    pub tenant: TenantView,
    /// The tenant's first admin key (`sk`, scope `*` inside the tenant), shown once.
    pub admin_key: IssuedKey,
}

/// Distinguishes "absent" (`None`) from "null" (`Some(None)`) in a PATCH body.
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /v1/keys/{id}` body: only the fields given change; `null` clears.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<RateLimitBody>, nullable)]
    pub rate_limit: Option<Option<RateLimitBody>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u64>, nullable)]
    pub budget: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub expires_at: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u32>, nullable)]
    pub rotation_days: Option<Option<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /v1/keys/{id}/rotate` body.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working (default from config; 0 allowed; max 30 days).
    pub grace_seconds: Option<u64>,
}

/// `POST /v1/webhooks` body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    pub url: String,
    pub events: Option<Vec<String>>,
    pub tenant_id: Option<String>,
}

/// `POST /v1/oauth/clients` body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    pub name: String,
    #[serde(rename = "type")]
    pub client_type: String,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
    pub tenant_id: Option<String>,
}

/// `POST /v1/tenants` body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
    pub plan: Option<String>,
    pub credits: Option<u64>,
}

/// `PATCH /v1/tenants/{id}` body: what to change (operator only).
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    /// A new display name.
    pub name: Option<String>,
    /// A plan to start now (its trial and credit grant with it).
    pub plan: Option<String>,
}

/// `POST /v1/signup` body.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUp {
    /// The owner's email address.
    pub email: String,
    /// At least 10 characters, not a common password.
    pub password: String,
    /// The owner's name.
    pub name: Option<String>,
    /// The account's name (default: the email address).
    pub organisation: Option<String>,
}

impl std::fmt::Debug for SignUp {
    // Not derived: the password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignUp")
            .field("email", &self.email)
            .field("name", &self.name)
            .field("organisation", &self.organisation)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/signup` answer (201): the account, its owner and, for a new account, the owner's
/// first key, shown once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignedUp {
    /// The account.
    pub account: Option<TenantView>,
    /// Its owner.
    pub user: Option<UserView>,
    /// A `ut` key of the owner (absent when the address was registered already).
    pub key: Option<String>,
}

/// A plan as its users see it: what it includes and its limits.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanView {
    /// Its name.
    pub name: String,
    /// What it includes (`api`, `webhooks`, `oauth`, `sk_keys`).
    pub features: Vec<String>,
    /// The rate limit of its users' keys.
    pub rate_limit: Option<RateLimitBody>,
    /// Credits granted when it starts (`null`: an unlimited pool).
    pub credits: Option<u64>,
    /// The pool each month of the plan.
    pub monthly_credits: Option<u64>,
    /// Ceilings for keys the account's users make.
    pub max_keys: Option<u32>,
    /// A key's largest budget.
    pub max_budget: Option<u64>,
    /// A key's longest lifetime, days.
    pub max_ttl_days: Option<u32>,
    /// A trial's length, days.
    pub days: Option<u32>,
    /// The plan a trial becomes.
    pub then: Option<String>,
}

/// `GET /v1/account`: the caller's account, its plan, and the plans that include the API.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountView {
    /// The account.
    pub account: TenantView,
    /// Its plan.
    pub plan: PlanView,
    /// The configured plans that include API access.
    pub plans_with_api: Vec<String>,
}

/// `GET /v1/signup/verify` answer: the address that is now verified.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verified {
    /// Its user.
    pub user: UserView,
}

/// `POST /v1/users/invite` body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteUser {
    /// Where the invitation goes.
    pub email: String,
    /// `member` (the only role an invitation gives).
    pub role: Option<String>,
    /// The account (an admin `sk` key of the operator names it; others act in their own).
    pub tenant_id: Option<String>,
}

/// `POST /v1/password/forgot` body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPassword {
    /// The address to send a reset link to (if it belongs to a user).
    pub email: String,
}

/// `POST /v1/password/reset` body.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    /// The token of the emailed link.
    pub token: String,
    /// The new password: at least 10 characters, not a common password.
    pub password: String,
}

impl std::fmt::Debug for ResetPassword {
    // Not derived: neither the token nor the password goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetPassword").finish_non_exhaustive()
    }
}

/// `{"error": {"code", "message", "request_id"}}`: every refusal of keygate's own API.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error's details.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// `MISSING_KEY`, `MALFORMED_KEY`, `UNKNOWN_KEY`, `REVOKED`, `EXPIRED`,
    /// `BUDGET_EXHAUSTED`, `INSUFFICIENT_CREDITS`, `FORBIDDEN_SCOPE`, `ORIGIN_NOT_ALLOWED`,
    /// `IP_NOT_ALLOWED`, `BLOCKED_FOR_KEY_TYPE`, `TENANT_MISMATCH`, `PLAN_FEATURE`,
    /// `RATE_LIMITED`, `INVALID_REQUEST`, `NOT_FOUND`, `CONFLICT`, `PAYLOAD_TOO_LARGE`,
    /// `UNSUPPORTED_MEDIA_TYPE`, `METHOD_NOT_ALLOWED`, `REQUEST_TIMEOUT`, `UNAVAILABLE`,
    /// `INTERNAL`.
    #[schema(example = "FORBIDDEN_SCOPE")]
    pub code: String,
    /// For people.
    pub message: String,
    /// Also in the `X-Request-Id` header.
    pub request_id: String,
}

/// `POST /v1/webhooks/{id}/test` answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestEvent {
    /// The queued delivery.
    pub delivery_id: String,
    /// The event it carries.
    pub event_id: String,
}

/// `POST /v1/keys/verify` body. `Debug` hides the key.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    pub key: String,
    pub scope: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub origin: Option<String>,
    pub ip: Option<String>,
    pub tenant_id: Option<String>,
    /// Credits this call costs (at most 1,000,000,000).
    #[schema(maximum = 1_000_000_000)]
    pub cost: Option<u64>,
}

impl std::fmt::Debug for VerifyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyBody")
            .field("key", &keygate_core::key::display_prefix(&self.key))
            .field("scope", &self.scope)
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The key's rate window after this call.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateView {
    pub limit: u32,
    pub remaining: u32,
    pub reset_seconds: u32,
    pub window_seconds: u32,
}

/// The key's budget after this call.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetLeft {
    pub limit: u64,
    pub remaining: Option<u64>,
}

/// `POST /v1/keys/verify` answer: `valid` and `code` for the key in the body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyAnswer {
    pub valid: bool,
    #[schema(value_type = String)]
    pub code: Cow<'static, str>,
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    #[schema(value_type = Option<String>)]
    pub kind: Option<Cow<'static, str>>,
    pub scopes: Option<Vec<String>>,
    pub ratelimit: Option<RateView>,
    pub budget: Option<BudgetLeft>,
    pub credits_remaining: Option<u64>,
    pub expires_at: Option<String>,
}

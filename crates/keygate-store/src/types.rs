//! Records as they cross the store boundary.

use keygate_core::access::Role;
use keygate_core::{
    FamilyId, IpAllowList, KeyHash, KeyId, KeyStatus, Kind, OriginList, RateLimit, ScopeSet,
    TenantId, UserId,
};

/// A tenant: an organisation with a plan and a credit pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// `tnt_…`, or `default` for the operator's tenant.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Plan name (from config).
    pub plan: String,
    /// Pool balance in the store (credits leased to nodes are already subtracted);
    /// `None` = unlimited.
    pub credits: Option<u64>,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
    /// When the current plan started, Unix ms.
    pub plan_started_at_ms: i64,
    /// When the trial ends and the plan's `then` takes over, Unix ms; `None` off a trial.
    pub trial_ends_at_ms: Option<i64>,
    /// How many months of the current plan the pool was refilled for (`monthly_credits`).
    pub refilled_months: u32,
    /// Whether the account may call the API: false from a sign-up with
    /// `[signup] verify_email` until its owner opens the link (`ACCOUNT_UNVERIFIED`).
    pub verified: bool,
}

/// A change to a tenant ([`crate::Store::change_tenant`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantChange {
    /// A new display name.
    pub name: Option<String>,
    /// A plan to start.
    pub plan: Option<PlanStart>,
    /// Only if the tenant is on this plan with this trial end (ending a trial, once).
    pub if_trial: Option<(String, i64)>,
}

/// A plan starting for a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStart {
    /// The plan's name.
    pub plan: String,
    /// When it starts, Unix ms.
    pub started_at_ms: i64,
    /// When its trial ends, for a trial.
    pub trial_ends_at_ms: Option<i64>,
    /// Credits it grants, added to the pool (capped at 10^15); `None`: an unlimited pool.
    pub grant: Option<u64>,
}

/// A user of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `usr_…`.
    pub id: UserId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Email, unique within the tenant.
    pub email: String,
    /// Display name.
    pub name: Option<String>,
    /// Plan name (from config).
    pub plan: String,
    /// Argon2 PHC string, if the user can log in.
    pub password_hash: Option<String>,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
    /// Owner or member of the account.
    pub role: Role,
    /// Whether the email address is verified (always, unless sign-up asks for it).
    pub verified: bool,
    /// Sessions the user started before this (Unix ms) are over: a password reset sets it.
    pub sessions_from_ms: i64,
    /// When the account's owner or an admin removed the user (their keys were revoked then).
    pub removed_at_ms: Option<i64>,
}

/// What a password reset changed ([`crate::Store::redeem_reset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordReset {
    /// The user, with the new password.
    pub user: User,
    /// Whether the user's address or their account was verified before: if neither, this
    /// link is the first proof that whoever holds the account owns the address.
    pub was_verified: bool,
    /// The user's OAuth grants the reset revoked.
    pub grants_revoked: Vec<String>,
}

/// What a one-use link sent by email is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailPurpose {
    /// Verifies the address of an account's owner.
    Verify,
    /// Sets a new password.
    Reset,
    /// Makes a member of an account.
    Invite,
}

impl EmailPurpose {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Reset => "reset",
            Self::Invite => "invite",
        }
    }
}

/// A one-use link sent by email: the store keeps the SHA-256 of its token, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailToken {
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// What it is for.
    pub purpose: EmailPurpose,
    /// The account.
    pub tenant_id: TenantId,
    /// The user it acts for (`None` for an invitation: the user does not exist yet).
    pub user_id: Option<UserId>,
    /// The address it was sent to.
    pub email: String,
    /// The role an invitation gives.
    pub role: Option<Role>,
    /// Made, Unix ms.
    pub created_at_ms: i64,
    /// Unusable from then, Unix ms.
    pub expires_at_ms: i64,
}

/// A key record. Holds the hash of the key, never the key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// `key_…`.
    pub id: KeyId,
    /// The rotation family (the first key's id): one budget and rate window for the family.
    pub family_id: FamilyId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Owning user (for `ut`).
    pub user_id: Option<UserId>,
    /// Kind.
    pub kind: Kind,
    /// Display name.
    pub name: String,
    /// SHA-256 / HMAC-SHA256 of the plaintext.
    pub hash: KeyHash,
    /// The first characters of the plaintext, for display.
    pub display: String,
    /// Scopes.
    pub scopes: ScopeSet,
    /// IP allow-list.
    pub allowed_ips: IpAllowList,
    /// Origin allow-list.
    pub allowed_origins: OriginList,
    /// The key's own rate limit.
    pub rate_limit: Option<RateLimit>,
    /// The family's lifetime budget.
    pub budget: Option<u64>,
    /// Credits withdrawn from the family's budget (spent or leased), as stored.
    pub budget_withdrawn: u64,
    /// Expiry, Unix ms.
    pub expires_at_ms: Option<i64>,
    /// Automatic rotation period in days.
    pub rotation_days: Option<u32>,
    /// Free-form JSON object.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Stored status (`active`, `grace`, `revoked`).
    pub status: KeyStatus,
    /// Predecessor in rotation.
    pub rotated_from: Option<KeyId>,
    /// Successor in rotation.
    pub rotated_to: Option<KeyId>,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
    /// Last change, Unix ms.
    pub updated_at_ms: i64,
    /// Last use, Unix ms.
    pub last_used_at_ms: Option<i64>,
    /// Revocation time, Unix ms.
    pub revoked_at_ms: Option<i64>,
}

impl KeyRecord {
    /// Whether this key began its family (its family has its id): rotation successors join
    /// their predecessor's family instead.
    pub fn starts_family(&self) -> bool {
        self.family_id.as_str() == self.id.as_str()
    }
}

/// Filters for listing keys.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    /// Only this tenant's keys (always set except for the operator listing everything).
    pub tenant_id: Option<TenantId>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this stored status.
    pub status: Option<KeyStatus>,
    /// Only this user's keys.
    pub user_id: Option<UserId>,
    /// Name contains this text.
    pub name_contains: Option<String>,
}

/// Cursor pagination: items strictly older than `cursor` (an id), at most `limit`.
#[derive(Debug, Clone)]
pub struct PageRequest {
    /// The last id of the previous page.
    pub cursor: Option<String>,
    /// Page size.
    pub limit: u32,
}

/// Filters for listing audit events (all optional; the API always sets `tenant_id` for
/// tenant-scoped callers).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant's events.
    pub tenant_id: Option<String>,
    /// Only events about this key.
    pub key_id: Option<String>,
    /// Only events about this user.
    pub user_id: Option<String>,
    /// Only this action (`request.decided`, `key.revoked`, …).
    pub action: Option<String>,
    /// Only this decision code.
    pub code: Option<String>,
    /// At or after this time, Unix ms.
    pub since_ms: Option<i64>,
    /// Before this time, Unix ms.
    pub until_ms: Option<i64>,
    /// Only the events that concern one user (for a caller acting for that user).
    pub owner: Option<AuditOwner>,
}

/// The events a user may read of the audit log: those whose actor is the user or one of the
/// user's keys, and those about the user or one of the user's keys. Another user's events,
/// and the tenant's other events, are not theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOwner {
    /// The user (`usr_…`).
    pub user_id: UserId,
    /// Every key of the user, revoked and expired ones included.
    pub key_ids: std::collections::BTreeSet<KeyId>,
}

impl AuditOwner {
    /// Whether `e` is one of the user's events.
    pub fn owns(&self, e: &keygate_core::AuditEvent) -> bool {
        let mine = |id: &str| id == self.user_id || self.key_ids.contains(id);
        mine(&e.actor)
            || e.key_id.as_deref().is_some_and(mine)
            || e.user_id.as_deref() == Some(self.user_id.as_str())
    }
}

/// Whose usage to read.
#[derive(Debug, Clone)]
pub enum UsageOf {
    /// One key.
    Key(KeyId),
    /// A whole tenant.
    Tenant(TenantId),
}

/// Requests and credits in one time bucket for one decision code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the bucket, Unix ms.
    pub bucket_ms: i64,
    /// Decision code.
    pub code: String,
    /// Requests decided.
    pub requests: u64,
    /// Credits drawn.
    pub credits: u64,
}

/// A webhook endpoint of a tenant.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// `whk_…`
    pub id: String,
    /// Owner.
    pub tenant_id: TenantId,
    /// Where deliveries go.
    pub url: String,
    /// Signing secret (`whsec_…`); shown once by the API.
    pub secret: String,
    /// Event types it receives (`*` for all).
    pub events: Vec<String>,
    /// Deliveries go out only while enabled.
    pub enabled: bool,
    /// Why it was disabled (`410 Gone`, …).
    pub disabled_reason: Option<String>,
    /// Unix ms.
    pub created_at_ms: i64,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl WebhookEndpoint {
    /// Whether this endpoint wants events of `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        // `*` never includes the events that carry new plaintext keys: those are named.
        self.enabled
            && self
                .events
                .iter()
                .any(|e| e == event_type || (e == "*" && event_type != "key.rotated.successor"))
    }
}

/// One event on its way to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `dlv_…`
    pub id: String,
    /// Target endpoint.
    pub endpoint_id: String,
    /// The endpoint's tenant.
    pub tenant_id: String,
    /// `webhook-id` (`msg_…`): the same for every attempt.
    pub event_id: String,
    /// `key.revoked`, …
    pub event_type: String,
    /// The JSON body sent.
    pub payload: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// When the next attempt is due (or the claim of a running attempt ends), Unix ms.
    pub next_at_ms: i64,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    /// Error of the last attempt.
    pub last_error: Option<String>,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms.
    pub delivered_at_ms: Option<i64>,
}

/// One incident worth a warning (budget, credits, expiry, unusual activity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// `alr_…`
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Key, when it concerns one.
    pub key_id: Option<String>,
    /// The event type (`key.budget_warning`, `alert.unusual_activity`, …).
    pub kind: String,
    /// One incident, one alert: a second alert with the same value is not recorded.
    pub dedupe: String,
    /// For people.
    pub message: String,
    /// Details (JSON text).
    pub data: String,
    /// Unix ms.
    pub at_ms: i64,
}

/// An OAuth client registered in a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    /// `cli_…` (the `client_id`).
    pub id: String,
    /// Owner.
    pub tenant_id: TenantId,
    /// Display name (shown on the consent page).
    pub name: String,
    /// `public` (no secret, PKCE required) or `confidential`.
    pub client_type: String,
    /// SHA-256 (hex) of the client secret; `None` for public clients.
    pub secret_hash: Option<String>,
    /// Exact redirect URIs.
    pub redirect_uris: Vec<String>,
    /// Scopes the client may ask for.
    pub scopes: Vec<String>,
    /// Unix ms.
    pub created_at_ms: i64,
}

/// An authorization code, stored by its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCode {
    /// SHA-256 (hex) of the code.
    pub hash: String,
    /// The client it was issued to.
    pub client_id: String,
    /// Tenant.
    pub tenant_id: TenantId,
    /// The user who approved it.
    pub user_id: UserId,
    /// The redirect URI of the authorization request.
    pub redirect_uri: String,
    /// The S256 code challenge.
    pub challenge: String,
    /// Granted scope (space separated).
    pub scope: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms.
    pub expires_at_ms: i64,
    /// When it was exchanged.
    pub used_at_ms: Option<i64>,
    /// The grant its exchange started.
    pub grant_id: Option<String>,
}

/// What became of a code presented at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeUse {
    /// This call consumed it.
    Fresh(AuthCode),
    /// It had been used before (its `grant_id` is the grant to revoke).
    Reused(AuthCode),
    /// No such code, or its client was deleted.
    Unknown,
}

/// `expires_at` of a client's standing `client_credentials` grant: it lasts as long as the
/// client (each token carries its own `exp`).
pub const STANDING_GRANT_EXPIRES: i64 = i64::MAX;

/// A grant: one token family (every token issued from one code, or every client-credentials
/// token of one client: its standing grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthGrant {
    /// `grt_…`
    pub id: String,
    /// Client.
    pub client_id: String,
    /// Tenant.
    pub tenant_id: TenantId,
    /// The user, for the authorization-code grant.
    pub user_id: Option<UserId>,
    /// Scope (space separated).
    pub scope: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// The refresh tokens' absolute end, Unix ms.
    pub expires_at_ms: i64,
    /// Unix ms.
    pub revoked_at_ms: Option<i64>,
    /// Why (`revoked`, `refresh_reuse`, `code_reuse`).
    pub revoked_reason: Option<String>,
}

/// A refresh token, stored by its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    /// SHA-256 (hex) of the token.
    pub hash: String,
    /// Its grant.
    pub grant_id: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// When it was exchanged for its successor.
    pub used_at_ms: Option<i64>,
}

/// What became of a refresh token presented at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// This call consumed it.
    Fresh(RefreshToken),
    /// It had been used before: the family must be revoked.
    Reused(RefreshToken),
    /// No such token.
    Unknown,
}

/// A JWT signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// Key id (`kid`).
    pub kid: String,
    /// JOSE algorithm (`EdDSA`).
    pub alg: String,
    /// PKCS#8 private key, base64.
    pub private_key: String,
    /// The public key (JWK `x`, base64url).
    pub public_x: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// When it stopped signing, Unix ms.
    pub retired_at_ms: Option<i64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("private_key", &"<redacted>")
            .field("retired_at_ms", &self.retired_at_ms)
            .finish_non_exhaustive()
    }
}

/// Failed password sign-ins counted against one subject (an account, or the network of a
/// client address): how many, the last one's time, and the earliest time of the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginThrottle {
    /// Failures counted.
    pub failures: u32,
    /// The last failure, Unix ms.
    pub last_ms: i64,
    /// No attempt before this time, Unix ms.
    pub next_ms: i64,
}

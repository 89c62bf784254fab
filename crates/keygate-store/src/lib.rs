//! keygate storage.
//!
//! [`Store`] is the boundary: rows go in and come out as typed records built from core types
//! (`ScopeSet`, `IpAllowList`, `OriginList`, …), so nothing above this crate parses a stored
//! string. [`SqlStore`] implements it once for both databases: one SQLite file for a single
//! node, PostgreSQL for many (see `sql.rs` for how one implementation serves both).
//!
//! Money lives here: a key family's `spent` and a tenant's `credits` are changed only by
//! single-statement conditional updates (`withdraw_*`), so no interleaving of nodes or tasks
//! can overspend. Nodes withdraw credits in small leases and return what they did not use on
//! shutdown; a crash loses at most one lease (under-grant, never over-grant).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alerts;
mod audit;
mod keys;
mod oauth;
mod rows;
mod sql;
mod types;
mod webhooks;

pub use audit::{
    block_text, granularity_ms, stored_block, verify_audit, AuditReport, RawEvent, CHAIN_TAGGED,
};
pub use sql::{Backend, SqlStore};
pub use types::*;

use async_trait::async_trait;
use keygate_core::{FamilyId, KeyHash, KeyId, TenantId, UserId};

/// What went wrong in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// A unique constraint was violated (duplicate id, email, …).
    Conflict,
    /// The database could not be reached or answered with an error.
    Unavailable,
    /// A stored row could not be turned back into a record.
    Corrupt,
}

/// A store error: a kind and a message for the log (never shown to API callers verbatim).
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct StoreError {
    /// The kind.
    pub kind: StoreErrorKind,
    /// Details, for the log.
    pub message: String,
}

impl StoreError {
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Corrupt,
            message: what.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let kind = match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreErrorKind::Conflict,
            _ => StoreErrorKind::Unavailable,
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            message: e.to_string(),
        }
    }
}

/// Shorthand.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Credits taken from a budget or pool by one atomic withdrawal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Credits withdrawn (possibly fewer than asked, possibly 0).
    pub granted: u64,
    /// Credits left in the store after the withdrawal.
    pub remaining: u64,
}

/// The outcome of withdrawing credits from a tenant's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The pool is unlimited: nothing to withdraw.
    Unlimited,
    /// Credits were withdrawn.
    Granted(Grant),
}

/// Changes published by other nodes sharing the store.
#[async_trait]
pub trait ChangeFeed: Send {
    /// The next change message. `Ok(None)` means the feed lost its connection (and has
    /// reconnected): messages may have been missed, so treat everything as changed.
    async fn next(&mut self) -> Result<Option<String>>;
}

/// The audit log's tables: events, chain heads, usage.
#[async_trait]
pub trait AuditStore {
    /// Appends audit events in one transaction: per node, events at or below the node's
    /// stored head are skipped (a replay after a crash), the rest are inserted, their usage is
    /// added to the per-minute roll-up and the head moves to the last one.
    ///
    /// These events come sealed (chained over their fields, as earlier versions shipped them,
    /// and as the CLI records its one event); a node's shipper uses
    /// [`append_audit_lines`](Self::append_audit_lines).
    async fn append_audit(&self, events: &[keygate_core::AuditEvent]) -> Result<()>;
    /// Appends lines of nodes' audit segments in one transaction: per node, lines at or below
    /// the stored head are skipped (a replay after a crash), the rest are chained over their
    /// bytes after the head (see [`keygate_core::audit`]) and stored as written, their usage
    /// is added to the per-minute roll-up and the head moves to the last one. Returns each
    /// node's head `seq` from before: the events above it are the ones stored.
    async fn append_audit_lines(
        &self,
        events: &[RawEvent<'_>],
    ) -> Result<std::collections::BTreeMap<String, i64>>;
    /// Every node's chain head `(node, seq, hash)`.
    async fn audit_heads(&self) -> Result<Vec<(String, i64, String)>>;
    /// Every node that has stored events (with a head or, if someone inserted them, without).
    async fn audit_nodes(&self) -> Result<Vec<String>>;
    /// Audit events matching `filter`, newest first.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Vec<keygate_core::AuditEvent>>;
    /// A node's events after `after_seq`, in chain order (for verification).
    async fn audit_chain(
        &self,
        node: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<keygate_core::AuditEvent>>;
    /// Requests and credits by bucket of `bucket_ms` and decision code, in `[since, until)`.
    async fn usage(
        &self,
        of: &UsageOf,
        bucket_ms: i64,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<UsageRow>>;
    /// Drops usage minutes before `before_ms` (retention). Returns how many rows went.
    async fn prune_usage(&self, before_ms: i64) -> Result<u64>;
}

/// Webhook endpoints and the delivery queue.
#[async_trait]
pub trait WebhookStore {
    /// Inserts a webhook endpoint.
    async fn insert_webhook(&self, w: &WebhookEndpoint) -> Result<()>;
    /// A tenant's webhook endpoints, newest first.
    async fn list_webhooks(
        &self,
        tenant_id: &TenantId,
        page: &PageRequest,
    ) -> Result<Vec<WebhookEndpoint>>;
    /// One endpoint.
    async fn get_webhook(&self, id: &str) -> Result<Option<WebhookEndpoint>>;
    /// Deletes an endpoint (its pending deliveries fail). `false` if it did not exist.
    async fn delete_webhook(&self, id: &str) -> Result<bool>;
    /// Enables or disables an endpoint (with a reason when disabled).
    async fn set_webhook_enabled(
        &self,
        id: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool>;
    /// Queues deliveries.
    async fn enqueue_deliveries(&self, deliveries: &[Delivery]) -> Result<()>;
    /// Claims up to `limit` pending deliveries due at `now_ms`: each is moved to
    /// `lease_until_ms` with a conditional update, so one node sends it (another retries it
    /// after the lease if that node dies).
    async fn claim_deliveries(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>>;
    /// Writes the outcome of an attempt, if the delivery is still under the claim that ends at
    /// `claimed_until_ms` (else another node took it over: `false`, nothing written).
    async fn finish_delivery(&self, d: &Delivery, claimed_until_ms: i64) -> Result<bool>;
    /// An endpoint's deliveries, newest first.
    async fn list_deliveries(&self, endpoint_id: &str, page: &PageRequest)
        -> Result<Vec<Delivery>>;
}

/// Alerts, key sightings, leases and the keys background jobs look for.
#[async_trait]
pub trait AlertStore {
    /// Records an alert unless one with the same `dedupe` exists. `true` if it is new.
    async fn insert_alert(&self, a: &Alert) -> Result<bool>;
    /// Alerts, newest first (one tenant's, or all).
    async fn list_alerts(&self, tenant_id: Option<&str>, page: &PageRequest) -> Result<Vec<Alert>>;
    /// Notes that `key_id` was used from `value` (a network or an origin; `kind` says which).
    /// `None` if it was seen there before; `Some(true)` if this is a new place for a key
    /// already seen elsewhere; `Some(false)` for the key's first place of that kind.
    async fn note_sighting(
        &self,
        key_id: &str,
        kind: &str,
        value: &str,
        at_ms: i64,
    ) -> Result<Option<bool>>;
    /// Active keys expiring in `[from_ms, until_ms)`.
    async fn keys_expiring(&self, from_ms: i64, until_ms: i64) -> Result<Vec<KeyRecord>>;

    /// Takes or renews the lease `name` for `holder` until `until_ms`, if it is free, expired
    /// or already `holder`'s. `true` if `holder` holds it now.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool>;
    /// Active, not yet rotated keys with `rotation_days` whose period has run out.
    async fn keys_due_for_rotation(&self, now_ms: i64, limit: u32) -> Result<Vec<KeyRecord>>;
}

/// The OAuth authorization server's tables.
#[async_trait]
pub trait OAuthStore {
    /// Registers a client.
    async fn insert_client(&self, c: &OAuthClient) -> Result<()>;
    /// A client by id.
    async fn get_client(&self, id: &str) -> Result<Option<OAuthClient>>;
    /// Clients, newest first (of one tenant, or all).
    async fn list_clients(
        &self,
        tenant_id: Option<&str>,
        page: &PageRequest,
    ) -> Result<Vec<OAuthClient>>;
    /// Deletes a client and revokes its grants; answers the client id followed by the ids of
    /// the grants it revoked, or nothing if there was no such client.
    async fn delete_client(&self, id: &str, now_ms: i64) -> Result<Vec<String>>;
    /// A user of a tenant by (lower-case) email.
    async fn get_user_by_email(&self, tenant_id: &TenantId, email: &str) -> Result<Option<User>>;
    /// Stores an authorization code.
    async fn insert_code(&self, c: &AuthCode) -> Result<()>;
    /// A code by hash (not consumed).
    async fn get_code(&self, hash: &str) -> Result<Option<AuthCode>>;
    /// Consumes a code (single use across every node) and, if this call won, stores the grant
    /// it starts and its first refresh token, in one transaction.
    async fn use_code(
        &self,
        hash: &str,
        grant: &OAuthGrant,
        refresh: &RefreshToken,
        now_ms: i64,
    ) -> Result<CodeUse>;
    /// Stores a grant with its first refresh token, in one transaction.
    async fn insert_grant(&self, g: &OAuthGrant, refresh: Option<&RefreshToken>) -> Result<()>;
    /// The standing grant of a confidential client's `client_credentials` tokens (no user,
    /// expiring [`STANDING_GRANT_EXPIRES`]): the client's live one, else `candidate` stored
    /// as it; `None` when the client no longer exists. Its tokens share its id (their rate window and their `X-Keygate-Key-Id`), so
    /// issuing a token writes nothing; deleting the client revokes it. Two nodes racing may
    /// each make one: both are valid and both are revoked with the client.
    async fn client_grant(&self, candidate: &OAuthGrant) -> Result<Option<OAuthGrant>>;
    /// A grant by id.
    async fn get_grant(&self, id: &str) -> Result<Option<OAuthGrant>>;
    /// Revokes a grant (every token of the family); false if it was already revoked.
    async fn revoke_grant(&self, id: &str, now_ms: i64, reason: &str) -> Result<bool>;
    /// Consumes a refresh token and stores its successor (in the same family: the presented
    /// token's grant, whatever `successor.grant_id` says); a token used before is answered as
    /// `Reused` and no successor is kept.
    async fn use_refresh(
        &self,
        hash: &str,
        successor: &RefreshToken,
        now_ms: i64,
    ) -> Result<RefreshUse>;
    /// A refresh token by hash.
    async fn get_refresh(&self, hash: &str) -> Result<Option<RefreshToken>>;
    /// A refresh token by hash with its grant, in one read.
    async fn get_refresh_grant(&self, hash: &str) -> Result<Option<(RefreshToken, OAuthGrant)>>;
    /// Revokes one access token by `jti`.
    async fn revoke_access_token(
        &self,
        jti: &str,
        grant_id: &str,
        expires_at_ms: i64,
    ) -> Result<()>;
    /// Whether an access token was revoked.
    async fn access_token_revoked(&self, jti: &str) -> Result<bool>;
    /// Whether the user consented to this client and scope set.
    async fn has_consent(&self, user_id: &str, client_id: &str, scope: &str) -> Result<bool>;
    /// Remembers a consent.
    async fn insert_consent(
        &self,
        user_id: &str,
        client_id: &str,
        scope: &str,
        now_ms: i64,
    ) -> Result<()>;
    /// Every signing key, newest first.
    async fn signing_keys(&self) -> Result<Vec<SigningKey>>;
    /// Adds a signing key and retires the active keys created before `retire_before_ms`.
    async fn add_signing_key(&self, k: &SigningKey, retire_before_ms: i64) -> Result<()>;
    /// A secret shared by every node: the stored value, or `candidate` if none was stored.
    async fn shared_secret(&self, name: &str, candidate: &str, now_ms: i64) -> Result<String>;
    /// The failed sign-ins counted against `subject`, if any.
    async fn get_login_throttle(&self, subject: &str) -> Result<Option<LoginThrottle>>;
    /// Replaces `subject`'s count with `new` (`None` deletes it) if it is still `expected`
    /// (`None`: there is none), so that of two nodes counting at once one wins and the other
    /// reads again. `true` if it was written.
    async fn swap_login_throttle(
        &self,
        subject: &str,
        expected: Option<&LoginThrottle>,
        new: Option<&LoginThrottle>,
    ) -> Result<bool>;
    /// Forgets the counts whose last failure is before `before_ms`. Returns how many went.
    async fn prune_login_throttles(&self, before_ms: i64) -> Result<u64>;
}

/// Persistent state of keygate. Implementations must be safe to call from many tasks.
#[async_trait]
pub trait Store:
    AuditStore + WebhookStore + AlertStore + OAuthStore + Send + Sync + std::fmt::Debug + 'static
{
    /// Applies pending schema migrations.
    async fn migrate(&self) -> Result<()>;

    /// Inserts a tenant. `Conflict` if the id exists.
    async fn insert_tenant(&self, t: &Tenant) -> Result<()>;
    /// Reads a tenant.
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>>;
    /// Lists tenants, newest first.
    async fn list_tenants(&self, page: &PageRequest) -> Result<Vec<Tenant>>;
    /// Adds `amount` credits to a tenant's pool (an unlimited pool stays unlimited; a balance
    /// never exceeds 10^15). Returns the tenant after the change, `None` if it does not exist
    /// or the balance would exceed the cap.
    async fn add_tenant_credits(&self, id: &TenantId, amount: u64) -> Result<Option<Tenant>>;

    /// Inserts a user. `Conflict` if the email is taken in the tenant.
    async fn insert_user(&self, u: &User) -> Result<()>;
    /// A new account in one transaction: its tenant, its first user and that user's first
    /// key (with its family). Nothing is written if any of them fails.
    async fn sign_up(&self, t: &Tenant, u: &User, k: &KeyRecord) -> Result<()>;
    /// Whether an account's owner has this email address (members of other accounts do not
    /// count: sign-up must not tell who is a member where).
    async fn email_registered(&self, email: &str) -> Result<bool>;
    /// Renames a tenant and/or starts a plan for it. With `if_trial`, only if the tenant is
    /// still on that plan with that trial end: of several nodes ending the same trial, one
    /// changes it. Returns the tenant after the change; `None` if it does not exist or the
    /// condition failed.
    async fn change_tenant(&self, id: &TenantId, change: &TenantChange) -> Result<Option<Tenant>>;
    /// Tenants whose trial ends at or before `before_ms`, soonest first.
    async fn trials_ending(&self, before_ms: i64, limit: u32) -> Result<Vec<Tenant>>;
    /// Tenants on `plan`, by id after `after` (a page of at most `limit`).
    async fn tenants_on_plan(&self, plan: &str, after: &str, limit: u32) -> Result<Vec<Tenant>>;
    /// Sets a tenant's pool to `credits` for month `month` of its plan, if it is still on
    /// `plan`, started at `started_at_ms`, and that month was not refilled yet: of several
    /// nodes, one refills, and a plan restarted meanwhile is left alone. Returns the tenant
    /// after the refill.
    async fn refill_credits(
        &self,
        id: &TenantId,
        plan: &str,
        started_at_ms: i64,
        month: u32,
        credits: u64,
    ) -> Result<Option<Tenant>>;
    /// Reads a user.
    async fn get_user(&self, id: &UserId) -> Result<Option<User>>;
    /// Users with this address in any account (at most `limit`), oldest first.
    async fn users_with_email(&self, email: &str, limit: u32) -> Result<Vec<User>>;
    /// Keeps a one-use link's token (its hash).
    async fn insert_email_token(&self, t: &EmailToken) -> Result<()>;
    /// Spends a verification link: the user's address, and the account when the user owns
    /// it, are verified. `None`: no such link, used already, or expired.
    async fn redeem_verification(&self, hash: &str, now_ms: i64) -> Result<Option<User>>;
    /// Spends a reset link: the user's password becomes `password_hash`, the sessions they
    /// started before `now_ms` end (`sessions_from`), their OAuth grants are revoked, and the
    /// address (and the account, for its owner) counts as verified. `None`: no such link,
    /// used already, or expired.
    async fn redeem_reset(
        &self,
        hash: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> Result<Option<PasswordReset>>;
    /// Spends an invitation: the invited address becomes a member of the link's account, on
    /// the account's plan, as `user` describes (its id, name, password); a user removed
    /// before with that address comes back instead (same id, old keys still revoked).
    /// `None`: no such link, used already, or expired. A conflict: the address is a live user
    /// of the account already (the link stays unused).
    async fn redeem_invite(&self, hash: &str, user: &User, now_ms: i64) -> Result<Option<User>>;
    /// Removes a member: they can no longer sign in, their sessions end, their OAuth grants
    /// are revoked (the ids come back) and no invitation sent before brings them back.
    /// `None`: no such live member (owners are not removed).
    async fn remove_user(&self, id: &UserId, now_ms: i64) -> Result<Option<(User, Vec<String>)>>;
    /// Whether a link of `purpose` with this hash would work now (unused, unexpired); spends
    /// nothing. Lets a form refuse a dead link before the Argon2 work a password costs.
    async fn email_token_live(&self, hash: &str, purpose: &str, now_ms: i64) -> Result<bool>;
    /// Forgets links that expired before `before_ms`.
    async fn prune_email_tokens(&self, before_ms: i64) -> Result<u64>;
    /// Lists a tenant's users, newest first.
    async fn list_users(&self, tenant_id: &TenantId, page: &PageRequest) -> Result<Vec<User>>;

    /// Inserts a new key (and its family, when `family_id == id`).
    async fn insert_key(&self, k: &KeyRecord) -> Result<()>;
    /// Reads a key by id.
    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>>;
    /// Reads a key by the hash of its plaintext.
    async fn get_key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>>;
    /// Lists keys matching `filter`, newest first.
    async fn list_keys(&self, filter: &KeyFilter, page: &PageRequest) -> Result<Vec<KeyRecord>>;
    /// Writes a key's mutable fields (name, scopes, IPs, origins, rate, expiry, metadata,
    /// `updated_at`) and its family's budget cap — never its status. Optimistic: only if the
    /// row still has `expected_updated_at` and is active or in grace; `false` otherwise (a
    /// concurrent change, rotation or revocation won).
    async fn update_key(&self, k: &KeyRecord, expected_updated_at: i64) -> Result<bool>;
    /// In one transaction: marks `old_id` as in grace until `grace_until_ms` (pointing at the
    /// successor) and inserts `successor` into the same family. `false` if `old_id` is not
    /// active or in grace any more (a concurrent revoke or rotate won).
    async fn rotate_key(
        &self,
        old_id: &KeyId,
        grace_until_ms: i64,
        successor: &KeyRecord,
    ) -> Result<bool>;
    /// Revokes a key now. Returns the revoked record, `None` if it does not exist.
    async fn revoke_key(&self, id: &KeyId, now_ms: i64) -> Result<Option<KeyRecord>>;
    /// Records last use, for many keys at once (a batch from the write-behind queue).
    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<()>;
    /// Number of keys (to tell a fresh database).
    async fn count_keys(&self) -> Result<u64>;
    /// Live keys of a tenant (neither revoked nor expired at `now_ms`), leaving out those
    /// whose metadata holds `mark: true` (dashboard session keys).
    async fn count_live_keys(&self, tenant_id: &TenantId, now_ms: i64, mark: &str) -> Result<u64>;
    /// Inserts a key only while its tenant has fewer than `max` live keys (as
    /// [`Store::count_live_keys`] counts them at the key's creation time), counting and
    /// inserting in one transaction that holds the tenant: `false` when it has `max` already.
    async fn insert_key_capped(&self, k: &KeyRecord, max: u64, mark: &str) -> Result<bool>;

    /// Withdraws up to `want` credits from a family's budget atomically: how many were
    /// granted (0 when spent) and how many remain in the store after it. Families without a
    /// budget grant `want` and report `u64::MAX` remaining.
    async fn withdraw_budget(&self, family_id: &FamilyId, want: u64) -> Result<Grant>;
    /// Returns unused leased credits to a family's budget.
    async fn refund_budget(&self, family_id: &FamilyId, amount: u64) -> Result<()>;
    /// Withdraws up to `want` credits from a tenant's pool atomically.
    async fn withdraw_credits(&self, tenant_id: &TenantId, want: u64) -> Result<Withdrawal>;
    /// Returns unused leased credits to a tenant's pool.
    async fn refund_credits(&self, tenant_id: &TenantId, amount: u64) -> Result<()>;

    /// Tells every node sharing this store that something changed (`key:<hash hex>`,
    /// `family:<id>`, `tenant:<id>`, `cors`). A store that only one node uses does nothing.
    async fn publish_change(&self, _change: &str) -> Result<()> {
        Ok(())
    }

    /// The feed of changes published by any node, if the store has one.
    async fn subscribe(&self) -> Result<Option<Box<dyn ChangeFeed>>> {
        Ok(None)
    }
}

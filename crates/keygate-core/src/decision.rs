//! The decision pipeline: one function from (key record, request facts, now) to allow-with-a-
//! charge or exactly one refusal code.
//!
//! Order matters and is part of the contract: where a call comes from is judged before
//! anything about the key's rights is revealed.
//!
//! missing / malformed (parsing, before this function) → unknown → revoked → expired (a rotated
//! key past its grace counts as expired) → tenant mismatch → IP → origin → `pk` hard blocks →
//! plan feature → scope → then the stateful counters, in the caller: rate limit → key budget →
//! tenant credits.

use crate::{IpAllowList, KeyId, Kind, OriginList, RateLimit, ScopeSet, TenantId, UserId};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Every decision code of the contract, and `Valid` for an allowed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// Allowed.
    Valid,
    /// No `Authorization: Bearer` credential.
    MissingKey,
    /// Not a key of this deployment's format, or the checksum does not match.
    MalformedKey,
    /// Well-formed but not known (or of another tenant).
    UnknownKey,
    /// Revoked.
    Revoked,
    /// Past its expiry, or a rotated key past its grace period.
    Expired,
    /// The key's own credit budget is spent.
    BudgetExhausted,
    /// The tenant's credit pool cannot pay for the call.
    InsufficientCredits,
    /// The key lacks the scope the route needs.
    ForbiddenScope,
    /// `Origin` missing (for `pk`) or not on the key's list.
    OriginNotAllowed,
    /// Client IP not on the key's allow-list.
    IpNotAllowed,
    /// A `pk` key on a route no publishable key may use (DELETE, admin, billing, …).
    BlockedForKeyType,
    /// `X-Tenant-Id` names another tenant than the key's.
    TenantMismatch,
    /// The key's plan does not include this feature (e.g. API access).
    PlanFeature,
    /// The account's email address is not verified yet (`[signup] verify_email`).
    AccountUnverified,
    /// Over the key's rate limit.
    RateLimited,
    /// A backing store is down and the answer cannot be given safely.
    Unavailable,
}

impl Code {
    /// Every code, in declaration order.
    pub const ALL: [Code; 17] = [
        Code::Valid,
        Code::MissingKey,
        Code::MalformedKey,
        Code::UnknownKey,
        Code::Revoked,
        Code::Expired,
        Code::BudgetExhausted,
        Code::InsufficientCredits,
        Code::ForbiddenScope,
        Code::OriginNotAllowed,
        Code::IpNotAllowed,
        Code::BlockedForKeyType,
        Code::TenantMismatch,
        Code::PlanFeature,
        Code::AccountUnverified,
        Code::RateLimited,
        Code::Unavailable,
    ];

    /// The code named `s` as on the wire (`"BUDGET_EXHAUSTED"`), if there is one.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Valid => "VALID",
            Code::MissingKey => "MISSING_KEY",
            Code::MalformedKey => "MALFORMED_KEY",
            Code::UnknownKey => "UNKNOWN_KEY",
            Code::Revoked => "REVOKED",
            Code::Expired => "EXPIRED",
            Code::BudgetExhausted => "BUDGET_EXHAUSTED",
            Code::InsufficientCredits => "INSUFFICIENT_CREDITS",
            Code::ForbiddenScope => "FORBIDDEN_SCOPE",
            Code::OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
            Code::IpNotAllowed => "IP_NOT_ALLOWED",
            Code::BlockedForKeyType => "BLOCKED_FOR_KEY_TYPE",
            Code::TenantMismatch => "TENANT_MISMATCH",
            Code::PlanFeature => "PLAN_FEATURE",
            Code::AccountUnverified => "ACCOUNT_UNVERIFIED",
            Code::RateLimited => "RATE_LIMITED",
            Code::Unavailable => "UNAVAILABLE",
        }
    }

    /// The HTTP status of a refusal with this code (200 for `Valid`).
    pub fn status(self) -> u16 {
        match self {
            Code::Valid => 200,
            Code::MissingKey
            | Code::MalformedKey
            | Code::UnknownKey
            | Code::Revoked
            | Code::Expired => 401,
            Code::BudgetExhausted | Code::InsufficientCredits => 402,
            Code::ForbiddenScope
            | Code::OriginNotAllowed
            | Code::IpNotAllowed
            | Code::BlockedForKeyType
            | Code::TenantMismatch
            | Code::PlanFeature
            | Code::AccountUnverified => 403,
            Code::RateLimited => 429,
            Code::Unavailable => 503,
        }
    }

    /// A short human-readable explanation.
    pub fn message(self) -> &'static str {
        match self {
            Code::Valid => "the key is valid",
            Code::MissingKey => "no API key: send Authorization: Bearer <key>",
            Code::MalformedKey => {
                "the API key is not in this deployment's format or its checksum does not match"
            }
            Code::UnknownKey => "the API key is not known",
            Code::Revoked => "the API key has been revoked",
            Code::Expired => "the API key has expired",
            Code::BudgetExhausted => "the key's credit budget is spent",
            Code::InsufficientCredits => "the tenant does not have enough credits for this call",
            Code::ForbiddenScope => "the key does not have the scope this call needs",
            Code::OriginNotAllowed => "the request's Origin is not allowed for this key",
            Code::IpNotAllowed => "the client IP is not allowed for this key",
            Code::BlockedForKeyType => "publishable keys may not call this endpoint",
            Code::TenantMismatch => "X-Tenant-Id does not match the key's tenant",
            Code::PlanFeature => "the key's plan does not include API access",
            Code::AccountUnverified => {
                "the account's email address is not verified yet: open the link in the email"
            }
            Code::RateLimited => "rate limit exceeded",
            Code::Unavailable => "a backing service is unavailable; try again shortly",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key's stored status. `Expired` is derived from the expiry time, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Usable.
    Active,
    /// Rotated: usable until its expiry, which rotation set to the end of the grace period.
    Grace,
    /// Revoked: refused at once, everywhere.
    Revoked,
    /// Past its expiry.
    Expired,
}

impl KeyStatus {
    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Grace => "grace",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }

    /// The status as of `now_ms`: an active or grace key past its expiry is `Expired`.
    pub fn at(self, expires_at_ms: Option<i64>, now_ms: i64) -> KeyStatus {
        match (self, expires_at_ms) {
            (KeyStatus::Revoked, _) => KeyStatus::Revoked,
            (_, Some(exp)) if exp <= now_ms => KeyStatus::Expired,
            (s, _) => s,
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => KeyStatus::Active,
            "grace" => KeyStatus::Grace,
            "revoked" => KeyStatus::Revoked,
            "expired" => KeyStatus::Expired,
            _ => return None,
        })
    }
}

/// What kind of endpoint a request is for. Anything but `Normal` is closed to `pk` keys,
/// whatever their scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteClass {
    /// An ordinary API route.
    #[default]
    Normal,
    /// Key, tenant, user or other administrative management.
    Admin,
    /// Billing and credits.
    Billing,
    /// Webhook management.
    Webhook,
    /// Token management (OAuth clients, token revocation).
    TokenManagement,
}

impl RouteClass {
    /// Whether publishable keys are refused here.
    pub fn blocked_for_publishable(self) -> bool {
        self != RouteClass::Normal
    }
}

/// The policy-relevant view of a key record, as the store hands it to the core.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyPolicy {
    /// `key_…` id.
    pub id: KeyId,
    /// Owning tenant id.
    pub tenant_id: TenantId,
    /// Owning user (for `ut`).
    pub user_id: Option<UserId>,
    /// Kind.
    pub kind: Kind,
    /// Stored status.
    pub status: KeyStatus,
    /// Granted scopes.
    pub scopes: ScopeSet,
    /// IP allow-list (empty: any).
    pub allowed_ips: IpAllowList,
    /// Origin allow-list (empty: any for `sk`/`ut`; `pk` always needs a match).
    pub allowed_origins: OriginList,
    /// Effective rate limit (the key's own, or its user's plan for `ut`).
    pub rate_limit: Option<RateLimit>,
    /// Lifetime credit budget (cap), if any.
    pub budget: Option<u64>,
    /// Expiry in Unix milliseconds (for a key in grace, the end of the grace period).
    pub expires_at_ms: Option<i64>,
    /// Why the key's account may not call the API now (`PLAN_FEATURE`: its plan lacks `api`;
    /// `ACCOUNT_UNVERIFIED`), if it may not. keygate's own API ([`RequestFacts::management`])
    /// stays open, so a user can still see why and change it.
    pub plan_gate: Option<Code>,
    /// For the resource API only (an OAuth access token): refused on every route class but
    /// `Normal`, like a publishable key, so it cannot manage keygate itself.
    pub resource_only: bool,
}

impl KeyPolicy {
    /// The status as of `now_ms`: an active or grace key past its expiry is `Expired`.
    pub fn status_at(&self, now_ms: i64) -> KeyStatus {
        self.status.at(self.expires_at_ms, now_ms)
    }
}

/// What the caller knows about the request being decided.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// HTTP method (upper case).
    pub method: &'a str,
    /// Request path, without the query (for the audit log; no rule reads it).
    pub path: Option<&'a str>,
    /// Kind of endpoint (for `pk` hard blocks).
    pub route_class: RouteClass,
    /// Scope the route needs, if any.
    pub scope: Option<&'a str>,
    /// The `Origin` header, if sent.
    pub origin: Option<&'a str>,
    /// The client IP, if known.
    pub ip: Option<IpAddr>,
    /// `X-Tenant-Id`, if sent.
    pub tenant_id: Option<&'a str>,
    /// Credits the call costs.
    pub cost: u64,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// A call to keygate's own API (management, the dashboard), not to the API behind it:
    /// the account's plan gate ([`KeyPolicy::plan_gate`]) does not apply.
    pub management: bool,
}

/// What an allowed request must still pass through the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The rate limit to apply, if any.
    pub rate_limit: Option<RateLimit>,
    /// The key's lifetime budget, if any.
    pub budget: Option<u64>,
    /// Credits to draw from the key budget and the tenant pool.
    pub cost: u64,
}

/// Decides everything that does not need a counter. `key` is `None` when the lookup found
/// nothing (or found a key of another tenant, which must look the same).
pub fn decide(key: Option<&KeyPolicy>, req: &RequestFacts<'_>) -> Result<Charge, Code> {
    let key = key.ok_or(Code::UnknownKey)?;
    match key.status_at(req.now_ms) {
        KeyStatus::Revoked => return Err(Code::Revoked),
        KeyStatus::Expired => return Err(Code::Expired),
        KeyStatus::Active | KeyStatus::Grace => {}
    }
    if let Some(t) = req.tenant_id {
        if t != key.tenant_id {
            return Err(Code::TenantMismatch);
        }
    }
    if !key.allowed_ips.is_empty() {
        match req.ip {
            Some(ip) if key.allowed_ips.contains(ip) => {}
            _ => return Err(Code::IpNotAllowed),
        }
    }
    match (key.kind, req.origin) {
        // A publishable key is only ever valid from an origin on its list.
        (Kind::Pk, None) => return Err(Code::OriginNotAllowed),
        (Kind::Pk, Some(o)) if !key.allowed_origins.allows(o) => {
            return Err(Code::OriginNotAllowed)
        }
        // Other kinds: a browser (which always sends Origin cross-site) must match the list
        // when there is one; server-to-server callers send no Origin.
        (_, Some(o)) if !key.allowed_origins.is_empty() && !key.allowed_origins.allows(o) => {
            return Err(Code::OriginNotAllowed)
        }
        _ => {}
    }
    if key.kind == Kind::Pk
        && (req.method.eq_ignore_ascii_case("DELETE") || req.route_class.blocked_for_publishable())
    {
        return Err(Code::BlockedForKeyType);
    }
    if key.resource_only && req.route_class != RouteClass::Normal {
        return Err(Code::BlockedForKeyType);
    }
    if let Some(gate) = key.plan_gate.filter(|_| !req.management) {
        return Err(gate);
    }
    if let Some(scope) = req.scope {
        // `*` is honoured only on secret keys, even if one slipped into another kind's record.
        let allowed = if key.kind == Kind::Sk {
            key.scopes.allows(scope)
        } else {
            key.scopes.iter().any(|s| s.as_str() == scope)
        };
        if !allowed {
            return Err(Code::ForbiddenScope);
        }
    }
    Ok(Charge {
        rate_limit: key.rate_limit,
        budget: key.budget,
        cost: req.cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_parses_back_from_its_name() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
            // The wire name is the serde name too.
            assert_eq!(
                serde_json::to_string(&c).ok(),
                Some(format!("\"{}\"", c.as_str()))
            );
        }
        assert_eq!(Code::parse("budget_exhausted"), None);
        assert_eq!(Code::parse(""), None);
    }

    fn pk() -> KeyPolicy {
        KeyPolicy {
            id: "key_1".into(),
            tenant_id: "tnt_a".into(),
            user_id: None,
            kind: Kind::Pk,
            status: KeyStatus::Active,
            scopes: ScopeSet::parse(&["ocr:read"]).expect("valid"),
            allowed_ips: IpAllowList::default(),
            allowed_origins: OriginList::parse(&["https://claude.ai"]).expect("valid"),
            rate_limit: None,
            budget: Some(10),
            expires_at_ms: Some(2_000),
            plan_gate: None,
            resource_only: false,
        }
    }

    fn facts() -> RequestFacts<'static> {
        RequestFacts {
            path: None,
            method: "POST",
            route_class: RouteClass::Normal,
            scope: Some("ocr:read"),
            origin: Some("https://claude.ai"),
            ip: None,
            tenant_id: None,
            cost: 1,
            now_ms: 1_000,
            management: false,
        }
    }

    #[test]
    fn allows_and_charges() {
        let c = decide(Some(&pk()), &facts()).expect("allowed");
        assert_eq!(c.cost, 1);
        assert_eq!(c.budget, Some(10));
    }

    #[test]
    fn order_of_refusals() {
        assert_eq!(decide(None, &facts()), Err(Code::UnknownKey));
        let mut k = pk();
        k.status = KeyStatus::Revoked;
        k.expires_at_ms = Some(0);
        assert_eq!(decide(Some(&k), &facts()), Err(Code::Revoked));
        let mut k = pk();
        k.expires_at_ms = Some(1_000);
        assert_eq!(decide(Some(&k), &facts()), Err(Code::Expired));
        let mut f = facts();
        f.tenant_id = Some("tnt_b");
        f.origin = None;
        assert_eq!(decide(Some(&pk()), &f), Err(Code::TenantMismatch));
        let mut k = pk();
        k.allowed_ips = IpAllowList::parse(&["10.0.0.0/8"]).expect("valid");
        let mut f = facts();
        f.origin = None;
        assert_eq!(decide(Some(&k), &f), Err(Code::IpNotAllowed));
        f.ip = Some("10.1.1.1".parse().expect("ip"));
        assert_eq!(decide(Some(&k), &f), Err(Code::OriginNotAllowed));
        let mut f = facts();
        f.method = "DELETE";
        f.scope = Some("other");
        assert_eq!(decide(Some(&pk()), &f), Err(Code::BlockedForKeyType));
        let mut f = facts();
        f.route_class = RouteClass::Admin;
        assert_eq!(decide(Some(&pk()), &f), Err(Code::BlockedForKeyType));
        for gate in [Code::PlanFeature, Code::AccountUnverified] {
            let mut k = pk();
            k.plan_gate = Some(gate);
            assert_eq!(decide(Some(&k), &facts()), Err(gate));
            // keygate's own API stays open to the key (the pk is then refused for its class).
            let mut own = facts();
            own.management = true;
            assert_eq!(
                decide(Some(&k), &own),
                Ok(decide(Some(&pk()), &facts()).expect("ok"))
            );
        }
        let mut f = facts();
        f.scope = Some("ocr:write");
        assert_eq!(decide(Some(&pk()), &f), Err(Code::ForbiddenScope));
    }

    #[test]
    fn star_only_counts_for_secret_keys() {
        let mut k = pk();
        k.scopes = ScopeSet::parse(&["*"]).expect("valid");
        assert_eq!(decide(Some(&k), &facts()), Err(Code::ForbiddenScope));
        k.kind = Kind::Sk;
        assert!(decide(Some(&k), &facts()).is_ok());
    }

    #[test]
    fn secret_key_without_origin_passes_origin_list() {
        let mut k = pk();
        k.kind = Kind::Sk;
        let mut f = facts();
        f.origin = None;
        assert!(decide(Some(&k), &f).is_ok());
        f.origin = Some("https://evil.example");
        assert_eq!(decide(Some(&k), &f), Err(Code::OriginNotAllowed));
    }

    #[test]
    fn statuses_map_to_http() {
        assert_eq!(Code::RateLimited.status(), 429);
        assert_eq!(Code::BudgetExhausted.status(), 402);
        assert_eq!(Code::BlockedForKeyType.status(), 403);
        assert_eq!(Code::Revoked.status(), 401);
    }
}

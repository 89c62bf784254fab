//! Issuing keys: the create body, defaults, and the checks that need the store, the
//! configuration or a clock, shared by the HTTP API, tenant creation and the CLI (which works
//! on the database directly). The pure rules (presets, names, scopes, allow-lists, plans)
//! are `keygate_core::issue`'s.

use crate::clock::parse_rfc3339;
use crate::config::Config;
use crate::ids::{new_id, os_fill};
use keygate_core::{
    FamilyId, KeyFormat, KeyHasher, KeyId, KeyStatus, Kind, OriginList, RateLimit, ScopeSet,
    TenantId, UserId,
};
use keygate_store::{KeyRecord, Store, User};

/// Longest TTL / expiry distance accepted: 10 years.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 86_400;

pub use keygate_api::{CreateKey, RateLimitBody};
pub use keygate_core::issue::{
    check_ips, check_name, check_origins, check_scopes, preset, within_plan, Preset,
    DEFAULT_PK_ORIGINS,
};

/// Why a key cannot be issued as asked.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request asks for something not allowed; the message says what (shown to the caller).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] keygate_store::StoreError),
}

impl From<keygate_core::InvalidInput> for IssueError {
    fn from(e: keygate_core::InvalidInput) -> Self {
        Self::Invalid(e.message().to_owned())
    }
}

impl IssueError {
    fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// A `rate_limit` body, validated.
pub fn rate_limit(b: RateLimitBody) -> Result<RateLimit, IssueError> {
    RateLimit::new(b.limit, b.window_seconds).map_err(|e| IssueError::invalid(e.message()))
}

/// Checks metadata: a JSON object of at most 8 KiB.
pub fn check_metadata(
    m: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<serde_json::Map<String, serde_json::Value>, IssueError> {
    let m = m.unwrap_or_default();
    if serde_json::Value::Object(m.clone()).to_string().len() > 8 * 1024 {
        return Err(IssueError::invalid(
            "metadata must be at most 8 KiB of JSON",
        ));
    }
    Ok(m)
}

/// Expiry from `expires_at` or `ttl_seconds` (not both), which must lie in the future.
pub fn check_expiry(
    expires_at: Option<&str>,
    ttl: Option<u64>,
    now_ms: i64,
) -> Result<Option<i64>, IssueError> {
    match (expires_at, ttl) {
        (Some(_), Some(_)) => Err(IssueError::invalid(
            "give expires_at or ttl_seconds, not both",
        )),
        (Some(s), None) => {
            let at = parse_rfc3339(s)
                .ok_or_else(|| IssueError::invalid("expires_at must be an RFC 3339 timestamp"))?;
            if at <= now_ms {
                return Err(IssueError::invalid("expires_at must be in the future"));
            }
            if at - now_ms > (MAX_TTL_SECONDS as i64) * 1000 {
                return Err(IssueError::invalid("expires_at must be within 10 years"));
            }
            Ok(Some(at))
        }
        (None, Some(t)) => {
            if t == 0 || t > MAX_TTL_SECONDS {
                return Err(IssueError::invalid(
                    "ttl_seconds must be between 1 and 315360000",
                ));
            }
            Ok(Some(now_ms + (t as i64) * 1000))
        }
        (None, None) => Ok(None),
    }
}

/// Checks that a `ut` key of user `user_id` may hold `scopes` under the user's plan.
pub async fn check_plan_scopes(
    config: &Config,
    store: &dyn Store,
    user_id: &UserId,
    scopes: &ScopeSet,
) -> Result<(), IssueError> {
    let Some(user) = store.get_user(user_id).await? else {
        return Ok(());
    };
    match config.plans.get(&user.plan).and_then(|p| p.scopes.as_ref()) {
        Some(allowed) => Ok(within_plan(allowed, scopes)?),
        None => Ok(()),
    }
}

/// What issuing needs besides the store.
#[derive(Debug, Clone)]
pub struct Issuer<'a> {
    /// Config (plans).
    pub config: &'a Config,
    /// Key format.
    pub format: &'a KeyFormat,
    /// Hasher.
    pub hasher: &'a KeyHasher,
}

impl crate::engine::Engine {
    /// What issuing needs, from this engine.
    pub fn issuer(&self) -> Issuer<'_> {
        Issuer {
            config: &self.config,
            format: &self.format,
            hasher: &self.hasher,
        }
    }
}

/// Builds a new key record from a create body (the tenant already resolved and visible to the
/// caller). Writes nothing; returns the plaintext and the record.
pub async fn build_key(
    issuer: &Issuer<'_>,
    store: &dyn Store,
    tenant_id: &TenantId,
    body: CreateKey,
    now_ms: i64,
) -> Result<(String, KeyRecord), IssueError> {
    let kind = Kind::parse(&body.kind).map_err(|e| IssueError::invalid(e.message()))?;
    let user = match (&body.user_id, kind) {
        (Some(uid), Kind::Ut | Kind::Pk) => {
            match store.get_user(&UserId::from(uid.as_str())).await? {
                Some(u) if u.tenant_id == *tenant_id && u.removed_at_ms.is_none() => Some(u),
                _ => return Err(IssueError::invalid("user_id names no user of this tenant")),
            }
        }
        _ => None,
    };
    build_key_for(issuer, tenant_id, body, user.as_ref(), now_ms)
}

/// [`build_key`] for a user already in hand (`body.user_id` names it): a new account's first
/// key, made in the transaction that makes the user.
pub fn build_key_for(
    issuer: &Issuer<'_>,
    tenant_id: &TenantId,
    body: CreateKey,
    user: Option<&User>,
    now_ms: i64,
) -> Result<(String, KeyRecord), IssueError> {
    let kind = Kind::parse(&body.kind).map_err(|e| IssueError::invalid(e.message()))?;
    // The user: required for ut, refused for sk, optional for pk; must be in the tenant.
    match (&body.user_id, kind, user) {
        (None, Kind::Ut, _) => return Err(IssueError::invalid("user_id is required for ut keys")),
        (Some(_), Kind::Sk, _) => {
            return Err(IssueError::invalid(
                "sk keys have no user; use a ut key for a user",
            ))
        }
        (Some(uid), _, Some(u)) if u.id == *uid && u.tenant_id == *tenant_id => {}
        (Some(_), _, _) => return Err(IssueError::invalid("user_id names no user of this tenant")),
        (None, _, _) => {}
    }
    let name = check_name(&body.name)?;
    let preset =
        match body.preset.as_deref() {
            None => None,
            Some(p) => Some(preset(p).ok_or_else(|| {
                IssueError::invalid("preset must be one of default, aidemo, widget")
            })?),
        };
    let user_plan = user.as_ref().map(|u| issuer.config.plans.get(&u.plan));
    let plan_scopes = user_plan.flatten().and_then(|p| p.scopes.clone());
    let scopes: Vec<String> = match (&body.scopes, preset) {
        (Some(s), _) => s.clone(),
        (None, Some(p)) => p.scopes.iter().map(|s| (*s).to_owned()).collect(),
        (None, None) => match kind {
            Kind::Sk => vec!["*".to_owned()],
            Kind::Ut => plan_scopes.clone().ok_or_else(|| {
                IssueError::invalid("scopes are required: the user's plan lists no default scopes")
            })?,
            Kind::Pk => {
                return Err(IssueError::invalid(
                    "publishable keys need an explicit scope list (or a preset)",
                ))
            }
        },
    };
    let scopes = check_scopes(kind, &scopes)?;
    if let (Kind::Ut, Some(allowed)) = (kind, &plan_scopes) {
        within_plan(allowed, &scopes)?;
    }
    let allowed_ips = check_ips(body.allowed_ips.as_deref().unwrap_or_default())?;
    let allowed_origins = match (&body.allowed_origins, kind, preset) {
        (Some(o), _, _) => check_origins(o)?,
        (None, Kind::Pk, Some(p)) if !p.default_origins => {
            return Err(IssueError::invalid(
                "the widget preset needs allowed_origins: the sites that embed the widget",
            ))
        }
        (None, Kind::Pk, _) => {
            let d: Vec<String> = DEFAULT_PK_ORIGINS.iter().map(|s| (*s).to_owned()).collect();
            check_origins(&d)?
        }
        (None, _, _) => OriginList::default(),
    };
    if kind == Kind::Pk && allowed_origins.is_empty() {
        return Err(IssueError::invalid(
            "publishable keys need at least one allowed origin",
        ));
    }
    let rate_limit = match (body.rate_limit, preset) {
        (Some(r), _) => Some(rate_limit(r)?),
        (None, Some(p)) => Some(RateLimit {
            limit: p.per_minute,
            window_seconds: 60,
        }),
        (None, None) => None,
    };
    let budget = body.budget.or(preset.map(|p| p.budget));
    if budget.is_some_and(|b| b > i64::MAX as u64) {
        return Err(IssueError::invalid("budget is too large"));
    }
    let mut expires_at_ms = check_expiry(body.expires_at.as_deref(), body.ttl_seconds, now_ms)?;
    if expires_at_ms.is_none() && body.expires_at.is_none() && body.ttl_seconds.is_none() {
        if let Some(p) = preset {
            expires_at_ms = Some(now_ms + (p.ttl_days as i64) * 86_400_000);
        }
    }
    if let Some(d) = body.rotation_days {
        if d == 0 || d > 3650 {
            return Err(IssueError::invalid(
                "rotation_days must be between 1 and 3650",
            ));
        }
    }
    let metadata = check_metadata(body.metadata)?;
    let plaintext = issuer.format.generate(kind, os_fill);
    let id = KeyId::from(new_id("key", now_ms));
    let record = KeyRecord {
        family_id: FamilyId::started_by(&id),
        id,
        tenant_id: tenant_id.clone(),
        user_id: user.map(|u| u.id.clone()),
        kind,
        name,
        hash: issuer.hasher.hash(&plaintext),
        display: keygate_core::key::display_prefix(&plaintext).to_owned(),
        scopes,
        allowed_ips,
        allowed_origins,
        rate_limit,
        budget,
        budget_withdrawn: 0,
        expires_at_ms,
        rotation_days: body.rotation_days,
        metadata,
        status: KeyStatus::Active,
        rotated_from: None,
        rotated_to: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        last_used_at_ms: None,
        revoked_at_ms: None,
    };
    Ok((plaintext, record))
}

/// A successor for `old` with the same settings, a new secret, and the same lifetime length.
pub fn successor(issuer: &Issuer<'_>, old: &KeyRecord, now_ms: i64) -> (String, KeyRecord) {
    let plaintext = issuer.format.generate(old.kind, os_fill);
    let id = KeyId::from(new_id("key", now_ms));
    let expires_at_ms = old
        .expires_at_ms
        .map(|e| now_ms + (e - old.created_at_ms).max(0));
    let record = KeyRecord {
        id: id.clone(),
        hash: issuer.hasher.hash(&plaintext),
        display: keygate_core::key::display_prefix(&plaintext).to_owned(),
        status: KeyStatus::Active,
        rotated_from: Some(old.id.clone()),
        rotated_to: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        last_used_at_ms: None,
        revoked_at_ms: None,
        expires_at_ms,
        ..old.clone()
    };
    (plaintext, record)
}

/// Whether rate limit `a` lets more calls through over time than `b`.
fn looser(a: RateLimit, b: RateLimit) -> bool {
    u64::from(a.limit) * u64::from(b.window_seconds)
        > u64::from(b.limit) * u64::from(a.window_seconds)
}

/// Fits a key a user makes for themself to their plan's ceilings: what the request left out
/// gets the plan's value (budget `max_budget`, expiry `max_ttl_days`, the plan's rate limit);
/// what it asked beyond them is refused.
pub fn fit_to_plan(
    rec: &mut KeyRecord,
    plan: &crate::config::PlanConfig,
    now_ms: i64,
) -> Result<(), IssueError> {
    if let Some(max) = plan.max_budget {
        match rec.budget {
            None => rec.budget = Some(max),
            Some(b) if b > max => {
                return Err(IssueError::invalid(format!(
                    "budget exceeds what your plan allows a key ({max} credits)"
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(days) = plan.max_ttl_days {
        let last = now_ms.saturating_add(i64::from(days) * 86_400_000);
        match rec.expires_at_ms {
            None => rec.expires_at_ms = Some(last),
            Some(e) if e > last => {
                return Err(IssueError::invalid(format!(
                    "the key would outlive what your plan allows ({days} days)"
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(max) = plan.rate_limit {
        match rec.rate_limit {
            None => rec.rate_limit = Some(max),
            Some(r) if looser(r, max) => {
                return Err(IssueError::invalid(format!(
                    "rate_limit is looser than your plan allows ({} per {} s)",
                    max.limit, max.window_seconds
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks that a user's change of their key only tightens it: fewer scopes, a sub-list of the
/// allowed addresses and origins, a rate limit, budget and expiry no looser than before.
/// Loosening what an admin set is for an admin.
pub fn only_tightens(before: &KeyRecord, after: &KeyRecord) -> Result<(), IssueError> {
    let refuse = |what: &str| {
        Err(IssueError::invalid(format!(
            "{what}: a user may only tighten a key (ask an admin to loosen it)"
        )))
    };
    if !after.scopes.is_subset_of(&before.scopes) {
        return refuse("scopes");
    }
    let sub_list = |b: Vec<String>, a: Vec<String>| {
        // An empty list allows every address (not for a pk's origins, which always has one).
        b.is_empty() || (!a.is_empty() && a.iter().all(|x| b.contains(x)))
    };
    if !sub_list(
        before.allowed_ips.to_strings(),
        after.allowed_ips.to_strings(),
    ) {
        return refuse("allowed_ips");
    }
    if !sub_list(
        before.allowed_origins.to_strings(),
        after.allowed_origins.to_strings(),
    ) {
        return refuse("allowed_origins");
    }
    match (before.rate_limit, after.rate_limit) {
        (Some(_), None) => return refuse("rate_limit"),
        (Some(b), Some(a)) if looser(a, b) => return refuse("rate_limit"),
        _ => {}
    }
    match (before.budget, after.budget) {
        (Some(_), None) => return refuse("budget"),
        (Some(b), Some(a)) if a > b => return refuse("budget"),
        _ => {}
    }
    match (before.expires_at_ms, after.expires_at_ms) {
        (Some(_), None) => return refuse("expires_at"),
        (Some(b), Some(a)) if a > b => return refuse("expires_at"),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod ceilings {
    use super::*;
    use crate::config::PlanConfig;

    fn record() -> KeyRecord {
        KeyRecord {
            id: KeyId::from("key_1"),
            family_id: FamilyId::from("key_1"),
            tenant_id: TenantId::from("t"),
            user_id: Some(UserId::from("usr_1")),
            kind: Kind::Ut,
            name: "k".into(),
            hash: keygate_core::KeyHash([0; 32]),
            display: "kg_ut_…".into(),
            scopes: ScopeSet::parse(&["a:read", "b:read"]).expect("scopes"),
            allowed_ips: keygate_core::IpAllowList::default(),
            allowed_origins: OriginList::default(),
            rate_limit: Some(RateLimit {
                limit: 60,
                window_seconds: 60,
            }),
            budget: Some(100),
            budget_withdrawn: 0,
            expires_at_ms: Some(10_000),
            rotation_days: None,
            metadata: serde_json::Map::new(),
            status: KeyStatus::Active,
            rotated_from: None,
            rotated_to: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_used_at_ms: None,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn a_users_key_gets_the_plans_ceilings_and_cannot_pass_them() {
        let plan = PlanConfig {
            max_budget: Some(500),
            max_ttl_days: Some(30),
            rate_limit: Some(RateLimit {
                limit: 60,
                window_seconds: 60,
            }),
            ..PlanConfig::default()
        };
        let mut open = record();
        (open.budget, open.expires_at_ms, open.rate_limit) = (None, None, None);
        fit_to_plan(&mut open, &plan, 1_000).expect("fits");
        assert_eq!(open.budget, Some(500));
        assert_eq!(open.expires_at_ms, Some(1_000 + 30 * 86_400_000));
        assert_eq!(open.rate_limit, plan.rate_limit);
        let mut r = record();
        r.budget = Some(501);
        assert!(fit_to_plan(&mut r, &plan, 1_000).is_err(), "budget");
        let mut r = record();
        r.expires_at_ms = Some(1_001 + 30 * 86_400_000);
        assert!(fit_to_plan(&mut r, &plan, 1_000).is_err(), "lifetime");
        let mut r = record();
        // 2 a second is looser than 60 a minute, whatever the window.
        r.rate_limit = Some(RateLimit {
            limit: 2,
            window_seconds: 1,
        });
        assert!(fit_to_plan(&mut r, &plan, 1_000).is_err(), "rate");
        let mut r = record();
        r.rate_limit = Some(RateLimit {
            limit: 30,
            window_seconds: 60,
        });
        assert!(fit_to_plan(&mut r, &plan, 1_000).is_ok(), "tighter is fine");
    }

    #[test]
    fn a_users_change_may_only_tighten() {
        let before = record();
        let tighter = |f: &dyn Fn(&mut KeyRecord)| {
            let mut a = record();
            f(&mut a);
            only_tightens(&before, &a)
        };
        assert!(tighter(&|a| a.budget = Some(50)).is_ok());
        assert!(tighter(&|a| a.expires_at_ms = Some(5_000)).is_ok());
        assert!(tighter(&|a| a.scopes = ScopeSet::parse(&["a:read"]).expect("s")).is_ok());
        assert!(tighter(&|a| a.allowed_ips = check_ips(&["10.0.0.1".into()]).expect("ip")).is_ok());
        for loosen in [
            &(|a: &mut KeyRecord| a.budget = None) as &dyn Fn(&mut KeyRecord),
            &|a| a.budget = Some(101),
            &|a| a.expires_at_ms = None,
            &|a| a.expires_at_ms = Some(10_001),
            &|a| a.rate_limit = None,
            &|a| {
                a.rate_limit = Some(RateLimit {
                    limit: 61,
                    window_seconds: 60,
                })
            },
            &|a| a.scopes = ScopeSet::parse(&["a:read", "c:read"]).expect("s"),
        ] {
            assert!(tighter(loosen).is_err());
        }
        // From an IP list, dropping it (every address) or adding one loosens.
        let mut listed = record();
        listed.allowed_ips = check_ips(&["10.0.0.1".into()]).expect("ip");
        let mut none = listed.clone();
        none.allowed_ips = keygate_core::IpAllowList::default();
        assert!(only_tightens(&listed, &none).is_err());
        let mut more = listed.clone();
        more.allowed_ips = check_ips(&["10.0.0.1".into(), "10.0.0.2".into()]).expect("ip");
        assert!(only_tightens(&listed, &more).is_err());
    }
}

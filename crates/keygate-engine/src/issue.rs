//! Issuing keys: the create body, presets, defaults and every validation, shared by the HTTP
//! API, tenant creation and the CLI (which works on the database directly).

use crate::clock::parse_rfc3339;
use crate::config::Config;
use crate::ids::{new_id, os_fill};
use keygate_core::{
    IpAllowList, KeyFormat, KeyHasher, KeyStatus, Kind, OriginList, RateLimit, ScopeSet,
};
use keygate_store::{KeyRecord, Store};

/// Origins a new `pk` gets when none are given: the AI canvases.
pub const DEFAULT_PK_ORIGINS: [&str; 4] = [
    "https://claude.ai",
    "https://chatgpt.com",
    "https://gemini.google.com",
    "https://grok.com",
];

/// Longest TTL / expiry distance accepted: 10 years.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 86_400;

pub use keygate_api::{CreateKey, RateLimitBody};

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

impl IssueError {
    fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// A `rate_limit` body, validated.
pub fn rate_limit(b: RateLimitBody) -> Result<RateLimit, IssueError> {
    RateLimit::new(b.limit, b.window_seconds).map_err(|e| IssueError::invalid(e.message()))
}

/// A preset of API.md's table.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// Scopes.
    pub scopes: &'static [&'static str],
    /// Budget.
    pub budget: u64,
    /// Requests per minute.
    pub per_minute: u32,
    /// Lifetime, days.
    pub ttl_days: u64,
    /// Whether the default origin list applies (`widget`: the caller must give its own).
    pub default_origins: bool,
}

const SAFE_READ: &[&str] = &["ocr:read", "llm:generate", "translate:run", "docs:read"];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Option<Preset> {
    match name {
        "default" => Some(Preset {
            scopes: SAFE_READ,
            budget: 1_000,
            per_minute: 30,
            ttl_days: 30,
            default_origins: true,
        }),
        "aidemo" => Some(Preset {
            scopes: SAFE_READ,
            budget: 2_000,
            per_minute: 60,
            ttl_days: 30,
            default_origins: true,
        }),
        "widget" => Some(Preset {
            scopes: &[
                "chat:run",
                "booking:create",
                "form:submit",
                "contact:create",
            ],
            budget: 5_000,
            per_minute: 120,
            ttl_days: 365,
            default_origins: false,
        }),
        _ => None,
    }
}

/// Checks a display name (of a key, OAuth client, tenant or user; on create and on update):
/// 1 to 200 characters, not blank, and none that [`keygate_core::name_problem`] refuses
/// (control characters, bidirectional controls) anywhere in what was sent.
pub fn check_name(name: &str) -> Result<String, IssueError> {
    if let Some(why) = keygate_core::name_problem(name) {
        return Err(IssueError::invalid(why));
    }
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 {
        return Err(IssueError::invalid("name must be 1 to 200 characters"));
    }
    Ok(n.to_owned())
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

/// Parses scopes for a key of `kind`: `*` only on `sk`.
pub fn check_scopes(kind: Kind, scopes: &[String]) -> Result<ScopeSet, IssueError> {
    let set = ScopeSet::parse(scopes).map_err(|e| IssueError::invalid(e.message()))?;
    if set.has_all() && kind != Kind::Sk {
        return Err(IssueError::invalid(
            "scope \"*\" is only for secret (sk) keys",
        ));
    }
    if set.len() > 100 {
        return Err(IssueError::invalid("at most 100 scopes"));
    }
    Ok(set)
}

/// Parses an IP allow-list.
pub fn check_ips(ips: &[String]) -> Result<IpAllowList, IssueError> {
    if ips.len() > 100 {
        return Err(IssueError::invalid("at most 100 allowed_ips"));
    }
    IpAllowList::parse(ips).map_err(|e| IssueError::invalid(e.message()))
}

/// Parses an origin allow-list.
pub fn check_origins(origins: &[String]) -> Result<OriginList, IssueError> {
    if origins.len() > 100 {
        return Err(IssueError::invalid("at most 100 allowed_origins"));
    }
    OriginList::parse(origins).map_err(|e| IssueError::invalid(e.message()))
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

fn plan_allows(allowed: &[String], scopes: &ScopeSet) -> Result<(), IssueError> {
    let allowed = ScopeSet::parse(allowed).map_err(|e| IssueError::invalid(e.message()))?;
    if scopes.is_subset_of(&allowed) {
        Ok(())
    } else {
        Err(IssueError::invalid(
            "scopes exceed what the user's plan allows",
        ))
    }
}

/// Checks that a `ut` key of user `user_id` may hold `scopes` under the user's plan.
pub async fn check_plan_scopes(
    config: &Config,
    store: &dyn Store,
    user_id: &str,
    scopes: &ScopeSet,
) -> Result<(), IssueError> {
    let Some(user) = store.get_user(user_id).await? else {
        return Ok(());
    };
    match config.plans.get(&user.plan).and_then(|p| p.scopes.as_ref()) {
        Some(allowed) => plan_allows(allowed, scopes),
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
    tenant_id: &str,
    body: CreateKey,
    now_ms: i64,
) -> Result<(String, KeyRecord), IssueError> {
    let kind = Kind::parse(&body.kind).map_err(|e| IssueError::invalid(e.message()))?;
    let name = check_name(&body.name)?;
    let preset =
        match body.preset.as_deref() {
            None => None,
            Some(p) => Some(preset(p).ok_or_else(|| {
                IssueError::invalid("preset must be one of default, aidemo, widget")
            })?),
        };
    // The user: required for ut, refused for sk, optional for pk; must be in the tenant.
    let user = match (&body.user_id, kind) {
        (None, Kind::Ut) => return Err(IssueError::invalid("user_id is required for ut keys")),
        (Some(_), Kind::Sk) => {
            return Err(IssueError::invalid(
                "sk keys have no user; use a ut key for a user",
            ))
        }
        (Some(uid), _) => match store.get_user(uid).await? {
            Some(u) if u.tenant_id == tenant_id => Some(u),
            _ => return Err(IssueError::invalid("user_id names no user of this tenant")),
        },
        (None, _) => None,
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
        let allowed = ScopeSet::parse(allowed).map_err(|e| IssueError::invalid(e.message()))?;
        if !scopes.is_subset_of(&allowed) {
            return Err(IssueError::invalid(
                "scopes exceed what the user's plan allows",
            ));
        }
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
    let id = new_id("key", now_ms);
    let record = KeyRecord {
        family_id: id.clone(),
        id,
        tenant_id: tenant_id.to_owned(),
        user_id: user.map(|u| u.id),
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
    let id = new_id("key", now_ms);
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

//! The engine every entry point shares (management auth, verify, forward-auth, the gateway):
//! the pipeline parse → cache/store lookup → core decision → counters → audit line, the key
//! cache and its invalidation, and the change feed between nodes.

use crate::clock::now_ms;
use crate::config::{Config, Feature, PlanConfig, RouteConfig, Upstream};
use http::HeaderValue;
use keygate_core::{
    decide, Code, FamilyId, KeyFormat, KeyHash, KeyHasher, KeyId, KeyPolicy, Kind, NormalPath,
    PathPattern, RateDecision, RequestFacts, TenantId, UserId,
};
use keygate_counters::{Counters, Metered};
use keygate_store::{KeyRecord, Store};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A key record with everything the hot path needs precomputed.
#[derive(Debug)]
pub struct CachedKey {
    /// The stored record.
    pub record: KeyRecord,
    /// The core policy (with plan limits applied).
    pub policy: KeyPolicy,
    /// `X-Keygate-Key-Id`.
    pub id_header: HeaderValue,
    /// `X-Keygate-Tenant`.
    pub tenant_header: HeaderValue,
    /// `X-Keygate-User`.
    pub user_header: Option<HeaderValue>,
    /// `X-Keygate-Scopes` (space separated).
    pub scopes_header: HeaderValue,
    /// `RateLimit-Policy`, when the key has a rate limit (it never changes for a cached key).
    pub policy_header: Option<HeaderValue>,
    /// This key's counters, resolved once.
    pub counters: keygate_counters::Handles,
    /// When this entry was read from the store.
    pub cached_at: std::time::Instant,
    /// Last use seen by this node, Unix ms.
    last_used: AtomicI64,
    /// Queued for the next last-used flush.
    touch_pending: AtomicBool,
    /// An OAuth access token (its record is built from the token and its grant; there is no
    /// key row to keep a last-used time on).
    pub token: bool,
    /// The token's verified claims (OAuth access tokens only): introspection answers from them.
    pub claims: Option<Box<keygate_oauth::jwt::AccessClaims>>,
    /// A `ut` key of its account's owner.
    pub owner: bool,
}

/// A compiled `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// Path pattern.
    pub pattern: PathPattern,
    /// Upper-case methods; empty = all.
    pub methods: Vec<String>,
    /// The config entry.
    pub config: RouteConfig,
    /// The parsed upstream (gateway routes).
    pub upstream: Option<Upstream>,
}

/// The engine: configuration, store, counters, caches, audit log and OAuth keys of one node.
#[derive(Debug)]
pub struct Engine {
    /// Configuration.
    pub config: Config,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Rate limits and credits (in process; also the fallback for free calls when Redis is down).
    pub counters: Counters,
    /// Counters shared by every node (when `redis_url` is set).
    pub shared: Option<keygate_counters::SharedCounters>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Key format of this deployment.
    pub format: KeyFormat,
    /// Key hasher (with pepper, if configured).
    pub hasher: KeyHasher,
    /// Known keys by hash.
    pub cache: moka::sync::Cache<KeyHash, Arc<CachedKey>>,
    /// Well-formed keys recently found unknown.
    pub negative: moka::sync::Cache<KeyHash, ()>,
    /// Route table.
    pub routes: Vec<Route>,
    /// This node's id.
    pub node_id: String,
    /// Last-used write-behind queue.
    pub touch_tx: mpsc::Sender<Arc<CachedKey>>,
    /// Origins some active `pk` key allows (CORS preflights).
    pub cors: crate::origins::CorsIndex,
    /// Bumped by every invalidation: a cache fill that read the store before an invalidation
    /// must not insert what it read after it.
    pub cache_gen: std::sync::atomic::AtomicU64,
    /// Wakes the webhook sender when deliveries are queued.
    pub webhook_wake: tokio::sync::Notify,
    /// This node's audit log (`None` when `audit.enabled = false`).
    pub audit: Option<Arc<keygate_audit::AuditLog>>,
    /// The OAuth authorization server (signing keys, sealing secret).
    pub oauth: crate::oauth::OAuth,
    /// Whether changes from other nodes are reaching this node (always true for a store only
    /// one node uses). While false, cached keys are re-read after `cache.unsynced_ttl_seconds`.
    pub feed_ok: AtomicBool,
    /// Outgoing email (`[smtp]`), when configured.
    pub mailer: Option<crate::mail::Mailer>,
}

/// An allowed request.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// The key.
    pub key: Arc<CachedKey>,
    /// What the counters said.
    pub metered: Metered,
    /// What was charged (to give back if the request is never served).
    pub charge: keygate_core::Charge,
    /// Whether the shared (Redis) counters charged it, rather than this node's.
    pub shared_meter: bool,
}

/// A refused request.
#[derive(Debug)]
pub struct Denied {
    /// Why.
    pub code: Code,
    /// Rate decision, when the rate limit was consulted.
    pub rate: Option<RateDecision>,
    /// The key, when it was found (and is visible to the caller).
    pub key: Option<Arc<CachedKey>>,
}

impl Denied {
    fn code(code: Code) -> Self {
        Self {
            code,
            rate: None,
            key: None,
        }
    }
}

/// The audit line a decision still owes: the group its `request.decided` line was appended
/// to (`None`: nothing to wait for). Its answer may not leave before that group is written.
#[derive(Debug)]
pub struct Ticket(Option<u64>);

/// A decision whose audit line is appended but perhaps not written yet: settle it
/// ([`Engine::settle`]) before its answer leaves.
#[derive(Debug)]
#[must_use = "a decision's answer may not leave before its audit line is written: settle it"]
pub struct Decided<T> {
    out: Result<T, Denied>,
    ticket: Ticket,
}

/// What a decision allowed, and what it charged (given back if its line cannot be written).
pub trait Charged {
    /// The keyed request it allowed, if any (a public call charges nothing).
    fn allowed(&self) -> Option<&Allowed>;
}

impl Charged for Allowed {
    fn allowed(&self) -> Option<&Allowed> {
        Some(self)
    }
}

impl Charged for RateDecision {
    fn allowed(&self) -> Option<&Allowed> {
        None
    }
}

/// What the audit line of a decision says about it.
struct Verdict<'a> {
    key: Option<&'a Arc<CachedKey>>,
    code: Code,
    credits: u64,
}

impl<'a> Verdict<'a> {
    fn of<T: Charged>(out: &'a Result<T, Denied>) -> Self {
        match out {
            Ok(t) => Self {
                key: t.allowed().map(|a| &a.key),
                code: Code::Valid,
                credits: t.allowed().map_or(0, |a| a.charge.cost),
            },
            Err(d) => Self {
                key: d.key.as_ref(),
                code: d.code,
                credits: 0,
            },
        }
    }
}

/// `RateLimit-Policy` for a limit (structured-field form, see keygate-server's `headers`).
pub fn policy_value(limit: u32, window_seconds: u32) -> HeaderValue {
    HeaderValue::try_from(format!("\"key\";q={limit};w={window_seconds}"))
        .unwrap_or_else(|_| HeaderValue::from_static("\"key\""))
}

/// A lifecycle event to record: who (`actor`: a key id, `system`, …) did what (`action`:
/// `key.created`, …) to which records.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// Who acted.
    pub actor: &'a str,
    /// What happened (`key.created`, `user.deleted`, …).
    pub action: &'a str,
    /// The tenant the records belong to.
    pub tenant_id: &'a TenantId,
    /// The key concerned, if any.
    pub key_id: Option<&'a KeyId>,
    /// The user concerned, if any.
    pub user_id: Option<&'a UserId>,
    /// Details (JSON).
    pub detail: &'a serde_json::Value,
}

/// What became of an answer offered to a [`Holder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The answer is held until the group is written: the handler answers at once.
    Held,
    /// The group is written already (or failed): `AuditLog::flush` tells which.
    Written,
    /// Not a connection that holds answers: the handler must wait for the group itself.
    NotHere,
}

/// A connection that can hold an answer until its decision's audit line is written
/// (keygate-server's forward-auth connections, `held::Conn`).
pub trait Holder: Sync {
    /// Holds the connection's next answer until `group` is written; `refund` is what goes
    /// back if the group's write fails.
    fn hold(&self, group: u64, refund: &dyn Fn() -> Option<Allowed>) -> Hold;
}

impl Engine {
    /// The plan called `name`, or the `free` plan if it is gone from the config.
    pub fn plan(&self, name: &str) -> &PlanConfig {
        self.config
            .plans
            .get(name)
            .or_else(|| self.config.plans.get("free"))
            .unwrap_or(&FALLBACK_PLAN)
    }

    /// The first route matching `method` and the normalised `path`. Routes closed to `pk`
    /// keys match leniently (ignoring case, `/admin.json` as `/admin`: see
    /// `PathPattern::matches_leniently`), so no spelling slips past an `/admin/*` route to a
    /// lenient upstream; with `gateway.case_insensitive_paths` every route ignores case.
    pub fn match_route(&self, method: &str, path: &NormalPath<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
                && self.route_matches(r, path)
        })
    }

    /// Whether `r`'s pattern matches `path` (any method).
    pub fn route_matches(&self, r: &Route, path: &NormalPath<'_>) -> bool {
        if r.config.class.blocked_for_publishable() {
            r.pattern.matches_leniently(path)
        } else if self.config.gateway.case_insensitive_paths {
            r.pattern.matches_ignore_case(path)
        } else {
            r.pattern.matches(path)
        }
    }

    /// Builds the cached form of a record: applies plan limits (a `ut` key without its own
    /// rate limit gets its user's plan's; API access follows the user's or tenant's plan).
    pub async fn cached_key(
        &self,
        record: KeyRecord,
    ) -> Result<CachedKey, keygate_store::StoreError> {
        let tenant = self.store.get_tenant(&record.tenant_id).await?;
        let verified = tenant.as_ref().is_none_or(|t| t.verified);
        let account = self.plan(tenant.as_ref().map_or("free", |t| t.plan.as_str()));
        let user = match (&record.kind, &record.user_id) {
            (Kind::Ut, Some(uid)) => self.store.get_user(uid).await?,
            _ => None,
        };
        let owner = user
            .as_ref()
            .is_some_and(|u| u.role == keygate_core::access::Role::Owner);
        // A removed user's keys are revoked by the removal; one made while it ran, or a token
        // of theirs, is refused all the same.
        let removed = user.as_ref().is_some_and(|u| u.removed_at_ms.is_some());
        let user = user.map(|u| u.plan);
        // A user token's limits are its user's plan's; what the key may do at all needs both
        // the account's plan and the user's.
        let plan = user.as_deref().map_or(account, |p| self.plan(p));
        let plan_gate = if !verified {
            Some(Code::AccountUnverified)
        } else if !(account.has(Feature::Api) && plan.has(Feature::Api)) {
            Some(Code::PlanFeature)
        } else {
            None
        };
        let rate_limit = match record.kind {
            Kind::Ut => record.rate_limit.or(plan.rate_limit),
            _ => record.rate_limit,
        };
        // A user token holds at most what its user's plan allows now: a plan that started
        // after the key was made narrows it (issuance checked the plan of that day).
        let scopes = match (record.kind, &plan.scopes) {
            (Kind::Ut, Some(allowed)) => match keygate_core::ScopeSet::parse(allowed) {
                Ok(allowed) => {
                    let kept: Vec<String> = record
                        .scopes
                        .to_strings()
                        .into_iter()
                        .filter(|s| keygate_core::scope::is_keygate_scope(s) || allowed.allows(s))
                        .collect();
                    keygate_core::ScopeSet::parse(&kept).unwrap_or_default()
                }
                // Checked when the config was loaded.
                Err(_) => keygate_core::ScopeSet::default(),
            },
            _ => record.scopes.clone(),
        };
        let policy = KeyPolicy {
            id: record.id.clone(),
            tenant_id: record.tenant_id.clone(),
            user_id: record.user_id.clone(),
            kind: record.kind,
            status: if removed {
                keygate_core::KeyStatus::Revoked
            } else {
                record.status
            },
            scopes: scopes.clone(),
            allowed_ips: record.allowed_ips.clone(),
            allowed_origins: record.allowed_origins.clone(),
            rate_limit,
            budget: record.budget,
            expires_at_ms: record.expires_at_ms,
            plan_gate,
            resource_only: false,
        };
        let hv =
            |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""));
        Ok(CachedKey {
            id_header: hv(&record.id),
            tenant_header: hv(&record.tenant_id),
            user_header: record.user_id.as_deref().map(hv),
            scopes_header: hv(&scopes.to_strings().join(" ")),
            policy_header: rate_limit.map(|r| policy_value(r.limit, r.window_seconds)),
            counters: self.counters.handles(&record.family_id, &record.tenant_id),
            cached_at: std::time::Instant::now(),
            last_used: AtomicI64::new(record.last_used_at_ms.unwrap_or(0)),
            touch_pending: AtomicBool::new(false),
            token: false,
            claims: None,
            owner,
            policy,
            record,
        })
    }

    /// Finds a key by hash: cache, then store.
    async fn lookup(&self, hash: &KeyHash) -> Result<Option<Arc<CachedKey>>, Code> {
        if let Some(k) = self.cache.get(hash) {
            self.metrics.cache_hits.increment(1);
            let fresh = Duration::from_secs(self.config.cache.unsynced_ttl_seconds);
            if self.feed_ok.load(Ordering::Relaxed) || k.cached_at.elapsed() < fresh {
                return Ok(Some(k));
            }
            // Changes from other nodes are not arriving: re-read, and if the store is down
            // too, keep using the entry for a bounded time.
            let stale = Duration::from_secs(self.config.cache.max_stale_seconds);
            return match Box::pin(self.lookup_miss(hash)).await {
                Err(Code::Unavailable) if k.cached_at.elapsed() < stale => Ok(Some(k)),
                other => other,
            };
        }
        // The miss path holds store futures; boxing it keeps the hot path's future small.
        self.metrics.cache_misses.increment(1);
        Box::pin(self.lookup_miss(hash)).await
    }

    async fn lookup_miss(&self, hash: &KeyHash) -> Result<Option<Arc<CachedKey>>, Code> {
        let gen = self.cache_gen.load(Ordering::Acquire);
        if self.negative.contains_key(hash) {
            return Ok(None);
        }
        let rec = match self.store.get_key_by_hash(hash).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.store_errors.increment(1);
                tracing::error!("key lookup failed: {e}");
                return Err(Code::Unavailable);
            }
        };
        let Some(rec) = rec else {
            self.fill(
                gen,
                || self.negative.insert(*hash, ()),
                || self.negative.invalidate(hash),
            );
            return Ok(None);
        };
        let cached = match self.cached_key(rec).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!("key lookup failed: {e}");
                return Err(Code::Unavailable);
            }
        };
        self.fill(
            gen,
            || self.cache.insert(*hash, cached.clone()),
            || self.cache.invalidate(hash),
        );
        Ok(Some(cached))
    }

    /// Inserts into a cache only if no invalidation happened since `gen` was read, and undoes
    /// the insert if one raced with it.
    pub(crate) fn fill(&self, gen: u64, insert: impl FnOnce(), undo: impl FnOnce()) {
        if self.cache_gen.load(Ordering::Acquire) != gen {
            return;
        }
        insert();
        if self.cache_gen.load(Ordering::Acquire) != gen {
            undo();
        }
    }

    /// Drops a key from this node's caches (after any change to it).
    pub fn invalidate(&self, hash: &KeyHash) {
        self.cache_gen.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(hash);
        self.negative.invalidate(hash);
    }

    /// A key changed: drop it here and tell every other node sharing the store.
    pub async fn key_changed(&self, hash: &KeyHash) {
        self.invalidate(hash);
        self.publish(format!("key:{}", hex(hash.as_bytes()))).await;
    }

    /// A family's budget changed: drop its keys here and on every other node.
    pub async fn family_changed(&self, family_id: &FamilyId) {
        self.invalidate_family(family_id);
        self.publish(format!("family:{family_id}")).await;
    }

    /// A tenant's plan changed: its keys are judged again (features, limits) and its pool
    /// read again, here and on every other node.
    pub async fn plan_changed(&self, tenant_id: &TenantId) {
        self.forget_tenant(tenant_id);
        if let Some(s) = &self.shared {
            s.pool_remainder_changed(tenant_id).await;
        }
        self.publish(format!("plan:{tenant_id}")).await;
    }

    /// Drops a tenant's cached keys and what this node knew of its pool.
    fn forget_tenant(&self, tenant_id: &TenantId) {
        self.cache_gen.fetch_add(1, Ordering::AcqRel);
        let hashes: Vec<KeyHash> = self
            .cache
            .iter()
            .filter(|(_, k)| k.record.tenant_id == *tenant_id)
            .map(|(h, _)| *h)
            .collect();
        for h in hashes {
            self.cache.invalidate(&h);
        }
        self.counters.pool_changed(tenant_id);
        if let Some(s) = &self.shared {
            s.pool_changed(tenant_id);
        }
    }

    /// A tenant's pool changed (top-up): forget "empty" here and on every other node.
    pub async fn tenant_changed(&self, tenant_id: &TenantId) {
        self.counters.pool_changed(tenant_id);
        if let Some(s) = &self.shared {
            s.pool_remainder_changed(tenant_id).await;
        }
        self.publish(format!("tenant:{tenant_id}")).await;
    }

    /// Publishes `change` to the other nodes, tagged with this node's id so that this node
    /// skips its own message when the feed echoes it back (it has applied it already).
    pub async fn publish(&self, change: String) {
        let tagged = format!("{}|{change}", self.node_id);
        if let Err(e) = self.store.publish_change(&tagged).await {
            // Other nodes fall back to the cache TTL for this change.
            tracing::warn!("could not publish a change to other nodes: {e}");
        }
    }

    /// Applies a change another node published (see [`run_change_listener`]).
    pub fn apply_change(&self, change: &str) {
        match change.split_once(':') {
            Some(("key", h)) => match unhex(h) {
                Some(hash) => self.invalidate(&hash),
                None => self.invalidate_all(),
            },
            Some(("family", f)) => self.invalidate_family(&FamilyId::from(f)),
            Some(("plan", t)) => self.forget_tenant(&TenantId::from(t)),
            Some(("client", id)) => self.forget_client(id),
            Some(("tenant", t)) => {
                let t = TenantId::from(t);
                self.counters.pool_changed(&t);
                if let Some(s) = &self.shared {
                    s.pool_changed(&t);
                }
            }
            _ => self.invalidate_all(),
        }
    }

    /// Drops every cached key (after the change feed was interrupted).
    pub fn invalidate_all(&self) {
        self.cache_gen.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.negative.invalidate_all();
        self.oauth.clients.invalidate_all();
    }

    /// Drops every cached key of a rotation family (they share one budget).
    pub fn invalidate_family(&self, family_id: &FamilyId) {
        self.cache_gen.fetch_add(1, Ordering::AcqRel);
        let hashes: Vec<KeyHash> = self
            .cache
            .iter()
            .filter(|(_, k)| k.record.family_id == *family_id)
            .map(|(h, _)| *h)
            .collect();
        for h in hashes {
            self.cache.invalidate(&h);
        }
    }

    /// The pipeline. `credential` is the bearer token (if any); `visible_tenant`, when set,
    /// makes keys of other tenants look unknown (before anything is charged).
    async fn authorize_inner(
        &self,
        credential: Result<Option<&str>, Code>,
        facts: &RequestFacts<'_>,
        visible_tenant: Option<&TenantId>,
    ) -> Result<Allowed, Denied> {
        let token = credential
            .map_err(Denied::code)?
            .ok_or(Denied::code(Code::MissingKey))?;
        let key = match self.format.parse(token) {
            Ok(parsed) => {
                let hash = self.hasher.hash(parsed.expose_secret());
                let key = self.lookup(&hash).await.map_err(Denied::code)?;
                // The index lookup matched; confirm in constant time.
                key.filter(|k| k.record.hash.ct_eq(&hash))
            }
            // An OAuth access token: judged from here on exactly like a key.
            Err(_) if keygate_oauth::jwt::looks_like_jwt(token) => {
                Box::pin(self.lookup_token(token))
                    .await
                    .map_err(Denied::code)?
            }
            Err(_) => return Err(Denied::code(Code::MalformedKey)),
        };
        // Other tenants' keys look unknown.
        let key = key.filter(|k| visible_tenant.is_none_or(|t| k.record.tenant_id == *t));
        let charge = match decide(key.as_ref().map(|k| &k.policy), facts) {
            Ok(c) => c,
            Err(code) => {
                return Err(Denied {
                    code,
                    rate: None,
                    key,
                })
            }
        };
        // decide() returned Ok, so the key is present.
        let Some(key) = key else {
            return Err(Denied::code(Code::UnknownKey));
        };
        if let Some(shared) = &self.shared {
            match shared
                .meter(
                    &key.record.family_id,
                    &key.record.tenant_id,
                    &charge,
                    facts.now_ms,
                )
                .await
            {
                Ok(Some(metered)) => {
                    self.touch(&key, facts.now_ms);
                    return Ok(Allowed {
                        key,
                        metered,
                        charge,
                        shared_meter: true,
                    });
                }
                Ok(None) => {} // Redis is down and the call is free: limit it locally.
                Err(r)
                    if r.code == Code::Unavailable
                        && self.config.redis_outage_policy
                            == crate::config::OutagePolicy::Local =>
                {
                    // Redis is down and the operator chose local metering.
                }
                Err(r) => {
                    return Err(Denied {
                        code: r.code,
                        rate: r.rate,
                        key: Some(key),
                    })
                }
            }
        }
        match self
            .counters
            .meter_with(
                &key.counters,
                &key.record.family_id,
                &key.record.tenant_id,
                &charge,
                facts.now_ms,
            )
            .await
        {
            Ok(metered) => {
                self.touch(&key, facts.now_ms);
                Ok(Allowed {
                    key,
                    metered,
                    charge,
                    shared_meter: false,
                })
            }
            Err(r) => Err(Denied {
                code: r.code,
                rate: r.rate,
                key: Some(key),
            }),
        }
    }

    /// The pipeline, up to the audit line: decides, charges, and appends the decision's
    /// `request.decided` line. The answer may not leave before that line is written: the
    /// caller settles the returned [`Decided`] ([`Engine::settle`]), or calls
    /// [`Engine::authorize`], which does both. `credential` is the bearer token (if any);
    /// `visible_tenant`, when set, makes keys of other tenants look unknown (before anything
    /// is charged).
    pub async fn decide(
        &self,
        credential: Result<Option<&str>, Code>,
        facts: &RequestFacts<'_>,
        visible_tenant: Option<&TenantId>,
    ) -> Decided<Allowed> {
        // Latency is sampled for the histogram (one decision in 32), but every audit event
        // carries its own.
        let sampled = self.metrics.sample();
        let started = (sampled || self.audit.is_some()).then(std::time::Instant::now);
        let out = self
            .authorize_inner(credential, facts, visible_tenant)
            .await;
        let elapsed = started.map(|t| t.elapsed());
        if let (true, Some(e)) = (sampled, elapsed) {
            self.metrics.decision_seconds.record(e.as_secs_f64());
        }
        let us = elapsed.map_or(0, |e| i64::try_from(e.as_micros()).unwrap_or(i64::MAX));
        self.ticketed(facts, out, us).await
    }

    /// The decision for a `public` route: no key, the per-address limit
    /// `gateway.public_rate_limit`; audited and counted like every other decision.
    pub async fn decide_public(&self, facts: &RequestFacts<'_>) -> Decided<RateDecision> {
        let rl = self.config.gateway.public_rate_limit;
        let who = facts
            .ip
            .map_or_else(|| "unknown".to_owned(), |i| i.to_string());
        let d = self
            .counters
            .check_named(&format!("ip:{who}"), &rl, facts.now_ms);
        let out = if d.allowed {
            Ok(d)
        } else {
            Err(Denied {
                code: Code::RateLimited,
                rate: Some(d),
                key: None,
            })
        };
        self.ticketed(facts, out, 0).await
    }

    /// Appends the decision's audit line and hands back the ticket for it. Fail closed: an
    /// answer the audit log cannot account for is not given, and what it was charged goes
    /// back.
    async fn ticketed<T: Charged>(
        &self,
        facts: &RequestFacts<'_>,
        out: Result<T, Denied>,
        latency_us: i64,
    ) -> Decided<T> {
        match self.append_decision(facts, Verdict::of(&out), latency_us) {
            Ok(group) => Decided {
                out,
                ticket: Ticket(group),
            },
            Err(e) => {
                tracing::error!("audit log write failed, refusing the request: {e}");
                if let Some(a) = out.as_ref().ok().and_then(Charged::allowed) {
                    self.refund(a).await;
                }
                Decided {
                    out: Err(Denied::code(Code::Unavailable)),
                    ticket: Ticket(None),
                }
            }
        }
    }

    /// Waits until the decision's audit line is written, or, given the connection the answer
    /// goes out on (forward-auth: a [`Holder`]), leaves the answer held there until it
    /// is. Then counts the decision. A line that could not be written turns the answer into
    /// `UNAVAILABLE` and gives the charge back.
    pub async fn settle<T: Charged>(
        &self,
        decided: Decided<T>,
        conn: Option<&dyn Holder>,
    ) -> Result<T, Denied> {
        let Decided { mut out, ticket } = decided;
        if let (Some(group), Some(log)) = (ticket.0, &self.audit) {
            let refund = || out.as_ref().ok().and_then(Charged::allowed).cloned();
            let written = match conn.map(|c| c.hold(group, &refund)) {
                Some(Hold::Held) => Ok(()),
                Some(Hold::Written) => log.flush(group),
                Some(Hold::NotHere) | None => log.commit(group).await,
            };
            if let Err(e) = written {
                tracing::error!("audit log write failed, refusing the request: {e}");
                if let Some(a) = out.as_ref().ok().and_then(Charged::allowed) {
                    self.refund(a).await;
                }
                out = Err(Denied::code(Code::Unavailable));
            }
        }
        match &out {
            Ok(_) => self.metrics.decided(Code::Valid),
            Err(d) => {
                self.metrics.decided(d.code);
                if d.code == Code::Unavailable && self.shared.is_some() {
                    self.metrics.redis_errors.increment(1);
                }
            }
        }
        out
    }

    /// [`Engine::decide`], then [`Engine::settle`] without a connection to hold the answer on:
    /// returns once the decision's audit line is written.
    pub async fn authorize(
        &self,
        credential: Result<Option<&str>, Code>,
        facts: &RequestFacts<'_>,
        visible_tenant: Option<&TenantId>,
    ) -> Result<Allowed, Denied> {
        let decided = self.decide(credential, facts, visible_tenant).await;
        self.settle(decided, None).await
    }

    /// Gives an allowed request's credits back to the meter that charged it, and only what
    /// that meter drew (the request was never served).
    pub async fn refund(&self, allowed: &Allowed) {
        let (key, cost) = (&allowed.key, allowed.charge.cost);
        match (&self.shared, allowed.shared_meter) {
            (Some(s), true) => {
                s.refund(
                    &key.record.family_id,
                    &key.record.tenant_id,
                    cost,
                    &allowed.metered,
                )
                .await
            }
            _ => self.counters.refund(&key.counters, cost, &allowed.metered),
        }
    }

    /// Appends the `request.decided` event of one decision to the audit log, in a group with
    /// the other requests ready at the same time (see [`keygate_audit::AuditLog::append`]).
    /// Returns the group to wait for, or `None` when nothing was written (audit off, or a
    /// refusal past its bound).
    fn append_decision(
        &self,
        facts: &RequestFacts<'_>,
        verdict: Verdict<'_>,
        latency_us: i64,
    ) -> std::io::Result<Option<u64>> {
        let Some(log) = &self.audit else {
            return Ok(None);
        };
        let Verdict { key, code, credits } = verdict;
        let allowed = code == Code::Valid;
        let rec = key.map(|k| &k.record);
        // Anyone can send refusals: without a key, or with a publishable key from a web page.
        // Past a bound a minute (per client network without a known key, per key with one)
        // they are counted, not logged one by one. Every allowed request is logged.
        let bound = match (allowed, rec) {
            (true, _) => None,
            (false, Some(r)) => Some((
                format!("audit-refused:{}", r.id),
                self.config.audit.refusals_per_key_per_minute,
            )),
            // No address (a verify-API caller who sent none): that caller is authenticated.
            (false, None) => facts.ip.map(|ip| {
                (
                    format!("audit-keyless:{}", crate::login::network_of(ip)),
                    self.config.audit.keyless_per_ip_per_minute,
                )
            }),
        };
        if let Some((bucket, limit)) = bound.filter(|(_, l)| *l > 0) {
            let rl = keygate_core::RateLimit {
                limit,
                window_seconds: 60,
            };
            if !self
                .counters
                .check_named(&bucket, &rl, facts.now_ms)
                .allowed
            {
                self.metrics.audit_refusals_dropped.increment(1);
                return Ok(None);
            }
        }
        let group = crate::request_id::RequestId::with_current(|rid| {
            log.append(keygate_audit::Line {
                at_ms: facts.now_ms,
                tenant_id: rec.map(|r| r.tenant_id.as_str()),
                actor: rec.map_or("anonymous", |r| r.id.as_str()),
                action: "request.decided",
                key_id: rec.map(|r| r.id.as_str()),
                user_id: rec.and_then(|r| r.user_id.as_deref()),
                kind: rec.map(|r| r.kind.as_str()),
                code: Some(code.as_str()),
                status: Some(i64::from(code.status())),
                // Every field a client chooses is bounded (a 100 KB Origin must not become a
                // 100 KB event).
                method: Some(bounded(facts.method, 32)),
                path: facts.path.map(|p| bounded(p, MAX_AUDIT_PATH)),
                scope: facts.scope.map(|s| bounded(s, 256)),
                ip: facts.ip,
                origin: facts.origin.map(|o| bounded(o, 256)),
                credits: Some(i64::try_from(credits).unwrap_or(i64::MAX)),
                latency_us: Some(latency_us),
                request_id: rid,
                ..keygate_audit::Line::default()
            })
        })?;
        Ok(Some(group))
    }

    /// Appends a lifecycle event (`key.created`, …) to the audit log and, for the event types
    /// webhooks carry, queues it for the tenant's endpoints. The change has happened already,
    /// so a failed write is logged, not undone.
    pub async fn record_change(&self, c: Change<'_>) {
        if crate::webhooks::EVENT_TYPES.contains(&c.action) {
            let mut data = serde_json::json!({"tenant_id": c.tenant_id, "actor": c.actor});
            if let Some(k) = c.key_id {
                data["key_id"] = k.as_str().into();
            }
            if let Some(u) = c.user_id {
                data["user_id"] = u.as_str().into();
            }
            data["detail"] = c.detail.clone();
            if let Err(e) = self.emit(c.tenant_id, c.action, data, None).await {
                tracing::error!("could not queue webhooks for {}: {e}", c.action);
            }
        }
        self.audit_change(c);
    }

    /// Appends a lifecycle event to the audit log only (no webhook).
    pub fn audit_change(&self, c: Change<'_>) {
        let Some(log) = &self.audit else { return };
        let detail = c.detail.to_string();
        let r = crate::request_id::RequestId::with_current(|rid| {
            log.record(keygate_audit::Line {
                at_ms: now_ms(),
                tenant_id: Some(c.tenant_id.as_str()),
                actor: c.actor,
                action: c.action,
                key_id: c.key_id.map(KeyId::as_str),
                user_id: c.user_id.map(UserId::as_str),
                request_id: rid,
                detail: Some(&detail),
                ..keygate_audit::Line::default()
            })
        });
        if let Err(e) = r {
            tracing::error!("audit log write failed for {}: {e}", c.action);
        }
    }

    /// Notes a use of `key`; at most one queue entry per key per flush interval.
    fn touch(&self, key: &Arc<CachedKey>, now_ms: i64) {
        if key.token {
            return;
        }
        key.last_used.fetch_max(now_ms, Ordering::Relaxed);
        if !key.touch_pending.swap(true, Ordering::AcqRel)
            && self.touch_tx.try_send(key.clone()).is_err()
        {
            key.touch_pending.store(false, Ordering::Release);
        }
    }
}

static FALLBACK_PLAN: PlanConfig = PlanConfig {
    rate_limit: None,
    api_access: true,
    features: None,
    credits: None,
    scopes: None,
    monthly_credits: None,
    days: None,
    then: None,
    max_keys: None,
    max_budget: None,
    max_ttl_days: None,
};

/// Writes last-used timestamps in batches, every `every`, until the channel closes; then
/// writes what is left.
pub async fn run_touch_flusher(
    store: Arc<dyn Store>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Arc<CachedKey>>>>,
    every: Duration,
) {
    let mut rx = rx.lock().await;
    let mut batch: Vec<Arc<CachedKey>> = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(k) => {
                    batch.push(k);
                    if batch.len() >= 1_000 {
                        flush_touches(&*store, &mut batch).await;
                    }
                }
                None => {
                    flush_touches(&*store, &mut batch).await;
                    return;
                }
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    flush_touches(&*store, &mut batch).await;
                }
            }
        }
    }
}

async fn flush_touches(store: &dyn Store, batch: &mut Vec<Arc<CachedKey>>) {
    let rows: Vec<(KeyId, i64)> = batch
        .iter()
        .map(|k| {
            k.touch_pending.store(false, Ordering::Release);
            (k.record.id.clone(), k.last_used.load(Ordering::Relaxed))
        })
        .collect();
    if let Err(e) = store.touch_keys(&rows).await {
        tracing::warn!("could not record last use of {} keys: {e}", rows.len());
    }
    batch.clear();
}

/// The longest path an audit event keeps, bytes.
pub const MAX_AUDIT_PATH: usize = 1024;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<KeyHash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(KeyHash(out))
}

/// Follows the store's change feed (PostgreSQL LISTEN/NOTIFY) so that a revoke, rotation,
/// update or top-up on any node reaches this node's cache at once. When the feed drops, every
/// cached key is dropped (changes may have been missed) and the CORS index is rebuilt.
pub async fn run_change_listener(state: Arc<Engine>) {
    loop {
        let mut feed = match state.store.subscribe().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                if state.feed_ok.swap(false, Ordering::AcqRel) {
                    tracing::warn!(
                        "change feed unavailable ({e}); cached keys are re-read after {}s",
                        state.config.cache.unsynced_ttl_seconds
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !state.feed_ok.load(Ordering::Acquire) {
            resync(&state).await;
        }
        loop {
            match feed.next().await {
                Ok(Some(message)) => {
                    if !state.feed_ok.load(Ordering::Acquire) {
                        // The feed reconnected by itself after a drop.
                        resync(&state).await;
                    }
                    let (from, change) = message.split_once('|').unwrap_or(("", &message));
                    if from == state.node_id {
                        continue;
                    }
                    if change == "cors" {
                        crate::origins::refresh_after_change(&state, Kind::Pk).await;
                    } else {
                        state.apply_change(change);
                    }
                }
                Ok(None) => {
                    tracing::warn!("change feed dropped; reconnecting");
                    state.feed_ok.store(false, Ordering::Release);
                    state.metrics.change_feed_up.set(0.0);
                }
                Err(e) => {
                    tracing::warn!("change feed failed: {e}");
                    state.feed_ok.store(false, Ordering::Release);
                    state.metrics.change_feed_up.set(0.0);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

/// Back after a gap in the feed: whatever changed meanwhile is unknown, so start afresh.
async fn resync(state: &Engine) {
    state.invalidate_all();
    crate::origins::refresh_after_change(state, Kind::Pk).await;
    state.feed_ok.store(true, Ordering::Release);
    state.metrics.change_feed_up.set(1.0);
    tracing::info!("change feed restored");
}

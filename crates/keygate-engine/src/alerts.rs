//! Alerts: budget at 80 % and 100 %, tenant credits low, keys about to expire, and unusual
//! activity (a burst of refusals for one key, a request rate far above the key's own last hour,
//! first use from a new network or origin). Each alert is a row in `alerts` (one per incident:
//! its `dedupe` value is unique across nodes), an audit event and a webhook.
//!
//! The rules read a summary of each batch of audit events the shipper moves to the store (its
//! decided requests counted by key, minute, code and place), so they cost the hot path
//! nothing and the shipper one pass over fields it reads anyway; a node judges the events it
//! served (refusal bursts and rate spikes are
//! per node), while budgets, credits and sightings are read from the shared store.

use crate::clock::now_ms;
use crate::engine::Engine;
use keygate_core::{Code, KeyId, Kind, TenantId};
use keygate_store::{Alert, RawEvent, UsageOf};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Refusal codes that point at someone probing a key.
const PROBING: &[Code] = &[
    Code::OriginNotAllowed,
    Code::IpNotAllowed,
    Code::ForbiddenScope,
];

/// Decided requests of one batch with the same key, tenant, code, minute and place: what the
/// rules need of the events, counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Key.
    pub key: KeyId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Decision code.
    pub code: Code,
    /// The minute (Unix ms) they fall in.
    pub minute: i64,
    /// The first one's time (Unix ms): when a place was first seen.
    pub first_ms: i64,
    /// How many.
    pub requests: u32,
    /// Credits they drew.
    pub credits: i64,
    /// Client IP, for keys that are not publishable (publishable keys live in browsers, on
    /// every network and, within their list, origin: a new place is no news for them, and
    /// anyone could flood the rule with one).
    pub ip: Option<String>,
    /// `Origin`, likewise (up to 255 bytes).
    pub origin: Option<String>,
}

/// The batch's decided requests, counted (in the order their groups first appear).
pub fn summarize(events: &[&RawEvent<'_>]) -> Vec<Seen> {
    type Group<'a> = (
        &'a str,
        &'a str,
        Code,
        i64,
        Option<&'a str>,
        Option<&'a str>,
    );
    let mut index: HashMap<Group<'_>, usize> = HashMap::new();
    let mut out: Vec<Seen> = Vec::new();
    let mut last: Option<(Group<'_>, usize)> = None;
    for e in events {
        let h = &e.head;
        if h.action != "request.decided" {
            continue;
        }
        let (Some(key), Some(tenant), Some(code)) = (
            &h.key_id,
            &h.tenant_id,
            h.code.as_deref().and_then(Code::parse),
        ) else {
            continue;
        };
        let minute = h.at_ms - h.at_ms.rem_euclid(60_000);
        let (ip, origin) = if matches!(h.kind.as_deref().map(Kind::parse), Some(Ok(Kind::Pk))) {
            (None, None)
        } else {
            (
                h.ip.as_deref(),
                h.origin.as_deref().filter(|o| o.len() <= 255),
            )
        };
        let group = (&**key, &**tenant, code, minute, ip, origin);
        // One key's traffic repeats the group of the event before: no hashing then.
        let i = match last {
            Some((g, i)) if g == group => i,
            _ => *index.entry(group).or_insert_with(|| {
                out.push(Seen {
                    key: KeyId::from(&**key),
                    tenant: TenantId::from(&**tenant),
                    code,
                    minute,
                    first_ms: h.at_ms,
                    requests: 0,
                    credits: 0,
                    ip: ip.map(str::to_owned),
                    origin: origin.map(str::to_owned),
                });
                out.len() - 1
            }),
        };
        last = Some((group, i));
        let s = &mut out[i];
        s.requests = s.requests.saturating_add(1);
        s.credits = s.credits.saturating_add(h.credits.unwrap_or(0).max(0));
        s.first_ms = s.first_ms.min(h.at_ms);
    }
    out
}

/// Whether a count going from `before` to `after` reaches `floor` or one of its doublings.
fn crosses(before: u32, after: u32, floor: u32) -> bool {
    let mut m = floor;
    while m <= after {
        if m > before {
            return true;
        }
        match m.checked_mul(2) {
            Some(next) => m = next,
            None => return false,
        }
    }
    false
}

#[derive(Default)]
struct Rules {
    /// Refusals per (key, minute).
    refusals: HashMap<(u64, i64), u32>,
    /// Decisions per (key, minute), for rate spikes.
    requests: HashMap<(u64, i64), u32>,
    /// (key, kind, place) already noted in the store.
    seen: HashSet<u64>,
}

/// A hash standing for a key (and a place): the rules run over every shipped event, so they
/// count by hash instead of copying strings (a collision would only merge two counts).
fn slot(parts: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The /24 (IPv4) or /48 (IPv6) of an address.
fn network(ip: &str) -> Option<String> {
    match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            Some(format!("{}.{}.{}.0/24", o[0], o[1], o[2]))
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
        }
    }
}

/// Records an alert unless the incident has one already; a new one becomes an audit event and
/// a webhook.
pub async fn raise(
    state: &Engine,
    kind: &str,
    tenant_id: &TenantId,
    key_id: Option<&KeyId>,
    dedupe: String,
    message: String,
    mut data: serde_json::Value,
) {
    let now = now_ms();
    data["message"] = message.clone().into();
    let alert = Alert {
        id: crate::ids::new_id("alr", now),
        tenant_id: tenant_id.to_string(),
        key_id: key_id.map(KeyId::to_string),
        kind: kind.to_owned(),
        dedupe,
        message,
        data: data.to_string(),
        at_ms: now,
    };
    match state.store.insert_alert(&alert).await {
        Ok(true) => {
            data["alert_id"] = alert.id.clone().into();
            state
                .record_change(crate::engine::Change {
                    actor: "system",
                    action: kind,
                    tenant_id,
                    key_id,
                    user_id: None,
                    detail: &data,
                })
                .await;
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("could not record an alert ({kind}): {e}"),
    }
}

impl Rules {
    async fn observe(&mut self, state: &Engine, seen: &[Seen]) {
        let cfg = &state.config.alerts;
        let mut budget_keys: HashSet<&KeyId> = HashSet::new();
        let mut tenants: HashSet<&TenantId> = HashSet::new();
        let mut spikes: Vec<(&KeyId, &TenantId, i64, u32)> = Vec::new();
        let mut exhausted: Vec<(&KeyId, &TenantId)> = Vec::new();
        for s in seen {
            let (key, tenant, code, minute) = (&s.key, &s.tenant, s.code, s.minute);
            if PROBING.contains(&code) && cfg.refusal_burst > 0 {
                let n = self.refusals.entry((slot(key), minute)).or_default();
                let before = *n;
                *n = n.saturating_add(s.requests);
                if before < cfg.refusal_burst && *n >= cfg.refusal_burst {
                    raise(
                        state,
                        "alert.unusual_activity",
                        tenant,
                        Some(key),
                        format!("refusals:{key}:{}", minute / 3_600_000),
                        format!("{n} refused requests (wrong origin, IP or scope) for {key} within a minute"),
                        serde_json::json!({"rule": "refusal_burst", "key_id": key, "refusals": n, "last_code": code}),
                    )
                    .await;
                }
            }
            if code == Code::BudgetExhausted {
                // Raised after the warnings below: a batch can cross both thresholds.
                exhausted.push((key, tenant));
                if cfg.budget_warning_percent > 0 {
                    budget_keys.insert(key);
                }
            }
            if code == Code::InsufficientCredits {
                tenants.insert(tenant);
            }
            if code != Code::Valid {
                continue;
            }
            if s.credits > 0 {
                if cfg.budget_warning_percent > 0 {
                    budget_keys.insert(key);
                }
                tenants.insert(tenant);
            }
            let n = self.requests.entry((slot(key), minute)).or_default();
            let before = *n;
            *n = n.saturating_add(s.requests);
            // Look at the rate when a minute's count reaches the floor, and at each doubling.
            if cfg.spike_min_requests > 0
                && cfg.spike_factor > 0.0
                && crosses(before, *n, cfg.spike_min_requests)
            {
                spikes.push((key, tenant, minute, *n));
            }
            let places = [
                (
                    "network",
                    cfg.new_network
                        .then(|| s.ip.as_deref().and_then(network))
                        .flatten(),
                ),
                ("origin", cfg.new_origin.then(|| s.origin.clone()).flatten()),
            ];
            for (kind, place) in places {
                let Some(place) = place else {
                    continue;
                };
                if self.seen.len() > 100_000 {
                    self.seen.clear();
                }
                if !self.seen.insert(slot((key, kind, &place))) {
                    continue;
                }
                match state
                    .store
                    .note_sighting(key, kind, &place, s.first_ms)
                    .await
                {
                    Ok(Some(true)) => {
                        raise(
                            state,
                            "alert.unusual_activity",
                            tenant,
                            Some(key),
                            format!("new_{kind}:{key}:{place}"),
                            format!("{key} was used from a new {kind}: {place}"),
                            serde_json::json!({"rule": format!("new_{kind}"), "key_id": key, kind: place}),
                        )
                        .await;
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!("could not note where a key was used: {err}"),
                }
            }
        }
        for (key, tenant, minute, n) in spikes {
            let before = state
                .store
                .usage(
                    &UsageOf::Key(key.clone()),
                    60_000,
                    minute - 3_600_000,
                    minute,
                )
                .await
                .map(|rows| rows.iter().map(|r| r.requests).sum::<u64>())
                .unwrap_or(u64::MAX);
            let per_minute = before as f64 / 60.0;
            if f64::from(n) > cfg.spike_factor * per_minute.max(1.0) {
                raise(
                    state,
                    "alert.unusual_activity",
                    tenant,
                    Some(key),
                    format!("spike:{key}:{}", minute / 3_600_000),
                    format!("{key} made {n} requests in a minute; its last hour averaged {per_minute:.1} a minute"),
                    serde_json::json!({"rule": "rate_spike", "key_id": key, "requests": n, "baseline_per_minute": per_minute}),
                )
                .await;
            }
        }
        for key in budget_keys {
            let Ok(Some(k)) = state.store.get_key(key).await else {
                continue;
            };
            let Some(budget) = k.budget.filter(|b| *b > 0) else {
                continue;
            };
            let pct = u128::from(k.budget_withdrawn) * 100 / u128::from(budget);
            // At or past the threshold, 100 % included: a batch that takes a key from below
            // the warning to a spent budget crosses both, and each is raised (once: the
            // dedupe value is per rotation family).
            if pct >= u128::from(cfg.budget_warning_percent) {
                raise(
                    state,
                    "key.budget_warning",
                    &k.tenant_id,
                    Some(&k.id),
                    format!("budget{}:{}", cfg.budget_warning_percent, k.family_id),
                    format!(
                        "{} has drawn {pct} % of its budget of {budget} credits",
                        k.id
                    ),
                    serde_json::json!({"key_id": k.id, "percent": pct as u64, "budget": budget}),
                )
                .await;
            }
        }
        for (key, tenant) in exhausted {
            raise(
                state,
                "key.budget_exhausted",
                tenant,
                Some(key),
                format!("budget100:{key}"),
                format!("the budget of {key} is spent"),
                serde_json::json!({"key_id": key, "percent": 100}),
            )
            .await;
        }
        if cfg.tenant_credits_low > 0 {
            for t in tenants {
                let Ok(Some(tenant)) = state.store.get_tenant(t).await else {
                    continue;
                };
                if let Some(c) = tenant.credits.filter(|c| *c < cfg.tenant_credits_low) {
                    raise(
                        state,
                        "tenant.credits_low",
                        t,
                        None,
                        format!("credits_low:{t}:{}", now_ms() / 86_400_000),
                        format!("tenant {t} has {c} credits left"),
                        serde_json::json!({"credits": c, "threshold": cfg.tenant_credits_low}),
                    )
                    .await;
                }
            }
        }
        let horizon = now_ms() - 120_000;
        self.refusals.retain(|(_, m), _| *m >= horizon);
        self.requests.retain(|(_, m), _| *m >= horizon);
    }
}

/// Warns about keys that expire within `alerts.expiring_within_days` (once per key and expiry).
pub async fn check_expiring(state: &Engine) {
    let days = state.config.alerts.expiring_within_days;
    if days == 0 {
        return;
    }
    let now = now_ms();
    let until = now.saturating_add(i64::try_from(days).unwrap_or(3650) * 86_400_000);
    let keys = match state.store.keys_expiring(now, until).await {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("could not look for expiring keys: {e}");
            return;
        }
    };
    for k in keys {
        let Some(at) = k.expires_at_ms else { continue };
        raise(
            state,
            "key.expiring",
            &k.tenant_id,
            Some(&k.id),
            format!("expiring:{}:{at}", k.id),
            format!("{} expires at {}", k.id, crate::clock::rfc3339(at)),
            serde_json::json!({"key_id": k.id, "expires_at": crate::clock::rfc3339(at)}),
        )
        .await;
    }
}

/// The alert task's name under supervision (`crate::supervisor`).
pub const ALERTS_TASK: &str = "alerts";

/// Judges shipped audit events as they come, and looks for expiring keys every hour.
/// `events` is shared so that a restarted task (see `crate::supervisor`) reads on where the
/// last one stopped.
pub async fn run_alerts(
    state: std::sync::Arc<Engine>,
    events: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<Seen>>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut events = events.lock().await;
    let mut rules = Rules::default();
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    let mut open = true; // without an audit log there are no batches, only the hourly check
    loop {
        crate::supervisor::checkpoint(ALERTS_TASK);
        tokio::select! {
            batch = events.recv(), if open => match batch {
                Some(b) => rules.observe(&state, &b).await,
                None => open = false,
            },
            _ = hourly.tick() => check_expiring(&state).await,
            _ = stop.changed() => return,
        }
    }
}

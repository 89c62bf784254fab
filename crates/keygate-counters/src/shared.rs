//! Counters shared by every node, in Redis.
//!
//! One Lua script per decision checks and charges, atomically and in one round trip, the key
//! family's rate window and the credits leased to Redis for the family's budget and the
//! tenant's pool. All three keys carry the tenant as hash tag (`kg:{tenant}:…`), so the script
//! runs unchanged on Redis Cluster.
//!
//! Money: PostgreSQL stays the source of truth. Credits move from the store into Redis in
//! leases (the same conditional UPDATE as the in-process counters) and are spent from Redis by
//! every node, so a budget of N grants exactly N across any number of nodes. If Redis loses its
//! data (a restart without persistence), the credits it held are lost: an under-grant of at
//! most one lease per family and tenant, never an over-grant. While Redis is down, calls that
//! cost credits are refused with `UNAVAILABLE` (fail closed); free calls fall back to
//! this node's in-process rate windows.

use crate::{Metered, Refused};
use keygate_core::{Charge, Code, RateLimit, WindowState};
use keygate_store::{Store, Withdrawal};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Largest lease moved from the store into Redis at once.
const MAX_LEASE: u64 = 1_000;

const METER: &str = r#"
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local w = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local has_budget = ARGV[5] == '1'
local pool_unlimited = ARGV[6] == '1'
local s, p, c = 0, 0, 0
if limit > 0 then
  local st = redis.call('HMGET', KEYS[1], 's', 'p', 'c')
  s = tonumber(st[1]) or 0
  p = tonumber(st[2]) or 0
  c = tonumber(st[3]) or 0
  local start = now - (now % w)
  if start ~= s then
    if start - s == w then p = c else p = 0 end
    c = 0
    s = start
  end
  local est = p * ((w - (now - s)) / w) + c
  if est + 1 > limit then
    redis.call('HSET', KEYS[1], 's', s, 'p', p, 'c', c)
    redis.call('PEXPIRE', KEYS[1], 2 * w)
    return {1, s, p, c, 0, 0}
  end
end
local b, q = 0, 0
if cost > 0 then
  if has_budget then
    b = tonumber(redis.call('GET', KEYS[2]) or '0')
    if b < cost then return {2, s, p, c, b, 0} end
  end
  if not pool_unlimited then
    q = tonumber(redis.call('GET', KEYS[3]) or '0')
    if q < cost then return {3, s, p, c, b, q} end
  end
  if has_budget then b = redis.call('DECRBY', KEYS[2], cost) end
  if not pool_unlimited then q = redis.call('DECRBY', KEYS[3], cost) end
end
if limit > 0 then
  redis.call('HSET', KEYS[1], 's', s, 'p', p, 'c', c + 1)
  redis.call('PEXPIRE', KEYS[1], 2 * w)
end
return {0, s, p, c, b, q}
"#;

/// Counters in Redis, with the store behind them for money.
pub struct SharedCounters {
    redis: ConnectionManager,
    store: Arc<dyn Store>,
    prefix: String,
    script: redis::Script,
    unlimited: RwLock<HashSet<String>>,
    refills: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounters")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why a Redis call failed (for the log and `/v1/status`).
#[derive(Debug)]
pub struct SharedError(pub String);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl SharedCounters {
    /// Connects to `url` (`redis://127.0.0.1:6379`). Keys start with `prefix` (`kg`).
    pub async fn connect(
        url: &str,
        prefix: &str,
        store: Arc<dyn Store>,
    ) -> Result<Self, SharedError> {
        let client = redis::Client::open(url).map_err(|e| SharedError(e.to_string()))?;
        let cfg = ConnectionManagerConfig::new()
            // A decision must not hang on a dead Redis: fail fast, the policy decides.
            .set_connection_timeout(Duration::from_millis(300))
            .set_response_timeout(Duration::from_millis(300))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| SharedError(e.to_string()))?;
        Ok(Self {
            redis,
            store,
            prefix: prefix.to_owned(),
            script: redis::Script::new(METER),
            unlimited: RwLock::default(),
            refills: std::sync::Mutex::default(),
        })
    }

    fn keys(&self, family_id: &str, tenant_id: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}:{{{tenant_id}}}:w:{family_id}"),
            format!("{p}:{{{tenant_id}}}:b:{family_id}"),
            format!("{p}:{{{tenant_id}}}:p"),
        ]
    }

    fn refill_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.refills.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Bound the map; dropping idle locks is harmless (they only pace refills).
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(key.to_owned()).or_default().clone()
    }

    fn pool_unlimited(&self, tenant_id: &str) -> bool {
        self.unlimited
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant_id)
    }

    /// Forgets that a tenant's pool was unlimited (after a plan change).
    pub fn pool_changed(&self, tenant_id: &str) {
        self.unlimited
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant_id);
    }

    /// Rate limit, key budget, tenant credits, for every node at once. `Err` with
    /// `UNAVAILABLE` when Redis cannot be reached and money is involved; `Ok(None)` when
    /// Redis cannot be reached but the call is free (the caller then limits locally).
    pub async fn meter(
        &self,
        family_id: &str,
        tenant_id: &str,
        charge: &Charge,
        now_ms: i64,
    ) -> Result<Option<Metered>, Refused> {
        let [wk, bk, pk] = self.keys(family_id, tenant_id);
        let (limit, window_ms) = charge.rate_limit.map_or((0, 1000), |r| {
            (i64::from(r.limit), i64::from(r.window_seconds) * 1000)
        });
        let free = charge.cost == 0 || (charge.budget.is_none() && self.pool_unlimited(tenant_id));
        // At most a few rounds: each refill moves credits from the store into Redis.
        for _ in 0..6 {
            let mut con = self.redis.clone();
            let reply: Result<Vec<i64>, _> = self
                .script
                .key(&wk)
                .key(&bk)
                .key(&pk)
                .arg(now_ms)
                .arg(limit)
                .arg(window_ms)
                .arg(charge.cost)
                .arg(if charge.budget.is_some() { 1 } else { 0 })
                .arg(if self.pool_unlimited(tenant_id) { 1 } else { 0 })
                .invoke_async(&mut con)
                .await;
            let v = match reply {
                Ok(v) if v.len() == 6 => v,
                Ok(_) | Err(_) => {
                    if let Err(e) = &reply {
                        tracing::warn!("redis counters unavailable: {e}");
                    }
                    return if free {
                        Ok(None)
                    } else {
                        Err(Refused {
                            code: Code::Unavailable,
                            rate: None,
                        })
                    };
                }
            };
            let rate = charge
                .rate_limit
                .map(|rl| decision(rl, v[1], v[2], v[3], now_ms));
            match v[0] {
                0 => {
                    return Ok(Some(Metered {
                        rate,
                        budget_remaining: charge.budget.map(|_| u64::try_from(v[4]).unwrap_or(0)),
                        credits_remaining: if self.pool_unlimited(tenant_id) || charge.cost == 0 {
                            None
                        } else {
                            Some(u64::try_from(v[5]).unwrap_or(0))
                        },
                    }))
                }
                1 => {
                    return Err(Refused {
                        code: Code::RateLimited,
                        rate,
                    })
                }
                2 => {
                    // One refill per family at a time on this node: concurrent requests wait
                    // for it instead of each moving a lease (which a Redis failure would lose).
                    let lock = self.refill_lock(&bk);
                    let _refill = lock.lock().await;
                    if self.get_u64(&bk).await >= charge.cost {
                        continue;
                    }
                    let cap = charge.budget.unwrap_or(0);
                    let want = charge.cost.max((cap / 50).min(MAX_LEASE));
                    let g = self
                        .store
                        .withdraw_budget(family_id, want)
                        .await
                        .map_err(|_| Refused {
                            code: Code::Unavailable,
                            rate,
                        })?;
                    if g.granted == 0 {
                        return Err(Refused {
                            code: Code::BudgetExhausted,
                            rate,
                        });
                    }
                    self.deposit(&bk, g.granted, family_id, true)
                        .await
                        .map_err(|code| Refused { code, rate })?;
                }
                _ => {
                    let lock = self.refill_lock(&pk);
                    let _refill = lock.lock().await;
                    if self.get_u64(&pk).await >= charge.cost {
                        continue;
                    }
                    let want = charge.cost.max(MAX_LEASE / 10);
                    match self.store.withdraw_credits(tenant_id, want).await {
                        Err(_) => {
                            return Err(Refused {
                                code: Code::Unavailable,
                                rate,
                            })
                        }
                        Ok(Withdrawal::Unlimited) => {
                            self.unlimited
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(tenant_id.to_owned());
                        }
                        Ok(Withdrawal::Granted(g)) if g.granted == 0 => {
                            return Err(Refused {
                                code: Code::InsufficientCredits,
                                rate,
                            })
                        }
                        Ok(Withdrawal::Granted(g)) => {
                            self.deposit(&pk, g.granted, tenant_id, false)
                                .await
                                .map_err(|code| Refused { code, rate })?;
                        }
                    }
                }
            }
        }
        Err(Refused {
            code: Code::Unavailable,
            rate: None,
        })
    }

    /// Puts credits withdrawn from the store into Redis; if Redis fails, gives them back.
    async fn deposit(&self, key: &str, amount: u64, owner: &str, budget: bool) -> Result<(), Code> {
        let mut con = self.redis.clone();
        let r: Result<i64, _> = redis::cmd("INCRBY")
            .arg(key)
            .arg(amount)
            .query_async(&mut con)
            .await;
        if let Err(e) = r {
            // The INCRBY may or may not have been applied (a timeout after Redis did it): giving
            // the credits back to the store could grant them twice, so they are written off —
            // an under-grant of at most one lease.
            let what = if budget { "budget" } else { "pool" };
            tracing::warn!("lease of {amount} credits for {what} {owner} may be lost: {e}");
            return Err(Code::Unavailable);
        }
        Ok(())
    }

    /// Gives an allowed charge's money back (the gateway could not reach the upstream).
    /// Only what `metered` (this meter's own answer) says was charged is given back.
    pub async fn refund(&self, family_id: &str, tenant_id: &str, cost: u64, metered: &Metered) {
        if cost == 0 {
            return;
        }
        let [_, bk, pk] = self.keys(family_id, tenant_id);
        let mut con = self.redis.clone();
        let mut pipe = redis::pipe();
        if metered.budget_remaining.is_some() {
            pipe.cmd("INCRBY").arg(&bk).arg(cost).ignore();
        }
        if metered.credits_remaining.is_some() {
            pipe.cmd("INCRBY").arg(&pk).arg(cost).ignore();
        }
        let r: Result<(), _> = pipe.query_async(&mut con).await;
        if let Err(e) = r {
            tracing::warn!("could not refund {cost} credits in redis: {e}");
        }
    }

    /// Moves a family's Redis lease back to the store (before its budget changes).
    pub async fn release_budget(
        &self,
        family_id: &str,
        tenant_id: &str,
    ) -> Result<(), SharedError> {
        let [_, bk, _] = self.keys(family_id, tenant_id);
        let mut con = self.redis.clone();
        let left: Option<i64> = redis::cmd("GETDEL")
            .arg(&bk)
            .query_async(&mut con)
            .await
            .map_err(|e| SharedError(e.to_string()))?;
        if let Some(n) = left.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0) {
            self.store
                .refund_budget(family_id, n)
                .await
                .map_err(|e| SharedError(e.to_string()))?;
        }
        Ok(())
    }

    /// Credits of a family's budget leased into Redis and not yet spent.
    pub async fn budget_leased(&self, family_id: &str, tenant_id: &str) -> u64 {
        let [_, bk, _] = self.keys(family_id, tenant_id);
        self.get_u64(&bk).await
    }

    /// Credits of a tenant's pool leased into Redis and not yet spent.
    pub async fn credits_leased(&self, tenant_id: &str) -> u64 {
        let [_, _, pk] = self.keys("-", tenant_id);
        self.get_u64(&pk).await
    }

    async fn get_u64(&self, key: &str) -> u64 {
        let mut con = self.redis.clone();
        let v: Result<Option<i64>, _> = redis::cmd("GET").arg(key).query_async(&mut con).await;
        v.ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        let mut con = self.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .is_ok()
    }
}

/// The rate decision for the window state Redis saw before counting this request.
fn decision(rl: RateLimit, s: i64, p: i64, c: i64, now_ms: i64) -> keygate_core::RateDecision {
    let mut ws = WindowState {
        start_ms: s,
        prev: u64::try_from(p).unwrap_or(0),
        curr: u64::try_from(c).unwrap_or(0),
    };
    ws.check(&rl, now_ms, 1)
}

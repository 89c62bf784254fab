//! Counters shared by every node, in Redis.
//!
//! One Lua script checks and charges, atomically, the key family's rate window and the credits
//! leased to Redis for the family's budget and the tenant's pool. Decisions that wait at the
//! same time go out together (a batcher task; up to 4 batches in flight per node): one script
//! call per tenant per batch, which reads each key once and writes it once, so under load one
//! round trip and one script run serve many decisions, and alone a decision goes out at once.
//! All keys carry the tenant as hash tag (`kg:{tenant}:…`) and a call never mixes tenants, so
//! the script runs unchanged on Redis Cluster.
//!
//! Money: PostgreSQL stays the source of truth. Credits move from the store into Redis in
//! leases (the same conditional UPDATE as the in-process counters) and are spent from Redis by
//! every node, so a budget of N grants exactly N across any number of nodes. If Redis loses its
//! data (a restart without persistence), the credits it held are lost: an under-grant of at
//! most one lease per family and tenant, never an over-grant. While Redis is down, calls that
//! cost credits are refused with `UNAVAILABLE` (fail closed); free calls fall back to
//! this node's in-process rate windows.

use crate::{Metered, Refused};
use keygate_core::{Charge, Code, FamilyId, RateLimit, TenantId, WindowState};
use keygate_store::{Store, Withdrawal};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// How long a node shows the store's remainder it learnt before reading it again.
const REMAINDER_TTL: Duration = Duration::from_secs(1);

/// Largest lease moved from the store into Redis at once.
const MAX_LEASE: u64 = 1_000;

/// Most decisions sent to Redis in one script call.
const MAX_BATCH: usize = 128;
/// Batches in flight at once per node (each is one Redis round trip).
const MAX_INFLIGHT: usize = 4;

/// Meters a batch of decisions of one tenant in one call, in order. `KEYS` holds three keys per
/// decision (rate window, family budget, tenant pool); `ARGV` six numbers per decision (now,
/// limit, window ms, cost, has budget, pool unlimited). Returns six numbers per decision:
/// outcome (0 allowed, 1 rate limited, 2 budget lease empty, 3 pool lease empty), the window
/// (start, previous, current) before this decision, and the budget and pool leases after it.
///
/// Each key is read once per batch and written once at the end (a `redis.call` costs more
/// than the arithmetic around it), so a batch of many decisions of one key costs about what
/// one decision does. A window's expiry is set when it rolls over: it lives two windows from
/// its start, as long as it can matter.
const METER: &str = r#"
local out, win, left, spent = {}, {}, {}, {}
local function lease(k)
  local v = left[k]
  if v == nil then
    v = tonumber(redis.call('GET', k) or '0')
    left[k], spent[k] = v, 0
  end
  return v
end
local n = #ARGV / 6
for i = 0, n - 1 do
  local kw, kb, kp = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local now = tonumber(ARGV[6 * i + 1])
  local limit = tonumber(ARGV[6 * i + 2])
  local w = tonumber(ARGV[6 * i + 3])
  local cost = tonumber(ARGV[6 * i + 4])
  local has_budget = ARGV[6 * i + 5] == '1'
  local pool_unlimited = ARGV[6 * i + 6] == '1'
  local r, st = 0, nil
  local s, p, c, b, q = 0, 0, 0, 0, 0
  if limit > 0 then
    st = win[kw]
    if st == nil then
      local h = redis.call('HMGET', kw, 's', 'p', 'c')
      st = {s = tonumber(h[1]) or 0, p = tonumber(h[2]) or 0, c = tonumber(h[3]) or 0}
      win[kw] = st
    end
    -- A call stamped before the current window (a clock behind, a batch out of order) counts
    -- in it: rolling the window back would wipe its count.
    if now < st.s then now = st.s end
    local start = now - (now % w)
    if start ~= st.s then
      if start - st.s == w then st.p = st.c else st.p = 0 end
      st.c, st.s, st.dirty, st.ttl = 0, start, true, 2 * w
    end
    s, p, c = st.s, st.p, st.c
    if p * ((w - (now - s)) / w) + c + 1 > limit then r = 1 end
  end
  if r == 0 and cost > 0 then
    if has_budget then
      b = lease(kb)
      if b < cost then r = 2 end
    end
    if r == 0 and not pool_unlimited then
      q = lease(kp)
      if q < cost then r = 3 end
    end
    if r == 0 then
      if has_budget then b = b - cost; left[kb] = b; spent[kb] = spent[kb] + cost end
      if not pool_unlimited then q = q - cost; left[kp] = q; spent[kp] = spent[kp] + cost end
    end
  end
  if r == 0 and st ~= nil then st.c, st.dirty = st.c + 1, true end
  -- A free call shows the budget lease too.
  if r == 0 and has_budget and cost == 0 then b = lease(kb) end
  local o = 6 * i
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] = r, s, p, c, b, q
end
for k, st in pairs(win) do
  if st.dirty then
    redis.call('HSET', k, 's', st.s, 'p', st.p, 'c', st.c)
    if st.ttl then redis.call('PEXPIRE', k, st.ttl) end
  end
end
for k, d in pairs(spent) do
  if d > 0 then redis.call('DECRBY', k, d) end
end
return out
"#;

/// One decision waiting for its batch.
struct Job {
    tenant_id: TenantId,
    keys: [String; 3],
    args: [i64; 6],
    reply: oneshot::Sender<Result<[i64; 6], String>>,
}

/// Counters in Redis, with the store behind them for money.
pub struct SharedCounters {
    redis: ConnectionManager,
    store: Arc<dyn Store>,
    prefix: String,
    jobs: mpsc::Sender<Job>,
    unlimited: RwLock<HashSet<TenantId>>,
    /// What the store had left of a budget or pool at its last lease, by lease key, and when
    /// this node learnt it: kept for a second (see [`SharedCounters::shown`]).
    remainders: RwLock<HashMap<String, (u64, Instant)>>,
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

/// Whose remainder a figure shows: a family's budget or a tenant's pool.
#[derive(Clone, Copy)]
enum Owner<'a> {
    Budget(&'a FamilyId),
    Pool(&'a TenantId),
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
        let (jobs, rx) = mpsc::channel(16 * 1024);
        tokio::spawn(run_batcher(redis.clone(), rx));
        Ok(Self {
            redis,
            store,
            prefix: prefix.to_owned(),
            jobs,
            unlimited: RwLock::default(),
            remainders: RwLock::default(),
            refills: std::sync::Mutex::default(),
        })
    }

    /// The rate window, budget lease and pool lease of a family.
    fn keys(&self, family_id: &FamilyId, tenant_id: &TenantId) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}:{{{tenant_id}}}:w:{family_id}"),
            format!("{p}:{{{tenant_id}}}:b:{family_id}"),
            self.pool_key(tenant_id),
        ]
    }

    /// The pool lease of a tenant.
    fn pool_key(&self, tenant_id: &TenantId) -> String {
        format!("{}:{{{tenant_id}}}:p", self.prefix)
    }

    /// Where Redis keeps what the store had left of a budget (`…:bs:{family}`) or pool
    /// (`…:ps`) at its last lease, beside the lease key.
    fn remainder_key(lease_key: &str) -> String {
        match lease_key.rsplit_once(":b:") {
            Some((head, fam)) => format!("{head}:bs:{fam}"),
            None => format!("{lease_key}s"),
        }
    }

    fn refill_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.refills.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Bound the map; dropping idle locks is harmless (they only pace refills).
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(key.to_owned()).or_default().clone()
    }

    fn pool_unlimited(&self, tenant_id: &TenantId) -> bool {
        self.unlimited
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant_id)
    }

    /// Forgets what this node knew of a tenant's pool (after a top-up or plan change): that it
    /// was unlimited, and what the store had left of it.
    pub fn pool_changed(&self, tenant_id: &TenantId) {
        self.unlimited
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant_id);
        let pk = self.pool_key(tenant_id);
        self.remainders
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pk);
    }

    /// After this node changed a tenant's pool in the store: drops the remainder Redis keeps
    /// for it, so that no node shows the old one (each reads the store again).
    pub async fn pool_remainder_changed(&self, tenant_id: &TenantId) {
        self.pool_changed(tenant_id);
        let pk = self.pool_key(tenant_id);
        let mut con = self.redis.clone();
        let r: Result<(), _> = redis::cmd("DEL")
            .arg(Self::remainder_key(&pk))
            .query_async(&mut con)
            .await;
        if let Err(e) = r {
            tracing::warn!("could not drop the pool remainder of {tenant_id} in redis: {e}");
        }
    }

    /// A rate window of its own for `name` (sign-ups and password resets per client address),
    /// shared by every node: the same script, at no cost. `Err` when Redis cannot be reached.
    pub async fn check_named(
        &self,
        name: &str,
        rl: &RateLimit,
        now_ms: i64,
    ) -> Result<keygate_core::RateDecision, SharedError> {
        let p = &self.prefix;
        // Its own hash tag, apart from every tenant's keys; the budget and pool keys are never
        // read at cost 0.
        let tag = format!("{p}:{{n:{name}}}");
        let (reply, rx) = oneshot::channel();
        let job = Job {
            tenant_id: TenantId::from(format!("n:{name}")),
            keys: [format!("{tag}:w"), format!("{tag}:b"), format!("{tag}:p")],
            args: [
                now_ms,
                i64::from(rl.limit),
                i64::from(rl.window_seconds) * 1000,
                0,
                0,
                1,
            ],
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| SharedError("batcher stopped".into()))?;
        let v = rx
            .await
            .unwrap_or_else(|_| Err("batch dropped".into()))
            .map_err(SharedError)?;
        Ok(decision(*rl, v[1], v[2], v[3], now_ms))
    }

    /// Rate limit, key budget, tenant credits, for every node at once. `Err` with
    /// `UNAVAILABLE` when Redis cannot be reached and money is involved; `Ok(None)` when
    /// Redis cannot be reached but the call is free (the caller then limits locally).
    pub async fn meter(
        &self,
        family_id: &FamilyId,
        tenant_id: &TenantId,
        charge: &Charge,
        now_ms: i64,
    ) -> Result<Option<Metered>, Refused> {
        let keys = self.keys(family_id, tenant_id);
        let [_, bk, pk] = &keys;
        let (limit, window_ms) = charge.rate_limit.map_or((0, 1000), |r| {
            (i64::from(r.limit), i64::from(r.window_seconds) * 1000)
        });
        let free = charge.cost == 0 || (charge.budget.is_none() && self.pool_unlimited(tenant_id));
        // Each round either decides, or moves credits from the store into Redis (a refill, by
        // this request or by one it waited for). Under contention a small lease (a budget of 100
        // is leased 2 credits at a time) can be drained by other requests before this one gets
        // its turn, so rounds are not capped at a small number: they stop when the store says
        // the money is gone, or after a deadline (then 503, as for a slow Redis).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                tenant_id: tenant_id.clone(),
                keys: keys.clone(),
                args: [
                    now_ms,
                    limit,
                    window_ms,
                    i64::try_from(charge.cost).unwrap_or(i64::MAX),
                    i64::from(charge.budget.is_some()),
                    i64::from(self.pool_unlimited(tenant_id)),
                ],
                reply,
            };
            let answer = match self.jobs.send(job).await {
                Ok(()) => rx.await.unwrap_or_else(|_| Err("batch dropped".into())),
                Err(_) => Err("batcher stopped".into()),
            };
            let v = match answer {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("redis counters unavailable: {e}");
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
                    let budget_remaining = match charge.budget {
                        None => None,
                        Some(_) => Some(self.shown(v[4], bk, Owner::Budget(family_id)).await),
                    };
                    let credits_remaining = if self.pool_unlimited(tenant_id) || charge.cost == 0 {
                        None
                    } else {
                        Some(self.shown(v[5], pk, Owner::Pool(tenant_id)).await)
                    };
                    return Ok(Some(Metered {
                        rate,
                        budget_remaining,
                        credits_remaining,
                    }));
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
                    let lock = self.refill_lock(bk);
                    let _refill = lock.lock().await;
                    if self.get_u64(bk).await >= charge.cost {
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
                    self.deposit(bk, g, family_id, true)
                        .await
                        .map_err(|code| Refused { code, rate })?;
                }
                _ => {
                    let lock = self.refill_lock(pk);
                    let _refill = lock.lock().await;
                    if self.get_u64(pk).await >= charge.cost {
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
                                .insert(tenant_id.clone());
                        }
                        Ok(Withdrawal::Granted(g)) if g.granted == 0 => {
                            return Err(Refused {
                                code: Code::InsufficientCredits,
                                rate,
                            })
                        }
                        Ok(Withdrawal::Granted(g)) => {
                            self.deposit(pk, g, tenant_id, false)
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

    /// What a call shows as left: the Redis lease plus what the store had left at the last
    /// lease. That remainder changes only when some node leases, so this node keeps it for a
    /// second (no Redis read on the hot path); it reads Redis after that, and the store (a
    /// withdrawal of nothing) when Redis does not know it either.
    async fn shown(&self, lease: i64, lease_key: &str, owner: Owner<'_>) -> u64 {
        let lease = u64::try_from(lease).unwrap_or(0);
        let kept = self
            .remainders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(lease_key)
            .copied();
        if let Some((r, at)) = kept {
            if at.elapsed() < REMAINDER_TTL {
                return lease.saturating_add(r);
            }
        }
        let key = Self::remainder_key(lease_key);
        let mut con = self.redis.clone();
        let kept: Result<Option<i64>, _> = redis::cmd("GET").arg(&key).query_async(&mut con).await;
        let r = match kept.ok().flatten().and_then(|r| u64::try_from(r).ok()) {
            Some(r) => Some(r),
            None => {
                let read = match owner {
                    Owner::Budget(family_id) => self
                        .store
                        .withdraw_budget(family_id, 0)
                        .await
                        .map(|g| Some(g.remaining)),
                    Owner::Pool(tenant_id) => {
                        self.store
                            .withdraw_credits(tenant_id, 0)
                            .await
                            .map(|w| match w {
                                Withdrawal::Granted(g) => Some(g.remaining),
                                Withdrawal::Unlimited => None,
                            })
                    }
                };
                let r = read.ok().flatten();
                if let Some(r) = r {
                    // Only if no lease wrote a fresher one meanwhile.
                    let _: Result<(), _> = redis::cmd("SET")
                        .arg(&key)
                        .arg(r)
                        .arg("NX")
                        .query_async(&mut con)
                        .await;
                }
                r
            }
        };
        match r {
            Some(r) => {
                self.remember(lease_key, r);
                lease.saturating_add(r)
            }
            // A figure only: what the lease holds is still true.
            None => lease,
        }
    }

    fn remember(&self, lease_key: &str, remainder: u64) {
        let mut map = self.remainders.write().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear(); // a bound: each is read again from Redis at its next call
        }
        map.insert(lease_key.to_owned(), (remainder, Instant::now()));
    }

    /// Puts credits withdrawn from the store into Redis, with what the store has left beside
    /// them (what calls show is the lease plus that); if Redis fails, the credits are written
    /// off.
    async fn deposit(
        &self,
        key: &str,
        g: keygate_store::Grant,
        owner: &str,
        budget: bool,
    ) -> Result<(), Code> {
        let amount = g.granted;
        let remainder_key = Self::remainder_key(key);
        self.remember(key, g.remaining);
        let mut con = self.redis.clone();
        let r: Result<(i64,), _> = redis::pipe()
            .atomic()
            .cmd("INCRBY")
            .arg(key)
            .arg(amount)
            .cmd("SET")
            .arg(&remainder_key)
            .arg(g.remaining)
            .ignore()
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
    pub async fn refund(
        &self,
        family_id: &FamilyId,
        tenant_id: &TenantId,
        cost: u64,
        metered: &Metered,
    ) {
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
        family_id: &FamilyId,
        tenant_id: &TenantId,
    ) -> Result<(), SharedError> {
        let [_, bk, _] = self.keys(family_id, tenant_id);
        let bsk = Self::remainder_key(&bk);
        self.remainders
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&bk);
        let mut con = self.redis.clone();
        // The store's remainder changes with the release (and the change after it): it is
        // read again when next shown.
        let (left,): (Option<i64>,) = redis::pipe()
            .atomic()
            .cmd("GETDEL")
            .arg(&bk)
            .cmd("DEL")
            .arg(&bsk)
            .ignore()
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
    pub async fn budget_leased(&self, family_id: &FamilyId, tenant_id: &TenantId) -> u64 {
        let [_, bk, _] = self.keys(family_id, tenant_id);
        self.get_u64(&bk).await
    }

    /// Credits of a tenant's pool leased into Redis and not yet spent.
    pub async fn credits_leased(&self, tenant_id: &TenantId) -> u64 {
        let pk = self.pool_key(tenant_id);
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

/// Sends queued decisions to Redis in batches: every job waiting when a slot frees up goes
/// out together, one script call per tenant (so each call's keys share a hash slot). Under
/// load one round trip carries many decisions; alone, a decision goes out at once.
async fn run_batcher(redis: ConnectionManager, mut rx: mpsc::Receiver<Job>) {
    let script = Arc::new(redis::Script::new(METER));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let mut buf: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut buf, MAX_BATCH).await == 0 {
            return; // every sender is gone
        }
        let mut jobs = std::mem::take(&mut buf);
        // Decisions of one tenant keep their arrival order (a stable sort).
        if jobs.iter().any(|j| j.tenant_id != jobs[0].tenant_id) {
            jobs.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        }
        let redis = redis.clone();
        let script = script.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut rest = jobs;
            while !rest.is_empty() {
                let split = rest
                    .iter()
                    .position(|j| j.tenant_id != rest[0].tenant_id)
                    .unwrap_or(rest.len());
                let tail = rest.split_off(split);
                run_batch(&redis, &script, rest).await;
                rest = tail;
            }
        });
    }
}

/// One script call for `jobs` (all of one tenant); every job gets its six numbers or the error.
async fn run_batch(redis: &ConnectionManager, script: &redis::Script, jobs: Vec<Job>) {
    let mut inv = script.prepare_invoke();
    for j in &jobs {
        for k in &j.keys {
            inv.key(k.as_str());
        }
        for a in j.args {
            inv.arg(a);
        }
    }
    let mut con = redis.clone();
    let reply: Result<Vec<i64>, _> = inv.invoke_async(&mut con).await;
    match reply {
        Ok(v) if v.len() == 6 * jobs.len() => {
            for (j, r) in jobs.into_iter().zip(v.chunks_exact(6)) {
                let mut six = [0; 6];
                six.copy_from_slice(r);
                let _ = j.reply.send(Ok(six));
            }
        }
        other => {
            let e = match other {
                Err(e) => e.to_string(),
                Ok(v) => format!("unexpected reply of {} numbers", v.len()),
            };
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
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

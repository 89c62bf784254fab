//! Rate limits, key budgets and tenant credit pools, in process.
//!
//! * Rate limits: one two-window weighted counter ([`keygate_core::WindowState`]) per key
//!   family, behind a `std::sync::Mutex` held for a few instructions, never across an await.
//! * Budgets and credits: the store is the source of truth. This node withdraws credits from
//!   the store in small **leases** with one atomic conditional UPDATE, spends them from memory,
//!   and returns what is left on shutdown ([`Counters::flush`]). A credit is therefore never
//!   granted unless it was first taken from the store, so neither concurrency nor a restart
//!   can grant it twice; a crash (`kill -9`) loses at most the unspent part of one lease per
//!   family and tenant: an under-grant, never an over-grant.
//!
//! The order of checks is the contract's: rate limit → key budget → tenant credits. A
//! request refused by the tenant pool gives its key-budget credits back to the lease.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod shared;

pub use shared::{SharedCounters, SharedError};

use keygate_core::{Charge, Code, FamilyId, RateDecision, TenantId, WindowState};
use keygate_store::{Store, StoreError, Withdrawal};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Largest lease taken from the store at once.
const MAX_LEASE: u64 = 1_000;

/// Credits leased from one budget or pool.
#[derive(Debug, Default)]
struct Lease {
    /// Credits this node holds and may spend without asking the store.
    local: Mutex<LeaseState>,
    /// Serialises refills so that a burst does one store round trip, not one per request.
    refill: tokio::sync::Mutex<()>,
    /// The store said the pool is unlimited (tenants only).
    unlimited: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct LeaseState {
    local: u64,
    /// What the store had left after our last withdrawal (a hint for display and sizing).
    store_remaining: u64,
    /// The last withdrawal came back short: don't ask the store again until told of a change.
    store_empty: bool,
    /// `store_remaining` was read from the store (by a withdrawal) and no release since made
    /// it stale: until then what is left is not known here, and a free call asks.
    known: bool,
}

impl Lease {
    /// Takes `cost` from what this node holds and returns what is left (here and in the
    /// store); `None` when it holds too little, or when what is left is not known.
    fn try_take(&self, cost: u64) -> Option<u64> {
        let mut s = lock(&self.local);
        if s.known && s.local >= cost {
            s.local -= cost;
            Some(s.local.saturating_add(s.store_remaining))
        } else {
            None
        }
    }

    fn give_back(&self, cost: u64) {
        lock(&self.local).local += cost;
    }

    fn snapshot(&self) -> LeaseState {
        *lock(&self.local)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the counters half-updated
    // (every critical section is a single arithmetic step), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The result of running a request's [`Charge`] through the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    /// The rate-limit check, when the key has a limit (for the RateLimit headers).
    pub rate: Option<RateDecision>,
    /// Credits left in the key's budget after this call, when it has one.
    pub budget_remaining: Option<u64>,
    /// Credits left in the tenant's pool after this call, when it is limited.
    pub credits_remaining: Option<u64>,
}

/// A refusal from the counters, with the rate decision when there was one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// `RATE_LIMITED`, `BUDGET_EXHAUSTED`, `INSUFFICIENT_CREDITS` or `UNAVAILABLE`.
    pub code: Code,
    /// The rate decision (for `Retry-After` and the RateLimit headers).
    pub rate: Option<RateDecision>,
}

type Map<K, V> = RwLock<HashMap<K, Arc<V>>>;

/// The counters of one key (its family's rate window and budget lease, its tenant's pool
/// lease), resolved once and kept with the cached key so the hot path does no map lookups.
#[derive(Debug, Clone)]
pub struct Handles {
    window: Arc<Mutex<WindowState>>,
    budget: Arc<Lease>,
    pool: Arc<Lease>,
}

fn get_or_insert<K: Eq + std::hash::Hash + Clone, V: Default>(map: &Map<K, V>, key: &K) -> Arc<V> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return v.clone();
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_default()
        .clone()
}

/// In-process counters backed by a [`Store`] for money.
#[derive(Debug)]
pub struct Counters {
    store: Arc<dyn Store>,
    windows: Map<FamilyId, Mutex<WindowState>>,
    /// Free-standing windows (per client IP on public routes).
    named: Map<String, Mutex<WindowState>>,
    budgets: Map<FamilyId, Lease>,
    pools: Map<TenantId, Lease>,
}

impl Counters {
    /// Counters that lease credits from `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            windows: RwLock::default(),
            named: RwLock::default(),
            budgets: RwLock::default(),
            pools: RwLock::default(),
        }
    }

    /// The counters of a key of `family_id` in `tenant_id`.
    pub fn handles(&self, family_id: &FamilyId, tenant_id: &TenantId) -> Handles {
        Handles {
            window: get_or_insert(&self.windows, family_id),
            budget: get_or_insert(&self.budgets, family_id),
            pool: get_or_insert(&self.pools, tenant_id),
        }
    }

    /// Runs `charge` for a key of `family_id` in `tenant_id` at `now_ms`: rate limit, then key
    /// budget, then tenant credits. Either every counter is charged or none of the money is.
    ///
    /// The common case (leases hold enough) completes without awaiting anything; only a lease
    /// refill goes to the store, in a separately boxed future so the fast path stays small.
    pub async fn meter_with(
        &self,
        h: &Handles,
        family_id: &FamilyId,
        tenant_id: &TenantId,
        charge: &Charge,
        now_ms: i64,
    ) -> Result<Metered, Refused> {
        let rate = charge
            .rate_limit
            .map(|rl| lock(&h.window).check(&rl, now_ms, 1));
        if let Some(r) = rate {
            if !r.allowed {
                return Err(Refused {
                    code: Code::RateLimited,
                    rate,
                });
            }
        }
        let cost = charge.cost;
        if cost == 0 {
            let s = h.budget.snapshot();
            if charge.budget.is_some() && !s.known {
                // What is left is shown, so it is read once (a withdrawal of nothing).
                return Box::pin(self.meter_slow(h, family_id, tenant_id, charge, rate)).await;
            }
            return Ok(Metered {
                rate,
                budget_remaining: charge
                    .budget
                    .map(|_| s.local.saturating_add(s.store_remaining)),
                credits_remaining: None,
            });
        }
        // Fast path: both leases already hold enough.
        let budget_lease = charge.budget.map(|_| &h.budget);
        let budget_remaining = match budget_lease {
            None => None,
            Some(l) => match l.try_take(cost) {
                Some(rem) => Some(rem),
                None => {
                    return Box::pin(self.meter_slow(h, family_id, tenant_id, charge, rate)).await
                }
            },
        };
        let pool = &h.pool;
        let credits_remaining = if pool.unlimited.load(Ordering::Relaxed) {
            None
        } else {
            match pool.try_take(cost) {
                Some(rem) => Some(rem),
                None => {
                    if let Some(l) = budget_lease {
                        l.give_back(cost);
                    }
                    return Box::pin(self.meter_slow(h, family_id, tenant_id, charge, rate)).await;
                }
            }
        };
        Ok(Metered {
            rate,
            budget_remaining,
            credits_remaining,
        })
    }

    /// The money part of [`Counters::meter`] when a lease must be refilled from the store.
    async fn meter_slow(
        &self,
        h: &Handles,
        family_id: &FamilyId,
        tenant_id: &TenantId,
        charge: &Charge,
        rate: Option<RateDecision>,
    ) -> Result<Metered, Refused> {
        let refuse = |code| Refused { code, rate };
        let cost = charge.cost;
        let mut budget_remaining = None;
        let mut budget_lease = None;
        if let Some(cap) = charge.budget {
            let lease = &h.budget;
            // A free call only reads what is left (a withdrawal of nothing).
            let want = if cost == 0 {
                0
            } else {
                cost.max((cap / 50).min(MAX_LEASE))
            };
            let store = self.store.clone();
            let fam = family_id.clone();
            let got = take(lease, cost, want, move |w| {
                let store = store.clone();
                let fam = fam.clone();
                async move {
                    let g = store.withdraw_budget(&fam, w).await?;
                    Ok(Some((g.granted, g.remaining)))
                }
            })
            .await
            .map_err(|_| refuse(Code::Unavailable))?;
            match got {
                Taken::Yes(rem) => budget_remaining = Some(rem),
                Taken::No => return Err(refuse(Code::BudgetExhausted)),
                Taken::Unlimited => {}
            }
            budget_lease = Some(lease);
        }
        let mut credits_remaining = None;
        let lease = &h.pool;
        // A free call draws nothing from the pool (and shows no pool figure).
        if cost > 0 && !lease.unlimited.load(Ordering::Relaxed) {
            let hint = lease.snapshot().store_remaining;
            let want = cost.max((hint / 50).min(MAX_LEASE));
            let store = self.store.clone();
            let tid = tenant_id.clone();
            let got = take(lease, cost, want, move |w| {
                let store = store.clone();
                let tid = tid.clone();
                async move {
                    Ok(match store.withdraw_credits(&tid, w).await? {
                        Withdrawal::Unlimited => None,
                        Withdrawal::Granted(g) => Some((g.granted, g.remaining)),
                    })
                }
            })
            .await;
            let refusal = match got {
                Ok(Taken::Yes(rem)) => {
                    credits_remaining = Some(rem);
                    None
                }
                Ok(Taken::Unlimited) => None,
                Ok(Taken::No) => Some(Code::InsufficientCredits),
                Err(_) => Some(Code::Unavailable),
            };
            if let Some(code) = refusal {
                if let Some(b) = budget_lease {
                    b.give_back(cost);
                }
                return Err(refuse(code));
            }
        }
        Ok(Metered {
            rate,
            budget_remaining,
            credits_remaining,
        })
    }

    /// Gives the money of an allowed `charge` back (the request was never served: the
    /// gateway could not reach the upstream). The rate-limit slot stays used.
    /// Only what `metered` says was charged is given back (a budget or pool that was not
    /// drawn from, e.g. an unlimited pool, is left alone).
    pub fn refund(&self, h: &Handles, cost: u64, metered: &Metered) {
        if cost == 0 {
            return;
        }
        if metered.budget_remaining.is_some() {
            h.budget.give_back(cost);
        }
        if metered.credits_remaining.is_some() {
            h.pool.give_back(cost);
        }
    }

    /// Counts one request against a free-standing rate window named `name` (per client IP on
    /// public routes: `ip:203.0.113.7`).
    pub fn check_named(
        &self,
        name: &str,
        rl: &keygate_core::RateLimit,
        now_ms: i64,
    ) -> RateDecision {
        let w = get_or_insert(&self.named, &name.to_owned());
        let mut st = lock(&w);
        st.check(rl, now_ms, 1)
    }

    /// Credits of `family_id`'s budget leased to this node and not yet spent.
    pub fn budget_leased(&self, family_id: &FamilyId) -> u64 {
        self.budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(family_id)
            .map_or(0, |l| l.snapshot().local)
    }

    /// Credits of `tenant_id`'s pool leased to this node and not yet spent.
    pub fn credits_leased(&self, tenant_id: &TenantId) -> u64 {
        self.pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant_id)
            .map_or(0, |l| l.snapshot().local)
    }

    /// Returns this node's lease on a family's budget to the store and forgets that the store
    /// was empty: call before changing the budget, so the new cap applies to true spending.
    pub async fn release_budget(&self, family_id: &FamilyId) -> Result<(), StoreError> {
        let lease = self
            .budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(family_id)
            .cloned();
        if let Some(lease) = lease {
            release(&lease, |n| self.store.refund_budget(family_id, n)).await?;
        }
        Ok(())
    }

    /// Forgets that a tenant's pool was empty or unlimited (after a top-up or plan change).
    pub fn pool_changed(&self, tenant_id: &TenantId) {
        if let Some(l) = self
            .pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant_id)
        {
            let mut s = lock(&l.local);
            s.store_empty = false;
            // What the store has left changed: read it again at the next paid call.
            s.known = false;
            drop(s);
            l.unlimited.store(false, Ordering::Relaxed);
        }
    }

    /// Returns every unspent lease to the store (graceful shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let budgets: Vec<_> = self
            .budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (fam, lease) in budgets {
            release(&lease, |n| self.store.refund_budget(&fam, n)).await?;
        }
        let pools: Vec<_> = self
            .pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (tid, lease) in pools {
            release(&lease, |n| self.store.refund_credits(&tid, n)).await?;
        }
        Ok(())
    }

    /// Drops rate windows that have not been touched for two windows and that no cached key
    /// holds any more (memory bound; a held window must stay the family's only one).
    pub fn sweep(&self, now_ms: i64, max_window_ms: i64) {
        let kept = |w: &Arc<Mutex<WindowState>>| {
            Arc::strong_count(w) > 1 || lock(w).start_ms + 2 * max_window_ms > now_ms
        };
        self.windows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| kept(w));
        self.named
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| kept(w));
    }
}

enum Taken {
    Yes(u64),
    No,
    Unlimited,
}

async fn take<F, Fut>(lease: &Lease, cost: u64, want: u64, withdraw: F) -> Result<Taken, StoreError>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Option<(u64, u64)>, StoreError>>,
{
    if let Some(rem) = lease.try_take(cost) {
        return Ok(Taken::Yes(rem));
    }
    let _refill = lease.refill.lock().await;
    if let Some(rem) = lease.try_take(cost) {
        return Ok(Taken::Yes(rem));
    }
    if lease.snapshot().store_empty {
        return Ok(Taken::No);
    }
    let Some((granted, remaining)) = withdraw(want).await? else {
        lease.unlimited.store(true, Ordering::Relaxed);
        return Ok(Taken::Unlimited);
    };
    let mut s = lock(&lease.local);
    s.local += granted;
    s.store_remaining = remaining;
    s.store_empty = granted < want && remaining == 0;
    s.known = true;
    if s.local >= cost {
        s.local -= cost;
        Ok(Taken::Yes(s.local.saturating_add(s.store_remaining)))
    } else {
        Ok(Taken::No)
    }
}

async fn release<F, Fut>(lease: &Lease, refund: F) -> Result<(), StoreError>
where
    F: FnOnce(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let _refill = lease.refill.lock().await;
    let n = {
        let mut s = lock(&lease.local);
        let n = s.local;
        s.local = 0;
        s.store_empty = false;
        // What the store has left changes with the release (and with whatever change the
        // release comes before): read it again when it is next shown.
        s.known = false;
        n
    };
    if n > 0 {
        if let Err(e) = refund(n).await {
            lease.give_back(n);
            return Err(e);
        }
    }
    Ok(())
}

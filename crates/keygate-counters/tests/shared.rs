//! [`SharedCounters`] and its Lua script against a real Redis on 127.0.0.1:6379 (or
//! `KEYGATE_TEST_REDIS_URL`, as for `keygate-server`'s `many_nodes.rs`), with a real SQLite
//! store behind it for money. Redis is required: without it every test here fails and says so. Each test uses its own key prefix, tenant and family (random suffixes), so the
//! tests run in parallel on one Redis.
#![forbid(unsafe_code)]

mod support;

use keygate_core::{Charge, Code, FamilyId, TenantId};
use keygate_counters::{Counters, Metered, Refused, SharedCounters};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use support::{charge, limited, unique, Db, T0};

fn redis_url() -> String {
    std::env::var("KEYGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Why a test failed when Redis is not there.
fn need_redis(e: impl std::fmt::Display) -> String {
    format!(
        "these tests need Redis at {} ({e}); start it with `redis-server --daemonize yes \
         --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`",
        redis_url()
    )
}

/// One test's world: a store with one tenant and one key, and the Redis names they get.
struct World {
    db: Db,
    prefix: String,
    tenant: TenantId,
    family: FamilyId,
}

impl World {
    /// A tenant with `credits` (`None`: unlimited) and a key with `budget`, under fresh names.
    async fn new(credits: Option<u64>, budget: Option<u64>) -> Self {
        let db = Db::open().await;
        let (prefix, tenant, family) = (unique("kgtest"), unique("t"), unique("k"));
        db.tenant(&tenant, credits).await;
        db.key(&family, &tenant, budget).await;
        Self {
            db,
            prefix,
            tenant: tenant.into(),
            family: family.into(),
        }
    }

    /// A node: its own `SharedCounters` (own connection and batcher) on the same Redis and
    /// store as every other node of this world.
    async fn node(&self) -> SharedCounters {
        SharedCounters::connect(&redis_url(), &self.prefix, self.db.store.clone())
            .await
            .unwrap_or_else(|e| panic!("{}", need_redis(e)))
    }

    async fn meter(&self, n: &SharedCounters, ch: &Charge, now: i64) -> Result<Metered, Refused> {
        n.meter(&self.family, &self.tenant, ch, now)
            .await
            .map(|m| m.expect("Redis is up: the counters answer"))
    }

    fn window_key(&self) -> String {
        format!("{}:{{{}}}:w:{}", self.prefix, self.tenant, self.family)
    }

    fn budget_key(&self) -> String {
        format!("{}:{{{}}}:b:{}", self.prefix, self.tenant, self.family)
    }

    fn pool_key(&self) -> String {
        format!("{}:{{{}}}:p", self.prefix, self.tenant)
    }

    async fn spent(&self) -> u64 {
        self.db.spent(&self.family).await
    }

    async fn credits(&self) -> Option<u64> {
        self.db.credits(&self.tenant).await
    }
}

impl Drop for World {
    /// Removes this world's keys from Redis (budget and pool leases have no expiry), also
    /// when the test failed. Blocking, and best effort: a test's outcome is its assertions.
    fn drop(&mut self) {
        let timeout = std::time::Duration::from_millis(500);
        let Ok(mut con) =
            redis::Client::open(redis_url()).and_then(|c| c.get_connection_with_timeout(timeout))
        else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut con)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut con);
        }
    }
}

/// A plain connection, to look at and damage what the script keeps.
async fn raw() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap_or_else(|e| panic!("{}", need_redis(e)))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{}", need_redis(e)))
}

async fn del(key: &str) {
    let n: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut raw().await)
        .await
        .expect("DEL");
    assert_eq!(n, 1, "{key} existed");
}

/// Charges `ch` until refused; returns how many calls passed and the refusal.
async fn spend_all(w: &World, n: &SharedCounters, ch: &Charge) -> (u64, Refused) {
    let mut allowed = 0;
    loop {
        match w.meter(n, ch, T0).await {
            Ok(_) => allowed += 1,
            Err(r) => return (allowed, r),
        }
        assert!(allowed <= 2_000, "still allowing after {allowed} calls");
    }
}

fn refused(code: Code) -> Refused {
    Refused { code, rate: None }
}

// ---------------------------------------------------------------------------------------------
// Connection

#[tokio::test]
async fn ping_answers_with_redis_up_and_connect_fails_without_it() {
    let w = World::new(None, None).await;
    let n = w.node().await;
    assert!(n.ping().await);
    // Nothing listens on port 1: connect says so (fast), it does not hang or pretend.
    let started = std::time::Instant::now();
    let down = SharedCounters::connect("redis://127.0.0.1:1", &w.prefix, w.db.store.clone()).await;
    assert!(down.is_err(), "connected to nothing");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// Leases

#[tokio::test]
async fn leases_moved_into_redis_are_a_fiftieth_of_the_budget_and_100_of_the_pool() {
    // (budget, cost, moved from the budget into Redis, moved from the pool into Redis)
    for (budget, cost, budget_lease, pool_lease) in [
        (100, 1, 2, 100),
        (5_000, 1, 100, 100),
        (100_000, 1, 1_000, 100),
        (100, 7, 7, 100),
        (100_000, 150, 1_000, 150),
    ] {
        let w = World::new(Some(10_000), Some(budget)).await;
        let n = w.node().await;
        w.meter(&n, &charge(Some(budget), cost), T0)
            .await
            .expect("allowed");
        let case = format!("budget {budget}, cost {cost}");
        assert_eq!(w.spent().await, budget_lease, "{case}: budget lease");
        assert_eq!(
            n.budget_leased(&w.family, &w.tenant).await,
            budget_lease - cost,
            "{case}: left in Redis"
        );
        assert_eq!(w.credits().await, Some(10_000 - pool_lease), "{case}: pool");
        assert_eq!(
            n.credits_leased(&w.tenant).await,
            pool_lease - cost,
            "{case}: pool left in Redis"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Exact budgets and pools

#[tokio::test]
async fn a_budget_of_100_allows_exactly_100_then_budget_exhausted() {
    let w = World::new(None, Some(100)).await;
    let n = w.node().await;
    let (allowed, refusal) = spend_all(&w, &n, &charge(Some(100), 1)).await;
    assert_eq!(allowed, 100);
    assert_eq!(refusal, refused(Code::BudgetExhausted));
    for _ in 0..3 {
        assert_eq!(
            w.meter(&n, &charge(Some(100), 1), T0).await,
            Err(refused(Code::BudgetExhausted))
        );
    }
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 100);
    assert_eq!(n.budget_leased(&w.family, &w.tenant).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_charging_at_once_grant_a_budget_of_100_exactly() {
    let w = Arc::new(World::new(Some(1_000), Some(100)).await);
    let nodes = [Arc::new(w.node().await), Arc::new(w.node().await)];
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (w, n, start) = (w.clone(), nodes[i % 2].clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut out = Vec::new();
            for _ in 0..4 {
                out.push(w.meter(&n, &charge(Some(100), 1), T0).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let allowed = all.iter().filter(|r| r.is_ok()).count();
    assert_eq!(allowed, 100, "exactly the budget across both nodes");
    for r in &all {
        if let Err(e) = r {
            assert_eq!(e.code, Code::BudgetExhausted, "every refusal: {e:?}");
        }
    }
    nodes[0]
        .release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 100, "budget balance 0");
    let pool = w.credits().await.expect("limited") + nodes[1].credits_leased(&w.tenant).await;
    assert_eq!(
        pool, 900,
        "the pool (store + Redis lease) paid for exactly 100"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_charging_at_once_allow_a_rate_limit_of_60_exactly() {
    let w = Arc::new(World::new(None, None).await);
    let nodes = [Arc::new(w.node().await), Arc::new(w.node().await)];
    let start = Arc::new(tokio::sync::Barrier::new(64));
    // All in the middle of one window with an empty previous one: no edge to excuse.
    let now = T0 + 30_000;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (w, n, start) = (w.clone(), nodes[i % 2].clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut out = Vec::new();
            for _ in 0..2 {
                out.push(w.meter(&n, &limited(60, 60, None, 1), now).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    assert_eq!(all.iter().filter(|r| r.is_ok()).count(), 60);
    for r in &all {
        if let Err(e) = r {
            assert_eq!(e.code, Code::RateLimited, "every refusal: {e:?}");
        }
    }
}

#[tokio::test]
async fn a_spent_pool_refuses_with_insufficient_credits_and_charges_the_budget_nothing() {
    let w = World::new(Some(3), Some(10)).await;
    let n = w.node().await;
    let (allowed, refusal) = spend_all(&w, &n, &charge(Some(10), 1)).await;
    assert_eq!(allowed, 3);
    assert_eq!(refusal, refused(Code::InsufficientCredits));
    assert_eq!(
        w.meter(&n, &charge(Some(10), 1), T0).await,
        Err(refused(Code::InsufficientCredits))
    );
    assert_eq!(w.credits().await, Some(0));
    assert_eq!(n.credits_leased(&w.tenant).await, 0);
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(
        w.spent().await,
        3,
        "the refused calls cost the budget nothing"
    );
}

#[tokio::test]
async fn a_cost_above_one_is_charged_in_full_and_refused_whole_when_it_does_not_fit() {
    let w = World::new(None, Some(10)).await;
    let n = w.node().await;
    let three = charge(Some(10), 3);
    for _ in 0..3 {
        w.meter(&n, &three, T0).await.expect("allowed");
    }
    assert_eq!(
        w.meter(&n, &three, T0).await,
        Err(refused(Code::BudgetExhausted))
    );
    w.meter(&n, &charge(Some(10), 1), T0)
        .await
        .expect("the last credit still fits a call of 1");
    assert_eq!(
        w.meter(&n, &charge(Some(10), 1), T0).await,
        Err(refused(Code::BudgetExhausted))
    );
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 10);
}

// ---------------------------------------------------------------------------------------------
// Refunds, release_budget, pool_changed

#[tokio::test]
async fn a_refund_gives_back_exactly_what_was_charged() {
    let w = World::new(Some(100), Some(10)).await;
    let n = w.node().await;
    let m = w
        .meter(&n, &charge(Some(10), 4), T0)
        .await
        .expect("allowed");
    let before = (
        n.budget_leased(&w.family, &w.tenant).await,
        n.credits_leased(&w.tenant).await,
    );
    n.refund(&w.family, &w.tenant, 4, &m).await;
    let after = (
        n.budget_leased(&w.family, &w.tenant).await,
        n.credits_leased(&w.tenant).await,
    );
    assert_eq!((after.0 - before.0, after.1 - before.1), (4, 4));
    let (allowed, refusal) = spend_all(&w, &n, &charge(Some(10), 1)).await;
    assert_eq!(allowed, 10, "the refunded 4 are spendable, and no more");
    assert_eq!(refusal, refused(Code::BudgetExhausted));
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 10);
    let pool = w.credits().await.expect("limited") + n.credits_leased(&w.tenant).await;
    assert_eq!(pool, 90, "store + Redis: 100 − 10");
}

#[tokio::test]
async fn a_refund_leaves_alone_what_the_charge_did_not_draw_from() {
    let w = World::new(None, None).await;
    let n = w.node().await;
    let m = w
        .meter(&n, &charge(None, 5), T0)
        .await
        .expect("no budget, unlimited pool");
    assert_eq!((m.budget_remaining, m.credits_remaining), (None, None));
    n.refund(&w.family, &w.tenant, 5, &m).await;
    let mut con = raw().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(w.budget_key())
        .arg(w.pool_key())
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "no lease made up out of a refund");
}

#[tokio::test]
async fn release_budget_moves_the_redis_lease_back_to_the_store() {
    let w = World::new(None, Some(100)).await;
    let n = w.node().await;
    w.meter(&n, &charge(Some(100), 1), T0)
        .await
        .expect("allowed");
    assert_eq!(
        (w.spent().await, n.budget_leased(&w.family, &w.tenant).await),
        (2, 1)
    );
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(
        (w.spent().await, n.budget_leased(&w.family, &w.tenant).await),
        (1, 0)
    );
    // A spent budget raised from 100 to 103 allows exactly 3 more (after the 99 left).
    let (allowed, _) = spend_all(&w, &n, &charge(Some(100), 1)).await;
    assert_eq!(allowed, 99);
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    w.db.set_budget(&w.family, 103).await;
    let (allowed, refusal) = spend_all(&w, &n, &charge(Some(103), 1)).await;
    assert_eq!((allowed, refusal), (3, refused(Code::BudgetExhausted)));
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 103);
}

#[tokio::test]
async fn pool_changed_forgets_that_a_pool_was_unlimited() {
    let w = World::new(None, None).await;
    let n = w.node().await;
    let one = charge(None, 1);
    let m = w.meter(&n, &one, T0).await.expect("unlimited");
    assert_eq!(m.credits_remaining, None);
    w.db.set_credits(&w.tenant, Some(3)).await;
    let m = w.meter(&n, &one, T0).await.expect("still unlimited here");
    assert_eq!(m.credits_remaining, None, "not told of the plan change");
    assert_eq!(w.credits().await, Some(3), "and nothing drawn");
    n.pool_changed(&w.tenant);
    let (allowed, refusal) = spend_all(&w, &n, &one).await;
    assert_eq!((allowed, refusal), (3, refused(Code::InsufficientCredits)));
    assert_eq!(w.credits().await, Some(0));
}

// ---------------------------------------------------------------------------------------------
// Rate windows

/// Runs the same calls through the in-process counters and the script: the script must
/// decide, and describe (remaining, reset, Retry-After), exactly as the in-process window does.
#[tokio::test]
async fn the_script_s_rate_arithmetic_is_the_in_process_window_s_at_every_boundary() {
    let w = World::new(None, None).await;
    let n = w.node().await;
    let local = Counters::new(w.db.store.clone());
    let h = local.handles(&w.family, &w.tenant);
    // 5 per 10 s, rate only (a free call). (time, calls made, calls that must pass)
    let ch = limited(5, 10, None, 0);
    let t = T0; // the start of a 10-second window
    for (now, calls, pass) in [
        (t + 2_000, 7, 5),     // 5 in a fresh window, then refused
        (t + 9_999, 1, 0),     // last millisecond of it: still 5
        (t + 10_000, 2, 0),    // the edge: the previous window weighs all 5
        (t + 15_000, 4, 2),    // half way: 2.5 + 2 ≤ 5 < 2.5 + 3
        (t + 19_999, 3, 2),    // 5 × 1/10 000 + 2 + 2 ≤ 5
        (t + 20_000, 2, 1),    // next edge: the previous (4) weighs all
        (t + 29_999, 6, 3),    // 4 × 0.0001 + (1 + 3) ≤ 5 < 4 × 0.0001 + 5
        (t + 45_000, 7, 5),    // a window skipped: the slate is clean
        (t + 1_000_000, 6, 5), // long after
    ] {
        let mut passed = 0;
        for i in 0..calls {
            let shared = w.meter(&n, &ch, now).await;
            let in_process = local.meter_with(&h, &w.family, &w.tenant, &ch, now).await;
            assert_eq!(shared, in_process, "at t + {} ms, call {i}", now - t);
            passed += u32::from(shared.is_ok());
        }
        assert_eq!(passed, pass, "at t + {} ms", now - t);
    }
}

#[tokio::test]
async fn a_call_refused_for_money_uses_no_rate_slot() {
    // Pins the script's behaviour: the window counts a call only if it is allowed. The
    // in-process counters differ (see `counters.rs`
    // `in_process_a_call_refused_for_money_still_uses_its_rate_slot`).
    let w = World::new(None, Some(1)).await;
    let n = w.node().await;
    let ch = limited(3, 60, Some(1), 1);
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(w.meter(&n, &ch, T0).await.err().map(|r| r.code));
    }
    assert_eq!(
        codes,
        [
            None,
            Some(Code::BudgetExhausted),
            Some(Code::BudgetExhausted),
            Some(Code::BudgetExhausted)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Lost keys: what Redis may lose, and what that must never do

#[tokio::test]
async fn a_window_set_to_expire_lives_two_windows_and_losing_it_resets_the_count_not_the_budget() {
    let w = World::new(None, Some(5)).await;
    let n = w.node().await;
    let ch = limited(3, 60, Some(5), 1);
    let now = T0 + 10_000;
    for _ in 0..3 {
        w.meter(&n, &ch, now).await.expect("within the limit");
    }
    assert_eq!(
        w.meter(&n, &ch, now).await.map_err(|r| r.code),
        Err(Code::RateLimited)
    );
    let mut con = raw().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(w.window_key())
        .query_async(&mut con)
        .await
        .expect("PTTL");
    assert!(
        (110_000..=120_000).contains(&ttl),
        "a window lives two windows from when it rolled over: {ttl} ms"
    );
    // The window expires mid-window (as if Redis evicted it): it comes back empty.
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(w.window_key())
        .arg(1)
        .query_async(&mut con)
        .await
        .expect("PEXPIRE");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(w.window_key())
            .query_async(&mut con)
            .await
            .expect("EXISTS");
        if exists == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key did not expire"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The rate count starts again; the budget does not: 2 of 5 left, then BUDGET_EXHAUSTED.
    for _ in 0..2 {
        w.meter(&n, &ch, now).await.expect("a fresh window");
    }
    assert_eq!(
        w.meter(&n, &ch, now).await.map_err(|r| r.code),
        Err(Code::BudgetExhausted)
    );
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 5, "the budget was granted once");
}

#[tokio::test]
async fn a_budget_lease_lost_from_redis_is_an_under_grant_never_a_refill() {
    let w = World::new(None, Some(100)).await;
    let n = w.node().await;
    let one = charge(Some(100), 1);
    w.meter(&n, &one, T0).await.expect("allowed");
    assert_eq!(
        (w.spent().await, n.budget_leased(&w.family, &w.tenant).await),
        (2, 1)
    );
    del(&w.budget_key()).await; // Redis restarted empty: the unspent credit is gone
    let (allowed, refusal) = spend_all(&w, &n, &one).await;
    assert_eq!(
        allowed, 98,
        "99 in all: the lost credit is not granted again"
    );
    assert_eq!(refusal, refused(Code::BudgetExhausted));
    n.release_budget(&w.family, &w.tenant)
        .await
        .expect("release");
    assert_eq!(w.spent().await, 100);
}

#[tokio::test]
async fn a_pool_lease_lost_from_redis_is_an_under_grant_never_a_refill() {
    let w = World::new(Some(1_000), None).await;
    let n = w.node().await;
    let ten = charge(None, 10);
    w.meter(&n, &ten, T0).await.expect("allowed");
    assert_eq!(
        (w.credits().await, n.credits_leased(&w.tenant).await),
        (Some(900), 90)
    );
    del(&w.pool_key()).await;
    let (allowed, refusal) = spend_all(&w, &n, &ten).await;
    assert_eq!(
        allowed, 90,
        "91 calls in all: the 90 lost credits are not granted again"
    );
    assert_eq!(refusal, refused(Code::InsufficientCredits));
    assert_eq!(
        (w.credits().await, n.credits_leased(&w.tenant).await),
        (Some(0), 0)
    );
}

// ---------------------------------------------------------------------------------------------
// Figures shown (a bug until issue 18: the Redis lease was shown as what is left)

#[tokio::test]
async fn the_figures_shown_are_what_is_left_not_the_redis_lease() {
    let w = World::new(Some(1_000), Some(100)).await;
    let n = w.node().await;
    let m = w.meter(&n, &charge(Some(100), 1), T0).await;
    let m = m.expect("allowed");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(99), Some(999))
    );
}

#[tokio::test]
async fn a_late_call_from_the_previous_window_does_not_reset_the_current_one() {
    let w = World::new(None, None).await;
    let n = w.node().await;
    let ch = limited(3, 60, None, 0);
    let edge = T0 + 60_000;
    for _ in 0..3 {
        w.meter(&n, &ch, edge + 1).await.expect("within the limit");
    }
    let _ = w.meter(&n, &ch, edge - 1).await;
    let after = w.meter(&n, &ch, edge + 2).await.map_err(|r| r.code);
    assert_eq!(after, Err(Code::RateLimited));
}

#[tokio::test]
async fn after_a_top_up_every_node_shows_it() {
    let w = World::new(Some(1_000), None).await;
    let (a, b) = (w.node().await, w.node().await);
    let m = w.meter(&a, &charge(None, 1), T0).await.expect("allowed");
    assert_eq!(m.credits_remaining, Some(999));
    let m = w.meter(&b, &charge(None, 1), T0).await.expect("allowed");
    assert_eq!(m.credits_remaining, Some(998));
    w.db.store
        .add_tenant_credits(&w.tenant, 500)
        .await
        .expect("top-up");
    // The node that topped up drops Redis's remainder; the other hears of it (change feed).
    a.pool_remainder_changed(&w.tenant).await;
    b.pool_changed(&w.tenant);
    for n in [&a, &b] {
        let m = w.meter(n, &charge(None, 1), T0).await.expect("allowed");
        let left = m.credits_remaining.expect("a pool figure");
        assert!((1_496..=1_497).contains(&left), "{left}");
    }
}

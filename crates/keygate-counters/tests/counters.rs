//! The in-process [`Counters`] against a real SQLite store: lease sizing, exact budgets and
//! pools, refunds, flush on shutdown, budget and pool changes, rate windows, named windows and
//! the sweep. Every number asserted is one a user sees (`budget.remaining`,
//! `X-Credits-Remaining`, the code of a refusal) or one the store holds after a flush.
#![forbid(unsafe_code)]

mod support;

use keygate_core::{Charge, Code, FamilyId, RateDecision, RateLimit, TenantId};
use keygate_counters::{Counters, Metered, Refused};
use std::sync::Arc;
use support::{charge, limited, Db, T0};

async fn meter(
    c: &Counters,
    family: &str,
    tenant: &str,
    ch: &Charge,
    now_ms: i64,
) -> Result<Metered, Refused> {
    let (family, tenant) = (FamilyId::from(family), TenantId::from(tenant));
    let h = c.handles(&family, &tenant);
    c.meter_with(&h, &family, &tenant, ch, now_ms).await
}

fn refused(code: Code) -> Result<Metered, Refused> {
    Err(Refused { code, rate: None })
}

// ---------------------------------------------------------------------------------------------
// Lease sizing

#[tokio::test]
async fn a_budget_lease_is_a_fiftieth_of_the_budget_at_most_1000_and_at_least_the_cost() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    let c = Counters::new(db.store.clone());
    // (family, budget, cost, credits the first call withdraws from the store)
    for (fam, budget, cost, lease) in [
        ("k100", 100, 1, 2),
        ("k5000", 5_000, 1, 100),
        ("k100000", 100_000, 1, 1_000),
        ("k10", 10, 1, 1),
        ("k100_cost7", 100, 7, 7),
    ] {
        db.key(fam, "t", Some(budget)).await;
        let m = meter(&c, fam, "t", &charge(Some(budget), cost), T0)
            .await
            .expect("allowed");
        assert_eq!(db.spent(fam).await, lease, "{fam}: the first lease");
        assert_eq!(
            c.budget_leased(&fam.into()),
            lease - cost,
            "{fam}: lease left"
        );
        assert_eq!(m.budget_remaining, Some(budget - cost), "{fam}: shown");
        assert_eq!(m.credits_remaining, None, "{fam}: unlimited pool");
    }
    // A budget of 100 is leased 2 at a time: the 2nd call is served from memory, the 3rd
    // takes the next lease.
    let k100 = charge(Some(100), 1);
    let m = meter(&c, "k100", "t", &k100, T0).await.expect("allowed");
    assert_eq!(
        (db.spent("k100").await, c.budget_leased(&"k100".into())),
        (2, 0)
    );
    assert_eq!(m.budget_remaining, Some(98));
    let m = meter(&c, "k100", "t", &k100, T0).await.expect("allowed");
    assert_eq!(
        (db.spent("k100").await, c.budget_leased(&"k100".into())),
        (4, 1)
    );
    assert_eq!(m.budget_remaining, Some(97));
}

#[tokio::test]
async fn a_pool_lease_is_the_cost_first_then_a_fiftieth_of_what_the_store_has_left() {
    let db = Db::open().await;
    db.tenant("big", Some(100_000)).await;
    db.tenant("small", Some(200)).await;
    db.key("kb", "big", None).await;
    db.key("ks", "small", None).await;
    let c = Counters::new(db.store.clone());
    let one = charge(None, 1);

    // Nothing known of the pool yet: the first withdrawal is the cost alone.
    let m = meter(&c, "kb", "big", &one, T0).await.expect("allowed");
    assert_eq!(db.credits("big").await, Some(99_999));
    assert_eq!(c.credits_leased(&"big".into()), 0);
    assert_eq!(m.credits_remaining, Some(99_999));
    assert_eq!(m.budget_remaining, None, "a key without a budget");
    // Then 99_999 / 50 = 1_999, capped at 1_000.
    let m = meter(&c, "kb", "big", &one, T0).await.expect("allowed");
    assert_eq!(db.credits("big").await, Some(98_999));
    assert_eq!(c.credits_leased(&"big".into()), 999);
    assert_eq!(m.credits_remaining, Some(99_998));

    let m = meter(&c, "ks", "small", &one, T0).await.expect("allowed");
    assert_eq!(db.credits("small").await, Some(199));
    assert_eq!(m.credits_remaining, Some(199));
    // 199 / 50 = 3.
    let m = meter(&c, "ks", "small", &one, T0).await.expect("allowed");
    assert_eq!(db.credits("small").await, Some(196));
    assert_eq!(c.credits_leased(&"small".into()), 2);
    assert_eq!(m.credits_remaining, Some(198));
}

// ---------------------------------------------------------------------------------------------
// Exact budgets and pools

#[tokio::test]
async fn a_budget_of_100_allows_exactly_100_calls_then_budget_exhausted() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(100)).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(Some(100), 1);
    for i in 0..100 {
        let m = meter(&c, "k", "t", &ch, T0)
            .await
            .expect("within the budget");
        assert_eq!(m.budget_remaining, Some(99 - i), "call {i}");
        assert_eq!(m.credits_remaining, None, "unlimited pool");
    }
    for _ in 0..5 {
        assert_eq!(
            meter(&c, "k", "t", &ch, T0).await,
            refused(Code::BudgetExhausted)
        );
    }
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 100, "the whole budget, no more");
    assert_eq!(c.budget_leased(&"k".into()), 0);
}

#[tokio::test]
async fn a_spent_tenant_pool_refuses_with_insufficient_credits() {
    let db = Db::open().await;
    db.tenant("t", Some(5)).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(None, 1);
    for i in 0..5 {
        let m = meter(&c, "k", "t", &ch, T0).await.expect("within the pool");
        assert_eq!(m.credits_remaining, Some(4 - i), "call {i}");
    }
    for _ in 0..3 {
        assert_eq!(
            meter(&c, "k", "t", &ch, T0).await,
            refused(Code::InsufficientCredits)
        );
    }
    c.flush().await.expect("flush");
    assert_eq!(db.credits("t").await, Some(0));
}

#[tokio::test]
async fn a_pool_refusal_gives_the_key_budget_back() {
    let db = Db::open().await;
    db.tenant("t", Some(3)).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(Some(10), 1);
    for i in 0..3 {
        let m = meter(&c, "k", "t", &ch, T0).await.expect("allowed");
        assert_eq!(
            (m.budget_remaining, m.credits_remaining),
            (Some(9 - i), Some(2 - i))
        );
    }
    for _ in 0..4 {
        assert_eq!(
            meter(&c, "k", "t", &ch, T0).await,
            refused(Code::InsufficientCredits)
        );
    }
    // The refused calls cost the key's budget nothing.
    db.store
        .add_tenant_credits(&"t".into(), 100)
        .await
        .expect("top up")
        .expect("tenant");
    c.pool_changed(&"t".into());
    let m = meter(&c, "k", "t", &ch, T0)
        .await
        .expect("allowed after a top-up");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(6), Some(99))
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 4);
    assert_eq!(db.credits("t").await, Some(99));
}

#[tokio::test]
async fn a_cost_above_one_is_charged_in_full_and_refused_whole_when_it_does_not_fit() {
    let db = Db::open().await;
    db.tenant("t", Some(20)).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    let three = charge(Some(10), 3);
    for (budget, credits) in [(7, 17), (4, 14), (1, 11)] {
        let m = meter(&c, "k", "t", &three, T0).await.expect("allowed");
        assert_eq!(
            (m.budget_remaining, m.credits_remaining),
            (Some(budget), Some(credits))
        );
    }
    // 1 credit left: a call of 3 is refused and charges nothing ...
    assert_eq!(
        meter(&c, "k", "t", &three, T0).await,
        refused(Code::BudgetExhausted)
    );
    // ... so a call of 1 still fits, and then nothing does.
    let m = meter(&c, "k", "t", &charge(Some(10), 1), T0)
        .await
        .expect("the last credit");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(0), Some(10))
    );
    assert_eq!(
        meter(&c, "k", "t", &charge(Some(10), 1), T0).await,
        refused(Code::BudgetExhausted)
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 10);
    assert_eq!(db.credits("t").await, Some(10));
}

// ---------------------------------------------------------------------------------------------
// Refunds

#[tokio::test]
async fn a_refund_gives_back_exactly_what_was_charged() {
    let db = Db::open().await;
    db.tenant("t", Some(50)).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    let h = c.handles(&"k".into(), &"t".into());
    let m = c
        .meter_with(&h, &"k".into(), &"t".into(), &charge(Some(10), 4), T0)
        .await
        .expect("allowed");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(6), Some(46))
    );
    c.refund(&h, 4, &m);
    let m = c
        .meter_with(&h, &"k".into(), &"t".into(), &charge(Some(10), 1), T0)
        .await
        .expect("allowed");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(9), Some(49)),
        "the 4 credits are back in both the budget and the pool"
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 1);
    assert_eq!(db.credits("t").await, Some(49));
}

#[tokio::test]
async fn a_refund_of_a_spent_budget_allows_exactly_that_much_again() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(5)).await;
    let c = Counters::new(db.store.clone());
    let h = c.handles(&"k".into(), &"t".into());
    let ch = charge(Some(5), 1);
    let mut last = None;
    for _ in 0..5 {
        last = Some(
            c.meter_with(&h, &"k".into(), &"t".into(), &ch, T0)
                .await
                .expect("allowed"),
        );
    }
    assert_eq!(
        c.meter_with(&h, &"k".into(), &"t".into(), &ch, T0).await,
        refused(Code::BudgetExhausted)
    );
    c.refund(&h, 1, &last.expect("five calls were allowed"));
    let m = c
        .meter_with(&h, &"k".into(), &"t".into(), &ch, T0)
        .await
        .expect("refunded");
    assert_eq!(m.budget_remaining, Some(0));
    assert_eq!(
        c.meter_with(&h, &"k".into(), &"t".into(), &ch, T0).await,
        refused(Code::BudgetExhausted),
        "one credit refunded, one call more"
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 5);
}

#[tokio::test]
async fn a_refund_leaves_alone_what_the_charge_did_not_draw_from() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let h = c.handles(&"k".into(), &"t".into());
    let m = c
        .meter_with(&h, &"k".into(), &"t".into(), &charge(None, 5), T0)
        .await
        .expect("no budget, unlimited pool");
    assert_eq!((m.budget_remaining, m.credits_remaining), (None, None));
    c.refund(&h, 5, &m);
    assert_eq!(
        c.budget_leased(&"k".into()),
        0,
        "no budget: nothing to give back"
    );
    assert_eq!(
        c.credits_leased(&"t".into()),
        0,
        "unlimited pool: nothing to give back"
    );
    // A free call is never refunded.
    db.tenant("t2", Some(10)).await;
    db.key("k2", "t2", Some(10)).await;
    let h2 = c.handles(&"k2".into(), &"t2".into());
    let paid = c
        .meter_with(&h2, &"k2".into(), &"t2".into(), &charge(Some(10), 1), T0)
        .await
        .expect("allowed");
    c.refund(&h2, 0, &paid);
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k2").await, 1);
    assert_eq!(db.credits("t2").await, Some(9));
}

// ---------------------------------------------------------------------------------------------
// Flush, release_budget, pool_changed

#[tokio::test]
async fn flush_returns_every_unused_lease_to_the_store() {
    let db = Db::open().await;
    db.tenant("t", Some(10_000)).await;
    db.key("k", "t", Some(1_000)).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(Some(1_000), 1);
    for _ in 0..7 {
        meter(&c, "k", "t", &ch, T0).await.expect("allowed");
    }
    // Leases: the budget 20 (1_000 / 50); the pool 1, then 9_999 / 50 = 199.
    assert_eq!(
        (db.spent("k").await, c.budget_leased(&"k".into())),
        (20, 13)
    );
    assert_eq!(
        (db.credits("t").await, c.credits_leased(&"t".into())),
        (Some(9_800), 193)
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 7, "initial − spent");
    assert_eq!(db.credits("t").await, Some(9_993), "initial − spent");
    assert_eq!(
        (c.budget_leased(&"k".into()), c.credits_leased(&"t".into())),
        (0, 0)
    );
    // The counters keep working after a flush, and a second flush returns the new leases.
    let m = meter(&c, "k", "t", &ch, T0).await.expect("allowed");
    assert_eq!(
        (m.budget_remaining, m.credits_remaining),
        (Some(992), Some(9_992))
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 8);
    assert_eq!(db.credits("t").await, Some(9_992));
}

#[tokio::test]
async fn release_budget_returns_the_lease_so_a_new_cap_applies_to_what_was_spent() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(100)).await;
    db.key("small", "t", Some(5)).await;
    let c = Counters::new(db.store.clone());

    // Mid-lease: the unspent credit goes back to the store.
    meter(&c, "k", "t", &charge(Some(100), 1), T0)
        .await
        .expect("allowed");
    assert_eq!((db.spent("k").await, c.budget_leased(&"k".into())), (2, 1));
    c.release_budget(&"k".into()).await.expect("release");
    assert_eq!((db.spent("k").await, c.budget_leased(&"k".into())), (1, 0));

    // A spent budget raised from 5 to 8 allows exactly 3 more once released; until then this
    // node remembers that the store had nothing left.
    let five = charge(Some(5), 1);
    for _ in 0..5 {
        meter(&c, "small", "t", &five, T0).await.expect("allowed");
    }
    assert_eq!(
        meter(&c, "small", "t", &five, T0).await,
        refused(Code::BudgetExhausted)
    );
    db.set_budget("small", 8).await;
    assert_eq!(
        meter(&c, "small", "t", &five, T0).await,
        refused(Code::BudgetExhausted),
        "not released: the node still knows the store as empty"
    );
    c.release_budget(&"small".into()).await.expect("release");
    let eight = charge(Some(8), 1);
    for left in [2, 1, 0] {
        let m = meter(&c, "small", "t", &eight, T0).await.expect("raised");
        assert_eq!(m.budget_remaining, Some(left));
    }
    assert_eq!(
        meter(&c, "small", "t", &eight, T0).await,
        refused(Code::BudgetExhausted)
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("small").await, 8);
    // Releasing a family this node never used is a no-op.
    c.release_budget(&"never-used".into())
        .await
        .expect("release");
}

#[tokio::test]
async fn pool_changed_forgets_that_a_pool_was_empty() {
    let db = Db::open().await;
    db.tenant("t", Some(2)).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(None, 1);
    for _ in 0..2 {
        meter(&c, "k", "t", &ch, T0).await.expect("allowed");
    }
    assert_eq!(
        meter(&c, "k", "t", &ch, T0).await,
        refused(Code::InsufficientCredits)
    );
    db.store
        .add_tenant_credits(&"t".into(), 5)
        .await
        .expect("top up")
        .expect("tenant");
    assert_eq!(
        meter(&c, "k", "t", &ch, T0).await,
        refused(Code::InsufficientCredits),
        "not told: the node still knows the pool as empty"
    );
    c.pool_changed(&"t".into());
    for left in (0..5).rev() {
        let m = meter(&c, "k", "t", &ch, T0).await.expect("topped up");
        assert_eq!(m.credits_remaining, Some(left));
    }
    assert_eq!(
        meter(&c, "k", "t", &ch, T0).await,
        refused(Code::InsufficientCredits)
    );
    c.flush().await.expect("flush");
    assert_eq!(db.credits("t").await, Some(0));
    // Telling a node of a tenant it never saw is a no-op.
    c.pool_changed(&"never-seen".into());
}

#[tokio::test]
async fn pool_changed_forgets_that_a_pool_was_unlimited() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let ch = charge(None, 1);
    let m = meter(&c, "k", "t", &ch, T0).await.expect("unlimited");
    assert_eq!(m.credits_remaining, None);
    db.set_credits("t", Some(3)).await;
    let m = meter(&c, "k", "t", &ch, T0)
        .await
        .expect("still unlimited here");
    assert_eq!(m.credits_remaining, None, "not told of the plan change");
    assert_eq!(db.credits("t").await, Some(3), "and nothing drawn");
    c.pool_changed(&"t".into());
    for left in [2, 1, 0] {
        let m = meter(&c, "k", "t", &ch, T0).await.expect("limited now");
        assert_eq!(m.credits_remaining, Some(left));
    }
    assert_eq!(
        meter(&c, "k", "t", &ch, T0).await,
        refused(Code::InsufficientCredits)
    );
    c.flush().await.expect("flush");
    assert_eq!(db.credits("t").await, Some(0));
}

#[tokio::test]
async fn two_nodes_on_one_store_grant_a_budget_exactly_once_between_them() {
    let db = Db::open().await;
    db.tenant("t", Some(2_000)).await;
    db.key("k", "t", Some(500)).await;
    let a = Counters::new(db.store.clone());
    let b = Counters::new(db.store.clone());
    let ch = charge(Some(500), 1);
    let mut allowed = 0u64;
    // Alternate until both refuse: each node leases 10 at a time and spends its lease
    // before it says no.
    loop {
        let ra = meter(&a, "k", "t", &ch, T0).await;
        let rb = meter(&b, "k", "t", &ch, T0).await;
        for r in [&ra, &rb] {
            match r {
                Ok(_) => allowed += 1,
                Err(e) => assert_eq!(e.code, Code::BudgetExhausted),
            }
        }
        if ra.is_err() && rb.is_err() {
            break;
        }
        assert!(allowed <= 1_000, "still allowing after {allowed} of 500");
    }
    assert_eq!(allowed, 500);
    a.flush().await.expect("flush a");
    b.flush().await.expect("flush b");
    assert_eq!(db.spent("k").await, 500);
    assert_eq!(db.credits("t").await, Some(1_500));
}

// ---------------------------------------------------------------------------------------------
// Free calls

#[tokio::test]
async fn a_free_call_reports_the_budget_left_and_charges_nothing() {
    let db = Db::open().await;
    db.tenant("t", Some(10)).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    meter(&c, "k", "t", &charge(Some(10), 1), T0)
        .await
        .expect("allowed");
    for _ in 0..3 {
        let m = meter(&c, "k", "t", &charge(Some(10), 0), T0)
            .await
            .expect("free");
        assert_eq!((m.budget_remaining, m.credits_remaining), (Some(9), None));
    }
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 1);
    assert_eq!(db.credits("t").await, Some(9));
}

#[tokio::test]
async fn after_a_top_up_the_credits_shown_include_it() {
    let db = Db::open().await;
    db.tenant("t", Some(1_000)).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let m = meter(&c, "k", "t", &charge(None, 1), T0)
        .await
        .expect("allowed");
    assert_eq!(m.credits_remaining, Some(999));
    db.store
        .add_tenant_credits(&"t".into(), 500)
        .await
        .expect("top-up");
    c.pool_changed(&"t".into());
    let m = meter(&c, "k", "t", &charge(None, 1), T0)
        .await
        .expect("allowed");
    assert_eq!(m.credits_remaining, Some(1_498));
}

#[tokio::test]
async fn a_free_call_on_a_fresh_node_reports_the_whole_budget_left() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    let m = meter(&c, "k", "t", &charge(Some(10), 0), T0)
        .await
        .expect("free");
    assert_eq!(m.budget_remaining, Some(10));
}

#[tokio::test]
async fn a_free_call_after_a_budget_change_reports_the_new_budget_left() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(10)).await;
    let c = Counters::new(db.store.clone());
    let m = meter(&c, "k", "t", &charge(Some(10), 1), T0)
        .await
        .expect("allowed");
    assert_eq!(m.budget_remaining, Some(9));
    c.release_budget(&"k".into()).await.expect("release");
    db.set_budget("k", 20).await;
    let m = meter(&c, "k", "t", &charge(Some(20), 0), T0)
        .await
        .expect("free");
    assert_eq!(m.budget_remaining, Some(19));
}

// ---------------------------------------------------------------------------------------------
// Rate windows

fn decision(allowed: bool, remaining: u32, reset: u32, retry: u32) -> RateDecision {
    RateDecision {
        allowed,
        limit: 3,
        remaining,
        reset_seconds: reset,
        retry_after_seconds: retry,
        window_seconds: 60,
    }
}

#[tokio::test]
async fn a_rate_limit_of_3_allows_exactly_3_then_rate_limited_and_a_later_window_allows_again() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(100)).await;
    let c = Counters::new(db.store.clone());
    let ch = limited(3, 60, Some(100), 1);
    let now = T0 + 1_000;
    for left in [2, 1, 0] {
        let m = meter(&c, "k", "t", &ch, now)
            .await
            .expect("within the limit");
        assert_eq!(m.rate, Some(decision(true, left, 59, 0)));
    }
    // Refused: 3 in the window; Retry-After is when the previous window's weight lets one
    // through (20 s into the next window: 3 × 40/60 + 1 = 3), 79 s from now.
    for _ in 0..2 {
        assert_eq!(
            meter(&c, "k", "t", &ch, now).await,
            Err(Refused {
                code: Code::RateLimited,
                rate: Some(decision(false, 0, 59, 79)),
            })
        );
    }
    assert_eq!(
        meter(&c, "k", "t", &ch, T0 + 79_000)
            .await
            .map_err(|r| r.code),
        Err(Code::RateLimited),
        "one second before Retry-After"
    );
    let m = meter(&c, "k", "t", &ch, T0 + 80_000)
        .await
        .expect("at Retry-After");
    assert_eq!(m.rate, Some(decision(true, 0, 40, 0)));
    // Two windows later the slate is clean: 3 again.
    let later = T0 + 180_000;
    for left in [2, 1, 0] {
        let m = meter(&c, "k", "t", &ch, later).await.expect("a new window");
        assert_eq!(m.rate, Some(decision(true, left, 60, 0)));
    }
    assert_eq!(
        meter(&c, "k", "t", &ch, later).await.map_err(|r| r.code),
        Err(Code::RateLimited)
    );
    // Rate-limited calls cost nothing.
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 7);
}

#[tokio::test]
async fn the_previous_window_weighs_by_its_overlap_with_the_sliding_window() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let ch = limited(3, 60, None, 1);
    for _ in 0..3 {
        meter(&c, "k", "t", &ch, T0 + 10).await.expect("allowed");
    }
    let allowed_at = |now: i64| {
        let c = &c;
        let ch = &ch;
        async move {
            let mut n = 0;
            while meter(c, "k", "t", ch, now).await.is_ok() {
                n += 1;
                assert!(n <= 10, "still allowing after {n} of 3");
            }
            n
        }
    };
    // At the very start of the next window the previous counts whole (3): nothing fits.
    assert_eq!(allowed_at(T0 + 60_000).await, 0);
    // Half way it weighs 1.5: one more call (1.5 + 1 ≤ 3; 1.5 + 2 > 3).
    assert_eq!(allowed_at(T0 + 90_000).await, 1);
}

#[tokio::test]
async fn in_process_a_call_refused_for_money_still_uses_its_rate_slot() {
    // Pins today's in-process behaviour: the window counts a call before the budget is
    // checked. `SharedCounters` does not (see `shared.rs`
    // `a_call_refused_for_money_uses_no_rate_slot`): the two disagree.
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(1)).await;
    let c = Counters::new(db.store.clone());
    let ch = limited(3, 60, Some(1), 1);
    let codes: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(meter(&c, "k", "t", &ch, T0).await.err().map(|r| r.code));
        }
        v
    };
    assert_eq!(
        codes,
        [
            None,
            Some(Code::BudgetExhausted),
            Some(Code::BudgetExhausted),
            Some(Code::RateLimited)
        ]
    );
}

#[tokio::test]
async fn a_late_call_from_the_previous_window_does_not_reset_the_current_one() {
    let db = Db::open().await;
    let c = Counters::new(db.store.clone());
    let rl = RateLimit {
        limit: 3,
        window_seconds: 60,
    };
    let edge = T0 + 60_000;
    for _ in 0..3 {
        assert!(c.check_named("ip:192.0.2.1", &rl, edge + 1).allowed);
    }
    // Read its clock 2 ms earlier, in the previous (empty) window: it may pass ...
    let _ = c.check_named("ip:192.0.2.1", &rl, edge - 1);
    // ... but the new window already holds 3: nothing more passes in it.
    assert!(!c.check_named("ip:192.0.2.1", &rl, edge + 2).allowed);
}

#[tokio::test]
async fn check_named_limits_each_name_on_its_own() {
    let db = Db::open().await;
    let c = Counters::new(db.store.clone());
    let rl = RateLimit {
        limit: 2,
        window_seconds: 60,
    };
    let now = T0 + 30_000;
    let d = c.check_named("ip:203.0.113.7", &rl, now);
    assert_eq!((d.allowed, d.remaining, d.reset_seconds), (true, 1, 30));
    let d = c.check_named("ip:203.0.113.7", &rl, now);
    assert_eq!((d.allowed, d.remaining), (true, 0));
    let d = c.check_named("ip:203.0.113.7", &rl, now);
    assert_eq!((d.allowed, d.remaining), (false, 0));
    // 2 in this window: one fits again when they weigh 1, half way into the next window.
    assert_eq!(d.retry_after_seconds, 60);
    assert!(
        c.check_named("ip:203.0.113.8", &rl, now).allowed,
        "another address has its own window"
    );
    assert!(
        c.check_named("ip:203.0.113.7", &rl, now + 120_000).allowed,
        "two windows later"
    );
}

// ---------------------------------------------------------------------------------------------
// Sweep

#[tokio::test]
async fn sweep_drops_only_windows_that_are_old_and_not_held() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", None).await;
    let c = Counters::new(db.store.clone());
    let one = RateLimit {
        limit: 1,
        window_seconds: 60,
    };
    let later = T0 + 1_000;

    // A named window is kept while it can matter (started less than two windows ago) ...
    assert!(c.check_named("ip:a", &one, T0).allowed);
    c.sweep(later, 60_000);
    assert!(!c.check_named("ip:a", &one, later).allowed, "kept");
    // ... and dropped after (with a 400 ms window, two windows are long gone): a fresh
    // window allows again.
    c.sweep(later, 400);
    assert!(c.check_named("ip:a", &one, later).allowed, "swept");

    // A window held by a key's handles is never dropped, however old: the family must keep
    // one window.
    let ch = limited(1, 60, None, 0);
    let h = c.handles(&"k".into(), &"t".into());
    c.meter_with(&h, &"k".into(), &"t".into(), &ch, T0)
        .await
        .expect("allowed");
    c.sweep(later, 400);
    assert_eq!(
        c.meter_with(&h, &"k".into(), &"t".into(), &ch, later)
            .await
            .map_err(|r| r.code),
        Err(Code::RateLimited),
        "held: kept"
    );
    assert_eq!(
        meter(&c, "k", "t", &ch, later).await.map_err(|r| r.code),
        Err(Code::RateLimited),
        "and new handles find the same window"
    );
    drop(h);
    c.sweep(later, 400);
    assert!(
        meter(&c, "k", "t", &ch, later).await.is_ok(),
        "no longer held: swept"
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// 64 tasks on 4 threads, 4 calls each (256 calls) against a budget of 100.
async fn spend_concurrently(c: &Arc<Counters>, budget: u64) -> Vec<Result<Metered, Refused>> {
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let c = c.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let h = c.handles(&"k".into(), &"t".into());
            start.wait().await;
            let mut out = Vec::new();
            for _ in 0..4 {
                out.push(
                    c.meter_with(&h, &"k".into(), &"t".into(), &charge(Some(budget), 1), T0)
                        .await,
                );
                tokio::task::yield_now().await;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_spend_a_budget_of_100_exactly_once() {
    let db = Db::open().await;
    db.tenant("t", Some(1_000)).await;
    db.key("k", "t", Some(100)).await;
    let c = Arc::new(Counters::new(db.store.clone()));
    let all = spend_concurrently(&c, 100).await;
    let allowed = all.iter().filter(|r| r.is_ok()).count();
    assert_eq!(allowed, 100);
    for r in &all {
        if let Err(e) = r {
            assert_eq!(e.code, Code::BudgetExhausted, "every refusal: {e:?}");
        }
    }
    assert_eq!(all.len() - allowed, 156);
    c.flush().await.expect("flush");
    assert_eq!(
        db.spent("k").await,
        100,
        "budget balance 0: none lost, none twice"
    );
    assert_eq!(
        db.credits("t").await,
        Some(900),
        "the pool paid for exactly 100"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_each_see_a_different_budget_remaining() {
    let db = Db::open().await;
    db.tenant("t", None).await;
    db.key("k", "t", Some(100)).await;
    let c = Arc::new(Counters::new(db.store.clone()));
    // One call first, so that the node knows the pool is unlimited: before that, a task that
    // finds no pool lease gives its budget credit back and takes it again, and the figure it
    // saw in between is seen twice.
    let first = meter(&c, "k", "t", &charge(Some(100), 1), T0)
        .await
        .expect("allowed");
    let all = spend_concurrently(&c, 100).await;
    let mut shown: Vec<u64> = all
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .chain([&first])
        .map(|m| m.budget_remaining.expect("a budget"))
        .collect();
    shown.sort_unstable();
    assert_eq!(
        shown,
        (0..100).collect::<Vec<_>>(),
        "99 down to 0, once each"
    );
    c.flush().await.expect("flush");
    assert_eq!(db.spent("k").await, 100);
}

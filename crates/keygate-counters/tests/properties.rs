//! Property tests of the in-process [`Counters`] against a real SQLite store: for random
//! sequences of charges and refunds against a key budget and a tenant pool, one node decides
//! exactly as a plain model does (a call is allowed iff its cost fits what is left of both), so
//! the allowed total never exceeds the budget, and after a flush the store holds
//! `budget − (charged − refunded)` and `pool − (charged − refunded)`.
#![forbid(unsafe_code)]

mod support;

use keygate_core::Code;
use keygate_counters::{Counters, Metered};
use proptest::prelude::*;
use support::{charge, Db, T0};

#[derive(Debug, Clone)]
enum Op {
    /// Charge `cost`; refund it at once when `refund`.
    Charge { cost: u64, refund: bool },
    /// Refund an earlier allowed charge not yet refunded (picked modulo their number).
    RefundEarlier(usize),
    /// Return every lease to the store (a shutdown that the node survives).
    Flush,
    /// Return the budget lease (before a budget change).
    ReleaseBudget,
    /// Forget that the pool was empty (a top-up elsewhere).
    PoolChanged,
}

fn cost() -> impl Strategy<Value = u64> {
    // Mostly small costs, so that budgets run out through many calls; some large ones, so
    // that a call sometimes does not fit what is left, or more than one lease.
    prop_oneof![6 => 0u64..=3, 2 => 4u64..=60, 1 => 61u64..=1_500]
}

fn charges() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (cost(), any::<bool>()).prop_map(|(cost, refund)| Op::Charge { cost, refund }),
        1..120,
    )
}

fn mixed() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            10 => (cost(), any::<bool>()).prop_map(|(cost, refund)| Op::Charge { cost, refund }),
            2 => any::<usize>().prop_map(Op::RefundEarlier),
            1 => Just(Op::Flush),
            1 => Just(Op::ReleaseBudget),
            1 => Just(Op::PoolChanged),
        ],
        1..120,
    )
}

fn budget() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..=60, 61u64..=5_000, 50_000u64..=200_000]
}

fn pool() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![1 => Just(None), 3 => (0u64..=6_000).prop_map(Some)]
}

/// Runs `ops` on one node and checks every decision against the model. `exact_figures`: also
/// check the `budget_remaining` / `credits_remaining` every allowed call shows.
async fn run(
    budget: u64,
    pool: Option<u64>,
    ops: Vec<Op>,
    exact_figures: bool,
) -> Result<(), TestCaseError> {
    let db = Db::open().await;
    db.tenant("t", pool).await;
    db.key("k", "t", Some(budget)).await;
    let c = Counters::new(db.store.clone());
    let h = c.handles(&"k".into(), &"t".into());
    // The model: what is left of the budget and the pool, and what the node has charged.
    let (mut b, mut p) = (budget, pool);
    let (mut charged, mut refunded) = (0u64, 0u64);
    let mut unrefunded: Vec<(u64, Metered)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Charge { cost, refund } => {
                let got = c
                    .meter_with(
                        &h,
                        &"k".into(),
                        &"t".into(),
                        &charge(Some(budget), cost),
                        T0,
                    )
                    .await;
                let fits_budget = cost <= b;
                let fits_pool = p.is_none_or(|p| cost <= p);
                if cost == 0 {
                    prop_assert!(got.is_ok(), "op {i}: a free call is allowed: {got:?}");
                    continue;
                }
                if !(fits_budget && fits_pool) {
                    let want = if fits_budget {
                        Code::InsufficientCredits
                    } else {
                        Code::BudgetExhausted
                    };
                    prop_assert_eq!(
                        got.map_err(|r| r.code).err(),
                        Some(want),
                        "op {}: cost {} with budget {} and pool {:?} left",
                        i,
                        cost,
                        b,
                        p
                    );
                    continue;
                }
                let m = got.map_err(|r| {
                    TestCaseError::fail(format!(
                        "op {i}: cost {cost} fits budget {b} and pool {p:?}, refused: {r:?}"
                    ))
                })?;
                b -= cost;
                p = p.map(|p| p - cost);
                charged += cost;
                if exact_figures {
                    prop_assert_eq!(m.budget_remaining, Some(b), "op {}: budget shown", i);
                    prop_assert_eq!(m.credits_remaining, p, "op {}: pool shown", i);
                }
                if refund {
                    c.refund(&h, cost, &m);
                    b += cost;
                    p = p.map(|p| p + cost);
                    refunded += cost;
                } else {
                    unrefunded.push((cost, m));
                }
            }
            Op::RefundEarlier(pick) => {
                if !unrefunded.is_empty() {
                    let (cost, m) = unrefunded.swap_remove(pick % unrefunded.len());
                    c.refund(&h, cost, &m);
                    b += cost;
                    p = p.map(|p| p + cost);
                    refunded += cost;
                }
            }
            Op::Flush => c.flush().await.expect("flush"),
            Op::ReleaseBudget => c.release_budget(&"k".into()).await.expect("release"),
            Op::PoolChanged => c.pool_changed(&"t".into()),
        }
        prop_assert!(
            charged - refunded <= budget,
            "op {}: {} granted of a budget of {}",
            i,
            charged - refunded,
            budget
        );
    }
    c.flush().await.expect("flush");
    let net = charged - refunded;
    prop_assert_eq!(budget - db.spent("k").await, budget - net, "budget balance");
    prop_assert_eq!(db.credits("t").await, pool.map(|p| p - net), "pool balance");
    prop_assert_eq!(
        (c.budget_leased(&"k".into()), c.credits_leased(&"t".into())),
        (0, 0)
    );
    Ok(())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

proptest! {
    // No failure file: a failure prints its shrunk input, and runs against deliberately
    // broken code (to show that these properties can fail) must not leave seeds behind.
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Charges, some refunded at once: every decision and every figure shown is the model's.
    #[test]
    fn one_node_charges_exactly_what_fits_and_the_store_balances_after_flush(
        budget in budget(),
        pool in pool(),
        ops in charges(),
    ) {
        block_on(run(budget, pool, ops, true))?;
    }

    /// With late refunds, flushes, budget releases and pool changes in between: every
    /// decision is still the model's and the store balances after the last flush.
    #[test]
    fn late_refunds_flushes_and_releases_lose_or_grant_nothing(
        budget in budget(),
        pool in pool(),
        ops in mixed(),
    ) {
        block_on(run(budget, pool, ops, false))?;
    }
}

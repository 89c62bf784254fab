//! The whole hot path of one decision on a cached key, as `/v1/auth` runs it: parse, hash,
//! cache lookup (moka), decide, rate window, budget and tenant-pool leases (in memory), the
//! last-used note. Run: `cargo bench -p keygate-server --bench pipeline`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Instant;

mod support;
use support::facts;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, key) = rt.block_on(async {
        let (app, plaintext, record) =
            support::node_with_key(dir.path(), keygate_server::Config::default()).await;
        let state = app.state().clone();
        state.store.insert_key(&record).await.expect("insert");
        // Keep the app's background tasks alive for the run.
        std::mem::forget(app);
        (state, plaintext)
    });
    // Warm the cache and the leases.
    rt.block_on(async {
        let f = facts(keygate_engine::clock::now_ms());
        state
            .authorize(Ok(Some(&key)), &f, None)
            .await
            .expect("allowed");
    });
    c.bench_function("authorize_cached_key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let f = facts(keygate_engine::clock::now_ms());
                let start = Instant::now();
                for _ in 0..iters {
                    let a = state.authorize(Ok(Some(&key)), &f, None).await;
                    assert!(a.is_ok());
                }
                start.elapsed()
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

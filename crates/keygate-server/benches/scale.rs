//! How the cost of a decision grows with the number of cached keys: the whole pipeline on a
//! cached key (as `pipeline.rs` measures it) with 1 k, 100 k and 1 M distinct keys in the
//! cache, each lookup a different key than the last, and the resident memory each cached key
//! costs (the entry, its policy and header values, its rate window). Run:
//! `cargo bench -p keygate-server --bench scale` (prints `bytes per cached key` per size).

use criterion::{criterion_group, criterion_main, Criterion};
use keygate_core::{FamilyId, KeyId, Kind};
use keygate_server::Config;
use std::sync::Arc;
use std::time::Instant;

mod support;
use support::facts;

/// Resident memory of this process, bytes (Linux `/proc/self/statm`).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn bench(c: &mut Criterion) {
    for n in [1_000usize, 100_000, 1_000_000] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, keys, app) = rt.block_on(async {
            let mut config = Config::default();
            config.cache.max_entries = n as u64 + 16;
            config.cache.ttl_seconds = 3600;
            let (app, _, mut template) = support::node_with_key(dir.path(), config).await;
            let state = app.state().clone();
            // No budget (the preset sets one): a budget is leased from the key's row, and
            // these keys have none in the store (the pipeline bench measures the leases).
            template.budget = None;
            // Distinct, well-formed keys (a cheap generator: not secrets).
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            let keys: Vec<String> = (0..n)
                .map(|_| {
                    state.format.generate(Kind::Pk, |buf| {
                        for b in buf.iter_mut() {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            *b = seed as u8;
                        }
                    })
                })
                .collect();
            let before = rss();
            for (i, k) in keys.iter().enumerate() {
                let id = format!("key_{i:022}");
                let mut record = template.clone();
                record.id = KeyId::from(id.as_str());
                record.family_id = FamilyId::from(id.as_str());
                record.hash = state.hasher.hash(k);
                let cached = state.cached_key(record).await.expect("cached");
                state.cache.insert(cached.record.hash, Arc::new(cached));
            }
            state.cache.run_pending_tasks();
            let grown = rss().saturating_sub(before);
            println!(
                "{n} cached keys: {} bytes per cached key ({} MB resident for the cache)",
                grown / n as u64,
                grown / 1_000_000
            );
            (state, keys, app)
        });
        let mut next = 0usize;
        c.bench_function(&format!("authorize, {n} cached keys"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let f = facts(keygate_engine::clock::now_ms());
                    let start = Instant::now();
                    for _ in 0..iters {
                        // A stride coprime with every n here: each call another key.
                        next = (next + 7_919) % n;
                        let a = state.authorize(Ok(Some(&keys[next])), &f, None).await;
                        assert!(a.is_ok(), "{:?}", a.err().map(|d| d.code));
                    }
                    start.elapsed()
                })
            })
        });
        drop(keys);
        drop(state);
        drop(app);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

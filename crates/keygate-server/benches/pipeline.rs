//! The whole hot path of one decision on a cached key, as `/v1/auth` runs it: parse, hash,
//! cache lookup (moka), decide, rate window, budget and tenant-pool leases (in memory), the
//! last-used note. Run: `cargo bench -p keygate-server --bench pipeline`.

use criterion::{criterion_group, criterion_main, Criterion};
use keygate_core::{RequestFacts, RouteClass};
use keygate_server::{Application, Config};
use std::time::Instant;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, key) = rt.block_on(async {
        let config = Config {
            listen: "127.0.0.1:0".into(),
            database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
            ..Config::default()
        };
        let app = Application::build(config).await.expect("app");
        let state = app.state().clone();
        let issuer = state.issuer();
        let body: keygate_engine::issue::CreateKey = serde_json::from_value(serde_json::json!({
            "kind": "pk", "name": "bench", "preset": "aidemo",
            "budget": 1_000_000_000u64,
            "rate_limit": {"limit": 1_000_000_000u32, "window_seconds": 60},
        }))
        .expect("body");
        let (plaintext, record) = keygate_engine::issue::build_key(
            &issuer,
            &*state.store,
            &"default".into(),
            body,
            keygate_engine::clock::now_ms(),
        )
        .await
        .expect("key");
        state.store.insert_key(&record).await.expect("insert");
        // Keep the app's background tasks alive for the run.
        std::mem::forget(app);
        (state, plaintext)
    });
    let facts = |now| RequestFacts {
        path: None,
        method: "POST",
        route_class: RouteClass::Normal,
        scope: Some("ocr:read"),
        origin: Some("https://claude.ai"),
        ip: Some("10.1.2.3".parse().expect("ip")),
        tenant_id: None,
        cost: 1,
        now_ms: now,
        management: false,
    };
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

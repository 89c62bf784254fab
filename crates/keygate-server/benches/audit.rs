//! The audit log's cost per event, apart from HTTP: the hot path's part (numbering a
//! decision's line, formatting it and writing it to the segment, alone and in a group of 32)
//! and the shipper's (reading the segment, reading each line's fields, chaining the lines by
//! hash, compressing them into blocks and storing them in SQLite with the usage roll-up). Run: `cargo bench -p keygate-server
//! --bench audit`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keygate_engine::audit::{AuditLog, Line, Shipper};
use keygate_store::{SqlStore, Store};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

/// A decision like the forward-auth benchmark's: a `pk` key with every check.
fn line<'a>() -> Line<'a> {
    Line {
        at_ms: keygate_engine::clock::now_ms(),
        tenant_id: Some("default"),
        actor: "key_0Vc1Af8HmQ6ljLfZEuUCPp",
        action: "request.decided",
        key_id: Some("key_0Vc1Af8HmQ6ljLfZEuUCPp"),
        kind: Some("pk"),
        code: Some("VALID"),
        status: Some(200),
        method: Some("GET"),
        scope: Some("ocr:read"),
        ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        origin: Some("https://claude.ai"),
        credits: Some(1),
        latency_us: Some(9),
        request_id: Some("req_Trv5pVgD0000002861"),
        ..Line::default()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rt.block_on(async {
        let s = SqlStore::sqlite(&format!("sqlite://{}", dir.path().join("b.db").display()))
            .await
            .expect("sqlite");
        s.migrate().await.expect("migrate");
        s
    });
    let open = |name: &str| {
        rt.block_on(AuditLog::open(
            &dir.path().join(name),
            name,
            &keygate_engine::audit::StoreSink(&store),
            64 << 20,
        ))
        .expect("open")
    };

    let hot = open("hot");
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("record one decision, one write", |b| {
        b.iter(|| hot.record(line()).expect("record"))
    });
    g.throughput(Throughput::Elements(32));
    g.bench_function("record 32 decisions, one group write", |b| {
        b.iter(|| {
            let mut group = 0;
            for _ in 0..32 {
                group = hot.append(line()).expect("append");
            }
            hot.flush(group).expect("flush")
        })
    });

    let log = open("ship");
    let mut shipper = Shipper::default();
    g.throughput(Throughput::Elements(1_000));
    g.sample_size(20);
    g.bench_function("ship 1,000 decisions to SQLite", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                for _ in 0..1_000 {
                    log.record(line()).expect("record");
                }
                let t = Instant::now();
                let n = rt
                    .block_on(shipper.ship(&log, &keygate_engine::audit::StoreSink(&store)))
                    .expect("ship");
                took += t.elapsed();
                assert_eq!(n, 1_000);
            }
            took
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

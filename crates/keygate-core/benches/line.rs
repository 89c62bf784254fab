//! What the audit shipper does to each line it reads back from a node's segment: read the
//! fields it needs ([`LineHead::scan`]) and chain it ([`line_hash`]).
//! Run: `cargo bench -p keygate-core --bench line`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keygate_core::audit::{line_hash, LineHead};

/// A forward-auth decision's line, as `bench/forward-auth.sh` makes the audit log write it.
const LINE: &[u8] = br#"{"node":"node_jUoEkW3w","seq":182194,"at_ms":1796127249381,"tenant_id":"default","actor":"key_0VcYIrDxOczTVRjLrdflZy","action":"request.decided","key_id":"key_0VcYIrDxOczTVRjLrdflZy","kind":"pk","code":"VALID","status":200,"method":"GET","scope":"ocr:read","ip":"127.0.0.1","origin":"https://claude.ai","credits":1,"latency_us":2,"request_id":"req_knQzObJ60000182192"}"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit line");
    g.throughput(Throughput::Bytes(LINE.len() as u64));
    g.bench_function("scan", |b| {
        b.iter(|| LineHead::scan(black_box(LINE)).expect("scans"))
    });
    g.bench_function("serde_json", |b| {
        b.iter(|| serde_json::from_slice::<LineHead<'_>>(black_box(LINE)).expect("parses"))
    });
    g.bench_function("line_hash", |b| {
        b.iter(|| line_hash(black_box(&[7; 32]), black_box(LINE)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

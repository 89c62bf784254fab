//! The hot path of the core: parse a presented key (format + CRC32), hash it (SHA-256), and
//! decide on the cached policy. Run: `cargo bench -p keygate-core --bench decide`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keygate_core::{
    decide, IpAllowList, KeyFormat, KeyHasher, KeyPolicy, KeyStatus, Kind, OriginList, RateLimit,
    RequestFacts, RouteClass, ScopeSet, WindowState,
};

fn policy() -> KeyPolicy {
    KeyPolicy {
        id: "key_0Vbo94ELIXeR4hqQlfAxWG".into(),
        tenant_id: "default".into(),
        user_id: None,
        kind: Kind::Pk,
        status: KeyStatus::Active,
        scopes: ScopeSet::parse(&["ocr:read", "llm:generate", "translate:run", "docs:read"])
            .expect("scopes"),
        allowed_ips: IpAllowList::parse(&["10.0.0.0/8", "2001:db8::/32"]).expect("ips"),
        allowed_origins: OriginList::parse(&[
            "https://claude.ai",
            "https://chatgpt.com",
            "https://gemini.google.com",
            "https://*.example.com",
        ])
        .expect("origins"),
        rate_limit: Some(RateLimit {
            limit: 60,
            window_seconds: 60,
        }),
        budget: Some(2_000),
        expires_at_ms: Some(i64::MAX),
        plan_gate: None,
        resource_only: false,
    }
}

fn bench(c: &mut Criterion) {
    let format = KeyFormat::default();
    let mut n = 3u8;
    let key = format.generate(Kind::Pk, |b| {
        for x in b.iter_mut() {
            n = n.wrapping_mul(17).wrapping_add(5);
            *x = n;
        }
    });
    let hasher = KeyHasher::sha256();
    let peppered = KeyHasher::with_pepper(b"server-side pepper");
    let stored = hasher.hash(&key);
    let p = policy();
    let facts = RequestFacts {
        path: None,
        method: "POST",
        route_class: RouteClass::Normal,
        scope: Some("docs:read"),
        origin: Some("https://app.example.com"),
        ip: Some("10.1.2.3".parse().expect("ip")),
        tenant_id: None,
        cost: 1,
        now_ms: 1_700_000_000_000,
        management: false,
    };

    c.bench_function("parse", |b| {
        b.iter(|| format.parse(black_box(&key)).is_ok())
    });
    c.bench_function("hash_sha256", |b| b.iter(|| hasher.hash(black_box(&key))));
    c.bench_function("hash_hmac_pepper", |b| {
        b.iter(|| peppered.hash(black_box(&key)))
    });
    c.bench_function("decide", |b| {
        b.iter(|| decide(Some(black_box(&p)), black_box(&facts)).is_ok())
    });
    c.bench_function("parse_hash_decide", |b| {
        b.iter(|| {
            let parsed = format.parse(black_box(&key)).expect("valid");
            let h = hasher.hash(parsed.expose_secret());
            assert!(h.ct_eq(&stored));
            decide(Some(black_box(&p)), black_box(&facts)).is_ok()
        })
    });
    let rl = RateLimit {
        limit: u32::MAX,
        window_seconds: 60,
    };
    let mut w = WindowState::default();
    let mut t = 1_700_000_000_000i64;
    c.bench_function("rate_window_check", |b| {
        b.iter(|| {
            t += 1;
            w.check(black_box(&rl), t, 1).allowed
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

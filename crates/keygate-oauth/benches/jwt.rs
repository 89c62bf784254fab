//! What an access token costs where it is not cached: signing one (token endpoint) and
//! verifying one (the first use of a token on a node, and introspection).
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use keygate_oauth::jwt::{generate_ed25519, AccessClaims, KeyMaterial, Keyring};

fn bench(c: &mut Criterion) {
    let (pkcs8, x) = generate_ed25519().expect("key");
    let ring = Keyring::new(&[KeyMaterial {
        kid: "k1".into(),
        pkcs8,
        x,
        active: true,
    }])
    .expect("ring");
    let claims = AccessClaims {
        iss: "https://auth.example".into(),
        sub: "usr_01234567890123456789".into(),
        aud: "https://auth.example".into(),
        exp: 4_000_000_000,
        iat: 3_999_996_400,
        jti: "at_0123456789012345678901".into(),
        client_id: "cli_01234567890123456789".into(),
        scope: "docs:read ocr:read".into(),
        tenant_id: "default".into(),
        grant_id: "grt_01234567890123456789".into(),
    };
    let token = ring.sign(&claims).expect("sign");
    c.bench_function("jwt sign (EdDSA)", |b| {
        b.iter(|| ring.sign(std::hint::black_box(&claims)))
    });
    c.bench_function("jwt verify (EdDSA, iss, aud, exp)", |b| {
        b.iter(|| {
            ring.verify(
                std::hint::black_box(&token),
                "https://auth.example",
                "https://auth.example",
            )
        })
    });
    c.bench_function("pkce verify_s256", |b| {
        b.iter(|| {
            keygate_oauth::pkce::verify_s256(
                std::hint::black_box("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
                "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

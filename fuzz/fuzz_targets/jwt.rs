//! JWT access tokens: verifying any string never panics and never accepts what this keyring
//! did not sign (no `alg: none`, no other algorithm, no other key).
#![no_main]
use keygate_oauth::jwt::{generate_ed25519, KeyMaterial, Keyring};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keyring() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| {
        let (pkcs8, x) = generate_ed25519().expect("key");
        Keyring::new(&[KeyMaterial {
            kid: "k1".into(),
            pkcs8,
            x,
            active: true,
        }])
        .expect("keyring")
    })
}

fuzz_target!(|token: &str| {
    let _ = keygate_oauth::jwt::looks_like_jwt(token);
    assert!(
        keyring().verify(token, "https://issuer", "api").is_err(),
        "{token}"
    );
});

//! The parsers of OAuth request parameters (the form and query fields of /oauth/authorize and
//! /oauth/token): redirect URIs, scope strings and PKCE values never panic, and what they accept
//! keeps its promises.
#![no_main]
use keygate_oauth::{pkce, redirect, scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (a, b) = input;
    if redirect::problem(a).is_none() && redirect::matches(a, b) {
        assert!(redirect::problem(b).is_none() || a == b, "{a} matched {b}");
    }
    if let Some(scopes) = scope::parse(a) {
        assert_eq!(scope::parse(&scope::join(&scopes)), Some(scopes.clone()));
    }
    if pkce::valid_verifier(a) {
        assert!(pkce::verify_s256(a, &pkce::challenge_of(a)));
    }
    let _ = pkce::valid_challenge(b);
    let _ = pkce::verify_s256(a, b);
});

//! What the pipeline benches share: a node on a fresh SQLite file with a publishable key of
//! the AI-demo preset, and the facts of the call they judge.

use keygate_core::{RequestFacts, RouteClass};
use keygate_server::{Application, Config};

/// Builds a node with `config` (listen and database set here) and a pk key (budget and rate
/// limit that never bind): the app (keep it alive), the key's plaintext and its record, not
/// yet stored.
pub async fn node_with_key(
    dir: &std::path::Path,
    mut config: Config,
) -> (Application, String, keygate_store::KeyRecord) {
    config.listen = "127.0.0.1:0".into();
    config.database_url = format!("sqlite://{}", dir.join("bench.db").display());
    let app = Application::build(config).await.expect("app");
    let state = app.state().clone();
    let body: keygate_engine::issue::CreateKey = serde_json::from_value(serde_json::json!({
        "kind": "pk", "name": "bench", "preset": "aidemo",
        "budget": 1_000_000_000u64,
        "rate_limit": {"limit": 1_000_000_000u32, "window_seconds": 60},
    }))
    .expect("body");
    let (plaintext, record) = keygate_engine::issue::build_key(
        &state.issuer(),
        &*state.store,
        &"default".into(),
        body,
        keygate_engine::clock::now_ms(),
    )
    .await
    .expect("key");
    (app, plaintext, record)
}

/// A browser call from an allowed origin and address, asking `ocr:read` at cost 1.
pub fn facts(now_ms: i64) -> RequestFacts<'static> {
    RequestFacts {
        path: None,
        method: "POST",
        route_class: RouteClass::Normal,
        scope: Some("ocr:read"),
        origin: Some("https://claude.ai"),
        ip: Some("10.1.2.3".parse().expect("ip")),
        tenant_id: None,
        cost: 1,
        now_ms,
        management: false,
    }
}

//! `GET /v1/status`: public health and version ("visitor" access).

use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

/// Health and version; no key needed.
pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let redis = match &state.shared {
        None => Value::Null,
        Some(s) => Value::from(if s.ping().await { "ok" } else { "down" }),
    };
    Json(json!({
        "redis": redis,
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.node_id,
        "store": if state.config.database_url.starts_with("postgres") { "postgres" } else { "sqlite" },
        "counters": if state.shared.is_some() { "redis" } else { "in-process" },
    }))
}

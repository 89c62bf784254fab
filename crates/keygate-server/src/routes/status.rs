//! `GET /v1/status`: public health and version ("visitor" access).

use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

/// `GET /v1/health/live`: the process is up (no dependency checked).
#[utoipa::path(
    operation_id = "status_live",
    get,
    path = "/v1/health/live",
    tag = "status",
    summary = "Liveness",
    responses((status = 200, body = Object))
)]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /v1/health/ready`: 200 when the store (and Redis, when configured) answer, else 503
/// with what is down — for load balancers to take a node out of rotation.
#[utoipa::path(
    operation_id = "status_ready",
    get,
    path = "/v1/health/ready",
    tag = "status",
    summary = "Readiness: 503 while a backing store is down",
    responses((status = 200, body = Object), (status = 503, body = Object))
)]
pub async fn ready(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let store_ok = state
        .store
        .get_tenant(&crate::routes::default_tenant())
        .await
        .is_ok();
    let redis_ok = match &state.shared {
        None => true,
        Some(s) => s.ping().await,
    };
    if state.shared.is_some() {
        state.metrics.redis_up.set(if redis_ok { 1.0 } else { 0.0 });
    }
    let body = json!({
        "status": if store_ok && redis_ok { "ready" } else { "unavailable" },
        "store": if store_ok { "ok" } else { "down" },
        "redis": state.shared.as_ref().map(|_| if redis_ok { "ok" } else { "down" }),
    });
    let code = if store_ok && redis_ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Health and version; no key needed.
#[utoipa::path(
    operation_id = "status_status",
    get,
    path = "/v1/status",
    tag = "status",
    summary = "Health and version (no key)",
    responses((status = 200, body = Object))
)]
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

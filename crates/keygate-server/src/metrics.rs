//! `GET /metrics`: the Prometheus text of this process's metrics (the handles are
//! `keygate_engine::metrics`).

pub use keygate_engine::metrics::{handle, Metrics};

/// Scope to read `/metrics` on the main listener.
pub const METRICS_READ: &str = "metrics:read";

/// `GET /metrics` on the main listener: only for the operator's keys (tenant `default`) with
/// scope `metrics:read` (Prometheus sends one as `authorization: credentials`). Metrics
/// describe every tenant, and they tell an attacker how the node is doing. On
/// `[metrics] listen` they are served without a key.
pub async fn render_for_operator(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    ctx: crate::routes::Ctx,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match ctx
        .caller(&state, METRICS_READ, keygate_core::RouteClass::Admin)
        .await
    {
        Ok(c) if c.tenant() == crate::routes::DEFAULT_TENANT => render().await,
        Ok(_) => crate::error::ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "metrics are for the operator's keys (tenant default) with scope metrics:read",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The Prometheus text format.
pub async fn render() -> axum::response::Response {
    use axum::response::IntoResponse;
    match handle() {
        Some(h) => {
            h.run_upkeep();
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                h.render(),
            )
                .into_response()
        }
        None => crate::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "metrics are not available in this process",
        )
        .into_response(),
    }
}

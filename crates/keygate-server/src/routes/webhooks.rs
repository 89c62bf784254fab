//! `/v1/webhooks`: a tenant's endpoints (secret shown once), their delivery log, test-send.

use super::{detached, next_cursor, Caller, Ctx, PageQuery};
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;
use crate::views::{rfc3339, DeliveryView, ListView, WebhookView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::CreateWebhook;
use keygate_core::RouteClass;
use keygate_engine::clock::now_ms;
use keygate_engine::config::Feature;
use keygate_engine::webhooks::{EVENT_TYPES, SUCCESSOR_EVENT};
use keygate_store::{Delivery, WebhookEndpoint};
use serde::Deserialize;

/// Scope to read endpoints and deliveries.
pub const READ: &str = "webhooks:read";
/// Scope to create, change, delete and test endpoints.
pub const WRITE: &str = "webhooks:write";

fn webhook_view(w: &WebhookEndpoint, with_secret: bool) -> WebhookView {
    WebhookView {
        id: w.id.clone(),
        tenant_id: w.tenant_id.to_string(),
        url: w.url.clone(),
        events: w.events.clone(),
        enabled: w.enabled,
        disabled_reason: w.disabled_reason.clone(),
        created_at: rfc3339(w.created_at_ms),
        secret: with_secret.then(|| w.secret.clone()),
    }
}

fn delivery_view(d: Delivery) -> DeliveryView {
    DeliveryView {
        next_attempt_at: (d.status == "pending").then(|| rfc3339(d.next_at_ms)),
        delivered_at: d.delivered_at_ms.map(rfc3339),
        created_at: rfc3339(d.created_at_ms),
        id: d.id,
        event_id: d.event_id,
        event_type: d.event_type,
        status: d.status,
        attempts: d.attempts,
        last_status: d.last_status,
        last_error: d.last_error,
    }
}

fn check_url(state: &AppState, url: &str) -> Result<(), ApiError> {
    if url.len() > 2048 {
        return Err(ApiError::invalid("url must be at most 2048 characters"));
    }
    match keygate_engine::webhooks::url_problem(url, state.config.webhooks.allow_private_networks) {
        Some(why) => Err(ApiError::invalid(why)),
        None => Ok(()),
    }
}

fn check_events(events: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let events = events.unwrap_or_else(|| vec!["*".into()]);
    if events.is_empty() {
        return Err(ApiError::invalid(
            "events must name at least one event type, or \"*\"",
        ));
    }
    for e in &events {
        if e != "*" && e != SUCCESSOR_EVENT && !EVENT_TYPES.contains(&e.as_str()) {
            return Err(ApiError::invalid(format!(
                "unknown event type {e:?}; known: *, {SUCCESSOR_EVENT}, {}",
                EVENT_TYPES.join(", ")
            )));
        }
    }
    Ok(events)
}

/// Refuses a caller without scope `*` for an endpoint subscribed to [`SUCCESSOR_EVENT`]:
/// whoever may not set one up may not switch it off or delete it either, which would stop
/// automatic rotation (a key due for rotation waits until its successor can be delivered).
fn may_manage(caller: &Caller, events: &[String], doing: &str) -> Result<(), ApiError> {
    if events.iter().any(|e| e == SUCCESSOR_EVENT) && !caller.key.record.scopes.has_all() {
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            format!("{doing} key.rotated.successor needs a key with scope *"),
        ));
    }
    Ok(())
}

/// `POST /v1/webhooks`
#[utoipa::path(
    operation_id = "webhooks_create",
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    summary = "Create a webhook endpoint (secret shown once)",
    description = "Needs scope `webhooks:write`.",
    request_body = CreateWebhook,
    responses((status = 201, body = WebhookView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<CreateWebhook>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Webhook).await?;
    caller.require_feature(&state, Feature::Webhooks).await?;
    let tenant = caller.act_in(&state, body.tenant_id.as_deref()).await?;
    check_url(&state, &body.url)?;
    let events = check_events(body.events)?;
    if events.iter().any(|e| e == SUCCESSOR_EVENT) {
        // It receives new plaintext keys of any scope: only a key that holds every scope may
        // set it up, and only over TLS.
        may_manage(&caller, &events, "subscribing to")?;
        if !body.url.starts_with("https://") && !state.config.webhooks.allow_private_networks {
            return Err(ApiError::invalid(
                "key.rotated.successor needs an https:// url",
            ));
        }
    }
    let now = now_ms();
    let w = WebhookEndpoint {
        id: keygate_engine::ids::new_id("whk", now),
        tenant_id: tenant,
        url: body.url,
        secret: keygate_engine::webhooks::new_secret(),
        events,
        enabled: true,
        disabled_reason: None,
        created_at_ms: now,
    };
    let (st, rec, actor) = (state.clone(), w.clone(), caller.key.record.id.clone());
    detached(async move {
        st.store.insert_webhook(&rec).await?;
        let detail =
            serde_json::json!({"webhook_id": rec.id, "url": rec.url, "events": rec.events});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "webhook.created",
            tenant_id: &rec.tenant_id,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(webhook_view(&w, true))))
}

/// `GET /v1/webhooks` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /v1/webhooks`
#[utoipa::path(
    operation_id = "webhooks_list",
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    summary = "List webhook endpoints",
    description = "Needs scope `webhooks:read`.",
    params(ListQuery),
    responses((status = 200, body = ListView<WebhookView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<ListView<WebhookView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Webhook).await?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .page()?;
    let tenant = caller.act_in(&state, q.tenant_id.as_deref()).await?;
    let items = state.store.list_webhooks(&tenant, &page).await?;
    let next = next_cursor(&items, page.limit, |w| &w.id);
    Ok(axum::Json(ListView {
        data: items.iter().map(|w| webhook_view(w, false)).collect(),
        next_cursor: next,
    }))
}

async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<WebhookEndpoint, ApiError> {
    match state.store.get_webhook(id).await? {
        Some(w) if caller.sees(&w.tenant_id) => Ok(w),
        _ => Err(ApiError::not_found("webhook")),
    }
}

/// `GET /v1/webhooks/{id}`
#[utoipa::path(
    operation_id = "webhooks_get",
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Read a webhook endpoint",
    description = "Needs scope `webhooks:read`.",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<WebhookView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Webhook).await?;
    let w = visible(&state, &caller, &id).await?;
    Ok(axum::Json(webhook_view(&w, false)))
}

/// `PATCH /v1/webhooks/{id}` body: switch an endpoint on again (after a 410) or off.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhook {
    enabled: bool,
}

/// `PATCH /v1/webhooks/{id}`
#[utoipa::path(
    operation_id = "webhooks_update",
    patch,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Switch an endpoint on or off",
    description = "Needs scope `webhooks:write`; an endpoint subscribed to `key.rotated.successor` needs scope `*`.",
    params(("id" = String, Path, description = "Endpoint id")),
    request_body = UpdateWebhook,
    responses((status = 200, body = WebhookView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Json(body): Json<UpdateWebhook>,
) -> Result<axum::Json<WebhookView>, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Webhook).await?;
    caller.require_feature(&state, Feature::Webhooks).await?;
    let w = visible(&state, &caller, &id).await?;
    may_manage(&caller, &w.events, "changing an endpoint subscribed to")?;
    let (st, actor) = (state.clone(), caller.key.record.id.clone());
    let (wid, tenant) = (w.id.clone(), w.tenant_id.clone());
    let enabled = body.enabled;
    detached(async move {
        let reason = (!enabled).then_some("disabled by API");
        st.store.set_webhook_enabled(&wid, enabled, reason).await?;
        let detail = serde_json::json!({"webhook_id": wid, "enabled": enabled});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "webhook.updated",
            tenant_id: &tenant,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    let w = visible(&state, &caller, &id).await?;
    Ok(axum::Json(webhook_view(&w, false)))
}

/// `DELETE /v1/webhooks/{id}`
#[utoipa::path(
    operation_id = "webhooks_delete",
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Delete an endpoint (its pending deliveries fail)",
    description = "Needs scope `webhooks:write`; an endpoint subscribed to `key.rotated.successor` needs scope `*`.",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 204, description = "Deleted"), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Webhook).await?;
    let w = visible(&state, &caller, &id).await?;
    may_manage(&caller, &w.events, "deleting an endpoint subscribed to")?;
    let (st, actor) = (state.clone(), caller.key.record.id.clone());
    detached(async move {
        st.store.delete_webhook(&w.id).await?;
        let detail = serde_json::json!({"webhook_id": w.id, "url": w.url});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "webhook.deleted",
            tenant_id: &w.tenant_id,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/webhooks/{id}/deliveries`
#[utoipa::path(
    operation_id = "webhooks_deliveries",
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "webhooks",
    summary = "An endpoint's delivery log",
    description = "Needs scope `webhooks:read`.",
    params(("id" = String, Path, description = "Endpoint id"), PageQuery),
    responses((status = 200, body = ListView<DeliveryView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<axum::Json<ListView<DeliveryView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Webhook).await?;
    let w = visible(&state, &caller, &id).await?;
    let page = q.page()?;
    let items = state.store.list_deliveries(&w.id, &page).await?;
    let next = next_cursor(&items, page.limit, |d| &d.id);
    Ok(axum::Json(ListView {
        data: items.into_iter().map(delivery_view).collect(),
        next_cursor: next,
    }))
}

/// `POST /v1/webhooks/{id}/test`: queues a `webhook.test` event for this endpoint only.
#[utoipa::path(
    operation_id = "webhooks_test",
    post,
    path = "/v1/webhooks/{id}/test",
    tag = "webhooks",
    summary = "Queue a webhook.test event for one endpoint",
    description = "Needs scope `webhooks:write`.",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 202, body = keygate_api::TestEvent), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn test(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Webhook).await?;
    caller.require_feature(&state, Feature::Webhooks).await?;
    let w = visible(&state, &caller, &id).await?;
    let data = serde_json::json!({"webhook_id": w.id, "message": "a test event from keygate"});
    let queued = state
        .emit(&w.tenant_id, "webhook.test", data, Some(&w.id))
        .await?;
    let d = queued
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(keygate_api::TestEvent {
            delivery_id: d.id,
            event_id: d.event_id,
        }),
    ))
}

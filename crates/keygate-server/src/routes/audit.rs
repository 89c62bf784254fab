//! `GET /v1/audit` (events, filtered, newest first), `GET /v1/audit/verify` (the hash chains,
//! operator only), `GET /v1/keys/{id}/usage` and `GET /v1/tenants/{id}/usage`.

use super::{next_cursor, Ctx, PageQuery};
use crate::error::{ApiError, Path, Query};
use crate::state::AppState;
use crate::views::{
    parse_rfc3339, rfc3339, AlertView, AuditView, BrokenView, ListView, UsageBucket, UsageView,
    VerifyView,
};
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::{AuditEvent, RouteClass, TenantId, UserId};
use keygate_engine::clock::now_ms;
use keygate_store::{AuditFilter, AuditOwner, KeyFilter, UsageOf};
use serde::Deserialize;

/// Scope to read the audit log and usage.
pub const READ: &str = "audit:read";

/// `GET /v1/audit` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Page size.
    pub limit: Option<u32>,
    /// Cursor (an event id).
    pub cursor: Option<String>,
    /// Tenant (operator: any, or all when absent; others: their own).
    pub tenant_id: Option<String>,
    /// Key.
    pub key_id: Option<String>,
    /// User.
    pub user_id: Option<String>,
    /// Action.
    pub action: Option<String>,
    /// Decision code.
    pub code: Option<String>,
    /// RFC 3339, inclusive.
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
}

fn audit_view(e: AuditEvent) -> AuditView {
    AuditView {
        at: rfc3339(e.at_ms),
        detail: e.detail.and_then(|d| serde_json::from_str(&d).ok()),
        id: e.id,
        node: e.node,
        seq: e.seq,
        tenant_id: e.tenant_id,
        actor: e.actor,
        action: e.action,
        key_id: e.key_id,
        user_id: e.user_id,
        kind: e.kind,
        code: e.code,
        status: e.status,
        method: e.method,
        path: e.path,
        scope: e.scope,
        ip: e.ip,
        origin: e.origin,
        credits: e.credits,
        latency_us: e.latency_us,
        request_id: e.request_id,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}

/// A query parameter with a bad value: 400, as on `GET /v1/keys`.
fn bad(message: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|s| parse_rfc3339(s).ok_or_else(|| bad(format!("{name} must be an RFC 3339 timestamp"))))
        .transpose()
}

/// What a `ut` key may read of its tenant's log: its user's events (see [`AuditOwner`]). A
/// user's token holds the user's rights, not the tenant's: the admin's and other users'
/// events are not its to read. `sk` keys read the whole tenant's log.
async fn owner_of(
    state: &AppState,
    tenant: &TenantId,
    user: &UserId,
) -> Result<AuditOwner, ApiError> {
    let mut owner = AuditOwner {
        user_id: user.clone(),
        key_ids: Default::default(),
    };
    let filter = KeyFilter {
        tenant_id: Some(tenant.clone()),
        user_id: Some(user.clone()),
        ..KeyFilter::default()
    };
    let mut page = keygate_store::PageRequest {
        cursor: None,
        limit: 500,
    };
    loop {
        let keys = state.store.list_keys(&filter, &page).await?;
        let done = keys.len() < page.limit as usize;
        page.cursor = keys.last().map(|k| k.id.to_string());
        owner.key_ids.extend(keys.into_iter().map(|k| k.id));
        if done {
            return Ok(owner);
        }
    }
}

/// `GET /v1/audit`
#[utoipa::path(
    operation_id = "audit_list",
    get,
    path = "/v1/audit",
    tag = "audit",
    summary = "Audit events, newest first",
    description = "Needs scope `audit:read`. A user token (`ut`) reads only its user's events: those by the user or one of the user's keys, and those about them.",
    params(AuditQuery),
    responses((status = 200, body = ListView<AuditView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<AuditQuery>,
) -> Result<axum::Json<ListView<AuditView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor.clone(),
    }
    .page()?;
    let tenant_id = caller.scope(&state, q.tenant_id.as_deref()).await?;
    let owner = match caller.sees_only() {
        Some(user) => Some(owner_of(&state, caller.tenant(), user).await?),
        None => None,
    };
    let filter = AuditFilter {
        tenant_id: tenant_id.map(String::from),
        owner,
        key_id: q.key_id,
        user_id: q.user_id,
        action: q.action,
        code: q.code,
        since_ms: time_param("since", q.since.as_deref())?,
        until_ms: time_param("until", q.until.as_deref())?,
    };
    let events = state.store.list_audit(&filter, &page).await?;
    let next = next_cursor(&events, page.limit, |e| &e.id);
    Ok(axum::Json(ListView {
        data: events.into_iter().map(audit_view).collect(),
        next_cursor: next,
    }))
}

fn verify_view(r: keygate_store::AuditReport) -> VerifyView {
    VerifyView {
        ok: r.broken.is_none(),
        checked: r.checked,
        nodes: r.nodes,
        broken: r.broken.map(|(node, b)| BrokenView {
            node,
            seq: b.seq,
            problem: b.problem.as_str().to_owned(),
        }),
    }
}

/// `GET /v1/audit/verify`: operator only (the chains are per node and span tenants).
#[utoipa::path(
    operation_id = "audit_verify",
    get,
    path = "/v1/audit/verify",
    tag = "audit",
    summary = "Check every node's hash chain (operator only)",
    description = "Needs scope `audit:read`.",
    responses((status = 200, body = VerifyView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn verify(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<axum::Json<VerifyView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    if !caller.is_operator() {
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "only the operator may verify the audit chains",
        ));
    }
    let report = keygate_store::verify_audit(&*state.store).await?;
    Ok(axum::Json(verify_view(report)))
}

/// `?granularity=minute|hour|day&since=&until=`
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Bucket width (default `hour`).
    pub granularity: Option<String>,
    /// RFC 3339 (default: 60 buckets back).
    pub since: Option<String>,
    /// RFC 3339 (default: now).
    pub until: Option<String>,
}

async fn usage_of(state: &AppState, of: UsageOf, q: UsageQuery) -> Result<UsageView, ApiError> {
    let granularity = q.granularity.unwrap_or_else(|| "hour".into());
    let width = keygate_store::granularity_ms(&granularity)
        .ok_or_else(|| bad("granularity must be minute, hour or day"))?;
    let until = time_param("until", q.until.as_deref())?.unwrap_or_else(|| now_ms() + 60_000);
    let since = time_param("since", q.since.as_deref())?.unwrap_or(until - 60 * width);
    if since >= until {
        return Err(bad("since must be before until"));
    }
    let rows = state.store.usage(&of, width, since, until).await?;
    Ok(UsageView {
        granularity,
        data: rows
            .into_iter()
            .map(|r| UsageBucket {
                at: rfc3339(r.bucket_ms),
                code: r.code,
                requests: r.requests,
                credits: r.credits,
            })
            .collect(),
    })
}

/// `GET /v1/keys/{id}/usage`
#[utoipa::path(
    operation_id = "audit_key_usage",
    get,
    path = "/v1/keys/{id}/usage",
    tag = "audit",
    summary = "A key's requests and credits by time and decision code",
    description = "Needs scope `audit:read`.",
    params(("id" = String, Path, description = "Key id"), UsageQuery),
    responses((status = 200, body = UsageView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn key_usage(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<axum::Json<UsageView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let key = state.visible_key(&caller, &id).await?;
    Ok(axum::Json(usage_of(&state, UsageOf::Key(key.id), q).await?))
}

/// `GET /v1/tenants/{id}/usage`
#[utoipa::path(
    operation_id = "audit_tenant_usage",
    get,
    path = "/v1/tenants/{id}/usage",
    tag = "audit",
    summary = "A tenant's requests and credits by time and decision code",
    description = "Needs scope `audit:read`.",
    params(("id" = String, Path, description = "Tenant id"), UsageQuery),
    responses((status = 200, body = UsageView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn tenant_usage(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<axum::Json<UsageView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    tenant_wide(&caller)?;
    let tenant = caller.act_in(&state, Some(&id)).await?;
    Ok(axum::Json(
        usage_of(&state, UsageOf::Tenant(tenant), q).await?,
    ))
}

/// Refuses a member's token (`ut`) on what covers the whole tenant (its usage, its alerts): a
/// member sees its own keys' usage (`/v1/keys/{id}/usage`) and events, not other users'; the
/// owner sees the account's.
fn tenant_wide(caller: &super::Caller) -> Result<(), ApiError> {
    match caller.sees_only() {
        None => Ok(()),
        Some(_) => Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "a user token reads its own keys' usage and events, not the tenant's",
        )),
    }
}

/// `GET /v1/alerts` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /v1/alerts`: newest first; the operator sees every tenant's unless it names one.
#[utoipa::path(
    operation_id = "audit_alerts",
    get,
    path = "/v1/alerts",
    tag = "audit",
    summary = "Alerts, newest first",
    description = "Needs scope `audit:read`.",
    params(AlertQuery),
    responses((status = 200, body = ListView<AlertView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn alerts(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<AlertQuery>,
) -> Result<axum::Json<ListView<AlertView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    tenant_wide(&caller)?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .page()?;
    let tenant = caller.scope(&state, q.tenant_id.as_deref()).await?;
    let items = state.store.list_alerts(tenant.as_deref(), &page).await?;
    let next = next_cursor(&items, page.limit, |a| &a.id);
    Ok(axum::Json(ListView {
        data: items
            .into_iter()
            .map(|a| AlertView {
                at: rfc3339(a.at_ms),
                data: serde_json::from_str(&a.data).unwrap_or(serde_json::Value::Null),
                id: a.id,
                tenant_id: a.tenant_id,
                key_id: a.key_id,
                kind: a.kind,
                message: a.message,
            })
            .collect(),
        next_cursor: next,
    }))
}

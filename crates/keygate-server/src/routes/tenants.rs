//! `/v1/tenants…`: create (operator only, with an admin key shown once), read, list, top up.

use super::{next_cursor, Ctx, PageQuery};
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;
use crate::views::{CreatedTenant, IssuedKey, ListView, TenantView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::{CreateTenant, UpdateTenant};
use keygate_core::{RouteClass, TenantId};
use keygate_engine::clock::now_ms;
use keygate_engine::issue::{self, CreateKey};
use keygate_store::{Tenant, TenantChange};
use serde::Deserialize;

/// Scope to read tenants.
pub const READ: &str = "tenants:read";
/// Scope to create tenants and top up credits (operator only).
pub const WRITE: &str = "tenants:write";

fn operator_only() -> ApiError {
    ApiError::because(
        keygate_core::Code::ForbiddenScope,
        "only the operator (a * key of the default tenant) may do this",
    )
}

/// Only the operator changes a tenant's plan or pool; others are told so about their own
/// tenant, and that any other tenant does not exist.
fn operator_on(caller: &super::Caller, id: &TenantId) -> Result<(), ApiError> {
    match (caller.is_operator(), caller.sees(id)) {
        (true, _) => Ok(()),
        (false, true) => Err(operator_only()),
        (false, false) => Err(ApiError::not_found("tenant")),
    }
}

/// `POST /v1/tenants`
#[utoipa::path(
    operation_id = "tenants_create",
    post,
    path = "/v1/tenants",
    tag = "tenants",
    summary = "Create a tenant and its admin key (operator only)",
    description = "Needs scope `tenants:write`.",
    request_body = CreateTenant,
    responses((status = 201, body = CreatedTenant), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<CreateTenant>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    if !caller.is_operator() {
        return Err(operator_only());
    }
    let name = issue::check_name(&body.name)?;
    let plan = body.plan.unwrap_or_else(|| "free".to_owned());
    let Some(plan_cfg) = state.config.plans.get(&plan) else {
        return Err(ApiError::invalid(format!(
            "plan must be one of: {}",
            state
                .config
                .plans
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let credits = body
        .credits
        .or(plan_cfg.credits)
        .or(plan_cfg.monthly_credits);
    if credits.is_some_and(|c| c > 1_000_000_000_000_000) {
        return Err(ApiError::invalid("credits must be at most 10^15"));
    }
    let now = now_ms();
    let tenant = Tenant {
        id: keygate_engine::ids::new_id("tnt", now).into(),
        name,
        trial_ends_at_ms: state.plan_start(&plan, now).trial_ends_at_ms,
        refilled_months: 0,
        verified: true,
        plan,
        credits,
        created_at_ms: now,
        plan_started_at_ms: now,
    };
    let key_body = CreateKey {
        kind: "sk".into(),
        name: "admin".into(),
        scopes: Some(vec!["*".into()]),
        ..CreateKey::default()
    };
    state.store.insert_tenant(&tenant).await?;
    let (plaintext, record) =
        issue::build_key(&state.issuer(), &*state.store, &tenant.id, key_body, now).await?;
    let (st, t, rec) = (state.clone(), tenant.clone(), record.clone());
    let actor = caller.key.record.id.clone();
    super::detached(async move {
        st.store.insert_key(&rec).await?;
        let detail = serde_json::json!({"name": t.name, "plan": t.plan, "credits": t.credits});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "tenant.created",
            tenant_id: &t.id,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        let detail = serde_json::json!({"kind": "sk", "name": "admin", "scopes": ["*"]});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "key.created",
            tenant_id: &t.id,
            key_id: Some(&rec.id),
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    tracing::info!(tenant = %tenant.id, actor = %caller.key.record.id, "tenant created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedTenant {
            tenant: crate::views::tenant_view(&state, &tenant),
            admin_key: IssuedKey {
                key: plaintext,
                record: crate::views::key_view(&state, &record, now),
            },
        }),
    ))
}

/// `GET /v1/tenants`: the operator sees all, everyone else their own.
#[utoipa::path(
    operation_id = "tenants_list",
    get,
    path = "/v1/tenants",
    tag = "tenants",
    summary = "List tenants",
    description = "Needs scope `tenants:read`.",
    params(PageQuery),
    responses((status = 200, body = ListView<TenantView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<PageQuery>,
) -> Result<axum::Json<ListView<TenantView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let page = q.page()?;
    let tenants = if caller.is_operator() {
        state.store.list_tenants(&page).await?
    } else {
        let own = state.store.get_tenant(caller.tenant()).await?;
        own.into_iter()
            .filter(|t| page.cursor.as_deref().is_none_or(|c| t.id.as_str() < c))
            .collect()
    };
    let next = next_cursor(&tenants, page.limit, |t| &t.id);
    Ok(axum::Json(ListView {
        data: tenants
            .iter()
            .map(|t| crate::views::tenant_view(&state, t))
            .collect(),
        next_cursor: next,
    }))
}

/// `GET /v1/account`
#[utoipa::path(
    operation_id = "account_get",
    get,
    path = "/v1/account",
    tag = "accounts",
    summary = "The caller's account and its plan",
    description = "Any key with `keys:read`: its own account, the plan's features and limits, and which plans include API access (so a user can see why a call answers `PLAN_FEATURE` and what would allow it).",
    responses((status = 200, body = keygate_api::AccountView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn account(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<axum::Json<keygate_api::AccountView>, ApiError> {
    use keygate_engine::config::Feature;
    let caller = ctx.caller(&state, "keys:read", RouteClass::Admin).await?;
    let tenant = state
        .store
        .get_tenant(caller.tenant())
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    let p = state.plan(&tenant.plan);
    let all = [
        Feature::Api,
        Feature::Webhooks,
        Feature::Oauth,
        Feature::SkKeys,
    ];
    let plan = keygate_api::PlanView {
        name: tenant.plan.clone(),
        features: all
            .iter()
            .filter(|f| p.has(**f))
            .map(|f| f.as_str().to_owned())
            .collect(),
        rate_limit: p.rate_limit.map(|r| keygate_api::RateLimitBody {
            limit: r.limit,
            window_seconds: r.window_seconds,
        }),
        credits: p.credits,
        monthly_credits: p.monthly_credits,
        max_keys: p.max_keys,
        max_budget: p.max_budget,
        max_ttl_days: p.max_ttl_days,
        days: p.days,
        then: p.then.clone(),
    };
    let plans_with_api = state
        .config
        .plans
        .iter()
        .filter(|(_, c)| c.has(Feature::Api))
        .map(|(n, _)| n.clone())
        .collect();
    Ok(axum::Json(keygate_api::AccountView {
        account: crate::views::tenant_view(&state, &tenant),
        plan,
        plans_with_api,
    }))
}

/// `GET /v1/tenants/{id}`
#[utoipa::path(
    operation_id = "tenants_get",
    get,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    summary = "Read a tenant",
    description = "Needs scope `tenants:read`.",
    params(("id" = String, Path, description = "Tenant id")),
    responses((status = 200, body = TenantView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<TenantId>,
) -> Result<axum::Json<TenantView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    match state.store.get_tenant(&id).await? {
        Some(t) if caller.sees(&t.id) => Ok(axum::Json(crate::views::tenant_view(&state, &t))),
        _ => Err(ApiError::not_found("tenant")),
    }
}

/// `PATCH /v1/tenants/{id}`: operator only. A plan starts at once on every node: its trial, its
/// credit grant (added to the pool), and its features and limits for the account's keys.
#[utoipa::path(
    operation_id = "tenants_update",
    patch,
    path = "/v1/tenants/{id}",
    tag = "tenants",
    summary = "Rename a tenant or change its plan (operator only)",
    description = "Needs scope `tenants:write`. A plan change takes effect at once on every node, is audited (`tenant.plan_changed`) and sent to webhooks.",
    params(("id" = String, Path, description = "Tenant id")),
    request_body = UpdateTenant,
    responses((status = 200, body = TenantView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<TenantId>,
    Json(body): Json<UpdateTenant>,
) -> Result<axum::Json<TenantView>, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Billing).await?;
    operator_on(&caller, &id)?;
    let name = body.name.as_deref().map(issue::check_name).transpose()?;
    if let Some(p) = &body.plan {
        if !state.config.plans.contains_key(p) {
            return Err(ApiError::invalid("plan is not one of the configured plans"));
        }
    }
    let Some(before) = state.store.get_tenant(&id).await? else {
        return Err(ApiError::not_found("tenant"));
    };
    // The plan the tenant is on already is no change: a retried request must not grant its
    // credits again or restart its trial.
    let change = TenantChange {
        name,
        plan: body
            .plan
            .as_deref()
            .filter(|p| *p != before.plan)
            .map(|p| state.plan_start(p, now_ms())),
        if_trial: None,
    };
    let (st, actor) = (state.clone(), caller.key.record.id.clone());
    let after =
        super::detached(async move { st.change_tenant(&id, &change, &actor, &before).await })
            .await?;
    match after {
        Some(t) => Ok(axum::Json(crate::views::tenant_view(&state, &t))),
        None => Err(ApiError::not_found("tenant")),
    }
}

/// `POST /v1/tenants/{id}/credits` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    amount: u64,
}

/// `POST /v1/tenants/{id}/credits`: operator only (a tenant must not mint its own credits).
#[utoipa::path(
    operation_id = "tenants_top_up",
    post,
    path = "/v1/tenants/{id}/credits",
    tag = "tenants",
    summary = "Add credits to a tenant's pool (operator only)",
    description = "Needs scope `tenants:write`.",
    params(("id" = String, Path, description = "Tenant id")),
    request_body = TopUp,
    responses((status = 200, body = TenantView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn top_up(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<TenantId>,
    Json(body): Json<TopUp>,
) -> Result<axum::Json<TenantView>, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Billing).await?;
    operator_on(&caller, &id)?;
    if body.amount == 0 || body.amount > 1_000_000_000_000 {
        return Err(ApiError::invalid(
            "amount must be between 1 and 1000000000000",
        ));
    }
    let (st, tid, amount) = (state.clone(), id.clone(), body.amount);
    let actor = caller.key.record.id.clone();
    let added = super::detached(async move {
        let t = st.store.add_tenant_credits(&tid, amount).await?;
        if let Some(t) = &t {
            let detail = serde_json::json!({"amount": amount, "balance": t.credits});
            st.record_change(keygate_engine::engine::Change {
                actor: &actor,
                action: "tenant.credits_added",
                tenant_id: &tid,
                key_id: None,
                user_id: None,
                detail: &detail,
            })
            .await;
        }
        Ok(t)
    })
    .await?;
    let Some(t) = added else {
        return Err(match state.store.get_tenant(&id).await? {
            Some(_) => ApiError::invalid("the balance would exceed 10^15 credits"),
            None => ApiError::not_found("tenant"),
        });
    };
    state.tenant_changed(&id).await;
    tracing::info!(tenant = %id, amount = body.amount, actor = %caller.key.record.id, "credits topped up");
    Ok(axum::Json(crate::views::tenant_view(&state, &t)))
}

//! `/v1/oauth/clients`: OAuth clients of a tenant (the confidential client's secret is shown
//! once) and `/v1/oauth/signing-keys/rotate`.

use super::{detached, next_cursor, Ctx, PageQuery};
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;
use crate::views::{rfc3339, ClientView, ListView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::CreateClient;
use keygate_core::{FamilyId, RouteClass, ScopeSet};
use keygate_engine::clock::now_ms;
use keygate_store::OAuthClient;
use serde::Deserialize;

/// Scope to read clients.
pub const READ: &str = "oauth:read";
/// Scope to register and delete clients.
pub const WRITE: &str = "oauth:write";

fn client_view(c: &OAuthClient, secret: Option<String>) -> ClientView {
    ClientView {
        client_id: c.id.clone(),
        name: c.name.clone(),
        client_type: c.client_type.clone(),
        redirect_uris: c.redirect_uris.clone(),
        scopes: c.scopes.clone(),
        tenant_id: c.tenant_id.to_string(),
        created_at: rfc3339(c.created_at_ms),
        client_secret: secret,
    }
}

/// `POST /v1/oauth/clients`
#[utoipa::path(
    operation_id = "oauth_clients_create",
    post,
    path = "/v1/oauth/clients",
    tag = "oauth",
    summary = "Register an OAuth client (secret shown once for confidential clients)",
    description = "Needs scope `oauth:write`.",
    request_body = CreateClient,
    responses((status = 201, body = ClientView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<CreateClient>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx
        .caller(&state, WRITE, RouteClass::TokenManagement)
        .await?;
    caller
        .require_feature(&state, keygate_engine::config::Feature::Oauth)
        .await?;
    let tenant = caller.act_in(&state, body.tenant_id.as_deref()).await?;
    let name = keygate_engine::issue::check_name(&body.name)?;
    let public = match body.client_type.as_str() {
        "public" => true,
        "confidential" => false,
        _ => {
            return Err(ApiError::invalid(
                "type must be \"public\" or \"confidential\"",
            ))
        }
    };
    if body.redirect_uris.len() > 20 {
        return Err(ApiError::invalid("at most 20 redirect_uris"));
    }
    if public && body.redirect_uris.is_empty() {
        return Err(ApiError::invalid(
            "a public client needs at least one redirect URI",
        ));
    }
    for u in &body.redirect_uris {
        if let Some(why) = keygate_oauth::redirect::problem(u) {
            return Err(ApiError::invalid(format!("redirect_uris: {why}")));
        }
    }
    let scopes = ScopeSet::parse(&body.scopes).map_err(|e| ApiError::invalid(e.to_string()))?;
    if scopes.is_empty() {
        return Err(ApiError::invalid("scopes must name at least one scope"));
    }
    if scopes.has_all() {
        return Err(ApiError::invalid(
            "an OAuth client cannot hold scope \"*\"; name the scopes its tokens may carry",
        ));
    }
    // A key may only hand out what it could do itself.
    caller.require_covers(&scopes)?;
    let secret = (!public).then(|| {
        format!(
            "{}_cs_{}",
            state.config.keys.prefix,
            keygate_engine::ids::random_base62(40)
        )
    });
    let now = now_ms();
    let client = OAuthClient {
        id: keygate_engine::ids::new_id("cli", now),
        tenant_id: tenant,
        name,
        client_type: body.client_type,
        secret_hash: secret.as_deref().map(keygate_oauth::token_hash),
        redirect_uris: body.redirect_uris,
        scopes: scopes.to_strings(),
        created_at_ms: now,
    };
    let (st, rec, actor) = (state.clone(), client.clone(), caller.key.record.id.clone());
    detached(async move {
        st.store.insert_client(&rec).await?;
        let detail = serde_json::json!({
            "client_id": rec.id, "type": rec.client_type,
            "redirect_uris": rec.redirect_uris, "scopes": rec.scopes,
        });
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "oauth.client_created",
            tenant_id: &rec.tenant_id,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(client_view(&client, secret)),
    ))
}

/// `GET /v1/oauth/clients` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /v1/oauth/clients`
#[utoipa::path(
    operation_id = "oauth_clients_list",
    get,
    path = "/v1/oauth/clients",
    tag = "oauth",
    summary = "List OAuth clients",
    description = "Needs scope `oauth:read`.",
    params(ListQuery),
    responses((status = 200, body = ListView<ClientView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<ListView<ClientView>>, ApiError> {
    let caller = ctx
        .caller(&state, READ, RouteClass::TokenManagement)
        .await?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .page()?;
    let tenant = caller.scope(&state, q.tenant_id.as_deref()).await?;
    let items = state.store.list_clients(tenant.as_deref(), &page).await?;
    let next = next_cursor(&items, page.limit, |c| &c.id);
    Ok(axum::Json(ListView {
        data: items.iter().map(|c| client_view(c, None)).collect(),
        next_cursor: next,
    }))
}

async fn visible(
    state: &AppState,
    caller: &super::Caller,
    id: &str,
) -> Result<OAuthClient, ApiError> {
    match state.store.get_client(id).await? {
        Some(c) if caller.sees(&c.tenant_id) => Ok(c),
        _ => Err(ApiError::not_found("client")),
    }
}

/// `GET /v1/oauth/clients/{id}`
#[utoipa::path(
    operation_id = "oauth_clients_get",
    get,
    path = "/v1/oauth/clients/{id}",
    tag = "oauth",
    summary = "Read an OAuth client",
    description = "Needs scope `oauth:read`.",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = ClientView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<ClientView>, ApiError> {
    let caller = ctx
        .caller(&state, READ, RouteClass::TokenManagement)
        .await?;
    let c = visible(&state, &caller, &id).await?;
    Ok(axum::Json(client_view(&c, None)))
}

/// `DELETE /v1/oauth/clients/{id}`: the client goes, and every grant it holds is revoked.
#[utoipa::path(
    operation_id = "oauth_clients_delete",
    delete,
    path = "/v1/oauth/clients/{id}",
    tag = "oauth",
    summary = "Delete a client and revoke its grants",
    description = "Needs scope `oauth:write` and every scope the client holds (403 `FORBIDDEN_SCOPE` otherwise).",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 204, description = "Deleted"), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = ctx
        .caller(&state, WRITE, RouteClass::TokenManagement)
        .await?;
    let c = visible(&state, &caller, &id).await?;
    // Deleting a client revokes every grant it holds: only a key that could have registered
    // it (one holding each of its scopes) may. A stored scope that no longer parses is
    // covered only by `*`.
    let scopes = ScopeSet::parse(&c.scopes).unwrap_or_else(|_| ScopeSet::all());
    caller.require_covers(&scopes)?;
    let (st, actor) = (state.clone(), caller.key.record.id.clone());
    detached(async move {
        let gone = st.store.delete_client(&c.id, now_ms()).await?;
        st.client_changed(&c.id).await;
        for grant in gone.iter().skip(1) {
            st.family_changed(&FamilyId::of_grant(grant)).await;
        }
        if !gone.is_empty() {
            let detail = serde_json::json!({"client_id": c.id, "grants_revoked": gone.len() - 1});
            st.record_change(keygate_engine::engine::Change {
                actor: &actor,
                action: "oauth.client_deleted",
                tenant_id: &c.tenant_id,
                key_id: None,
                user_id: None,
                detail: &detail,
            })
            .await;
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/oauth/signing-keys/rotate` (operator only): a new signing key signs from now on;
/// the old public key stays in the JWKS until the tokens it signed have expired.
#[utoipa::path(
    operation_id = "oauth_clients_rotate_signing_key",
    post,
    path = "/v1/oauth/signing-keys/rotate",
    tag = "oauth",
    summary = "Make a new JWT signing key (operator only)",
    description = "Needs scope `*`.",
    responses((status = 201, body = Object, description = "`{kid}`"), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn rotate_signing_key(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, "*", RouteClass::Admin).await?;
    if !caller.is_operator() {
        return Err(ApiError::not_found("route"));
    }
    let st = state.clone();
    let actor = caller.key.record.id.clone();
    let kid = detached(async move {
        let kid = keygate_engine::oauth::add_signing_key(&*st.store)
            .await
            .map_err(|e| keygate_store::StoreError {
                kind: keygate_store::StoreErrorKind::Unavailable,
                message: e,
            })?;
        if let Err(e) = st.oauth.reload(&st.config, &*st.store).await {
            tracing::warn!("{e}");
        }
        let detail = serde_json::json!({"kid": kid});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "oauth.signing_key_rotated",
            tenant_id: &super::default_tenant(),
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(kid)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "kid": kid })),
    ))
}

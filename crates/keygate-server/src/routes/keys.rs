//! `/v1/keys…`: create, list, read, update, rotate, revoke.

use super::{detached, next_cursor, Caller, Ctx, PageQuery};
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;
use crate::views::{IssuedKey, KeyView, ListView};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::{RotateKey, UpdateKey};
use keygate_core::{KeyId, KeyStatus, Kind, RouteClass, UserId};
use keygate_engine::clock::now_ms;
use keygate_engine::issue::{self, CreateKey};
use keygate_engine::rotation::commit_rotation;
use keygate_store::{KeyFilter, KeyRecord};
use serde::Deserialize;

/// Scope to read keys.
pub const READ: &str = "keys:read";
/// Scope to create and change keys.
pub const WRITE: &str = "keys:write";

impl AppState {
    /// A key visible to `caller`, or 404.
    pub(crate) async fn visible_key(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<KeyRecord, ApiError> {
        match self.store.get_key(&KeyId::from(id)).await? {
            Some(k) if caller.actor().sees_key(&k.tenant_id, k.user_id.as_ref()) => Ok(k),
            _ => Err(ApiError::not_found("key")),
        }
    }
}

/// `POST /v1/keys`
#[utoipa::path(
    operation_id = "keys_create",
    post,
    path = "/v1/keys",
    tag = "keys",
    summary = "Create a key (plaintext shown once)",
    description = "Needs scope `keys:write`.",
    request_body = keygate_engine::issue::CreateKey,
    responses((status = 201, description = "The key, once, and its record", body = crate::views::IssuedKey), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(mut body): Json<CreateKey>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    let tenant = caller.act_in(&state, body.tenant_id.as_deref()).await?;
    reserved_metadata(body.metadata.as_ref())?;
    // A user token makes keys for its own user, within the user's plan (`fit_to_plan`).
    let maker = match caller.own_user() {
        Some(own) => Some(self_service(&state, &caller, own, &tenant, &mut body).await?),
        None => None,
    };
    let now = now_ms();
    if let (Some(_), None, Some(p)) = (
        &maker,
        &body.scopes,
        body.preset.as_deref().and_then(issue::preset),
    ) {
        // A user's preset key holds what of the preset the user may hold (a plan whose API has
        // `ocr:read` only makes an AIDEMO key with `ocr:read`).
        let held: Vec<String> = p
            .scopes
            .iter()
            .filter(|s| caller.key.record.scopes.allows(s))
            .map(|s| (*s).to_owned())
            .collect();
        if held.is_empty() {
            return Err(ApiError::because(
                keygate_core::Code::ForbiddenScope,
                "none of the preset's scopes is within your plan",
            ));
        }
        body.scopes = Some(held);
    }
    if matches!(Kind::parse(&body.kind), Ok(Kind::Sk))
        && body.scopes.is_none()
        && body.preset.is_none()
    {
        // A secret key made without a scope list gets the caller's scopes, never more (an
        // owner's own sk: the API's scopes only, see below).
        let mut scopes = caller.key.record.scopes.to_strings();
        if maker.is_some() {
            scopes.retain(|s| !keygate_core::scope::is_keygate_scope(s));
        }
        body.scopes = Some(scopes);
    }
    let (plaintext, mut record) =
        issue::build_key(&state.issuer(), &*state.store, &tenant, body, now).await?;
    caller.require_covers(&record.scopes)?;
    if let Some((plan, _)) = &maker {
        issue::fit_to_plan(&mut record, state.plan(plan), now)?;
        // An owner's sk would make keys outside every ceiling: it calls the API only.
        if record.kind == Kind::Sk
            && record
                .scopes
                .iter()
                .any(|s| keygate_core::scope::is_keygate_scope(s.as_str()))
        {
            return Err(ApiError::invalid(
                "an sk key an owner makes holds the API's scopes only, none of keygate's (keys:, users:, …)",
            ));
        }
    }
    let st = state.clone();
    let (rec, actor) = (record.clone(), caller.key.record.id.clone());
    let cap = maker.as_ref().and_then(|(_, max)| *max);
    let inserted = detached(async move {
        match cap {
            // Counted and inserted in one transaction: parallel requests cannot pass the cap.
            Some(max) => {
                let mark = keygate_engine::accounts::SESSION_MARK;
                if !st
                    .store
                    .insert_key_capped(&rec, u64::from(max), mark)
                    .await?
                {
                    return Ok(false);
                }
            }
            None => st.store.insert_key(&rec).await?,
        }
        let detail = serde_json::json!({
            "kind": rec.kind.as_str(),
            "name": rec.name,
            "scopes": rec.scopes.to_strings(),
        });
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "key.created",
            tenant_id: &rec.tenant_id,
            key_id: Some(&rec.id),
            user_id: rec.user_id.as_ref(),
            detail: &detail,
        })
        .await;
        st.key_changed(&rec.hash).await;
        keygate_engine::origins::pk_changed(&st, rec.kind).await;
        Ok(true)
    })
    .await?;
    if !inserted {
        return Err(ApiError::because(
            keygate_core::Code::PlanFeature,
            format!(
                "the account has {} live keys, the most its plan allows: revoke one first",
                cap.unwrap_or_default()
            ),
        ));
    }
    tracing::info!(key_id = %record.id, tenant = %record.tenant_id, kind = %record.kind, actor = %caller.key.record.id, "key created");
    let view = crate::views::key_view(&state, &record, now);
    Ok((
        StatusCode::CREATED,
        axum::Json(IssuedKey {
            key: plaintext,
            record: view,
        }),
    ))
}

/// Metadata may not claim to be a dashboard session's (a password reset ends those keys, and
/// `max_keys` does not count them).
fn reserved_metadata(
    m: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), ApiError> {
    let mark = format!("\"{}\"", keygate_engine::accounts::SESSION_MARK);
    // Case-insensitive, as SQLite's LIKE that leaves session keys out of `max_keys`.
    match m {
        Some(m)
            if serde_json::to_string(m)
                .unwrap_or_default()
                .to_ascii_lowercase()
                .contains(&mark) =>
        {
            Err(ApiError::invalid(format!(
                "metadata may not hold {mark}: keygate reserves it"
            )))
        }
        _ => Ok(()),
    }
}

/// What a user token may not change or rotate, though it sees it: a key of another user (the
/// owner sees them all; a rotation would hand the owner a key bound to a member), and a
/// dashboard session's key, which ends with its session and never leaves its cookie.
fn user_may_reissue(caller: &Caller, key: &KeyRecord) -> Result<(), ApiError> {
    let Some(own) = caller.own_user() else {
        return Ok(());
    };
    if key.user_id.as_ref() != Some(own) {
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "a user token changes and rotates its own user's keys only (it may revoke the account's as its owner)",
        ));
    }
    if key.metadata.get(keygate_engine::accounts::SESSION_MARK)
        == Some(&serde_json::Value::Bool(true))
    {
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "a dashboard session's key ends with its session: it is neither changed nor rotated",
        ));
    }
    Ok(())
}

/// The rules for a key a user makes for themself: for their own user, never an `sk` unless
/// the user owns the account and its plan has `sk_keys`, and no more live keys than the
/// account's plan's `max_keys`. Returns the plan whose ceilings the key must fit, and the
/// account's `max_keys` (held by the transaction that inserts the key).
async fn self_service(
    state: &AppState,
    caller: &Caller,
    own: &UserId,
    tenant: &keygate_core::TenantId,
    body: &mut CreateKey,
) -> Result<(String, Option<u32>), ApiError> {
    use keygate_engine::config::Feature;
    let user = state
        .store
        .get_user(own)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let account = state
        .store
        .get_tenant(tenant)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    let plan = state.plan(&account.plan);
    if matches!(Kind::parse(&body.kind), Ok(Kind::Sk)) {
        if !caller.key.owner {
            return Err(ApiError::because(
                keygate_core::Code::ForbiddenScope,
                "a member makes pk and ut keys for themself; sk keys are the account owner's",
            ));
        }
        if !plan.has(Feature::SkKeys) {
            return Err(ApiError::because(
                keygate_core::Code::PlanFeature,
                format!(
                    "the account's plan ({}) does not include sk_keys",
                    account.plan
                ),
            ));
        }
        if body.user_id.is_some() {
            return Err(ApiError::invalid(
                "sk keys have no user; use a ut key for a user",
            ));
        }
    } else {
        if body.user_id.as_deref().is_some_and(|u| own != u) {
            return Err(ApiError::not_found("user"));
        }
        body.user_id = Some(own.to_string());
    }
    Ok((user.plan, plan.max_keys))
}

/// `GET /v1/keys` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size.
    pub limit: Option<u32>,
    /// Cursor.
    pub cursor: Option<String>,
    /// Tenant (operator: any; others: their own).
    pub tenant_id: Option<String>,
    /// Kind.
    pub kind: Option<String>,
    /// Stored status.
    pub status: Option<String>,
    /// User.
    pub user_id: Option<String>,
    /// Name contains.
    pub name: Option<String>,
}

/// `GET /v1/keys`
#[utoipa::path(
    operation_id = "keys_list",
    get,
    path = "/v1/keys",
    tag = "keys",
    summary = "List keys",
    description = "Needs scope `keys:read`.",
    params(ListQuery),
    responses((status = 200, body = ListView<KeyView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<ListView<KeyView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor.clone(),
    }
    .page()?;
    let tenant = caller.act_in(&state, q.tenant_id.as_deref()).await?;
    let bad = |m: &'static str| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", m);
    let filter = KeyFilter {
        tenant_id: Some(tenant),
        kind: q
            .kind
            .as_deref()
            .map(Kind::parse)
            .transpose()
            .map_err(|_| bad("kind must be sk, ut or pk"))?,
        status: q
            .status
            .as_deref()
            .map(|s| KeyStatus::parse(s).filter(|s| *s != KeyStatus::Expired))
            .map(|s| s.ok_or(()))
            .transpose()
            .map_err(|_| bad("status must be active, grace or revoked"))?,
        // A member's token lists its own user's keys only; the owner's, the account's.
        user_id: match caller.sees_only() {
            Some(own) => Some(own.clone()),
            None => q.user_id.as_deref().map(UserId::from),
        },
        name_contains: q.name.clone(),
    };
    let keys = state.store.list_keys(&filter, &page).await?;
    let now = now_ms();
    let next = next_cursor(&keys, page.limit, |k| &k.id);
    Ok(axum::Json(ListView {
        data: keys
            .iter()
            .map(|k| crate::views::key_view(&state, k, now))
            .collect(),
        next_cursor: next,
    }))
}

/// `GET /v1/keys/{id}`
#[utoipa::path(
    operation_id = "keys_get",
    get,
    path = "/v1/keys/{id}",
    tag = "keys",
    summary = "Read a key",
    description = "Needs scope `keys:read`.",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let k = state.visible_key(&caller, &id).await?;
    Ok(axum::Json(crate::views::key_view(&state, &k, now_ms())))
}

/// `PATCH /v1/keys/{id}`
#[utoipa::path(
    operation_id = "keys_update",
    patch,
    path = "/v1/keys/{id}",
    tag = "keys",
    summary = "Change a key (null clears a field)",
    description = "Needs scope `keys:write`.",
    params(("id" = String, Path, description = "Key id")),
    request_body = UpdateKey,
    responses((status = 200, body = KeyView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    Json(body): Json<UpdateKey>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    let mut k = state.visible_key(&caller, &id).await?;
    caller.require_may_change(&k.family_id)?;
    user_may_reissue(&caller, &k)?;
    reserved_metadata(body.metadata.as_ref())?;
    let before = k.clone();
    let now = now_ms();
    if k.status == KeyStatus::Revoked {
        return Err(ApiError::conflict(
            "the key is revoked; it cannot be changed",
        ));
    }
    caller.require_covers(&k.scopes)?;
    let expected_updated_at = k.updated_at_ms;
    if k.status == KeyStatus::Grace && body.expires_at.is_some() {
        return Err(ApiError::conflict(
            "the key was rotated; its grace period cannot be changed",
        ));
    }
    // Validate everything before changing anything.
    if let Some(n) = &body.name {
        k.name = issue::check_name(n)?;
    }
    if let Some(s) = &body.scopes {
        k.scopes = issue::check_scopes(k.kind, s)?;
        caller.require_covers(&k.scopes)?;
        if let (Kind::Ut, Some(uid)) = (k.kind, &k.user_id) {
            issue::check_plan_scopes(&state.config, &*state.store, uid, &k.scopes).await?;
        }
    }
    if let Some(ips) = &body.allowed_ips {
        k.allowed_ips = issue::check_ips(ips)?;
    }
    if let Some(o) = &body.allowed_origins {
        k.allowed_origins = issue::check_origins(o)?;
        if k.kind == Kind::Pk && k.allowed_origins.is_empty() {
            return Err(ApiError::invalid(
                "publishable keys need at least one allowed origin",
            ));
        }
    }
    if let Some(r) = body.rate_limit {
        k.rate_limit = r.map(issue::rate_limit).transpose()?;
    }
    let budget_changed = body.budget.is_some();
    if let Some(b) = body.budget {
        if b.is_some_and(|b| b > i64::MAX as u64) {
            return Err(ApiError::invalid("budget is too large"));
        }
        k.budget = b;
    }
    if let Some(e) = &body.expires_at {
        k.expires_at_ms = match e {
            None => None,
            Some(s) => issue::check_expiry(Some(s), None, now)?,
        };
    }
    if let Some(d) = body.rotation_days {
        if d.is_some_and(|d| d == 0 || d > 3650) {
            return Err(ApiError::invalid(
                "rotation_days must be between 1 and 3650",
            ));
        }
        k.rotation_days = d;
    }
    if body.metadata.is_some() {
        k.metadata = issue::check_metadata(body.metadata)?;
    }
    if caller.own_user().is_some() {
        issue::only_tightens(&before, &k)?;
    }
    k.updated_at_ms = now;
    // The write and the cache invalidation run to completion even if the client goes away.
    let st = state.clone();
    let rec = k.clone();
    let actor = caller.key.record.id.clone();
    let written = detached(async move {
        if budget_changed {
            // Give this node's lease back first, so the new cap applies to what was spent.
            st.counters.release_budget(&rec.family_id).await?;
            if let Some(shared) = &st.shared {
                shared
                    .release_budget(&rec.family_id, &rec.tenant_id)
                    .await
                    .map_err(|e| keygate_store::StoreError {
                        kind: keygate_store::StoreErrorKind::Unavailable,
                        message: e.0,
                    })?;
            }
        }
        let ok = st.store.update_key(&rec, expected_updated_at).await?;
        if ok {
            let detail = serde_json::json!({
                "name": rec.name,
                "scopes": rec.scopes.to_strings(),
                "budget": rec.budget,
            });
            st.record_change(keygate_engine::engine::Change {
                actor: &actor,
                action: "key.updated",
                tenant_id: &rec.tenant_id,
                key_id: Some(&rec.id),
                user_id: rec.user_id.as_ref(),
                detail: &detail,
            })
            .await;
            st.key_changed(&rec.hash).await;
            if budget_changed {
                st.family_changed(&rec.family_id).await;
            }
            keygate_engine::origins::pk_changed(&st, rec.kind).await;
        }
        Ok(ok)
    })
    .await?;
    if !written {
        return Err(ApiError::conflict(
            "the key was changed, rotated or revoked meanwhile; read it again",
        ));
    }
    let fresh = state
        .store
        .get_key(&k.id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    Ok(axum::Json(crate::views::key_view(&state, &fresh, now)))
}

/// Parses an optional JSON body: empty is the default value.
fn optional_json<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

/// `POST /v1/keys/{id}/rotate`
#[utoipa::path(
    operation_id = "keys_rotate",
    post,
    path = "/v1/keys/{id}/rotate",
    tag = "keys",
    summary = "Rotate a key: a successor (plaintext once); the old key works for the grace period",
    description = "Needs scope `keys:write`.",
    params(("id" = String, Path, description = "Key id")),
    request_body = Option<RotateKey>,
    responses((status = 201, body = crate::views::IssuedKey), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn rotate(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    let body = axum::body::to_bytes(body, state.config.limits.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body too large",
            )
        })?;
    let body: RotateKey = optional_json(&body)?;
    let grace = body
        .grace_seconds
        .unwrap_or(state.config.keys.rotation_grace_seconds);
    if grace > 30 * 86_400 {
        return Err(ApiError::invalid(
            "grace_seconds must be at most 2592000 (30 days)",
        ));
    }
    let old = state.visible_key(&caller, &id).await?;
    caller.require_may_change(&old.family_id)?;
    caller.require_covers(&old.scopes)?;
    user_may_reissue(&caller, &old)?;
    let now = now_ms();
    if old.status == KeyStatus::Revoked
        || old.rotated_to.is_some()
        || old.expires_at_ms.is_some_and(|e| e <= now)
    {
        return Err(ApiError::conflict(
            "only an active key that was not rotated yet can be rotated",
        ));
    }
    let (plaintext, mut successor) = issue::successor(&state.issuer(), &old, now);
    if let Some(own) = caller.own_user() {
        // A user's successor is held to their plan as a new key would be (a rotation does
        // not renew a lifetime past max_ttl_days).
        if let Some(user) = state.store.get_user(own).await? {
            issue::fit_to_plan(&mut successor, state.plan(&user.plan), now)?;
        }
    }
    let grace_until = now + (grace as i64) * 1000;
    let st = state.clone();
    let (old_rec, succ) = (old.clone(), successor.clone());
    let actor = caller.key.record.id.clone();
    let rotated =
        detached(
            async move { commit_rotation(&st, &old_rec, &succ, grace_until, &actor, true).await },
        )
        .await?;
    if !rotated {
        return Err(ApiError::conflict(
            "the key was rotated or revoked concurrently",
        ));
    }
    tracing::info!(key_id = %old.id, successor = %successor.id, grace_seconds = grace, actor = %caller.key.record.id, "key rotated");
    let view = crate::views::key_view(&state, &successor, now);
    Ok((
        StatusCode::CREATED,
        axum::Json(IssuedKey {
            key: plaintext,
            record: view,
        }),
    ))
}

/// `POST /v1/keys/{id}/revoke` and `DELETE /v1/keys/{id}`
#[utoipa::path(
    operation_id = "keys_revoke",
    post,
    path = "/v1/keys/{id}/revoke",
    tag = "keys",
    summary = "Revoke a key now, on every node",
    description = "Needs scope `keys:write`.",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    let k = state.visible_key(&caller, &id).await?;
    caller.require_covers(&k.scopes)?;
    let now = now_ms();
    let st = state.clone();
    let id = k.id.clone();
    let actor = caller.key.record.id.clone();
    let k = detached(async move {
        let k = st.store.revoke_key(&id, now).await?;
        if let Some(k) = &k {
            st.record_change(keygate_engine::engine::Change {
                actor: &actor,
                action: "key.revoked",
                tenant_id: &k.tenant_id,
                key_id: Some(&k.id),
                user_id: k.user_id.as_ref(),
                detail: &serde_json::json!({}),
            })
            .await;
            st.key_changed(&k.hash).await;
            keygate_engine::origins::pk_changed(&st, k.kind).await;
        }
        Ok(k)
    })
    .await?
    .ok_or_else(|| ApiError::not_found("key"))?;
    tracing::info!(key_id = %k.id, actor = %caller.key.record.id, "key revoked");
    Ok(axum::Json(crate::views::key_view(&state, &k, now)))
}

//! `/v1/users…`: users of a tenant (plan, optional password for OAuth login).

use super::{next_cursor, Ctx, PageQuery};
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;
use crate::views::{ListView, UserView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_core::access::Role;
use keygate_core::{RouteClass, TenantId, UserId};
use keygate_engine::clock::now_ms;
use keygate_store::User;
use serde::Deserialize;

/// Scope to read users.
pub const READ: &str = "users:read";
/// Scope to create users.
pub const WRITE: &str = "users:write";

/// `raw` as an email address keygate stores (trimmed, lower case), or 400.
pub(crate) fn email_address(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_ascii_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        && !email.contains(char::is_whitespace)
        // Shown in the dashboard and named in its session keys: the display-name rule.
        && keygate_core::name_problem(&email).is_none();
    if valid {
        Ok(email)
    } else {
        Err(ApiError::invalid("email must be a valid address"))
    }
}

/// `POST /v1/users` body. `Debug` hides the password.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    email: String,
    password: Option<String>,
    name: Option<String>,
    plan: Option<String>,
    tenant_id: Option<String>,
}

impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser")
            .field("email", &self.email)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// A turn at Argon2 (19 MiB and tens of ms each): at most one per core runs at a time, so a
/// flood of sign-ins cannot exhaust memory or the blocking pool; `None` after waiting 5 s.
pub async fn argon2_turn() -> Option<tokio::sync::SemaphorePermit<'static>> {
    static TURNS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let turns = TURNS.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    tokio::time::timeout(std::time::Duration::from_secs(5), turns.acquire())
        .await
        .ok()?
        .ok()
}

/// The outcome of a password check.
#[derive(Debug)]
pub enum PasswordCheck {
    /// The user, whose password it is.
    Valid(Box<User>),
    /// Wrong email or password (which of the two is not told).
    Invalid,
    /// No turn at Argon2 within 5 s.
    Busy,
    /// The store could not be read.
    Unavailable,
}

/// Checks a user's password with Argon2id off the async threads. An unknown email costs the
/// same work as a wrong password, so the answer time does not tell which it was.
pub async fn check_password(
    state: &AppState,
    tenant_id: &TenantId,
    email: &str,
    password: &str,
) -> PasswordCheck {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let email = email.trim().to_ascii_lowercase();
    let user = match state.store.get_user_by_email(tenant_id, &email).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!("password check: {e}");
            return PasswordCheck::Unavailable;
        }
    };
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    let password = password.to_owned();
    let Some(turn) = argon2_turn().await else {
        return PasswordCheck::Busy;
    };
    // The turn is held by the work itself: a client that hangs up does not free it while
    // Argon2 still runs.
    let ok = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
        let a = argon2::Argon2::default();
        let dummy = DUMMY.get_or_init(|| {
            let salt = SaltString::encode_b64(b"keygate-dummy-salt").map_err(|e| e.to_string());
            salt.and_then(|s| {
                a.hash_password(b"not a password", &s)
                    .map(|h| h.to_string())
                    .map_err(|e| e.to_string())
            })
            .unwrap_or_default()
        });
        let (phc, real) = match &hash {
            Some(h) => (h.as_str(), true),
            None => (dummy.as_str(), false),
        };
        let verified = PasswordHash::new(phc)
            .map(|h| a.verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        real && verified
    })
    .await
    .unwrap_or(false);
    match user {
        Some(u) if ok => PasswordCheck::Valid(Box::new(u)),
        _ => PasswordCheck::Invalid,
    }
}

/// Hashes a password with Argon2id (default parameters) off the async threads.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    let turn = argon2_turn().await.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "too many password operations at once; try again shortly",
        )
    })?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        use argon2::password_hash::{PasswordHasher, SaltString};
        let mut salt = [0u8; 16];
        keygate_engine::ids::os_fill(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::internal("password hashing task", &e))?
    .map_err(|e| ApiError::internal("password hashing", &e))
}

/// `POST /v1/users`
#[utoipa::path(
    operation_id = "users_create",
    post,
    path = "/v1/users",
    tag = "users",
    summary = "Create a user",
    description = "Needs scope `users:write`.",
    request_body = CreateUser,
    responses((status = 201, body = UserView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<CreateUser>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    if caller.own_user().is_some() {
        // A user may not choose another user's plan or password: the owner invites.
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "users are made by an admin key, or invited by the account's owner (POST /v1/users/invite)",
        ));
    }
    let tenant = caller.act_in(&state, body.tenant_id.as_deref()).await?;
    let email = email_address(&body.email)?;
    let plan = body.plan.unwrap_or_else(|| "free".to_owned());
    if !state.config.plans.contains_key(&plan) {
        return Err(ApiError::invalid("plan is not one of the configured plans"));
    }
    let name = body
        .name
        .map(|n| keygate_engine::issue::check_name(&n))
        .transpose()?;
    let password_hash = match body.password {
        Some(p) if p.chars().count() < 8 || p.len() > 1024 => {
            return Err(ApiError::invalid("password must be 8 to 1024 characters"))
        }
        Some(p) => Some(hash_password(p).await?),
        None => None,
    };
    let now = now_ms();
    let user = User {
        id: keygate_engine::ids::new_id("usr", now).into(),
        tenant_id: tenant,
        email,
        name,
        plan,
        password_hash,
        created_at_ms: now,
        role: Role::Member,
        verified: true,
        sessions_from_ms: 0,
        removed_at_ms: None,
    };
    let (st, u, actor) = (state.clone(), user.clone(), caller.key.record.id.clone());
    // The write and its audit event run to completion even if the client goes away; a
    // conflict comes back as a value so that it keeps its own message.
    let inserted = super::detached(async move {
        match st.store.insert_user(&u).await {
            Ok(()) => {
                let detail = serde_json::json!({"plan": u.plan});
                st.record_change(keygate_engine::engine::Change {
                    actor: &actor,
                    action: "user.created",
                    tenant_id: &u.tenant_id,
                    key_id: None,
                    user_id: Some(&u.id),
                    detail: &detail,
                })
                .await;
                Ok(true)
            }
            Err(e) if e.kind == keygate_store::StoreErrorKind::Conflict => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?;
    if !inserted {
        return Err(ApiError::conflict(
            "a user with this email exists in the tenant",
        ));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(crate::views::user_view(&user)),
    ))
}

/// Who may invite and remove the members of an account: an admin key (`sk`), or the
/// account's owner; never a member.
fn manages_members(caller: &super::Caller) -> Result<(), ApiError> {
    if caller.own_user().is_some() && !caller.key.owner {
        return Err(ApiError::because(
            keygate_core::Code::ForbiddenScope,
            "only the account's owner or an admin key invites and removes users",
        ));
    }
    Ok(())
}

/// `POST /v1/users/invite`
#[utoipa::path(
    operation_id = "users_invite",
    post,
    path = "/v1/users/invite",
    tag = "users",
    summary = "Invite a member to the account by email",
    description = "Needs scope `users:write`, as the account's owner or an admin key. 202: the address gets a link that works once, for 7 days, and makes a `member` on the account's plan. 409 when a user of the account has the address; 503 without `[smtp]`; 429 past 20 invitations an hour per account, or 3 to one address.",
    request_body = keygate_api::InviteUser,
    responses((status = 202), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn invite(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<keygate_api::InviteUser>,
) -> Result<StatusCode, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    manages_members(&caller)?;
    let tenant_id = caller.act_in(&state, body.tenant_id.as_deref()).await?;
    let email = email_address(&body.email)?;
    if body.role.as_deref().is_some_and(|r| r != "member") {
        return Err(ApiError::invalid(
            "role must be member: an invitation makes a member",
        ));
    }
    if state.mailer.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "no email is configured ([smtp] url): invitations cannot be sent",
        ));
    }
    let tenant = state
        .store
        .get_tenant(&tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    if state
        .store
        .get_user_by_email(&tenant_id, &email)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict("a user of the account has this address"));
    }
    // 20 an hour per account and 3 per address, on every node together: an account cannot
    // flood one inbox, nor many.
    for (name, limit) in [
        (format!("invite:{tenant_id}"), 20),
        (format!("invite-to:{email}"), 3),
    ] {
        if let Some(rate) = state.hourly(&name, limit).await.filter(|r| !r.allowed) {
            return Err(ApiError::decision(
                keygate_core::Code::RateLimited,
                Some(rate),
            ));
        }
    }
    let inviter = match caller.own_user() {
        Some(u) => state
            .store
            .get_user(u)
            .await?
            .map_or_else(|| "The account's owner".to_owned(), |u| u.email),
        None => "An administrator".to_owned(),
    };
    let st = state.clone();
    let (actor, em) = (caller.key.record.id.to_string(), email.clone());
    super::detached(async move {
        st.send_invite(&tenant, &em, &inviter).await?;
        let detail = serde_json::json!({"email": em, "role": "member"});
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "user.invited",
            tenant_id: &tenant.id,
            key_id: None,
            user_id: None,
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await?;
    Ok(StatusCode::ACCEPTED)
}

/// `DELETE /v1/users/{id}`
#[utoipa::path(
    operation_id = "users_remove",
    delete,
    path = "/v1/users/{id}",
    tag = "users",
    summary = "Remove a member: every key of theirs is revoked at once",
    description = "Needs scope `users:write`, as the account's owner or an admin key. 204; the user can no longer sign in, their sessions end, their keys answer `REVOKED` on every node. The owner is not removed (422).",
    params(("id" = String, Path, description = "User id")),
    responses((status = 204), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<UserId>,
) -> Result<StatusCode, ApiError> {
    let caller = ctx.caller(&state, WRITE, RouteClass::Admin).await?;
    manages_members(&caller)?;
    let user = match state.store.get_user(&id).await? {
        Some(u) if caller.sees(&u.tenant_id) && u.removed_at_ms.is_none() => u,
        _ => return Err(ApiError::not_found("user")),
    };
    if user.role == Role::Owner {
        return Err(ApiError::invalid("the account's owner cannot be removed"));
    }
    let st = state.clone();
    let actor = caller.key.record.id.to_string();
    super::detached(async move { st.remove_member(&id, &actor).await })
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/users`
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListUsers {
    limit: Option<u32>,
    cursor: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /v1/users`
#[utoipa::path(
    operation_id = "users_list",
    get,
    path = "/v1/users",
    tag = "users",
    summary = "List users",
    description = "Needs scope `users:read`.",
    params(ListUsers),
    responses((status = 200, body = ListView<UserView>), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<ListUsers>,
) -> Result<axum::Json<ListView<UserView>>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .page()?;
    let tenant = caller.act_in(&state, q.tenant_id.as_deref()).await?;
    let users = state.store.list_users(&tenant, &page).await?;
    let next = next_cursor(&users, page.limit, |u| &u.id);
    Ok(axum::Json(ListView {
        data: users.iter().map(crate::views::user_view).collect(),
        next_cursor: next,
    }))
}

/// `GET /v1/users/{id}`
#[utoipa::path(
    operation_id = "users_get",
    get,
    path = "/v1/users/{id}",
    tag = "users",
    summary = "Read a user",
    description = "Needs scope `users:read`.",
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserView), crate::openapi::Refusals),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<UserId>,
) -> Result<axum::Json<UserView>, ApiError> {
    let caller = ctx.caller(&state, READ, RouteClass::Admin).await?;
    match state.store.get_user(&id).await? {
        Some(u) if caller.sees(&u.tenant_id) && u.removed_at_ms.is_none() => {
            Ok(axum::Json(crate::views::user_view(&u)))
        }
        _ => Err(ApiError::not_found("user")),
    }
}

//! Accounts from outside: `POST /v1/signup` (anyone makes an account on `[signup] plan`,
//! becomes its owner and gets a first `ut` key, shown once; off unless `[signup] enabled`),
//! the email link that verifies it, and password reset by email.
//!
//! Abuse: sign-ups and reset requests are limited per client network
//! (`per_ip_per_hour`, across nodes with Redis); passwords must pass [`password_problem`]; an
//! address registered already gets the same status and shape as a new one, without an
//! account or key, after the same Argon2 work, and its owner is emailed instead. Emails go out
//! in tasks of their own, so no answer waits on the SMTP server.

use super::Ctx;
use crate::error::{ApiError, Json, Query};
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::{ForgotPassword, ResetPassword, SignUp, SignedUp, Verified};
use keygate_core::access::Role;
use keygate_core::{Code, TenantId, UserId};
use keygate_engine::accounts::password_problem;
use keygate_engine::clock::now_ms;
use keygate_engine::engine::Change;
use keygate_engine::issue::{self, CreateKey};
use keygate_store::{StoreErrorKind, Tenant, User};

/// `POST /v1/signup`
#[utoipa::path(
    operation_id = "signup",
    post,
    path = "/v1/signup",
    tag = "accounts",
    summary = "Make an account, its owner and a first key (public)",
    description = "No key needed. 201 with the account, its owner and a `ut` key shown once. An address registered already gets 201 with `account`, `user` and `key` null. 429 past `[signup] per_ip_per_hour` from one client address. 404 when sign-up is off.",
    request_body = SignUp,
    responses((status = 201, body = SignedUp), crate::openapi::Refusals)
)]
pub async fn signup(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<SignUp>,
) -> Result<impl IntoResponse, ApiError> {
    let made = create_account(&state, ctx.peer, body).await?;
    Ok((StatusCode::CREATED, axum::Json(made)))
}

/// Makes an account for `body`, from client address `peer` (the API and the dashboard's
/// sign-up page both call this). An address registered already gets [`SignedUp`] with
/// nothing in it.
pub(crate) async fn create_account(
    state: &AppState,
    peer: Option<std::net::IpAddr>,
    body: SignUp,
) -> Result<SignedUp, ApiError> {
    let cfg = &state.config.signup;
    if !cfg.enabled {
        return Err(ApiError::not_found("route"));
    }
    let now = now_ms();
    limit_network(state, "signup", peer).await?;
    let email = super::users::email_address(&body.email)?;
    let name = body.name.as_deref().map(issue::check_name).transpose()?;
    let organisation = match body.organisation.as_deref() {
        Some(o) => issue::check_name(o)?,
        None => email.clone(),
    };
    let known: Vec<&str> = [
        Some(email.as_str()),
        name.as_deref(),
        body.organisation.as_deref(),
    ]
    .into_iter()
    .flatten()
    // What an attacker who targets this person knows: the address, its parts, the names.
    .flat_map(|s| std::iter::once(s).chain(s.split(|c: char| !c.is_alphanumeric())))
    .filter(|w| w.chars().count() >= 3)
    .collect();
    if let Some(problem) = password_problem(&body.password, &known) {
        return Err(ApiError::invalid(problem));
    }
    // Hashed before the address is looked up: a registered address costs the same time.
    let password_hash = super::users::hash_password(body.password).await?;
    if state.store.email_registered(&email).await? {
        tracing::info!("sign-up with an address registered already");
        state.send_already_registered(&email);
        return Ok(nothing());
    }
    let plan = cfg.plan.clone();
    let start = state.plan_start(&plan, now);
    let tenant = Tenant {
        id: TenantId::from(keygate_engine::ids::new_id("tnt", now)),
        name: organisation,
        plan: plan.clone(),
        credits: start.grant,
        created_at_ms: now,
        plan_started_at_ms: now,
        trial_ends_at_ms: start.trial_ends_at_ms,
        refilled_months: 0,
        verified: !cfg.verify_email,
    };
    let user = User {
        id: UserId::from(keygate_engine::ids::new_id("usr", now)),
        tenant_id: tenant.id.clone(),
        email,
        name,
        plan,
        password_hash: Some(password_hash),
        created_at_ms: now,
        role: Role::Owner,
        // No email has confirmed the address yet (see docs/accounts.md).
        verified: false,
        sessions_from_ms: 0,
        removed_at_ms: None,
    };
    // The plan's API scopes, so the key works at once on the API behind keygate.
    let scopes = Some(state.plan_api_scopes(&user.plan));
    let (plaintext, key) = issue::build_key_for(
        &state.issuer(),
        &tenant.id,
        CreateKey {
            kind: "ut".into(),
            name: "first key".into(),
            user_id: Some(user.id.to_string()),
            scopes,
            ..CreateKey::default()
        },
        Some(&user),
        now,
    )?;
    let (st, t, u, k) = (state.clone(), tenant.clone(), user.clone(), key.clone());
    let made = super::detached(async move {
        match st.store.sign_up(&t, &u, &k).await {
            Ok(()) => {}
            // Two sign-ups with one address at once: the second finds it taken.
            Err(e) if e.kind == StoreErrorKind::Conflict => return Ok(false),
            Err(e) => return Err(e),
        }
        let actor = u.id.as_str();
        for (action, key_id, user_id, detail) in [
            ("tenant.created", None, None, serde_json::json!({"plan": t.plan, "via": "signup"})),
            ("user.created", None, Some(&u.id), serde_json::json!({"role": "owner"})),
            (
                "key.created",
                Some(&k.id),
                Some(&u.id),
                serde_json::json!({"kind": "ut", "name": k.name, "scopes": k.scopes.to_strings(), "via": "signup"}),
            ),
        ] {
            st.record_change(Change {
                actor,
                action,
                tenant_id: &t.id,
                key_id,
                user_id,
                detail: &detail,
            })
            .await;
        }
        Ok(true)
    })
    .await?;
    if !made {
        return Ok(nothing());
    }
    if cfg.verify_email {
        if let Err(e) = state.send_verification(&user).await {
            // The account stands; a password reset (which verifies the address too) works.
            tracing::error!("verification link not stored: {e}");
        }
    }
    Ok(SignedUp {
        account: Some(crate::views::tenant_view(state, &tenant)),
        user: Some(crate::views::user_view(&user)),
        key: Some(plaintext),
    })
}

/// 429 once `peer`'s network made `[signup] per_ip_per_hour` requests of `what` this hour.
async fn limit_network(
    state: &AppState,
    what: &str,
    peer: Option<std::net::IpAddr>,
) -> Result<(), ApiError> {
    match state.per_network_hourly(what, peer).await {
        Some(rate) if !rate.allowed => Err(ApiError::decision(Code::RateLimited, Some(rate))),
        _ => Ok(()),
    }
}

/// `?token=`
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenQuery {
    /// The token of the emailed link.
    pub token: String,
}

/// `GET /v1/signup/verify?token=…`
#[utoipa::path(
    operation_id = "verifyEmail",
    get,
    path = "/v1/signup/verify",
    tag = "accounts",
    summary = "Open the link that verifies an address (public)",
    description = "The link emailed at sign-up (with `[signup] verify_email`). 200 with the user; the account's keys stop answering `ACCOUNT_UNVERIFIED` on every node at once. A link works once, until it expires: 400 otherwise.",
    params(TokenQuery),
    responses((status = 200, body = Verified), crate::openapi::Refusals)
)]
pub async fn verify_email(
    State(state): State<AppState>,
    Query(q): Query<TokenQuery>,
) -> Result<axum::Json<Verified>, ApiError> {
    if q.token.len() > 128 {
        return Err(bad_link());
    }
    let st = state.clone();
    let user = super::detached(async move { st.verify_email(&q.token).await })
        .await?
        .ok_or_else(bad_link)?;
    Ok(axum::Json(Verified {
        user: crate::views::user_view(&user),
    }))
}

fn bad_link() -> ApiError {
    ApiError::invalid(
        "the link does not work: it was used already, has expired, or is not one keygate sent",
    )
}

/// `POST /v1/password/forgot`
#[utoipa::path(
    operation_id = "forgotPassword",
    post,
    path = "/v1/password/forgot",
    tag = "accounts",
    summary = "Email a password-reset link (public)",
    description = "202 whether or not the address belongs to a user (the answer does not tell); each user with that address gets a link that works once, for 30 minutes. 429 past `[signup] per_ip_per_hour` from one client network.",
    request_body = ForgotPassword,
    responses((status = 202), crate::openapi::Refusals)
)]
pub async fn forgot_password(
    State(state): State<AppState>,
    ctx: Ctx,
    Json(body): Json<ForgotPassword>,
) -> Result<StatusCode, ApiError> {
    forgot(&state, ctx.peer, &body.email).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Sends reset links for `email` (the API and the dashboard's page): answered before the
/// lookup, so the time does not tell whether a user has the address.
pub(crate) async fn forgot(
    state: &AppState,
    peer: Option<std::net::IpAddr>,
    email: &str,
) -> Result<(), ApiError> {
    limit_network(state, "forgot", peer).await?;
    let email = super::users::email_address(email)?;
    let st = state.clone();
    let rid = keygate_engine::request_id::RequestId(
        keygate_engine::request_id::RequestId::current_or_new(),
    );
    tokio::spawn(rid.scope(async move {
        if let Err(e) = st.send_reset(&email).await {
            tracing::error!("password reset link not sent (store): {e}");
        }
    }));
    Ok(())
}

/// `POST /v1/password/reset`
#[utoipa::path(
    operation_id = "resetPassword",
    post,
    path = "/v1/password/reset",
    tag = "accounts",
    summary = "Set a new password with an emailed link (public)",
    description = "204: the password is changed, the address counts as verified, and every session of the user ends (sign-in pages, and dashboard sessions with their keys). The link works once, for 30 minutes: 400 otherwise. The password must be 10 to 1024 characters and not easy to guess.",
    request_body = ResetPassword,
    responses((status = 204), crate::openapi::Refusals)
)]
pub async fn reset_password(
    State(state): State<AppState>,
    Json(body): Json<ResetPassword>,
) -> Result<StatusCode, ApiError> {
    reset_with(&state, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the password of a reset link's user (the API and the dashboard's reset page).
pub(crate) async fn reset_with(state: &AppState, body: ResetPassword) -> Result<User, ApiError> {
    if body.token.len() > 128 {
        return Err(bad_link());
    }
    if let Some(problem) = password_problem(&body.password, &[]) {
        return Err(ApiError::invalid(problem));
    }
    // A dead link costs no Argon2 work (a flood of made-up tokens cannot take every turn).
    if !state
        .link_live(&body.token, keygate_store::EmailPurpose::Reset)
        .await?
    {
        return Err(bad_link());
    }
    let hash = super::users::hash_password(body.password).await?;
    let (st, token) = (state.clone(), body.token);
    super::detached(async move { st.reset_password(&token, &hash).await })
        .await?
        .ok_or_else(bad_link)
}

/// The answer to a sign-up that made nothing (the address is registered already).
fn nothing() -> SignedUp {
    SignedUp {
        account: None,
        user: None,
        key: None,
    }
}

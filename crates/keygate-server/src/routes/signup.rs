//! `POST /v1/signup`: anyone makes an account (a tenant on `[signup] plan`), becomes its owner
//! and gets a first `ut` key, shown once. Off unless `[signup] enabled`.
//!
//! Abuse: sign-ups are limited per client address (`per_ip_per_hour`, on each node);
//! passwords must pass [`password_problem`]; an address registered already gets the same
//! status and shape as a new one, without an account or key, and the same Argon2 work, so
//! the answer's time does not tell either.

use super::Ctx;
use crate::error::{ApiError, Json};
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keygate_api::{SignUp, SignedUp};
use keygate_core::access::Role;
use keygate_core::{Code, RateLimit, RouteClass, TenantId, UserId};
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
    if cfg.per_ip_per_hour > 0 {
        let limit = RateLimit {
            limit: cfg.per_ip_per_hour,
            window_seconds: 3600,
        };
        // An IPv6 client holds a /64 at least: count per /64.
        let who = match peer {
            Some(std::net::IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            Some(ip) => ip.to_string(),
            None => "unknown".to_owned(),
        };
        let rate = state
            .counters
            .check_named(&format!("signup:{who}"), &limit, now);
        if !rate.allowed {
            return Err(ApiError::decision(Code::RateLimited, Some(rate)));
        }
    }
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
    };
    let scopes = first_key_scopes(state, &user);
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
    Ok(SignedUp {
        account: Some(crate::views::tenant_view(state, &tenant)),
        user: Some(crate::views::user_view(&user)),
        key: Some(plaintext),
    })
}

/// The answer to a sign-up that made nothing (the address is registered already).
fn nothing() -> SignedUp {
    SignedUp {
        account: None,
        user: None,
        key: None,
    }
}

/// The first key's scopes: the plan's list, else every scope the configured normal routes ask
/// for, so the key works at once on the API behind keygate. Admin, billing, webhook and
/// token-management routes are the operator's: a stranger's key gets none of their scopes.
fn first_key_scopes(state: &AppState, user: &User) -> Option<Vec<String>> {
    if state.plan(&user.plan).scopes.is_some() {
        return None;
    }
    let mut scopes: Vec<String> = state
        .config
        .routes
        .iter()
        .filter(|r| r.class == RouteClass::Normal)
        .filter_map(|r| r.scope.clone())
        .filter(|s| s != "*")
        .collect();
    scopes.sort_unstable();
    scopes.dedup();
    Some(scopes)
}

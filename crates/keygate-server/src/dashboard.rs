//! The web dashboard (`/dashboard`): server-rendered pages (askama templates in
//! `templates/dashboard/`) over keygate's own management API.
//!
//! The dashboard is a client of the API: every page calls the API routes in process with the
//! signed-in key, so scopes, tenant isolation, audit events and validation are exactly the
//! API's, and nothing here decides who may do what.
//!
//! Session: the `sk` key the user signed in with, encrypted (ChaCha20-Poly1305, a key derived
//! from the store's shared secret, so any node can read it) in an `HttpOnly`, `SameSite=Lax`
//! cookie (`Secure` when the issuer is https), for 12 hours. Every form carries a CSRF token:
//! an HMAC of the session's random id; the sign-in form uses a double-submit cookie.

use crate::headers::cookie;
use crate::state::AppState;
use askama::Template;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http_body_util::BodyExt;
use keygate_api::{
    AlertView, AuditView, ClientView, CreateClient, CreateKey, CreateWebhook, DeliveryView,
    ErrorBody, IssuedKey, KeyView, ListView, RateLimitBody, RotateKey, TenantView, TestEvent,
    UpdateKey, UsageBucket, UsageView, WebhookView,
};
use keygate_core::{KeyId, TenantId, UserId};
use keygate_engine::clock::now_ms;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;

const SESSION_COOKIE: &str = "kg_dash";
const LOGIN_CSRF_COOKIE: &str = "kg_dash_csrf";
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

#[derive(Serialize, Deserialize)]
struct Session {
    key: String,
    sid: String,
    exp: i64,
    /// A password sign-in's own session key (a `ut` key of the user), ended at sign-out.
    #[serde(default)]
    session_key_id: Option<String>,
}

/// What a user signed in with a password does in the dashboard: see and make their own keys
/// (a member's `ut` key sees only its user's keys) within their plan. The session key also
/// holds the plan's API scopes, the most any key the user makes may hold; a change by the
/// user only tightens a key (`only_tightens`).
const USER_SESSION_SCOPES: &[&str] = &["keys:read", "keys:write"];

/// What an account's owner's session adds: the account's audit log and usage, its users
/// (inviting and removing members; `POST /v1/users` refuses user tokens), and its webhooks
/// (where the plan has them).
const OWNER_SESSION_SCOPES: &[&str] = &[
    "audit:read",
    "users:read",
    "users:write",
    "webhooks:read",
    "webhooks:write",
];

/// The signed-in user of a request.
struct Signed {
    session: Session,
    csrf: String,
    peer: Option<SocketAddr>,
    /// The `Set-Cookie` that ends the session in the browser.
    ended: HeaderValue,
}

fn aead_key(state: &AppState) -> Option<ring::aead::LessSafeKey> {
    let k = state.oauth.derive_key("dashboard.session");
    ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &k)
        .ok()
        .map(ring::aead::LessSafeKey::new)
}

fn seal_session(state: &AppState, s: &Session) -> Option<String> {
    let key = aead_key(state)?;
    let mut nonce = [0u8; 12];
    keygate_engine::ids::os_fill(&mut nonce);
    let mut buf = serde_json::to_vec(s).ok()?;
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(b"kg-dash"),
        &mut buf,
    )
    .ok()?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Some(URL_SAFE_NO_PAD.encode(out))
}

fn open_session(state: &AppState, cookie: &str) -> Option<Session> {
    let raw = URL_SAFE_NO_PAD.decode(cookie).ok()?;
    if raw.len() < 12 + 16 {
        return None;
    }
    let (nonce, ct) = raw.split_at(12);
    let mut buf = ct.to_vec();
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
    let plain = aead_key(state)?
        .open_in_place(nonce, ring::aead::Aad::from(b"kg-dash"), &mut buf)
        .ok()?;
    let s: Session = serde_json::from_slice(plain).ok()?;
    (s.exp > now_ms()).then_some(s)
}

fn csrf_for(state: &AppState, sid: &str) -> String {
    URL_SAFE_NO_PAD.encode(state.oauth.mac_bytes("dashboard.csrf", sid.as_bytes()))
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age_s: i64) -> HeaderValue {
    crate::headers::set_cookie(&state.oauth.issuer, "/dashboard", name, value, max_age_s)
}

fn signed(state: &AppState, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<Signed> {
    let session = open_session(state, cookie(headers, SESSION_COOKIE)?)?;
    let csrf = csrf_for(state, &session.sid);
    Some(Signed {
        session,
        csrf,
        peer,
        ended: set_cookie(state, SESSION_COOKIE, "", 0),
    })
}

/// An HTML page with the dashboard's security headers.
fn html(status: StatusCode, body: String) -> Response {
    let mut res = (status, axum::response::Html(body)).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(s) => html(StatusCode::OK, s),
        Err(e) => {
            tracing::error!("dashboard template: {e}");
            html(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
        }
    }
}

fn to_login() -> Response {
    Redirect::to("/dashboard/login").into_response()
}

/// A refusal of keygate's own API: its status and `CODE: message`.
struct Refusal(StatusCode, String);

/// Calls the management API in process as the signed-in key: the answer read as `T`, or the
/// refusal.
async fn api<T: DeserializeOwned>(
    state: &AppState,
    who: &Signed,
    method: Method,
    path: &str,
    body: Option<&dyn ErasedBody>,
) -> Result<T, Refusal> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", who.session.key));
    let body = match body.map(ErasedBody::json) {
        Some(Ok(b)) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(b)
        }
        Some(Err(e)) => {
            tracing::error!("dashboard: a request body did not serialize: {e}");
            return Err(Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL".into(),
            ));
        }
        None => Body::empty(),
    };
    let Ok(mut req) = req.body(body) else {
        return Err(Refusal(StatusCode::BAD_REQUEST, "INVALID_REQUEST".into()));
    };
    if let Some(p) = who.peer {
        req.extensions_mut().insert(ConnectInfo(p));
    }
    let router = crate::startup::router(state.clone());
    let res = match tower::ServiceExt::oneshot(router, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !status.is_success() {
        let why = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => format!("{}: {}", e.error.code, e.error.message),
            Err(_) => "ERROR: the request was refused".to_owned(),
        };
        return Err(Refusal(status, why));
    }
    // An empty answer (204) reads as `null`.
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    T::deserialize(v).map_err(|e| {
        tracing::error!("dashboard: an answer of {path} did not read: {e}");
        Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL: unexpected answer".into(),
        )
    })
}

/// A request body of any type (`api` takes it as a trait object: one `api` per answer type,
/// not per pair).
trait ErasedBody: Sync {
    fn json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: Serialize + Sync> ErasedBody for T {
    fn json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

/// Words of a list, as the dashboard shows them.
fn joined(v: &[String]) -> String {
    v.join(" ")
}

/// An optional text, empty when absent.
fn or_empty(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

fn form(body: &Bytes) -> HashMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn query(raw: Option<&str>) -> HashMap<String, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw.unwrap_or(""))
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn qs(pairs: &[(&str, &str)]) -> String {
    let set: Vec<(&str, &str)> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .copied()
        .collect();
    serde_urlencoded::to_string(set).unwrap_or_default()
}

#[derive(Template)]
#[template(path = "dashboard/error.html")]
struct ErrorPage<'a> {
    csrf: &'a str,
    message: String,
    back: String,
}

fn error_page(who: &Signed, status: StatusCode, message: String, back: &str) -> Response {
    if status == StatusCode::UNAUTHORIZED {
        // The session's key no longer works (revoked by a sign-out elsewhere or a password
        // reset, expired): the session is over.
        let mut r = to_login();
        r.headers_mut()
            .append(header::SET_COOKIE, who.ended.clone());
        return r;
    }
    let mut r = render(&ErrorPage {
        csrf: &who.csrf,
        message,
        back: back.to_owned(),
    });
    *r.status_mut() = status;
    r
}

/// Checks a form's CSRF token against the session's.
fn csrf_ok(who: &Signed, f: &HashMap<String, String>) -> bool {
    f.get("csrf")
        .is_some_and(|t| keygate_oauth::ct_eq(t, &who.csrf))
}

// ---------------------------------------------------------------------------------------
// Sign in and out.

#[derive(Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage {
    csrf: String,
    error: Option<String>,
    /// Whether to offer sign-up.
    signup: bool,
}

fn login_page(state: &AppState, error: Option<String>, status: StatusCode) -> Response {
    let csrf = keygate_engine::ids::random_base62(32);
    let mut r = render(&LoginPage {
        csrf: csrf.clone(),
        error,
        signup: state.config.signup.enabled,
    });
    *r.status_mut() = status;
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_CSRF_COOKIE, &csrf, 3600),
    );
    r
}

// ---------------------------------------------------------------------------------------
// Sign up.

#[derive(Template, Default)]
#[template(path = "dashboard/signup.html")]
struct SignupPage {
    csrf: String,
    error: Option<String>,
    email: String,
    name: String,
    organisation: String,
    done: Option<SignedUpPage>,
    /// The new owner is signed in (a session cookie comes with the page).
    signed_in: bool,
}

/// A new account, shown once.
struct SignedUpPage {
    account: String,
    tenant: String,
    key: String,
    curl: String,
    plan: String,
    trial_ends_at: Option<String>,
    credits: String,
}

/// The sign-up form, with a fresh CSRF token in its cookie.
fn signup_page(state: &AppState, mut page: SignupPage, status: StatusCode) -> Response {
    let csrf = keygate_engine::ids::random_base62(32);
    page.csrf = csrf.clone();
    let mut r = render(&page);
    *r.status_mut() = status;
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_CSRF_COOKIE, &csrf, 3600),
    );
    r
}

// Forgot password, and the emailed link's page.

#[derive(Template, Default)]
#[template(path = "dashboard/password.html")]
struct PasswordPage {
    csrf: String,
    error: Option<String>,
    /// The reset link's token (the form that sets a new password).
    token: Option<String>,
    /// What happened (the form is done).
    notice: Option<String>,
}

fn password_page(state: &AppState, mut page: PasswordPage, status: StatusCode) -> Response {
    page.csrf = keygate_engine::ids::random_base62(32);
    link_page(state, &page, &page.csrf, status)
}

/// A page that may hold an emailed link's token, with the CSRF cookie of its form: no cache
/// may keep it, no Referer may carry it.
fn link_page(state: &AppState, page: &impl Template, csrf: &str, status: StatusCode) -> Response {
    let mut r = render(page);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_CSRF_COOKIE, csrf, 3600),
    );
    r
}

/// Checks a sign-in, sign-up or emailed-link form's CSRF token against its cookie (double
/// submit: these forms come before any session).
fn form_csrf_ok(f: &HashMap<String, String>, headers: &HeaderMap) -> bool {
    match (f.get("csrf"), cookie(headers, LOGIN_CSRF_COOKIE)) {
        (Some(a), Some(b)) => keygate_oauth::ct_eq(a, b),
        _ => false,
    }
}

/// `GET /dashboard/forgot`
pub async fn forgot_form(State(state): State<AppState>) -> Response {
    password_page(&state, PasswordPage::default(), StatusCode::OK)
}

/// `POST /dashboard/forgot`: as `POST /v1/password/forgot`.
pub async fn forgot(
    State(state): State<AppState>,
    ctx: crate::routes::Ctx,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let fail = |error: String, status| {
        password_page(
            &state,
            PasswordPage {
                error: Some(error),
                ..PasswordPage::default()
            },
            status,
        )
    };
    if !form_csrf_ok(&f, &ctx.headers) {
        return fail("The form expired; try again.".into(), StatusCode::FORBIDDEN);
    }
    let email = f.get("email").map_or("", |e| e.trim());
    match crate::routes::signup::forgot(&state, ctx.peer, email).await {
        Ok(()) => password_page(
            &state,
            PasswordPage {
                notice: Some(
                    "If an account uses this address, an email with a link is on its way. The link works for 30 minutes."
                        .into(),
                ),
                ..PasswordPage::default()
            },
            StatusCode::ACCEPTED,
        ),
        Err(e) => fail(e.message.into_owned(), e.status),
    }
}

/// `GET /dashboard/reset?token=…`: the emailed link; the token is spent only by the form.
pub async fn reset_form(
    State(state): State<AppState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let token = query(q.as_deref())
        .get("token")
        .cloned()
        .filter(|t| !t.is_empty() && t.len() <= 128);
    let Some(token) = token else {
        return password_page(
            &state,
            PasswordPage {
                error: Some("The link is incomplete: ask for a new one.".into()),
                ..PasswordPage::default()
            },
            StatusCode::BAD_REQUEST,
        );
    };
    password_page(
        &state,
        PasswordPage {
            token: Some(token),
            ..PasswordPage::default()
        },
        StatusCode::OK,
    )
}

/// `POST /dashboard/reset`: as `POST /v1/password/reset`.
pub async fn reset(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    let token = f.get("token").cloned().unwrap_or_default();
    let again = |error: String, status| {
        password_page(
            &state,
            PasswordPage {
                error: Some(error),
                token: Some(token.clone()),
                ..PasswordPage::default()
            },
            status,
        )
    };
    if !form_csrf_ok(&f, &headers) {
        return again("The form expired; try again.".into(), StatusCode::FORBIDDEN);
    }
    let body = keygate_api::ResetPassword {
        token: token.clone(),
        password: f.get("password").cloned().unwrap_or_default(),
    };
    match crate::routes::signup::reset_with(&state, body).await {
        Ok(user) => password_page(
            &state,
            PasswordPage {
                notice: Some(format!(
                    "Your password is changed, and every session of yours has ended. Sign in to organisation {} as {}.",
                    user.tenant_id, user.email
                )),
                ..PasswordPage::default()
            },
            StatusCode::OK,
        ),
        Err(e) => again(e.message.into_owned(), e.status),
    }
}

// An invitation's link.

#[derive(Template, Default)]
#[template(path = "dashboard/invite.html")]
struct InvitePage {
    csrf: String,
    error: Option<String>,
    token: String,
}

fn invite_page(state: &AppState, mut page: InvitePage, status: StatusCode) -> Response {
    page.csrf = keygate_engine::ids::random_base62(32);
    link_page(state, &page, &page.csrf, status)
}

/// `GET /dashboard/invite?token=…`: the invitation's form; the token is spent only by it.
pub async fn invite_form(
    State(state): State<AppState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let token = query(q.as_deref())
        .get("token")
        .cloned()
        .filter(|t| !t.is_empty() && t.len() <= 128);
    match token {
        Some(token) => invite_page(
            &state,
            InvitePage {
                token,
                ..InvitePage::default()
            },
            StatusCode::OK,
        ),
        None => invite_page(
            &state,
            InvitePage {
                error: Some("The link is incomplete: ask for a new invitation.".into()),
                ..InvitePage::default()
            },
            StatusCode::BAD_REQUEST,
        ),
    }
}

/// `POST /dashboard/invite`: accepts the invitation (a member of the account, on its plan)
/// and signs the new member in.
pub async fn invite_accept(
    State(state): State<AppState>,
    ctx: crate::routes::Ctx,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let token = f.get("token").cloned().unwrap_or_default();
    let again = |error: String, status, token: String| {
        invite_page(
            &state,
            InvitePage {
                error: Some(error),
                token,
                ..InvitePage::default()
            },
            status,
        )
    };
    if !form_csrf_ok(&f, &ctx.headers) {
        return again(
            "The form expired; try again.".into(),
            StatusCode::FORBIDDEN,
            token,
        );
    }
    if token.is_empty() || token.len() > 128 {
        return again(
            "The link does not work: ask for a new invitation.".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            String::new(),
        );
    }
    let name = match f.get("name").map(|n| n.trim()).filter(|n| !n.is_empty()) {
        None => None,
        Some(n) => match keygate_engine::issue::check_name(n) {
            Ok(n) => Some(n),
            Err(e) => {
                let e = crate::error::ApiError::from(e);
                return again(e.message.into_owned(), e.status, token);
            }
        },
    };
    let password = f.get("password").cloned().unwrap_or_default();
    if let Some(problem) = keygate_engine::accounts::password_problem(&password, &[]) {
        return again(problem.into(), StatusCode::UNPROCESSABLE_ENTITY, token);
    }
    // A dead link costs no Argon2 work.
    if !matches!(
        state
            .link_live(&token, keygate_store::EmailPurpose::Invite)
            .await,
        Ok(true)
    ) {
        return again(
            "The link does not work: it was used already or has expired. Ask for a new invitation."
                .into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            String::new(),
        );
    }
    let hash = match crate::routes::users::hash_password(password).await {
        Ok(h) => h,
        Err(e) => return again(e.message.into_owned(), e.status, token),
    };
    let now = now_ms();
    let user = keygate_store::User {
        id: UserId::from(keygate_engine::ids::new_id("usr", now)),
        // The link's account, address, role and plan are the store's to fill in.
        tenant_id: TenantId::from(""),
        email: String::new(),
        name,
        plan: String::new(),
        password_hash: Some(hash),
        created_at_ms: now,
        role: keygate_core::access::Role::Member,
        verified: true,
        sessions_from_ms: now,
        removed_at_ms: None,
    };
    let (st, t) = (state.clone(), token.clone());
    let made = crate::routes::detached(async move {
        match st.accept_invite(&t, &user).await {
            Ok(made) => Ok(Ok(made)),
            Err(e) if e.kind == keygate_store::StoreErrorKind::Conflict => Ok(Err(())),
            Err(e) => Err(e),
        }
    })
    .await;
    let user = match made {
        Ok(Ok(Some(u))) => u,
        Ok(Ok(None)) => return again(
            "The link does not work: it was used already or has expired. Ask for a new invitation."
                .into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            String::new(),
        ),
        Ok(Err(())) => {
            return again(
                "This address is a user of the account already: sign in instead.".into(),
                StatusCode::CONFLICT,
                String::new(),
            )
        }
        Err(e) => return again(e.message.into_owned(), e.status, token),
    };
    // The browser's earlier session (if any) ends: this one replaces it.
    if let Some(old) = signed(&state, &ctx.headers, None) {
        if let Some(id) = &old.session.session_key_id {
            end_session_key(&state, id).await;
        }
    }
    let session = match user_session(&state, &user, "invitation").await {
        Ok(s) => s,
        Err((message, status)) => return login_page(&state, Some(message), status),
    };
    let Some(sealed) = seal_session(&state, &session) else {
        return login_page(
            &state,
            Some("Try again.".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        );
    };
    let mut r = Redirect::to("/dashboard/keys").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, &sealed, SESSION_TTL_MS / 1000),
    );
    r
}

/// A first request with `key`: the first normal route (the API behind keygate), else the
/// forward-auth check, on the host the browser used.
fn first_request(state: &AppState, headers: &HeaderMap, key: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(|| state.config.listen.clone(), str::to_owned);
    let route = state
        .config
        .routes
        .iter()
        .find(|r| r.class == keygate_core::RouteClass::Normal && !r.public);
    let (method, path) = match route {
        Some(r) => (
            r.methods.first().cloned().unwrap_or_else(|| "GET".into()),
            r.path.trim_end_matches('*').to_owned(),
        ),
        None => ("GET".into(), "/v1/auth".into()),
    };
    let method = if method.eq_ignore_ascii_case("GET") {
        String::new()
    } else {
        format!("-X {} ", method.to_ascii_uppercase())
    };
    format!("curl {method}-H 'Authorization: Bearer {key}' http://{host}{path}")
}

/// `GET /dashboard/signup`
pub async fn signup_form(State(state): State<AppState>) -> Response {
    if !state.config.signup.enabled {
        return login_page(
            &state,
            Some("Sign-up is off on this deployment.".into()),
            StatusCode::NOT_FOUND,
        );
    }
    signup_page(&state, SignupPage::default(), StatusCode::OK)
}

/// `POST /dashboard/signup`: makes the account as `POST /v1/signup` does and shows its first
/// key once, with a ready command for the first request.
pub async fn signup(
    State(state): State<AppState>,
    ctx: crate::routes::Ctx,
    body: Bytes,
) -> Response {
    if !state.config.signup.enabled {
        return login_page(
            &state,
            Some("Sign-up is off on this deployment.".into()),
            StatusCode::NOT_FOUND,
        );
    }
    let f = form(&body);
    let field = |k: &str| f.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let mut page = SignupPage {
        email: field("email"),
        name: field("name"),
        organisation: field("organisation"),
        ..SignupPage::default()
    };
    if !form_csrf_ok(&f, &ctx.headers) {
        page.error = Some("The form expired; try again.".into());
        return signup_page(&state, page, StatusCode::FORBIDDEN);
    }
    let optional = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    let body = keygate_api::SignUp {
        email: page.email.clone(),
        password: f.get("password").cloned().unwrap_or_default(),
        name: optional(&page.name),
        organisation: optional(&page.organisation),
    };
    match crate::routes::signup::create_account(&state, ctx.peer, body).await {
        Ok(keygate_api::SignedUp {
            account: Some(account),
            user: Some(user),
            key: Some(key),
        }) => {
            // The person is signed in: a password session as after a sign-in.
            let signed_in = match state.store.get_user(&UserId::from(user.id.as_str())).await {
                Ok(Some(u)) => user_session(&state, &u, "dashboard sign-up")
                    .await
                    .ok()
                    .and_then(|s| seal_session(&state, &s)),
                _ => None,
            };
            let done = SignedUpPage {
                curl: first_request(&state, &ctx.headers, &key),
                account: account.name,
                tenant: account.id,
                key,
                plan: account.plan,
                trial_ends_at: account.trial_ends_at,
                credits: account
                    .credits
                    .map_or_else(|| "Unlimited credits.".into(), |c| format!("{c} credits.")),
            };
            let mut r = render(&SignupPage {
                done: Some(done),
                signed_in: signed_in.is_some(),
                ..SignupPage::default()
            });
            // The key is on this page only: no cache may keep it.
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Some(sealed) = signed_in {
                r.headers_mut().append(
                    header::SET_COOKIE,
                    set_cookie(&state, SESSION_COOKIE, &sealed, SESSION_TTL_MS / 1000),
                );
            }
            *r.status_mut() = StatusCode::CREATED;
            r
        }
        Ok(_) => {
            // The address has an account: its owner is emailed; the page does not say more.
            page.error = Some(
                "No account was made. If this address has one already, an email to it says how to sign in."
                    .into(),
            );
            signup_page(&state, page, StatusCode::OK)
        }
        Err(e) => {
            page.error = Some(e.message.into_owned());
            signup_page(&state, page, e.status)
        }
    }
}

/// `GET /dashboard` and `GET /dashboard/login`
pub async fn home(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    match signed(&state, &headers, Some(peer)) {
        Some(_) => Redirect::to("/dashboard/keys").into_response(),
        None => login_page(&state, None, StatusCode::OK),
    }
}

/// `POST /dashboard/login`
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if !form_csrf_ok(&f, &headers) {
        return login_page(
            &state,
            Some("The form expired; sign in again.".into()),
            StatusCode::FORBIDDEN,
        );
    }
    // A new sign-in replaces the session this browser had: its session key ends now.
    if let Some(old) = signed(&state, &headers, Some(peer)) {
        if let Some(id) = &old.session.session_key_id {
            end_session_key(&state, id).await;
        }
    }
    if f.get("method").map(String::as_str) == Some("password") {
        return password_login(&state, &headers, &f, peer).await;
    }
    let key = f
        .get("key")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    match state.format.parse(&key) {
        Ok(p) if p.kind() == keygate_core::Kind::Sk => {}
        _ => {
            return login_page(
                &state,
                Some("Sign in with a secret key of this deployment (…_sk_…).".into()),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
    let session = Session {
        key,
        sid: keygate_engine::ids::random_base62(24),
        exp: now_ms() + SESSION_TTL_MS,
        session_key_id: None,
    };
    start_session(&state, session, peer).await
}

/// Checks that the session's key works, then sets the session cookie.
async fn start_session(state: &AppState, session: Session, peer: SocketAddr) -> Response {
    let who = Signed {
        csrf: String::new(),
        session,
        peer: Some(peer),
        ended: set_cookie(state, SESSION_COOKIE, "", 0),
    };
    // The key must work for at least reading its own tenant's keys.
    let probe: Result<ListView<KeyView>, _> =
        api(state, &who, Method::GET, "/v1/keys?limit=1", None).await;
    if let Err(Refusal(_, why)) = probe {
        return login_page(
            state,
            Some(format!("That key was refused: {why}")),
            StatusCode::UNAUTHORIZED,
        );
    }
    let Some(sealed) = seal_session(state, &who.session) else {
        return login_page(
            state,
            Some("Try again.".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        );
    };
    let mut r = Redirect::to("/dashboard/keys").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, SESSION_COOKIE, &sealed, SESSION_TTL_MS / 1000),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_CSRF_COOKIE, "", 0),
    );
    r
}

/// Ends a password session's key at once, through the store (not through the key itself,
/// whose scopes may not allow it), with its audit event.
async fn end_session_key(state: &AppState, id: &str) {
    let (st, key_id) = (state.clone(), KeyId::from(id));
    let ended = crate::routes::detached(async move {
        // The session's own key: its user is the actor.
        let actor = st
            .store
            .get_key(&key_id)
            .await?
            .and_then(|k| k.user_id)
            .map_or_else(|| "system".to_owned(), |u| u.to_string());
        st.revoke_now(&key_id, &actor, "dashboard sign-out").await?;
        Ok(())
    })
    .await;
    if let Err(e) = ended {
        tracing::error!("could not end dashboard session key {id}: {e:?}");
    }
}

/// A password session of `user`: a `ut` key of the user, valid for the session only, made
/// and stored (with its `key.created` event, `via`), for the dashboard to call the API with.
/// Refused: the message and status to show.
async fn user_session(
    state: &AppState,
    user: &keygate_store::User,
    via: &'static str,
) -> Result<Session, (String, StatusCode)> {
    let mut scopes: Vec<String> = USER_SESSION_SCOPES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if user.role == keygate_core::access::Role::Owner {
        scopes.extend(OWNER_SESSION_SCOPES.iter().map(|s| (*s).to_owned()));
    }
    scopes.extend(state.plan_api_scopes(&user.plan));
    let issuer = keygate_engine::issue::Issuer {
        config: &state.config,
        format: &state.format,
        hasher: &state.hasher,
    };
    let now = now_ms();
    let body = keygate_engine::issue::CreateKey {
        kind: "ut".into(),
        name: format!("dashboard session of {}", user.email),
        user_id: Some(user.id.to_string()),
        scopes: Some(scopes),
        // Page views are API calls: the user's plan's rate limit is for their own keys.
        rate_limit: Some(keygate_engine::issue::RateLimitBody {
            limit: 1_000,
            window_seconds: 60,
        }),
        ttl_seconds: Some(u64::try_from(SESSION_TTL_MS / 1000).unwrap_or(43_200)),
        // A password reset ends the keys that carry this mark.
        metadata: Some(serde_json::Map::from_iter([(
            keygate_engine::accounts::SESSION_MARK.to_owned(),
            serde_json::Value::Bool(true),
        )])),
        ..keygate_engine::issue::CreateKey::default()
    };
    let (plaintext, record) =
        match keygate_engine::issue::build_key(&issuer, &*state.store, &user.tenant_id, body, now)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                return Err((
                    format!(
                        "Your plan does not allow the dashboard: {}",
                        crate::error::ApiError::from(e).message
                    ),
                    StatusCode::FORBIDDEN,
                ))
            }
        };
    let (st, rec) = (state.clone(), record.clone());
    let stored = crate::routes::detached(async move {
        st.store.insert_key(&rec).await?;
        let detail = serde_json::json!({"kind": "ut", "name": rec.name, "via": via});
        let actor = rec.user_id.as_deref().unwrap_or_default().to_owned();
        st.record_change(keygate_engine::engine::Change {
            actor: &actor,
            action: "key.created",
            tenant_id: &rec.tenant_id,
            key_id: Some(&rec.id),
            user_id: rec.user_id.as_ref(),
            detail: &detail,
        })
        .await;
        Ok(())
    })
    .await;
    if stored.is_err() {
        return Err((
            "Try again in a moment.".into(),
            StatusCode::SERVICE_UNAVAILABLE,
        ));
    }
    Ok(Session {
        key: plaintext,
        sid: keygate_engine::ids::random_base62(24),
        exp: now + SESSION_TTL_MS,
        session_key_id: Some(record.id.to_string()),
    })
}

/// A sign-in with a user's email and password: a `ut` key of the user, valid for the session
/// only, is made for the dashboard to call the API with (so every action is the user's in the
/// audit log, and the user sees and manages only their own keys); it ends at sign-out.
async fn password_login(
    state: &AppState,
    headers: &HeaderMap,
    f: &HashMap<String, String>,
    peer: SocketAddr,
) -> Response {
    use crate::routes::users::PasswordCheck;
    let tenant = f
        .get("tenant")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map_or_else(crate::routes::default_tenant, TenantId::from);
    let email = f
        .get("email")
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let password = f.get("password").cloned().unwrap_or_default();
    let account = format!("{tenant}/{email}");
    // A client whose address cannot be told shares the proxy's throttle.
    let ip = state
        .proxies
        .client_ip(headers, peer.ip())
        .unwrap_or(peer.ip());
    let attempt = match keygate_engine::login::begin(state, &account, ip).await {
        Ok(a) => a,
        Err(r) => {
            let mut page = login_page(
                state,
                Some(keygate_engine::login::refusal_message(r)),
                crate::headers::login_refusal_status(r),
            );
            if let Some(after) = crate::headers::login_retry_after(r) {
                page.headers_mut().insert(header::RETRY_AFTER, after);
            }
            return page;
        }
    };
    let user = match crate::routes::users::check_password(state, &tenant, &email, &password).await {
        PasswordCheck::Valid(u) => u,
        PasswordCheck::Invalid => {
            attempt.failed(state).await;
            return login_page(
                state,
                Some("Wrong organisation, email or password.".into()),
                StatusCode::UNAUTHORIZED,
            );
        }
        PasswordCheck::Busy | PasswordCheck::Unavailable => {
            attempt.not_judged(state).await;
            return login_page(
                state,
                Some("Try again in a moment.".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            );
        }
    };
    attempt.succeeded(state).await;
    let session = match user_session(state, &user, "dashboard sign-in").await {
        Ok(s) => s,
        Err((message, status)) => return login_page(state, Some(message), status),
    };
    let record_id = session.session_key_id.clone().unwrap_or_default();
    let res = start_session(state, session, peer).await;
    if !res.status().is_redirection() {
        // The key was refused (the plan has no API access, …): it must not outlive this page.
        end_session_key(state, &record_id).await;
    }
    res
}

/// `POST /dashboard/logout` (with the session's CSRF token, so another site cannot sign the
/// user out).
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    if let Some(who) = signed(&state, &headers, Some(peer)) {
        if !csrf_ok(&who, &form(&body)) {
            return Redirect::to("/dashboard/keys").into_response();
        }
        // A password session's own key ends with it.
        if let Some(id) = &who.session.session_key_id {
            end_session_key(&state, id).await;
        }
    }
    let mut r = Redirect::to("/dashboard/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, "", 0),
    );
    r
}

/// `GET /dashboard/app.js`: the one script (copy to clipboard), served from here so the
/// pages' Content-Security-Policy allows no inline script.
pub async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        "document.querySelectorAll('button[data-copy]').forEach((b) => {\n\
         b.addEventListener('click', async () => {\n\
         const text = document.getElementById(b.dataset.copy).textContent.trim();\n\
         const out = document.getElementById(b.dataset.copy + '-status');\n\
         try { await navigator.clipboard.writeText(text); out.textContent = 'Copied.'; }\n\
         catch (e) { out.textContent = 'Select the key and copy it by hand.'; }\n\
         });\n});\n",
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Keys.

struct KeyRow {
    id: String,
    name: String,
    kind: String,
    status: String,
    start: String,
    scopes: String,
    last_used: String,
}

struct Opt {
    value: &'static str,
    selected: bool,
}

fn options(values: &[&'static str], chosen: &str) -> Vec<Opt> {
    values
        .iter()
        .map(|v| Opt {
            value: v,
            selected: *v == chosen,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "dashboard/keys.html")]
struct KeysPage {
    csrf: String,
    /// The account's plan, as its users see it (password sessions).
    plan: Option<String>,
    /// Why the account's keys are refused on the API now, and what would change it.
    notice: Option<String>,
    keys: Vec<KeyRow>,
    kinds: Vec<Opt>,
    statuses: Vec<Opt>,
    filter_name: String,
    next: Option<String>,
}

/// One page of a filtered API listing: the filters `names` are read from the page's query and
/// passed on with the cursor; answers the filter values, the API's answer and the link to the
/// next page (`Err` is the error page).
async fn filtered<T: DeserializeOwned>(
    state: &AppState,
    who: &Signed,
    raw: Option<&str>,
    api_path: &str,
    page_path: &str,
    limit: &str,
    names: &[&'static str],
) -> Result<(HashMap<&'static str, String>, ListView<T>, Option<String>), Response> {
    let q = query(raw);
    let values: HashMap<&'static str, String> = names
        .iter()
        .map(|n| (*n, q.get(*n).cloned().unwrap_or_default()))
        .collect();
    let cursor = q.get("cursor").cloned().unwrap_or_default();
    let mut pairs: Vec<(&str, &str)> = names.iter().map(|n| (*n, values[n].as_str())).collect();
    pairs.push(("cursor", &cursor));
    pairs.push(("limit", limit));
    let v: ListView<T> = api(
        state,
        who,
        Method::GET,
        &format!("{api_path}?{}", qs(&pairs)),
        None,
    )
    .await
    .map_err(|Refusal(st, why)| error_page(who, st, why, "/dashboard/keys"))?;
    let next = v.next_cursor.as_deref().map(|c| {
        let mut pairs: Vec<(&str, &str)> = names.iter().map(|n| (*n, values[n].as_str())).collect();
        pairs.push(("cursor", c));
        format!("{page_path}?{}", qs(&pairs))
    });
    Ok((values, v, next))
}

/// `GET /dashboard/keys`
pub async fn keys(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let (f, v, next) = match filtered(
        &state,
        &who,
        raw.as_deref(),
        "/v1/keys",
        "/dashboard/keys",
        "25",
        &["kind", "status", "name"],
    )
    .await
    {
        Ok(x) => x,
        Err(page) => return page,
    };
    let keys = v
        .data
        .into_iter()
        .map(|k: KeyView| KeyRow {
            last_used: k.last_used_at.unwrap_or_else(|| "never".into()),
            scopes: joined(&k.scopes),
            id: k.id,
            name: k.name,
            kind: k.kind,
            status: k.status,
            start: k.start,
        })
        .collect();
    // What the account's plan allows, and why its keys may be refused (a user's own view).
    // A key's sign-in (an admin) has no plan line: no call for it.
    let account = match who.session.session_key_id {
        Some(_) => api::<keygate_api::AccountView>(&state, &who, Method::GET, "/v1/account", None)
            .await
            .ok(),
        None => None,
    };
    let plan = account.as_ref().map(plan_line);
    let notice = account.as_ref().and_then(account_notice);
    render(&KeysPage {
        csrf: who.csrf,
        plan,
        notice,
        keys,
        kinds: options(&["sk", "ut", "pk"], &f["kind"]),
        statuses: options(&["active", "grace", "revoked", "expired"], &f["status"]),
        filter_name: f["name"].clone(),
        next,
    })
}

/// One line on the account's plan: its name, trial end, pool, features and key ceilings.
fn plan_line(a: &keygate_api::AccountView) -> String {
    let p = &a.plan;
    let mut parts = vec![format!("Plan: {}", p.name)];
    if let Some(t) = &a.account.trial_ends_at {
        parts.push(format!(
            "a trial until {t}, then {}",
            p.then.as_deref().unwrap_or("free")
        ));
    }
    parts.push(match a.account.credits {
        Some(c) => format!("{c} credits left"),
        None => "unlimited credits".into(),
    });
    parts.push(if p.features.is_empty() {
        "includes: the dashboard only".into()
    } else {
        format!("includes: {}", p.features.join(", "))
    });
    if let Some(r) = &p.rate_limit {
        parts.push(format!(
            "{} calls per {} s per key",
            r.limit, r.window_seconds
        ));
    }
    if let Some(n) = p.max_keys {
        parts.push(format!("up to {n} keys"));
    }
    parts.join(" · ")
}

/// Why the account's keys are refused on the API, and what would change that.
fn account_notice(a: &keygate_api::AccountView) -> Option<String> {
    if !a.account.verified {
        return Some(
            "Your email address is not verified yet: open the link we emailed you. Until then your keys answer ACCOUNT_UNVERIFIED on the API, and you cannot make keys."
                .into(),
        );
    }
    if !a.plan.features.iter().any(|f| f == "api") {
        let with: Vec<&str> = a.plans_with_api.iter().map(String::as_str).collect();
        return Some(format!(
            "Your plan ({}) does not include API access: your keys answer PLAN_FEATURE on the API. Plans with API access: {}. Ask your administrator to change your plan.",
            a.plan.name,
            if with.is_empty() { "none on this deployment".into() } else { with.join(", ") }
        ));
    }
    None
}

#[derive(Template)]
#[template(path = "dashboard/created.html")]
struct CreatedPage {
    csrf: String,
    name: String,
    id: String,
    key: String,
}

fn words(s: Option<&String>) -> Option<Vec<String>> {
    let v: Vec<String> = s?.split_whitespace().map(str::to_owned).collect();
    (!v.is_empty()).then_some(v)
}

fn number(s: Option<&String>) -> Result<Option<u64>, String> {
    match s.map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(n) => n
            .parse()
            .map(Some)
            .map_err(|_| format!("{n:?} is not a whole number")),
    }
}

/// A rate limit of `n` requests a minute (the form's unit).
fn per_minute(n: u64) -> RateLimitBody {
    RateLimitBody {
        limit: u32::try_from(n).unwrap_or(u32::MAX),
        window_seconds: 60,
    }
}

fn created(who: Signed, v: IssuedKey) -> Response {
    let mut r = render(&CreatedPage {
        csrf: who.csrf,
        name: v.record.name,
        id: v.record.id,
        key: v.key,
    });
    // The plaintext is in this page only: never cached, never stored.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /dashboard/keys`: a preset (one click) or the custom form.
pub async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let f = form(&body);
    if !csrf_ok(&who, &f) {
        return error_page(
            &who,
            StatusCode::FORBIDDEN,
            "The form expired; try again.".into(),
            "/dashboard/keys",
        );
    }
    let given = |name: &str| f.get(name).filter(|v| !v.is_empty()).cloned();
    let mut b = CreateKey {
        kind: f.get("kind").cloned().unwrap_or_else(|| "pk".into()),
        name: f.get("name").cloned().unwrap_or_default(),
        preset: given("preset"),
        user_id: given("user_id"),
        scopes: words(f.get("scopes")),
        allowed_origins: words(f.get("allowed_origins")),
        allowed_ips: words(f.get("allowed_ips")),
        ..CreateKey::default()
    };
    let parsed = (|| -> Result<(), String> {
        b.rate_limit = number(f.get("rate_per_minute"))?.map(per_minute);
        b.budget = number(f.get("budget"))?;
        b.ttl_seconds = number(f.get("ttl_days"))?.map(|d| d.saturating_mul(86_400));
        Ok(())
    })();
    if let Err(e) = parsed {
        return error_page(&who, StatusCode::UNPROCESSABLE_ENTITY, e, "/dashboard/keys");
    }
    match api(&state, &who, Method::POST, "/v1/keys", Some(&b)).await {
        Ok(issued) => created(who, issued),
        Err(Refusal(st, why)) => error_page(&who, st, why, "/dashboard/keys"),
    }
}

struct BudgetBar {
    limit: u64,
    spent: u64,
    remaining: u64,
}

struct KeyDetail {
    id: String,
    name: String,
    kind: String,
    status: String,
    scopes: String,
    origins: String,
    ips: String,
    rate_per_minute: String,
    /// A rate limit whose window is not a minute, as text (the form cannot show it).
    rate_other: String,
    budget: String,
    expires_at: String,
}

struct EventRow {
    at: String,
    action: String,
    actor: String,
    key_id: String,
    code: String,
    request: String,
    origin: String,
}

fn event_rows(events: Vec<AuditView>) -> Vec<EventRow> {
    events
        .into_iter()
        .map(|e| EventRow {
            request: format!("{} {}", or_empty(&e.method), or_empty(&e.path))
                .trim()
                .to_owned(),
            origin: [or_empty(&e.origin), or_empty(&e.ip)]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            at: e.at,
            action: e.action,
            actor: e.actor,
            key_id: or_empty(&e.key_id),
            code: or_empty(&e.code),
        })
        .collect()
}

#[derive(Template)]
#[template(path = "dashboard/key.html")]
struct KeyPage {
    csrf: String,
    k: KeyDetail,
    settings: Vec<(String, String)>,
    budget: Option<BudgetBar>,
    chart: Chart,
    events: Vec<EventRow>,
}

/// `GET /dashboard/keys/{id}`
pub async fn key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let k: KeyView = match api(&state, &who, Method::GET, &format!("/v1/keys/{id}"), None).await {
        Ok(k) => k,
        Err(Refusal(st, why)) => return error_page(&who, st, why, "/dashboard/keys"),
    };
    let since = keygate_engine::clock::rfc3339(now_ms() - 24 * 3_600_000);
    // The chart and the event list are extras: a refusal leaves them empty.
    let usage: Option<UsageView> = api(
        &state,
        &who,
        Method::GET,
        &format!(
            "/v1/keys/{id}/usage?{}",
            qs(&[("granularity", "hour"), ("since", &since)])
        ),
        None,
    )
    .await
    .ok();
    let events: Option<ListView<AuditView>> = api(
        &state,
        &who,
        Method::GET,
        &format!("/v1/audit?{}", qs(&[("key_id", &id), ("limit", "20")])),
        None,
    )
    .await
    .ok();
    let rate = k.rate_limit;
    let settings = vec![
        ("Id".to_owned(), k.id.clone()),
        ("Key".to_owned(), format!("{}…", k.start)),
        ("Tenant".to_owned(), k.tenant_id.clone()),
        ("User".to_owned(), or_empty(&k.user_id)),
        ("Scopes".to_owned(), joined(&k.scopes)),
        ("Allowed origins".to_owned(), joined(&k.allowed_origins)),
        ("Allowed IPs".to_owned(), joined(&k.allowed_ips)),
        (
            "Rate limit".to_owned(),
            rate.map_or_else(
                || "none".into(),
                |r| format!("{} per {} s", r.limit, r.window_seconds),
            ),
        ),
        ("Expires".to_owned(), or_empty(&k.expires_at)),
        ("Created".to_owned(), k.created_at.clone()),
        ("Last used".to_owned(), or_empty(&k.last_used_at)),
        ("Rotated from".to_owned(), or_empty(&k.rotated_from)),
        ("Rotated to".to_owned(), or_empty(&k.rotated_to)),
    ];
    let budget = k.budget.as_ref().map(|b| BudgetBar {
        limit: b.limit,
        spent: b.spent,
        remaining: b.remaining,
    });
    let (per_minute, rate_other) = match rate {
        Some(r) if r.window_seconds == 60 => (r.limit.to_string(), String::new()),
        Some(r) => (
            String::new(),
            format!("{} per {} s", r.limit, r.window_seconds),
        ),
        None => (String::new(), String::new()),
    };
    let detail = KeyDetail {
        scopes: joined(&k.scopes),
        origins: joined(&k.allowed_origins),
        ips: joined(&k.allowed_ips),
        rate_per_minute: per_minute,
        rate_other,
        budget: k.budget.map(|b| b.limit.to_string()).unwrap_or_default(),
        expires_at: or_empty(&k.expires_at),
        id: k.id,
        name: k.name,
        kind: k.kind,
        status: k.status,
    };
    render(&KeyPage {
        csrf: who.csrf,
        k: detail,
        settings,
        budget,
        chart: usage_chart(usage.map(|u| u.data).unwrap_or_default(), now_ms()),
        events: event_rows(events.map(|e| e.data).unwrap_or_default()),
    })
}

/// One hour's bar of the usage chart (drawn by `templates/dashboard/key.html`).
struct Bar {
    x: u64,
    label: String,
    ok: u64,
    refused: u64,
    /// Top and height of the allowed part, then of the refused part stacked on it.
    y_ok: u64,
    h_ok: u64,
    y_refused: u64,
    h_refused: u64,
}

/// An SVG bar chart of the last 24 hours of usage: allowed calls in green, refusals in red,
/// stacked per hour, each bar titled with its numbers.
struct Chart {
    bars: Vec<Bar>,
    total_ok: u64,
    total_refused: u64,
    /// The busiest hour's calls (at least 1).
    max: u64,
    width: u64,
    height: u64,
    bar_width: u64,
}

fn usage_chart(usage: Vec<UsageBucket>, now: i64) -> Chart {
    const HOUR: i64 = 3_600_000;
    let end = now - now.rem_euclid(HOUR) + HOUR;
    let start = end - 24 * HOUR;
    let mut ok = [0u64; 24];
    let mut refused = [0u64; 24];
    for b in usage {
        let Some(at) = keygate_engine::clock::parse_rfc3339(&b.at) else {
            continue;
        };
        let Ok(slot) = usize::try_from((at - start) / HOUR) else {
            continue;
        };
        if slot >= 24 {
            continue;
        }
        let n = b.requests;
        if b.code == "VALID" {
            ok[slot] += n;
        } else {
            refused[slot] += n;
        }
    }
    let max = (0..24)
        .map(|i| ok[i] + refused[i])
        .max()
        .unwrap_or(0)
        .max(1);
    let (width, height, bar) = (720u64, 160u64, 30u64);
    let bars = (0..24)
        .map(|i| {
            let h_ok = ok[i] * (height - 20) / max;
            let h_refused = refused[i] * (height - 20) / max;
            Bar {
                x: i as u64 * bar,
                label: keygate_engine::clock::rfc3339(start + i as i64 * HOUR),
                ok: ok[i],
                refused: refused[i],
                y_ok: height - 20 - h_ok,
                h_ok,
                y_refused: height - 20 - h_ok - h_refused,
                h_refused,
            }
        })
        .collect();
    Chart {
        bars,
        total_ok: ok.iter().sum(),
        total_refused: refused.iter().sum(),
        max,
        width,
        height,
        bar_width: bar - 4,
    }
}

/// `POST /dashboard/keys/{id}/revoke|rotate|edit`
pub async fn key_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let back = format!("/dashboard/keys/{id}");
    let f = form(&body);
    if !csrf_ok(&who, &f) {
        return error_page(
            &who,
            StatusCode::FORBIDDEN,
            "The form expired; try again.".into(),
            &back,
        );
    }
    match action.as_str() {
        "revoke" => {
            if f.get("confirm").map(String::as_str) != Some("yes") {
                return error_page(
                    &who,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Tick the box to confirm the revocation.".into(),
                    &back,
                );
            }
            let revoked: Result<KeyView, _> = api(
                &state,
                &who,
                Method::POST,
                &format!("/v1/keys/{id}/revoke"),
                None,
            )
            .await;
            match revoked {
                Ok(_) => Redirect::to(&back).into_response(),
                Err(Refusal(st, why)) => error_page(&who, st, why, &back),
            }
        }
        "rotate" => {
            let grace = match number(f.get("grace_seconds")) {
                Ok(g) => g,
                Err(e) => return error_page(&who, StatusCode::UNPROCESSABLE_ENTITY, e, &back),
            };
            let body = RotateKey {
                grace_seconds: grace,
            };
            match api(
                &state,
                &who,
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                Some(&body),
            )
            .await
            {
                Ok(issued) => created(who, issued),
                Err(Refusal(st, why)) => error_page(&who, st, why, &back),
            }
        }
        "edit" => {
            // Only what the user changed is sent (the form carries the values it showed), so
            // a limit the form cannot show exactly (a rate per hour) is never cleared by a save.
            let changed = |field: &str| {
                let now = f.get(field).map_or("", |v| v.trim());
                let was = f.get(&format!("orig_{field}")).map_or("", |v| v.trim());
                (now != was).then_some(now)
            };
            let list = |field: &str| {
                changed(field).map(|v| v.split_whitespace().map(str::to_owned).collect())
            };
            let mut b = UpdateKey {
                name: changed("name").filter(|n| !n.is_empty()).map(str::to_owned),
                scopes: list("scopes"),
                allowed_origins: list("allowed_origins"),
                allowed_ips: list("allowed_ips"),
                ..UpdateKey::default()
            };
            // A cleared field is sent as `null` (`Some(None)`): the API clears it.
            let parsed = (|| -> Result<(), String> {
                if let Some(r) = changed("rate_per_minute") {
                    b.rate_limit = Some(number(Some(&r.to_owned()))?.map(per_minute));
                }
                if let Some(n) = changed("budget") {
                    b.budget = Some(number(Some(&n.to_owned()))?);
                }
                if let Some(e) = changed("expires_at") {
                    b.expires_at = Some((!e.is_empty()).then(|| e.to_owned()));
                }
                Ok(())
            })();
            if let Err(e) = parsed {
                return error_page(&who, StatusCode::UNPROCESSABLE_ENTITY, e, &back);
            }
            let updated: Result<KeyView, _> = api(
                &state,
                &who,
                Method::PATCH,
                &format!("/v1/keys/{id}"),
                Some(&b),
            )
            .await;
            match updated {
                Ok(_) => Redirect::to(&back).into_response(),
                Err(Refusal(st, why)) => error_page(&who, st, why, &back),
            }
        }
        _ => error_page(&who, StatusCode::NOT_FOUND, "No such action.".into(), &back),
    }
}

// ---------------------------------------------------------------------------------------
// Audit log, alerts, webhooks, OAuth clients, credits.

#[derive(Template)]
#[template(path = "dashboard/audit.html")]
struct AuditPage {
    csrf: String,
    events: Vec<EventRow>,
    f_action: String,
    f_key: String,
    f_code: String,
    next: Option<String>,
}

/// `GET /dashboard/audit`
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let (f, v, next) = match filtered(
        &state,
        &who,
        raw.as_deref(),
        "/v1/audit",
        "/dashboard/audit",
        "50",
        &["action", "key_id", "code"],
    )
    .await
    {
        Ok(x) => x,
        Err(page) => return page,
    };
    render(&AuditPage {
        csrf: who.csrf,
        events: event_rows(v.data),
        f_action: f["action"].clone(),
        f_key: f["key_id"].clone(),
        f_code: f["code"].clone(),
        next,
    })
}

/// A table cell, linked when `href` is set.
struct Cell {
    text: String,
    href: Option<String>,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Self { text, href: None }
    }
}

#[derive(Template)]
#[template(path = "dashboard/list.html")]
struct ListPage {
    csrf: String,
    title: String,
    notice: Option<String>,
    form: Form,
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

/// The form a list page shows above its table (in `templates/dashboard/list.html`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    None,
    /// Add a webhook endpoint; send a test event.
    Webhooks,
    /// Register an OAuth client.
    OAuthClients,
}

/// What a list page shows: a title, the API path it lists, the columns, an optional form
/// above the table and an optional notice.
struct Listing<'a> {
    title: &'a str,
    path: &'a str,
    headers: Vec<&'static str>,
    form: Form,
    notice: Option<String>,
}

async fn list_page<T: DeserializeOwned>(
    state: &AppState,
    who: Signed,
    l: Listing<'_>,
    row: impl Fn(T) -> Vec<Cell>,
) -> Response {
    let v: ListView<T> = match api(state, &who, Method::GET, l.path, None).await {
        Ok(v) => v,
        Err(Refusal(st, why)) => return error_page(&who, st, why, "/dashboard/keys"),
    };
    let rows = v.data.into_iter().map(row).collect();
    render(&ListPage {
        csrf: who.csrf,
        title: l.title.into(),
        notice: l.notice,
        form: l.form,
        headers: l.headers,
        rows,
    })
}

/// `GET /dashboard/alerts`
pub async fn alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    list_page(
        &state,
        who,
        Listing {
            title: "Alerts",
            path: "/v1/alerts?limit=100",
            headers: vec!["At", "Kind", "Key", "Message"],
            form: Form::None,
            notice: None,
        },
        |a: AlertView| {
            vec![
                a.at.into(),
                a.kind.into(),
                Cell {
                    href: a.key_id.as_ref().map(|k| format!("/dashboard/keys/{k}")),
                    text: a.key_id.unwrap_or_default(),
                },
                a.message.into(),
            ]
        },
    )
    .await
}

async fn webhooks_page(state: &AppState, who: Signed, notice: Option<String>) -> Response {
    list_page(
        state,
        who,
        Listing {
            title: "Webhooks",
            path: "/v1/webhooks?limit=100",
            headers: vec!["Id", "URL", "Events", "Enabled", "Deliveries"],
            form: Form::Webhooks,
            notice,
        },
        |w: WebhookView| {
            let log = Cell {
                text: "delivery log".into(),
                href: Some(format!("/dashboard/webhooks/{}", w.id)),
            };
            vec![
                w.id.into(),
                w.url.into(),
                joined(&w.events).into(),
                w.enabled.to_string().into(),
                log,
            ]
        },
    )
    .await
}

/// `GET /dashboard/webhooks`
pub async fn webhooks(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    webhooks_page(&state, who, None).await
}

/// `POST /dashboard/webhooks`: add an endpoint.
pub async fn webhooks_add(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    webhook_submit(state, headers, peer, "add", body).await
}

/// `POST /dashboard/webhooks/test`: send a test event.
pub async fn webhooks_test(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    webhook_submit(state, headers, peer, "test", body).await
}

async fn webhook_submit(
    state: AppState,
    headers: HeaderMap,
    peer: SocketAddr,
    what: &str,
    body: Bytes,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let f = form(&body);
    if !csrf_ok(&who, &f) {
        return error_page(
            &who,
            StatusCode::FORBIDDEN,
            "The form expired; try again.".into(),
            "/dashboard/webhooks",
        );
    }
    let notice = if what == "test" {
        let id: String = f
            .get("id")
            .map(|s| {
                s.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .unwrap_or_default();
        api(
            &state,
            &who,
            Method::POST,
            &format!("/v1/webhooks/{id}/test"),
            None,
        )
        .await
        .map(|t: TestEvent| format!("Test event queued ({}).", t.event_id))
    } else {
        let b = CreateWebhook {
            url: f.get("url").cloned().unwrap_or_default(),
            events: Some(words(f.get("events")).unwrap_or_else(|| vec!["*".into()])),
            tenant_id: None,
        };
        api(&state, &who, Method::POST, "/v1/webhooks", Some(&b))
            .await
            .map(|w: WebhookView| {
                format!(
                    "Endpoint {} added. Its signing secret, shown once: {}",
                    w.id,
                    w.secret.unwrap_or_default()
                )
            })
    };
    match notice {
        Ok(notice) => webhooks_page(&state, who, Some(notice)).await,
        Err(Refusal(st, why)) => error_page(&who, st, why, "/dashboard/webhooks"),
    }
}

/// `GET /dashboard/webhooks/{id}`: the delivery log.
pub async fn deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    list_page(
        &state,
        who,
        Listing {
            title: &format!("Deliveries of {id}"),
            path: &format!("/v1/webhooks/{id}/deliveries?limit=100"),
            headers: vec![
                "Created",
                "Event",
                "Status",
                "Attempts",
                "Last HTTP status",
                "Last error",
            ],
            form: Form::None,
            notice: None,
        },
        |d: DeliveryView| {
            vec![
                d.created_at.into(),
                d.event_type.into(),
                d.status.into(),
                d.attempts.to_string().into(),
                d.last_status
                    .map(|s| s.to_string())
                    .unwrap_or_default()
                    .into(),
                d.last_error.unwrap_or_default().into(),
            ]
        },
    )
    .await
}

async fn oauth_page(state: &AppState, who: Signed, notice: Option<String>) -> Response {
    list_page(
        state,
        who,
        Listing {
            title: "OAuth clients",
            path: "/v1/oauth/clients?limit=100",
            headers: vec!["Client id", "Name", "Type", "Redirect URIs", "Scopes"],
            form: Form::OAuthClients,
            notice,
        },
        |c: ClientView| {
            vec![
                c.client_id.into(),
                c.name.into(),
                c.client_type.into(),
                joined(&c.redirect_uris).into(),
                joined(&c.scopes).into(),
            ]
        },
    )
    .await
}

/// `GET /dashboard/oauth`
pub async fn oauth(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    oauth_page(&state, who, None).await
}

/// `POST /dashboard/oauth`
pub async fn oauth_create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    let f = form(&body);
    if !csrf_ok(&who, &f) {
        return error_page(
            &who,
            StatusCode::FORBIDDEN,
            "The form expired; try again.".into(),
            "/dashboard/oauth",
        );
    }
    let b = CreateClient {
        name: f.get("name").cloned().unwrap_or_default(),
        client_type: f.get("type").cloned().unwrap_or_default(),
        redirect_uris: words(f.get("redirect_uris")).unwrap_or_default(),
        scopes: words(f.get("scopes")).unwrap_or_default(),
        tenant_id: None,
    };
    let c: ClientView = match api(&state, &who, Method::POST, "/v1/oauth/clients", Some(&b)).await {
        Ok(c) => c,
        Err(Refusal(st, why)) => return error_page(&who, st, why, "/dashboard/oauth"),
    };
    let notice = match &c.client_secret {
        Some(s) => format!(
            "Client {} registered. Its secret, shown once: {s}",
            c.client_id
        ),
        None => format!("Client {} registered.", c.client_id),
    };
    oauth_page(&state, who, Some(notice)).await
}

/// `GET /dashboard/tenant`: credits of the tenants the key sees.
pub async fn tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Some(who) = signed(&state, &headers, Some(peer)) else {
        return to_login();
    };
    list_page(
        &state,
        who,
        Listing {
            title: "Credits",
            path: "/v1/tenants?limit=100",
            headers: vec!["Tenant", "Name", "Plan", "Credits"],
            form: Form::None,
            notice: None,
        },
        |t: TenantView| {
            vec![
                t.id.into(),
                t.name.into(),
                t.plan.into(),
                t.credits
                    .map_or_else(|| "unlimited".to_owned(), |c| c.to_string())
                    .into(),
            ]
        },
    )
    .await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a hostile user could put in any field they control.
    const EVIL: &str = "\"><script>alert(1)</script>'";

    /// The page shows the text, escaped: no tag of it survives, and it cannot leave an
    /// attribute.
    pub(crate) fn assert_escaped(html: &str) {
        // (A page's own `<script src=…>` is fine; the field's script must not be there.)
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains(EVIL), "{html}");
        assert!(
            html.contains("&quot;&gt;&lt;script&gt;"),
            "the text is not shown, escaped: {html}"
        );
    }

    fn evil() -> String {
        EVIL.to_owned()
    }

    fn event() -> EventRow {
        EventRow {
            at: evil(),
            action: evil(),
            actor: evil(),
            key_id: evil(),
            code: evil(),
            request: evil(),
            origin: evil(),
        }
    }

    #[test]
    fn every_page_escapes_every_field() {
        let pages: Vec<Result<String, askama::Error>> = vec![
            ErrorPage {
                csrf: EVIL,
                message: evil(),
                back: evil(),
            }
            .render(),
            LoginPage {
                csrf: evil(),
                error: Some(evil()),
                signup: true,
            }
            .render(),
            SignupPage {
                csrf: evil(),
                error: Some(evil()),
                email: evil(),
                name: evil(),
                organisation: evil(),
                done: None,
                signed_in: false,
            }
            .render(),
            PasswordPage {
                csrf: evil(),
                error: Some(evil()),
                token: Some(evil()),
                notice: None,
            }
            .render(),
            PasswordPage {
                notice: Some(evil()),
                ..PasswordPage::default()
            }
            .render(),
            InvitePage {
                csrf: evil(),
                error: Some(evil()),
                token: evil(),
            }
            .render(),
            SignupPage {
                done: Some(SignedUpPage {
                    account: evil(),
                    tenant: evil(),
                    key: evil(),
                    curl: evil(),
                    plan: evil(),
                    trial_ends_at: Some(evil()),
                    credits: evil(),
                }),
                ..SignupPage::default()
            }
            .render(),
            KeysPage {
                csrf: evil(),
                plan: Some(evil()),
                notice: Some(evil()),
                keys: vec![KeyRow {
                    id: evil(),
                    name: evil(),
                    kind: evil(),
                    status: evil(),
                    start: evil(),
                    scopes: evil(),
                    last_used: evil(),
                }],
                kinds: vec![],
                statuses: vec![],
                filter_name: evil(),
                next: Some(evil()),
            }
            .render(),
            CreatedPage {
                csrf: evil(),
                name: evil(),
                id: evil(),
                key: evil(),
            }
            .render(),
            KeyPage {
                csrf: evil(),
                k: KeyDetail {
                    id: evil(),
                    name: evil(),
                    kind: evil(),
                    status: evil(),
                    scopes: evil(),
                    origins: evil(),
                    ips: evil(),
                    rate_per_minute: evil(),
                    rate_other: evil(),
                    budget: evil(),
                    expires_at: evil(),
                },
                settings: vec![(evil(), evil())],
                budget: None,
                chart: usage_chart(Vec::new(), 0),
                events: vec![event()],
            }
            .render(),
            AuditPage {
                csrf: evil(),
                events: vec![event()],
                f_action: evil(),
                f_key: evil(),
                f_code: evil(),
                next: Some(evil()),
            }
            .render(),
            ListPage {
                csrf: evil(),
                title: evil(),
                notice: Some(evil()),
                form: Form::Webhooks,
                headers: vec!["h"],
                rows: vec![vec![Cell {
                    text: evil(),
                    href: Some(evil()),
                }]],
            }
            .render(),
        ];
        for page in pages {
            assert_escaped(&page.expect("renders"));
        }
    }
}

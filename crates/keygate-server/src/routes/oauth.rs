//! The OAuth 2.0 authorization server's endpoints: `/oauth/authorize` (login and consent
//! pages), `/oauth/token`, `/oauth/revoke` (RFC 7009), `/oauth/introspect` (RFC 7662), the
//! RFC 8414 metadata and the JWKS.
//!
//! Errors follow the RFCs, not keygate's JSON error shape: `{"error", "error_description"}`
//! from the token, revocation and introspection endpoints, and from the authorization
//! endpoint a redirect back to the client with `error` — except when the client or its
//! redirect URI cannot be trusted, which gets an error page and never a redirect.

use super::{detached, Ctx};
use crate::headers::cookie;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keygate_core::{FamilyId, KeyId, RouteClass, TenantId, UserId};
use keygate_engine::clock::now_ms;
use keygate_engine::oauth::CachedClient;
use keygate_oauth::{ct_eq, grant, redirect, scope, token_hash, ErrorCode};
use keygate_store::{
    AuthCode, CodeUse, OAuthClient, OAuthGrant, RefreshToken, RefreshUse, StoreError, User,
};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// The scope an `sk` key needs to call the introspection endpoint.
pub const INTROSPECT: &str = "oauth:introspect";
const SESSION_COOKIE: &str = "kg_oauth_session";
const CSRF_COOKIE: &str = "kg_oauth_csrf";
/// How long the login and consent forms stay valid, ms.
const FORM_TTL_MS: i64 = 10 * 60_000;

// ---------------------------------------------------------------------------------------
// Errors of the token, revocation and introspection endpoints (RFC 6749 §5.2).

/// An error answer of the token, revocation or introspection endpoint.
#[derive(Debug)]
pub struct OAuthError {
    code: ErrorCode,
    description: Cow<'static, str>,
    /// The client tried HTTP Basic: a 401 names the scheme (RFC 6749 §5.2).
    basic: bool,
}

impl OAuthError {
    fn new(code: ErrorCode, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            description: description.into(),
            basic: false,
        }
    }

    fn request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::InvalidRequest, description)
    }

    fn grant(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::InvalidGrant, description)
    }

    fn client(basic: bool) -> Self {
        Self {
            code: ErrorCode::InvalidClient,
            description: "client authentication failed".into(),
            basic,
        }
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        tracing::error!("oauth store error: {e}");
        Self::new(
            ErrorCode::TemporarilyUnavailable,
            "the authorization server cannot answer now",
        )
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = match self.code {
            ErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            ErrorCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        let body = serde_json::json!({
            "error": self.code.as_str(),
            "error_description": self.description,
        });
        let mut res = (status, no_store(), axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let scheme = if self.basic {
                "Basic realm=\"keygate\""
            } else {
                "Bearer realm=\"keygate\""
            };
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        }
        res
    }
}

fn no_store() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
    ]
}

// ---------------------------------------------------------------------------------------
// Parameters.

/// Form or query parameters; a parameter sent twice is an error (RFC 6749 §3.1, §3.2).
#[derive(Debug, Default)]
struct Params(HashMap<String, String>);

impl Params {
    fn parse(raw: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(raw).map_err(|_| "the parameters are not URL-encoded")?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if map.contains_key(&k) {
                return Err(format!("parameter {k} was sent more than once"));
            }
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    /// A parameter; an empty value counts as absent (RFC 6749 §3.1).
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn require(&self, k: &'static str) -> Result<&str, OAuthError> {
        self.get(k)
            .ok_or_else(|| OAuthError::request(format!("{k} is required")))
    }
}

fn form_body(headers: &HeaderMap, body: &Bytes) -> Result<Params, OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.split(';').next().is_some_and(|m| {
        m.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    }) {
        return Err(OAuthError::request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let text =
        std::str::from_utf8(body).map_err(|_| OAuthError::request("the body is not UTF-8"))?;
    Params::parse(text).map_err(OAuthError::request)
}

// ---------------------------------------------------------------------------------------
// Client authentication (RFC 6749 §2.3.1): HTTP Basic, or client_id (+ client_secret) in the
// body. Public clients send their id only.

async fn authenticate_client(
    state: &AppState,
    headers: &HeaderMap,
    p: &Params,
) -> Result<Arc<CachedClient>, OAuthError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| OAuthError::client(true))?;
            match v.split_once(' ') {
                Some((s, cred)) if s.eq_ignore_ascii_case("basic") => {
                    Some(decode_basic(cred.trim()).ok_or_else(|| OAuthError::client(true))?)
                }
                _ => return Err(OAuthError::client(false)),
            }
        }
    };
    let (id, secret, used_basic) = match (basic, p.get("client_id"), p.get("client_secret")) {
        (Some(_), _, Some(_)) => {
            return Err(OAuthError::request(
                "use one client authentication method, not two",
            ))
        }
        (Some((bid, _)), Some(pid), _) if bid != pid => {
            return Err(OAuthError::request(
                "client_id differs from the authenticated client",
            ))
        }
        (Some((id, secret)), _, _) => (id, Some(secret), true),
        (None, Some(id), secret) => (id.to_owned(), secret.map(str::to_owned), false),
        (None, None, _) => return Err(OAuthError::client(false)),
    };
    let Some(cached) = state.oauth_client(&id).await? else {
        return Err(OAuthError::client(used_basic));
    };
    let ok = match (&cached.client.secret_hash, secret) {
        (Some(h), Some(s)) => ct_eq(&token_hash(&s), h),
        (None, None) => true,
        _ => false,
    };
    if !ok {
        return Err(OAuthError::client(used_basic));
    }
    Ok(cached)
}

fn decode_basic(cred: &str) -> Option<(String, String)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cred)
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    // Both halves are form-urlencoded (RFC 6749 §2.3.1).
    let dec = |s: &str| -> Option<String> {
        let v: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={s}")).ok()?;
        v.into_iter().next().map(|(_, v)| v)
    };
    Some((dec(id)?, dec(secret)?))
}

// ---------------------------------------------------------------------------------------
// The authorization endpoint.

/// A validated authorization request, sealed into the login and consent forms.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    scope: Vec<String>,
    state: Option<String>,
    challenge: String,
    csrf: String,
}

/// A login on the authorization pages, sealed into a cookie.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    user_id: UserId,
    tenant_id: TenantId,
    /// When the user signed in, Unix ms: a session from before the user's `sessions_from`
    /// (a password reset) is over.
    #[serde(default)]
    at_ms: i64,
}

/// What the authorization endpoint answers before it can trust the redirect URI.
fn error_page(status: StatusCode, message: &str) -> Response {
    page(status, &ErrorPage { message }, None)
}

/// Redirects to the client with `params` (and `state` and `iss`, RFC 9207).
fn back_to_client(state: &AppState, req: &AuthRequest, params: &[(&str, &str)]) -> Response {
    let mut pairs: Vec<(&str, &str)> = params.to_vec();
    if let Some(s) = &req.state {
        pairs.push(("state", s));
    }
    pairs.push(("iss", &state.oauth.issuer));
    let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    let sep = if req.redirect_uri.contains('?') {
        '&'
    } else {
        '?'
    };
    let location = format!("{}{sep}{query}", req.redirect_uri);
    match HeaderValue::from_str(&location) {
        Ok(v) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, v),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        Err(_) => error_page(StatusCode::BAD_REQUEST, "the redirect URI is not valid"),
    }
}

fn redirect_error(state: &AppState, req: &AuthRequest, code: ErrorCode, why: &str) -> Response {
    back_to_client(
        state,
        req,
        &[("error", code.as_str()), ("error_description", why)],
    )
}

/// Checks an authorization request: `Err` is the response (an error page or a redirect).
#[allow(clippy::result_large_err)] // the error is the response, returned at once
async fn check_request(
    state: &AppState,
    p: &Params,
) -> Result<(OAuthClient, AuthRequest), Response> {
    let (Some(client_id), Some(redirect_uri)) = (p.get("client_id"), p.get("redirect_uri")) else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "client_id and redirect_uri are required.",
        ));
    };
    let client = match state.store.get_client(client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(error_page(StatusCode::BAD_REQUEST, "Unknown client.")),
        Err(e) => {
            tracing::error!("oauth store error: {e}");
            return Err(error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The authorization server cannot answer now. Try again later.",
            ));
        }
    };
    let checked = grant::check_authorize(
        grant::Registered {
            redirect_uris: &client.redirect_uris,
            scopes: &client.scopes,
        },
        grant::AuthorizeParams {
            redirect_uri,
            response_type: p.get("response_type"),
            // Sent back as given, even empty.
            state: p.0.get("state").map(String::as_str),
            code_challenge: p.get("code_challenge"),
            code_challenge_method: p.get("code_challenge_method"),
            scope: p.get("scope"),
        },
    );
    let csrf = keygate_engine::ids::random_base62(32);
    let req = match checked {
        Ok(a) => AuthRequest {
            client_id: client.id.clone(),
            redirect_uri: a.redirect_uri,
            scope: a.scope,
            state: a.state,
            challenge: a.challenge,
            csrf,
        },
        Err(grant::Rejected::Page(why)) => return Err(error_page(StatusCode::BAD_REQUEST, why)),
        Err(grant::Rejected::Redirect {
            error,
            why,
            redirect_uri,
            state: st,
        }) => {
            let req = AuthRequest {
                client_id: client.id.clone(),
                redirect_uri,
                scope: Vec::new(),
                state: st,
                challenge: String::new(),
                csrf,
            };
            return Err(redirect_error(state, &req, error, why));
        }
    };
    Ok((client, req))
}

/// `GET /oauth/authorize`
#[utoipa::path(
    operation_id = "oauth_authorize",
    get,
    path = "/oauth/authorize",
    tag = "oauth",
    summary = "Authorization endpoint (RFC 6749 §4.1.1, PKCE S256 required): sign-in and consent pages",
    params(crate::openapi::AuthorizeParams),
    responses((status = 200, description = "Sign-in or consent page", content_type = "text/html", body = String), (status = 303, description = "Back to the client with `code` or `error`, `state` and `iss`"), (status = 400, description = "Unknown client or redirect URI: an error page", content_type = "text/html", body = String))
)]
pub async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let p = match Params::parse(query.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(why) => return error_page(StatusCode::BAD_REQUEST, &why),
    };
    let (client, req) = match check_request(&state, &p).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    match session_user(&state, &headers, &client).await {
        Ok(Some(user)) => proceed(&state, &client, req, &user, None).await,
        Ok(None) => login_page(&state, &client, &req, StatusCode::OK, None),
        Err(res) => res,
    }
}

#[allow(clippy::result_large_err)] // the error is the response, returned at once
async fn session_user(
    state: &AppState,
    headers: &HeaderMap,
    client: &OAuthClient,
) -> Result<Option<User>, Response> {
    let Some(s) =
        cookie(headers, SESSION_COOKIE).and_then(|c| state.oauth.unseal::<Session>("session", c))
    else {
        return Ok(None);
    };
    if s.tenant_id != client.tenant_id {
        return Ok(None);
    }
    match state.store.get_user(&s.user_id).await {
        Ok(u) => Ok(u.filter(|u| {
            u.tenant_id == client.tenant_id
                && s.at_ms >= u.sessions_from_ms
                && u.removed_at_ms.is_none()
        })),
        Err(e) => {
            tracing::error!("oauth store error: {e}");
            Err(error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The authorization server cannot answer now. Try again later.",
            ))
        }
    }
}

/// The user is known: limit the scope to the user's plan, then ask for consent unless it was
/// given before for this client and scope set.
async fn proceed(
    state: &AppState,
    client: &OAuthClient,
    mut req: AuthRequest,
    user: &User,
    set_session: Option<HeaderValue>,
) -> Response {
    match grant::narrow_to_plan(&req.scope, state.plan(&user.plan).scopes.as_deref()) {
        Some(s) => req.scope = s,
        None => {
            return redirect_error(
                state,
                &req,
                ErrorCode::InvalidScope,
                "the user's plan allows none of the requested scopes",
            )
        }
    }
    let joined = scope::join(&req.scope);
    let mut res = match state.store.has_consent(&user.id, &client.id, &joined).await {
        Ok(true) => issue_code(state, client, &req, user).await,
        Ok(false) => consent_page(state, client, &req, user),
        Err(e) => {
            tracing::error!("oauth store error: {e}");
            redirect_error(
                state,
                &req,
                ErrorCode::TemporarilyUnavailable,
                "the authorization server cannot answer now",
            )
        }
    };
    if let Some(c) = set_session {
        res.headers_mut().append(header::SET_COOKIE, c);
    }
    res
}

async fn issue_code(
    state: &AppState,
    client: &OAuthClient,
    req: &AuthRequest,
    user: &User,
) -> Response {
    let code = keygate_engine::ids::random_base62(43);
    let now = now_ms();
    let ttl = i64::try_from(state.config.oauth.code_ttl_seconds).unwrap_or(i64::MAX / 2000);
    let row = AuthCode {
        hash: token_hash(&code),
        client_id: client.id.clone(),
        tenant_id: client.tenant_id.clone(),
        user_id: user.id.clone(),
        redirect_uri: req.redirect_uri.clone(),
        challenge: req.challenge.clone(),
        scope: scope::join(&req.scope),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(ttl.saturating_mul(1000)),
        used_at_ms: None,
        grant_id: None,
    };
    if let Err(e) = state.store.insert_code(&row).await {
        tracing::error!("oauth store error: {e}");
        return redirect_error(
            state,
            req,
            ErrorCode::TemporarilyUnavailable,
            "the authorization server cannot answer now",
        );
    }
    back_to_client(state, req, &[("code", &code)])
}

fn cookie_header(state: &AppState, name: &str, value: &str, max_age_s: i64) -> HeaderValue {
    crate::headers::set_cookie(&state.oauth.issuer, "/oauth", name, value, max_age_s)
}

/// The sealed request a form carries (it comes back with the form, tamper-evident).
fn sealed_request(state: &AppState, req: &AuthRequest) -> String {
    state.oauth.seal("request", req, now_ms() + FORM_TTL_MS)
}

fn login_page(
    state: &AppState,
    client: &OAuthClient,
    req: &AuthRequest,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let form = LoginPage {
        client: &client.name,
        error,
        request: &sealed_request(state, req),
        csrf: &req.csrf,
    };
    page(
        status,
        &form,
        Some(cookie_header(
            state,
            CSRF_COOKIE,
            &req.csrf,
            FORM_TTL_MS / 1000,
        )),
    )
}

fn consent_page(
    state: &AppState,
    client: &OAuthClient,
    req: &AuthRequest,
    user: &User,
) -> Response {
    let form = ConsentPage {
        email: &user.email,
        client: &client.name,
        scopes: &req.scope,
        request: &sealed_request(state, req),
        csrf: &req.csrf,
    };
    page(
        StatusCode::OK,
        &form,
        Some(cookie_header(
            state,
            CSRF_COOKIE,
            &req.csrf,
            FORM_TTL_MS / 1000,
        )),
    )
}

/// `POST /oauth/authorize`: the login and consent forms.
#[utoipa::path(
    operation_id = "oauth_authorize_submit",
    post,
    path = "/oauth/authorize",
    tag = "oauth",
    summary = "The sign-in and consent forms",
    request_body(content = crate::openapi::AuthorizeForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, content_type = "text/html", body = String), (status = 303, description = "Back to the client"), (status = 400, content_type = "text/html", body = String), (status = 401, description = "Wrong email or password", content_type = "text/html", body = String), (status = 403, description = "CSRF check failed", content_type = "text/html", body = String), (status = 429, description = "Too many failed sign-ins", content_type = "text/html", body = String))
)]
pub async fn authorize_submit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match form_body(&headers, &body) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.description),
    };
    // CSRF: the form's token must equal the cookie set with the form and the one sealed in the
    // request (double submit, bound to this authorization request).
    let expired = || {
        error_page(
            StatusCode::FORBIDDEN,
            "This form has expired or did not come from this site. Go back to the application and start again.",
        )
    };
    let Some(mut req) = p
        .get("request")
        .and_then(|r| state.oauth.unseal::<AuthRequest>("request", r))
    else {
        return expired();
    };
    let (Some(form_csrf), Some(cookie_csrf)) = (p.get("csrf"), cookie(&headers, CSRF_COOKIE))
    else {
        return expired();
    };
    if !(ct_eq(form_csrf, &req.csrf) && ct_eq(cookie_csrf, &req.csrf)) {
        return expired();
    }
    let client = match state.store.get_client(&req.client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return error_page(StatusCode::BAD_REQUEST, "Unknown client."),
        Err(e) => {
            tracing::error!("oauth store error: {e}");
            return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again later.");
        }
    };
    // The client may have changed since the page was made.
    if !client
        .redirect_uris
        .iter()
        .any(|r| redirect::matches(r, &req.redirect_uri))
    {
        return error_page(
            StatusCode::BAD_REQUEST,
            "The redirect URI is not registered for this client.",
        );
    }
    // A fresh token for the next form.
    req.csrf = keygate_engine::ids::random_base62(32);
    match p.get("action") {
        Some("login") => {
            let (Some(email), Some(password)) = (p.get("email"), p.get("password")) else {
                return login_page(
                    &state,
                    &client,
                    &req,
                    StatusCode::BAD_REQUEST,
                    Some("Enter your email and password."),
                );
            };
            let account = format!("{}/{}", client.tenant_id, email.trim().to_ascii_lowercase());
            // A client whose address cannot be told shares the proxy's throttle.
            let ip = state
                .proxies
                .client_ip(&headers, peer.ip())
                .unwrap_or(peer.ip());
            let attempt = match keygate_engine::login::begin(&state, &account, ip).await {
                Ok(a) => a,
                Err(r) => {
                    let mut page = login_page(
                        &state,
                        &client,
                        &req,
                        crate::headers::login_refusal_status(r),
                        Some(&keygate_engine::login::refusal_message(r)),
                    );
                    if let Some(after) = crate::headers::login_retry_after(r) {
                        page.headers_mut().insert(header::RETRY_AFTER, after);
                    }
                    return page;
                }
            };
            let user = match check_password(&state, &client, email, password).await {
                Ok(Some(u)) => u,
                Ok(None) => {
                    attempt.failed(&state).await;
                    return login_page(
                        &state,
                        &client,
                        &req,
                        StatusCode::UNAUTHORIZED,
                        Some("Wrong email or password."),
                    );
                }
                Err(res) => {
                    // Not the user's failure: the attempt does not count.
                    attempt.not_judged(&state).await;
                    return res;
                }
            };
            attempt.succeeded(&state).await;
            let ttl =
                i64::try_from(state.config.oauth.session_ttl_seconds).unwrap_or(i64::MAX / 2000);
            let session = Session {
                user_id: user.id.clone(),
                tenant_id: user.tenant_id.clone(),
                at_ms: now_ms(),
            };
            let sealed = state.oauth.seal(
                "session",
                &session,
                now_ms().saturating_add(ttl.saturating_mul(1000)),
            );
            let set = cookie_header(&state, SESSION_COOKIE, &sealed, ttl);
            proceed(&state, &client, req, &user, Some(set)).await
        }
        Some("consent") => {
            let user = match session_user(&state, &headers, &client).await {
                Ok(Some(u)) => u,
                Ok(None) => return login_page(&state, &client, &req, StatusCode::OK, None),
                Err(res) => return res,
            };
            match p.get("decision") {
                Some("allow") => {
                    if let Some(allowed) = &state.plan(&user.plan).scopes {
                        req.scope.retain(|s| allowed.contains(s));
                    }
                    if req.scope.is_empty() {
                        return redirect_error(
                            &state,
                            &req,
                            ErrorCode::InvalidScope,
                            "no scope left to grant",
                        );
                    }
                    if let Err(e) = state
                        .store
                        .insert_consent(&user.id, &client.id, &scope::join(&req.scope), now_ms())
                        .await
                    {
                        tracing::error!("oauth store error: {e}");
                        return redirect_error(
                            &state,
                            &req,
                            ErrorCode::TemporarilyUnavailable,
                            "try again later",
                        );
                    }
                    issue_code(&state, &client, &req, &user).await
                }
                _ => redirect_error(
                    &state,
                    &req,
                    ErrorCode::AccessDenied,
                    "the user denied the request",
                ),
            }
        }
        _ => error_page(StatusCode::BAD_REQUEST, "Unknown form action."),
    }
}

#[allow(clippy::result_large_err)] // the error is the response, returned at once
async fn check_password(
    state: &AppState,
    client: &OAuthClient,
    email: &str,
    password: &str,
) -> Result<Option<User>, Response> {
    use super::users::PasswordCheck;
    match super::users::check_password(state, &client.tenant_id, email, password).await {
        PasswordCheck::Valid(u) => Ok(Some(*u)),
        PasswordCheck::Invalid => Ok(None),
        PasswordCheck::Busy => Err(error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The sign-in service is busy. Try again in a moment.",
        )),
        PasswordCheck::Unavailable => Err(error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again later.",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// The token endpoint.

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    scope: String,
}

fn new_refresh(state: &AppState, grant_id: &str, now: i64) -> (String, RefreshToken) {
    let token = format!(
        "{}_rt_{}",
        state.config.keys.prefix,
        keygate_engine::ids::random_base62(43)
    );
    let row = RefreshToken {
        hash: token_hash(&token),
        grant_id: grant_id.to_owned(),
        created_at_ms: now,
        used_at_ms: None,
    };
    (token, row)
}

/// `POST /oauth/token`
#[utoipa::path(
    operation_id = "oauth_token",
    post,
    path = "/oauth/token",
    tag = "oauth",
    summary = "Token endpoint: authorization_code (PKCE), refresh_token (rotating), client_credentials",
    request_body(content = crate::openapi::TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = TokenResponse), (status = 400, body = crate::openapi::OAuthErrorBody), (status = 401, body = crate::openapi::OAuthErrorBody), (status = 503, body = crate::openapi::OAuthErrorBody)),
    security((), ("client" = []))
)]
pub async fn token(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let st = state.clone();
    // Store writes and their audit events finish even if the client hangs up.
    let r = detached(async move { Ok(token_inner(&st, &headers, &body).await) }).await;
    match r {
        Ok(Ok(t)) => (StatusCode::OK, no_store(), axum::Json(t)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn token_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<TokenResponse, OAuthError> {
    let p = form_body(headers, body)?;
    let grant_type = p.require("grant_type")?.to_owned();
    let cached = authenticate_client(state, headers, &p).await?;
    let client = &cached.client;
    match grant_type.as_str() {
        "authorization_code" => exchange_code(state, client, &p).await,
        "refresh_token" => refresh(state, client, &p).await,
        "client_credentials" => client_credentials(state, &cached, &p).await,
        _ => Err(OAuthError::new(
            ErrorCode::UnsupportedGrantType,
            "grant_type must be authorization_code, refresh_token or client_credentials",
        )),
    }
}

fn mint(
    state: &AppState,
    grant: &OAuthGrant,
    scope: &str,
    now: i64,
) -> Result<(String, u64, String), OAuthError> {
    state
        .oauth
        .mint_access(&state.config, grant, scope, now)
        .map_err(|e| {
            tracing::error!("signing an access token: {e}");
            OAuthError::new(ErrorCode::ServerError, "could not sign the token")
        })
}

async fn revoke_family(state: &AppState, grant_id: &str, reason: &str) -> Result<bool, StoreError> {
    let revoked = state.store.revoke_grant(grant_id, now_ms(), reason).await?;
    state.family_changed(&FamilyId::of_grant(grant_id)).await;
    Ok(revoked)
}

/// A code presented twice was stolen or replayed: every token issued from it goes.
async fn code_reused(state: &AppState, c: &AuthCode) -> Result<OAuthError, OAuthError> {
    if let Some(g) = &c.grant_id {
        revoke_family(state, g, "code_reuse").await?;
        let detail = serde_json::json!({"client_id": c.client_id, "grant_id": g});
        state
            .record_change(keygate_engine::engine::Change {
                actor: "system",
                action: "oauth.code_reuse",
                tenant_id: &c.tenant_id,
                key_id: Some(&KeyId::of_grant(g)),
                user_id: Some(&c.user_id),
                detail: &detail,
            })
            .await;
    }
    Ok(OAuthError::grant(
        "the code was used already; its tokens are revoked",
    ))
}

async fn exchange_code(
    state: &AppState,
    client: &OAuthClient,
    p: &Params,
) -> Result<TokenResponse, OAuthError> {
    let presented = token_hash(p.require("code")?);
    let redirect_uri = p.require("redirect_uri")?;
    let verifier = p.require("code_verifier")?;
    let now = now_ms();
    // Every binding is checked before the code is consumed, so a party that only intercepted
    // the code (no verifier, another client) cannot burn it for the real client.
    let Some(code) = state.store.get_code(&presented).await? else {
        return Err(OAuthError::grant("the code is not valid"));
    };
    let issued = grant::IssuedCode {
        client_id: &code.client_id,
        redirect_uri: &code.redirect_uri,
        challenge: &code.challenge,
        used: code.used_at_ms.is_some(),
        expires_at_ms: code.expires_at_ms,
    };
    match grant::check_exchange(issued, &client.id, redirect_uri, verifier, now) {
        Ok(()) => {}
        Err(grant::CodeRefused::Invalid(why)) => return Err(OAuthError::grant(why)),
        // Presented again with everything the first exchange needed: revoke what it issued.
        Err(grant::CodeRefused::Replayed) => return Err(code_reused(state, &code).await?),
    }
    let refresh_ttl =
        i64::try_from(state.config.oauth.refresh_token_ttl_seconds).unwrap_or(i64::MAX / 2000);
    let grant = OAuthGrant {
        id: keygate_engine::ids::new_id("grt", now),
        client_id: client.id.clone(),
        tenant_id: code.tenant_id.clone(),
        user_id: Some(code.user_id.clone()),
        scope: code.scope.clone(),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(refresh_ttl.saturating_mul(1000)),
        revoked_at_ms: None,
        revoked_reason: None,
    };
    let (refresh_token, rt) = new_refresh(state, &grant.id, now);
    match state.store.use_code(&presented, &grant, &rt, now).await? {
        CodeUse::Fresh(_) => {}
        CodeUse::Unknown => return Err(OAuthError::grant("the code is not valid")),
        // Another exchange of the same code won the race: the code was used twice.
        CodeUse::Reused(c) => return Err(code_reused(state, &c).await?),
    }
    let (access, ttl, _) = mint(state, &grant, &grant.scope, now)?;
    let detail =
        serde_json::json!({"client_id": client.id, "grant_id": grant.id, "scope": grant.scope});
    state
        .record_change(keygate_engine::engine::Change {
            actor: "system",
            action: "oauth.authorized",
            tenant_id: &grant.tenant_id,
            key_id: Some(&KeyId::of_grant(&grant.id)),
            user_id: grant.user_id.as_ref(),
            detail: &detail,
        })
        .await;
    Ok(TokenResponse {
        access_token: access,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token: Some(refresh_token),
        scope: grant.scope,
    })
}

async fn refresh(
    state: &AppState,
    client: &OAuthClient,
    p: &Params,
) -> Result<TokenResponse, OAuthError> {
    let presented = token_hash(p.require("refresh_token")?);
    let invalid = || OAuthError::grant(grant::INVALID_REFRESH);
    // Checked before it is consumed, so another client cannot burn this client's token.
    let Some((_, grant)) = state.store.get_refresh_grant(&presented).await? else {
        return Err(invalid());
    };
    let now = now_ms();
    let facts = grant::GrantFacts {
        client_id: &grant.client_id,
        scope: &grant.scope,
        revoked: grant.revoked_at_ms.is_some(),
        expires_at_ms: grant.expires_at_ms,
    };
    let scope = grant::check_refresh(facts, &client.id, p.get("scope"), now)
        .map_err(|(code, why)| OAuthError::new(code, why))?;
    let (refresh_token, successor) = new_refresh(state, &grant.id, now);
    match state.store.use_refresh(&presented, &successor, now).await? {
        RefreshUse::Fresh(_) => {}
        RefreshUse::Unknown => return Err(invalid()),
        RefreshUse::Reused(_) => {
            // RFC 9700 §4.14.2: a refresh token used twice means one copy was stolen; the
            // whole family goes, and the tenant hears of it.
            revoke_family(state, &grant.id, "refresh_reuse").await?;
            keygate_engine::alerts::raise(
                state,
                "oauth.refresh_reuse",
                &grant.tenant_id,
                Some(&KeyId::of_grant(&grant.id)),
                format!("refresh_reuse:{}", grant.id),
                format!(
                    "a refresh token of client {} was used twice; every token of the grant is revoked",
                    client.id
                ),
                serde_json::json!({"client_id": client.id, "grant_id": grant.id, "user_id": grant.user_id}),
            )
            .await;
            return Err(OAuthError::grant(
                "the refresh token was used already; the grant is revoked",
            ));
        }
    }
    let (access, ttl, _) = mint(state, &grant, &scope, now)?;
    Ok(TokenResponse {
        access_token: access,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token: Some(refresh_token),
        scope,
    })
}

async fn client_credentials(
    state: &AppState,
    cached: &CachedClient,
    p: &Params,
) -> Result<TokenResponse, OAuthError> {
    let client = &cached.client;
    if client.secret_hash.is_none() {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            "client_credentials is for confidential clients",
        ));
    }
    let scope = match p.get("scope").map(scope::parse) {
        None => client.scopes.clone(),
        Some(Some(asked)) if asked.iter().all(|s| client.scopes.contains(s)) => asked,
        Some(_) => {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                "scope asks for more than this client may have",
            ))
        }
    };
    // Every token of the client belongs to its standing grant: nothing is written per token.
    let Some(grant) = state.standing_grant(cached).await? else {
        // Deleted since this node cached it.
        return Err(OAuthError::client(false));
    };
    let scope = scope::join(&scope);
    let now = now_ms();
    let (access, ttl, jti) = mint(state, &grant, &scope, now)?;
    let detail = serde_json::json!({"client_id": client.id, "grant_id": grant.id, "jti": jti, "scope": scope});
    state.audit_change(keygate_engine::engine::Change {
        actor: "system",
        action: "oauth.client_credentials",
        tenant_id: &grant.tenant_id,
        key_id: Some(&KeyId::of_grant(&grant.id)),
        user_id: None,
        detail: &detail,
    });
    Ok(TokenResponse {
        access_token: access,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token: None,
        scope,
    })
}

// ---------------------------------------------------------------------------------------
// Revocation (RFC 7009) and introspection (RFC 7662).

/// What a presented token is.
enum Found {
    Refresh(RefreshToken, OAuthGrant),
    Access(keygate_oauth::jwt::AccessClaims, OAuthGrant),
    Nothing,
}

async fn find_token(
    state: &AppState,
    token: &str,
    allow_expired: bool,
) -> Result<Found, StoreError> {
    if keygate_oauth::jwt::looks_like_jwt(token) {
        let claims = match state
            .oauth
            .verify(&state.config, &*state.store, token)
            .await
        {
            Ok(c) => c,
            Err(keygate_oauth::jwt::VerifyError::Expired) if allow_expired => {
                // Revoking an expired token is a no-op; answer as for an unknown one.
                return Ok(Found::Nothing);
            }
            Err(_) => return Ok(Found::Nothing),
        };
        return Ok(match state.store.get_grant(&claims.grant_id).await? {
            Some(g) => Found::Access(claims, g),
            None => Found::Nothing,
        });
    }
    let Some(rt) = state.store.get_refresh(&token_hash(token)).await? else {
        return Ok(Found::Nothing);
    };
    Ok(match state.store.get_grant(&rt.grant_id).await? {
        Some(g) => Found::Refresh(rt, g),
        None => Found::Nothing,
    })
}

/// `POST /oauth/revoke`: always 200 for a token the client may not touch or that is unknown
/// (RFC 7009 §2.2), so the answer tells nothing about other clients' tokens.
#[utoipa::path(
    operation_id = "oauth_revoke",
    post,
    path = "/oauth/revoke",
    tag = "oauth",
    summary = "Token revocation (RFC 7009)",
    request_body(content = crate::openapi::RevokeForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Revoked, or unknown"), (status = 400, body = crate::openapi::OAuthErrorBody), (status = 401, body = crate::openapi::OAuthErrorBody), (status = 503, body = crate::openapi::OAuthErrorBody)),
    security((), ("client" = []))
)]
pub async fn revoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let st = state.clone();
    let r = detached(async move { Ok(revoke_inner(&st, &headers, &body).await) }).await;
    match r {
        Ok(Ok(())) => (StatusCode::OK, no_store()).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn revoke_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), OAuthError> {
    let p = form_body(headers, body)?;
    let cached = authenticate_client(state, headers, &p).await?;
    let client = &cached.client;
    let token = p.require("token")?;
    match find_token(state, token, true).await? {
        Found::Refresh(_, g) if g.client_id == client.id => {
            // Revoking a refresh token ends the grant and every access token of it.
            let revoked = revoke_family(state, &g.id, "revoked").await?;
            if revoked {
                let detail = serde_json::json!({"client_id": client.id, "grant_id": g.id, "token_type": "refresh_token"});
                state
                    .record_change(keygate_engine::engine::Change {
                        actor: "system",
                        action: "oauth.revoked",
                        tenant_id: &g.tenant_id,
                        key_id: Some(&KeyId::of_grant(&g.id)),
                        user_id: g.user_id.as_ref(),
                        detail: &detail,
                    })
                    .await;
            }
        }
        Found::Access(c, g) if g.client_id == client.id => {
            state
                .store
                .revoke_access_token(&c.jti, &g.id, c.exp.saturating_mul(1000))
                .await?;
            state.family_changed(&FamilyId::of_grant(&g.id)).await;
            let detail = serde_json::json!({"client_id": client.id, "grant_id": g.id, "jti": c.jti, "token_type": "access_token"});
            state
                .record_change(keygate_engine::engine::Change {
                    actor: "system",
                    action: "oauth.revoked",
                    tenant_id: &g.tenant_id,
                    key_id: Some(&KeyId::of_grant(&g.id)),
                    user_id: g.user_id.as_ref(),
                    detail: &detail,
                })
                .await;
        }
        _ => {}
    }
    Ok(())
}

/// `POST /oauth/introspect`: for confidential clients (their tenant's tokens) and `sk` keys
/// with scope `oauth:introspect` (their tenant's; the operator's, every tenant's).
#[utoipa::path(
    operation_id = "oauth_introspect",
    post,
    path = "/oauth/introspect",
    tag = "oauth",
    summary = "Token introspection (RFC 7662): confidential clients, or sk keys with oauth:introspect",
    request_body(content = crate::openapi::RevokeForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = crate::openapi::Introspection), (status = 400, body = crate::openapi::OAuthErrorBody), (status = 401, body = crate::openapi::OAuthErrorBody), (status = 503, body = crate::openapi::OAuthErrorBody)),
    security(("client" = []), ("bearer" = []))
)]
pub async fn introspect(State(state): State<AppState>, ctx: Ctx, body: Bytes) -> Response {
    match introspect_inner(&state, &ctx, &body).await {
        Ok(v) => (StatusCode::OK, no_store(), axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn introspect_inner(
    state: &AppState,
    ctx: &Ctx,
    body: &Bytes,
) -> Result<serde_json::Value, OAuthError> {
    let p = form_body(&ctx.headers, body)?;
    let bearer = crate::state::bearer(&ctx.headers).ok().flatten().is_some();
    // Which tenants' tokens the caller may see (`None`: every tenant).
    let sees: Option<TenantId> = if bearer {
        let caller = ctx
            .caller(state, INTROSPECT, RouteClass::TokenManagement)
            .await
            .map_err(|_| OAuthError::client(false))?;
        if caller.key.record.kind != keygate_core::Kind::Sk {
            return Err(OAuthError::client(false));
        }
        (!caller.is_operator()).then(|| caller.tenant().clone())
    } else {
        let cached = authenticate_client(state, &ctx.headers, &p).await?;
        if cached.client.secret_hash.is_none() {
            return Err(OAuthError::client(false));
        }
        Some(cached.client.tenant_id.clone())
    };
    let token = p.require("token")?;
    let inactive = serde_json::json!({"active": false});
    let visible = |g: &OAuthGrant| sees.as_ref().is_none_or(|t| *t == g.tenant_id);
    let now = now_ms();
    if keygate_oauth::jwt::looks_like_jwt(token) {
        // An access token: the pipeline's cache answers (verified once per node).
        let found = state.introspect_access(token).await.map_err(|_| {
            OAuthError::new(
                ErrorCode::TemporarilyUnavailable,
                "the authorization server cannot answer now",
            )
        })?;
        return Ok(match found {
            Some((c, true)) if sees.as_ref().is_none_or(|t| t.as_str() == c.tenant_id) => {
                serde_json::json!({
                    "active": true, "token_type": "access_token", "scope": c.scope,
                    "client_id": c.client_id, "sub": c.sub, "exp": c.exp, "iat": c.iat,
                    "iss": c.iss, "aud": c.aud, "jti": c.jti, "tenant_id": c.tenant_id,
                    "grant_id": c.grant_id,
                })
            }
            _ => inactive,
        });
    }
    Ok(match find_token(state, token, false).await? {
        Found::Refresh(rt, g) if visible(&g) => {
            if rt.used_at_ms.is_some() || g.revoked_at_ms.is_some() || g.expires_at_ms <= now {
                inactive
            } else {
                serde_json::json!({
                    "active": true, "token_type": "refresh_token", "scope": g.scope,
                    "client_id": g.client_id,
                    "sub": g.user_id.as_deref().unwrap_or(&g.client_id),
                    "exp": g.expires_at_ms / 1000, "iat": rt.created_at_ms / 1000,
                    "iss": state.oauth.issuer, "tenant_id": g.tenant_id, "grant_id": g.id,
                })
            }
        }
        _ => inactive,
    })
}

// ---------------------------------------------------------------------------------------
// Discovery.

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
#[utoipa::path(
    operation_id = "oauth_metadata",
    get,
    path = "/.well-known/oauth-authorization-server",
    tag = "oauth",
    summary = "Authorization server metadata (RFC 8414)",
    responses((status = 200, body = Object))
)]
pub async fn metadata(State(state): State<AppState>) -> Response {
    let iss = &state.oauth.issuer;
    let auth_methods = ["client_secret_basic", "client_secret_post", "none"];
    axum::Json(serde_json::json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/oauth/authorize"),
        "token_endpoint": format!("{iss}/oauth/token"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "introspection_endpoint": format!("{iss}/oauth/introspect"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "authorization_response_iss_parameter_supported": true,
    }))
    .into_response()
}

/// `GET /.well-known/jwks.json`
#[utoipa::path(
    operation_id = "oauth_jwks",
    get,
    path = "/.well-known/jwks.json",
    tag = "oauth",
    summary = "Public keys of the access-token signatures (JWKS)",
    responses((status = 200, body = Object))
)]
pub async fn jwks(State(state): State<AppState>) -> Response {
    (
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=300"),
        )],
        axum::Json(state.oauth.keyring().jwks().clone()),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Pages: askama templates under `templates/oauth/`, which escape every value.

#[derive(askama::Template)]
#[template(path = "oauth/error.html")]
struct ErrorPage<'a> {
    message: &'a str,
}

#[derive(askama::Template)]
#[template(path = "oauth/login.html")]
struct LoginPage<'a> {
    client: &'a str,
    error: Option<&'a str>,
    request: &'a str,
    csrf: &'a str,
}

#[derive(askama::Template)]
#[template(path = "oauth/consent.html")]
struct ConsentPage<'a> {
    email: &'a str,
    client: &'a str,
    scopes: &'a [String],
    request: &'a str,
    csrf: &'a str,
}

fn page(status: StatusCode, t: &impl askama::Template, cookie: Option<HeaderValue>) -> Response {
    let html = match t.render() {
        Ok(html) => html,
        Err(e) => return crate::error::ApiError::internal("oauth page", &e).into_response(),
    };
    let mut res = (status, axum::response::Html(html)).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Some(c) = cookie {
        h.append(header::SET_COOKIE, c);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use askama::Template;

    const EVIL: &str = "\"><script>alert(1)</script>'";

    #[test]
    fn every_page_escapes_every_field() {
        let scopes = vec![EVIL.to_owned()];
        let pages = [
            ErrorPage { message: EVIL }.render(),
            LoginPage {
                client: EVIL,
                error: Some(EVIL),
                request: EVIL,
                csrf: EVIL,
            }
            .render(),
            ConsentPage {
                email: EVIL,
                client: EVIL,
                scopes: &scopes,
                request: EVIL,
                csrf: EVIL,
            }
            .render(),
        ];
        for page in pages {
            crate::dashboard::tests::assert_escaped(&page.expect("renders"));
        }
    }
}

//! The one error type of the HTTP layer and the JSON body every refusal carries:
//! `{"error": {"code", "message", "request_id"}}`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keygate_core::{Code, RateDecision};
use serde::Serialize;
use std::borrow::Cow;

pub use keygate_engine::request_id::RequestId;

/// The message of [`Code::BlockedForKeyType`] for an OAuth access token.
pub const TOKEN_BLOCKED: &str = "OAuth access tokens may not call this endpoint";

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The code (`INVALID_REQUEST`, `REVOKED`, …).
    pub code: &'static str,
    /// Safe, human-readable message.
    pub message: Cow<'static, str>,
    /// Rate decision, for `Retry-After` and the RateLimit headers.
    pub rate: Option<RateDecision>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            rate: None,
        }
    }

    /// 400/422 `INVALID_REQUEST`.
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST", message)
    }

    /// 404 `NOT_FOUND`.
    pub fn not_found(what: &'static str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("{what} not found"),
        )
    }

    /// 409 `CONFLICT`.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, "CONFLICT", message)
    }

    /// The refusal for `code` (its status), with a message saying what exactly was refused.
    pub fn because(code: Code, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            message: message.into(),
            ..Self::decision(code, None)
        }
    }

    /// A decision refusal.
    pub fn decision(code: Code, rate: Option<RateDecision>) -> Self {
        Self {
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::FORBIDDEN),
            code: code.as_str(),
            message: Cow::Borrowed(code.message()),
            rate,
        }
    }

    /// The refusal of a request the pipeline denied, with a message that names what was
    /// refused: [`Code::BlockedForKeyType`] says "publishable keys" for a `pk`, and "OAuth
    /// access tokens" for a token (whatever its record's kind), which is refused on every
    /// route that is not a resource route.
    pub fn denied(d: &keygate_engine::engine::Denied) -> Self {
        let token = d.key.as_ref().is_some_and(|k| k.token);
        Self::refused(d.code, d.rate, token)
    }

    /// [`ApiError::decision`], for a caller holding an OAuth access token when `token`.
    pub fn refused(code: Code, rate: Option<RateDecision>, token: bool) -> Self {
        let mut e = Self::decision(code, rate);
        if token && code == Code::BlockedForKeyType {
            e.message = Cow::Borrowed(TOKEN_BLOCKED);
        }
        e
    }

    /// 503/500 without details: the details go to the log with the request id.
    pub fn internal(context: &str, err: &dyn std::fmt::Display) -> Self {
        let unavailable = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "a backing service is unavailable; try again shortly",
        );
        tracing::error!(
            request_id = RequestId::current().as_deref().unwrap_or("-"),
            "{context}: {err}"
        );
        unavailable
    }
}

impl ApiError {
    /// The JSON body, in the contract's shape.
    fn body(&self, request_id: &str) -> Vec<u8> {
        serde_json::to_vec(&Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                request_id,
            },
        })
        .unwrap_or_default()
    }

    /// The whole response as HTTP/1.1 bytes with `connection: close`, under a new request id,
    /// for a connection that writes it by itself (see [`crate::held`]).
    pub fn to_http1_closing(self) -> Vec<u8> {
        let rid = RequestId::new().0;
        let body = self.body(rid.to_str().unwrap_or_default());
        let status = self.status;
        let res = RequestId(rid).sync_scope(|| self.into_response());
        let mut out = Vec::with_capacity(512 + body.len());
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
            .as_bytes(),
        );
        for (name, value) in res.headers() {
            if name != axum::http::header::CONTENT_LENGTH {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(
            format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&body);
        out
    }
}

impl From<keygate_core::InvalidInput> for ApiError {
    fn from(e: keygate_core::InvalidInput) -> Self {
        ApiError::invalid(e.message().to_owned())
    }
}

impl From<keygate_engine::issue::IssueError> for ApiError {
    fn from(e: keygate_engine::issue::IssueError) -> Self {
        match e {
            keygate_engine::issue::IssueError::Invalid(m) => ApiError::invalid(m),
            keygate_engine::issue::IssueError::Store(e) => e.into(),
        }
    }
}

impl From<keygate_store::StoreError> for ApiError {
    fn from(e: keygate_store::StoreError) -> Self {
        match e.kind {
            keygate_store::StoreErrorKind::Conflict => {
                ApiError::conflict("a record with the same unique value already exists")
            }
            _ => ApiError::internal("store", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rid = RequestId::current_or_new();
        let body = self.body(rid.to_str().unwrap_or_default());
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            crate::headers::X_KEYGATE_CODE,
            HeaderValue::from_static(self.code),
        );
        h.insert(crate::headers::X_REQUEST_ID, rid);
        // The message too, for proxies that drop the body (nginx auth_request rebuilds the
        // JSON from these headers; see docs/nginx.conf).
        if let Ok(v) = HeaderValue::from_str(&self.message) {
            h.insert(crate::headers::X_KEYGATE_MESSAGE, v);
        }
        if let Some(r) = self.rate {
            crate::headers::rate_headers(h, &r, None);
            if !r.allowed {
                h.insert(
                    axum::http::header::RETRY_AFTER,
                    HeaderValue::from(r.retry_after_seconds),
                );
            }
        }
        res
    }
}

/// A JSON body extractor whose rejections are [`ApiError`]s in the contract's shape.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::JsonDataError(e) => {
            ApiError::invalid(format!("invalid request body: {}", e.body_text()))
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("malformed JSON: {}", e.body_text()),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body too large",
            )
        }
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            other.body_text(),
        ),
    }
}

/// A query-string extractor whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                e.body_text(),
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                e.body_text(),
            )),
        }
    }
}

/// A path-parameter extractor whose rejections are [`ApiError`]s (bad UTF-8 in an id, …).
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                e.body_text(),
            )),
        }
    }
}

//! HTTP routes. Every management handler starts with [`Ctx::caller`], which runs the same
//! pipeline as every other request (so `pk` keys are refused here by route class, revoked keys
//! at once, and so on) and checks the scope the endpoint needs.

pub mod audit;
pub mod keys;
pub mod oauth;
pub mod oauth_clients;
pub mod status;
pub mod tenants;
pub mod users;
pub mod verify;
pub mod webhooks;

use crate::error::ApiError;
use crate::state::{bearer, management_facts, AppState};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use keygate_core::{Kind, RouteClass};
use keygate_engine::engine::CachedKey;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Runs a store write, its cache invalidation and its audit event in a task of its own (under
/// the same request id), so that neither a request timeout nor a client hanging up can stop
/// between them.
pub(crate) async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, keygate_store::StoreError>> + Send + 'static,
) -> Result<T, ApiError> {
    let rid = keygate_engine::request_id::RequestId(
        keygate_engine::request_id::RequestId::current_or_new(),
    );
    tokio::spawn(rid.scope(f))
        .await
        .map_err(|e| ApiError::internal("store write task", &e))?
        .map_err(ApiError::from)
}

/// The operator's tenant.
pub const DEFAULT_TENANT: &str = "default";

/// Request context every handler can extract: method, headers, the TCP peer.
#[derive(Debug)]
pub struct Ctx {
    /// Method.
    pub method: Method,
    /// Path (without the query).
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// The client's address (see [`crate::proxy`]).
    pub peer: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Ctx {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            headers: parts.headers.clone(),
            // The client's address as the server judged it (behind a trusted proxy, the one
            // the proxy reports), else the TCP peer.
            peer: parts
                .extensions
                .get::<crate::server::ClientIp>()
                .map_or_else(
                    || {
                        parts
                            .extensions
                            .get::<ConnectInfo<SocketAddr>>()
                            .map(|c| c.0.ip())
                    },
                    |c| c.0,
                ),
        })
    }
}

/// An authenticated management caller.
#[derive(Debug)]
pub struct Caller {
    /// The caller's key.
    pub key: Arc<CachedKey>,
}

impl Caller {
    /// The caller's tenant.
    pub fn tenant(&self) -> &str {
        &self.key.record.tenant_id
    }

    /// The user a `ut` key acts for: on the key routes it sees and manages only that user's
    /// keys (a user has a plan, not a tenant's management rights).
    pub fn own_user(&self) -> Option<&str> {
        match self.key.record.kind {
            Kind::Ut => self.key.record.user_id.as_deref(),
            _ => None,
        }
    }

    /// The operator: a `sk` key with `*` in the `default` tenant; may act in any tenant.
    pub fn is_operator(&self) -> bool {
        self.key.record.tenant_id == DEFAULT_TENANT
            && self.key.record.kind == Kind::Sk
            && self.key.record.scopes.has_all()
    }

    /// Whether the caller's own scopes cover `scopes`: a key may only grant, change, rotate or
    /// revoke what it could do itself (`*` only if it holds `*`).
    pub fn covers(&self, scopes: &keygate_core::ScopeSet) -> bool {
        scopes.is_subset_of(&self.key.record.scopes)
    }

    /// [`Caller::covers`] as a refusal.
    pub fn require_covers(&self, scopes: &keygate_core::ScopeSet) -> Result<(), ApiError> {
        if self.covers(scopes) {
            Ok(())
        } else {
            Err(ApiError::because(
                keygate_core::Code::ForbiddenScope,
                "the calling key cannot grant or manage scopes it does not hold itself",
            ))
        }
    }

    /// Whether records of `tenant_id` are visible to the caller.
    pub fn sees(&self, tenant_id: &str) -> bool {
        self.is_operator() || tenant_id == self.tenant()
    }

    /// The tenant a listing is limited to: none for the operator naming none (every tenant),
    /// else [`Caller::act_in`].
    pub async fn scope(
        &self,
        state: &AppState,
        requested: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        if self.is_operator() && requested.is_none() {
            return Ok(None);
        }
        self.act_in(state, requested).await.map(Some)
    }

    /// The tenant to act in: `requested` if the caller may (else 404, as if it did not exist),
    /// or the caller's own.
    pub async fn act_in(
        &self,
        state: &AppState,
        requested: Option<&str>,
    ) -> Result<String, ApiError> {
        match requested {
            None => Ok(self.tenant().to_owned()),
            Some(t) if t == self.tenant() => Ok(t.to_owned()),
            Some(t) if self.is_operator() => match state.store.get_tenant(t).await? {
                Some(_) => Ok(t.to_owned()),
                None => Err(ApiError::not_found("tenant")),
            },
            Some(_) => Err(ApiError::not_found("tenant")),
        }
    }
}

impl Ctx {
    /// Authenticates the caller and checks that its key holds `scope` on a route of `class`.
    pub async fn caller(
        &self,
        state: &AppState,
        scope: &str,
        class: RouteClass,
    ) -> Result<Caller, ApiError> {
        let facts = management_facts(
            self.method.as_str(),
            &self.path,
            &self.headers,
            self.peer,
            scope,
            class,
        );
        match state.authorize(bearer(&self.headers), &facts, None).await {
            Ok(a) => {
                // An OAuth access token is for the resource API, not for managing keygate:
                // it must not mint keys that outlive it.
                if a.key.record.kind == Kind::Pk || a.key.token {
                    // decide() already refuses pk and tokens on every non-normal class; keep
                    // it explicit.
                    return Err(ApiError::refused(
                        keygate_core::Code::BlockedForKeyType,
                        None,
                        a.key.token,
                    ));
                }
                Ok(Caller { key: a.key })
            }
            Err(d) => Err(ApiError::denied(&d)),
        }
    }
}

/// `?limit=&cursor=`
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 50, max 500).
    pub limit: Option<u32>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The store's page request, with the limit checked.
    pub fn page(&self) -> Result<keygate_store::PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(50);
        if limit == 0 || limit > 500 {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "limit must be between 1 and 500",
            ));
        }
        Ok(keygate_store::PageRequest {
            cursor: self.cursor.clone(),
            limit,
        })
    }
}

/// The next cursor for a page of `n` items out of `limit`.
pub fn next_cursor<T>(items: &[T], limit: u32, id: impl Fn(&T) -> &str) -> Option<String> {
    if items.len() == limit as usize {
        items.last().map(|i| id(i).to_owned())
    } else {
        None
    }
}

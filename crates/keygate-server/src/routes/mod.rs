//! HTTP routes. Every management handler starts with [`Ctx::caller`], which runs the same
//! pipeline as every other request (so `pk` keys are refused here by route class, revoked keys
//! at once, and so on) and checks the scope the endpoint needs.

pub mod audit;
pub mod keys;
pub mod oauth;
pub mod oauth_clients;
pub mod signup;
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
use keygate_core::access::{Actor, Target};
use keygate_core::{FamilyId, Kind, RouteClass, TenantId, UserId};
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
pub const DEFAULT_TENANT: &str = keygate_core::access::OPERATOR_TENANT;

/// The operator's tenant, as an id.
pub fn default_tenant() -> TenantId {
    TenantId::from(DEFAULT_TENANT)
}

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
    /// The caller as the access rules (`keygate_core::access`) see it.
    pub fn actor(&self) -> Actor<'_> {
        let r = &self.key.record;
        Actor {
            tenant_id: &r.tenant_id,
            kind: r.kind,
            user_id: r.user_id.as_ref(),
            family_id: &r.family_id,
            scopes: &r.scopes,
            owner: self.key.owner,
        }
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.key.record.tenant_id
    }

    /// See [`Actor::own_user`].
    pub fn own_user(&self) -> Option<&UserId> {
        self.actor().own_user()
    }

    /// See [`Actor::sees_only`].
    pub fn sees_only(&self) -> Option<&UserId> {
        self.actor().sees_only()
    }

    /// See [`Actor::is_operator`].
    pub fn is_operator(&self) -> bool {
        self.actor().is_operator()
    }

    /// See [`Actor::covers`].
    pub fn covers(&self, scopes: &keygate_core::ScopeSet) -> bool {
        self.actor().covers(scopes)
    }

    /// [`Actor::may_manage`] as an answer.
    pub fn require_covers(&self, scopes: &keygate_core::ScopeSet) -> Result<(), ApiError> {
        self.actor().may_manage(scopes).map_err(refused)
    }

    /// [`Actor::may_change`] as an answer.
    pub fn require_may_change(&self, family_id: &FamilyId) -> Result<(), ApiError> {
        self.actor().may_change(family_id).map_err(refused)
    }

    /// 403 `PLAN_FEATURE` unless the caller's account's plan includes `feature`.
    pub async fn require_feature(
        &self,
        state: &AppState,
        feature: keygate_engine::config::Feature,
    ) -> Result<(), ApiError> {
        let plan = state
            .store
            .get_tenant(self.tenant())
            .await?
            .map_or_else(|| "free".to_owned(), |t| t.plan);
        if state.plan(&plan).has(feature) {
            return Ok(());
        }
        Err(ApiError::because(
            keygate_core::Code::PlanFeature,
            format!(
                "the account's plan ({plan}) does not include {}",
                feature.as_str()
            ),
        ))
    }

    /// See [`Actor::sees`].
    pub fn sees(&self, tenant_id: &TenantId) -> bool {
        self.actor().sees(tenant_id)
    }

    /// The tenant a listing is limited to ([`Actor::listing`]): `None` for every tenant.
    pub async fn scope(
        &self,
        state: &AppState,
        requested: Option<&str>,
    ) -> Result<Option<TenantId>, ApiError> {
        resolve(state, self.actor().listing(requested)).await
    }

    /// The tenant to act in ([`Actor::act_in`]); one the caller may not see is answered 404,
    /// as if it did not exist.
    pub async fn act_in(
        &self,
        state: &AppState,
        requested: Option<&str>,
    ) -> Result<TenantId, ApiError> {
        resolve(state, self.actor().act_in(requested))
            .await?
            .ok_or_else(|| ApiError::not_found("tenant"))
    }
}

fn refused(r: keygate_core::access::Refused) -> ApiError {
    ApiError::because(r.code, r.message)
}

/// A target tenant made concrete: `None` for every tenant; an operator's named tenant must
/// exist.
async fn resolve(state: &AppState, target: Target<'_>) -> Result<Option<TenantId>, ApiError> {
    match target {
        Target::Every => Ok(None),
        Target::Own(t) => Ok(Some(t.clone())),
        Target::IfExists(t) => match state.store.get_tenant(&t).await? {
            Some(_) => Ok(Some(t)),
            None => Err(ApiError::not_found("tenant")),
        },
        Target::Hidden => Err(ApiError::not_found("tenant")),
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
                // An account whose owner has not proven their address reads only: until then
                // it may be someone else's address, and nothing made now should outlive that.
                if a.key.policy.plan_gate == Some(keygate_core::Code::AccountUnverified)
                    && scope.ends_with(":write")
                {
                    return Err(ApiError::refused(
                        keygate_core::Code::AccountUnverified,
                        None,
                        false,
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

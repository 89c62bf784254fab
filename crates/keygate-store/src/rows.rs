//! Rows to records: one mapping for both backends (their schemas have the same shape).

use crate::{KeyRecord, Result, StoreError, Tenant, User};
use keygate_core::access::Role;
use keygate_core::{Id, IpAllowList, KeyHash, KeyStatus, Kind, OriginList, RateLimit, ScopeSet};
use sqlx::any::AnyRow;
use sqlx::Row;

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A typed id from a text column.
pub(crate) fn id<K>(r: &AnyRow, col: &str) -> Result<Id<K>> {
    Ok(Id::from(r.try_get::<String, _>(col)?))
}

/// A typed id from a nullable text column.
pub(crate) fn opt_id<K>(r: &AnyRow, col: &str) -> Result<Option<Id<K>>> {
    Ok(r.try_get::<Option<String>, _>(col)?.map(Id::from))
}

pub(crate) fn json_list(v: Vec<String>) -> String {
    serde_json::Value::from(v).to_string()
}

pub(crate) fn parse_list(s: &str, what: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::corrupt(format!("{what}: {e}")))
}

/// A tenant row.
pub(crate) fn tenant_from_row(r: &AnyRow) -> Result<Tenant> {
    Ok(Tenant {
        id: id(r, "id")?,
        name: r.try_get("name")?,
        plan: r.try_get("plan")?,
        credits: r.try_get::<Option<i64>, _>("credits")?.map(to_u64),
        created_at_ms: r.try_get("created_at")?,
        plan_started_at_ms: r.try_get("plan_started_at")?,
        trial_ends_at_ms: r.try_get("trial_ends_at")?,
        refilled_months: u32::try_from(r.try_get::<i64, _>("refilled_months")?).unwrap_or(0),
        verified: r.try_get::<i64, _>("verified")? != 0,
    })
}

/// A user row.
pub(crate) fn user_from_row(r: &AnyRow) -> Result<User> {
    Ok(User {
        id: id(r, "id")?,
        tenant_id: id(r, "tenant_id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        plan: r.try_get("plan")?,
        password_hash: r.try_get("password_hash")?,
        created_at_ms: r.try_get("created_at")?,
        role: Role::parse(&r.try_get::<String, _>("role")?)
            .ok_or_else(|| StoreError::corrupt("role"))?,
        verified: r.try_get::<i64, _>("verified")? != 0,
        sessions_from_ms: r.try_get("sessions_from")?,
        removed_at_ms: r.try_get("removed_at")?,
    })
}

/// A key row joined with its family.
pub(crate) fn key_from_row(r: &AnyRow) -> Result<KeyRecord> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::corrupt(format!("{what}: {e}"));
    let kind: String = r.try_get("kind")?;
    let status: String = r.try_get("status")?;
    let hash: Vec<u8> = r.try_get("hash")?;
    let scopes = parse_list(&r.try_get::<String, _>("scopes")?, "scopes")?;
    let ips = parse_list(&r.try_get::<String, _>("allowed_ips")?, "allowed_ips")?;
    let origins = parse_list(
        &r.try_get::<String, _>("allowed_origins")?,
        "allowed_origins",
    )?;
    let metadata: String = r.try_get("metadata")?;
    let rate_limit = match (
        r.try_get::<Option<i64>, _>("rate_limit")?,
        r.try_get::<Option<i64>, _>("rate_window")?,
    ) {
        (Some(l), Some(w)) => Some(
            RateLimit::new(
                u32::try_from(l).map_err(|e| corrupt("rate_limit", &e))?,
                u32::try_from(w).map_err(|e| corrupt("rate_window", &e))?,
            )
            .map_err(|e| corrupt("rate_limit", &e))?,
        ),
        _ => None,
    };
    Ok(KeyRecord {
        id: id(r, "id")?,
        family_id: id(r, "family_id")?,
        tenant_id: id(r, "tenant_id")?,
        user_id: opt_id(r, "user_id")?,
        kind: Kind::parse(&kind).map_err(|e| corrupt("kind", &e))?,
        name: r.try_get("name")?,
        hash: KeyHash::from_slice(&hash).ok_or_else(|| StoreError::corrupt("hash length"))?,
        display: r.try_get("display")?,
        scopes: ScopeSet::parse(&scopes).map_err(|e| corrupt("scopes", &e))?,
        allowed_ips: IpAllowList::parse(&ips).map_err(|e| corrupt("allowed_ips", &e))?,
        allowed_origins: OriginList::parse(&origins).map_err(|e| corrupt("allowed_origins", &e))?,
        rate_limit,
        budget: r.try_get::<Option<i64>, _>("budget")?.map(to_u64),
        budget_withdrawn: to_u64(r.try_get("spent")?),
        expires_at_ms: r.try_get("expires_at")?,
        rotation_days: r
            .try_get::<Option<i64>, _>("rotation_days")?
            .map(|d| u32::try_from(d).unwrap_or(u32::MAX)),
        metadata: serde_json::from_str(&metadata).map_err(|e| corrupt("metadata", &e))?,
        status: KeyStatus::parse(&status).ok_or_else(|| StoreError::corrupt("status"))?,
        rotated_from: opt_id(r, "rotated_from")?,
        rotated_to: opt_id(r, "rotated_to")?,
        created_at_ms: r.try_get("created_at")?,
        updated_at_ms: r.try_get("updated_at")?,
        last_used_at_ms: r.try_get("last_used_at")?,
        revoked_at_ms: r.try_get("revoked_at")?,
    })
}

/// An audit event row.
pub(crate) fn audit_from_row(r: &AnyRow) -> Result<keygate_core::AuditEvent> {
    Ok(keygate_core::AuditEvent {
        id: r.try_get("id")?,
        node: r.try_get("node")?,
        seq: r.try_get("seq")?,
        at_ms: r.try_get("at")?,
        tenant_id: r.try_get("tenant_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        key_id: r.try_get("key_id")?,
        user_id: r.try_get("user_id")?,
        kind: r.try_get("kind")?,
        code: r.try_get("code")?,
        status: r.try_get("status")?,
        method: r.try_get("method")?,
        path: r.try_get("path")?,
        scope: r.try_get("scope")?,
        ip: r.try_get("ip")?,
        origin: r.try_get("origin")?,
        credits: r.try_get("credits")?,
        latency_us: r.try_get("latency_us")?,
        request_id: r.try_get("request_id")?,
        detail: r.try_get("detail")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
        line: None,
    })
}

//! Audit events, chain heads and usage roll-ups: one implementation for both backends.
//!
//! The statements are built with [`sqlx::QueryBuilder`], which writes each backend's own
//! placeholders, so the SQL exists once; `audit_methods!` stamps the methods out for the
//! SQLite and the PostgreSQL pool types.

use crate::{AuditFilter, PageRequest, UsageOf, UsageRow};
use keygate_core::AuditEvent;
use std::collections::BTreeMap;

/// Columns of `audit_events`, in insert order.
pub(crate) const COLUMNS: &str = "node, seq, id, at, tenant_id, actor, action, key_id, user_id, \
    kind, code, status, method, path, scope, ip, origin, credits, latency_us, request_id, \
    detail, prev_hash, hash";

/// Per-minute usage of a batch: `(key, minute, code) → (tenant, requests, credits)`.
pub(crate) fn usage_of(
    events: &[&AuditEvent],
) -> BTreeMap<(String, i64, String), (String, i64, i64)> {
    let mut out: BTreeMap<(String, i64, String), (String, i64, i64)> = BTreeMap::new();
    for e in events {
        if e.action != "request.decided" {
            continue;
        }
        let (Some(k), Some(t), Some(c)) = (&e.key_id, &e.tenant_id, &e.code) else {
            continue;
        };
        let minute = e.at_ms - e.at_ms.rem_euclid(60_000);
        let slot = out
            .entry((k.clone(), minute, c.clone()))
            .or_insert_with(|| (t.clone(), 0, 0));
        slot.1 += 1;
        // Saturating: a sum of credits must never wrap, however large one event claims to be.
        slot.2 = slot.2.saturating_add(e.credits.unwrap_or(0).max(0));
    }
    out
}

/// Bucket width in ms for `minute`, `hour`, `day`.
pub fn granularity_ms(g: &str) -> Option<i64> {
    match g {
        "minute" => Some(60_000),
        "hour" => Some(3_600_000),
        "day" => Some(86_400_000),
        _ => None,
    }
}

pub(crate) fn page_usage(rows: Vec<(i64, String, i64, i64)>) -> Vec<UsageRow> {
    rows.into_iter()
        .map(|(b, code, r, c)| UsageRow {
            bucket_ms: b,
            code,
            requests: crate::rows::to_u64(r),
            credits: crate::rows::to_u64(c),
        })
        .collect()
}

/// Appends the WHERE clauses of `f` (and the cursor) to `q`.
macro_rules! push_filter {
    ($q:expr, $f:expr, $page:expr) => {{
        $q.push(" WHERE 1 = 1");
        let eq: [(&str, &Option<String>); 5] = [
            ("tenant_id", &$f.tenant_id),
            ("key_id", &$f.key_id),
            ("user_id", &$f.user_id),
            ("action", &$f.action),
            ("code", &$f.code),
        ];
        for (col, v) in eq {
            if let Some(v) = v {
                $q.push(format_args!(" AND {col} = ")).push_bind(v.clone());
            }
        }
        if let Some(t) = $f.since_ms {
            $q.push(" AND at >= ").push_bind(t);
        }
        if let Some(t) = $f.until_ms {
            $q.push(" AND at < ").push_bind(t);
        }
        if let Some(c) = &$page.cursor {
            $q.push(" AND id < ").push_bind(c.clone());
        }
        $q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from($page.limit));
    }};
}

/// The audit methods of a store over `$pool` (a sqlx pool of database `$db`).
macro_rules! audit_methods {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl crate::AuditStore for $store {
            async fn append_audit(&self, events: &[AuditEvent]) -> crate::Result<()> {
                if events.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                let mut by_node: BTreeMap<&str, Vec<&AuditEvent>> = BTreeMap::new();
                for e in events {
                    by_node.entry(e.node.as_str()).or_default().push(e);
                }
                for (node, evs) in by_node {
                    let head: Option<i64> =
                        sqlx::QueryBuilder::<$db>::new("SELECT seq FROM audit_heads WHERE node = ")
                            .push_bind(node.to_owned())
                            .build_query_scalar()
                            .fetch_optional(&mut *tx)
                            .await?;
                    // Replayed after a crash: what reached the store already is skipped.
                    let fresh: Vec<&AuditEvent> = evs
                        .into_iter()
                        .filter(|e| e.seq > head.unwrap_or(0))
                        .collect();
                    let Some(last) = fresh.last() else { continue };
                    for chunk in fresh.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                            "INSERT INTO audit_events ({}) ",
                            COLUMNS
                        ));
                        // Borrowed binds: a batch is ~1,000 events of 23 columns, and copying
                        // every string would be most of the shipper's allocations.
                        q.push_values(chunk.iter(), |mut b, e| {
                            b.push_bind(e.node.as_str())
                                .push_bind(e.seq)
                                .push_bind(e.id.as_str())
                                .push_bind(e.at_ms)
                                .push_bind(e.tenant_id.as_deref())
                                .push_bind(e.actor.as_str())
                                .push_bind(e.action.as_str())
                                .push_bind(e.key_id.as_deref())
                                .push_bind(e.user_id.as_deref())
                                .push_bind(e.kind.as_deref())
                                .push_bind(e.code.as_deref())
                                .push_bind(e.status)
                                .push_bind(e.method.as_deref())
                                .push_bind(e.path.as_deref())
                                .push_bind(e.scope.as_deref())
                                .push_bind(e.ip.as_deref())
                                .push_bind(e.origin.as_deref())
                                .push_bind(e.credits)
                                .push_bind(e.latency_us)
                                .push_bind(e.request_id.as_deref())
                                .push_bind(e.detail.as_deref())
                                .push_bind(e.prev_hash.as_str())
                                .push_bind(e.hash.as_str());
                        });
                        q.build().execute(&mut *tx).await?;
                    }
                    for ((key, minute, code), (tenant, n, credits)) in usage_of(&fresh) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "INSERT INTO usage_minutes (key_id, tenant_id, minute, code, requests, credits) ",
                        );
                        q.push_values([()], |mut b, ()| {
                            b.push_bind(key.clone())
                                .push_bind(tenant.clone())
                                .push_bind(minute)
                                .push_bind(code.clone())
                                .push_bind(n)
                                .push_bind(credits);
                        });
                        q.push(
                            " ON CONFLICT (key_id, minute, code) DO UPDATE SET \
                             requests = usage_minutes.requests + excluded.requests, \
                             credits = usage_minutes.credits + excluded.credits",
                        );
                        q.build().execute(&mut *tx).await?;
                    }
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO audit_heads (node, seq, hash) ",
                    );
                    q.push_values([()], |mut b, ()| {
                        b.push_bind(node.to_owned())
                            .push_bind(last.seq)
                            .push_bind(last.hash.clone());
                    });
                    q.push(
                        " ON CONFLICT (node) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    );
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn audit_heads(&self) -> crate::Result<Vec<(String, i64, String)>> {
                Ok(sqlx::query_as("SELECT node, seq, hash FROM audit_heads ORDER BY node")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn list_audit(
                &self,
                f: &AuditFilter,
                page: &PageRequest,
            ) -> crate::Result<Vec<AuditEvent>> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM audit_events",
                    COLUMNS
                ));
                push_filter!(q, f, page);
                let rows = q.build().fetch_all(&self.pool).await?;
                rows.iter().map(crate::rows::audit_from_row).collect()
            }

            async fn audit_chain(
                &self,
                node: &str,
                after_seq: i64,
                limit: u32,
            ) -> crate::Result<Vec<AuditEvent>> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM audit_events WHERE node = ",
                    COLUMNS
                ));
                q.push_bind(node.to_owned())
                    .push(" AND seq > ")
                    .push_bind(after_seq)
                    .push(" ORDER BY seq LIMIT ")
                    .push_bind(i64::from(limit));
                let rows = q.build().fetch_all(&self.pool).await?;
                rows.iter().map(crate::rows::audit_from_row).collect()
            }

            async fn usage(
                &self,
                of: &UsageOf,
                bucket_ms: i64,
                since_ms: i64,
                until_ms: i64,
            ) -> crate::Result<Vec<UsageRow>> {
                let (col, id) = match of {
                    UsageOf::Key(k) => ("key_id", k),
                    UsageOf::Tenant(t) => ("tenant_id", t),
                };
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT (minute / ");
                q.push_bind(bucket_ms)
                    .push(") * ")
                    .push_bind(bucket_ms)
                    .push(format_args!(
                        " AS bucket, code, CAST(SUM(requests) AS BIGINT), CAST(SUM(credits) AS BIGINT) \
                         FROM usage_minutes WHERE {col} = "
                    ))
                    .push_bind(id.clone())
                    .push(" AND minute >= ")
                    .push_bind(since_ms)
                    .push(" AND minute < ")
                    .push_bind(until_ms)
                    .push(" GROUP BY bucket, code ORDER BY bucket, code");
                let rows: Vec<(i64, String, i64, i64)> =
                    q.build_query_as().fetch_all(&self.pool).await?;
                Ok(page_usage(rows))
            }

            async fn prune_usage(&self, before_ms: i64) -> crate::Result<u64> {
                let r = sqlx::QueryBuilder::<$db>::new("DELETE FROM usage_minutes WHERE minute < ")
                    .push_bind(before_ms)
                    .build()
                    .execute(&self.pool)
                    .await?;
                Ok(r.rows_affected())
            }
        }
    };
}

audit_methods!(crate::SqliteStore, sqlx::Sqlite);
audit_methods!(crate::PgStore, sqlx::Postgres);

/// The result of checking every node's chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditReport {
    /// Events checked.
    pub checked: u64,
    /// Chains (nodes) checked.
    pub nodes: u64,
    /// The first broken place, with its node; `None` when every chain is intact.
    pub broken: Option<(String, keygate_core::ChainBreak)>,
}

/// Walks every node's chain from its first event to its recorded head (as read when the walk
/// starts: events shipped meanwhile are left for the next run), in pages, and reports the
/// first event that was changed, inserted or is missing. The head moves in the same
/// transaction as the events, so a deleted tail shows as missing against it, and a last event
/// re-hashed to hide a change no longer matches the head's hash.
pub async fn verify_audit(store: &dyn crate::Store) -> crate::Result<AuditReport> {
    let mut report = AuditReport {
        checked: 0,
        nodes: 0,
        broken: None,
    };
    for (node, head_seq, head_hash) in store.audit_heads().await? {
        report.nodes += 1;
        let (mut seq, mut hash) = (0, keygate_core::audit::GENESIS.to_owned());
        while seq < head_seq {
            let mut page = store.audit_chain(&node, seq, 1_000).await?;
            page.retain(|e| e.seq <= head_seq);
            if page.is_empty() {
                break;
            }
            match keygate_core::verify_chain((seq, &hash), &page) {
                Ok((s, h)) => {
                    report.checked += page.len() as u64;
                    (seq, hash) = (s, h);
                }
                Err(b) => {
                    report.broken = Some((node, b));
                    return Ok(report);
                }
            }
        }
        let problem = if seq < head_seq {
            Some((seq + 1, keygate_core::ChainProblem::Missing))
        } else if hash != head_hash {
            Some((head_seq, keygate_core::ChainProblem::Changed))
        } else {
            None
        };
        if let Some((seq, problem)) = problem {
            report.broken = Some((node, keygate_core::ChainBreak { seq, problem }));
            return Ok(report);
        }
    }
    Ok(report)
}

//! Alerts and key sightings: one implementation for both backends (see `audit.rs`).

use crate::sql::Sql;
use crate::{Alert, KeyRecord, PageRequest};
use sqlx::any::AnyRow;
use sqlx::Row;

fn alert_from(r: &AnyRow) -> crate::Result<Alert> {
    Ok(Alert {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        key_id: r.try_get("key_id")?,
        kind: r.try_get("kind")?,
        dedupe: r.try_get("dedupe")?,
        message: r.try_get("message")?,
        data: r.try_get("data")?,
        at_ms: r.try_get("at")?,
    })
}

#[async_trait::async_trait]
impl crate::AlertStore for crate::SqlStore {
    async fn insert_alert(&self, a: &Alert) -> crate::Result<bool> {
        let mut q = Sql::new(
            "INSERT INTO alerts (id, tenant_id, key_id, kind, dedupe, message, data, at) ",
        );
        q.push_values([()], |mut b, ()| {
            b.push_bind(&a.id)
                .push_bind(&a.tenant_id)
                .push_bind(&a.key_id)
                .push_bind(&a.kind)
                .push_bind(&a.dedupe)
                .push_bind(&a.message)
                .push_bind(&a.data)
                .push_bind(a.at_ms);
        });
        q.push(" ON CONFLICT (dedupe) DO NOTHING");
        Ok(q.build()?.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn list_alerts(
        &self,
        tenant_id: Option<&str>,
        page: &PageRequest,
    ) -> crate::Result<Vec<Alert>> {
        let mut q = Sql::new("SELECT * FROM alerts WHERE 1 = 1");
        if let Some(t) = tenant_id {
            q.push(" AND tenant_id = ").push_bind(t);
        }
        q.page("id", page);
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(alert_from).collect()
    }

    async fn note_sighting(
        &self,
        key_id: &str,
        kind: &str,
        value: &str,
        at_ms: i64,
    ) -> crate::Result<Option<bool>> {
        let mut tx = self.begin_write().await?;
        let before: i64 = Sql::new("SELECT COUNT(*) FROM key_sightings WHERE key_id = ")
            .push_bind(key_id)
            .push(" AND kind = ")
            .push_bind(kind)
            .build_query_scalar()?
            .fetch_one(&mut *tx)
            .await?;
        let mut q = Sql::new("INSERT INTO key_sightings (key_id, kind, value, first_seen) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(key_id)
                .push_bind(kind)
                .push_bind(value)
                .push_bind(at_ms);
        });
        q.push(" ON CONFLICT (key_id, kind, value) DO NOTHING");
        let inserted = q.build()?.execute(&mut *tx).await?.rows_affected() == 1;
        tx.commit().await?;
        Ok(inserted.then_some(before > 0))
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> crate::Result<bool> {
        let mut q = Sql::new("INSERT INTO leases (name, holder, until) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(name).push_bind(holder).push_bind(until_ms);
        });
        q.push(" ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until WHERE leases.until < ")
            .push_bind(now_ms)
            .push(" OR leases.holder = ")
            .push_bind(holder);
        Ok(q.build()?.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn keys_due_for_rotation(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> crate::Result<Vec<KeyRecord>> {
        let mut q = Sql::new(
            "SELECT k.*, f.budget, f.spent FROM keys k JOIN key_families f ON f.id = k.family_id \
             WHERE k.status = 'active' AND k.rotated_to IS NULL AND k.rotation_days IS NOT NULL \
             AND k.created_at + k.rotation_days * 86400000 <= ",
        );
        q.push_bind(now_ms)
            .push(" AND (k.expires_at IS NULL OR k.expires_at > ")
            .push_bind(now_ms)
            .push(") ORDER BY k.created_at LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(crate::rows::key_from_row).collect()
    }

    async fn keys_expiring(&self, from_ms: i64, until_ms: i64) -> crate::Result<Vec<KeyRecord>> {
        let mut q = Sql::new(
            "SELECT k.*, f.budget, f.spent FROM keys k JOIN key_families f ON f.id = k.family_id \
             WHERE k.status = 'active' AND k.expires_at >= ",
        );
        q.push_bind(from_ms)
            .push(" AND k.expires_at < ")
            .push_bind(until_ms)
            .push(" ORDER BY k.expires_at LIMIT 1000");
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(crate::rows::key_from_row).collect()
    }
}

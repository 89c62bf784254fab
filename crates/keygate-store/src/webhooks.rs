//! Webhook endpoints and the delivery queue: one implementation for both backends (see
//! `audit.rs` for the pattern).

use crate::rows::{json_list, parse_list, to_u64};
use crate::sql::Sql;
use crate::{Delivery, PageRequest, WebhookEndpoint};
use sqlx::any::AnyRow;
use sqlx::Row;

const DELIVERY_COLUMNS: &str = "id, endpoint_id, tenant_id, event_id, event_type, payload, \
    attempts, status, next_at, last_status, last_error, created_at, delivered_at";

fn endpoint_from(r: &AnyRow) -> crate::Result<WebhookEndpoint> {
    let events: String = r.try_get("events")?;
    Ok(WebhookEndpoint {
        id: r.try_get("id")?,
        tenant_id: crate::rows::id(r, "tenant_id")?,
        url: r.try_get("url")?,
        secret: r.try_get("secret")?,
        events: parse_list(&events, "webhook events")?,
        enabled: r.try_get::<i64, _>("enabled")? != 0,
        disabled_reason: r.try_get("disabled_reason")?,
        created_at_ms: r.try_get("created_at")?,
    })
}

fn delivery_from(r: &AnyRow) -> crate::Result<Delivery> {
    Ok(Delivery {
        id: r.try_get("id")?,
        endpoint_id: r.try_get("endpoint_id")?,
        tenant_id: r.try_get("tenant_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        payload: r.try_get("payload")?,
        attempts: u32::try_from(to_u64(r.try_get("attempts")?)).unwrap_or(u32::MAX),
        status: r.try_get("status")?,
        next_at_ms: r.try_get("next_at")?,
        last_status: r.try_get("last_status")?,
        last_error: r.try_get("last_error")?,
        created_at_ms: r.try_get("created_at")?,
        delivered_at_ms: r.try_get("delivered_at")?,
    })
}

#[async_trait::async_trait]
impl crate::WebhookStore for crate::SqlStore {
    async fn insert_webhook(&self, w: &WebhookEndpoint) -> crate::Result<()> {
        let mut q = Sql::new(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, events, enabled, \
             disabled_reason, created_at) ",
        );
        q.push_values([()], |mut b, ()| {
            b.push_bind(&w.id)
                .push_bind(w.tenant_id.as_str())
                .push_bind(&w.url)
                .push_bind(&w.secret)
                .push_bind(json_list(w.events.clone()))
                .push_bind(i64::from(w.enabled))
                .push_bind(&w.disabled_reason)
                .push_bind(w.created_at_ms);
        });
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn list_webhooks(
        &self,
        tenant_id: &keygate_core::TenantId,
        page: &PageRequest,
    ) -> crate::Result<Vec<WebhookEndpoint>> {
        let mut q = Sql::new("SELECT * FROM webhook_endpoints WHERE tenant_id = ");
        q.push_bind(tenant_id.as_str());
        q.page("id", page);
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(endpoint_from).collect()
    }

    async fn get_webhook(&self, id: &str) -> crate::Result<Option<WebhookEndpoint>> {
        self.row_where(
            "SELECT * FROM webhook_endpoints WHERE id = $1",
            id,
            endpoint_from,
        )
        .await
    }

    async fn delete_webhook(&self, id: &str) -> crate::Result<bool> {
        let mut tx = self.begin_write().await?;
        Sql::new(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = 'endpoint deleted' \
             WHERE status = 'pending' AND endpoint_id = ",
        )
        .push_bind(id)
        .build()?
        .execute(&mut *tx)
        .await?;
        let r = Sql::new("DELETE FROM webhook_endpoints WHERE id = ")
            .push_bind(id)
            .build()?
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_webhook_enabled(
        &self,
        id: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> crate::Result<bool> {
        let r = Sql::new("UPDATE webhook_endpoints SET enabled = ")
            .push_bind(i64::from(enabled))
            .push(", disabled_reason = ")
            .push_bind(reason.map(str::to_owned))
            .push(" WHERE id = ")
            .push_bind(id)
            .build()?
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn enqueue_deliveries(&self, ds: &[Delivery]) -> crate::Result<()> {
        if ds.is_empty() {
            return Ok(());
        }
        let mut q = Sql::new(format!(
            "INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS}) "
        ));
        q.push_values(ds.iter(), |mut b, d| {
            b.push_bind(&d.id)
                .push_bind(&d.endpoint_id)
                .push_bind(&d.tenant_id)
                .push_bind(&d.event_id)
                .push_bind(&d.event_type)
                .push_bind(&d.payload)
                .push_bind(i64::from(d.attempts))
                .push_bind(&d.status)
                .push_bind(d.next_at_ms)
                .push_bind(d.last_status)
                .push_bind(&d.last_error)
                .push_bind(d.created_at_ms)
                .push_bind(d.delivered_at_ms);
        });
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> crate::Result<Vec<Delivery>> {
        let mut q = Sql::new(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE status = 'pending' AND next_at <= "
        ));
        q.push_bind(now_ms)
            .push(" ORDER BY next_at LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build()?.fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for d in rows.iter().map(delivery_from) {
            let mut d = d?;
            // Claimed only if no other node moved it first.
            let r = Sql::new("UPDATE webhook_deliveries SET next_at = ")
                .push_bind(lease_until_ms)
                .push(" WHERE id = ")
                .push_bind(&d.id)
                .push(" AND status = 'pending' AND next_at = ")
                .push_bind(d.next_at_ms)
                .build()?
                .execute(&self.pool)
                .await?;
            if r.rows_affected() == 1 {
                d.next_at_ms = lease_until_ms;
                out.push(d);
            }
        }
        Ok(out)
    }

    async fn finish_delivery(&self, d: &Delivery, claimed_until_ms: i64) -> crate::Result<bool> {
        let r = Sql::new("UPDATE webhook_deliveries SET attempts = ")
            .push_bind(i64::from(d.attempts))
            .push(", status = ")
            .push_bind(&d.status)
            .push(", next_at = ")
            .push_bind(d.next_at_ms)
            .push(", last_status = ")
            .push_bind(d.last_status)
            .push(", last_error = ")
            .push_bind(&d.last_error)
            .push(", delivered_at = ")
            .push_bind(d.delivered_at_ms)
            .push(" WHERE id = ")
            .push_bind(&d.id)
            .push(" AND status = 'pending' AND next_at = ")
            .push_bind(claimed_until_ms)
            .build()?
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn list_deliveries(
        &self,
        endpoint_id: &str,
        page: &PageRequest,
    ) -> crate::Result<Vec<Delivery>> {
        let mut q = Sql::new(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = "
        ));
        q.push_bind(endpoint_id);
        q.page("id", page);
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(delivery_from).collect()
    }
}

//! The audit log (crate `keygate-audit`) in this server: the store as its sink, and the
//! shipper's loop, under supervision, feeding the alert rules.

pub use keygate_audit::*;
use keygate_store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The store as the audit log's [`Sink`].
#[derive(Debug, Clone, Copy)]
pub struct StoreSink<'a>(pub &'a dyn Store);

#[async_trait::async_trait]
impl Sink for StoreSink<'_> {
    async fn heads(&self) -> Result<Vec<(String, i64, String)>, String> {
        self.0.audit_heads().await.map_err(|e| e.to_string())
    }

    async fn append_lines(&self, events: &[RawEvent<'_>]) -> Result<BTreeMap<String, i64>, String> {
        self.0
            .append_audit_lines(events)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The shipper's name under supervision (`crate::supervisor`).
pub const SHIPPER_TASK: &str = "audit-shipper";

/// Ships every `every` until `stop` fires, then once more (shutdown flush). Each batch's new
/// events go, summarized, to `alerts` (a full channel drops the summary).
pub async fn run_shipper(
    log: Arc<AuditLog>,
    store: Arc<dyn Store>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    alerts: Option<tokio::sync::mpsc::Sender<Vec<crate::alerts::Seen>>>,
) {
    let mut shipper = Shipper::new(alerts.map(|tx| -> Observer {
        Box::new(move |fresh| {
            let _ = tx.try_send(crate::alerts::summarize(fresh));
        })
    }));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        crate::supervisor::checkpoint(SHIPPER_TASK);
        if let Err(e) = shipper.ship(&log, &StoreSink(&*store)).await {
            // The segments keep everything; the next tick tries again.
            tracing::warn!("audit events not shipped yet: {e}");
        }
        if stopping {
            return;
        }
    }
}

//! The background tasks of a node, started together and stopped in order: the change feed,
//! webhook deliveries, OAuth signing keys, automatic rotation, trials ending, alerts, the audit shipper and
//! the sweeper. Every one runs under [`supervise`]: a panic is logged and the task starts
//! again, made afresh from what its closure holds.

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::supervisor::supervise;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The running background tasks of one engine.
#[derive(Debug)]
pub struct Background {
    engine: Arc<Engine>,
    changes: JoinHandle<()>,
    deliveries: JoinHandle<()>,
    signing_keys: JoinHandle<()>,
    rotation: JoinHandle<()>,
    plans: JoinHandle<()>,
    alerts: JoinHandle<()>,
    shipper: Option<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
    stop_audit: tokio::sync::watch::Sender<bool>,
}

impl Background {
    /// Starts every task.
    pub fn start(engine: &Arc<Engine>) -> Self {
        // Every background task runs under `supervise`: a panic is logged and the task starts
        // again. Each is made afresh from what its closure holds.
        let changes = {
            let s = engine.clone();
            supervise("change-feed", move || {
                crate::engine::run_change_listener(s.clone())
            })
        };
        let (stop_audit, audit_stopped) = tokio::sync::watch::channel(false);
        let deliveries = {
            let (s, stop) = (engine.clone(), audit_stopped.clone());
            supervise(crate::webhooks::DELIVERIES_TASK, move || {
                crate::webhooks::run_deliveries(s.clone(), stop.clone())
            })
        };
        let signing_keys = {
            let (s, stop) = (engine.clone(), audit_stopped.clone());
            supervise(crate::oauth::SIGNING_KEYS_TASK, move || {
                crate::oauth::run_signing_keys(s.clone(), stop.clone())
            })
        };
        let rotation = {
            let (s, stop) = (engine.clone(), audit_stopped.clone());
            supervise(crate::rotation::ROTATION_TASK, move || {
                crate::rotation::run_rotation(s.clone(), stop.clone())
            })
        };
        let plans = {
            let (s, stop) = (engine.clone(), audit_stopped.clone());
            supervise(crate::accounts::PLANS_TASK, move || {
                crate::accounts::run_plans(s.clone(), stop.clone())
            })
        };
        let (alert_tx, alert_rx) = mpsc::channel(64);
        let alerts = {
            let (s, stop) = (engine.clone(), audit_stopped.clone());
            let rx = Arc::new(tokio::sync::Mutex::new(alert_rx));
            supervise(crate::alerts::ALERTS_TASK, move || {
                crate::alerts::run_alerts(s.clone(), Arc::clone(&rx), stop.clone())
            })
        };
        let shipper = engine.audit.clone().map(|log| {
            let store = engine.store.clone();
            let every = Duration::from_millis(engine.config.audit.ship_interval_ms.max(10));
            // A restarted shipper starts from the stored heads, so nothing is shipped twice.
            supervise(crate::audit::SHIPPER_TASK, move || {
                crate::audit::run_shipper(
                    log.clone(),
                    store.clone(),
                    every,
                    audit_stopped.clone(),
                    Some(alert_tx.clone()),
                )
            })
        });
        let sweeper = {
            let s = engine.clone();
            supervise("sweeper", move || {
                let s = s.clone();
                async move {
                    let mut t = tokio::time::interval(Duration::from_secs(60));
                    for minute in 0u64.. {
                        t.tick().await;
                        s.counters.sweep(now_ms(), 86_400_000);
                        if minute % 60 == 0 {
                            let days = i64::try_from(s.config.audit.usage_retention_days)
                                .unwrap_or(i64::MAX / 86_400_000 - 1);
                            let before = now_ms().saturating_sub(days.saturating_mul(86_400_000));
                            if let Err(e) = s.store.prune_usage(before).await {
                                tracing::warn!("could not prune old usage: {e}");
                            }
                            let forget = i64::try_from(s.config.login.forget_after_seconds)
                                .unwrap_or(i64::MAX / 1000)
                                .saturating_mul(1000);
                            if let Err(e) = s
                                .store
                                .prune_login_throttles(now_ms().saturating_sub(forget))
                                .await
                            {
                                tracing::warn!("could not prune old sign-in failures: {e}");
                            }
                            // Used links are kept until they expire, then forgotten.
                            if let Err(e) = s.store.prune_email_tokens(now_ms()).await {
                                tracing::warn!("could not prune expired email links: {e}");
                            }
                        }
                    }
                }
            })
        };
        Background {
            engine: engine.clone(),
            changes,
            deliveries,
            signing_keys,
            rotation,
            plans,
            alerts,
            shipper,
            sweeper,
            stop_audit,
        }
    }

    /// Stops every task once the node serves no more requests: what the audit log holds is
    /// shipped, unspent credit leases go back.
    pub async fn stop(self) {
        self.sweeper.abort();
        self.changes.abort();
        // Every answered request is in a segment; ship what is left before going away.
        let _ = self.stop_audit.send(true);
        // A delivery in flight is abandoned; its claim runs out and it is sent again later.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.deliveries).await;
        if let Some(s) = self.shipper {
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
        // Both stop at the signal; a rotation under way finishes its writes first.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.rotation).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.plans).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.alerts).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.signing_keys).await;
        if let Err(e) = self.engine.counters.flush().await {
            tracing::error!("could not return credit leases on shutdown: {e}");
        }
    }
}

//! Prometheus metrics (`GET /metrics`): decisions by code, decision latency, cache hits and
//! misses, store and Redis trouble. Counter handles are registered once, so the hot path
//! pays an atomic add, not a registry lookup.

use keygate_core::Code;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Every code gets its counter, in `Code::ALL` order.
const CODES: [Code; 17] = Code::ALL;

/// The metric handles of this process.
#[derive(Debug)]
pub struct Metrics {
    decisions: Vec<Counter>,
    /// Time to decide, seconds (parse to counters, not the upstream).
    pub decision_seconds: Histogram,
    /// Key lookups answered from the cache.
    pub cache_hits: Counter,
    /// Key lookups that went to the store.
    pub cache_misses: Counter,
    /// Store calls that failed on the decision path.
    pub store_errors: Counter,
    /// Decisions that needed Redis while it was unreachable.
    pub redis_errors: Counter,
    /// 1 while Redis answers (when configured).
    pub redis_up: Gauge,
    /// 1 while the change feed from other nodes is connected.
    pub change_feed_up: Gauge,
    /// Refusals counted here instead of written to the audit log (over
    /// `audit.keyless_per_ip_per_minute` for their client network, or
    /// `audit.refusals_per_key_per_minute` for their key).
    pub audit_refusals_dropped: Counter,
    tick: std::sync::atomic::AtomicU64,
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (several apps in one test process share it).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

impl Metrics {
    /// Registers every metric (installing the recorder if needed).
    pub fn new() -> Self {
        let _ = handle();
        Metrics {
            decisions: CODES
                .iter()
                .map(|c| metrics::counter!("keygate_decisions_total", "code" => c.as_str()))
                .collect(),
            decision_seconds: metrics::histogram!("keygate_decision_seconds"),
            cache_hits: metrics::counter!("keygate_key_cache_hits_total"),
            cache_misses: metrics::counter!("keygate_key_cache_misses_total"),
            store_errors: metrics::counter!("keygate_store_errors_total"),
            redis_errors: metrics::counter!("keygate_redis_errors_total"),
            redis_up: metrics::gauge!("keygate_redis_up"),
            change_feed_up: metrics::gauge!("keygate_change_feed_up"),
            audit_refusals_dropped: metrics::counter!("keygate_audit_refusals_dropped_total"),
            tick: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether this decision's latency is recorded (one in 32).
    pub fn sample(&self) -> bool {
        self.tick
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(32)
    }

    /// Counts one decision.
    pub fn decided(&self, code: Code) {
        if let Some(i) = CODES.iter().position(|c| *c == code) {
            self.decisions[i].increment(1);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

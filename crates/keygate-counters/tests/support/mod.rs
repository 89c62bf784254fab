//! What the counters tests share: a real SQLite store in a temporary directory (opened as
//! `keygate-store/tests/store.rs` opens one), tenants and keys in it, and the store's balances
//! as a user would read them.
#![allow(dead_code)] // each test file uses its own part of this module

use keygate_core::{Charge, KeyHash, KeyStatus, Kind, RateLimit};
use keygate_store::{KeyRecord, SqlStore, Store, Tenant};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The start of a 60-second (and 10-second) fixed window, in Unix milliseconds.
pub const T0: i64 = 1_700_000_040_000;

/// A fresh SQLite store in its own temporary directory.
pub struct Db {
    pub store: Arc<dyn Store>,
    pool: sqlx::AnyPool,
    _dir: tempfile::TempDir,
}

impl Db {
    pub async fn open() -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the SQLite store");
        let sqlite = SqlStore::sqlite(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .expect("open the SQLite store");
        sqlite.migrate().await.expect("migrate the SQLite store");
        let pool = sqlite.pool().clone();
        Self {
            store: Arc::new(sqlite),
            pool,
            _dir: dir,
        }
    }

    /// A tenant whose pool holds `credits` (`None`: unlimited).
    pub async fn tenant(&self, id: &str, credits: Option<u64>) {
        self.store
            .insert_tenant(&Tenant {
                id: id.into(),
                name: id.into(),
                plan: "free".into(),
                credits,
                created_at_ms: 1,
                plan_started_at_ms: 1,
                trial_ends_at_ms: None,
                refilled_months: 0,
                verified: true,
            })
            .await
            .expect("insert tenant");
    }

    /// A key that starts its own family `id` (so the family id is the key id).
    pub async fn key(&self, id: &str, tenant: &str, budget: Option<u64>) {
        static SEED: AtomicU64 = AtomicU64::new(1);
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&SEED.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        self.store
            .insert_key(&KeyRecord {
                id: id.into(),
                family_id: id.into(),
                tenant_id: tenant.into(),
                user_id: None,
                kind: Kind::Sk,
                name: format!("name {id}"),
                hash: KeyHash(hash),
                display: "kg_sk_test".into(),
                scopes: Default::default(),
                allowed_ips: Default::default(),
                allowed_origins: Default::default(),
                rate_limit: None,
                budget,
                budget_withdrawn: 0,
                expires_at_ms: None,
                rotation_days: None,
                metadata: Default::default(),
                status: KeyStatus::Active,
                rotated_from: None,
                rotated_to: None,
                created_at_ms: 10,
                updated_at_ms: 10,
                last_used_at_ms: None,
                revoked_at_ms: None,
            })
            .await
            .expect("insert key");
    }

    /// Credits the store counts as withdrawn from family `id`'s budget (spent or leased).
    pub async fn spent(&self, id: &str) -> u64 {
        self.store
            .get_key(&id.into())
            .await
            .expect("get key")
            .expect("the key exists")
            .budget_withdrawn
    }

    /// Credits the store holds in tenant `id`'s pool (`None`: unlimited).
    pub async fn credits(&self, id: &str) -> Option<u64> {
        self.store
            .get_tenant(&id.into())
            .await
            .expect("get tenant")
            .expect("the tenant exists")
            .credits
    }

    /// Changes key `id`'s budget the way `PATCH /v1/keys/{id}` does.
    pub async fn set_budget(&self, id: &str, budget: u64) {
        let mut k = self
            .store
            .get_key(&id.into())
            .await
            .expect("get key")
            .expect("the key exists");
        let expected = k.updated_at_ms;
        k.budget = Some(budget);
        k.updated_at_ms += 1;
        assert!(
            self.store
                .update_key(&k, expected)
                .await
                .expect("update key"),
            "the budget change is written"
        );
    }

    /// A plan change: the tenant's pool becomes `credits` (the Store trait has no call that
    /// turns an unlimited pool into a limited one, so this is raw SQL).
    pub async fn set_credits(&self, id: &str, credits: Option<u64>) {
        let n = sqlx::query("UPDATE tenants SET credits = $1 WHERE id = $2")
            .bind(credits.map(|c| i64::try_from(c).expect("credits fit an i64")))
            .bind(id)
            .execute(&self.pool)
            .await
            .expect("update tenant")
            .rows_affected();
        assert_eq!(n, 1, "tenant {id} exists");
    }
}

/// A charge of `cost` credits against a key with `budget` (`None`: no budget) and no limit.
pub fn charge(budget: Option<u64>, cost: u64) -> Charge {
    Charge {
        rate_limit: None,
        budget,
        cost,
    }
}

/// A charge with a rate limit of `limit` calls per `window_seconds`.
pub fn limited(limit: u32, window_seconds: u32, budget: Option<u64>, cost: u64) -> Charge {
    Charge {
        rate_limit: Some(RateLimit {
            limit,
            window_seconds,
        }),
        budget,
        cost,
    }
}

/// An id no other test (in this process or another) uses: tests share Redis.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{tag}_{}_{}_{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

//! The store suite, run against both backends: every test runs once on a fresh SQLite file and
//! once on a fresh PostgreSQL schema (127.0.0.1:5432, or `KEYGATE_TEST_POSTGRES_URL`).
//! PostgreSQL is required: without it these tests fail and say so.

use keygate_core::access::Role;
use keygate_core::audit::{event_id, hex, line_hash, unhex, GENESIS};
use keygate_core::{
    AuditEvent, ChainProblem, IpAllowList, KeyHash, KeyStatus, Kind, OriginList, ScopeSet,
};
use keygate_store::{
    verify_audit, AuditFilter, EmailPurpose, EmailToken, KeyFilter, KeyRecord, PageRequest,
    PlanStart, RawEvent, SqlStore, Store, StoreErrorKind, Tenant, TenantChange, UsageOf, UsageRow,
    User, Withdrawal, CHAIN_TAGGED,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn pg_url() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Direct SQL on the database behind a store (to play the attacker who edits rows).
#[derive(Clone)]
struct Raw {
    pool: sqlx::AnyPool,
    /// The PostgreSQL schema's URL, to open more stores on it; `None` on SQLite.
    pg_url: Option<String>,
}

impl Raw {
    /// A column of node `n1`'s block that starts at `first_seq`.
    async fn column(&self, col: &str, first_seq: i64) -> Vec<u8> {
        let sql =
            format!("SELECT {col} FROM audit_blocks WHERE node = 'n1' AND first_seq = {first_seq}");
        sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .expect("block column")
    }

    /// Overwrites that column; returns how many rows changed.
    async fn set_column(&self, col: &str, first_seq: i64, bytes: &[u8]) -> u64 {
        let sql =
            format!("UPDATE audit_blocks SET {col} = $1 WHERE node = 'n1' AND first_seq = $2");
        sqlx::query(&sql)
            .bind(bytes)
            .bind(first_seq)
            .execute(&self.pool)
            .await
            .expect("sql")
            .rows_affected()
    }

    /// The events of that block, as text.
    async fn block(&self, first_seq: i64) -> String {
        let bytes = self.column("events", first_seq).await;
        String::from_utf8(keygate_store::block_text(&bytes).expect("lz4")).expect("utf8")
    }

    /// Overwrites that block's events.
    async fn set_block(&self, first_seq: i64, text: &str) -> u64 {
        let bytes = keygate_store::stored_block(text.as_bytes());
        self.set_column("events", first_seq, &bytes).await
    }

    /// The hashes of that block (`chain`).
    async fn chain(&self, first_seq: i64) -> Vec<u8> {
        self.column("chain", first_seq).await
    }

    /// Overwrites that block's hashes.
    async fn set_chain(&self, first_seq: i64, chain: &[u8]) {
        assert_eq!(self.set_column("chain", first_seq, chain).await, 1);
    }

    async fn exec(&self, sql: &str) -> u64 {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .expect("sql")
            .rows_affected()
    }
}

/// Runs `body` against a fresh SQLite store and a fresh PostgreSQL schema.
async fn on_both<F, Fut>(body: F)
where
    F: Fn(Arc<dyn Store>, Raw) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqlStore::sqlite(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .expect("sqlite");
    sqlite.migrate().await.expect("migrate sqlite");
    let raw = Raw {
        pool: sqlite.pool().clone(),
        pg_url: None,
    };
    body(Arc::new(sqlite), raw).await;

    static N: AtomicU64 = AtomicU64::new(0);
    let schema = format!(
        "kg_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {} is required for the store suite ({e}); bash scripts/services.sh starts it", pg_url())
    });
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("create schema");
    let base = pg_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let pg = SqlStore::postgres(&url, 8, std::time::Duration::from_secs(5))
        .await
        .expect("pool");
    pg.migrate().await.expect("migrate postgres");
    let raw = Raw {
        pool: pg.pool().clone(),
        pg_url: Some(url),
    };
    body(Arc::new(pg), raw.clone()).await;
    raw.pool.close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .expect("drop schema");
}

fn tenant(id: &str, credits: Option<u64>) -> Tenant {
    Tenant {
        id: id.into(),
        name: id.into(),
        plan: "free".into(),
        credits,
        created_at_ms: 1,
        plan_started_at_ms: 1,
        trial_ends_at_ms: None,
        refilled_months: 0,
        verified: true,
    }
}

fn key(id: &str, tenant: &str, kind: Kind, budget: Option<u64>, seed: u8) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        family_id: id.into(),
        tenant_id: tenant.into(),
        user_id: None,
        kind,
        name: format!("name {id}"),
        hash: KeyHash([seed; 32]),
        display: "kg_sk_abcd".into(),
        scopes: ScopeSet::parse(&["ocr:read", "docs:read"]).expect("scopes"),
        allowed_ips: IpAllowList::parse(&["10.0.0.0/8", "2001:db8::/32"]).expect("ips"),
        allowed_origins: OriginList::parse(&["https://*.example.com"]).expect("origins"),
        rate_limit: Some(keygate_core::RateLimit {
            limit: 5,
            window_seconds: 60,
        }),
        budget,
        budget_withdrawn: 0,
        expires_at_ms: Some(9_000_000_000_000),
        rotation_days: Some(30),
        metadata: serde_json::from_str(r#"{"team":"ocr","n":[1,2]}"#).expect("json"),
        status: KeyStatus::Active,
        rotated_from: None,
        rotated_to: None,
        created_at_ms: 10,
        updated_at_ms: 10,
        last_used_at_ms: None,
        revoked_at_ms: None,
    }
}

/// A public OAuth client `cli_1` of tenant `default`.
fn portal() -> keygate_store::OAuthClient {
    keygate_store::OAuthClient {
        id: "cli_1".into(),
        tenant_id: "default".into(),
        name: "Portal".into(),
        client_type: "public".into(),
        secret_hash: None,
        redirect_uris: vec!["https://a.example/cb".into()],
        scopes: vec!["docs:read".into()],
        created_at_ms: 1,
    }
}

fn page(limit: u32, cursor: Option<&str>) -> PageRequest {
    PageRequest {
        cursor: cursor.map(Into::into),
        limit,
    }
}

#[tokio::test]
async fn tenants_and_users_round_trip() {
    on_both(|s, _| async move {
        s.insert_tenant(&tenant("t_a", Some(10)))
            .await
            .expect("insert");
        s.insert_tenant(&tenant("t_b", None)).await.expect("insert");
        let dup = s
            .insert_tenant(&tenant("t_a", None))
            .await
            .expect_err("duplicate");
        assert_eq!(dup.kind, StoreErrorKind::Conflict);
        assert_eq!(
            s.get_tenant(&"t_a".into()).await.expect("get"),
            Some(tenant("t_a", Some(10)))
        );
        assert_eq!(s.get_tenant(&"nope".into()).await.expect("get"), None);
        let first = s.list_tenants(&page(1, None)).await.expect("list");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].id, "t_b");
        let rest = s.list_tenants(&page(10, Some("t_b"))).await.expect("list");
        assert_eq!(
            rest.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            vec!["t_a"]
        );
        assert_eq!(
            s.add_tenant_credits(&"t_a".into(), 5)
                .await
                .expect("add")
                .and_then(|t| t.credits),
            Some(15)
        );
        assert_eq!(
            s.add_tenant_credits(&"t_b".into(), 5)
                .await
                .expect("add")
                .map(|t| t.credits),
            Some(None)
        );
        assert!(
            s.add_tenant_credits(&"t_a".into(), 1_000_000_000_000_000)
                .await
                .expect("add")
                .is_none(),
            "cap"
        );

        let u = User {
            id: "usr_1".into(),
            tenant_id: "t_a".into(),
            email: "a@example.com".into(),
            name: Some("A".into()),
            plan: "free".into(),
            password_hash: Some("$argon2id$…".into()),
            created_at_ms: 3,
            role: Role::Owner,
            verified: false,
            sessions_from_ms: 0,
            removed_at_ms: None,
        };
        s.insert_user(&u).await.expect("user");
        let dup = s
            .insert_user(&User {
                id: "usr_2".into(),
                ..u.clone()
            })
            .await
            .expect_err("same email");
        assert_eq!(dup.kind, StoreErrorKind::Conflict);
        assert_eq!(
            s.get_user(&"usr_1".into()).await.expect("get"),
            Some(u.clone())
        );
        assert_eq!(
            s.list_users(&"t_a".into(), &page(10, None))
                .await
                .expect("list"),
            vec![u]
        );
        assert!(s
            .list_users(&"t_b".into(), &page(10, None))
            .await
            .expect("list")
            .is_empty());
    })
    .await;
}

#[tokio::test]
async fn keys_round_trip_filter_and_change_safely() {
    on_both(|s, _| async move {
        s.insert_tenant(&tenant("t_a", None)).await.expect("tenant");
        s.insert_tenant(&tenant("t_b", None)).await.expect("tenant");
        let k1 = key("key_1", "t_a", Kind::Sk, Some(50), 1);
        let k2 = key("key_2", "t_a", Kind::Pk, None, 2);
        let k3 = key("key_3", "t_b", Kind::Sk, None, 3);
        for k in [&k1, &k2, &k3] {
            s.insert_key(k).await.expect("insert");
        }
        let dup = s
            .insert_key(&key("key_4", "t_a", Kind::Sk, None, 1))
            .await
            .expect_err("same hash");
        assert_eq!(dup.kind, StoreErrorKind::Conflict);
        assert_eq!(
            s.get_key(&"key_1".into()).await.expect("get"),
            Some(k1.clone())
        );
        assert_eq!(
            s.get_key_by_hash(&KeyHash([2; 32])).await.expect("get"),
            Some(k2.clone())
        );
        assert_eq!(
            s.get_key_by_hash(&KeyHash([9; 32])).await.expect("get"),
            None
        );
        assert_eq!(s.count_keys().await.expect("count"), 3);
        let f = |t: &str| KeyFilter {
            tenant_id: Some(t.into()),
            ..KeyFilter::default()
        };
        assert_eq!(
            s.list_keys(&f("t_a"), &page(10, None))
                .await
                .expect("list")
                .len(),
            2
        );
        let pks = KeyFilter {
            kind: Some(Kind::Pk),
            ..f("t_a")
        };
        assert_eq!(
            s.list_keys(&pks, &page(10, None)).await.expect("list"),
            vec![k2.clone()]
        );
        let named = KeyFilter {
            name_contains: Some("NAME KEY_1".into()),
            ..f("t_a")
        };
        assert_eq!(
            s.list_keys(&named, &page(10, None))
                .await
                .expect("list")
                .len(),
            1
        );
        // `%`, `_` and `\` in a search are characters, not patterns.
        for literal in ["KEY%1", "E_K", "key\\", "%"] {
            let named = KeyFilter {
                name_contains: Some(literal.into()),
                ..f("t_a")
            };
            assert_eq!(
                s.list_keys(&named, &page(10, None)).await.expect("list"),
                vec![],
                "{literal}"
            );
        }
        let paged = s
            .list_keys(&f("t_a"), &page(1, Some("key_2")))
            .await
            .expect("list");
        assert_eq!(
            paged.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            vec!["key_1"]
        );

        // Optimistic update: a stale read loses; status is never written by an update.
        let mut changed = k1.clone();
        changed.name = "renamed".into();
        changed.budget = Some(70);
        changed.updated_at_ms = 20;
        changed.status = KeyStatus::Revoked;
        assert!(s.update_key(&changed, 10).await.expect("update"));
        assert!(!s.update_key(&changed, 10).await.expect("stale update"));
        let now = s
            .get_key(&"key_1".into())
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(now.name, "renamed");
        assert_eq!(now.budget, Some(70));
        assert_eq!(now.status, KeyStatus::Active);

        // Rotation: one successor, same family, old key in grace until the given time.
        let mut succ = key("key_5", "t_a", Kind::Sk, Some(70), 5);
        succ.family_id = "key_1".into();
        succ.rotated_from = Some("key_1".into());
        assert!(s
            .rotate_key(&"key_1".into(), 5_000, &succ)
            .await
            .expect("rotate"));
        let mut again = key("key_6", "t_a", Kind::Sk, None, 6);
        again.family_id = "key_1".into();
        assert!(!s
            .rotate_key(&"key_1".into(), 5_000, &again)
            .await
            .expect("second rotate"));
        let old = s
            .get_key(&"key_1".into())
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            (old.status, old.expires_at_ms, old.rotated_to.as_deref()),
            (KeyStatus::Grace, Some(5_000), Some("key_5"))
        );
        let new = s
            .get_key(&"key_5".into())
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(new.budget, Some(70), "the family shares the budget");

        // Revoke wins over a later update.
        let revoked = s
            .revoke_key(&"key_2".into(), 30)
            .await
            .expect("revoke")
            .expect("exists");
        assert_eq!(revoked.status, KeyStatus::Revoked);
        assert_eq!(revoked.revoked_at_ms, Some(30));
        let mut late = revoked.clone();
        late.name = "late".into();
        assert!(!s
            .update_key(&late, revoked.updated_at_ms)
            .await
            .expect("update"));
        s.touch_keys(&[("key_3".into(), 99), ("key_3".into(), 50)])
            .await
            .expect("touch");
        assert_eq!(
            s.get_key(&"key_3".into())
                .await
                .expect("get")
                .and_then(|k| k.last_used_at_ms),
            Some(99)
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_withdrawals_never_overspend() {
    on_both(|s, _| async move {
        s.insert_tenant(&tenant("t_pool", Some(100)))
            .await
            .expect("tenant");
        s.insert_tenant(&tenant("t_free", None))
            .await
            .expect("tenant");
        s.insert_key(&key("key_b", "t_pool", Kind::Sk, Some(100), 1))
            .await
            .expect("key");
        s.insert_key(&key("key_u", "t_pool", Kind::Sk, None, 2))
            .await
            .expect("key");
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let b = s
                    .withdraw_budget(&"key_b".into(), 3)
                    .await
                    .expect("withdraw")
                    .granted;
                let c = match s
                    .withdraw_credits(&"t_pool".into(), 3)
                    .await
                    .expect("withdraw")
                {
                    Withdrawal::Granted(g) => g.granted,
                    Withdrawal::Unlimited => panic!("limited pool"),
                };
                (b, c)
            }));
        }
        let (mut budget, mut credits) = (0, 0);
        for t in tasks {
            let (b, c) = t.await.expect("task");
            budget += b;
            credits += c;
        }
        assert_eq!(budget, 100, "exactly the budget, never more");
        assert_eq!(credits, 100, "exactly the pool, never more");
        assert_eq!(
            s.withdraw_budget(&"key_b".into(), 1)
                .await
                .expect("withdraw")
                .granted,
            0
        );
        s.refund_budget(&"key_b".into(), 4).await.expect("refund");
        let g = s
            .withdraw_budget(&"key_b".into(), 10)
            .await
            .expect("withdraw");
        assert_eq!((g.granted, g.remaining), (4, 0));
        let g = s
            .withdraw_budget(&"key_u".into(), 10)
            .await
            .expect("withdraw");
        assert_eq!(
            (g.granted, g.remaining),
            (10, u64::MAX),
            "no budget: nothing to count"
        );
        assert_eq!(
            s.withdraw_credits(&"t_free".into(), 10)
                .await
                .expect("withdraw"),
            Withdrawal::Unlimited
        );
        s.refund_credits(&"t_pool".into(), 7).await.expect("refund");
        assert_eq!(
            s.get_tenant(&"t_pool".into())
                .await
                .expect("get")
                .and_then(|t| t.credits),
            Some(7)
        );
    })
    .await;
}

fn decided(node: &str, seq: i64, prev: &str, key: &str, code: &str, at_ms: i64) -> AuditEvent {
    let mut e = AuditEvent {
        id: format!("evt_{at_ms:013}_{node}_{seq}"),
        node: node.into(),
        seq,
        at_ms,
        tenant_id: Some("t1".into()),
        actor: key.into(),
        action: "request.decided".into(),
        key_id: Some(key.into()),
        code: Some(code.into()),
        status: Some(200),
        credits: Some(if code == "VALID" { 5 } else { 0 }),
        ..AuditEvent::default()
    };
    e.seal(prev);
    e
}

/// `e` as a node's segment holds it: one line of JSON with every field but the id and hashes.
fn line_of(e: &AuditEvent) -> String {
    let mut v = serde_json::to_value(e).expect("json");
    let o = v.as_object_mut().expect("object");
    for k in ["id", "prev_hash", "hash"] {
        o.remove(k);
    }
    o.retain(|_, v| !v.is_null());
    v.to_string()
}

/// Appends `events` as segment lines, the shipper's way.
async fn append_lines(s: &dyn Store, events: &[AuditEvent]) {
    let lines: Vec<String> = events.iter().map(line_of).collect();
    let raw: Vec<RawEvent<'_>> = lines
        .iter()
        .map(|l| RawEvent {
            line: l.as_bytes(),
            head: serde_json::from_str(l).expect("head"),
        })
        .collect();
    s.append_audit_lines(&raw).await.expect("append lines");
}

/// `events` as the store lists them once appended as lines after the event hashed `prev`:
/// ids from their time and place, hashes chained over the lines.
fn as_listed(events: &[AuditEvent], prev: &str) -> Vec<AuditEvent> {
    let mut prev = unhex(prev).expect("a hash");
    events
        .iter()
        .map(|e| {
            let line = line_of(e);
            let hash = line_hash(&prev, line.as_bytes());
            let mut out: AuditEvent = serde_json::from_str(&line).expect("line");
            out.id = event_id(e.at_ms, e.seq, &e.node);
            (out.prev_hash, out.hash) = (hex(&prev), hex(&hash));
            out.line = Some(line);
            prev = hash;
            out
        })
        .collect()
}

/// The first `limit` events matching `f`, newest first.
async fn newest(s: &dyn Store, f: &AuditFilter, limit: u32) -> Vec<AuditEvent> {
    s.list_audit(
        f,
        &PageRequest {
            cursor: None,
            limit,
        },
    )
    .await
    .expect("list audit")
}

fn chain_of(node: &str, n: i64, t0: i64) -> Vec<AuditEvent> {
    let mut prev = keygate_core::audit::GENESIS.to_owned();
    (1..=n)
        .map(|seq| {
            let code = if seq % 3 == 0 {
                "RATE_LIMITED"
            } else {
                "VALID"
            };
            let e = decided(node, seq, &prev, "key_a", code, t0 + seq * 1_000);
            prev.clone_from(&e.hash);
            e
        })
        .collect()
}

async fn verify_all(s: &dyn Store, _node: &str) -> Result<u64, keygate_core::ChainBreak> {
    let r = verify_audit(s).await.expect("verify");
    match r.broken {
        Some((_, b)) => Err(b),
        None => Ok(r.checked),
    }
}

#[tokio::test]
async fn audit_events_append_once_list_and_roll_up_usage() {
    on_both(|s, _| async move {
        let t0 = 1_800_000_000_000; // a whole minute
        let c = chain_of("n1", 9, t0);
        s.append_audit(&c[..4]).await.expect("append");
        // A replay after a crash sends events that already arrived: they are skipped.
        s.append_audit(&c).await.expect("replay");
        let all = newest(s.as_ref(), &AuditFilter::default(), 100).await;
        assert_eq!(all.len(), 9, "each event once");
        assert_eq!(all[0].seq, 9, "newest first");
        assert_eq!(all[0], c[8], "every field round-trips");
        let page = s
            .list_audit(
                &AuditFilter::default(),
                &PageRequest {
                    cursor: Some(all[3].id.clone()),
                    limit: 100,
                },
            )
            .await
            .expect("page");
        assert_eq!(page.len(), 5);
        let limited = newest(
            s.as_ref(),
            &AuditFilter {
                code: Some("RATE_LIMITED".into()),
                ..AuditFilter::default()
            },
            100,
        )
        .await;
        assert_eq!(limited.len(), 3);
        let other = newest(
            s.as_ref(),
            &AuditFilter {
                tenant_id: Some("t2".into()),
                ..AuditFilter::default()
            },
            100,
        )
        .await;
        assert!(other.is_empty());
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 9);
        // Usage: 9 requests over seconds 1..9 of one minute: 6 VALID × 5 credits, 3 limited.
        let rows = s
            .usage(&UsageOf::Key("key_a".into()), 60_000, t0, t0 + 3_600_000)
            .await
            .expect("usage");
        assert_eq!(
            rows,
            vec![
                UsageRow {
                    bucket_ms: t0,
                    code: "RATE_LIMITED".into(),
                    requests: 3,
                    credits: 0
                },
                UsageRow {
                    bucket_ms: t0,
                    code: "VALID".into(),
                    requests: 6,
                    credits: 30
                },
            ]
        );
        let by_tenant = s
            .usage(&UsageOf::Tenant("t1".into()), 86_400_000, 0, i64::MAX)
            .await
            .expect("usage");
        assert_eq!(by_tenant.iter().map(|r| r.requests).sum::<u64>(), 9);
        assert_eq!(s.prune_usage(t0 + 60_000).await.expect("prune"), 2);
    })
    .await;
}

#[tokio::test]
async fn an_edited_or_deleted_audit_event_or_block_is_detected() {
    on_both(|s, raw| async move {
        let c = chain_of("n1", 6, 1_800_000_000_000);
        // Two batches: blocks [1, 3] and [4, 6].
        s.append_audit(&c[..3]).await.expect("append");
        s.append_audit(&c[3..]).await.expect("append");
        assert!(verify_all(&*s, "n1").await.is_ok());
        let (first, second) = (raw.block(1).await, raw.block(4).await);

        // Someone turns a refusal into a success (event 3 is the first block's only refusal).
        let edited = first.replace(r#""code":"RATE_LIMITED""#, r#""code":"VALID""#);
        assert_ne!(edited, first);
        assert_eq!(raw.set_block(1, &edited).await, 1);
        let b = verify_all(&*s, "n1").await.expect_err("edited");
        assert_eq!((b.seq, b.problem), (3, ChainProblem::Changed));
        raw.set_block(1, &first).await;
        assert!(verify_all(&*s, "n1").await.is_ok(), "restored");

        // Someone mangles an event so that it no longer parses.
        let mangled = first.replacen(r#""actor":"#, r#""actor":{"#, 2);
        raw.set_block(1, &mangled).await;
        let b = verify_all(&*s, "n1").await.expect_err("mangled");
        assert_eq!((b.seq, b.problem), (1, ChainProblem::Changed));
        raw.set_block(1, &first).await;

        // Someone writes a block that decompresses to a flood of empty events: it is
        // reported, not read without end.
        raw.set_block(1, &"{}\n".repeat(300_000)).await;
        let b = verify_all(&*s, "n1").await.expect_err("flood");
        assert_eq!(b.problem, ChainProblem::Changed);
        let listed = newest(s.as_ref(), &AuditFilter::default(), 100).await;
        assert_eq!(listed.len(), 3, "only the intact block's events are listed");
        raw.set_block(1, &first).await;

        // Someone changes the last event and re-hashes it: the head no longer matches.
        let mut last = c[5].clone();
        last.actor = "key_forged".into();
        last.seal(&c[4].hash);
        let mut lines: Vec<String> = second.lines().map(str::to_owned).collect();
        lines[2] = serde_json::to_string(&last).expect("json");
        raw.set_block(4, &(lines.join("\n") + "\n")).await;
        let b = verify_all(&*s, "n1").await.expect_err("re-hashed");
        assert_eq!((b.seq, b.problem), (6, ChainProblem::Changed));
        raw.set_block(4, &second).await;
        assert!(verify_all(&*s, "n1").await.is_ok(), "restored");

        // Someone deletes an event in the middle, then a whole block (the chain's tail).
        let without_4: String = second.lines().skip(1).map(|l| format!("{l}\n")).collect();
        raw.set_block(4, &without_4).await;
        let b = verify_all(&*s, "n1").await.expect_err("deleted");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Missing));
        raw.set_block(4, &second).await;
        raw.exec("DELETE FROM audit_blocks WHERE first_seq = 4")
            .await;
        let b = verify_all(&*s, "n1").await.expect_err("tail deleted");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Missing));
        // And the first block: the chain starts with a gap.
        raw.exec("DELETE FROM audit_blocks WHERE first_seq = 1")
            .await;
        let b = verify_all(&*s, "n1").await.expect_err("head deleted");
        assert_eq!((b.seq, b.problem), (1, ChainProblem::Missing));
    })
    .await;
}

/// A node's chain goes on from events of the earlier format (sealed over their fields) to
/// lines; a replayed batch, whole or overlapping, is stored once.
#[tokio::test]
async fn line_chained_events_list_verify_count_and_replay_once() {
    on_both(|s, _| async move {
        let t0 = 1_800_000_000_000;
        let c = chain_of("n1", 9, t0);
        s.append_audit(&c[..4]).await.expect("sealed");
        append_lines(&*s, &c[4..7]).await;
        append_lines(&*s, &c[4..]).await;
        append_lines(&*s, &c[2..]).await;
        let mut want: Vec<AuditEvent> = c[..4].to_vec();
        want.extend(as_listed(&c[4..], &c[3].hash));
        want.reverse();
        assert_eq!(newest(s.as_ref(), &AuditFilter::default(), 100).await, want);
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 9);
        let heads = s.audit_heads().await.expect("heads");
        assert_eq!(heads, vec![("n1".into(), 9, want[0].hash.clone())]);
        let rows = s
            .usage(&UsageOf::Key("key_a".into()), 3_600_000, 0, i64::MAX)
            .await
            .expect("usage");
        let counts: Vec<(&str, u64, u64)> = rows
            .iter()
            .map(|r| (r.code.as_str(), r.requests, r.credits))
            .collect();
        assert_eq!(counts, [("RATE_LIMITED", 3, 0), ("VALID", 6, 30)]);
    })
    .await;
}

#[tokio::test]
async fn an_edited_or_deleted_line_or_hash_is_detected() {
    on_both(|s, raw| async move {
        let c = chain_of("n1", 6, 1_800_000_000_000);
        append_lines(&*s, &c[..3]).await;
        append_lines(&*s, &c[3..]).await;
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 6);
        let (first, second) = (raw.block(1).await, raw.block(4).await);
        let chain = raw.chain(4).await;
        assert_eq!(
            (chain.len(), chain[0]),
            (1 + 32 + 32 + 4 * 3, CHAIN_TAGGED),
            "the hashes before the block and of its last event, then 4 bytes of each event's"
        );
        let prev: [u8; 32] = chain[1..33].try_into().expect("32 bytes");

        // A refusal turned into a success.
        let edited = first.replace(r#""code":"RATE_LIMITED""#, r#""code":"VALID""#);
        assert_ne!(edited, first);
        raw.set_block(1, &edited).await;
        let b = verify_all(&*s, "n1").await.expect_err("edited");
        assert_eq!((b.seq, b.problem), (3, ChainProblem::Changed));
        let listed = newest(s.as_ref(), &AuditFilter::default(), 100).await;
        assert_eq!(
            listed.len(),
            6,
            "an edited line still lists; verify is what flags it"
        );
        raw.set_block(1, &first).await;

        // A line that no longer parses: it is reported, and the lines after it still list.
        raw.set_block(1, &first.replacen(r#""actor":"#, r#""actor":{"#, 1))
            .await;
        let b = verify_all(&*s, "n1").await.expect_err("mangled");
        assert_eq!((b.seq, b.problem), (1, ChainProblem::Changed));
        let listed = newest(s.as_ref(), &AuditFilter::default(), 100).await;
        let seqs: Vec<i64> = listed.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [6, 5, 4, 3, 2]);
        raw.set_block(1, &first).await;

        // Event 5 edited and its tag in the chain recomputed: event 6 no longer follows.
        let lines: Vec<&str> = second.lines().collect();
        let h4 = line_hash(&prev, lines[0].as_bytes());
        let forged = lines[1].replace(r#""actor":"key_a""#, r#""actor":"key_forged""#);
        assert_ne!(forged, lines[1]);
        let mut retagged = chain.clone();
        retagged[69..73].copy_from_slice(&line_hash(&h4, forged.as_bytes())[..4]);
        raw.set_block(4, &format!("{}\n{forged}\n{}\n", lines[0], lines[2]))
            .await;
        raw.set_chain(4, &retagged).await;
        let b = verify_all(&*s, "n1").await.expect_err("re-tagged");
        assert_eq!((b.seq, b.problem), (6, ChainProblem::Changed));
        // The same done to the last event, its last hash too: the head no longer matches.
        let h5 = line_hash(&h4, lines[1].as_bytes());
        let forged = lines[2].replace(r#""actor":"key_a""#, r#""actor":"key_forged""#);
        let h6 = line_hash(&h5, forged.as_bytes());
        let mut rehashed = chain.clone();
        rehashed[33..65].copy_from_slice(&h6);
        rehashed[73..].copy_from_slice(&h6[..4]);
        raw.set_block(4, &format!("{}\n{}\n{forged}\n", lines[0], lines[1]))
            .await;
        raw.set_chain(4, &rehashed).await;
        let b = verify_all(&*s, "n1").await.expect_err("last re-hashed");
        assert_eq!((b.seq, b.problem), (6, ChainProblem::Changed));
        // Only the last hash changed (its tag still holds): that event is reported.
        let mut last_changed = chain.clone();
        last_changed[40] ^= 1;
        raw.set_block(4, &second).await;
        raw.set_chain(4, &last_changed).await;
        let b = verify_all(&*s, "n1").await.expect_err("last hash edited");
        assert_eq!((b.seq, b.problem), (6, ChainProblem::Changed));
        raw.set_chain(4, &chain).await;
        assert_eq!(verify_all(&*s, "n1").await.expect("restored"), 6);
        let hashes: Vec<String> = newest(s.as_ref(), &AuditFilter::default(), 100)
            .await
            .into_iter()
            .map(|e| e.hash)
            .collect();

        // The layout of earlier versions (every event's whole hash) still lists and verifies.
        let mut whole = prev.to_vec();
        let mut h = prev;
        for l in &lines {
            h = line_hash(&h, l.as_bytes());
            whole.extend_from_slice(&h);
        }
        raw.set_chain(4, &whole).await;
        assert_eq!(verify_all(&*s, "n1").await.expect("earlier layout"), 6);
        let listed = newest(s.as_ref(), &AuditFilter::default(), 100).await;
        assert_eq!(listed.into_iter().map(|e| e.hash).collect::<Vec<_>>(), hashes);

        // A block forged whole (hashes that hold, from the wrong place), and hashes cut short.
        let mut unlinked = vec![CHAIN_TAGGED];
        unlinked.extend_from_slice(&[0; 64]);
        let mut h = [0; 32];
        for l in &lines {
            h = line_hash(&h, l.as_bytes());
            unlinked.extend_from_slice(&h[..4]);
        }
        unlinked[33..65].copy_from_slice(&h);
        raw.set_chain(4, &unlinked).await;
        let b = verify_all(&*s, "n1").await.expect_err("unlinked");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Inserted));
        raw.set_chain(4, &chain[..69]).await;
        let b = verify_all(&*s, "n1").await.expect_err("tags cut");
        assert_eq!((b.seq, b.problem), (5, ChainProblem::Changed));
        raw.set_chain(4, &whole[..64]).await;
        let b = verify_all(&*s, "n1").await.expect_err("hashes cut");
        assert_eq!((b.seq, b.problem), (5, ChainProblem::Changed));
        raw.set_chain(4, &chain).await;

        // A block copied under another place, beyond the head, and under a node that has no
        // head: all inserted, and none of them listed twice.
        let copy = |node: &str, first: i64| {
            format!(
                "INSERT INTO audit_blocks (node, first_seq, last_seq, min_id, max_id, events, chain) \
                 SELECT '{node}', {first}, {first} + 2, min_id, max_id, events, chain FROM audit_blocks \
                 WHERE node = 'n1' AND first_seq = 4"
            )
        };
        raw.exec(&copy("n1", 2)).await;
        let b = verify_all(&*s, "n1").await.expect_err("copied inside");
        assert_eq!((b.seq, b.problem), (2, ChainProblem::Changed));
        assert_eq!(newest(s.as_ref(), &AuditFilter::default(), 100).await.len(), 6);
        raw.exec("DELETE FROM audit_blocks WHERE first_seq = 2").await;
        raw.exec(&copy("n1", 7)).await;
        let b = verify_all(&*s, "n1").await.expect_err("copied after the head");
        assert_eq!((b.seq, b.problem), (7, ChainProblem::Inserted));
        raw.exec("DELETE FROM audit_blocks WHERE first_seq = 7").await;
        assert_eq!(verify_all(&*s, "n1").await.expect("restored"), 6);
        raw.exec(&copy("ghost", 4)).await;
        let r = verify_audit(&*s).await.expect("verify");
        let (node, b) = r.broken.expect("a node without a head");
        assert_eq!((node.as_str(), b.seq, b.problem), ("ghost", 4, ChainProblem::Inserted));
        raw.exec("DELETE FROM audit_blocks WHERE node = 'ghost'").await;

        // A line deleted (the first, the last, the last two), then the whole block.
        raw.set_block(4, &format!("{}\n{}\n", lines[1], lines[2]))
            .await;
        let b = verify_all(&*s, "n1").await.expect_err("line deleted");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Missing));
        for (kept, missing) in [(2, 6_i64), (1, 5)] {
            raw.set_block(4, &format!("{}\n", lines[..kept].join("\n")))
                .await;
            let b = verify_all(&*s, "n1").await.expect_err("last lines deleted");
            assert_eq!((b.seq, b.problem), (missing, ChainProblem::Missing));
            let listed = newest(s.as_ref(), &AuditFilter::default(), 100).await;
            assert_eq!(listed[0].hash, hashes[3 - kept], "a kept event keeps its hash");
        }
        raw.exec("DELETE FROM audit_blocks WHERE first_seq = 4")
            .await;
        let b = verify_all(&*s, "n1").await.expect_err("block deleted");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Missing));
    })
    .await;
}

/// What is checked is the stored bytes, not a reading of them: a U+FFFD swapped for a byte
/// that is not UTF-8 (which a lossy reading would turn back into U+FFFD) is a change.
#[tokio::test]
async fn a_line_is_checked_byte_for_byte() {
    on_both(|s, raw| async move {
        let line = "{\"node\":\"n1\",\"seq\":1,\"at_ms\":1800000000000,\"actor\":\"k\",\"action\":\"x\",\"zz\":\"\u{fffd}\"}";
        let head = serde_json::from_str(line).expect("head");
        let raw_line = RawEvent {
            line: line.as_bytes(),
            head,
        };
        s.append_audit_lines(&[raw_line]).await.expect("append");
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 1);
        let mut bytes = raw.block(1).await.into_bytes();
        let at = bytes
            .windows(3)
            .position(|w| w == "\u{fffd}".as_bytes())
            .expect("U+FFFD");
        bytes.splice(at..at + 3, [0xff]);
        let stored = keygate_store::stored_block(&bytes);
        assert_eq!(raw.set_column("events", 1, &stored).await, 1);
        let b = verify_all(&*s, "n1").await.expect_err("other bytes");
        assert_eq!((b.seq, b.problem), (1, ChainProblem::Changed));
    })
    .await;
}

/// Many small blocks from three nodes whose times interleave: every filter, paged with the
/// cursor at several page sizes, gives exactly what filtering all events would.
#[tokio::test]
async fn audit_listings_over_many_blocks_match_a_plain_filter() {
    on_both(|s, _| async move {
        let t0 = 1_800_000_000_000;
        let mut all: Vec<AuditEvent> = Vec::new();
        for (n, node) in ["n1", "n2", "n3"].into_iter().enumerate() {
            let mut prev = keygate_core::audit::GENESIS.to_owned();
            let mut chain = Vec::new();
            for seq in 1..=60_i64 {
                let i = seq + n as i64;
                let code = ["VALID", "VALID", "REVOKED", "RATE_LIMITED"][(i % 4) as usize];
                let key = format!("key_{}", i % 5);
                // Times interleave between nodes and go back a little within one.
                let at = t0 + seq * 1_000 + (n as i64) * 333 - (seq % 3) * 1_500;
                let mut e = decided(node, seq, &prev, &key, code, at);
                e.id = format!("evt_{at:013}{seq:012}_{node}");
                e.tenant_id = Some(format!("t{}", i % 2));
                if seq % 10 == 0 {
                    e.action = "key.updated".into();
                    e.code = None;
                    e.user_id = Some("usr_1".into());
                }
                e.seal(&prev);
                prev.clone_from(&e.hash);
                chain.push(e);
            }
            // Batches of 1 to 7 events: node n1's sealed (the earlier format), n2's as
            // lines, n3's sealed up to event 30 and lines after.
            let mut stored = Vec::new();
            let mut rest = &chain[..];
            let mut k = 0;
            while !rest.is_empty() {
                let take = (k % 7 + 1).min(rest.len());
                let batch = &rest[..take];
                let as_lines = node == "n2" || (node == "n3" && batch[0].seq > 30);
                if as_lines {
                    let prev = stored.last().map_or(GENESIS, |e: &AuditEvent| &e.hash);
                    let listed = as_listed(batch, prev);
                    append_lines(&*s, batch).await;
                    stored.extend(listed);
                } else {
                    s.append_audit(batch).await.expect("append");
                    stored.extend_from_slice(batch);
                }
                rest = &rest[take..];
                k += 1;
            }
            all.extend(stored);
        }
        all.sort_by(|a, b| b.id.cmp(&a.id));
        let filters = [
            AuditFilter::default(),
            AuditFilter {
                tenant_id: Some("t1".into()),
                ..AuditFilter::default()
            },
            AuditFilter {
                key_id: Some("key_3".into()),
                code: Some("REVOKED".into()),
                ..AuditFilter::default()
            },
            AuditFilter {
                tenant_id: Some("t0".into()),
                code: Some("VALID".into()),
                since_ms: Some(t0 + 20_000),
                until_ms: Some(t0 + 45_000),
                ..AuditFilter::default()
            },
            AuditFilter {
                action: Some("key.updated".into()),
                user_id: Some("usr_1".into()),
                ..AuditFilter::default()
            },
            AuditFilter {
                tenant_id: Some("t9".into()),
                ..AuditFilter::default()
            },
        ];
        for f in &filters {
            let want: Vec<&str> = all
                .iter()
                .filter(|e| {
                    f.tenant_id
                        .as_ref()
                        .is_none_or(|t| e.tenant_id.as_ref() == Some(t))
                        && f.key_id
                            .as_ref()
                            .is_none_or(|k| e.key_id.as_ref() == Some(k))
                        && f.user_id
                            .as_ref()
                            .is_none_or(|u| e.user_id.as_ref() == Some(u))
                        && f.action.as_ref().is_none_or(|a| &e.action == a)
                        && f.code.as_ref().is_none_or(|c| e.code.as_ref() == Some(c))
                        && f.since_ms.is_none_or(|t| e.at_ms >= t)
                        && f.until_ms.is_none_or(|t| e.at_ms < t)
                })
                .map(|e| e.id.as_str())
                .collect();
            for limit in [1, 7, 50, 500] {
                let mut got: Vec<String> = Vec::new();
                let mut cursor = None;
                loop {
                    let page = s
                        .list_audit(f, &PageRequest { cursor, limit })
                        .await
                        .expect("list");
                    assert!(page.len() <= limit as usize);
                    got.extend(page.iter().map(|e| e.id.clone()));
                    if page.len() < limit as usize {
                        break;
                    }
                    cursor = page.last().map(|e| e.id.clone());
                }
                assert_eq!(got, want, "filter {f:?}, pages of {limit}");
            }
        }
        assert_eq!(verify_audit(&*s).await.expect("verify").checked, 180);
    })
    .await;
}

/// Stores `events` as rows of `audit_events` (how versions before audit blocks kept them)
/// instead of blocks.
async fn put_back_as_rows(raw: &Raw, events: &[AuditEvent]) {
    for e in events {
        let sql = format!(
            "INSERT INTO audit_events (node, seq, id, at, tenant_id, actor, action, key_id, \
             code, status, credits, prev_hash, hash) VALUES ('{}', {}, '{}', {}, '{}', '{}', \
             '{}', '{}', '{}', {}, {}, '{}', '{}')",
            e.node,
            e.seq,
            e.id,
            e.at_ms,
            e.tenant_id.as_deref().unwrap_or(""),
            e.actor,
            e.action,
            e.key_id.as_deref().unwrap_or(""),
            e.code.as_deref().unwrap_or(""),
            e.status.unwrap_or(0),
            e.credits.unwrap_or(0),
            e.prev_hash,
            e.hash
        );
        assert_eq!(raw.exec(&sql).await, 1);
    }
    raw.exec("DELETE FROM audit_block_refs").await;
    raw.exec("DELETE FROM audit_blocks").await;
}

/// Two nodes of a shared store that start together both move the old rows: every event ends
/// up in exactly one block.
#[tokio::test]
async fn two_nodes_moving_old_rows_at_once_keep_every_event_once() {
    on_both(|s, raw| async move {
        // SQLite is one node's store.
        let Some(url) = &raw.pg_url else { return };
        let c = chain_of("n1", 2_400, 1_800_000_000_000);
        s.append_audit(&c).await.expect("append");
        put_back_as_rows(&raw, &c).await;
        let open = || SqlStore::postgres(url, 4, std::time::Duration::from_secs(5));
        let (a, b) = tokio::join!(open(), open());
        let (a, b) = (a.expect("node a"), b.expect("node b"));
        let (x, y) = tokio::join!(a.migrate(), b.migrate());
        x.expect("node a");
        y.expect("node b");
        let all = newest(s.as_ref(), &AuditFilter::default(), 5_000).await;
        let mut ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!((all.len(), ids.len()), (2_400, 2_400));
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 2_400);
    })
    .await;
}

/// Events stored one per row by an earlier version move into blocks when the store starts,
/// keeping their ids, hashes and order.
#[tokio::test]
async fn row_audit_events_of_an_earlier_version_move_into_blocks() {
    on_both(|s, raw| async move {
        let c = chain_of("n1", 1_203, 1_800_000_000_000);
        s.append_audit(&c).await.expect("append");
        let expected = newest(s.as_ref(), &AuditFilter::default(), 2_000).await;
        // Put them back as rows, the way the earlier version stored them.
        put_back_as_rows(&raw, &c).await;
        s.migrate().await.expect("migrate again");
        assert_eq!(raw.exec("DELETE FROM audit_events").await, 0, "all moved");
        let got = newest(s.as_ref(), &AuditFilter::default(), 2_000).await;
        assert_eq!(got, expected);
        assert_eq!(verify_all(&*s, "n1").await.expect("intact"), 1_203);
        let limited = newest(
            s.as_ref(),
            &AuditFilter {
                code: Some("RATE_LIMITED".into()),
                ..AuditFilter::default()
            },
            2_000,
        )
        .await;
        assert_eq!(limited.len(), 401);
    })
    .await;
}

#[tokio::test]
async fn one_node_holds_a_lease_until_it_lapses() {
    on_both(|s, _| async move {
        assert!(s
            .acquire_lease("rotation", "a", 1_000, 2_000)
            .await
            .expect("a"));
        assert!(!s
            .acquire_lease("rotation", "b", 1_500, 2_500)
            .await
            .expect("b"));
        assert!(s
            .acquire_lease("rotation", "a", 1_900, 3_000)
            .await
            .expect("renew"));
        assert!(!s
            .acquire_lease("rotation", "b", 2_999, 4_000)
            .await
            .expect("still a's"));
        assert!(s
            .acquire_lease("rotation", "b", 3_001, 4_000)
            .await
            .expect("lapsed"));
        assert!(!s
            .acquire_lease("rotation", "a", 3_500, 5_000)
            .await
            .expect("b's now"));
    })
    .await;
}

fn refresh(hash: &str, grant: &str) -> keygate_store::RefreshToken {
    keygate_store::RefreshToken {
        hash: hash.into(),
        grant_id: grant.into(),
        created_at_ms: 1,
        used_at_ms: None,
    }
}

#[tokio::test]
async fn oauth_codes_and_refresh_tokens_are_single_use_across_racers() {
    use keygate_store::{AuthCode, CodeUse, OAuthGrant, RefreshUse};
    on_both(|s, _| async move {
        // Codes make grants only for a client that exists.
        s.insert_tenant(&tenant("default", None))
            .await
            .expect("tenant");
        s.insert_client(&portal()).await.expect("client");
        let code = AuthCode {
            hash: "c1".into(),
            client_id: "cli_1".into(),
            tenant_id: "default".into(),
            user_id: "usr_1".into(),
            redirect_uri: "https://a.example/cb".into(),
            challenge: "ch".into(),
            scope: "docs:read".into(),
            created_at_ms: 1,
            expires_at_ms: 60_001,
            used_at_ms: None,
            grant_id: None,
        };
        s.insert_code(&code).await.expect("insert code");
        assert_eq!(s.get_code("c1").await.expect("get"), Some(code.clone()));
        let grant_n = |i: usize| OAuthGrant {
            id: format!("grt_{i}"),
            client_id: "cli_1".into(),
            tenant_id: "default".into(),
            user_id: Some("usr_1".into()),
            scope: "docs:read".into(),
            created_at_ms: 1,
            expires_at_ms: 1_000_000,
            revoked_at_ms: None,
            revoked_reason: None,
        };
        // Eight exchanges at once: exactly one wins and stores its grant; the others see a
        // reuse naming that grant.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            let g = grant_n(i);
            tasks.push(tokio::spawn(async move {
                s.use_code("c1", &g, &refresh(&format!("rc_{i}"), &g.id), 5)
                    .await
                    .expect("use")
            }));
        }
        let mut fresh = Vec::new();
        let mut reused = 0;
        for t in tasks {
            match t.await.expect("join") {
                CodeUse::Fresh(c) => fresh.push(c),
                CodeUse::Reused(c) => {
                    assert!(c.grant_id.is_some());
                    reused += 1;
                }
                CodeUse::Unknown => panic!("the code exists"),
            }
        }
        assert_eq!((fresh.len(), reused), (1, 7));
        let winner = fresh.pop().expect("winner");
        assert_eq!(winner.used_at_ms, Some(5));
        // Only the winner's grant and refresh token exist, and the code names that grant.
        let mut stored = Vec::new();
        for i in 0..8 {
            if s.get_grant(&format!("grt_{i}"))
                .await
                .expect("get")
                .is_some()
            {
                stored.push(i);
                assert!(s
                    .get_refresh(&format!("rc_{i}"))
                    .await
                    .expect("get")
                    .is_some());
            }
        }
        assert_eq!(stored.len(), 1);
        let used = s.get_code("c1").await.expect("get").expect("code");
        assert_eq!(used.grant_id, Some(format!("grt_{}", stored[0])));
        assert_eq!(
            s.use_code("nope", &grant_n(99), &refresh("rc_99", "grt_99"), 5)
                .await
                .expect("use"),
            CodeUse::Unknown
        );
        assert!(s.get_grant("grt_99").await.expect("get").is_none());

        let grant = OAuthGrant {
            id: "grt_a".into(),
            client_id: "cli_1".into(),
            tenant_id: "default".into(),
            user_id: Some("usr_1".into()),
            scope: "docs:read".into(),
            created_at_ms: 1,
            expires_at_ms: 1_000_000,
            revoked_at_ms: None,
            revoked_reason: None,
        };
        s.insert_grant(&grant, Some(&refresh("r0", "grt_a")))
            .await
            .expect("grant");
        assert_eq!(
            s.get_refresh_grant("r0").await.expect("read"),
            Some((refresh("r0", "grt_a"), grant.clone()))
        );
        assert_eq!(s.get_refresh_grant("r9").await.expect("read"), None);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.use_refresh("r0", &refresh(&format!("r1_{i}"), "ignored"), 7)
                    .await
                    .expect("use")
            }));
        }
        let mut fresh = 0;
        for t in tasks {
            match t.await.expect("join") {
                RefreshUse::Fresh(rt) => {
                    assert_eq!(rt.grant_id, "grt_a");
                    fresh += 1;
                }
                RefreshUse::Reused(_) => {}
                RefreshUse::Unknown => panic!("the token exists"),
            }
        }
        assert_eq!(fresh, 1, "one successor only");
        // Exactly one successor was stored, in the same family, unused.
        let mut successors = Vec::new();
        for i in 0..8 {
            if let Some(rt) = s.get_refresh(&format!("r1_{i}")).await.expect("get") {
                successors.push(rt);
            }
        }
        assert_eq!(successors.len(), 1);
        assert_eq!(successors[0].grant_id, "grt_a");
        assert_eq!(successors[0].used_at_ms, None);

        assert!(s
            .revoke_grant("grt_a", 9, "refresh_reuse")
            .await
            .expect("revoke"));
        assert!(!s.revoke_grant("grt_a", 10, "again").await.expect("revoke"));
        let g = s.get_grant("grt_a").await.expect("get").expect("grant");
        assert_eq!(
            (g.revoked_at_ms, g.revoked_reason.as_deref()),
            (Some(9), Some("refresh_reuse"))
        );

        assert!(!s.access_token_revoked("at_1").await.expect("read"));
        s.revoke_access_token("at_1", "grt_a", 99)
            .await
            .expect("revoke");
        s.revoke_access_token("at_1", "grt_a", 99)
            .await
            .expect("twice is fine");
        assert!(s.access_token_revoked("at_1").await.expect("read"));

        assert!(!s
            .has_consent("usr_1", "cli_1", "docs:read")
            .await
            .expect("read"));
        s.insert_consent("usr_1", "cli_1", "docs:read", 1)
            .await
            .expect("consent");
        s.insert_consent("usr_1", "cli_1", "docs:read", 2)
            .await
            .expect("again");
        assert!(s
            .has_consent("usr_1", "cli_1", "docs:read")
            .await
            .expect("read"));
        assert!(!s
            .has_consent("usr_1", "cli_1", "docs:read ocr:read")
            .await
            .expect("read"));

        // The first stored secret wins; later candidates are ignored.
        assert_eq!(
            s.shared_secret("x", "first", 1).await.expect("secret"),
            "first"
        );
        assert_eq!(
            s.shared_secret("x", "second", 2).await.expect("secret"),
            "first"
        );

        // A code outstanding when its client is deleted makes no grant.
        let late = AuthCode {
            hash: "c9".into(),
            ..code.clone()
        };
        s.insert_code(&late).await.expect("insert code");
        s.delete_client("cli_1", 8).await.expect("delete");
        assert_eq!(
            s.use_code("c9", &grant_n(9), &refresh("rc_9", "grt_9"), 9)
                .await
                .expect("use"),
            CodeUse::Unknown
        );
        assert!(s.get_grant("grt_9").await.expect("get").is_none());
    })
    .await;
}

#[tokio::test]
async fn oauth_clients_and_signing_keys_round_trip() {
    use keygate_store::SigningKey;
    on_both(|s, _| async move {
        let c = portal();
        s.insert_tenant(&tenant("default", None))
            .await
            .expect("tenant");
        s.insert_client(&c).await.expect("insert");
        assert_eq!(s.get_client("cli_1").await.expect("get"), Some(c.clone()));
        assert_eq!(
            s.list_clients(Some("default"), &page(10, None))
                .await
                .expect("list"),
            vec![c.clone()]
        );
        assert!(s
            .list_clients(Some("other"), &page(10, None))
            .await
            .expect("list")
            .is_empty());
        let grant = keygate_store::OAuthGrant {
            id: "grt_1".into(),
            client_id: "cli_1".into(),
            tenant_id: "default".into(),
            user_id: None,
            scope: "docs:read".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            revoked_at_ms: None,
            revoked_reason: None,
        };
        s.insert_grant(&grant, None).await.expect("grant");
        // The standing client_credentials grant: made once, found again (not the per-code
        // grant above, which has a user-less expiry of its own), revoked with the client.
        let standing = |id: &str| keygate_store::OAuthGrant {
            id: id.into(),
            created_at_ms: 3,
            ..grant.clone()
        };
        let made = s
            .client_grant(&standing("grt_s"))
            .await
            .expect("standing")
            .expect("client exists");
        assert_eq!(made.id, "grt_s");
        assert_eq!(made.expires_at_ms, keygate_store::STANDING_GRANT_EXPIRES);
        assert_eq!(
            s.client_grant(&standing("grt_t"))
                .await
                .expect("again")
                .map(|g| g.id),
            Some("grt_s".to_owned())
        );
        assert_eq!(s.get_grant("grt_s").await.expect("get"), Some(made.clone()));
        let mut gone = s.delete_client("cli_1", 5).await.expect("delete");
        gone[1..].sort();
        assert_eq!(gone, ["cli_1", "grt_1", "grt_s"]);
        assert_eq!(
            s.get_grant("grt_s")
                .await
                .expect("get")
                .and_then(|g| g.revoked_at_ms),
            Some(5)
        );
        // A client gone gets no standing grant.
        assert_eq!(
            s.client_grant(&standing("grt_u")).await.expect("read"),
            None
        );
        assert!(s.get_grant("grt_u").await.expect("get").is_none());
        assert_eq!(
            s.get_grant("grt_1")
                .await
                .expect("get")
                .and_then(|g| g.revoked_at_ms),
            Some(5)
        );
        assert!(s
            .delete_client("cli_1", 6)
            .await
            .expect("delete")
            .is_empty());

        let key = |kid: &str, at: i64| SigningKey {
            kid: kid.into(),
            alg: "EdDSA".into(),
            private_key: "cHJpdg==".into(),
            public_x: "x".into(),
            created_at_ms: at,
            retired_at_ms: None,
        };
        s.add_signing_key(&key("k1", 10), 10).await.expect("add");
        s.add_signing_key(&key("k2", 20), 20).await.expect("add");
        let keys = s.signing_keys().await.expect("keys");
        assert_eq!(
            keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            vec!["k2", "k1"]
        );
        assert_eq!(keys[0].retired_at_ms, None);
        assert_eq!(
            keys[1].retired_at_ms,
            Some(20),
            "the older key is retired by the newer"
        );
    })
    .await;
}

#[tokio::test]
async fn a_transaction_that_reads_first_does_not_fail_beside_another_writer() {
    use keygate_store::OAuthClient;
    // SQLite: a deferred transaction that reads, then writes, cannot take the write lock once
    // another connection has written meanwhile (SQLITE_BUSY at once, past busy_timeout).
    // Every write transaction takes the lock first, so each of these waits its turn instead.
    on_both(|s, _| async move {
        s.insert_tenant(&tenant("t_busy", None))
            .await
            .expect("tenant");
        s.insert_key(&key("key_busy", "t_busy", Kind::Sk, Some(1_000_000), 3))
            .await
            .expect("key");
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..400 {
                    s.withdraw_budget(&"key_busy".into(), 1)
                        .await
                        .expect("withdraw");
                }
            })
        };
        for i in 0..40 {
            let c = OAuthClient {
                id: format!("cli_busy_{i}"),
                tenant_id: "t_busy".into(),
                name: "busy".into(),
                client_type: "public".into(),
                secret_hash: None,
                redirect_uris: vec!["https://app.example/cb".into()],
                scopes: vec!["docs:read".into()],
                created_at_ms: 1,
            };
            s.insert_client(&c).await.expect("insert client");
            let gone = s.delete_client(&c.id, 2).await.expect("delete client");
            assert_eq!(gone.first(), Some(&c.id));
        }
        writer.await.expect("writer");
    })
    .await;
}

/// A sign-up writes its tenant, user and key together or not at all; a trial ends once, with
/// the users on the account's plan, however many nodes try.
#[tokio::test]
async fn accounts_are_made_whole_and_trials_end_once() {
    on_both(|s, _raw| async move {
        let mut t = tenant("t_new", Some(1_000));
        t.plan = "trial".into();
        t.trial_ends_at_ms = Some(50);
        let owner = User {
            id: "usr_o".into(),
            tenant_id: "t_new".into(),
            email: "o@example.com".into(),
            name: None,
            plan: "trial".into(),
            password_hash: None,
            created_at_ms: 1,
            role: Role::Owner,
            verified: true,
            sessions_from_ms: 0,
            removed_at_ms: None,
        };
        let mut k = key("key_o", "t_new", Kind::Ut, None, 7);
        k.user_id = Some("usr_o".into());
        s.sign_up(&t, &owner, &k).await.expect("sign up");
        assert!(s.email_registered("o@example.com").await.expect("lookup"));
        assert!(!s.email_registered("x@example.com").await.expect("lookup"));
        // The same key hash again: the whole second account is refused, nothing of it stays.
        let mut t2 = tenant("t_dup", None);
        t2.plan = "trial".into();
        let u2 = User {
            id: "usr_d".into(),
            tenant_id: "t_dup".into(),
            email: "d@example.com".into(),
            ..owner.clone()
        };
        let mut k2 = key("key_d", "t_dup", Kind::Ut, None, 7);
        k2.user_id = Some("usr_d".into());
        assert_eq!(
            s.sign_up(&t2, &u2, &k2).await.expect_err("same hash").kind,
            StoreErrorKind::Conflict
        );
        assert_eq!(s.get_tenant(&"t_dup".into()).await.expect("get"), None);
        assert!(!s.email_registered("d@example.com").await.expect("lookup"));

        let due = s.trials_ending(60, 10).await.expect("due");
        assert_eq!(
            due.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t_new"]
        );
        assert!(s.trials_ending(49, 10).await.expect("due").is_empty());
        let end = TenantChange {
            name: None,
            plan: Some(PlanStart {
                plan: "free".into(),
                started_at_ms: 50,
                trial_ends_at_ms: None,
                grant: Some(100),
            }),
            if_trial: Some(("trial".into(), 50)),
        };
        let id = "t_new".into();
        let (a, b) = tokio::join!(s.change_tenant(&id, &end), s.change_tenant(&id, &end));
        let ended: Vec<Tenant> = [a, b]
            .into_iter()
            .filter_map(|r| r.expect("change"))
            .collect();
        assert_eq!(ended.len(), 1, "one of two racers ends the trial");
        let t = &ended[0];
        assert_eq!(
            (
                t.plan.as_str(),
                t.trial_ends_at_ms,
                t.plan_started_at_ms,
                t.credits
            ),
            ("free", None, 50, Some(1_100))
        );
        let u = s
            .get_user(&"usr_o".into())
            .await
            .expect("get")
            .expect("user");
        assert_eq!(u.plan, "free", "the owner moved with the account");
        // A month's refill: once, and not for a plan that restarted since it was read.
        let on_free = s.tenants_on_plan("free", "", 10).await.expect("list");
        assert_eq!(
            on_free.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t_new"]
        );
        assert!(s
            .tenants_on_plan("free", "t_new", 10)
            .await
            .expect("list")
            .is_empty());
        let stale = s
            .refill_credits(&id, "free", 49, 1, 700)
            .await
            .expect("refill");
        assert_eq!(stale, None, "another start of the plan");
        let refilled = s
            .refill_credits(&id, "free", 50, 1, 700)
            .await
            .expect("refill");
        assert_eq!(
            refilled.map(|t| (t.credits, t.refilled_months)),
            Some((Some(700), 1))
        );
        assert_eq!(
            s.refill_credits(&id, "free", 50, 1, 700)
                .await
                .expect("again"),
            None
        );
        // One account per owner address, also when two sign-ups race past the lookup.
        let mut t3 = tenant("t_same", None);
        t3.plan = "trial".into();
        let u3 = User {
            id: "usr_s".into(),
            tenant_id: "t_same".into(),
            ..owner.clone()
        };
        let mut k3 = key("key_s", "t_same", Kind::Ut, None, 9);
        k3.user_id = Some("usr_s".into());
        assert_eq!(
            s.sign_up(&t3, &u3, &k3)
                .await
                .expect_err("same owner address")
                .kind,
            StoreErrorKind::Conflict
        );
        assert!(s.trials_ending(i64::MAX, 10).await.expect("due").is_empty());
        // A rename with a plan change; an unlimited plan makes the pool unlimited.
        let renamed = s
            .change_tenant(
                &"t_new".into(),
                &TenantChange {
                    name: Some("Renamed".into()),
                    plan: Some(PlanStart {
                        plan: "enterprise".into(),
                        started_at_ms: 60,
                        trial_ends_at_ms: None,
                        grant: None,
                    }),
                    if_trial: None,
                },
            )
            .await
            .expect("change")
            .expect("tenant");
        assert_eq!((renamed.name.as_str(), renamed.credits), ("Renamed", None));
        assert_eq!(
            s.change_tenant(&"nope".into(), &TenantChange::default())
                .await
                .expect("change"),
            None
        );
    })
    .await;
}

/// A link sent by email works once, before it expires, for its purpose only; verifying the
/// owner verifies the account, a member only themself; a reset sets the password and the time
/// from which the user's sessions count.
#[tokio::test]
async fn email_links_work_once_before_they_expire_for_their_purpose() {
    on_both(|s, _raw| async move {
        let mut t = tenant("t_mail", Some(10));
        t.verified = false;
        let owner = User {
            id: "usr_mo".into(),
            tenant_id: "t_mail".into(),
            email: "mo@example.com".into(),
            name: None,
            plan: "free".into(),
            password_hash: Some("old".into()),
            created_at_ms: 1,
            role: Role::Owner,
            verified: false,
            sessions_from_ms: 0,
            removed_at_ms: None,
        };
        let member = User {
            id: "usr_mm".into(),
            email: "mm@example.com".into(),
            role: Role::Member,
            ..owner.clone()
        };
        let mut k = key("key_mail", "t_mail", Kind::Ut, None, 9);
        k.user_id = Some("usr_mo".into());
        s.sign_up(&t, &owner, &k).await.expect("sign up");
        s.insert_user(&member).await.expect("member");
        let link = |hash: &str, purpose, user: &str, expires| EmailToken {
            hash: hash.into(),
            purpose,
            tenant_id: "t_mail".into(),
            user_id: Some(user.into()),
            email: "x@example.com".into(),
            role: None,
            created_at_ms: 1,
            expires_at_ms: expires,
        };
        for l in [
            link("h_member", EmailPurpose::Verify, "usr_mm", 100),
            link("h_owner", EmailPurpose::Verify, "usr_mo", 100),
            link("h_reset", EmailPurpose::Reset, "usr_mo", 100),
            link("h_old", EmailPurpose::Reset, "usr_mo", 10),
        ] {
            s.insert_email_token(&l).await.expect("insert");
        }
        let verified = |id: &'static str| {
            let s = s.clone();
            async move {
                s.get_tenant(&id.into())
                    .await
                    .expect("get")
                    .expect("t")
                    .verified
            }
        };
        // A reset link does not verify, a verification link does not reset.
        assert_eq!(s.redeem_verification("h_reset", 50).await.expect("r"), None);
        assert_eq!(s.redeem_reset("h_owner", "new", 50).await.expect("r"), None);
        let m = s.redeem_verification("h_member", 50).await.expect("r");
        assert_eq!(m.map(|u| (u.id, u.verified)), Some(("usr_mm".into(), true)));
        assert!(
            !verified("t_mail").await,
            "a member does not verify the account"
        );
        let o = s.redeem_verification("h_owner", 50).await.expect("r");
        assert_eq!(o.map(|u| u.verified), Some(true));
        assert!(verified("t_mail").await);
        assert_eq!(
            s.redeem_verification("h_owner", 51).await.expect("r"),
            None,
            "once"
        );

        assert_eq!(
            s.redeem_reset("h_old", "new", 50).await.expect("r"),
            None,
            "expired"
        );
        let r = s
            .redeem_reset("h_reset", "new", 60)
            .await
            .expect("r")
            .expect("reset");
        assert_eq!(
            (r.user.password_hash.as_deref(), r.user.sessions_from_ms),
            (Some("new"), 60)
        );
        assert!(
            r.was_verified,
            "the owner's verification link was opened above"
        );
        assert!(r.grants_revoked.is_empty());
        assert_eq!(
            s.redeem_reset("h_reset", "newer", 61).await.expect("r"),
            None
        );
        let found = s
            .users_with_email("mm@example.com", 10)
            .await
            .expect("find");
        assert_eq!(found.len(), 1);
        // Expired links are forgotten; live ones stay.
        assert_eq!(s.prune_email_tokens(50).await.expect("prune"), 1);
    })
    .await;
}

/// Live keys are counted without dashboard sessions, whose mark is matched exactly (`_` is no
/// wildcard): a look-alike mark still counts.
#[tokio::test]
async fn live_keys_are_counted_without_session_keys_and_without_look_alikes_of_their_mark() {
    on_both(|s, _raw| async move {
        s.insert_tenant(&tenant("t_count", None))
            .await
            .expect("tenant");
        let meta = |m: serde_json::Value| m.as_object().cloned().unwrap_or_default();
        let mut n: u8 = 20;
        for (id, m, expires, revoked) in [
            ("key_c1", serde_json::json!({}), None, false),
            (
                "key_c2",
                serde_json::json!({"dashboard_session": true}),
                None,
                false,
            ),
            (
                "key_c3",
                serde_json::json!({"dashboard-session": true}),
                None,
                false,
            ),
            (
                "key_c4",
                serde_json::json!({"dashboardXsession": true}),
                None,
                false,
            ),
            ("key_c5", serde_json::json!({}), Some(5), false),
            ("key_c6", serde_json::json!({}), None, true),
        ] {
            n += 1;
            let mut k = key(id, "t_count", Kind::Sk, None, n);
            k.metadata = meta(m);
            k.expires_at_ms = expires;
            s.insert_key(&k).await.expect("insert");
            if revoked {
                s.revoke_key(&k.id, 1).await.expect("revoke");
            }
        }
        let live = s
            .count_live_keys(&"t_count".into(), 10, "dashboard_session")
            .await
            .expect("count");
        assert_eq!(live, 3, "c1, and the two look-alikes");
    })
    .await;
}

//! Tenants, users, keys, and the credits they hold: the [`Store`] methods, once for both
//! backends (see `sql.rs`).

use crate::rows::{json_list, key_from_row, tenant_from_row, to_i64, to_u64, user_from_row};
use crate::sql::{contains_pattern, Sql};
use crate::{
    EmailToken, Grant, KeyFilter, KeyRecord, PageRequest, PasswordReset, Result, SqlStore, Store,
    Tenant, TenantChange, User, Withdrawal,
};
use async_trait::async_trait;
use keygate_core::{FamilyId, KeyHash, KeyId, TenantId, UserId};
use sqlx::{AnyConnection, Row};

const KEY_SELECT: &str =
    "SELECT k.*, f.budget, f.spent FROM keys k JOIN key_families f ON f.id = k.family_id";

#[async_trait]
impl Store for SqlStore {
    async fn migrate(&self) -> Result<()> {
        self.run_migrations().await?;
        let moved = self.convert_row_audit().await?;
        if moved > 0 {
            tracing::info!("moved {moved} audit events from rows into blocks");
        }
        Ok(())
    }

    async fn insert_tenant(&self, t: &Tenant) -> Result<()> {
        insert_tenant_row(&mut *self.pool.acquire().await?, t).await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.row_where("SELECT * FROM tenants WHERE id = $1", id, tenant_from_row)
            .await
    }

    async fn list_tenants(&self, page: &PageRequest) -> Result<Vec<Tenant>> {
        let rows = Sql::new("SELECT * FROM tenants WHERE 1 = 1")
            .page("id", page)
            .build()?
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn add_tenant_credits(&self, id: &TenantId, amount: u64) -> Result<Option<Tenant>> {
        let row = sqlx::query(
            "UPDATE tenants SET credits = CASE WHEN credits IS NULL THEN NULL ELSE credits + $1 END \
             WHERE id = $2 AND (credits IS NULL OR credits + $1 <= 1000000000000000) RETURNING *",
        )
        .bind(to_i64(amount))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn insert_user(&self, u: &User) -> Result<()> {
        insert_user_row(&mut *self.pool.acquire().await?, u).await
    }

    async fn sign_up(&self, t: &Tenant, u: &User, k: &KeyRecord) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_tenant_row(&mut tx, t).await?;
        insert_user_row(&mut tx, u).await?;
        insert_family_row(&mut tx, k).await?;
        insert_key_row(&mut tx, k).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn email_registered(&self, email: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE email = $1 AND role = 'owner'")
                .bind(email)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    async fn change_tenant(&self, id: &TenantId, change: &TenantChange) -> Result<Option<Tenant>> {
        // The tenant as it is, locked until the end (SQLite's write transaction holds the
        // whole file; PostgreSQL's row lock makes a racing change wait and then read this
        // one's result, so the users below move from the plan the tenant really had).
        let mut q = Sql::new("SELECT plan, trial_ends_at FROM tenants WHERE id = ");
        q.push_bind(id.as_str());
        if self.backend() == crate::Backend::Postgres {
            q.push(" FOR UPDATE");
        }
        let mut tx = self.begin_write().await?;
        let Some(row) = q.build()?.fetch_optional(&mut *tx).await? else {
            return Ok(None);
        };
        let old_plan: String = row.try_get("plan")?;
        let old_end: Option<i64> = row.try_get("trial_ends_at")?;
        if let Some((plan, ends)) = &change.if_trial {
            if old_plan != *plan || old_end != Some(*ends) {
                // Another node ended this trial first.
                return Ok(None);
            }
        }
        if let Some(p) = &change.plan {
            // Users on the account's plan move with it (a user given a plan of their own keeps
            // it).
            let mut q = Sql::new("UPDATE users SET plan = ");
            q.push_bind(p.plan.as_str())
                .push(" WHERE tenant_id = ")
                .push_bind(id.as_str())
                .push(" AND plan = ")
                .push_bind(old_plan.as_str());
            q.build()?.execute(&mut *tx).await?;
        }
        let mut q = Sql::new("UPDATE tenants SET id = id");
        if let Some(name) = &change.name {
            q.push(", name = ").push_bind(name.as_str());
        }
        if let Some(p) = &change.plan {
            q.push(", plan = ")
                .push_bind(p.plan.as_str())
                .push(", plan_started_at = ")
                .push_bind(p.started_at_ms)
                .push(", trial_ends_at = ")
                .push_bind(p.trial_ends_at_ms)
                .push(", refilled_months = 0");
            match p.grant {
                // An unlimited plan: the pool is unlimited too.
                None => q.push(", credits = NULL"),
                // The plan's grant is added to what the pool holds, up to the cap of 10^15.
                Some(g) => q
                    .push(", credits = CASE WHEN COALESCE(credits, 0) > 1000000000000000 - ")
                    .push_bind(to_i64(g))
                    .push(" THEN 1000000000000000 ELSE COALESCE(credits, 0) + ")
                    .push_bind(to_i64(g))
                    .push(" END"),
            };
        }
        q.push(" WHERE id = ").push_bind(id.as_str());
        if let Some((plan, ends)) = &change.if_trial {
            q.push(" AND plan = ")
                .push_bind(plan.as_str())
                .push(" AND trial_ends_at = ")
                .push_bind(*ends);
        }
        q.push(" RETURNING *");
        let row = q.build()?.fetch_optional(&mut *tx).await?;
        let Some(row) = row else {
            // Not there, or another node changed it first: the users stay as they were.
            return Ok(None);
        };
        let t = tenant_from_row(&row)?;
        tx.commit().await?;
        Ok(Some(t))
    }

    async fn tenants_on_plan(&self, plan: &str, after: &str, limit: u32) -> Result<Vec<Tenant>> {
        let rows =
            sqlx::query("SELECT * FROM tenants WHERE plan = $1 AND id > $2 ORDER BY id LIMIT $3")
                .bind(plan)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn refill_credits(
        &self,
        id: &TenantId,
        plan: &str,
        started_at_ms: i64,
        month: u32,
        credits: u64,
    ) -> Result<Option<Tenant>> {
        let row = sqlx::query(
            "UPDATE tenants SET credits = $1, refilled_months = $2 WHERE id = $3 AND plan = $4 \
             AND plan_started_at = $5 AND refilled_months < $2 RETURNING *",
        )
        .bind(to_i64(credits.min(1_000_000_000_000_000)))
        .bind(i64::from(month))
        .bind(id.as_str())
        .bind(plan)
        .bind(started_at_ms)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn trials_ending(&self, before_ms: i64, limit: u32) -> Result<Vec<Tenant>> {
        let rows =
            Sql::new("SELECT * FROM tenants WHERE trial_ends_at IS NOT NULL AND trial_ends_at <= ")
                .push_bind(before_ms)
                .push(" ORDER BY trial_ends_at LIMIT ")
                .push_bind(i64::from(limit))
                .build()?
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        self.row_where("SELECT * FROM users WHERE id = $1", id, user_from_row)
            .await
    }

    async fn users_with_email(&self, email: &str, limit: u32) -> Result<Vec<User>> {
        let rows = sqlx::query(
            "SELECT * FROM users WHERE email = $1 AND removed_at IS NULL ORDER BY created_at \
             LIMIT $2",
        )
        .bind(email)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn insert_email_token(&self, t: &EmailToken) -> Result<()> {
        sqlx::query(
            "INSERT INTO email_tokens (hash, purpose, tenant_id, user_id, email, role, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.hash)
        .bind(t.purpose.as_str())
        .bind(t.tenant_id.as_str())
        .bind(t.user_id.as_deref())
        .bind(&t.email)
        .bind(t.role.map(|r| r.as_str()))
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn redeem_verification(&self, hash: &str, now_ms: i64) -> Result<Option<User>> {
        let mut tx = self.begin_write().await?;
        let Some(user_id) = spend_token(&mut tx, hash, "verify", now_ms).await? else {
            return Ok(None);
        };
        let Some(row) = sqlx::query("UPDATE users SET verified = 1 WHERE id = $1 RETURNING *")
            .bind(&user_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let user = user_from_row(&row)?;
        verify_owners_account(&mut tx, &user).await?;
        tx.commit().await?;
        Ok(Some(user))
    }

    async fn redeem_reset(
        &self,
        hash: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> Result<Option<PasswordReset>> {
        let mut tx = self.begin_write().await?;
        let Some(user_id) = spend_token(&mut tx, hash, "reset", now_ms).await? else {
            return Ok(None);
        };
        // Proven before: the user's address, or their account (which counts as verified
        // unless sign-up asked for a proof that has not come yet).
        let was_verified: Option<(i64, i64)> = sqlx::query_as(
            "SELECT u.verified, t.verified FROM users u JOIN tenants t ON t.id = u.tenant_id \
             WHERE u.id = $1",
        )
        .bind(&user_id)
        .fetch_optional(&mut *tx)
        .await?;
        // Opening the link proves the address as well as a verification link would.
        let Some(row) = sqlx::query(
            "UPDATE users SET password_hash = $1, sessions_from = $2, verified = 1 WHERE id = $3 \
             AND removed_at IS NULL RETURNING *",
        )
        .bind(password_hash)
        .bind(now_ms)
        .bind(&user_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let user = user_from_row(&row)?;
        verify_owners_account(&mut tx, &user).await?;
        let grants_revoked = revoke_grants_of(&mut tx, &user.id, now_ms, "password_reset").await?;
        tx.commit().await?;
        Ok(Some(PasswordReset {
            user,
            was_verified: was_verified.is_some_and(|(u, t)| u != 0 || t != 0),
            grants_revoked,
        }))
    }

    async fn redeem_invite(&self, hash: &str, user: &User, now_ms: i64) -> Result<Option<User>> {
        let mut tx = self.begin_write().await?;
        let spent: Option<(String, String)> = sqlx::query_as(
            "UPDATE email_tokens SET used_at = $1 WHERE hash = $2 AND purpose = 'invite' \
             AND used_at IS NULL AND expires_at > $1 RETURNING tenant_id, email",
        )
        .bind(now_ms)
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((tenant_id, email)) = spent else {
            return Ok(None);
        };
        // The other invitations of this address are spent with it.
        spend_invitations(&mut tx, &TenantId::from(tenant_id.as_str()), &email, now_ms).await?;
        let plan: Option<String> = sqlx::query_scalar("SELECT plan FROM tenants WHERE id = $1")
            .bind(&tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(plan) = plan else {
            return Ok(None);
        };
        let back = sqlx::query(
            "UPDATE users SET removed_at = NULL, name = $1, password_hash = $2, plan = $3, \
             role = 'member', verified = 1, sessions_from = $4 WHERE tenant_id = $5 AND email = $6 \
             AND removed_at IS NOT NULL RETURNING *",
        )
        .bind(&user.name)
        .bind(&user.password_hash)
        .bind(&plan)
        .bind(now_ms)
        .bind(&tenant_id)
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await?;
        let made = match back {
            Some(row) => user_from_row(&row)?,
            None => {
                let made = User {
                    tenant_id: TenantId::from(tenant_id),
                    email,
                    plan,
                    role: keygate_core::access::Role::Member,
                    verified: true,
                    removed_at_ms: None,
                    ..user.clone()
                };
                insert_user_row(&mut tx, &made).await?;
                made
            }
        };
        tx.commit().await?;
        Ok(Some(made))
    }

    async fn remove_user(&self, id: &UserId, now_ms: i64) -> Result<Option<(User, Vec<String>)>> {
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query(
            "UPDATE users SET removed_at = $1, password_hash = NULL, sessions_from = $1 \
             WHERE id = $2 AND removed_at IS NULL AND role <> 'owner' RETURNING *",
        )
        .bind(now_ms)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let user = user_from_row(&row)?;
        // No invitation sent before brings them back.
        spend_invitations(&mut tx, &user.tenant_id, &user.email, now_ms).await?;
        let grants = revoke_grants_of(&mut tx, &user.id, now_ms, "user_removed").await?;
        tx.commit().await?;
        Ok(Some((user, grants)))
    }

    async fn email_token_live(&self, hash: &str, purpose: &str, now_ms: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM email_tokens WHERE hash = $1 AND purpose = $2 \
             AND used_at IS NULL AND expires_at > $3",
        )
        .bind(hash)
        .bind(purpose)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn prune_email_tokens(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM email_tokens WHERE expires_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn list_users(&self, tenant_id: &TenantId, page: &PageRequest) -> Result<Vec<User>> {
        let rows = Sql::new("SELECT * FROM users WHERE removed_at IS NULL AND tenant_id = ")
            .push_bind(tenant_id.as_str())
            .page("id", page)
            .build()?
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn insert_key(&self, k: &KeyRecord) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_family_row(&mut tx, k).await?;
        insert_key_row(&mut tx, k).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!("{KEY_SELECT} WHERE k.id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn get_key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!("{KEY_SELECT} WHERE k.hash = $1"))
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self, f: &KeyFilter, page: &PageRequest) -> Result<Vec<KeyRecord>> {
        let mut q = Sql::new(KEY_SELECT);
        q.push(" WHERE 1 = 1");
        if let Some(t) = &f.tenant_id {
            q.push(" AND k.tenant_id = ").push_bind(t.as_str());
        }
        if let Some(kind) = f.kind {
            q.push(" AND k.kind = ").push_bind(kind.as_str());
        }
        if let Some(s) = f.status {
            q.push(" AND k.status = ").push_bind(s.as_str());
        }
        if let Some(u) = &f.user_id {
            q.push(" AND k.user_id = ").push_bind(u.as_str());
        }
        if let Some(n) = &f.name_contains {
            q.push(" AND lower(k.name) LIKE lower(")
                .push_bind(contains_pattern(n))
                .push(") ESCAPE '\\'");
        }
        q.page("k.id", page);
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn update_key(&self, k: &KeyRecord, expected_updated_at: i64) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE keys SET name = $1, scopes = $2, allowed_ips = $3, allowed_origins = $4, \
             rate_limit = $5, rate_window = $6, expires_at = $7, rotation_days = $8, metadata = $9, \
             updated_at = $10 WHERE id = $11 AND updated_at = $12 AND status IN ('active', 'grace')",
        )
        .bind(&k.name)
        .bind(json_list(k.scopes.to_strings()))
        .bind(json_list(k.allowed_ips.to_strings()))
        .bind(json_list(k.allowed_origins.to_strings()))
        .bind(k.rate_limit.map(|r| i64::from(r.limit)))
        .bind(k.rate_limit.map(|r| i64::from(r.window_seconds)))
        .bind(k.expires_at_ms)
        .bind(k.rotation_days.map(i64::from))
        .bind(serde_json::Value::Object(k.metadata.clone()).to_string())
        .bind(k.updated_at_ms)
        .bind(k.id.as_str())
        .bind(expected_updated_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !done {
            return Ok(false);
        }
        sqlx::query("UPDATE key_families SET budget = $1 WHERE id = $2")
            .bind(k.budget.map(to_i64))
            .bind(k.family_id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn rotate_key(
        &self,
        old_id: &KeyId,
        grace_until_ms: i64,
        successor: &KeyRecord,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE keys SET status = 'grace', rotated_to = $1, updated_at = $2, \
             expires_at = CASE WHEN expires_at IS NOT NULL AND expires_at < $3 THEN expires_at ELSE $3 END \
             WHERE id = $4 AND status IN ('active', 'grace') AND rotated_to IS NULL",
        )
        .bind(successor.id.as_str())
        .bind(successor.created_at_ms)
        .bind(grace_until_ms)
        .bind(old_id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed != 1 {
            return Ok(false);
        }
        insert_key_row(&mut tx, successor).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_key(&self, id: &KeyId, now_ms: i64) -> Result<Option<KeyRecord>> {
        sqlx::query(
            "UPDATE keys SET status = 'revoked', revoked_at = COALESCE(revoked_at, $1), updated_at = $1 \
             WHERE id = $2",
        )
        .bind(now_ms)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        self.get_key(id).await
    }

    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (id, at) in used {
            sqlx::query(
                "UPDATE keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(at)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_live_keys(&self, tenant_id: &TenantId, now_ms: i64, mark: &str) -> Result<u64> {
        live_keys(&mut *self.pool.acquire().await?, tenant_id, now_ms, mark).await
    }

    async fn insert_key_capped(&self, k: &KeyRecord, max: u64, mark: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        if self.backend() == crate::Backend::Postgres {
            // One maker per tenant at a time (SQLite's write transaction holds the file).
            sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
                .bind(k.tenant_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        }
        if live_keys(&mut tx, &k.tenant_id, k.created_at_ms, mark).await? >= max {
            return Ok(false);
        }
        insert_family_row(&mut tx, k).await?;
        insert_key_row(&mut tx, k).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn count_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(n))
    }

    async fn withdraw_budget(&self, family_id: &FamilyId, want: u64) -> Result<Grant> {
        // SET expressions all read the row as it was before the update, so `last_grant`
        // records exactly what this statement took: one atomic statement, no read-modify-write.
        let row = sqlx::query(
            "UPDATE key_families SET \
               last_grant = CASE WHEN budget IS NULL THEN $1 ELSE (CASE WHEN budget - spent <= 0 THEN 0 WHEN budget - spent < $1 THEN budget - spent ELSE $1 END) END, \
               spent = spent + CASE WHEN budget IS NULL THEN 0 ELSE (CASE WHEN budget - spent <= 0 THEN 0 WHEN budget - spent < $1 THEN budget - spent ELSE $1 END) END \
             WHERE id = $2 RETURNING last_grant, budget - spent AS remaining",
        )
        .bind(to_i64(want))
        .bind(family_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Grant {
                granted: to_u64(r.try_get("last_grant")?),
                remaining: r
                    .try_get::<Option<i64>, _>("remaining")?
                    .map_or(u64::MAX, to_u64),
            }),
            None => Ok(Grant {
                granted: 0,
                remaining: 0,
            }),
        }
    }

    async fn refund_budget(&self, family_id: &FamilyId, amount: u64) -> Result<()> {
        sqlx::query("UPDATE key_families SET spent = CASE WHEN spent > $1 THEN spent - $1 ELSE 0 END WHERE id = $2")
            .bind(to_i64(amount))
            .bind(family_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn withdraw_credits(&self, tenant_id: &TenantId, want: u64) -> Result<Withdrawal> {
        let row = sqlx::query(
            "UPDATE tenants SET \
               last_grant = CASE WHEN credits IS NULL THEN -1 ELSE (CASE WHEN credits <= 0 THEN 0 WHEN credits < $1 THEN credits ELSE $1 END) END, \
               credits = CASE WHEN credits IS NULL THEN NULL ELSE credits - (CASE WHEN credits <= 0 THEN 0 WHEN credits < $1 THEN credits ELSE $1 END) END \
             WHERE id = $2 RETURNING last_grant, credits",
        )
        .bind(to_i64(want))
        .bind(tenant_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(Withdrawal::Granted(Grant {
                granted: 0,
                remaining: 0,
            })),
            Some(r) => {
                let g: i64 = r.try_get("last_grant")?;
                Ok(if g < 0 {
                    Withdrawal::Unlimited
                } else {
                    Withdrawal::Granted(Grant {
                        granted: to_u64(g),
                        remaining: to_u64(r.try_get::<Option<i64>, _>("credits")?.unwrap_or(0)),
                    })
                })
            }
        }
    }

    async fn publish_change(&self, change: &str) -> Result<()> {
        self.notify(change).await
    }

    async fn subscribe(&self) -> Result<Option<Box<dyn crate::ChangeFeed>>> {
        self.listen().await
    }

    async fn refund_credits(&self, tenant_id: &TenantId, amount: u64) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET credits = credits + $1 WHERE id = $2 AND credits IS NOT NULL",
        )
        .bind(to_i64(amount))
        .bind(tenant_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

async fn insert_tenant_row(conn: &mut AnyConnection, t: &Tenant) -> Result<()> {
    sqlx::query(
        "INSERT INTO tenants (id, name, plan, credits, created_at, plan_started_at, trial_ends_at, \
         verified) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(t.id.as_str())
    .bind(&t.name)
    .bind(&t.plan)
    .bind(t.credits.map(to_i64))
    .bind(t.created_at_ms)
    .bind(t.plan_started_at_ms)
    .bind(t.trial_ends_at_ms)
    .bind(i64::from(t.verified))
    .execute(conn)
    .await?;
    Ok(())
}

/// Live keys of a tenant at `now_ms`, leaving out those whose metadata holds `mark: true`.
async fn live_keys(
    conn: &mut AnyConnection,
    tenant_id: &TenantId,
    now_ms: i64,
    mark: &str,
) -> Result<u64> {
    // Metadata is stored as serde_json writes it: `"mark":true`, no spaces. `_` and `%` in
    // the mark are literal (escaped), so `"dashboard-session"` is not mistaken for it.
    let marked = contains_pattern(&format!("{}:true", serde_json::Value::from(mark)));
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM keys WHERE tenant_id = $1 AND status <> 'revoked' \
         AND (expires_at IS NULL OR expires_at > $2) AND metadata NOT LIKE $3 ESCAPE '\\'",
    )
    .bind(tenant_id.as_str())
    .bind(now_ms)
    .bind(marked)
    .fetch_one(conn)
    .await?;
    Ok(to_u64(n))
}

/// Marks every unused invitation of `email` to `tenant_id` used.
async fn spend_invitations(
    conn: &mut AnyConnection,
    tenant_id: &TenantId,
    email: &str,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE email_tokens SET used_at = $1 WHERE purpose = 'invite' AND tenant_id = $2 \
         AND email = $3 AND used_at IS NULL",
    )
    .bind(now_ms)
    .bind(tenant_id.as_str())
    .bind(email)
    .execute(conn)
    .await?;
    Ok(())
}

/// Revokes every live OAuth grant of a user: the ids.
async fn revoke_grants_of(
    conn: &mut AnyConnection,
    user_id: &UserId,
    now_ms: i64,
    reason: &str,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE oauth_grants SET revoked_at = $1, revoked_reason = $2 \
         WHERE user_id = $3 AND revoked_at IS NULL RETURNING id",
    )
    .bind(now_ms)
    .bind(reason)
    .bind(user_id.as_str())
    .fetch_all(conn)
    .await?)
}

/// A proven address of the account's owner verifies the account.
async fn verify_owners_account(conn: &mut AnyConnection, user: &User) -> Result<()> {
    if user.role == keygate_core::access::Role::Owner {
        sqlx::query("UPDATE tenants SET verified = 1 WHERE id = $1")
            .bind(user.tenant_id.as_str())
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Marks a live link of `purpose` used, once: the user it acts for, if it was live.
async fn spend_token(
    conn: &mut AnyConnection,
    hash: &str,
    purpose: &str,
    now_ms: i64,
) -> Result<Option<String>> {
    let user: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE email_tokens SET used_at = $1 WHERE hash = $2 AND purpose = $3 \
         AND used_at IS NULL AND expires_at > $1 RETURNING user_id",
    )
    .bind(now_ms)
    .bind(hash)
    .bind(purpose)
    .fetch_optional(conn)
    .await?;
    Ok(user.flatten())
}

async fn insert_user_row(conn: &mut AnyConnection, u: &User) -> Result<()> {
    sqlx::query(
        "INSERT INTO users (id, tenant_id, email, name, plan, password_hash, created_at, role, \
         verified, sessions_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(u.id.as_str())
    .bind(u.tenant_id.as_str())
    .bind(&u.email)
    .bind(&u.name)
    .bind(&u.plan)
    .bind(&u.password_hash)
    .bind(u.created_at_ms)
    .bind(u.role.as_str())
    .bind(i64::from(u.verified))
    .bind(u.sessions_from_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// The family row of a key that starts one (a rotation successor joins its predecessor's).
async fn insert_family_row(conn: &mut AnyConnection, k: &KeyRecord) -> Result<()> {
    if k.starts_family() {
        sqlx::query("INSERT INTO key_families (id, budget, spent) VALUES ($1, $2, $3)")
            .bind(k.family_id.as_str())
            .bind(k.budget.map(to_i64))
            .bind(to_i64(k.budget_withdrawn))
            .execute(conn)
            .await?;
    }
    Ok(())
}

async fn insert_key_row(conn: &mut AnyConnection, k: &KeyRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO keys (id, family_id, tenant_id, user_id, kind, name, hash, display, scopes, \
         allowed_ips, allowed_origins, rate_limit, rate_window, expires_at, rotation_days, metadata, \
         status, rotated_from, rotated_to, created_at, updated_at, last_used_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)",
    )
    .bind(k.id.as_str())
    .bind(k.family_id.as_str())
    .bind(k.tenant_id.as_str())
    .bind(k.user_id.as_deref())
    .bind(k.kind.as_str())
    .bind(&k.name)
    .bind(&k.hash.as_bytes()[..])
    .bind(&k.display)
    .bind(json_list(k.scopes.to_strings()))
    .bind(json_list(k.allowed_ips.to_strings()))
    .bind(json_list(k.allowed_origins.to_strings()))
    .bind(k.rate_limit.map(|r| i64::from(r.limit)))
    .bind(k.rate_limit.map(|r| i64::from(r.window_seconds)))
    .bind(k.expires_at_ms)
    .bind(k.rotation_days.map(i64::from))
    .bind(serde_json::Value::Object(k.metadata.clone()).to_string())
    .bind(k.status.as_str())
    .bind(k.rotated_from.as_deref())
    .bind(k.rotated_to.as_deref())
    .bind(k.created_at_ms)
    .bind(k.updated_at_ms)
    .bind(k.last_used_at_ms)
    .bind(k.revoked_at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

//! The OAuth tables: one implementation for both backends (see `audit.rs` for the pattern).
//!
//! Single use is enforced by the database: a code or refresh token is consumed by a conditional
//! `UPDATE … WHERE used_at IS NULL`, so of two nodes racing with the same token exactly one wins
//! and the other sees a reuse.

use crate::rows::{id, json_list, opt_id, parse_list, user_from_row};
use crate::sql::Sql;
use crate::{
    AuthCode, CodeUse, LoginThrottle, OAuthClient, OAuthGrant, PageRequest, RefreshToken,
    RefreshUse, SigningKey, User,
};
use sqlx::any::AnyRow;
use sqlx::Row;

fn client_from(r: &AnyRow) -> crate::Result<OAuthClient> {
    let uris: String = r.try_get("redirect_uris")?;
    let scopes: String = r.try_get("scopes")?;
    Ok(OAuthClient {
        id: r.try_get("id")?,
        tenant_id: id(r, "tenant_id")?,
        name: r.try_get("name")?,
        client_type: r.try_get("client_type")?,
        secret_hash: r.try_get("secret_hash")?,
        redirect_uris: parse_list(&uris, "client redirect_uris")?,
        scopes: parse_list(&scopes, "client scopes")?,
        created_at_ms: r.try_get("created_at")?,
    })
}

fn code_from(r: &AnyRow) -> crate::Result<AuthCode> {
    Ok(AuthCode {
        hash: r.try_get("hash")?,
        client_id: r.try_get("client_id")?,
        tenant_id: id(r, "tenant_id")?,
        user_id: id(r, "user_id")?,
        redirect_uri: r.try_get("redirect_uri")?,
        challenge: r.try_get("challenge")?,
        scope: r.try_get("scope")?,
        created_at_ms: r.try_get("created_at")?,
        expires_at_ms: r.try_get("expires_at")?,
        used_at_ms: r.try_get("used_at")?,
        grant_id: r.try_get("grant_id")?,
    })
}

fn grant_from(r: &AnyRow) -> crate::Result<OAuthGrant> {
    Ok(OAuthGrant {
        id: r.try_get("id")?,
        client_id: r.try_get("client_id")?,
        tenant_id: id(r, "tenant_id")?,
        user_id: opt_id(r, "user_id")?,
        scope: r.try_get("scope")?,
        created_at_ms: r.try_get("created_at")?,
        expires_at_ms: r.try_get("expires_at")?,
        revoked_at_ms: r.try_get("revoked_at")?,
        revoked_reason: r.try_get("revoked_reason")?,
    })
}

fn refresh_from(r: &AnyRow) -> crate::Result<RefreshToken> {
    Ok(RefreshToken {
        hash: r.try_get("hash")?,
        grant_id: r.try_get("grant_id")?,
        created_at_ms: r.try_get("created_at")?,
        used_at_ms: r.try_get("used_at")?,
    })
}

fn signing_key_from(r: &AnyRow) -> crate::Result<SigningKey> {
    Ok(SigningKey {
        kid: r.try_get("kid")?,
        alg: r.try_get("alg")?,
        private_key: r.try_get("private_key")?,
        public_x: r.try_get("public_x")?,
        created_at_ms: r.try_get("created_at")?,
        retired_at_ms: r.try_get("retired_at")?,
    })
}

#[async_trait::async_trait]
impl crate::OAuthStore for crate::SqlStore {
    async fn insert_client(&self, c: &OAuthClient) -> crate::Result<()> {
        let mut q = Sql::new(
            "INSERT INTO oauth_clients (id, tenant_id, name, client_type, secret_hash, \
             redirect_uris, scopes, created_at) ",
        );
        q.push_values([()], |mut b, ()| {
            b.push_bind(&c.id)
                .push_bind(c.tenant_id.as_str())
                .push_bind(&c.name)
                .push_bind(&c.client_type)
                .push_bind(&c.secret_hash)
                .push_bind(json_list(c.redirect_uris.clone()))
                .push_bind(json_list(c.scopes.clone()))
                .push_bind(c.created_at_ms);
        });
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn get_client(&self, id: &str) -> crate::Result<Option<OAuthClient>> {
        self.row_where("SELECT * FROM oauth_clients WHERE id = $1", id, client_from)
            .await
    }

    async fn list_clients(
        &self,
        tenant_id: Option<&str>,
        page: &PageRequest,
    ) -> crate::Result<Vec<OAuthClient>> {
        let mut q = Sql::new("SELECT * FROM oauth_clients WHERE 1 = 1");
        if let Some(t) = tenant_id {
            q.push(" AND tenant_id = ").push_bind(t);
        }
        q.page("id", page);
        let rows = q.build()?.fetch_all(&self.pool).await?;
        rows.iter().map(client_from).collect()
    }

    async fn delete_client(&self, id: &str, now_ms: i64) -> crate::Result<Vec<String>> {
        let mut tx = self.begin_write().await?;
        // The client row goes first: on PostgreSQL that locks it, so a grant being made for it
        // (which reads the row `FOR SHARE`, see `client_live`) either committed before and is
        // revoked below, or waits and then finds no client.
        let r = Sql::new("DELETE FROM oauth_clients WHERE id = ")
            .push_bind(id)
            .build()?
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(Vec::new());
        }
        let grants: Vec<String> = Sql::new("UPDATE oauth_grants SET revoked_at = ")
            .push_bind(now_ms)
            .push(", revoked_reason = 'client_deleted' WHERE revoked_at IS NULL AND client_id = ")
            .push_bind(id)
            .push(" RETURNING id")
            .build()?
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        tx.commit().await?;
        let mut out = grants;
        out.insert(0, id.to_owned());
        Ok(out)
    }

    async fn get_user_by_email(
        &self,
        tenant_id: &keygate_core::TenantId,
        email: &str,
    ) -> crate::Result<Option<User>> {
        let row = Sql::new("SELECT * FROM users WHERE removed_at IS NULL AND tenant_id = ")
            .push_bind(tenant_id.as_str())
            .push(" AND email = ")
            .push_bind(email)
            .build()?
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_code(&self, c: &AuthCode) -> crate::Result<()> {
        let mut q = Sql::new(
            "INSERT INTO oauth_codes (hash, client_id, tenant_id, user_id, redirect_uri, \
             challenge, scope, created_at, expires_at, used_at, grant_id) ",
        );
        q.push_values([()], |mut b, ()| {
            b.push_bind(&c.hash)
                .push_bind(&c.client_id)
                .push_bind(c.tenant_id.as_str())
                .push_bind(c.user_id.as_str())
                .push_bind(&c.redirect_uri)
                .push_bind(&c.challenge)
                .push_bind(&c.scope)
                .push_bind(c.created_at_ms)
                .push_bind(c.expires_at_ms)
                .push_bind(c.used_at_ms)
                .push_bind(&c.grant_id);
        });
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn get_code(&self, hash: &str) -> crate::Result<Option<AuthCode>> {
        self.row_where("SELECT * FROM oauth_codes WHERE hash = $1", hash, code_from)
            .await
    }

    async fn use_code(
        &self,
        hash: &str,
        grant: &OAuthGrant,
        refresh: &RefreshToken,
        now_ms: i64,
    ) -> crate::Result<CodeUse> {
        // One transaction: a reuse that races this exchange waits for it and then
        // finds the grant stored, so revoking it cannot miss.
        let mut tx = self.begin_write().await?;
        // A code of a client deleted meanwhile (another node may still have had the client
        // cached) makes no grant.
        if !client_live(&mut tx, self.backend(), &grant.client_id).await? {
            return Ok(CodeUse::Unknown);
        }
        let won = Sql::new("UPDATE oauth_codes SET used_at = ")
            .push_bind(now_ms)
            .push(", grant_id = ")
            .push_bind(&grant.id)
            .push(" WHERE used_at IS NULL AND hash = ")
            .push_bind(hash)
            .build()?
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let row = Sql::new("SELECT * FROM oauth_codes WHERE hash = ")
            .push_bind(hash)
            .build()?
            .fetch_optional(&mut *tx)
            .await?;
        let out = match row.as_ref().map(code_from).transpose()? {
            Some(c) if won => {
                insert_grant(&mut tx, grant).await?;
                insert_refresh(&mut tx, refresh).await?;
                CodeUse::Fresh(c)
            }
            Some(c) => CodeUse::Reused(c),
            None => CodeUse::Unknown,
        };
        tx.commit().await?;
        Ok(out)
    }

    async fn insert_grant(
        &self,
        g: &OAuthGrant,
        refresh: Option<&RefreshToken>,
    ) -> crate::Result<()> {
        let mut tx = self.begin_write().await?;
        insert_grant(&mut tx, g).await?;
        if let Some(rt) = refresh {
            insert_refresh(&mut tx, rt).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn client_grant(&self, candidate: &OAuthGrant) -> crate::Result<Option<OAuthGrant>> {
        let mut tx = self.begin_write().await?;
        if !client_live(&mut tx, self.backend(), &candidate.client_id).await? {
            return Ok(None);
        }
        let row =
            Sql::new("SELECT * FROM oauth_grants WHERE revoked_at IS NULL AND user_id IS NULL")
                .push(" AND expires_at = ")
                .push_bind(crate::STANDING_GRANT_EXPIRES)
                .push(" AND client_id = ")
                .push_bind(&candidate.client_id)
                .push(" ORDER BY created_at DESC LIMIT 1")
                .build()?
                .fetch_optional(&mut *tx)
                .await?;
        let grant = match row.as_ref().map(grant_from).transpose()? {
            Some(g) => g,
            None => {
                let g = OAuthGrant {
                    user_id: None,
                    expires_at_ms: crate::STANDING_GRANT_EXPIRES,
                    revoked_at_ms: None,
                    revoked_reason: None,
                    ..candidate.clone()
                };
                insert_grant(&mut tx, &g).await?;
                g
            }
        };
        tx.commit().await?;
        Ok(Some(grant))
    }

    async fn get_grant(&self, id: &str) -> crate::Result<Option<OAuthGrant>> {
        self.row_where("SELECT * FROM oauth_grants WHERE id = $1", id, grant_from)
            .await
    }

    async fn revoke_grant(&self, id: &str, now_ms: i64, reason: &str) -> crate::Result<bool> {
        let r = Sql::new("UPDATE oauth_grants SET revoked_at = ")
            .push_bind(now_ms)
            .push(", revoked_reason = ")
            .push_bind(reason)
            .push(" WHERE revoked_at IS NULL AND id = ")
            .push_bind(id)
            .build()?
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn use_refresh(
        &self,
        hash: &str,
        successor: &RefreshToken,
        now_ms: i64,
    ) -> crate::Result<RefreshUse> {
        // Two statements and no transaction (on SQLite, behind the write gate): the successor
        // is stored first, in the presented token's family, only while that token is unused;
        // then the token is consumed by a conditional update. Whoever's update does not win
        // deletes its successor. A crash between the two leaves either the presented token
        // unused (the client retries it) or a successor no one knows the value of: nothing
        // that works twice, nothing a client holds lost.
        let _gate = self.write_gate().await?;
        Sql::new("INSERT INTO oauth_refresh_tokens (hash, grant_id, created_at, used_at) SELECT ")
            .push_bind(successor.hash.as_str())
            .push(", grant_id, ")
            .push_bind(successor.created_at_ms)
            .push(", NULL FROM oauth_refresh_tokens WHERE used_at IS NULL AND hash = ")
            .push_bind(hash)
            .build()?
            .execute(&self.pool)
            .await?;
        let won = Sql::new("UPDATE oauth_refresh_tokens SET used_at = ")
            .push_bind(now_ms)
            .push(" WHERE used_at IS NULL AND hash = ")
            .push_bind(hash)
            .push(" RETURNING *")
            .build()?
            .fetch_optional(&self.pool)
            .await?;
        if let Some(rt) = won.as_ref().map(refresh_from).transpose()? {
            return Ok(RefreshUse::Fresh(rt));
        }
        let row = Sql::new("SELECT * FROM oauth_refresh_tokens WHERE hash = ")
            .push_bind(hash)
            .build()?
            .fetch_optional(&self.pool)
            .await?;
        let out = match row.as_ref().map(refresh_from).transpose()? {
            Some(rt) => RefreshUse::Reused(rt),
            None => RefreshUse::Unknown,
        };
        // The successor no one will hold. Failing to delete it leaves an unused row whose
        // value nobody knows: the reuse must still be answered.
        let gone = Sql::new("DELETE FROM oauth_refresh_tokens WHERE used_at IS NULL AND hash = ")
            .push_bind(successor.hash.as_str())
            .build()?
            .execute(&self.pool)
            .await;
        if let Err(e) = gone {
            tracing::warn!("could not delete an unissued refresh token: {e}");
        }
        Ok(out)
    }

    async fn get_refresh_grant(
        &self,
        hash: &str,
    ) -> crate::Result<Option<(RefreshToken, OAuthGrant)>> {
        let row = Sql::new(
            "SELECT r.hash AS r_hash, r.grant_id AS r_grant_id, r.created_at AS r_created_at, \
             r.used_at AS r_used_at, g.* FROM oauth_refresh_tokens r \
             JOIN oauth_grants g ON g.id = r.grant_id WHERE r.hash = ",
        )
        .push_bind(hash)
        .build()?
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let rt = RefreshToken {
            hash: r.try_get("r_hash")?,
            grant_id: r.try_get("r_grant_id")?,
            created_at_ms: r.try_get("r_created_at")?,
            used_at_ms: r.try_get("r_used_at")?,
        };
        Ok(Some((rt, grant_from(&r)?)))
    }

    async fn get_refresh(&self, hash: &str) -> crate::Result<Option<RefreshToken>> {
        self.row_where(
            "SELECT * FROM oauth_refresh_tokens WHERE hash = $1",
            hash,
            refresh_from,
        )
        .await
    }

    async fn revoke_access_token(
        &self,
        jti: &str,
        grant_id: &str,
        expires_at_ms: i64,
    ) -> crate::Result<()> {
        let mut q = Sql::new("INSERT INTO oauth_revoked_tokens (jti, grant_id, expires_at) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(jti)
                .push_bind(grant_id)
                .push_bind(expires_at_ms);
        });
        q.push(" ON CONFLICT (jti) DO NOTHING");
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn access_token_revoked(&self, jti: &str) -> crate::Result<bool> {
        let row = Sql::new("SELECT jti FROM oauth_revoked_tokens WHERE jti = ")
            .push_bind(jti)
            .build()?
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn has_consent(
        &self,
        user_id: &str,
        client_id: &str,
        scope: &str,
    ) -> crate::Result<bool> {
        let row = Sql::new("SELECT created_at FROM oauth_consents WHERE user_id = ")
            .push_bind(user_id)
            .push(" AND client_id = ")
            .push_bind(client_id)
            .push(" AND scope = ")
            .push_bind(scope)
            .build()?
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn insert_consent(
        &self,
        user_id: &str,
        client_id: &str,
        scope: &str,
        now_ms: i64,
    ) -> crate::Result<()> {
        let mut q = Sql::new("INSERT INTO oauth_consents (user_id, client_id, scope, created_at) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(user_id)
                .push_bind(client_id)
                .push_bind(scope)
                .push_bind(now_ms);
        });
        q.push(" ON CONFLICT (user_id, client_id, scope) DO NOTHING");
        q.build()?.execute(&self.pool).await?;
        Ok(())
    }

    async fn signing_keys(&self) -> crate::Result<Vec<SigningKey>> {
        let rows = Sql::new("SELECT * FROM oauth_signing_keys ORDER BY created_at DESC, kid DESC")
            .build()?
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(signing_key_from).collect()
    }

    async fn add_signing_key(&self, k: &SigningKey, retire_before_ms: i64) -> crate::Result<()> {
        let mut tx = self.begin_write().await?;
        Sql::new("UPDATE oauth_signing_keys SET retired_at = ")
            .push_bind(k.created_at_ms)
            .push(" WHERE retired_at IS NULL AND created_at < ")
            .push_bind(retire_before_ms)
            .build()?
            .execute(&mut *tx)
            .await?;
        let mut q = Sql::new(
            "INSERT INTO oauth_signing_keys (kid, alg, private_key, public_x, created_at, \
             retired_at) ",
        );
        q.push_values([()], |mut b, ()| {
            b.push_bind(&k.kid)
                .push_bind(&k.alg)
                .push_bind(&k.private_key)
                .push_bind(&k.public_x)
                .push_bind(k.created_at_ms)
                .push_bind(k.retired_at_ms);
        });
        q.build()?.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn shared_secret(
        &self,
        name: &str,
        candidate: &str,
        now_ms: i64,
    ) -> crate::Result<String> {
        let mut q = Sql::new("INSERT INTO server_secrets (name, value, created_at) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(name).push_bind(candidate).push_bind(now_ms);
        });
        q.push(" ON CONFLICT (name) DO NOTHING");
        q.build()?.execute(&self.pool).await?;
        let row = Sql::new("SELECT value FROM server_secrets WHERE name = ")
            .push_bind(name)
            .build()?
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    async fn get_login_throttle(&self, subject: &str) -> crate::Result<Option<LoginThrottle>> {
        let row: Option<(i64, i64, i64)> =
            Sql::new("SELECT failures, last_at, next_at FROM login_throttle WHERE subject = ")
                .push_bind(subject)
                .build_query_as()?
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(failures, last_ms, next_ms)| LoginThrottle {
            failures: u32::try_from(failures.max(0)).unwrap_or(u32::MAX),
            last_ms,
            next_ms,
        }))
    }

    async fn swap_login_throttle(
        &self,
        subject: &str,
        expected: Option<&LoginThrottle>,
        new: Option<&LoginThrottle>,
    ) -> crate::Result<bool> {
        let mut q = match (expected, new) {
            (None, None) => return Ok(true),
            (None, Some(n)) => {
                let mut q =
                    Sql::new("INSERT INTO login_throttle (subject, failures, last_at, next_at) ");
                q.push_values([()], |mut b, ()| {
                    b.push_bind(subject)
                        .push_bind(i64::from(n.failures))
                        .push_bind(n.last_ms)
                        .push_bind(n.next_ms);
                });
                q.push(" ON CONFLICT (subject) DO NOTHING");
                q
            }
            (Some(e), new) => {
                let mut q = match new {
                    Some(n) => {
                        let mut q = Sql::new("UPDATE login_throttle SET failures = ");
                        q.push_bind(i64::from(n.failures))
                            .push(", last_at = ")
                            .push_bind(n.last_ms)
                            .push(", next_at = ")
                            .push_bind(n.next_ms);
                        q
                    }
                    None => Sql::new("DELETE FROM login_throttle"),
                };
                q.push(" WHERE subject = ")
                    .push_bind(subject)
                    .push(" AND failures = ")
                    .push_bind(i64::from(e.failures))
                    .push(" AND last_at = ")
                    .push_bind(e.last_ms)
                    .push(" AND next_at = ")
                    .push_bind(e.next_ms);
                q
            }
        };
        Ok(q.build()?.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn prune_login_throttles(&self, before_ms: i64) -> crate::Result<u64> {
        Ok(Sql::new("DELETE FROM login_throttle WHERE last_at < ")
            .push_bind(before_ms)
            .build()?
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

/// Whether the client exists, read inside the caller's write transaction; on PostgreSQL the
/// row is held `FOR SHARE` until it ends, so a `delete_client` waits for the grant being made
/// (and then revokes it) or this waits for the delete (and finds no client).
async fn client_live(
    conn: &mut sqlx::AnyConnection,
    backend: crate::Backend,
    client_id: &str,
) -> crate::Result<bool> {
    let mut q = Sql::new("SELECT id FROM oauth_clients WHERE id = ");
    q.push_bind(client_id);
    if backend == crate::Backend::Postgres {
        q.push(" FOR SHARE");
    }
    Ok(q.build()?.fetch_optional(conn).await?.is_some())
}

/// Inserts a grant inside the caller's transaction.
async fn insert_grant(conn: &mut sqlx::AnyConnection, g: &OAuthGrant) -> crate::Result<()> {
    let mut q = Sql::new(
        "INSERT INTO oauth_grants (id, client_id, tenant_id, user_id, scope, \
         created_at, expires_at, revoked_at, revoked_reason) ",
    );
    q.push_values([()], |mut b, ()| {
        b.push_bind(g.id.as_str())
            .push_bind(g.client_id.as_str())
            .push_bind(g.tenant_id.as_str())
            .push_bind(g.user_id.as_deref())
            .push_bind(g.scope.as_str())
            .push_bind(g.created_at_ms)
            .push_bind(g.expires_at_ms)
            .push_bind(g.revoked_at_ms)
            .push_bind(g.revoked_reason.as_deref());
    });
    q.build()?.execute(conn).await?;
    Ok(())
}

/// Inserts a refresh token inside the caller's transaction.
async fn insert_refresh(conn: &mut sqlx::AnyConnection, rt: &RefreshToken) -> crate::Result<()> {
    let mut q = Sql::new("INSERT INTO oauth_refresh_tokens (hash, grant_id, created_at, used_at) ");
    q.push_values([()], |mut b, ()| {
        b.push_bind(rt.hash.as_str())
            .push_bind(rt.grant_id.as_str())
            .push_bind(rt.created_at_ms)
            .push_bind(rt.used_at_ms);
    });
    q.build()?.execute(conn).await?;
    Ok(())
}

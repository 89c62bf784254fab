//! Accounts over time: a plan starting, and trials that end. A trial that ends moves its
//! account to the plan's `then` on one node (a conditional update), and every node drops what
//! it held of the account's keys and pool at once.

use crate::clock::now_ms;
use crate::engine::{Change, Engine};
use crate::mail::{token_hash, NewLink};
use keygate_core::access::Role;
use keygate_core::{KeyId, KeyStatus, TenantId};
use keygate_store::{
    EmailPurpose, KeyFilter, KeyRecord, PageRequest, PlanStart, StoreError, Tenant, TenantChange,
    User,
};
use std::sync::Arc;
use std::time::Duration;

/// The supervised task that ends trials ([`run_plans`]).
pub const PLANS_TASK: &str = "plans";

/// How long before a trial ends its account hears of it (`tenant.trial_ending`).
pub const TRIAL_WARNING_MS: i64 = 3 * 86_400_000;

/// How long a password-reset link works.
pub const RESET_LINK_MS: i64 = 30 * 60_000;

/// How long an invitation link works.
pub const INVITE_LINK_MS: i64 = 7 * 86_400_000;

/// The metadata entry that marks a dashboard password session's key (a password reset ends
/// those keys).
pub const SESSION_MARK: &str = "dashboard_session";

impl Engine {
    /// `plan` starting at `at_ms`: its trial end, and the credits it grants.
    pub fn plan_start(&self, plan: &str, at_ms: i64) -> PlanStart {
        let p = self.plan(plan);
        PlanStart {
            plan: plan.to_owned(),
            started_at_ms: at_ms,
            trial_ends_at_ms: p
                .days
                .map(|d| at_ms.saturating_add(i64::from(d) * 86_400_000)),
            // A monthly plan without its own grant starts with its first month.
            grant: p.credits.or(p.monthly_credits),
        }
    }

    /// Applies `change` to a tenant and, when it started a plan, records it
    /// (`tenant.plan_changed`, audit and webhook) and has every node judge the account's keys
    /// again. `None`: no such tenant, or its condition failed (another node was first).
    pub async fn change_tenant(
        &self,
        id: &TenantId,
        change: &TenantChange,
        actor: &str,
        before: &Tenant,
    ) -> Result<Option<Tenant>, StoreError> {
        let Some(after) = self.store.change_tenant(id, change).await? else {
            return Ok(None);
        };
        if change.plan.is_none() {
            let detail = serde_json::json!({"name": after.name});
            self.record_change(Change {
                actor,
                action: "tenant.updated",
                tenant_id: id,
                key_id: None,
                user_id: None,
                detail: &detail,
            })
            .await;
        } else {
            let detail = serde_json::json!({
                "from": before.plan,
                "to": after.plan,
                "credits": after.credits,
                "trial_ends_at": after.trial_ends_at_ms.map(crate::clock::rfc3339),
                "reason": if change.if_trial.is_some() { "trial_ended" } else { "changed" },
            });
            self.record_change(Change {
                actor,
                action: "tenant.plan_changed",
                tenant_id: id,
                key_id: None,
                user_id: None,
                detail: &detail,
            })
            .await;
            self.plan_changed(id).await;
        }
        Ok(Some(after))
    }
}

impl Engine {
    /// Emails `user` the link that verifies their address (and their account, if they own
    /// it). Nothing is sent without `[smtp]`.
    pub async fn send_verification(&self, user: &User) -> Result<(), StoreError> {
        let Some(mailer) = &self.mailer else {
            return Ok(());
        };
        let ttl_ms = i64::from(self.config.signup.verify_link_hours) * 3_600_000;
        let (token, record) = NewLink {
            purpose: EmailPurpose::Verify,
            tenant_id: &user.tenant_id,
            user_id: Some(&user.id),
            email: &user.email,
            role: None,
            ttl_ms,
        }
        .make(now_ms());
        self.store.insert_email_token(&record).await?;
        let link = format!("{}/v1/signup/verify?token={token}", self.oauth.issuer);
        let hours = self.config.signup.verify_link_hours;
        mailer.send_later(
            &user.email,
            "Verify your email address",
            format!(
                "Welcome to keygate.\n\nOpen this link to verify your address; your API keys \
                 work once it is verified:\n\n{link}\n\nThe link works once, for {hours} hours. \
                 If you did not sign up, ignore this email.\n"
            ),
            "verification",
        );
        Ok(())
    }

    /// Tells the owner of `email` that someone signed up with it again (the sign-up's answer
    /// does not say that the address is registered).
    pub fn send_already_registered(&self, email: &str) {
        let Some(mailer) = &self.mailer else {
            return;
        };
        let base = &self.oauth.issuer;
        mailer.send_later(
            email,
            "Someone tried to sign up with your address",
            format!(
                "Someone, maybe you, tried to make a keygate account with this address. It has \
                 an account already, so none was made.\n\nSign in: {base}/dashboard/login\n\
                 Forgot your password? {base}/dashboard/forgot\n\nIf it was not you, you need \
                 do nothing.\n"
            ),
            "already registered",
        );
    }

    /// Emails a password-reset link to each user with `email` who signs in with a password
    /// (an address may belong to users of several accounts; at most 10).
    pub async fn send_reset(&self, email: &str) -> Result<(), StoreError> {
        let Some(mailer) = &self.mailer else {
            return Ok(());
        };
        let now = now_ms();
        for user in self.store.users_with_email(email, 10).await? {
            if user.password_hash.is_none() {
                continue;
            }
            let (token, record) = NewLink {
                purpose: EmailPurpose::Reset,
                tenant_id: &user.tenant_id,
                user_id: Some(&user.id),
                email: &user.email,
                role: None,
                ttl_ms: RESET_LINK_MS,
            }
            .make(now);
            self.store.insert_email_token(&record).await?;
            let link = format!("{}/dashboard/reset?token={token}", self.oauth.issuer);
            mailer.send_later(
                &user.email,
                "Reset your password",
                format!(
                    "Someone, maybe you, asked to reset the password of your keygate account \
                     ({}).\n\nChoose a new password here:\n\n{link}\n\nThe link works once, \
                     for 30 minutes, and signs you out everywhere. If you did not ask, ignore \
                     this email: your password stays as it is.\n",
                    user.tenant_id
                ),
                "password reset",
            );
        }
        Ok(())
    }

    /// Emails `email` a link that makes them a member of `tenant` (`inviter` names who asks).
    /// Nothing is sent (and `false` returned) without `[smtp]`.
    pub async fn send_invite(
        &self,
        tenant: &Tenant,
        email: &str,
        inviter: &str,
    ) -> Result<bool, StoreError> {
        let Some(mailer) = &self.mailer else {
            return Ok(false);
        };
        let (token, record) = NewLink {
            purpose: EmailPurpose::Invite,
            tenant_id: &tenant.id,
            user_id: None,
            email,
            role: Some(Role::Member),
            ttl_ms: INVITE_LINK_MS,
        }
        .make(now_ms());
        self.store.insert_email_token(&record).await?;
        let link = format!("{}/dashboard/invite?token={token}", self.oauth.issuer);
        mailer.send_later(
            email,
            "You are invited to a keygate account",
            // The account's name is the account's own text: it stays out of an email that goes
            // to a stranger.
            format!(
                "{inviter} invites you to a keygate account ({}).\n\nAccept and choose your \
                 password here:\n\n{link}\n\nThe link works once, for 7 days. If you did \
                 not expect this, ignore this email.\n",
                tenant.id
            ),
            "invitation",
        );
        Ok(true)
    }

    /// Accepts an invitation: `user` (its id, name and password) becomes a member of the
    /// link's account. `None`: unknown, used or expired; a conflict: a user of the account
    /// has the address already.
    pub async fn accept_invite(
        &self,
        token: &str,
        user: &User,
    ) -> Result<Option<User>, StoreError> {
        let Some(made) = self
            .store
            .redeem_invite(&token_hash(token), user, now_ms())
            .await?
        else {
            return Ok(None);
        };
        let detail = serde_json::json!({"role": "member", "via": "invitation"});
        self.record_change(Change {
            actor: made.id.as_str(),
            action: "user.created",
            tenant_id: &made.tenant_id,
            key_id: None,
            user_id: Some(&made.id),
            detail: &detail,
        })
        .await;
        Ok(Some(made))
    }

    /// Removes a member of an account: they cannot sign in any more, and every key of theirs
    /// is revoked on every node at once. `None`: no such live member.
    pub async fn remove_member(
        &self,
        id: &keygate_core::UserId,
        actor: &str,
    ) -> Result<Option<User>, StoreError> {
        let Some((user, grants)) = self.store.remove_user(id, now_ms()).await? else {
            return Ok(None);
        };
        for g in &grants {
            self.family_changed(&keygate_core::FamilyId::of_grant(g))
                .await;
        }
        // Every node judges the account's keys and tokens again: a key of the user made while
        // this ran, or a token of theirs, is refused as revoked (see `cached_key`).
        self.plan_changed(&user.tenant_id).await;
        let revoked = self
            .revoke_keys_of(&user, actor, "user removed", |_| true)
            .await?;
        let detail = serde_json::json!({"email": user.email, "keys_revoked": revoked});
        self.record_change(Change {
            actor,
            action: "user.removed",
            tenant_id: &user.tenant_id,
            key_id: None,
            user_id: Some(&user.id),
            detail: &detail,
        })
        .await;
        Ok(Some(user))
    }

    /// Whether an emailed link of `purpose` would work now; spends nothing.
    pub async fn link_live(&self, token: &str, purpose: EmailPurpose) -> Result<bool, StoreError> {
        self.store
            .email_token_live(&token_hash(token), purpose.as_str(), now_ms())
            .await
    }

    /// Opens a verification link: the user's address is verified and, when they own the
    /// account, its keys work on every node at once. `None`: unknown, used or expired.
    pub async fn verify_email(&self, token: &str) -> Result<Option<User>, StoreError> {
        let Some(user) = self
            .store
            .redeem_verification(&token_hash(token), now_ms())
            .await?
        else {
            return Ok(None);
        };
        let detail = serde_json::json!({"email": user.email});
        self.record_change(Change {
            actor: user.id.as_str(),
            action: "user.verified",
            tenant_id: &user.tenant_id,
            key_id: None,
            user_id: Some(&user.id),
            detail: &detail,
        })
        .await;
        if user.role == Role::Owner {
            self.plan_changed(&user.tenant_id).await;
        }
        Ok(Some(user))
    }

    /// Uses a reset link: the password becomes `password_hash`, and every session the user
    /// had ends: sign-in pages by `sessions_from`, OAuth grants, dashboard sessions with their
    /// keys. When the address was not verified before, this link is the first proof of who
    /// owns the account, so every key made before it goes too (whoever signed up with
    /// someone else's address keeps nothing). `None`: unknown, used or expired.
    pub async fn reset_password(
        &self,
        token: &str,
        password_hash: &str,
    ) -> Result<Option<User>, StoreError> {
        let Some(reset) = self
            .store
            .redeem_reset(&token_hash(token), password_hash, now_ms())
            .await?
        else {
            return Ok(None);
        };
        let user = reset.user;
        let detail = serde_json::json!({
            "grants_revoked": reset.grants_revoked.len(),
            "first_proof": !reset.was_verified,
        });
        self.record_change(Change {
            actor: user.id.as_str(),
            action: "user.password_reset",
            tenant_id: &user.tenant_id,
            key_id: None,
            user_id: Some(&user.id),
            detail: &detail,
        })
        .await;
        for g in &reset.grants_revoked {
            self.family_changed(&keygate_core::FamilyId::of_grant(g))
                .await;
        }
        let every_key = !reset.was_verified;
        if every_key && user.role == Role::Owner {
            self.plan_changed(&user.tenant_id).await;
        }
        self.revoke_keys_of(&user, user.id.as_str(), "password reset", |k| {
            every_key || k.metadata.get(SESSION_MARK) == Some(&serde_json::Value::Bool(true))
        })
        .await?;
        Ok(Some(user))
    }

    /// One more of `what` (`signup`, `forgot`) from `ip`'s network within the hour, against
    /// `[signup] per_ip_per_hour`: counted in Redis for every node when it is configured (this
    /// node's own count while Redis cannot be reached), else on this node.
    pub async fn per_network_hourly(
        &self,
        what: &str,
        ip: Option<std::net::IpAddr>,
    ) -> Option<keygate_core::RateDecision> {
        let who = ip.map_or_else(|| "unknown".to_owned(), crate::login::network_of);
        self.hourly(&format!("{what}:{who}"), self.config.signup.per_ip_per_hour)
            .await
    }

    /// One more of `name` within the hour, at most `limit` (0: no limit): counted in Redis for
    /// every node when it is configured (this node's own count while Redis cannot be
    /// reached), else on this node.
    pub async fn hourly(&self, name: &str, limit: u32) -> Option<keygate_core::RateDecision> {
        if limit == 0 {
            return None;
        }
        let what = name.split(':').next().unwrap_or(name);
        let rl = keygate_core::RateLimit {
            limit,
            window_seconds: 3600,
        };
        let now = now_ms();
        if let Some(shared) = &self.shared {
            match shared.check_named(name, &rl, now).await {
                Ok(d) => return Some(d),
                Err(e) => tracing::warn!("{what} limit counted on this node only (redis: {e})"),
            }
        }
        Some(self.counters.check_named(name, &rl, now))
    }

    /// The API scopes a user on `plan` may hold: the plan's `scopes`, else every scope the
    /// configured normal routes ask for. Admin, billing, webhook and token-management routes
    /// are the operator's: a user gets none of their scopes.
    pub fn plan_api_scopes(&self, plan: &str) -> Vec<String> {
        if let Some(s) = &self.plan(plan).scopes {
            return s.clone();
        }
        let mut scopes: Vec<String> = self
            .config
            .routes
            .iter()
            .filter(|r| r.class == keygate_core::RouteClass::Normal)
            .filter_map(|r| r.scope.clone())
            .filter(|s| s != "*")
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        scopes
    }

    /// Revokes, at once on every node, each live key of `user` that `which` picks (`via` says
    /// why, in the audit log). Returns how many.
    async fn revoke_keys_of(
        &self,
        user: &User,
        actor: &str,
        via: &str,
        which: impl Fn(&KeyRecord) -> bool,
    ) -> Result<u64, StoreError> {
        let filter = KeyFilter {
            tenant_id: Some(user.tenant_id.clone()),
            kind: None,
            status: None,
            user_id: Some(user.id.clone()),
            name_contains: None,
        };
        let mut page = PageRequest {
            cursor: None,
            limit: 500,
        };
        let mut revoked = 0;
        loop {
            let keys = self.store.list_keys(&filter, &page).await?;
            for k in keys
                .iter()
                .filter(|k| k.status != KeyStatus::Revoked && which(k))
            {
                if self.revoke_now(&k.id, actor, via).await?.is_some() {
                    revoked += 1;
                }
            }
            match keys.last() {
                Some(k) if keys.len() == 500 => page.cursor = Some(k.id.to_string()),
                _ => break,
            }
        }
        Ok(revoked)
    }

    /// Revokes a key at once on every node, with its audit event (`via` says why).
    pub async fn revoke_now(
        &self,
        id: &KeyId,
        actor: &str,
        via: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let Some(rec) = self.store.revoke_key(id, now_ms()).await? else {
            return Ok(None);
        };
        self.key_changed(&rec.hash).await;
        let detail = serde_json::json!({ "via": via });
        self.record_change(Change {
            actor,
            action: "key.revoked",
            tenant_id: &rec.tenant_id,
            key_id: Some(&rec.id),
            user_id: rec.user_id.as_ref(),
            detail: &detail,
        })
        .await;
        Ok(Some(rec))
    }
}

/// Ends the trials that are over and warns the accounts whose trial ends within
/// [`TRIAL_WARNING_MS`]. Returns how many trials this node ended.
pub async fn end_trials(engine: &Engine) -> usize {
    let now = now_ms();
    let due = match engine.store.trials_ending(now, 100).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("trials not checked (store): {e}");
            return 0;
        }
    };
    let mut ended = 0;
    for t in &due {
        let Some(ends) = t.trial_ends_at_ms else {
            continue;
        };
        // A plan that left the config still ends in the default one.
        let then = engine
            .config
            .plans
            .get(&t.plan)
            .and_then(|p| p.then.clone())
            .unwrap_or_else(|| "free".to_owned());
        let change = TenantChange {
            name: None,
            plan: Some(engine.plan_start(&then, ends)),
            if_trial: Some((t.plan.clone(), ends)),
        };
        match engine.change_tenant(&t.id, &change, "system", t).await {
            Ok(Some(_)) => ended += 1,
            Ok(None) => {}
            Err(e) => tracing::warn!(tenant = %t.id, "trial not ended (store): {e}"),
        }
    }
    let soon = match engine
        .store
        .trials_ending(now.saturating_add(TRIAL_WARNING_MS), 100)
        .await
    {
        Ok(s) => s,
        Err(_) => return ended,
    };
    for t in soon {
        let Some(ends) = t.trial_ends_at_ms.filter(|e| *e > now) else {
            continue;
        };
        let when = crate::clock::rfc3339(ends);
        crate::alerts::raise(
            engine,
            "tenant.trial_ending",
            &t.id,
            None,
            format!("trial_ending:{}:{ends}", t.id),
            format!("the trial of {} ends at {when}", t.id),
            serde_json::json!({"plan": t.plan, "trial_ends_at": when}),
        )
        .await;
    }
    ended
}

/// Whole months from `from_ms` to `to_ms` (UTC): a month has passed on the same day of the
/// month at the same time of day, or on the month's last day when it has fewer days.
pub fn months_between(from_ms: i64, to_ms: i64) -> u32 {
    let at = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    let (a, b) = (at(from_ms), at(to_ms));
    if b <= a {
        return 0;
    }
    let mut n = (b.year() - a.year()) * 12 + i32::from(u8::from(b.month()))
        - i32::from(u8::from(a.month()));
    // Not yet this month's anniversary: compare day and time, the day capped at the month's end.
    let last_day = b.month().length(b.year());
    let anniversary = (a.day().min(last_day), a.time());
    if (b.day(), b.time()) < anniversary {
        n -= 1;
    }
    u32::try_from(n).unwrap_or(0)
}

/// Refills the pools of plans with `monthly_credits` whose month turned: the pool is set to
/// the plan's amount (unspent credits do not roll over), once per month across nodes.
/// Returns how many this node refilled.
pub async fn refill_pools(engine: &Engine) -> usize {
    let now = now_ms();
    let mut refilled = 0;
    for (plan, cfg) in &engine.config.plans {
        let Some(amount) = cfg.monthly_credits else {
            continue;
        };
        let mut after = String::new();
        loop {
            let page = match engine.store.tenants_on_plan(plan, &after, 500).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("pools not refilled (store): {e}");
                    return refilled;
                }
            };
            for t in &page {
                let month = months_between(t.plan_started_at_ms, now);
                if month <= t.refilled_months {
                    continue;
                }
                match engine
                    .store
                    .refill_credits(&t.id, plan, t.plan_started_at_ms, month, amount)
                    .await
                {
                    Ok(Some(after)) => {
                        refilled += 1;
                        let detail = serde_json::json!({
                            "plan": plan, "month": month, "credits": after.credits,
                            "before": t.credits,
                        });
                        engine
                            .record_change(Change {
                                actor: "system",
                                action: "tenant.credits_refilled",
                                tenant_id: &t.id,
                                key_id: None,
                                user_id: None,
                                detail: &detail,
                            })
                            .await;
                        engine.tenant_changed(&t.id).await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(tenant = %t.id, "pool not refilled (store): {e}"),
                }
            }
            match page.last() {
                Some(t) if page.len() == 500 => after = t.id.to_string(),
                _ => break,
            }
        }
    }
    refilled
}

/// Ends trials and refills monthly pools every `signup.plan_check_seconds` until `stop` fires.
pub async fn run_plans(engine: Arc<Engine>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(
        engine.config.signup.plan_check_seconds.max(1),
    ));
    loop {
        crate::supervisor::checkpoint(PLANS_TASK);
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        end_trials(&engine).await;
        refill_pools(&engine).await;
    }
}

/// Why `password` may not be an account's, if it may not: 10 to 1,024 characters, and not
/// guessable: Dropbox's zxcvbn estimator must score it at least 3 of 4 ("safely
/// unguessable"), with `known` (the email address, the names) counted as known to an attacker.
pub fn password_problem(password: &str, known: &[&str]) -> Option<&'static str> {
    if password.chars().count() < 10 || password.len() > 1024 {
        return Some("password must be 10 to 1024 characters");
    }
    // The estimator's work grows with the length; 100 characters decide.
    let scored: String = password.chars().take(100).collect();
    if u8::from(zxcvbn::zxcvbn(&scored, known).score()) < 3 {
        return Some(
            "password is too easy to guess (a common password, a name or a pattern): choose a longer, less common one",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{months_between, password_problem};

    #[test]
    fn a_month_passes_on_the_same_day_and_time_or_the_months_last_day() {
        let ms = |s: &str| crate::clock::parse_rfc3339(s).expect("time");
        let jan31 = ms("2026-01-31T10:00:00Z");
        assert_eq!(months_between(jan31, ms("2026-02-27T23:00:00Z")), 0);
        assert_eq!(months_between(jan31, ms("2026-02-28T10:00:00Z")), 1);
        assert_eq!(months_between(jan31, ms("2026-03-31T09:59:59Z")), 1);
        assert_eq!(months_between(jan31, ms("2026-03-31T10:00:00Z")), 2);
        assert_eq!(months_between(jan31, ms("2027-01-31T10:00:00Z")), 12);
        assert_eq!(months_between(jan31, jan31 - 1), 0);
    }

    #[test]
    fn short_common_and_personal_passwords_are_refused() {
        for bad in [
            "short",
            "password123",
            "qwertyuiop",
            "1234567890",
            "iloveyou2024",
            "ada.lovelace",
        ] {
            assert!(
                password_problem(bad, &["ada.lovelace@example.com", "Ada"]).is_some(),
                "{bad}"
            );
        }
        assert!(password_problem(&"x".repeat(1025), &[]).is_some());
        assert_eq!(password_problem("plum-violin-87-harbour", &[]), None);
    }
}

//! Automatic rotation of keys with `rotation_days`.
//!
//! One node at a time does it: the holder of the store lease `rotation` (renewed every check,
//! taken over by another node once it lapses). For each key whose period has run out, the
//! successor is made in memory and its plaintext is sent, signed, as a `key.rotated` webhook
//! to every endpoint of the tenant that subscribed to `key.rotated.successor` (only a `*` key
//! can subscribe, only over https) — straight from memory, never through the stored queue, so
//! the plaintext is not written anywhere. Only when an endpoint has taken it
//! (a 2xx) is the rotation written: the old key enters its grace period
//! (`keys.rotation_grace_seconds`) and the successor is active. If no endpoint takes it, nothing
//! changes, an alert says why (once per key and day), and this node tries that key again an hour
//! later. If the rotation cannot be written after delivery (a revoke or manual rotation won, or
//! the store is down), a `rotation_failed` alert tells the tenant to keep the old key.

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::webhooks::SUCCESSOR_EVENT;
use std::collections::HashMap;
use std::time::Duration;

/// Keys whose rotation could not be delivered, and when to try each again (so that keys of a
/// tenant without a working endpoint do not crowd out everyone else's).
pub type Backoff = HashMap<keygate_core::KeyId, i64>;

/// Takes or renews the rotation lease; `false` if another node holds it.
async fn hold_lease(state: &Engine) -> bool {
    let now = now_ms();
    let every = i64::try_from(state.config.rotation.check_seconds.max(1)).unwrap_or(60) * 1000;
    // Long enough for a round of deliveries; renewed before every key.
    let until = now + 2 * every + 60_000;
    match state
        .store
        .acquire_lease("rotation", &state.node_id, now, until)
        .await
    {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!("automatic rotation skipped (store): {e}");
            false
        }
    }
}

/// Rotates what is due, if this node holds the lease. Returns how many keys were rotated.
pub async fn rotate_due(state: &Engine, client: &reqwest::Client, backoff: &mut Backoff) -> usize {
    if !hold_lease(state).await {
        return 0;
    }
    let now = now_ms();
    backoff.retain(|_, until| *until > now);
    let due = match state.store.keys_due_for_rotation(now, 1_000).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("automatic rotation skipped (store): {e}");
            return 0;
        }
    };
    let (mut rotated, mut tried) = (0, 0);
    for old in &due {
        if backoff.contains_key(&old.id) {
            continue;
        }
        // At most 100 deliveries a round; another node may have taken over while they were
        // slow: then it goes on.
        if tried == 100 || !hold_lease(state).await {
            break;
        }
        match rotate_one(state, client, old).await {
            Outcome::Rotated => {
                tried += 1;
                rotated += 1;
            }
            // Cheap to look again next round (and the tenant may add an endpoint any time).
            Outcome::NoTaker => {}
            Outcome::Failed => {
                tried += 1;
                backoff.insert(old.id.clone(), now_ms() + 3_600_000);
            }
        }
    }
    rotated
}

/// What happened to one due key.
enum Outcome {
    Rotated,
    /// No endpoint of the tenant subscribes to the successor: nothing was made or sent.
    NoTaker,
    /// The successor was not delivered or not written.
    Failed,
}

async fn rotate_one(
    state: &Engine,
    client: &reqwest::Client,
    old: &keygate_store::KeyRecord,
) -> Outcome {
    let now = now_ms();
    let endpoints = match state
        .store
        .list_webhooks(
            &old.tenant_id,
            &keygate_store::PageRequest {
                cursor: None,
                limit: 500,
            },
        )
        .await
    {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("automatic rotation of {} waits (store): {e}", old.id);
            return Outcome::Failed;
        }
    };
    let takers: Vec<&keygate_store::WebhookEndpoint> = endpoints
        .iter()
        .filter(|w| w.wants(SUCCESSOR_EVENT))
        .collect();
    if takers.is_empty() {
        crate::alerts::raise(
            state,
            "alert.unusual_activity",
            &old.tenant_id,
            Some(&old.id),
            format!("rotation_blocked:{}:{}", old.id, now / 86_400_000),
            format!(
                "{} is due for rotation, but no enabled webhook endpoint subscribes to {SUCCESSOR_EVENT}",
                old.id
            ),
            serde_json::json!({"rule": "rotation_blocked", "key_id": old.id}),
        )
        .await;
        return Outcome::NoTaker;
    }
    let (plaintext, succ) = crate::issue::successor(&state.issuer(), old, now);
    let grace = i64::try_from(state.config.keys.rotation_grace_seconds).unwrap_or(86_400);
    let grace_until = now + grace * 1000;
    let msg_id = crate::ids::new_id("msg", now);
    let data = |key: serde_json::Value| {
        serde_json::json!({
            "type": "key.rotated",
            "id": msg_id,
            "at": crate::clock::rfc3339(now),
            "data": {
                "tenant_id": old.tenant_id,
                "key_id": old.id,
                "successor_id": succ.id,
                "key": key,
                "grace_until": crate::clock::rfc3339(grace_until),
                "expires_at": succ.expires_at_ms.map(crate::clock::rfc3339),
                "automatic": true,
            },
        })
        .to_string()
    };
    let payload = data(plaintext.into());
    let private = state.config.webhooks.allow_private_networks;
    let mut taken = Vec::new();
    let mut errors = Vec::new();
    // Every endpoint that opted in gets it (the same webhook-id: one event).
    for w in takers {
        match crate::webhooks::send_signed(client, private, w, &msg_id, &payload, now_ms()).await {
            Ok(s) if (200..300).contains(&s) => taken.push((w.id.clone(), s)),
            Ok(s) => errors.push(format!("{}: HTTP {s}", w.id)),
            Err(_) => errors.push(format!("{}: no answer", w.id)),
        }
    }
    drop(payload);
    if taken.is_empty() {
        let why = errors.join("; ");
        crate::alerts::raise(
            state,
            "alert.unusual_activity",
            &old.tenant_id,
            Some(&old.id),
            format!("rotation_undelivered:{}:{}", old.id, now / 86_400_000),
            format!(
                "{} is due for rotation but its successor could not be delivered: {why}",
                old.id
            ),
            serde_json::json!({"rule": "rotation_blocked", "key_id": old.id}),
        )
        .await;
        return Outcome::Failed;
    }
    // Written now; a store hiccup gets a few tries, since the successor is out already.
    let mut committed = Err(String::new());
    for attempt in 0..3u32 {
        match commit_rotation(state, old, &succ, grace_until, "system", false).await {
            Ok(done) => {
                committed = Ok(done);
                break;
            }
            Err(e) => committed = Err(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    if committed != Ok(true) {
        // Rotated or revoked meanwhile, or the store is down: the delivered successor will
        // never work. Say so, so that nobody switches to it.
        crate::alerts::raise(
            state,
            "alert.unusual_activity",
            &old.tenant_id,
            Some(&old.id),
            format!("rotation_failed:{}", succ.id),
            format!(
                "the successor {} sent for {} was not activated; keep using the old key",
                succ.id, old.id
            ),
            serde_json::json!({"rule": "rotation_failed", "key_id": old.id, "successor_id": succ.id}),
        )
        .await;
        if let Err(e) = committed {
            tracing::warn!("automatic rotation of {} not written: {e}", old.id);
        }
        return Outcome::Failed;
    }
    // The delivery log shows the event, without the key.
    let logged: Vec<keygate_store::Delivery> = taken
        .into_iter()
        .map(|(endpoint_id, status)| keygate_store::Delivery {
            id: crate::ids::new_id("dlv", now),
            endpoint_id,
            tenant_id: old.tenant_id.to_string(),
            event_id: msg_id.clone(),
            event_type: "key.rotated".into(),
            payload: data("[sent once, not stored]".into()),
            attempts: 1,
            status: "delivered".into(),
            next_at_ms: now,
            last_status: Some(i64::from(status)),
            last_error: None,
            created_at_ms: now,
            delivered_at_ms: Some(now_ms()),
        })
        .collect();
    if let Err(e) = state.store.enqueue_deliveries(&logged).await {
        tracing::warn!("could not log the rotation delivery of {}: {e}", old.id);
    }
    tracing::info!(key_id = %old.id, successor = %succ.id, "key rotated automatically");
    Outcome::Rotated
}

/// Checks every `rotation.check_seconds` until `stop` fires.
/// Writes a rotation (`old` into grace until `grace_until`, `succ` active), records it, and
/// drops both keys from every node's cache. `webhook`: whether the `key.rotated` event goes
/// to the webhook queue too (automatic rotation delivers its own, with the new key).
/// `false` if a concurrent rotate or revoke won.
pub async fn commit_rotation(
    st: &Engine,
    old: &keygate_store::KeyRecord,
    succ: &keygate_store::KeyRecord,
    grace_until: i64,
    actor: &str,
    webhook: bool,
) -> Result<bool, keygate_store::StoreError> {
    let ok = st.store.rotate_key(&old.id, grace_until, succ).await?;
    if ok {
        let grace = (grace_until - succ.created_at_ms).max(0) / 1000;
        let detail = serde_json::json!({"successor": succ.id, "grace_seconds": grace, "automatic": !webhook});
        let (tenant, user) = (&old.tenant_id, old.user_id.as_ref());
        if webhook {
            st.record_change(crate::engine::Change {
                actor,
                action: "key.rotated",
                tenant_id: tenant,
                key_id: Some(&old.id),
                user_id: user,
                detail: &detail,
            })
            .await;
        } else {
            st.audit_change(crate::engine::Change {
                actor,
                action: "key.rotated",
                tenant_id: tenant,
                key_id: Some(&old.id),
                user_id: user,
                detail: &detail,
            });
        }
        st.key_changed(&old.hash).await;
        st.key_changed(&succ.hash).await;
        crate::origins::pk_changed(st, old.kind).await;
    }
    Ok(ok)
}

/// The rotation task's name under supervision (`crate::supervisor`).
pub const ROTATION_TASK: &str = "rotation";

pub async fn run_rotation(
    state: std::sync::Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match crate::webhooks::client(&state) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("automatic rotation disabled: no HTTP client: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(
        state.config.rotation.check_seconds.max(1),
    ));
    let mut backoff = Backoff::new();
    loop {
        crate::supervisor::checkpoint(ROTATION_TASK);
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        rotate_due(&state, &client, &mut backoff).await;
    }
}

//! Automatic rotation of keys with `rotation_days`.
//!
//! One node at a time does it: the holder of the store lease `rotation` (renewed every check,
//! taken over by another node once it lapses). For each key whose period has run out, the
//! successor is made in memory and its plaintext is sent, signed, as a `key.rotated` webhook
//! to the tenant's endpoints that take that event — straight from memory, never through the
//! stored queue, so the plaintext is not written anywhere. Only when an endpoint has taken it
//! (a 2xx) is the rotation written: the old key enters its grace period
//! (`keys.rotation_grace_seconds`) and the successor is active. If no endpoint takes it, nothing
//! changes, an alert says why (once per key and day), and the next check tries again.

use crate::state::{now_ms, AppState};
use std::time::Duration;

/// Rotates what is due, if this node holds the lease. Returns how many keys were rotated.
pub async fn rotate_due(state: &AppState, client: &reqwest::Client) -> usize {
    let now = now_ms();
    let every = i64::try_from(state.config.rotation.check_seconds.max(1)).unwrap_or(60) * 1000;
    match state
        .store
        .acquire_lease("rotation", &state.node_id, now, now + 2 * every)
        .await
    {
        Ok(true) => {}
        Ok(false) => return 0,
        Err(e) => {
            tracing::warn!("automatic rotation skipped (store): {e}");
            return 0;
        }
    }
    let due = match state.store.keys_due_for_rotation(now, 100).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("automatic rotation skipped (store): {e}");
            return 0;
        }
    };
    let mut rotated = 0;
    for old in due {
        if rotate_one(state, client, &old).await {
            rotated += 1;
        }
    }
    rotated
}

async fn rotate_one(
    state: &AppState,
    client: &reqwest::Client,
    old: &keygate_store::KeyRecord,
) -> bool {
    let now = now_ms();
    let (plaintext, succ) = crate::issue::successor(&state.issuer(), old, now);
    let grace = i64::try_from(state.config.keys.rotation_grace_seconds).unwrap_or(86_400);
    let grace_until = now + grace * 1000;
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
            return false;
        }
    };
    let msg_id = crate::ids::new_id("msg", now);
    let data = |key: serde_json::Value| {
        serde_json::json!({
            "type": "key.rotated",
            "id": msg_id,
            "at": crate::views::rfc3339(now),
            "data": {
                "tenant_id": old.tenant_id,
                "key_id": old.id,
                "successor_id": succ.id,
                "key": key,
                "grace_until": crate::views::rfc3339(grace_until),
                "expires_at": succ.expires_at_ms.map(crate::views::rfc3339),
                "automatic": true,
            },
        })
        .to_string()
    };
    let payload = data(plaintext.into());
    let mut taken = None;
    let mut errors = Vec::new();
    for w in endpoints.iter().filter(|w| w.wants("key.rotated")) {
        match crate::webhooks::send_signed(client, w, &msg_id, &payload, now).await {
            Ok(s) if (200..300).contains(&s) => {
                taken = Some((w.id.clone(), s));
                break;
            }
            Ok(s) => errors.push(format!("{}: HTTP {s}", w.id)),
            Err(e) => errors.push(format!("{}: {e}", w.id)),
        }
    }
    drop(payload);
    let Some((endpoint_id, status)) = taken else {
        let why = if errors.is_empty() {
            "no enabled webhook endpoint takes key.rotated".to_owned()
        } else {
            errors.join("; ")
        };
        crate::alerts::raise(
            state,
            "alert.unusual_activity",
            &old.tenant_id,
            Some(&old.id),
            format!("rotation_blocked:{}:{}", old.id, now / 86_400_000),
            format!(
                "{} is due for rotation but its successor could not be delivered: {why}",
                old.id
            ),
            serde_json::json!({"rule": "rotation_blocked", "key_id": old.id}),
        )
        .await;
        return false;
    };
    match crate::routes::keys::commit_rotation(state, old, &succ, grace_until, "system", false)
        .await
    {
        Ok(true) => {}
        Ok(false) => return false, // rotated or revoked meanwhile; the sent key never works
        Err(e) => {
            tracing::warn!("automatic rotation of {} not written: {e}", old.id);
            return false;
        }
    }
    // The delivery log shows the event, without the key.
    let logged = keygate_store::Delivery {
        id: crate::ids::new_id("dlv", now),
        endpoint_id,
        tenant_id: old.tenant_id.clone(),
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
    };
    if let Err(e) = state.store.enqueue_deliveries(&[logged]).await {
        tracing::warn!("could not log the rotation delivery of {}: {e}", old.id);
    }
    tracing::info!(key_id = %old.id, successor = %succ.id, "key rotated automatically");
    true
}

/// Checks every `rotation.check_seconds` until `stop` fires.
pub async fn run_rotation(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
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
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        rotate_due(&state, &client).await;
    }
}

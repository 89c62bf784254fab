//! Webhooks: events a tenant subscribes to, signed per the Standard Webhooks spec and delivered
//! from a queue in the store, so a delivery survives restarts and moves to another node if its
//! node dies mid-send.
//!
//! Signature: `webhook-id` (`msg_…`, the same on every attempt), `webhook-timestamp` (Unix
//! seconds) and `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`,
//! where the key is the base64-decoded part of the `whsec_…` secret.
//!
//! Retries: a 2xx is delivered; a `410 Gone` disables the endpoint; anything else (another
//! status, a refused connection, a timeout) is tried again after `webhooks.retry_backoff_ms`
//! (5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 3 h by default), then given up (`failed`).

use crate::state::{now_ms, AppState, Inner};
use base64::Engine;
use hmac::{Hmac, Mac};
use keygate_store::{Delivery, PageRequest};
use sha2::Sha256;
use std::time::Duration;

/// The subscription that receives the plaintext of automatically rotated keys. `*` does not
/// include it: it must be named, by a caller holding `*`, on an `https://` endpoint.
pub const SUCCESSOR_EVENT: &str = "key.rotated.successor";

/// Event types an endpoint can subscribe to (`*` for all but [`SUCCESSOR_EVENT`]).
pub const EVENT_TYPES: &[&str] = &[
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.expiring",
    "key.budget_warning",
    "key.budget_exhausted",
    "tenant.credits_low",
    "alert.unusual_activity",
    "oauth.refresh_reuse",
    "webhook.test",
];

/// Whether deliveries may go to `ip`: not loopback, private, link-local, unique-local,
/// shared (CGNAT), documentation, multicast or unspecified — unless
/// `webhooks.allow_private_networks` says so.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(v4.into()),
            None => {
                let s = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (s & 0xfe00) == 0xfc00
                    || (s & 0xffc0) == 0xfe80
                    || s == 0x2001 && v6.segments()[1] == 0xdb8)
            }
        },
    }
}

/// Resolves webhook hosts to public addresses only (checked on every connection, so a name
/// that later points inside the network is refused too).
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("the webhook host has no public address".into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A new signing secret: `whsec_` and 24 random bytes in base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    crate::ids::os_fill(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `v1,<signature>` of `body` for `msg_id` at `timestamp` with `secret` (`whsec_…`).
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

impl Inner {
    /// Queues `event_type` with `data` for every enabled endpoint of `tenant_id` that wants it
    /// (or only for `only`, a test-send). Returns the deliveries queued.
    pub async fn emit(
        &self,
        tenant_id: &str,
        event_type: &str,
        data: serde_json::Value,
        only: Option<&str>,
    ) -> Result<Vec<Delivery>, keygate_store::StoreError> {
        let mut endpoints = Vec::new();
        let mut page = PageRequest {
            cursor: None,
            limit: 500,
        };
        loop {
            let batch = self.store.list_webhooks(tenant_id, &page).await?;
            let done = batch.len() < 500;
            page.cursor = batch.last().map(|w| w.id.clone());
            endpoints.extend(batch);
            if done {
                break;
            }
        }
        let now = now_ms();
        let event_id = crate::ids::new_id("msg", now);
        let payload = serde_json::json!({
            "type": event_type,
            "id": event_id,
            "at": crate::views::rfc3339(now),
            "data": data,
        })
        .to_string();
        let deliveries: Vec<Delivery> = endpoints
            .iter()
            .filter(|w| match only {
                Some(id) => w.id == id,
                None => w.wants(event_type),
            })
            .map(|w| Delivery {
                id: crate::ids::new_id("dlv", now),
                endpoint_id: w.id.clone(),
                tenant_id: tenant_id.to_owned(),
                event_id: event_id.clone(),
                event_type: event_type.to_owned(),
                payload: payload.clone(),
                attempts: 0,
                status: "pending".into(),
                next_at_ms: now,
                last_status: None,
                last_error: None,
                created_at_ms: now,
                delivered_at_ms: None,
            })
            .collect();
        self.store.enqueue_deliveries(&deliveries).await?;
        if !deliveries.is_empty() {
            self.webhook_wake.notify_one();
        }
        Ok(deliveries)
    }
}

/// Sends due deliveries until `stop` fires: woken by new events, and every second for retries.
pub async fn run_deliveries(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let client = match client(&state) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhook deliveries disabled: no HTTP client: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = state.webhook_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(state.config.webhooks.poll_ms.max(10))) => {}
            _ = stop.changed() => return,
        }
        loop {
            let now = now_ms();
            // A claimed delivery is this node's for a minute; after that another node may
            // send it again (the receiver dedupes on webhook-id).
            let claimed = match state.store.claim_deliveries(now, now + 60_000, 32).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cannot read the webhook queue: {e}");
                    break;
                }
            };
            if claimed.is_empty() {
                break;
            }
            let mut set = tokio::task::JoinSet::new();
            for d in claimed {
                let (state, client) = (state.clone(), client.clone());
                set.spawn(async move { attempt(&state, &client, d).await });
            }
            while set.join_next().await.is_some() {}
        }
    }
}

/// Posts `payload` to `w`, signed, as message `msg_id`: the HTTP status, or why there is none.
pub async fn send_signed(
    client: &reqwest::Client,
    allow_private: bool,
    w: &keygate_store::WebhookEndpoint,
    msg_id: &str,
    payload: &str,
    now_ms: i64,
) -> Result<u16, String> {
    if let Some(why) = url_problem(&w.url, allow_private) {
        return Err(why.into());
    }
    let ts = now_ms / 1000;
    let Some(sig) = sign(&w.secret, msg_id, ts, payload) else {
        return Err("the endpoint's secret is not valid base64".into());
    };
    client
        .post(&w.url)
        .header("content-type", "application/json")
        .header("user-agent", "keygate-webhooks")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(payload.to_owned())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.without_url().to_string())
}

/// The client deliveries use: a time limit per attempt, no redirects.
pub fn client(state: &Inner) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        // Below the one-minute claim of a delivery, so no other node sends it meanwhile.
        .timeout(Duration::from_millis(
            state.config.webhooks.timeout_ms.clamp(100, 50_000),
        ))
        .redirect(reqwest::redirect::Policy::none());
    if !state.config.webhooks.allow_private_networks {
        b = b.dns_resolver(std::sync::Arc::new(PublicOnly));
    }
    b.build()
}

/// Why `url` may not receive webhooks, if it may not: not absolute http(s), credentials in
/// it, or (unless private networks are allowed) plain http or a host that is an address
/// inside the network.
pub fn url_problem(url: &str, allow_private: bool) -> Option<&'static str> {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return Some("url must be an absolute http:// or https:// URL");
    };
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Some("url must be an absolute http:// or https:// URL");
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("url must not carry credentials");
    }
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_private => {}
        Some("http") => return Some("url must be https://"),
        _ => return Some("url must be an absolute http:// or https:// URL"),
    }
    if !allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let private = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => !is_public(ip),
            Err(_) => bare.eq_ignore_ascii_case("localhost") || bare.ends_with(".localhost"),
        };
        if private {
            return Some("url must point at a public address");
        }
    }
    None
}

/// One attempt of `d`, and its outcome written back.
async fn attempt(state: &AppState, client: &reqwest::Client, mut d: Delivery) {
    let claimed_until = d.next_at_ms;
    d.attempts += 1;
    let endpoint = match state.store.get_webhook(&d.endpoint_id).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("webhook delivery {} waits: {e}", d.id);
            return; // the claim runs out and the delivery is tried again
        }
    };
    let now = now_ms();
    let outcome: Result<u16, String> = match &endpoint {
        None => Err("the endpoint was deleted".into()),
        Some(w) if !w.enabled => Err("the endpoint is disabled".into()),
        Some(w) => {
            let private = state.config.webhooks.allow_private_networks;
            send_signed(client, private, w, &d.event_id, &d.payload, now).await
        }
    };
    let gone = endpoint.is_none() || endpoint.as_ref().is_some_and(|w| !w.enabled);
    match outcome {
        Ok(s) if (200..300).contains(&s) => {
            d.status = "delivered".into();
            d.delivered_at_ms = Some(now);
            d.last_status = Some(i64::from(s));
            d.last_error = None;
        }
        Ok(410) => {
            d.status = "failed".into();
            d.last_status = Some(410);
            d.last_error = Some("410 Gone: endpoint disabled".into());
            if let Err(e) = state
                .store
                .set_webhook_enabled(&d.endpoint_id, false, Some("410 Gone"))
                .await
            {
                tracing::warn!("could not disable webhook endpoint {}: {e}", d.endpoint_id);
            }
        }
        other => {
            let (status, error) = match other {
                Ok(s) => (Some(i64::from(s)), format!("HTTP {s}")),
                Err(e) => (None, e),
            };
            d.last_status = status;
            d.last_error = Some(error);
            let schedule = &state.config.webhooks.retry_backoff_ms;
            match schedule.get(d.attempts as usize - 1) {
                Some(wait) if !gone => {
                    d.next_at_ms = now + i64::try_from(*wait).unwrap_or(i64::MAX / 2);
                }
                _ => d.status = "failed".into(),
            }
        }
    }
    if let Err(e) = state.store.finish_delivery(&d, claimed_until).await {
        tracing::warn!("could not record webhook delivery {}: {e}", d.id);
    }
}

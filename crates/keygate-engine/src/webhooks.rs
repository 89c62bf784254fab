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

use crate::clock::now_ms;
use crate::engine::Engine;
use base64::Engine as _;
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
    "tenant.created",
    "tenant.plan_changed",
    "tenant.trial_ending",
    "tenant.credits_refilled",
    "user.created",
    "user.removed",
    "alert.unusual_activity",
    "oauth.refresh_reuse",
    "webhook.test",
];

/// Whether deliveries may go to `ip`, unless `webhooks.allow_private_networks` says so.
///
/// IPv4: not "this network" (0/8), private (10/8, 172.16/12, 192.168/16), shared CGNAT
/// (100.64/10), loopback, link-local, IETF protocol assignments (192.0.0/24), documentation,
/// the 6to4 relay anycast (192.88.99/24), benchmarking (198.18/15), multicast, reserved
/// (240/4) or broadcast.
///
/// IPv6: an IPv4-mapped address (`::ffff:a.b.c.d`) is judged as its IPv4 address; any other
/// must be global unicast (2000::/3, which leaves out loopback, unspecified, IPv4-compatible
/// `::a.b.c.d`, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, discard-only, unique-local,
/// link-local, site-local and multicast) and not in the IETF protocol assignments 2001::/23
/// (Teredo, benchmarking 2001:2::/48, ORCHID), documentation (2001:db8::/32, 3fff::/20) or
/// 6to4 (2002::/16). Translation prefixes are refused because the gateway that translates
/// them can reach any IPv4 address, loopback and private ones included.
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
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 192 && o[1] == 88 && o[2] == 99)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(v4.into()),
            None => {
                let s = v6.segments();
                let global_unicast = (s[0] & 0xe000) == 0x2000;
                let special = match s[0] {
                    // 2001::/23 (IETF protocol assignments), 2001:db8::/32 (documentation).
                    0x2001 => s[1] < 0x200 || s[1] == 0xdb8,
                    // 6to4.
                    0x2002 => true,
                    // 3fff::/20 (documentation).
                    0x3fff => s[1] < 0x1000,
                    _ => false,
                };
                global_unicast && !special
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

impl Engine {
    /// Queues `event_type` with `data` for every enabled endpoint of `tenant_id` that wants it
    /// (or only for `only`, a test-send). Returns the deliveries queued.
    pub async fn emit(
        &self,
        tenant_id: &keygate_core::TenantId,
        event_type: &str,
        data: serde_json::Value,
        only: Option<&str>,
    ) -> Result<Vec<Delivery>, keygate_store::StoreError> {
        // An account whose plan lacks webhooks gets none (its endpoints stay, to be listed and
        // deleted, and deliveries resume if the plan changes back).
        let plan = self.store.get_tenant(tenant_id).await?.map(|t| t.plan);
        if plan.is_some_and(|p| !self.plan(&p).has(crate::config::Feature::Webhooks)) {
            return Ok(Vec::new());
        }
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
            "at": crate::clock::rfc3339(now),
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
                tenant_id: tenant_id.to_string(),
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
/// The delivery task's name under supervision (`crate::supervisor`).
pub const DELIVERIES_TASK: &str = "webhook-deliveries";

pub async fn run_deliveries(
    state: std::sync::Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match client(&state) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhook deliveries disabled: no HTTP client: {e}");
            return;
        }
    };
    loop {
        crate::supervisor::checkpoint(DELIVERIES_TASK);
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
    // Checked again on every attempt, and the request goes to the URL as checked.
    let url = checked_url(&w.url, allow_private)?;
    let ts = now_ms / 1000;
    let Some(sig) = sign(&w.secret, msg_id, ts, payload) else {
        return Err("the endpoint's secret is not valid base64".into());
    };
    client
        .post(url)
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
pub fn client(state: &Engine) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        // Below the one-minute claim of a delivery, so no other node sends it meanwhile.
        .timeout(Duration::from_millis(
            state.config.webhooks.timeout_ms.clamp(100, 50_000),
        ))
        .redirect(reqwest::redirect::Policy::none())
        // An HTTP(S)_PROXY in the environment would resolve the host itself, past the
        // public-address check: deliveries connect directly.
        .no_proxy();
    if !state.config.webhooks.allow_private_networks {
        b = b.dns_resolver(std::sync::Arc::new(PublicOnly));
    }
    b.build()
}

/// Why `url` may not receive webhooks, if it may not: not absolute http(s), credentials in
/// it, or (unless private networks are allowed) plain http or a host that is an address
/// inside the network.
pub fn url_problem(url: &str, allow_private: bool) -> Option<&'static str> {
    checked_url(url, allow_private).err()
}

/// `url` as the delivery client parses it (the WHATWG URL parser of the `url` crate), if it
/// may receive webhooks (see [`url_problem`]).
///
/// The host is judged as that parser reads it, not as it is spelled: `2130706433`,
/// `0x7f000001`, `0177.0.0.1` and `127.1` are all `127.0.0.1` to it, and an address literal
/// is connected to as it is, without the resolver's check. A name is left to [`PublicOnly`],
/// which checks every address it resolves to on every connection.
pub fn checked_url(url: &str, allow_private: bool) -> Result<reqwest::Url, &'static str> {
    const NOT_HTTP: &str = "url must be an absolute http:// or https:// URL";
    let parsed = reqwest::Url::parse(url).map_err(|_| NOT_HTTP)?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(NOT_HTTP)?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("url must not carry credentials");
    }
    match parsed.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err("url must be https://"),
        _ => return Err(NOT_HTTP),
    }
    if !allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let private = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => !is_public(ip),
            Err(_) => {
                let name = bare.trim_end_matches('.');
                name.eq_ignore_ascii_case("localhost")
                    || name.to_ascii_lowercase().ends_with(".localhost")
            }
        };
        if private {
            return Err("url must point at a public address");
        }
    }
    Ok(parsed)
}

/// One attempt of `d`, and its outcome written back.
async fn attempt(state: &Engine, client: &reqwest::Client, mut d: Delivery) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn addresses_inside_the_network_or_translated_into_it_are_not_public() {
        for private in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "192.0.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            // IPv4-compatible and IPv4-mapped forms of private IPv4 addresses.
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            // NAT64 (well-known and local-use prefixes) and 6to4 carry any IPv4 address.
            "64:ff9b::7f00:1",
            "64:ff9b::808:808",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::",
            "2002:808:808::1",
            // IETF protocol assignments (Teredo, benchmarking, ORCHID), documentation.
            "2001::1",
            "2001:2::1",
            "2001:1ff:ffff::1",
            "2001:db8::1",
            "3fff::1",
            "100::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(!is_public(ip(private)), "{private} must not be public");
        }
    }

    #[test]
    fn global_addresses_are_public() {
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "3ffe::1",
        ] {
            assert!(is_public(ip(public)), "{public} must be public");
        }
    }

    #[test]
    fn every_spelling_of_an_inside_address_is_refused_as_the_client_parses_it() {
        for url in [
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://127.0.0.1./",
            "https://0x7f.0.0.1/",
            "https://[::ffff:7f00:1]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[2002:7f00:1::]/",
            "https://198.18.0.1/",
            "https://192.0.0.1/",
            "https://LOCALHOST./",
            "https://api.localhost/",
        ] {
            assert_eq!(
                url_problem(url, false),
                Some("url must point at a public address"),
                "{url}"
            );
            assert_eq!(
                url_problem(url, true),
                None,
                "{url} with private networks allowed"
            );
        }
        assert_eq!(url_problem("https://hooks.example.com/x", false), None);
        assert_eq!(url_problem("https://8.8.8.8/x", false), None);
        assert_eq!(
            url_problem("https://u:p@hooks.example.com/x", false),
            Some("url must not carry credentials")
        );
    }
}

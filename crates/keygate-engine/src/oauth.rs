//! The OAuth authorization server's runtime: signing keys (loaded from the store, rotated by
//! the holder of a lease), sealed values for the login and consent pages, token minting, and
//! the step of the request pipeline that turns a JWT access token into a [`CachedKey`] so
//! that the gateway, `/v1/auth` and `/v1/keys/verify` judge it exactly like a key.

use crate::clock::now_ms;
use crate::config::Config;
use crate::engine::{CachedKey, Engine};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use keygate_core::{Code, FamilyId, IpAllowList, KeyId, KeyStatus, Kind, OriginList, ScopeSet};
use keygate_oauth::jwt::{AccessClaims, KeyMaterial, Keyring, VerifyError};
use keygate_store::{KeyRecord, OAuthClient, OAuthGrant, SigningKey, Store, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// How long a retired signing key stays published beyond the access-token lifetime (covers a
/// node that kept signing with it until its next reload).
const RETIRED_GRACE_MS: i64 = 10 * 60_000;
/// How often every node re-reads the signing keys (another node may have rotated them).
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The authorization server's shared parts.
pub struct OAuth {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    keyring: RwLock<Arc<Keyring>>,
    last_reload_ms: AtomicI64,
    seal_key: Vec<u8>,
    /// Clients by id, read once and kept until the change feed says they changed (filled
    /// and dropped under the engine's `cache_gen`, like keys).
    pub(crate) clients: moka::sync::Cache<String, Arc<CachedClient>>,
}

/// A client as this node knows it, with its standing `client_credentials` grant once a token
/// was asked for: the token endpoint's hot path reads neither from the store.
#[derive(Debug)]
pub struct CachedClient {
    /// The client.
    pub client: OAuthClient,
    cached_at: std::time::Instant,
    standing: std::sync::OnceLock<OAuthGrant>,
}

impl std::fmt::Debug for OAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn material(k: &SigningKey) -> KeyMaterial {
    KeyMaterial {
        kid: k.kid.clone(),
        pkcs8: k.private_key.clone(),
        x: k.public_x.clone(),
        active: k.retired_at_ms.is_none(),
    }
}

impl OAuth {
    /// Loads (or makes, on the first start) the signing keys and the sealing secret.
    pub async fn open(config: &Config, store: &dyn Store, listen: &str) -> Result<Self, String> {
        let issuer = if config.oauth.issuer.is_empty() {
            let loopback = listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            if !loopback {
                tracing::warn!(
                    "oauth.issuer is not set: tokens name http://{listen} as their issuer and \
                     the dashboard and sign-in cookies are not marked Secure; set oauth.issuer \
                     to this deployment's public https URL"
                );
            }
            format!("http://{listen}")
        } else {
            config.oauth.issuer.clone()
        };
        let audience = if config.oauth.audience.is_empty() {
            issuer.clone()
        } else {
            config.oauth.audience.clone()
        };
        let candidate = crate::ids::random_base62(43);
        let seal_key = store
            .shared_secret("oauth.seal", &candidate, now_ms())
            .await
            .map_err(|e| format!("reading the OAuth secret: {e}"))?
            .into_bytes();
        let keys = store
            .signing_keys()
            .await
            .map_err(|e| format!("reading signing keys: {e}"))?;
        if !keys.iter().any(|k| k.retired_at_ms.is_none()) {
            add_signing_key(store).await?;
        }
        let oauth = Self {
            issuer,
            audience,
            keyring: RwLock::new(Arc::new(
                Keyring::new(&[]).map_err(|e| format!("signing keys: {e}"))?,
            )),
            last_reload_ms: AtomicI64::new(0),
            seal_key,
            // Kept like keys: dropped by the change feed, and in any case after the key
            // cache's TTL (a deletion whose message was lost does not live forever).
            clients: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(
                    config.cache.ttl_seconds.max(1),
                ))
                .build(),
        };
        oauth.reload(config, store).await?;
        Ok(oauth)
    }

    /// The signing key and every published public key.
    pub fn keyring(&self) -> Arc<Keyring> {
        match self.keyring.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the signing keys: the newest active key signs; retired keys stay published
    /// until the tokens they signed have expired.
    pub async fn reload(&self, config: &Config, store: &dyn Store) -> Result<(), String> {
        let now = now_ms();
        self.last_reload_ms.store(now, Ordering::Relaxed);
        let ttl_ms = i64::try_from(config.oauth.access_token_ttl_seconds)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        let keys = store
            .signing_keys()
            .await
            .map_err(|e| format!("reading signing keys: {e}"))?;
        let published: Vec<KeyMaterial> = keys
            .iter()
            .filter(|k| {
                k.retired_at_ms
                    .is_none_or(|r| r.saturating_add(ttl_ms).saturating_add(RETIRED_GRACE_MS) > now)
            })
            .map(material)
            .collect();
        let ring = Keyring::new(&published)?;
        match self.keyring.write() {
            Ok(mut k) => *k = Arc::new(ring),
            Err(p) => *p.into_inner() = Arc::new(ring),
        }
        Ok(())
    }

    /// Seals `value` for `purpose` until `exp_ms`: base64url JSON and an HMAC over purpose,
    /// expiry and JSON. Used for the authorization request carried by the login and consent
    /// forms and for the login session cookie, so neither needs server-side state.
    pub fn seal<T: Serialize>(&self, purpose: &str, value: &T, exp_ms: i64) -> String {
        let body = serde_json::to_vec(value).unwrap_or_default();
        let body = URL_SAFE_NO_PAD.encode(body);
        let mac = self.mac(purpose, exp_ms, &body);
        format!("{body}.{exp_ms}.{mac}")
    }

    /// Opens a sealed value: `None` if it was altered, is for another purpose or has expired.
    pub fn unseal<T: DeserializeOwned>(&self, purpose: &str, sealed: &str) -> Option<T> {
        let mut parts = sealed.splitn(3, '.');
        let (body, exp, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let exp_ms: i64 = exp.parse().ok()?;
        if !keygate_oauth::ct_eq(&self.mac(purpose, exp_ms, body), mac) || exp_ms <= now_ms() {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
    }

    /// HMAC-SHA256 of `data` under this deployment's shared secret, for `purpose`.
    pub fn mac_bytes(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.seal_key)
            .unwrap_or_else(|_| unreachable_hmac());
        m.update(purpose.as_bytes());
        m.update(b"\0");
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// A 256-bit key for `purpose`, derived from the shared secret (the same on every node).
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        self.mac_bytes("derive", purpose.as_bytes())
    }

    fn mac(&self, purpose: &str, exp_ms: i64, body: &str) -> String {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.seal_key)
            .unwrap_or_else(|_| unreachable_hmac());
        m.update(purpose.as_bytes());
        m.update(b".");
        m.update(exp_ms.to_string().as_bytes());
        m.update(b".");
        m.update(body.as_bytes());
        URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    }

    /// Signs an access token for `grant` with `scope`; answers the token, its lifetime and its
    /// `jti`.
    pub fn mint_access(
        &self,
        config: &Config,
        grant: &OAuthGrant,
        scope: &str,
        now_ms: i64,
    ) -> Result<(String, u64, String), String> {
        let ttl = config.oauth.access_token_ttl_seconds;
        let iat = now_ms / 1000;
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: grant
                .user_id
                .as_deref()
                .unwrap_or(&grant.client_id)
                .to_owned(),
            aud: self.audience.clone(),
            exp: iat.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX / 2)),
            iat,
            jti: format!("at_{}", crate::ids::random_base62(22)),
            client_id: grant.client_id.clone(),
            scope: scope.to_owned(),
            tenant_id: grant.tenant_id.to_string(),
            grant_id: grant.id.clone(),
        };
        let token = self.keyring().sign(&claims)?;
        Ok((token, ttl, claims.jti))
    }

    /// Verifies an access token, re-reading the signing keys once if it names a key this node
    /// does not know yet (another node rotated), at most every 5 seconds.
    pub async fn verify(
        &self,
        config: &Config,
        store: &dyn Store,
        token: &str,
    ) -> Result<AccessClaims, VerifyError> {
        match self.keyring().verify(token, &self.issuer, &self.audience) {
            Err(VerifyError::Invalid)
                if now_ms() - self.last_reload_ms.load(Ordering::Relaxed) > 5_000 =>
            {
                if let Err(e) = self.reload(config, store).await {
                    tracing::warn!("could not re-read signing keys: {e}");
                }
                self.keyring().verify(token, &self.issuer, &self.audience)
            }
            other => other,
        }
    }
}

// `Hmac::new_from_slice` only fails for fixed-length MACs; HMAC takes any key length.
#[allow(clippy::panic)]
fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC-SHA256 accepts keys of any length")
}

/// Makes a new Ed25519 signing key and retires the active keys made before it.
pub async fn add_signing_key(store: &dyn Store) -> Result<String, String> {
    let (pkcs8, x) = keygate_oauth::jwt::generate_ed25519()?;
    let now = now_ms();
    let kid = crate::ids::new_id("sig", now);
    let key = SigningKey {
        kid: kid.clone(),
        alg: "EdDSA".into(),
        private_key: pkcs8,
        public_x: x,
        created_at_ms: now,
        retired_at_ms: None,
    };
    store
        .add_signing_key(&key, now)
        .await
        .map_err(|e| format!("storing a signing key: {e}"))?;
    Ok(kid)
}

/// Re-reads the signing keys every [`RELOAD_INTERVAL`] and, on the node holding the
/// `signing-key` lease, makes a new one when the active key is older than
/// `oauth.signing_key_rotation_days`.
/// The signing-key task's name under supervision (`crate::supervisor`).
pub const SIGNING_KEYS_TASK: &str = "signing-keys";

pub async fn run_signing_keys(
    state: std::sync::Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        crate::supervisor::checkpoint(SIGNING_KEYS_TASK);
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let days = state.config.oauth.signing_key_rotation_days;
        if days > 0 {
            let now = now_ms();
            let max_age = i64::try_from(days)
                .unwrap_or(i64::MAX)
                .saturating_mul(86_400_000);
            let due = match state.store.signing_keys().await {
                Ok(keys) => keys
                    .iter()
                    .filter(|k| k.retired_at_ms.is_none())
                    .all(|k| now - k.created_at_ms > max_age),
                Err(e) => {
                    tracing::warn!("could not read signing keys: {e}");
                    false
                }
            };
            if due {
                let leased = state
                    .store
                    .acquire_lease("signing-key", &state.node_id, now, now + 60_000)
                    .await
                    .unwrap_or(false);
                if leased {
                    match add_signing_key(&*state.store).await {
                        Ok(kid) => tracing::info!(kid, "rotated the OAuth signing key"),
                        Err(e) => tracing::error!("could not rotate the signing key: {e}"),
                    }
                }
            }
        }
        if let Err(e) = state.oauth.reload(&state.config, &*state.store).await {
            tracing::warn!("{e}");
        }
    }
}

impl Engine {
    /// A client by id: from this node's cache (kept until the change feed says the client
    /// changed, or `cache.unsynced_ttl_seconds` while the feed is down), else the store.
    pub async fn oauth_client(&self, id: &str) -> Result<Option<Arc<CachedClient>>, StoreError> {
        if let Some(c) = self.oauth.clients.get(id) {
            let fresh = std::time::Duration::from_secs(self.config.cache.unsynced_ttl_seconds);
            if self.feed_ok.load(Ordering::Relaxed) || c.cached_at.elapsed() < fresh {
                return Ok(Some(c));
            }
        }
        let gen = self.cache_gen.load(Ordering::Acquire);
        let Some(client) = self.store.get_client(id).await? else {
            return Ok(None);
        };
        let cached = Arc::new(CachedClient {
            client,
            cached_at: std::time::Instant::now(),
            standing: std::sync::OnceLock::new(),
        });
        self.fill(
            gen,
            || self.oauth.clients.insert(id.to_owned(), cached.clone()),
            || self.oauth.clients.invalidate(id),
        );
        Ok(Some(cached))
    }

    /// The client's standing `client_credentials` grant (read or made once per node and
    /// client; see `OAuthStore::client_grant`); `None` when the client was deleted meanwhile.
    pub async fn standing_grant(&self, c: &CachedClient) -> Result<Option<OAuthGrant>, StoreError> {
        if let Some(g) = c.standing.get() {
            return Ok(Some(g.clone()));
        }
        let now = now_ms();
        let candidate = OAuthGrant {
            id: crate::ids::new_id("grt", now),
            client_id: c.client.id.clone(),
            tenant_id: c.client.tenant_id.clone(),
            user_id: None,
            scope: keygate_oauth::scope::join(&c.client.scopes),
            created_at_ms: now,
            expires_at_ms: keygate_store::STANDING_GRANT_EXPIRES,
            revoked_at_ms: None,
            revoked_reason: None,
        };
        match self.store.client_grant(&candidate).await? {
            Some(g) => Ok(Some(c.standing.get_or_init(|| g).clone())),
            None => {
                self.forget_client(&c.client.id);
                Ok(None)
            }
        }
    }

    /// Introspection of an access token (RFC 7662): `Some((claims, active))` for a token this
    /// server signed, `None` for anything else. A token seen before is answered from this
    /// node's cache (verified once; revocations reach it through the change feed, as they
    /// reach the pipeline).
    pub async fn introspect_access(
        &self,
        token: &str,
    ) -> Result<Option<(AccessClaims, bool)>, Code> {
        let cached = match self.lookup_token(token).await {
            Ok(Some(c)) => c,
            // Expired, malformed, forged or not ours: not active, and nothing to tell.
            Ok(None) | Err(Code::Expired | Code::MalformedKey) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(claims) = cached.claims.as_deref() else {
            return Ok(None);
        };
        let active = cached.record.status == KeyStatus::Active && claims.exp > now_ms() / 1000;
        Ok(Some((claims.clone(), active)))
    }

    /// Drops a client from this node's cache (deleted here or on another node).
    pub fn forget_client(&self, id: &str) {
        self.cache_gen.fetch_add(1, Ordering::AcqRel);
        self.oauth.clients.invalidate(id);
    }

    /// A client was deleted: drop it here and on every other node.
    pub async fn client_changed(&self, id: &str) {
        self.forget_client(id);
        self.publish(format!("client:{id}")).await;
    }

    /// The pipeline's step for a JWT access token: a cached entry (by the token's hash, so a
    /// token is verified once per node, not once per request), else signature, issuer,
    /// audience and expiry, then its grant and revocation from the store. Revocations reach
    /// the cache through the change feed like a key's.
    pub(crate) async fn lookup_token(&self, token: &str) -> Result<Option<Arc<CachedKey>>, Code> {
        let hash = self.hasher.hash(token);
        if let Some(k) = self.cache.get(&hash) {
            let fresh = std::time::Duration::from_secs(self.config.cache.unsynced_ttl_seconds);
            if self.feed_ok.load(Ordering::Relaxed) || k.cached_at.elapsed() < fresh {
                return Ok(Some(k));
            }
        }
        let gen = self.cache_gen.load(Ordering::Acquire);
        let claims = match self.oauth.verify(&self.config, &*self.store, token).await {
            Ok(c) => c,
            Err(VerifyError::Expired) => return Err(Code::Expired),
            Err(VerifyError::Malformed) => return Err(Code::MalformedKey),
            Err(VerifyError::Invalid) => return Ok(None),
        };
        let unavailable = |e: keygate_store::StoreError| {
            tracing::error!("token lookup failed: {e}");
            Code::Unavailable
        };
        let Some(grant) = self
            .store
            .get_grant(&claims.grant_id)
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let revoked = grant.revoked_at_ms.is_some()
            || self
                .store
                .access_token_revoked(&claims.jti)
                .await
                .map_err(unavailable)?;
        let Some(Ok(scopes)) =
            keygate_oauth::scope::parse(&claims.scope).map(|s| ScopeSet::parse(&s))
        else {
            return Ok(None);
        };
        let now = now_ms();
        let record = KeyRecord {
            // A token's family is its grant: refreshed tokens share one rate window.
            id: KeyId::of_grant(&grant.id),
            family_id: FamilyId::of_grant(&grant.id),
            tenant_id: grant.tenant_id.clone(),
            user_id: grant.user_id.clone(),
            kind: if grant.user_id.is_some() {
                Kind::Ut
            } else {
                Kind::Sk
            },
            name: grant.client_id.clone(),
            hash,
            display: "oauth".into(),
            scopes,
            allowed_ips: IpAllowList::default(),
            allowed_origins: OriginList::default(),
            rate_limit: None,
            budget: None,
            budget_withdrawn: 0,
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
            rotation_days: None,
            metadata: serde_json::Map::new(),
            status: if revoked {
                KeyStatus::Revoked
            } else {
                KeyStatus::Active
            },
            rotated_from: None,
            rotated_to: None,
            created_at_ms: claims.iat.saturating_mul(1000),
            updated_at_ms: now,
            last_used_at_ms: None,
            revoked_at_ms: grant.revoked_at_ms,
        };
        let mut cached = self.cached_key(record).await.map_err(unavailable)?;
        cached.token = true;
        cached.claims = Some(Box::new(claims));
        cached.policy.resource_only = true;
        let cached = Arc::new(cached);
        self.fill(
            gen,
            || self.cache.insert(hash, cached.clone()),
            || self.cache.invalidate(&hash),
        );
        Ok(Some(cached))
    }
}

//! Configuration: defaults, then `keygate.toml`, then `KEYGATE_*` environment variables
//! (`__` between levels: `KEYGATE_KEYS__PREFIX`).

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use http::{HeaderValue, Uri};
use keygate_core::{PathPattern, RateLimit, RouteClass};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// `sqlite://file.db` (embedded) or `postgres://…`.
    pub database_url: String,
    /// Empty: in-process counters.
    pub redis_url: String,
    /// Prefix of every Redis key (several deployments can share one Redis).
    pub redis_prefix: String,
    /// What a node does with calls that cost credits while Redis is down: `fail_closed`
    /// (503 `UNAVAILABLE`) or `local` (this node leases credits from the store on its own:
    /// still never an over-grant, but budgets are no longer shared exactly, and rate limits
    /// become per node).
    pub redis_outage_policy: OutagePolicy,
    /// Connection pool of the store.
    pub database: DatabaseConfig,
    /// This node's name in logs and audit events (default: an id generated once and kept in
    /// the audit directory). Must be unique among the nodes sharing a store: a node ignores
    /// changes published under its id, and each node's audit events form one chain.
    pub node_id: Option<String>,
    /// Key format and lifecycle.
    pub keys: KeysConfig,
    /// Plans by name.
    pub plans: BTreeMap<String, PlanConfig>,
    /// Gateway / forward-auth route table.
    pub routes: Vec<RouteConfig>,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Key cache.
    pub cache: CacheConfig,
    /// Reverse-proxy gateway.
    pub gateway: GatewayConfig,
    /// Logging.
    pub log: LogConfig,
    /// Audit log.
    pub audit: AuditConfig,
    /// Webhook deliveries.
    pub webhooks: WebhooksConfig,
    /// Alert rules.
    pub alerts: AlertsConfig,
    /// Automatic rotation.
    pub rotation: RotationConfig,
    /// OAuth 2.0 authorization server.
    pub oauth: OAuthConfig,
    /// Which peers are proxies whose forwarding headers count.
    pub proxy: ProxyConfig,
    /// Forward-auth (`/v1/auth`) on a listener of its own.
    pub forward_auth: ForwardAuthConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Throttling of password sign-ins.
    pub login: LoginConfig,
    /// Sign-up.
    pub signup: SignupConfig,
    /// Outgoing email.
    pub smtp: SmtpConfig,
}

/// `[proxy]`: the proxies keygate believes. From any other peer, `X-Forwarded-For`,
/// `X-Real-IP` and `Forwarded` are ignored (the TCP peer is the client), and a forward-auth
/// request that carries `X-Original-*`, `X-Forwarded-Method`/`-Uri`, `X-Keygate-Scope` or
/// `X-Keygate-Cost` is refused with 400: those shape the decision, and ignoring them would
/// silently judge a request the proxy meant to restrict.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Addresses and CIDR ranges of trusted proxies (`["127.0.0.1/32", "10.0.0.0/8"]`);
    /// empty by default: nobody.
    pub trusted: Vec<String>,
}

/// `[forward_auth]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// When set (`127.0.0.1:8081`), `/v1/auth` is served on this address only (and the health
    /// checks with it), and the public listener answers it 404. Bind it where only the proxy
    /// reaches it.
    pub listen: String,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// When set (`127.0.0.1:9100`), `GET /metrics` is served there without a key. On the main
    /// listener it always needs an operator key with scope `metrics:read`.
    pub listen: String,
}

/// `[login]`: throttling of password sign-ins (the OAuth sign-in page and the dashboard).
///
/// Throttling, not a lock: a lock after N failures lets anyone who knows an email keep its
/// owner out for as long as they like (OWASP Authentication Cheat Sheet, "Account lockout"
/// and "Login throttling"). Instead every failure counts against the account (tenant and
/// email) and against the client's network (its address; an IPv6 /64), and once a subject is
/// past its free failures the next attempt must wait `base_delay_ms`, doubled with each
/// further failure, up to the subject's cap. An attempt made during the wait is answered 429
/// with `Retry-After` and is neither checked nor counted. The account's cap is short (an
/// attacker who knows the email slows its owner down by at most that much per attempt, and
/// guesses at that pace at most), the network's is long (one source guessing at many accounts
/// is slowed the most). A successful sign-in clears the account's count; not the network's,
/// or an attacker could reset it by signing in to an account of their own. The counts are
/// kept in the store, so every node sees and adds to the same ones; an attempt is counted
/// before the password is checked (and given back when it turns out right), so parallel
/// guesses do not all pass the check at once. Failures are forgotten `forget_after_seconds`
/// after the last one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginConfig {
    /// Failures of one account that cost no wait.
    pub account_free_failures: u32,
    /// The longest wait of one account, milliseconds.
    pub account_max_delay_ms: u64,
    /// Failures from one client network, any account, that cost no wait (people behind one
    /// NAT share it).
    pub network_free_failures: u32,
    /// The longest wait of one client network, milliseconds.
    pub network_max_delay_ms: u64,
    /// The first wait, doubled with each further failure, milliseconds.
    pub base_delay_ms: u64,
    /// Failures are forgotten this long after the last one, seconds.
    pub forget_after_seconds: u64,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            account_free_failures: 5,
            account_max_delay_ms: 30_000,
            network_free_failures: 20,
            network_max_delay_ms: 15 * 60_000,
            base_delay_ms: 1_000,
            forget_after_seconds: 86_400,
        }
    }
}

/// `[oauth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthConfig {
    /// The issuer URL (`iss` of tokens, base of the metadata). Empty: `http://` and the
    /// address the node listens on, which is right for one node on a laptop only: behind a
    /// proxy or with several nodes, set the public URL.
    pub issuer: String,
    /// `aud` of access tokens (the API they are for). Empty: the issuer.
    pub audience: String,
    /// Access token lifetime, seconds.
    pub access_token_ttl_seconds: u64,
    /// Absolute lifetime of a grant's refresh tokens (rotation does not extend it), seconds.
    pub refresh_token_ttl_seconds: u64,
    /// Authorization code lifetime, seconds.
    pub code_ttl_seconds: u64,
    /// How long a login on the authorization page is remembered, seconds.
    pub session_ttl_seconds: u64,
    /// A new signing key is made after this many days (0: never); the old public key stays
    /// in the JWKS until the tokens it signed have expired.
    pub signing_key_rotation_days: u64,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            access_token_ttl_seconds: 3600,
            refresh_token_ttl_seconds: 30 * 86_400,
            code_ttl_seconds: 60,
            session_ttl_seconds: 12 * 3600,
            signing_key_rotation_days: 30,
        }
    }
}

/// `[rotation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotationConfig {
    /// How often the lease holder looks for keys due for rotation, seconds.
    pub check_seconds: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self { check_seconds: 60 }
    }
}

/// `[alerts]`: thresholds of the alert rules (0 switches a rule off).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Warn when a key has drawn this share of its budget.
    pub budget_warning_percent: u64,
    /// Warn when a tenant's pool falls below this many credits.
    pub tenant_credits_low: u64,
    /// Warn about keys that expire within this many days.
    pub expiring_within_days: u64,
    /// Refusals (wrong origin, IP or scope) of one key within a minute that make an incident.
    pub refusal_burst: u32,
    /// A minute with this many times the key's average minute of the last hour is a spike …
    pub spike_factor: f64,
    /// … once it has at least this many requests.
    pub spike_min_requests: u32,
    /// Warn when a key is used from a /24 (IPv4) or /48 (IPv6) it was never used from.
    pub new_network: bool,
    /// Warn when a key is used from an `Origin` it was never used from.
    pub new_origin: bool,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            budget_warning_percent: 80,
            tenant_credits_low: 1_000,
            expiring_within_days: 7,
            refusal_burst: 20,
            spike_factor: 10.0,
            spike_min_requests: 100,
            new_network: true,
            new_origin: true,
        }
    }
}

/// `[webhooks]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Waits before each retry, ms; after the last one a delivery is given up.
    pub retry_backoff_ms: Vec<u64>,
    /// Time limit of one attempt, ms.
    pub timeout_ms: u64,
    /// How often the queue is read for due retries, ms (new events are sent at once).
    pub poll_ms: u64,
    /// Let endpoints be `http://` and inside the network (loopback, private ranges). Off by
    /// default: a tenant admin must not be able to make keygate call internal services.
    pub allow_private_networks: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            retry_backoff_ms: vec![
                5_000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000, 10_800_000,
            ],
            timeout_ms: 10_000,
            poll_ms: 1_000,
            allow_private_networks: false,
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Record every decision and change (on by default; off only for comparison benchmarks).
    pub enabled: bool,
    /// Directory of this node's local segments (and its `node_id` file when `node_id` is not
    /// configured). Default: beside the SQLite file (`keygate.db.audit`), or `keygate-audit`
    /// in the working directory with PostgreSQL. One node per directory.
    pub dir: Option<String>,
    /// How often segments are shipped to the store, milliseconds.
    pub ship_interval_ms: u64,
    /// A segment is closed after this many bytes (and deleted once shipped).
    pub segment_bytes: u64,
    /// Per-minute usage older than this is deleted.
    pub usage_retention_days: u64,
    /// Refusals without a known key (`MISSING_KEY`, `MALFORMED_KEY`, `UNKNOWN_KEY`) written
    /// to the audit log per client network (an IPv4 address, an IPv6 /64) and minute; the
    /// rest are counted in `keygate_audit_refusals_dropped_total`. Anyone can send those, so
    /// they must not fill the log (0: no limit).
    pub keyless_per_ip_per_minute: u32,
    /// Refusals of one known key written per minute (a publishable key sits in web pages, so
    /// anyone can send its refusals too); the rest are counted the same way (0: no limit).
    pub refusals_per_key_per_minute: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            ship_interval_ms: 200,
            segment_bytes: 16 << 20,
            usage_retention_days: 90,
            keyless_per_ip_per_minute: 60,
            refusals_per_key_per_minute: 600,
        }
    }
}

impl Config {
    /// The audit directory: `audit.dir`, else beside the SQLite file, else `keygate-audit`.
    pub fn audit_dir(&self) -> std::path::PathBuf {
        if let Some(d) = &self.audit.dir {
            return d.into();
        }
        match self.database_url.strip_prefix("sqlite://") {
            Some(file) => {
                let file = file.split('?').next().unwrap_or(file);
                format!("{file}.audit").into()
            }
            None => "keygate-audit".into(),
        }
    }
}

/// `[keys]`. `Debug` hides the pepper.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Deployment prefix of every key (`kg`).
    pub prefix: String,
    /// Default grace period of a rotated key, seconds.
    pub rotation_grace_seconds: u64,
    /// Optional server-side pepper: keys are then stored as HMAC-SHA256(pepper, key).
    /// Changing it invalidates every key.
    pub pepper: Option<String>,
}

impl std::fmt::Debug for KeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysConfig")
            .field("prefix", &self.prefix)
            .field("rotation_grace_seconds", &self.rotation_grace_seconds)
            .field("pepper", &self.pepper.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[plans.NAME]`: limits that follow a tenant or user on this plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    /// Default rate limit for `ut` keys of users on this plan.
    pub rate_limit: Option<RateLimit>,
    /// Whether keys on this plan may call the API at all (else `PLAN_FEATURE`); the same as
    /// leaving `api` out of `features`.
    pub api_access: bool,
    /// What the plan includes; `None`: everything.
    pub features: Option<Vec<Feature>>,
    /// Credits granted when the plan starts: a new tenant's pool, added to the pool when a
    /// tenant moves to the plan (`None`: unlimited).
    pub credits: Option<u64>,
    /// Scopes a `ut` key of a user on this plan may hold (and gets by default);
    /// `None`: any scope except `*`.
    pub scopes: Option<Vec<String>>,
    /// The pool is refilled to this at the start of each month of the plan (unspent credits do
    /// not roll over); also the grant when the plan starts if `credits` is not set.
    pub monthly_credits: Option<u64>,
    /// A trial: the plan lasts this many days, then the account moves to `then`.
    pub days: Option<u32>,
    /// The plan a trial becomes.
    pub then: Option<String>,
    /// Ceilings for keys the account's users make themselves (not for keys an admin `sk`
    /// key makes): at most this many live keys in the account.
    pub max_keys: Option<u32>,
    /// A user's key carries a budget of at most this many credits (and this one when it
    /// names none).
    pub max_budget: Option<u64>,
    /// A user's key expires within this many days (and after this many when it names no
    /// expiry).
    pub max_ttl_days: Option<u32>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            rate_limit: None,
            api_access: true,
            features: None,
            credits: None,
            scopes: None,
            monthly_credits: None,
            days: None,
            then: None,
            max_keys: None,
            max_budget: None,
            max_ttl_days: None,
        }
    }
}

impl PlanConfig {
    /// Whether the plan includes `f`.
    pub fn has(&self, f: Feature) -> bool {
        (f != Feature::Api || self.api_access)
            && self.features.as_ref().is_none_or(|all| all.contains(&f))
    }
}

/// What a plan may include (`[plans.NAME] features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Calls to the API with the account's keys, on every entry point.
    Api,
    /// Making and changing webhook endpoints, and deliveries to them.
    Webhooks,
    /// Registering OAuth clients of the account.
    Oauth,
    /// Secret (`sk`) keys made by the account's owner.
    SkKeys,
}

impl Feature {
    /// Its name in the config (`api`, `webhooks`, `oauth`, `sk_keys`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Webhooks => "webhooks",
            Self::Oauth => "oauth",
            Self::SkKeys => "sk_keys",
        }
    }
}

/// `[signup]`: people making their own accounts (`POST /v1/signup`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignupConfig {
    /// Whether anyone may sign up (off unless the operator turns it on).
    pub enabled: bool,
    /// The plan a new account starts on.
    pub plan: String,
    /// Sign-ups from one client address per hour (across nodes when Redis is configured);
    /// also the limit of password-reset requests.
    pub per_ip_per_hour: u32,
    /// How often a node looks for trials that ended, seconds.
    pub plan_check_seconds: u64,
    /// A new account's keys answer `ACCOUNT_UNVERIFIED` until its owner opens the link
    /// emailed to them (needs `[smtp] url`).
    pub verify_email: bool,
    /// How long a verification link works, hours.
    pub verify_link_hours: u32,
}

impl Default for SignupConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            plan: "trial".into(),
            per_ip_per_hour: 5,
            plan_check_seconds: 60,
            verify_email: false,
            verify_link_hours: 48,
        }
    }
}

/// `[smtp]`: how keygate sends email (verification, password reset, invitations).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// `smtp://host:port` (plain; `?tls=required` for STARTTLS) or `smtps://host:port`, with
    /// `user:password@` when the server wants them. Empty: no email is sent.
    pub url: String,
    /// The sender, `Name <address>`.
    pub from: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            from: "keygate <no-reply@localhost>".into(),
        }
    }
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry the SMTP password.
        // The last `@` ends the credentials (a password may hold one).
        let url = match self.url.rsplit_once('@') {
            Some((scheme_user, host)) => {
                let scheme = scheme_user.split("://").next().unwrap_or_default();
                format!("{scheme}://<redacted>@{host}")
            }
            None => self.url.clone(),
        };
        f.debug_struct("SmtpConfig")
            .field("url", &url)
            .field("from", &self.from)
            .finish()
    }
}

/// `[[routes]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `/exact` or `/prefix/*`.
    pub path: String,
    /// Methods; empty = all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Upstream base URL (gateway mode).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Scope the route needs.
    #[serde(default)]
    pub scope: Option<String>,
    /// Credits per call.
    #[serde(default)]
    pub cost: u64,
    /// No key needed ("visitor"); limited per client IP.
    #[serde(default)]
    pub public: bool,
    /// `normal`, or `admin` / `billing` / `webhook` / `token_management` (closed to `pk`).
    #[serde(default)]
    pub class: RouteClass,
}

/// See [`Config::redis_outage_policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Refuse calls that cost credits with 503 `UNAVAILABLE`.
    FailClosed,
    /// Meter them in process, leasing from the store.
    Local,
}

/// `[database]`: the store's connection pool (PostgreSQL; SQLite uses a small fixed pool).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Largest number of connections this node opens.
    pub max_connections: u32,
    /// How long a request waits for a free connection before the store counts as down.
    pub acquire_timeout_seconds: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout_seconds: 5,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest management request body, bytes.
    pub max_body_bytes: usize,
    /// Whole-request timeout of management calls, seconds.
    pub request_timeout_seconds: u64,
    /// A client must send its request head within this many seconds (slow-loris guard).
    pub header_read_timeout_seconds: u64,
    /// Largest request head (request line and headers), bytes; at least 8192.
    pub max_header_bytes: usize,
    /// Graceful shutdown waits this long for in-flight requests before closing them.
    pub shutdown_grace_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout_seconds: 30,
            header_read_timeout_seconds: 10,
            max_header_bytes: 64 * 1024,
            shutdown_grace_seconds: 30,
        }
    }
}

/// `[gateway]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Time to connect to an upstream, milliseconds (then 502).
    pub connect_timeout_ms: u64,
    /// Time for an upstream to send its response head, seconds (then 504).
    pub upstream_timeout_seconds: u64,
    /// Largest proxied request body, bytes (then 413); streamed, never buffered whole.
    pub max_body_bytes: u64,
    /// Rate limit per client IP on `public` routes.
    pub public_rate_limit: RateLimit,
    /// Match every route ignoring ASCII case, for upstreams that ignore it (IIS, ASP.NET).
    /// Routes of a class closed to `pk` keys (`admin`, `billing`, …) are always matched so.
    pub case_insensitive_paths: bool,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            upstream_timeout_seconds: 30,
            max_body_bytes: 10 * 1024 * 1024,
            public_rate_limit: RateLimit {
                limit: 60,
                window_seconds: 60,
            },
            case_insensitive_paths: false,
            pool_max_idle_per_host: 256,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Entries kept.
    pub max_entries: u64,
    /// A cached key is re-read from the store after this long even without a change event.
    pub ttl_seconds: u64,
    /// An unknown (well-formed) key is remembered as unknown this long.
    pub negative_ttl_seconds: u64,
    /// While the change feed from other nodes is down, a cached key is re-read from the store
    /// once it is older than this (a revocation elsewhere shows after at most this long).
    pub unsynced_ttl_seconds: u64,
    /// If the store cannot be read, a cached key keeps being used until it is this old; after
    /// that its requests get 503 `UNAVAILABLE`.
    pub max_stale_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            ttl_seconds: 300,
            negative_ttl_seconds: 2,
            unsynced_ttl_seconds: 5,
            max_stale_seconds: 60,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter (`info`, `keygate=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            prefix: "kg".into(),
            rotation_grace_seconds: 86_400,
            pepper: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut plans = BTreeMap::new();
        plans.insert(
            "free".into(),
            PlanConfig {
                rate_limit: Some(RateLimit {
                    limit: 60,
                    window_seconds: 60,
                }),
                credits: Some(1_000),
                ..PlanConfig::default()
            },
        );
        plans.insert(
            "pro".into(),
            PlanConfig {
                rate_limit: Some(RateLimit {
                    limit: 600,
                    window_seconds: 60,
                }),
                credits: Some(100_000),
                ..PlanConfig::default()
            },
        );
        plans.insert("enterprise".into(), PlanConfig::default());
        // The shape of a product that sells API access by plan (docs/accounts.md).
        plans.insert(
            "starter".into(),
            PlanConfig {
                rate_limit: Some(RateLimit {
                    limit: 300,
                    window_seconds: 60,
                }),
                features: Some(vec![Feature::Api]),
                monthly_credits: Some(10_000),
                max_keys: Some(20),
                max_ttl_days: Some(365),
                ..PlanConfig::default()
            },
        );
        plans.insert(
            "professional".into(),
            PlanConfig {
                rate_limit: Some(RateLimit {
                    limit: 1_200,
                    window_seconds: 60,
                }),
                features: Some(vec![Feature::Api, Feature::Webhooks, Feature::Oauth]),
                monthly_credits: Some(100_000),
                max_keys: Some(100),
                ..PlanConfig::default()
            },
        );
        plans.insert(
            "trial".into(),
            PlanConfig {
                rate_limit: Some(RateLimit {
                    limit: 60,
                    window_seconds: 60,
                }),
                credits: Some(1_000),
                days: Some(28),
                then: Some("free".into()),
                ..PlanConfig::default()
            },
        );
        Self {
            listen: "127.0.0.1:8080".into(),
            database_url: "sqlite://keygate.db".into(),
            redis_url: String::new(),
            redis_prefix: "kg".into(),
            redis_outage_policy: OutagePolicy::FailClosed,
            database: DatabaseConfig::default(),
            node_id: None,
            keys: KeysConfig::default(),
            plans,
            routes: Vec::new(),
            limits: LimitsConfig::default(),
            cache: CacheConfig::default(),
            gateway: GatewayConfig::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
            webhooks: WebhooksConfig::default(),
            alerts: AlertsConfig::default(),
            rotation: RotationConfig::default(),
            oauth: OAuthConfig::default(),
            proxy: ProxyConfig::default(),
            forward_auth: ForwardAuthConfig::default(),
            metrics: MetricsConfig::default(),
            login: LoginConfig::default(),
            signup: SignupConfig::default(),
            smtp: SmtpConfig::default(),
        }
    }
}

/// An upstream base URL: `http://host:port` with an optional base path.
#[derive(Debug, Clone)]
pub struct Upstream {
    authority: String,
    base_path: String,
    host_header: HeaderValue,
}

impl Upstream {
    /// Parses `http://127.0.0.1:9000` or `http://svc.internal:8080/api`. Only plain HTTP: put
    /// TLS in front of keygate, and keep upstreams on a private network.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(
                    "https upstreams are not supported yet; use http on a private network".into(),
                )
            }
            _ => return Err("upstream must be an http:// URL".into()),
        }
        let authority = uri.authority().ok_or("upstream needs a host")?.to_string();
        if authority.contains('@') {
            return Err("upstream must not contain credentials".into());
        }
        if uri.query().is_some() {
            return Err("upstream must not contain a query string".into());
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let host_header = HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
        Ok(Self {
            authority,
            base_path,
            host_header,
        })
    }

    /// The upstream URI for a request's path and query; `None` if it does not parse.
    pub fn uri_for(&self, path_and_query: &str) -> Option<Uri> {
        format!(
            "http://{}{}{}",
            self.authority, self.base_path, path_and_query
        )
        .parse()
        .ok()
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The `Host` header upstream requests carry.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }
}

/// The largest cost one call may name (`[[routes]] cost`, the verify API's `cost`,
/// `X-Keygate-Cost`): far above any real price, far below where sums of credits could
/// overflow.
pub const MAX_COST: u64 = 1_000_000_000;

/// The parts of a [`Config`] the server uses in parsed form ([`Config::compile`]).
#[derive(Debug)]
pub struct Compiled {
    /// The `[[routes]]` table, in order.
    pub routes: Vec<crate::engine::Route>,
    /// `[proxy] trusted`.
    pub trusted: keygate_core::IpAllowList,
}

/// A configuration that cannot be used, with a message naming the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configuration error: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads defaults, then `file` (if given; it must exist), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "config file {} not found",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig.merge(Env::prefixed("KEYGATE_").split("__"));
        let cfg: Config = fig.extract().map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: prefixes, patterns, plan references ([`Config::compile`],
    /// its product dropped).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.compile().map(drop)
    }

    /// Parses what the configuration means, once: the route table and the trusted proxies
    /// as the server uses them, after every check serde cannot make. A route that does not
    /// parse is an error naming it, never a route left out.
    pub fn compile(&self) -> Result<Compiled, ConfigError> {
        keygate_core::KeyFormat::new(&self.keys.prefix)
            .map_err(|e| ConfigError(format!("keys.prefix: {e}")))?;
        for p in ["free", "enterprise"] {
            if !self.plans.contains_key(p) {
                return Err(ConfigError(format!(
                    "plans.{p} must exist (it is the default plan)"
                )));
            }
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let named = |field: &str, e: &dyn std::fmt::Display| {
                ConfigError(format!("routes[{i}].{field} (route {:?}): {e}", r.path))
            };
            let pattern = PathPattern::parse(&r.path).map_err(|e| named("path", &e))?;
            if let Some(s) = &r.scope {
                keygate_core::Scope::parse(s).map_err(|e| named("scope", &e))?;
                // keygate's own scopes are outside a plan's `scopes` and held by every owner's
                // session: an API route may not share them.
                if keygate_core::scope::is_keygate_scope(s) {
                    return Err(named(
                        "scope",
                        &format!(
                            "{s:?} is keygate's own (its resources are {}); give the API's route another name",
                            keygate_core::scope::KEYGATE_RESOURCES.join(", ")
                        ),
                    ));
                }
            }
            if r.cost > MAX_COST {
                return Err(named("cost", &format!("must be at most {}", MAX_COST)));
            }
            let upstream = r
                .upstream
                .as_deref()
                .map(Upstream::parse)
                .transpose()
                .map_err(|e| named("upstream", &e))?;
            routes.push(crate::engine::Route {
                pattern,
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                upstream,
                config: r.clone(),
            });
        }
        let trusted = keygate_core::IpAllowList::parse(&self.proxy.trusted)
            .map_err(|e| ConfigError(format!("proxy.trusted: {e}")))?;
        for (name, addr) in [
            ("forward_auth.listen", &self.forward_auth.listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if !addr.is_empty() && addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError(format!(
                    "{name} must be an address and port such as 127.0.0.1:8081"
                )));
            }
        }
        let o = &self.oauth;
        let issuer_ok = (o.issuer.starts_with("https://") || o.issuer.starts_with("http://"))
            && !o.issuer.ends_with('/')
            && !o.issuer.contains(['?', '#']);
        if !o.issuer.is_empty() && !issuer_ok {
            return Err(ConfigError(
                "oauth.issuer must be an http(s) URL without a trailing slash, query or fragment"
                    .into(),
            ));
        }
        if o.access_token_ttl_seconds == 0
            || o.refresh_token_ttl_seconds == 0
            || o.code_ttl_seconds == 0
            || o.session_ttl_seconds == 0
        {
            return Err(ConfigError(
                "oauth lifetimes must be at least 1 second".into(),
            ));
        }
        for (name, plan) in &self.plans {
            if let Some(s) = &plan.scopes {
                keygate_core::ScopeSet::parse(s)
                    .map_err(|e| ConfigError(format!("plans.{name}.scopes: {e}")))?;
            }
            let ceiling_ok = plan.max_keys.is_none_or(|n| n >= 1)
                && plan
                    .max_budget
                    .is_none_or(|n| (1..=1_000_000_000_000_000).contains(&n))
                && plan.max_ttl_days.is_none_or(|d| (1..=36_500).contains(&d));
            if !ceiling_ok {
                return Err(ConfigError(format!(
                    "plans.{name}: max_keys, max_budget and max_ttl_days must be at least 1 (max_ttl_days at most 36500)"
                )));
            }
            match (plan.days, &plan.then) {
                (None, None) => {}
                (Some(d), Some(then)) if d > 0 && d <= 3650 => {
                    if then == name || !self.plans.contains_key(then) {
                        return Err(ConfigError(format!(
                            "plans.{name}.then must name another plan ({then:?})"
                        )));
                    }
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError(format!(
                        "plans.{name}.days must be between 1 and 3650"
                    )))
                }
                _ => {
                    return Err(ConfigError(format!(
                        "plans.{name}: days and then go together (a trial and what it becomes)"
                    )))
                }
            }
        }
        if self.signup.verify_email && self.smtp.url.is_empty() {
            return Err(ConfigError(
                "signup.verify_email needs smtp.url (the link is sent by email)".into(),
            ));
        }
        if !(1..=720).contains(&self.signup.verify_link_hours) {
            return Err(ConfigError(
                "signup.verify_link_hours must be between 1 and 720".into(),
            ));
        }
        crate::mail::Mailer::new(&self.smtp).map_err(|e| ConfigError(format!("smtp: {e}")))?;
        if self.signup.enabled && !self.plans.contains_key(&self.signup.plan) {
            return Err(ConfigError(format!(
                "signup.plan names no plan ({:?})",
                self.signup.plan
            )));
        }
        Ok(Compiled { routes, trusted })
    }
}

#[cfg(test)]
mod reference {
    //! docs/configuration.md's config block is the configuration reference: every key in it must
    //! be one the config knows (and parse with the value shown), and every key the config
    //! knows must be in it, so the two cannot drift apart.
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn reference_block() -> String {
        let page = include_str!("../../../docs/configuration.md");
        let section = &page[page.find("## Every key").unwrap_or(0)..];
        let start = section.find("```toml\n").map_or(0, |i| i + 8);
        let end = start + section[start..].find("```").unwrap_or(0);
        // Commented-out examples (`# pepper = "…"`) are documented keys too.
        section[start..end]
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest.to_owned()
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    #[test]
    fn docs_configuration_documents_every_key_and_only_known_ones() {
        let block = reference_block();
        let cfg: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&block))
            .extract()
            .unwrap_or_else(|e| panic!("docs/configuration.md's config block does not load: {e}"));
        cfg.validate()
            .expect("docs/configuration.md's config block is valid");
        let doc: Value = Figment::from(Toml::string(&block))
            .extract()
            .expect("docs/configuration.md's config block as JSON");
        let known = serde_json::to_value(Config::default()).expect("json");
        assert_eq!(keys(&doc), keys(&known), "top-level keys");
        for (section, v) in known.as_object().into_iter().flatten() {
            if v.is_object() && section != "plans" {
                assert_eq!(keys(&doc[section]), keys(v), "keys of [{section}]");
            }
        }
        assert_eq!(
            keys(&doc["plans"]["free"]),
            keys(&known["plans"]["free"]),
            "keys of a plan"
        );
        let route = serde_json::to_value(&cfg.routes[0]).expect("json");
        assert_eq!(keys(&doc["routes"][0]), keys(&route), "keys of a route");
    }
}

#[cfg(test)]
mod compile {
    use super::*;

    fn route(path: &str, upstream: Option<&str>) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            methods: vec!["get".into()],
            upstream: upstream.map(Into::into),
            scope: None,
            cost: 1,
            public: false,
            class: Default::default(),
        }
    }

    #[test]
    fn a_trial_names_a_length_and_another_plan_and_signup_an_existing_plan() {
        let with = |days: Option<u32>, then: Option<&str>| {
            let mut c = Config::default();
            let t = c.plans.get_mut("trial").expect("trial plan");
            t.days = days;
            t.then = then.map(Into::into);
            c.compile().err().map(|e| e.0)
        };
        assert_eq!(with(Some(28), Some("free")), None);
        assert_eq!(with(None, None), None);
        for (days, then, says) in [
            (Some(28), None, "days and then go together"),
            (None, Some("free"), "days and then go together"),
            (Some(0), Some("free"), "between 1 and 3650"),
            (Some(28), Some("trial"), "another plan"),
            (Some(28), Some("gold"), "another plan"),
        ] {
            let e = with(days, then).unwrap_or_default();
            assert!(e.contains(says), "{days:?} {then:?}: {e}");
        }
        let mut c = Config::default();
        c.signup.enabled = true;
        c.signup.plan = "gold".into();
        assert!(c.compile().is_err());
        c.signup.enabled = false;
        assert!(c.compile().is_ok(), "an unused sign-up plan is not checked");
    }

    #[test]
    fn an_api_route_may_not_take_one_of_keygates_scopes_and_plan_ceilings_are_positive() {
        let mut c = Config::default();
        let mut r = route("/v1/users/*", None);
        r.scope = Some("users:read".into());
        c.routes = vec![r];
        let e = c.compile().err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("keygate's own"), "{e}");
        c.routes[0].scope = Some("people:read".into());
        assert!(c.compile().is_ok());
        for set in [
            |p: &mut PlanConfig| p.max_keys = Some(0),
            |p: &mut PlanConfig| p.max_budget = Some(0),
            |p: &mut PlanConfig| p.max_ttl_days = Some(36_501),
        ] {
            let mut c = Config::default();
            set(c.plans.get_mut("starter").expect("starter"));
            assert!(c.compile().is_err());
        }
        let mut c = Config::default();
        c.signup.verify_email = true;
        assert!(c.compile().is_err(), "verification needs smtp.url");
        c.smtp.url = "smtp://127.0.0.1:2525".into();
        assert!(c.compile().is_ok());
    }

    #[test]
    fn every_route_is_compiled_in_order() {
        let c = Config {
            routes: vec![
                route("/a/*", Some("http://127.0.0.1:9000")),
                route("/b", None),
            ],
            ..Config::default()
        };
        let compiled = c.compile().expect("valid");
        let paths: Vec<_> = compiled
            .routes
            .iter()
            .map(|r| r.config.path.as_str())
            .collect();
        assert_eq!(paths, ["/a/*", "/b"]);
        assert_eq!(compiled.routes[0].methods, ["GET"]);
        assert!(compiled.routes[0].upstream.is_some());
        assert!(compiled.routes[1].upstream.is_none());
    }

    #[test]
    fn a_bad_route_is_an_error_naming_it() {
        for (bad, field) in [
            (route("/ok", Some("ftp://x")), "upstream"),
            (route("no-slash", None), "path"),
            (
                RouteConfig {
                    scope: Some("bad scope".into()),
                    ..route("/s", None)
                },
                "scope",
            ),
            (
                RouteConfig {
                    cost: u64::MAX,
                    ..route("/c", None)
                },
                "cost",
            ),
        ] {
            let path = bad.path.clone();
            let c = Config {
                routes: vec![route("/fine", None), bad],
                ..Config::default()
            };
            let e = c.compile().expect_err("refused").to_string();
            assert!(
                e.contains(&format!("routes[1].{field}")) && e.contains(&format!("{path:?}")),
                "{e}"
            );
        }
    }
}

//! Typed configuration: a TOML file, then `SPILLWAY_*` environment
//! overrides, then validation. Every error names the offending key (and the
//! environment variable, when one set it) and its value.
//!
//! With no file at all the defaults run a complete gateway: it listens on
//! `127.0.0.1:8080` and serves the model `mock` from the built-in mock
//! provider. `spillway.example.toml` documents every field.
//!
//! Environment overrides come in two forms:
//! - short aliases for what operators set most ([`ENV_ALIASES`]), e.g.
//!   `SPILLWAY_LISTEN=0.0.0.0:8080`;
//! - `SPILLWAY_<SECTION>__<KEY>` for any scalar of a table section, e.g.
//!   `SPILLWAY_GENERATION__MAX_FRAME_BYTES=8192`.
//!
//! Other `SPILLWAY_*` variables (such as `SPILLWAY_CONFIG`) are not
//! overrides and are left alone.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Short environment variables and the key each sets.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("SPILLWAY_LISTEN", "server.listen"),
    ("SPILLWAY_LOG_FORMAT", "log.format"),
    ("SPILLWAY_LOG_LEVEL", "log.level"),
    ("SPILLWAY_DATABASE_URL", "store.database_url"),
    ("SPILLWAY_DATA_DIR", "store.data_dir"),
    ("SPILLWAY_REDIS_URL", "cluster.redis_url"),
    ("SPILLWAY_NODE_ID", "cluster.node_id"),
];

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener and request limits.
    pub server: ServerConfig,
    /// Log format and verbosity.
    pub log: LogConfig,
    /// The generation log: frame and reply bounds, resume window, grace.
    pub generation: GenerationConfig,
    /// HTTP settings shared by every network provider.
    pub upstream: UpstreamConfig,
    /// Retries, timeouts and fail-over along a model's targets.
    pub routing: RoutingConfig,
    /// The circuit breaker every target has.
    pub breaker: BreakerSection,
    /// Prices per upstream model, for the cost of each reply.
    pub pricing: Vec<PriceConfig>,
    /// The database and the write-behind persister.
    pub store: StoreConfig,
    /// The native protocol: WebSocket and SSE conversations.
    pub chat: ChatConfig,
    /// Several instances as one, through Redis.
    pub cluster: ClusterConfig,
    /// Who may call: API keys, JWTs, widget keys.
    pub auth: AuthConfig,
    /// Rate limits, concurrency caps and token quotas.
    pub limits: LimitsConfig,
    /// Upstreams, referenced by name from `models`.
    pub providers: Vec<ProviderConfig>,
    /// Model names clients may ask for, each mapped to provider targets.
    pub models: Vec<ModelConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            log: LogConfig::default(),
            generation: GenerationConfig::default(),
            upstream: UpstreamConfig::default(),
            routing: RoutingConfig::default(),
            breaker: BreakerSection::default(),
            pricing: Vec::new(),
            store: StoreConfig::default(),
            chat: ChatConfig::default(),
            cluster: ClusterConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            providers: vec![ProviderConfig {
                name: "mock".into(),
                kind: ProviderKind::Mock,
                ..ProviderConfig::default()
            }],
            models: vec![ModelConfig {
                name: "mock".into(),
                targets: vec![TargetConfig::new("mock", "mock")],
                fallback_on: Vec::new(),
            }],
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Seconds between SSE comment heartbeats on an idle stream (1–15).
    pub heartbeat_secs: u64,
    /// The drain timeout: seconds a graceful shutdown (SIGTERM) lets
    /// in-flight replies keep streaming before cancelling them.
    pub shutdown_grace_secs: u64,
    /// WebSocket connections told to reconnect (close 1012) per batch
    /// during a drain.
    pub drain_batch_size: usize,
    /// Milliseconds between drain batches.
    pub drain_batch_interval_ms: u64,
    /// Seconds a client may take to send a request's headers (slowloris).
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without a byte arriving.
    pub body_timeout_secs: u64,
    /// Largest request head (request line and headers) accepted; larger
    /// gets 431. At least 8192.
    pub max_header_bytes: usize,
    /// Most request headers accepted.
    pub max_headers: usize,
    /// Longest request target (path and query) accepted; longer gets 414.
    pub max_url_bytes: usize,
    /// A second address serving `/metrics` and `/admin/v1/*` only (and
    /// then not on `listen`); empty: both are on `listen`.
    pub admin_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            heartbeat_secs: 15,
            shutdown_grace_secs: 30,
            drain_batch_size: 500,
            drain_batch_interval_ms: 100,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_url_bytes: 8 * 1024,
            admin_listen: String::new(),
        }
    }
}

impl ServerConfig {
    /// The listen address (validated by [`Config::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| ConfigError::Invalid {
            key: "server.listen".into(),
            origin: Origin::default(),
            value: self.listen.clone(),
            reason: "not a socket address (expected host:port, e.g. 127.0.0.1:8080)".into(),
        })
    }

    /// The admin address, when one is configured (validated by
    /// [`Config::validate`]).
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.admin_listen.is_empty() {
            return Ok(None);
        }
        self.admin_listen
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Invalid {
                key: "server.admin_listen".into(),
                origin: Origin::default(),
                value: self.admin_listen.clone(),
                reason: "not a socket address (expected host:port, e.g. 127.0.0.1:9090)".into(),
            })
    }

    /// The SSE heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `spillway=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[generation]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Largest coalesced frame of text sent to a client in one write.
    pub max_frame_bytes: usize,
    /// Largest reply a generation may hold; past it the reply fails with
    /// `reply_too_large` and the upstream is cancelled.
    pub max_reply_bytes: usize,
    /// Most generations live at once on this instance; past it new requests
    /// get 503.
    pub max_live: usize,
    /// Seconds a finished generation stays resumable.
    pub resume_window_secs: u64,
    /// Seconds a generation keeps running with no subscriber (so a reload
    /// can resume) before its upstream is cancelled. The OpenAI-compatible
    /// endpoint always uses 0 (its callers cannot resume); the AI SDK
    /// endpoint uses this, for `useChat`'s resume request.
    pub grace_secs: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 * 1024,
            max_reply_bytes: 4 * 1024 * 1024,
            max_live: 10_000,
            resume_window_secs: 300,
            grace_secs: 30,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Milliseconds to establish a TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Milliseconds a single read may wait: bounds the gap between chunks
    /// (a stream has no total timeout).
    pub read_timeout_ms: u64,
    /// Largest single upstream SSE event.
    pub max_event_bytes: usize,
    /// Most bytes of an upstream error body we read for its reason.
    pub max_error_body_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            read_timeout_ms: 120_000,
            max_event_bytes: 1024 * 1024,
            max_error_body_bytes: 64 * 1024,
        }
    }
}

impl UpstreamConfig {
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The per-read timeout.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// `[routing]`: how a request moves along a model's targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Most upstream attempts for one request, over all targets.
    pub max_attempts: u32,
    /// Retries on the same target (before failing over) for a 429, a 5xx
    /// or a reset. Timeouts are never retried on the same target.
    pub retries_per_target: u32,
    /// First retry delay in milliseconds; doubles per retry, with jitter.
    pub backoff_base_ms: u64,
    /// Largest retry delay in milliseconds.
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` (milliseconds) worth waiting for; a longer one
    /// fails over to the next target instead.
    pub max_retry_after_ms: u64,
    /// Retries allowed per request, over the budget window (0.2 = 20 %).
    pub retry_budget_ratio: f64,
    /// Retries always allowed per budget window, however few requests.
    pub retry_budget_min: u32,
    /// Seconds of the retry budget's rolling window.
    pub retry_budget_window_secs: u64,
    /// Default milliseconds from an attempt's start to its first token.
    pub ttft_timeout_ms: u64,
    /// Default longest silence (milliseconds) between events mid-stream.
    pub idle_timeout_ms: u64,
    /// Default longest duration (milliseconds) of one attempt.
    pub deadline_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            retries_per_target: 2,
            backoff_base_ms: 250,
            backoff_max_ms: 4_000,
            max_retry_after_ms: 10_000,
            retry_budget_ratio: 0.2,
            retry_budget_min: 10,
            retry_budget_window_secs: 10,
            ttft_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            deadline_ms: 600_000,
        }
    }
}

/// `[breaker]`: every target's circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSection {
    /// Seconds of the rolling window outcomes are counted over.
    pub window_secs: u64,
    /// Fewest calls in the window before the breaker may open.
    pub min_requests: u32,
    /// Failure ratio (0-1] at which it opens.
    pub failure_ratio: f64,
    /// Seconds an open breaker waits before letting probes through.
    pub cooldown_secs: u64,
    /// Probes allowed at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerSection {
    fn default() -> Self {
        Self {
            window_secs: 30,
            min_requests: 5,
            failure_ratio: 0.5,
            cooldown_secs: 15,
            half_open_probes: 1,
        }
    }
}

/// `[chat]`: conversations over the native protocol (WebSocket, SSE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// The model a `send` without one uses; empty: the first `[[models]]`.
    pub default_model: String,
    /// Largest user message, in bytes.
    pub max_message_bytes: usize,
    /// Most earlier messages sent to the model as context.
    pub max_context_messages: usize,
    /// Most conversations one connection subscribes to.
    pub max_subscriptions: usize,
    /// Most replies one user has running at once.
    pub max_generations_per_user: usize,
    /// Non-token events queued per connection before it is a slow consumer.
    pub outbox_capacity: usize,
    /// Largest WebSocket message (and frame) a client may send; past it the
    /// connection closes with 1009.
    pub ws_max_message_bytes: usize,
    /// Seconds between server pings (browsers and iOS never ping).
    pub ping_interval_secs: u64,
    /// Seconds to wait for a pong before closing (4000).
    pub pong_timeout_secs: u64,
    /// Milliseconds one write may block before the client is a slow
    /// consumer (1013).
    pub write_timeout_ms: u64,
    /// Seconds a connection may live before it is asked to reconnect
    /// (4001, then resume); 0: unlimited.
    pub max_connection_secs: u64,
    /// Seconds a WebSocket session (its subscriptions) is kept after its
    /// last change, for a reconnect (`?session=`) to any instance.
    pub session_ttl_secs: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            default_model: String::new(),
            max_message_bytes: 32 * 1024,
            max_context_messages: 50,
            max_subscriptions: 32,
            max_generations_per_user: 4,
            outbox_capacity: 64,
            ws_max_message_bytes: 64 * 1024,
            ping_interval_secs: 20,
            pong_timeout_secs: 20,
            write_timeout_ms: 10_000,
            max_connection_secs: 3_600,
            session_ttl_secs: 86_400,
        }
    }
}

/// `[cluster]`: several instances behaving as one through Redis. Without
/// `redis_url` the gateway runs alone with its in-process bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db` (or `rediss://`); empty: one instance, the
    /// in-process bus.
    pub redis_url: String,
    /// This instance's id in logs, health and Redis keys; empty: generated
    /// at start (set it to the machine id to keep it across restarts).
    pub node_id: String,
    /// Milliseconds between node heartbeats and presence refreshes; an
    /// instance is dead after three missed heartbeats.
    pub heartbeat_ms: u64,
    /// Milliseconds between position checks of a reply followed from
    /// another instance (recovers missed batches and a missed end).
    pub position_check_ms: u64,
    /// Milliseconds a dropped connection stays present, so a reconnect
    /// within it makes no leave/join flicker; 0: leave at once.
    pub presence_grace_ms: u64,
    /// Messages from Redis queued for dispatch before they are dropped
    /// (and counted); followers recover theirs by position check.
    pub inbound_capacity: usize,
    /// Events queued for publishing to Redis before they are dropped (and
    /// counted).
    pub outbound_capacity: usize,
    /// Seconds a running reply's stream and meta live in Redis without a
    /// write; a finished one lives `generation.resume_window_secs`.
    pub stream_ttl_secs: u64,
    /// Seconds a send's idempotency record lives in Redis.
    pub sent_ttl_secs: u64,
    /// Milliseconds one Redis command may take before it counts as failed.
    pub command_timeout_ms: u64,
    /// Replies followed from other instances at once on this instance.
    pub max_followers: usize,
    /// `/readyz` answers 503 while Redis is configured and unreachable
    /// (false: it reports the fault but stays ready).
    pub ready_requires_redis: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            node_id: String::new(),
            heartbeat_ms: 2_000,
            position_check_ms: 1_000,
            presence_grace_ms: 15_000,
            inbound_capacity: 4_096,
            outbound_capacity: 4_096,
            stream_ttl_secs: 3_600,
            sent_ttl_secs: 86_400,
            command_timeout_ms: 1_000,
            max_followers: 10_000,
            ready_requires_redis: true,
        }
    }
}

/// `[auth]`: credentials. Off (the default), the gateway runs in
/// development mode: the user is named by `X-Spillway-User` (or `?user=`)
/// and nothing is checked. On, every request needs an API key, a JWT from
/// the customer's backend, or a visitor token obtained with a widget key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require credentials.
    pub enabled: bool,
    /// The tenant of a JWT user whose token names none.
    pub default_tenant: String,
    /// The tier of a principal whose credential names none.
    pub default_tier: String,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Seconds between revocation checks of a live WebSocket's credential
    /// (and reloads of the revocation list).
    pub recheck_secs: u64,
    /// Seconds a verified API key is cached (a revocation takes effect
    /// within this).
    pub key_cache_secs: u64,
    /// Header carrying the client's address, set by a trusted proxy (e.g.
    /// `Fly-Client-IP`); empty: the peer address. Never `X-Forwarded-For`
    /// unless the proxy overwrites it.
    pub client_ip_header: String,
    /// JWTs minted by the customer's backend for its signed-in users.
    pub jwt: JwtConfig,
    /// Visitor tokens issued to anonymous widget users.
    pub visitors: VisitorConfig,
    /// Public widget keys, each with its allowed origins.
    pub widgets: Vec<WidgetConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            default_tenant: "default".into(),
            default_tier: "default".into(),
            leeway_secs: 30,
            recheck_secs: 60,
            key_cache_secs: 10,
            client_ip_header: String::new(),
            jwt: JwtConfig::default(),
            visitors: VisitorConfig::default(),
            widgets: Vec::new(),
        }
    }
}

/// `[auth.jwt]`: how user tokens are verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Environment variable holding the HS256 shared secret; empty: HS256
    /// tokens are refused.
    pub hs256_secret_env: String,
    /// PEM files of RS256 / ES256 public keys.
    pub public_key_files: Vec<String>,
    /// A JWKS file (`{"keys":[…]}`), matched by `kid`.
    pub jwks_file: String,
    /// A JWKS URL of the customer's identity provider (https; http only
    /// for a loopback host), fetched at start and cached; empty: none.
    pub jwks_url: String,
    /// Seconds the keys fetched from `jwks_url` are used before they are
    /// fetched again (the most a key removed there keeps verifying); a
    /// shorter `Cache-Control: max-age` wins.
    pub jwks_cache_secs: u64,
    /// At most one fetch of `jwks_url` per this many seconds for tokens
    /// the cached keys cannot check (an unknown `kid`), so a flood of
    /// made-up kids cannot hammer the identity provider; also the retry
    /// period after a failed fetch and the shortest cache lifetime.
    pub jwks_refetch_secs: u64,
    /// Milliseconds one fetch of `jwks_url` may take, body included.
    pub jwks_timeout_ms: u64,
    /// Required `iss`; empty: not checked.
    pub issuer: String,
    /// Required `aud`; empty: not checked.
    pub audience: String,
    /// The claim naming the user.
    pub user_claim: String,
    /// The claim naming the tenant (absent: `auth.default_tenant`).
    pub tenant_claim: String,
    /// The claim naming the tier (absent: `auth.default_tier`).
    pub tier_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret_env: String::new(),
            public_key_files: Vec::new(),
            jwks_file: String::new(),
            jwks_url: String::new(),
            jwks_cache_secs: 300,
            jwks_refetch_secs: 30,
            jwks_timeout_ms: 5_000,
            issuer: String::new(),
            audience: String::new(),
            user_claim: "sub".into(),
            tenant_claim: "tenant".into(),
            tier_claim: "tier".into(),
        }
    }
}

impl JwtConfig {
    /// Checks the JWKS settings: `jwks_url` is https (http only for a
    /// loopback host, where nobody can tamper with the keys on the way),
    /// with no credentials in it; the periods are positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: &dyn fmt::Display, reason: &str| ConfigError::Invalid {
            key: key.to_owned(),
            origin: Origin::default(),
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        for (key, value) in [
            ("auth.jwt.jwks_cache_secs", self.jwks_cache_secs),
            ("auth.jwt.jwks_refetch_secs", self.jwks_refetch_secs),
            ("auth.jwt.jwks_timeout_ms", self.jwks_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be at least 1"));
            }
        }
        if self.jwks_url.is_empty() {
            return Ok(());
        }
        let key = "auth.jwt.jwks_url";
        let url = reqwest::Url::parse(&self.jwks_url)
            .map_err(|err| invalid(key, &self.jwks_url, &format!("not a URL: {err}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                key,
                &"<redacted>",
                "must not carry credentials (a JWKS is public)",
            ));
        }
        let host = url.host_str().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" if !host.is_empty() => Ok(()),
            "http" if loopback => Ok(()),
            "http" => Err(invalid(
                key,
                &self.jwks_url,
                "must be https (http only for a loopback host: keys fetched in the clear could be swapped on the way)",
            )),
            _ => Err(invalid(key, &self.jwks_url, "must be an https:// URL")),
        }
    }
}

/// `[auth.visitors]`: tokens for anonymous widget visitors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisitorConfig {
    /// Environment variable holding the secret that signs visitor tokens
    /// (at least 32 bytes); unset: widgets cannot be used.
    pub secret_env: String,
    /// Seconds a visitor token is valid.
    pub ttl_secs: u64,
}

impl Default for VisitorConfig {
    fn default() -> Self {
        Self {
            secret_env: "SPILLWAY_VISITOR_SECRET".into(),
            ttl_secs: 86_400,
        }
    }
}

/// One `[[auth.widgets]]` entry: a public key embedded in a web page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WidgetConfig {
    /// The public key (`pk_…`), as embedded in the page.
    pub key: String,
    /// The tenant its visitors belong to.
    pub tenant: String,
    /// Origins allowed to use it (`https://example.com`); `*` allows any.
    pub origins: Vec<String>,
    /// Its visitors' tier; empty: `auth.default_tier`.
    pub tier: String,
}

impl Default for WidgetConfig {
    fn default() -> Self {
        Self {
            key: String::new(),
            tenant: "default".into(),
            origins: Vec::new(),
            tier: String::new(),
        }
    }
}

/// `[limits]`: rate limits per principal and per client address,
/// concurrency caps and daily token quotas, by tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Apply rate limits and quotas (caps on concurrency always apply).
    pub enabled: bool,
    /// Share the budgets across instances through Redis when it is
    /// configured (falling back to local budgets while it is away).
    pub cluster_wide: bool,
    /// Requests per minute from one client address, any route.
    pub ip_requests_per_minute: u32,
    /// Seconds between sweeps that forget idle keys.
    pub housekeeping_secs: u64,
    /// Tiers; a principal's tier that is not listed gets the first one.
    pub tiers: Vec<TierConfig>,
    /// Daily spending alerts per tenant.
    pub budgets: Vec<BudgetConfig>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cluster_wide: true,
            ip_requests_per_minute: 1_200,
            housekeeping_secs: 60,
            tiers: vec![TierConfig::default()],
            budgets: Vec::new(),
        }
    }
}

/// One `[[limits.tiers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// Its name, as principals carry it.
    pub name: String,
    /// HTTP requests per minute per principal.
    pub requests_per_minute: u32,
    /// Messages sent (native protocol) and completions (OpenAI endpoint)
    /// per minute per principal.
    pub messages_per_minute: u32,
    /// New WebSocket / SSE connections per minute per principal.
    pub connections_per_minute: u32,
    /// Connections open at once per user.
    pub max_connections_per_user: usize,
    /// Connections open at once per tenant.
    pub max_connections_per_tenant: usize,
    /// Tokens (prompt + completion) per user per UTC day; 0: unlimited.
    pub daily_tokens: u64,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            requests_per_minute: 600,
            messages_per_minute: 60,
            connections_per_minute: 60,
            max_connections_per_user: 16,
            max_connections_per_tenant: 10_000,
            daily_tokens: 0,
        }
    }
}

/// One `[[limits.budgets]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// The tenant.
    pub tenant: String,
    /// US dollars per UTC day.
    pub daily_usd: f64,
    /// Fraction of the budget at which to alert (log + metric).
    pub alert_at: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            tenant: String::new(),
            daily_usd: 0.0,
            alert_at: 0.8,
        }
    }
}

/// `[store]`: the database and the persister in front of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Persist conversations and messages at all. Off: no database, the
    /// history API answers 503 (a stateless proxy).
    pub enabled: bool,
    /// `sqlite://path` or `postgres://…`; default: the SQLite file
    /// `spillway.db` under `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Directory for the default SQLite file and the persister's journal.
    pub data_dir: String,
    /// Database connections in the pool.
    pub max_connections: u32,
    /// Run pending migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// Persist OpenAI-compatible requests (user message + reply) as a
    /// conversation of their user.
    pub persist_openai: bool,
    /// Most records the persister writes in one transaction.
    pub batch_max_rows: usize,
    /// Milliseconds the persister waits to fill a batch.
    pub batch_max_delay_ms: u64,
    /// Records waiting to be journaled; past it, submitters wait.
    pub queue_capacity: usize,
    /// Bytes per journal segment file before it rolls over.
    pub journal_segment_bytes: u64,
    /// First retry delay (ms) while the database is failing; doubles.
    pub retry_base_ms: u64,
    /// Largest retry delay (ms) while the database is failing.
    pub retry_max_ms: u64,
    /// Seconds a graceful shutdown spends flushing to the database (what is
    /// left stays in the journal for the next start).
    pub shutdown_flush_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            database_url: None,
            data_dir: "data".into(),
            max_connections: 8,
            migrate_on_start: true,
            persist_openai: true,
            batch_max_rows: 256,
            batch_max_delay_ms: 20,
            queue_capacity: 4096,
            journal_segment_bytes: 16 * 1024 * 1024,
            retry_base_ms: 100,
            retry_max_ms: 5_000,
            shutdown_flush_secs: 10,
        }
    }
}

impl StoreConfig {
    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            let path = Path::new(&self.data_dir).join("spillway.db");
            format!("sqlite://{}?mode=rwc", path.display())
        })
    }

    /// Where the persister keeps its journal.
    pub fn journal_dir(&self) -> PathBuf {
        Path::new(&self.data_dir).join("journal")
    }
}

/// One `[[pricing]]` entry: the price of an upstream model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// The upstream model name (as in `targets[].model`).
    pub model: String,
    /// USD per million prompt tokens.
    pub input_per_million: f64,
    /// USD per million completion tokens.
    pub output_per_million: f64,
}

/// One `[[providers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Referenced by `models[].targets[].provider`.
    pub name: String,
    /// Which wire format it speaks.
    pub kind: ProviderKind,
    /// API base URL, e.g. `https://api.openai.com/v1`; each kind has a
    /// default.
    pub base_url: Option<String>,
    /// Environment variable holding the API key; unset for keyless local
    /// servers. Keys never go in the file.
    pub api_key_env: Option<String>,
    /// Milliseconds to connect to this provider (default:
    /// `upstream.connect_timeout_ms`).
    pub connect_timeout_ms: Option<u64>,
    /// Anthropic only: `max_tokens` sent when the client set none
    /// (Anthropic requires one).
    pub default_max_tokens: u32,
    /// Mock only: words per reply.
    pub mock_tokens: u32,
    /// Mock only: milliseconds before each word.
    pub mock_token_delay_ms: u64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: ProviderKind::Openai,
            base_url: None,
            api_key_env: None,
            connect_timeout_ms: None,
            default_max_tokens: 4096,
            mock_tokens: 48,
            mock_token_delay_ms: 40,
        }
    }
}

/// The wire format of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI chat completions and compatibles.
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini (`streamGenerateContent?alt=sse`).
    Gemini,
    /// The built-in demo provider.
    Mock,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients ask for.
    pub name: String,
    /// Providers that can serve it, in order of preference: a fallback
    /// chain.
    pub targets: Vec<TargetConfig>,
    /// Errors retrying cannot fix that should still fail over to the next
    /// target (e.g. `context_length` to a larger-context model). By default
    /// such errors end the request with the provider's reason.
    #[serde(default)]
    pub fallback_on: Vec<FallbackOn>,
}

/// A class of non-retryable error that may fail over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackOn {
    /// The prompt does not fit the model's context window.
    ContextLength,
    /// The provider refused on content-policy grounds.
    ContentPolicy,
    /// Any other 4xx rejection of the request.
    InvalidRequest,
}

/// A (provider, upstream model) pair, with its routing knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A `providers[].name`.
    pub provider: String,
    /// The model name the provider knows.
    pub model: String,
    /// Targets of one tier share load by `weight`; lower tiers are tried
    /// first. Default: the target's position, so the list is a plain chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<u32>,
    /// Share of its tier's requests (relative, at least 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Whether this target accepts an assistant prefill, so a reply cut
    /// mid-answer elsewhere can be continued here seamlessly.
    #[serde(default)]
    pub prefill: bool,
    /// Milliseconds to first token (default: `routing.ttft_timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_timeout_ms: Option<u64>,
    /// Longest silence mid-stream (default: `routing.idle_timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Longest attempt (default: `routing.deadline_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

impl TargetConfig {
    /// A plain target with default knobs.
    pub fn new(provider: &str, model: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
            tier: None,
            weight: 1,
            prefill: false,
            ttft_timeout_ms: None,
            idle_timeout_ms: None,
            deadline_ms: None,
        }
    }
}

fn one() -> u32 {
    1
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has the wrong type or is unknown.
    #[error("config key `{key}`{origin}: {message}")]
    Field {
        /// Dotted path of the key.
        key: String,
        /// ` (set by SPILLWAY_…)` when the environment set it.
        origin: Origin,
        /// What is wrong, with the value where serde reports it.
        message: String,
    },
    /// A value is well-typed but not acceptable.
    #[error("config key `{key}`{origin} = {value:?}: {reason}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// ` (set by SPILLWAY_…)` when the environment set it.
        origin: Origin,
        /// The offending value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// An environment override names a key that is not a scalar setting.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Default)]
pub struct Origin(Option<String>);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(var) => write!(f, " (set by {var})"),
            None => Ok(()),
        }
    }
}

impl Config {
    /// Loads `path` (or the defaults when `None`), applies the process
    /// environment's overrides and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::parse(&text, path.unwrap_or(Path::new("<defaults>")), env)
    }

    /// Parses TOML `text`, applies `env` overrides and validates.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let origins = apply_env(&mut table, env)?;
        let config: Self =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
                let key = err.path().to_string();
                ConfigError::Field {
                    origin: Origin(origins.get(&key).cloned()),
                    // toml appends "in `key`" on later lines; we name it.
                    message: err
                        .into_inner()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    key,
                }
            })?;
        config.validate().map_err(|err| match err {
            ConfigError::Invalid {
                key, value, reason, ..
            } => ConfigError::Invalid {
                origin: Origin(origins.get(&key).cloned()),
                key,
                value,
                reason,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Checks what types cannot: addresses, ranges, references, uniqueness.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.listen_addr()?;
        let invalid = |key: &str, value: &dyn fmt::Display, reason: &str| ConfigError::Invalid {
            key: key.to_owned(),
            origin: Origin::default(),
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        self.server.admin_addr()?;
        let server = &self.server;
        for (key, value) in [
            ("server.max_body_bytes", server.max_body_bytes),
            ("server.drain_batch_size", server.drain_batch_size),
            ("server.max_headers", server.max_headers),
            ("server.max_url_bytes", server.max_url_bytes),
            (
                "server.header_timeout_secs",
                usize::try_from(server.header_timeout_secs).unwrap_or(usize::MAX),
            ),
            (
                "server.body_timeout_secs",
                usize::try_from(server.body_timeout_secs).unwrap_or(usize::MAX),
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be at least 1"));
            }
        }
        if server.max_header_bytes < 8192 {
            return Err(invalid(
                "server.max_header_bytes",
                &server.max_header_bytes,
                "must be at least 8192",
            ));
        }
        if !(1..=15).contains(&self.server.heartbeat_secs) {
            return Err(invalid(
                "server.heartbeat_secs",
                &self.server.heartbeat_secs,
                "must be between 1 and 15 (proxies cut streams idle for longer)",
            ));
        }
        let auth = &self.auth;
        auth.jwt.validate()?;
        if auth.default_tenant.is_empty() {
            return Err(invalid("auth.default_tenant", &"", "must not be empty"));
        }
        for (key, value) in [
            ("auth.recheck_secs", auth.recheck_secs),
            ("auth.visitors.ttl_secs", auth.visitors.ttl_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be at least 1"));
            }
        }
        let mut widget_keys = std::collections::HashSet::new();
        for (i, widget) in auth.widgets.iter().enumerate() {
            if !widget.key.starts_with("pk_") || widget.key.len() < 8 {
                return Err(invalid(
                    &format!("auth.widgets[{i}].key"),
                    &widget.key,
                    "must start with 'pk_' and be at least 8 characters",
                ));
            }
            if !widget_keys.insert(widget.key.as_str()) {
                return Err(invalid(
                    &format!("auth.widgets[{i}].key"),
                    &widget.key,
                    "is listed twice",
                ));
            }
            if widget.tenant.is_empty() {
                return Err(invalid(
                    &format!("auth.widgets[{i}].tenant"),
                    &"",
                    "must not be empty",
                ));
            }
            for (j, origin) in widget.origins.iter().enumerate() {
                let valid = origin == "*"
                    || ((origin.starts_with("https://") || origin.starts_with("http://"))
                        && !origin.ends_with('/')
                        && !origin[origin.find("://").map_or(0, |p| p + 3)..].contains('/'));
                if !valid {
                    return Err(invalid(
                        &format!("auth.widgets[{i}].origins[{j}]"),
                        origin,
                        "must be an origin (scheme://host[:port], no path) or '*'",
                    ));
                }
            }
        }
        let limits = &self.limits;
        if limits.tiers.is_empty() {
            return Err(invalid(
                "limits.tiers",
                &"[]",
                "must list at least one tier",
            ));
        }
        let mut tier_names = std::collections::HashSet::new();
        for (i, tier) in limits.tiers.iter().enumerate() {
            if tier.name.is_empty() || !tier_names.insert(tier.name.as_str()) {
                return Err(invalid(
                    &format!("limits.tiers[{i}].name"),
                    &tier.name,
                    "must be non-empty and unique",
                ));
            }
            for (field, value) in [
                ("requests_per_minute", tier.requests_per_minute),
                ("messages_per_minute", tier.messages_per_minute),
                ("connections_per_minute", tier.connections_per_minute),
            ] {
                if value == 0 {
                    return Err(invalid(
                        &format!("limits.tiers[{i}].{field}"),
                        &0,
                        "must be at least 1",
                    ));
                }
            }
        }
        if limits.ip_requests_per_minute == 0 || limits.housekeeping_secs == 0 {
            return Err(invalid(
                "limits.ip_requests_per_minute",
                &limits.ip_requests_per_minute,
                "limits.ip_requests_per_minute and limits.housekeeping_secs must be at least 1",
            ));
        }
        for (i, budget) in limits.budgets.iter().enumerate() {
            let valid = budget.daily_usd.is_finite()
                && budget.daily_usd > 0.0
                && budget.alert_at > 0.0
                && budget.alert_at <= 1.0;
            if !valid {
                return Err(invalid(
                    &format!("limits.budgets[{i}]"),
                    &budget.daily_usd,
                    "daily_usd must be positive and alert_at in (0, 1]",
                ));
            }
        }
        let cluster = &self.cluster;
        for (key, value) in [
            ("cluster.heartbeat_ms", cluster.heartbeat_ms),
            ("cluster.position_check_ms", cluster.position_check_ms),
            ("cluster.command_timeout_ms", cluster.command_timeout_ms),
            ("cluster.stream_ttl_secs", cluster.stream_ttl_secs),
            ("cluster.sent_ttl_secs", cluster.sent_ttl_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("cluster.inbound_capacity", cluster.inbound_capacity),
            ("cluster.outbound_capacity", cluster.outbound_capacity),
            ("cluster.max_followers", cluster.max_followers),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be at least 1"));
            }
        }
        let schemes = ["redis://", "rediss://", "redis+unix://"];
        if !cluster.redis_url.is_empty()
            && !schemes.iter().any(|s| cluster.redis_url.starts_with(s))
        {
            return Err(invalid(
                "cluster.redis_url",
                &"<redacted>",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        if cluster.node_id.len() > 64
            || !cluster
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "cluster.node_id",
                &cluster.node_id,
                "must be at most 64 letters, digits, '-', '_' or '.'",
            ));
        }
        let generation = &self.generation;
        if generation.max_frame_bytes < 64 {
            return Err(invalid(
                "generation.max_frame_bytes",
                &generation.max_frame_bytes,
                "must be at least 64",
            ));
        }
        if generation.max_reply_bytes < generation.max_frame_bytes {
            return Err(invalid(
                "generation.max_reply_bytes",
                &generation.max_reply_bytes,
                "must be at least generation.max_frame_bytes",
            ));
        }
        if generation.grace_secs == 0 {
            // A native reply has no reader for a moment between its start
            // and its first subscriber; with no grace it would be cancelled
            // right there. (The OpenAI endpoint always uses 0 on its own.)
            return Err(invalid(
                "generation.grace_secs",
                &0,
                "must be at least 1 (a reply must survive until its first reader attaches)",
            ));
        }
        if generation.max_live == 0 {
            return Err(invalid("generation.max_live", &0, "must be at least 1"));
        }
        if self.upstream.max_event_bytes < 1024 {
            return Err(invalid(
                "upstream.max_event_bytes",
                &self.upstream.max_event_bytes,
                "must be at least 1024",
            ));
        }
        if self.upstream.connect_timeout_ms == 0 || self.upstream.read_timeout_ms == 0 {
            return Err(invalid(
                "upstream.connect_timeout_ms / upstream.read_timeout_ms",
                &0,
                "timeouts must be positive",
            ));
        }

        let routing = &self.routing;
        if routing.max_attempts == 0 {
            return Err(invalid("routing.max_attempts", &0, "must be at least 1"));
        }
        if routing.backoff_base_ms == 0 || routing.backoff_max_ms < routing.backoff_base_ms {
            return Err(invalid(
                "routing.backoff_max_ms",
                &routing.backoff_max_ms,
                "must be at least routing.backoff_base_ms, which must be positive",
            ));
        }
        if !(0.0..=10.0).contains(&routing.retry_budget_ratio) {
            return Err(invalid(
                "routing.retry_budget_ratio",
                &routing.retry_budget_ratio,
                "must be between 0 and 10",
            ));
        }
        for (key, value) in [
            (
                "routing.retry_budget_window_secs",
                routing.retry_budget_window_secs,
            ),
            ("routing.ttft_timeout_ms", routing.ttft_timeout_ms),
            ("routing.idle_timeout_ms", routing.idle_timeout_ms),
            ("routing.deadline_ms", routing.deadline_ms),
            ("breaker.window_secs", self.breaker.window_secs),
            ("breaker.cooldown_secs", self.breaker.cooldown_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be positive"));
            }
        }
        if !(self.breaker.failure_ratio > 0.0 && self.breaker.failure_ratio <= 1.0) {
            return Err(invalid(
                "breaker.failure_ratio",
                &self.breaker.failure_ratio,
                "must be in (0, 1]",
            ));
        }
        if self.breaker.half_open_probes == 0 {
            return Err(invalid(
                "breaker.half_open_probes",
                &0,
                "must be at least 1",
            ));
        }
        let chat = &self.chat;
        if !chat.default_model.is_empty()
            && !self.models.iter().any(|m| m.name == chat.default_model)
        {
            return Err(invalid(
                "chat.default_model",
                &chat.default_model,
                "no [[models]] entry has this name",
            ));
        }
        for (key, value) in [
            ("chat.max_message_bytes", chat.max_message_bytes as u64),
            (
                "chat.max_context_messages",
                chat.max_context_messages as u64,
            ),
            ("chat.max_subscriptions", chat.max_subscriptions as u64),
            (
                "chat.max_generations_per_user",
                chat.max_generations_per_user as u64,
            ),
            ("chat.outbox_capacity", chat.outbox_capacity as u64),
            ("chat.ping_interval_secs", chat.ping_interval_secs),
            ("chat.pong_timeout_secs", chat.pong_timeout_secs),
            ("chat.write_timeout_ms", chat.write_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be positive"));
            }
        }
        if chat.ws_max_message_bytes < chat.max_message_bytes {
            return Err(invalid(
                "chat.ws_max_message_bytes",
                &chat.ws_max_message_bytes,
                "must be at least chat.max_message_bytes",
            ));
        }
        let store = &self.store;
        if let Some(url) = &store.database_url
            && !["sqlite:", "postgres:", "postgresql:"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
        {
            // Never echo a URL: it may carry a password.
            return Err(invalid(
                "store.database_url",
                &"<redacted>",
                "expected sqlite://… or postgres://…",
            ));
        }
        for (key, value) in [
            ("store.max_connections", store.max_connections as u64),
            ("store.batch_max_rows", store.batch_max_rows as u64),
            ("store.queue_capacity", store.queue_capacity as u64),
            ("store.retry_base_ms", store.retry_base_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, &0, "must be positive"));
            }
        }
        if store.journal_segment_bytes < 4096 {
            return Err(invalid(
                "store.journal_segment_bytes",
                &store.journal_segment_bytes,
                "must be at least 4096",
            ));
        }
        if store.retry_max_ms < store.retry_base_ms {
            return Err(invalid(
                "store.retry_max_ms",
                &store.retry_max_ms,
                "must be at least store.retry_base_ms",
            ));
        }
        for (i, price) in self.pricing.iter().enumerate() {
            if !(price.input_per_million >= 0.0 && price.output_per_million >= 0.0) {
                return Err(invalid(
                    &format!("pricing[{i}]"),
                    &price.model,
                    "prices must be zero or positive",
                ));
            }
        }

        let mut providers = HashMap::new();
        for (i, provider) in self.providers.iter().enumerate() {
            let key = format!("providers[{i}].name");
            if provider.name.trim().is_empty() {
                return Err(invalid(&key, &provider.name, "a provider needs a name"));
            }
            if providers.insert(provider.name.as_str(), provider).is_some() {
                return Err(invalid(&key, &provider.name, "duplicate provider name"));
            }
            if let Some(url) = &provider.base_url {
                let ok = reqwest::Url::parse(url)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
                if !ok {
                    return Err(invalid(
                        &format!("providers[{i}].base_url"),
                        url,
                        "not an http(s) URL",
                    ));
                }
            }
            if provider.kind == ProviderKind::Mock && provider.mock_tokens == 0 {
                return Err(invalid(
                    &format!("providers[{i}].mock_tokens"),
                    &0,
                    "must be at least 1",
                ));
            }
        }
        if self.models.is_empty() {
            return Err(invalid("models", &"[]", "configure at least one model"));
        }
        let mut models = HashMap::new();
        for (i, model) in self.models.iter().enumerate() {
            let key = format!("models[{i}].name");
            if model.name.trim().is_empty() {
                return Err(invalid(&key, &model.name, "a model needs a name"));
            }
            if models.insert(model.name.as_str(), ()).is_some() {
                return Err(invalid(&key, &model.name, "duplicate model name"));
            }
            if model.targets.is_empty() {
                return Err(invalid(
                    &format!("models[{i}].targets"),
                    &"[]",
                    "a model needs at least one target",
                ));
            }
            for (j, target) in model.targets.iter().enumerate() {
                if !providers.contains_key(target.provider.as_str()) {
                    return Err(invalid(
                        &format!("models[{i}].targets[{j}].provider"),
                        &target.provider,
                        "no provider has this name",
                    ));
                }
                if target.weight == 0 {
                    return Err(invalid(
                        &format!("models[{i}].targets[{j}].weight"),
                        &0,
                        "must be at least 1",
                    ));
                }
                for (field, value) in [
                    ("ttft_timeout_ms", target.ttft_timeout_ms),
                    ("idle_timeout_ms", target.idle_timeout_ms),
                    ("deadline_ms", target.deadline_ms),
                ] {
                    if value == Some(0) {
                        return Err(invalid(
                            &format!("models[{i}].targets[{j}].{field}"),
                            &0,
                            "must be positive",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Applies `SPILLWAY_*` overrides to `table`; returns which key each
/// variable set.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<HashMap<String, String>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut origins = HashMap::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(var, _)| var.starts_with("SPILLWAY_"))
        .collect();
    // Deterministic order, so a conflict always resolves the same way.
    vars.sort();
    for (var, raw) in vars {
        let key = match ENV_ALIASES.iter().find(|(alias, _)| *alias == var) {
            Some((_, key)) => (*key).to_owned(),
            None => match var["SPILLWAY_".len()..].split_once("__") {
                Some((section, field)) => {
                    format!("{}.{}", section.to_lowercase(), field.to_lowercase())
                }
                None => continue,
            },
        };
        let Some((section, field)) = key.split_once('.') else {
            continue;
        };
        let is_string = defaults
            .get(section)
            .and_then(|s| s.get(field))
            .is_some_and(toml::Value::is_str);
        let value = if is_string {
            toml::Value::String(raw)
        } else {
            parse_scalar(&raw)
        };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Env {
                var,
                reason: format!("`{section}` is not a table section"),
            });
        };
        section_table.insert(field.to_owned(), value);
        origins.insert(key, var);
    }
    Ok(origins)
}

/// Reads an environment value as a TOML scalar (integer, float, boolean),
/// falling back to a string.
fn parse_scalar(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {raw}")) {
        Ok(Probe { v }) if !v.is_table() && !v.is_array() => v,
        _ => toml::Value::String(raw.to_owned()),
    }
}

/// What replaces a secret in [`Config::redacted_toml`].
pub const REDACTED: &str = "[redacted]";

impl Config {
    /// The effective configuration (file, environment and defaults) as
    /// TOML, with secrets redacted: passwords in URLs (`database_url`,
    /// `redis_url`, any `*_url`) and the value of any key that names a
    /// secret itself (`*secret*`, `*password*`, `*token*`, `api_key`)
    /// rather than the variable holding one (`*_env`, which stay).
    pub fn redacted_toml(&self) -> String {
        let mut value = match toml::Value::try_from(self) {
            Ok(value) => value,
            Err(err) => return format!("# the configuration could not be shown: {err}\n"),
        };
        redact(&mut value, "");
        toml::to_string_pretty(&value).unwrap_or_default()
    }
}

fn redact(value: &mut toml::Value, key: &str) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                redact(value, key);
            }
        }
        toml::Value::Array(items) => {
            for item in items {
                redact(item, key);
            }
        }
        toml::Value::String(text) => {
            let key = key.to_ascii_lowercase();
            let names_a_secret = !key.ends_with("_env")
                && (key.contains("secret")
                    || key.contains("password")
                    || key.contains("token")
                    || key == "api_key");
            if names_a_secret && !text.is_empty() {
                *text = REDACTED.to_owned();
            } else if key.ends_with("url") {
                *text = redact_url(text);
            }
        }
        _ => {}
    }
}

/// `scheme://user:password@host/...` with the password redacted (and a
/// `?password=` query parameter).
fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let start = scheme_end + 3 + colon + 1;
                let end = scheme_end + 3 + at;
                out.replace_range(start..end, REDACTED);
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, tail) = out.split_at(query + 1);
        let redacted: Vec<String> = tail
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                    format!("{name}={REDACTED}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db.internal:5432/chat?sslmode=require"),
            "postgres://app:[redacted]@db.internal:5432/chat?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:[redacted]@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("postgres://localhost/test?user=a&password=b"),
            "postgres://localhost/test?user=a&password=[redacted]"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn the_effective_config_shows_no_secret() {
        let mut config = Config::default();
        config.store.database_url = Some("postgres://app:pg-pass-123@db/chat".into());
        config.cluster.redis_url = "rediss://default:redis-pass-456@cache:6380".into();
        let text = config.redacted_toml();
        assert!(!text.contains("pg-pass-123"), "{text}");
        assert!(!text.contains("redis-pass-456"), "{text}");
        assert!(text.contains("postgres://app:[redacted]@db/chat"), "{text}");
        // The names of variables holding secrets stay: they are not secret.
        assert!(text.contains("hs256_secret_env"), "{text}");
        let back: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert!(back.get("server").is_some());
    }
}

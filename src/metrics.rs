//! Every metric the gateway exports, by name and labels, in one place.
//!
//! The parts that do the work record into [`get()`] as it happens (a
//! stream opened, a token relayed, an attempt failed); values that are
//! state rather than events (generations running, breaker states, the
//! persister's queue, Redis connected) are read from their owners when
//! `/metrics` is scraped ([`Gateway::refresh_metrics`] in `http`).
//!
//! Labels are bounded by construction: transports, outcome classes and
//! reasons are fixed sets; providers and models come from the config;
//! tenants are capped at [`MAX_TENANTS`] distinct values (later ones
//! count under `_other`). User ids, conversation ids and generation ids
//! are never labels.
//!
//! The process holds one set ([`get()`]): a gateway process serves one
//! gateway. Tests that scrape run each in their own process (nextest).
//!
//! [`Gateway::refresh_metrics`]: crate::http::Gateway::refresh_metrics

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Distinct tenant label values kept; later tenants count as `_other`.
pub const MAX_TENANTS: usize = 1000;

/// The content type `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A client transport: `ws`, `sse` (native) or `openai` (the
/// OpenAI-compatible endpoint's streams).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// The transport.
    pub transport: &'static str,
}

/// An upstream target.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// The configured provider name.
    pub provider: String,
    /// The upstream model.
    pub model: String,
}

/// One upstream attempt's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The configured provider name.
    pub provider: String,
    /// `ok`, `rate_limited` (429), `unavailable` (5xx), `timeout`,
    /// `connect` (refused or reset), `protocol` (malformed stream or an
    /// in-band error event), or another error class's code.
    pub outcome: &'static str,
}

/// A provider alone.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// The configured provider name.
    pub provider: String,
}

/// A model route (the name clients ask for).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The model name clients use.
    pub route: String,
}

/// Why a request, message, connection or token reservation was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `request`, `message`, `connection`, `ip`, `connections_cap` or
    /// `daily_tokens`.
    pub reason: &'static str,
}

/// Usage tokens by tenant and model.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    /// The tenant (capped, see [`MAX_TENANTS`]).
    pub tenant: String,
    /// The configured provider name.
    pub provider: String,
    /// The upstream model.
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

/// Cost by tenant and model.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    /// The tenant (capped).
    pub tenant: String,
    /// The configured provider name.
    pub provider: String,
    /// The upstream model.
    pub model: String,
}

/// A tenant alone.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// The tenant (capped).
    pub tenant: String,
}

/// One WebSocket or SSE close the gateway chose, by reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The transport.
    pub transport: &'static str,
    /// `slow_consumer`, `drain`, `lifetime`, `pong_timeout`, `auth`,
    /// `operator`, `shutdown`.
    pub reason: &'static str,
}

type Seconds = Family<TargetLabels, Histogram>;

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tenants: Mutex<HashSet<String>>,
    /// Live client connections by transport.
    pub connections: Family<TransportLabels, Gauge>,
    /// Client connections opened, by transport.
    pub connections_opened: Family<TransportLabels, Counter>,
    /// Connections the gateway closed, by transport and reason.
    pub closes: Family<CloseLabels, Counter>,
    /// Generations streaming now on this instance.
    pub generations_running: Gauge,
    /// Generations held (streaming or finished within their resume window).
    pub generations_held: Gauge,
    /// Generations started.
    pub generations_started: Counter,
    /// Time from an upstream attempt's start to its first content.
    pub ttft: Seconds,
    /// Gaps between consecutive content events of one upstream attempt.
    pub inter_token: Seconds,
    /// Content deltas relayed from upstreams (about one token each).
    pub deltas: Family<TargetLabels, Counter>,
    /// Frames handed to clients that merged more than one log event.
    pub coalesced_frames: Counter,
    /// Log events merged into such frames.
    pub coalesced_events: Counter,
    /// Upstream attempts by outcome class.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Retries on the same target.
    pub retries: Family<ProviderLabels, Counter>,
    /// Moves to the next target of a route's chain.
    pub failovers: Family<RouteLabels, Counter>,
    /// Replies restarted from scratch on another target.
    pub restarts: Family<ProviderLabels, Counter>,
    /// Replies continued on another target from the partial answer.
    pub continuations: Family<ProviderLabels, Counter>,
    /// Breaker state per target: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<TargetLabels, Gauge>,
    /// Records journaled but not yet in the database.
    pub persister_queue: Gauge,
    /// Journal bytes not yet in the database.
    pub persister_spill_bytes: Gauge,
    /// Records acknowledged (journaled).
    pub persister_journaled: Counter,
    /// Records written to the database.
    pub persister_stored: Counter,
    /// Failed database batch writes.
    pub persister_write_errors: Counter,
    /// Duration of database batch writes.
    pub persister_batch_seconds: Histogram,
    /// 1 while the Redis bus is connected (0 without Redis or when down).
    pub redis_connected: Gauge,
    /// Time from a room event's publish on one instance to its arrival here.
    pub redis_pubsub_lag: Histogram,
    /// Reply batches a follower recovered by position check.
    pub redis_position_replays: Counter,
    /// Bus messages dropped (inbound queue full, or not published).
    pub redis_dropped: Family<DirectionLabels, Counter>,
    /// Refusals by limits, by reason.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Usage tokens by tenant, provider, model and kind.
    pub usage_tokens: Family<UsageLabels, Counter>,
    /// Cost in US dollars by tenant, provider and model.
    pub usage_cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    /// Tenant budget thresholds crossed.
    pub budget_alerts: Family<TenantLabels, Counter>,
    /// 1 while this instance drains (after SIGTERM).
    pub draining: Gauge,
}

/// Which way a bus message went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

fn latency_family() -> Seconds {
    // 1 ms .. ~33 s, doubling.
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("spillway");
        let metrics = Self {
            registry: Registry::default(),
            tenants: Mutex::new(HashSet::new()),
            connections: Family::default(),
            connections_opened: Family::default(),
            closes: Family::default(),
            generations_running: Gauge::default(),
            generations_held: Gauge::default(),
            generations_started: Counter::default(),
            ttft: latency_family(),
            inter_token: Family::new_with_constructor(|| {
                // 0.1 ms .. ~3.3 s.
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            deltas: Family::default(),
            coalesced_frames: Counter::default(),
            coalesced_events: Counter::default(),
            attempts: Family::default(),
            retries: Family::default(),
            failovers: Family::default(),
            restarts: Family::default(),
            continuations: Family::default(),
            breaker_state: Family::default(),
            persister_queue: Gauge::default(),
            persister_spill_bytes: Gauge::default(),
            persister_journaled: Counter::default(),
            persister_stored: Counter::default(),
            persister_write_errors: Counter::default(),
            persister_batch_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            redis_connected: Gauge::default(),
            redis_pubsub_lag: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            redis_position_replays: Counter::default(),
            redis_dropped: Family::default(),
            rate_limited: Family::default(),
            usage_tokens: Family::default(),
            usage_cost: Family::default(),
            budget_alerts: Family::default(),
            draining: Gauge::default(),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            "connections",
            "Live client connections by transport",
            m.connections.clone(),
        );
        r.register(
            "connections_opened",
            "Client connections opened, by transport",
            m.connections_opened.clone(),
        );
        r.register(
            "connection_closes",
            "Connections the gateway closed, by transport and reason",
            m.closes.clone(),
        );
        r.register(
            "generations_running",
            "Generations streaming now",
            m.generations_running.clone(),
        );
        r.register(
            "generations_held",
            "Generations held: streaming or resumable",
            m.generations_held.clone(),
        );
        r.register(
            "generations_started",
            "Generations started",
            m.generations_started.clone(),
        );
        r.register_with_unit(
            "upstream_ttft",
            "Time from an upstream attempt's start to its first content",
            Unit::Seconds,
            m.ttft.clone(),
        );
        r.register_with_unit(
            "upstream_inter_token",
            "Gap between consecutive content events of an upstream attempt",
            Unit::Seconds,
            m.inter_token.clone(),
        );
        r.register(
            "upstream_deltas",
            "Content deltas relayed from upstreams (about one token each)",
            m.deltas.clone(),
        );
        r.register(
            "coalesced_frames",
            "Frames sent to clients that merged several log events",
            m.coalesced_frames.clone(),
        );
        r.register(
            "coalesced_events",
            "Log events merged into coalesced frames",
            m.coalesced_events.clone(),
        );
        r.register(
            "upstream_attempts",
            "Upstream attempts by outcome class",
            m.attempts.clone(),
        );
        r.register(
            "upstream_retries",
            "Retries on the same target",
            m.retries.clone(),
        );
        r.register(
            "upstream_failovers",
            "Moves to the next target of a route",
            m.failovers.clone(),
        );
        r.register(
            "upstream_restarts",
            "Replies restarted on another target",
            m.restarts.clone(),
        );
        r.register(
            "upstream_continuations",
            "Replies continued on another target from the partial answer",
            m.continuations.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker per target: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        r.register(
            "persister_queue",
            "Records acknowledged but not yet in the database",
            m.persister_queue.clone(),
        );
        r.register_with_unit(
            "persister_spill",
            "Journal bytes not yet in the database",
            Unit::Bytes,
            m.persister_spill_bytes.clone(),
        );
        r.register(
            "persister_journaled",
            "Records acknowledged (journaled)",
            m.persister_journaled.clone(),
        );
        r.register(
            "persister_stored",
            "Records written to the database",
            m.persister_stored.clone(),
        );
        r.register(
            "persister_write_errors",
            "Failed database batch writes",
            m.persister_write_errors.clone(),
        );
        r.register_with_unit(
            "persister_batch",
            "Duration of database batch writes",
            Unit::Seconds,
            m.persister_batch_seconds.clone(),
        );
        r.register(
            "redis_connected",
            "1 while the Redis bus is connected",
            m.redis_connected.clone(),
        );
        r.register_with_unit(
            "redis_pubsub_lag",
            "Time from a room event's publish on another instance to its arrival",
            Unit::Seconds,
            m.redis_pubsub_lag.clone(),
        );
        r.register(
            "redis_position_replays",
            "Reply batches a follower recovered by position check",
            m.redis_position_replays.clone(),
        );
        r.register(
            "redis_dropped",
            "Bus messages dropped, by direction",
            m.redis_dropped.clone(),
        );
        r.register(
            "rate_limited",
            "Refusals by limits, by reason",
            m.rate_limited.clone(),
        );
        r.register(
            "usage_tokens",
            "Usage tokens by tenant, provider, model and kind",
            m.usage_tokens.clone(),
        );
        r.register(
            "usage_cost_usd",
            "Cost in US dollars by tenant, provider and model",
            m.usage_cost.clone(),
        );
        r.register(
            "budget_alerts",
            "Tenant budget thresholds crossed",
            m.budget_alerts.clone(),
        );
        r.register(
            "draining",
            "1 while this instance drains",
            m.draining.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// `tenant` as a label value: itself for the first [`MAX_TENANTS`]
    /// tenants seen, `_other` after.
    pub fn tenant(&self, tenant: &str) -> String {
        let mut seen = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(tenant) {
            return tenant.to_owned();
        }
        if seen.len() < MAX_TENANTS {
            seen.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        "_other".to_owned()
    }

    /// Counts a connection opened on `transport`; the guard counts it
    /// closed when dropped.
    pub fn connection(&'static self, transport: &'static str) -> ConnectionGuard {
        let labels = TransportLabels { transport };
        self.connections_opened.get_or_create(&labels).inc();
        self.connections.get_or_create(&labels).inc();
        ConnectionGuard { labels }
    }

    /// Counts a close the gateway chose.
    pub fn close(&self, transport: &'static str, reason: &'static str) {
        self.closes
            .get_or_create(&CloseLabels { transport, reason })
            .inc();
    }

    /// Counts a refusal by limits.
    pub fn limited(&self, reason: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels { reason })
            .inc();
    }

    /// Records one reply's usage and cost for `tenant`.
    pub fn usage(
        &self,
        tenant: &str,
        provider: &str,
        model: &str,
        prompt: u64,
        completion: u64,
        usd: f64,
    ) {
        let tenant = self.tenant(tenant);
        for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
            self.usage_tokens
                .get_or_create(&UsageLabels {
                    tenant: tenant.clone(),
                    provider: provider.to_owned(),
                    model: model.to_owned(),
                    kind,
                })
                .inc_by(tokens);
        }
        if usd > 0.0 {
            self.usage_cost
                .get_or_create(&CostLabels {
                    tenant,
                    provider: provider.to_owned(),
                    model: model.to_owned(),
                })
                .inc_by(usd);
        }
    }

    /// Observes a duration in seconds into `histogram`.
    pub fn observe(histogram: &Histogram, duration: Duration) {
        histogram.observe(duration.as_secs_f64());
    }
}

/// The `outcome` label of an upstream attempt that failed with `class`.
pub fn outcome(class: crate::provider::ErrorClass) -> &'static str {
    use crate::provider::ErrorClass;
    match class {
        ErrorClass::RateLimited => "rate_limited",
        ErrorClass::Unavailable => "unavailable",
        ErrorClass::Timeout => "timeout",
        ErrorClass::Connect => "connect",
        ErrorClass::Protocol => "protocol",
        ErrorClass::Auth => "auth",
        ErrorClass::InvalidRequest | ErrorClass::ContextLength | ErrorClass::ContentPolicy => {
            "rejected"
        }
        ErrorClass::ReplyTooLarge => "too_large",
        ErrorClass::Interrupted | ErrorClass::Gap => "interrupted",
    }
}

/// Now, in microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Brings a counter up to `total` (a cumulative count kept elsewhere).
pub fn sync_counter(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// A live connection, counted until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    labels: TransportLabels,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        get().connections.get_or_create(&self.labels).dec();
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn tenants_past_the_cap_share_one_label() {
        let metrics = Metrics::new();
        for i in 0..MAX_TENANTS {
            assert_eq!(metrics.tenant(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(metrics.tenant("late"), "_other");
        assert_eq!(metrics.tenant("t0"), "t0");
    }

    #[test]
    fn encoding_names_every_family_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.limited("request");
        metrics.usage("acme", "openai", "gpt", 3, 5, 0.25);
        let text = metrics.encode();
        assert!(text.contains("spillway_rate_limited_total{reason=\"request\"} 1"));
        assert!(text.contains(
            "spillway_usage_tokens_total{tenant=\"acme\",provider=\"openai\",model=\"gpt\",kind=\"completion\"} 5"
        ));
        assert!(text.contains(
            "spillway_usage_cost_usd_total{tenant=\"acme\",provider=\"openai\",model=\"gpt\"} 0.25"
        ));
        assert!(text.ends_with("# EOF\n"));
    }
}

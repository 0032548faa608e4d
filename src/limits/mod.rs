//! Who may do how much: rate limits per principal and per client address,
//! connection caps, daily token quotas and tenant spending alerts, by tier
//! (`[limits]` in the config).
//!
//! One [`Limits`] per process, built with [`Limits::new`]. Each principal
//! has a tier (`[[limits.tiers]]`); a tier name that is not listed gets the
//! first tier.
//!
//! # Rate limits ([`Limits::check`])
//!
//! GCRA (governor's keyed limiters) per [`Kind`]: requests, messages and
//! new connections per minute keyed by the principal key the caller passes
//! (e.g. `tenant/user` or `key:<id>`), and requests per minute keyed by
//! client address ([`Kind::Ip`], `limits.ip_requests_per_minute`, whatever
//! the tier). A budget of N per minute allows a burst of N and replenishes
//! one every 60/N seconds. The limiters run on tokio's clock, so a paused
//! test clock drives them. Every `limits.housekeeping_secs` a task forgets
//! keys that are as good as fresh (idle for a full replenish), so the keyed
//! state holds only recently active principals ([`Limits::tracked_keys`]).
//!
//! **Cluster-wide**: with `limits.cluster_wide` and a shared bus (Redis),
//! the budget is one for the fleet: an atomic GCRA script in Redis on
//! Redis's clock (`TIME`), so instances agree whatever their clocks, under
//! the key `spl:{rl:<kind>:<key>}` (its TTL: until the budget is full
//! again). While Redis is away (or slower than the command timeout) each
//! instance falls back to its local limiter and enforces the budget
//! **alone**: a fleet of M instances then allows up to M times the budget.
//! The local limiters are not touched while Redis answers, so the fallback
//! starts with a full burst.
//!
//! # Connection caps ([`Limits::connect`])
//!
//! Connections open at once per user (`max_connections_per_user`) and per
//! tenant (`max_connections_per_tenant`), **per instance** (a fleet of M
//! allows up to M times the caps); 0 means no cap. The
//! [`ConnectionPermit`] frees its slots when dropped. Caps apply even with
//! `limits.enabled = false`, as the config says.
//!
//! # Daily token quotas ([`Limits::reserve_tokens`])
//!
//! `daily_tokens` per user per UTC day (0: unlimited). Before a call the
//! caller reserves an estimate — it should be an upper bound of the
//! reply's usage: prompt tokens plus the `max_tokens` sent upstream — and
//! [`Reservation::settle`] replaces it with the real usage afterwards;
//! dropping an unsettled reservation settles it at the estimate.
//!
//! The admission rule: refused once the day is spent (`used >= quota`)
//! and while replies in flight hold so much that this one might not fit
//! (`used + reserved + estimate > quota`); but with **nothing in flight**
//! any estimate is admitted while the day is not spent, so the last reply
//! of a day (or one whose estimate exceeds the whole quota) runs, alone.
//! Hence, as long as replies stay within their estimates, usage ends at
//! most **one reply over the quota** however many streams run at once
//! (usage above an estimate is recorded in full, and widens the bound by
//! that excess).
//!
//! With `cluster_wide` and Redis, the day's counters live in Redis (hash
//! `spl:{q:<tenant>:<user>}:<yyyymmdd>` with `used` and `reserved`, TTL two
//! days), reserved and settled by scripts. Every reservation is also
//! counted locally, so while Redis is away each instance enforces the quota
//! alone on what it has seen itself; usage during an outage is not added to
//! the shared counter afterwards, and a settle that cannot reach Redis
//! leaves its estimate reserved there for the day (it errs on the side of
//! counting). Settles travel in the background: [`Limits::flush`] waits
//! for them (call it when draining).
//!
//! # Spending alerts ([`Limits::record_cost`])
//!
//! The cost of every reply adds to its tenant's UTC day, per instance; at
//! `alert_at × daily_usd` a warning is logged once that day, and once more
//! at the whole budget. [`Limits::budget_alerts`] counts them. Nothing is
//! refused for spending.
//!
//! # Turning it off
//!
//! `limits.enabled = false`: [`Limits::check`] and
//! [`Limits::reserve_tokens`] always allow (returning
//! [`Allowance::UNLIMITED`] and an unmetered reservation); caps and
//! spending alerts still apply.
//!
//! # Wiring it into a transport
//!
//! - each HTTP request: `check(Kind::Ip, client address, "")`, and once the
//!   principal is known `check(Kind::Request, principal key, tier)`;
//! - each message sent / completion: `check(Kind::Message, …)`, then
//!   `reserve_tokens` before calling the provider and `settle` with the
//!   usage reported at the end (on every outcome);
//! - each new WebSocket / SSE stream: `check(Kind::Connection, …)`, then
//!   `connect` and keep the permit for the connection's life;
//! - a refusal is a [`Limited`]: answer `429` with its [`code`]
//!   (`rate_limited`, `too_many_connections`, `quota_exceeded`) and
//!   [`headers`]; an [`Allowance`]'s headers may go on successful answers.
//!
//! Keys are logged only as the principal key strings given; content never.
//!
//! [`code`]: Limited::code
//! [`headers`]: Limited::headers

mod budget;
mod caps;
mod clock;
mod day;
mod quota;
mod rate;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::task::JoinHandle;

pub use caps::ConnectionPermit;
pub use quota::Reservation;

use crate::cluster::{Bus, QuotaCount, RateDecision};
use crate::config::{LimitsConfig, TierConfig};
use clock::TokioClock;
use day::Day;

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An HTTP request of a principal (`requests_per_minute`).
    Request,
    /// A message sent or a completion asked for (`messages_per_minute`).
    Message,
    /// A new WebSocket or SSE connection (`connections_per_minute`).
    Connection,
    /// An HTTP request from a client address, any route
    /// (`limits.ip_requests_per_minute`; the tier is ignored).
    Ip,
}

impl Kind {
    /// Its name in logs and Redis keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Message => "message",
            Self::Connection => "connection",
            Self::Ip => "ip",
        }
    }
}

/// The bound that refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// A rate limit.
    Rate(Kind),
    /// Connections open at once by one user (this instance).
    UserConnections,
    /// Connections open at once in one tenant (this instance).
    TenantConnections,
    /// A user's tokens today.
    DailyTokens,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rate(kind) => write!(f, "{} rate", kind.as_str()),
            Self::UserConnections => f.write_str("connections per user"),
            Self::TenantConnections => f.write_str("connections per tenant"),
            Self::DailyTokens => f.write_str("daily tokens"),
        }
    }
}

/// An allowed check, for `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// The budget (per minute); 0: not limited.
    pub limit: u64,
    /// What is left of it now, this request counted.
    pub remaining: u64,
    /// Seconds until the whole budget is available again.
    pub reset_secs: u64,
}

impl Allowance {
    /// What `check` answers with limits off: no headers.
    pub const UNLIMITED: Self = Self {
        limit: 0,
        remaining: 0,
        reset_secs: 0,
    };

    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (none when not
    /// limited).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        if self.limit == 0 {
            return Vec::new();
        }
        vec![
            (LIMIT.clone(), HeaderValue::from(self.limit)),
            (REMAINING.clone(), HeaderValue::from(self.remaining)),
            (RESET.clone(), HeaderValue::from(self.reset_secs)),
        ]
    }
}

/// A refusal: what the HTTP layer turns into `429`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{bound} limit reached (limit {limit})")]
pub struct Limited {
    /// Which bound.
    pub bound: Bound,
    /// Its size (per minute, connections, or tokens per day).
    pub limit: u64,
    /// What is left: 0, except for a token quota whose rest is smaller
    /// than the estimate asked for.
    pub remaining: u64,
    /// When trying again may succeed; `None` when no time can be promised
    /// (a slot frees when another connection closes or a reply in flight
    /// settles).
    pub retry_after: Option<Duration>,
    /// Seconds until the bound is wholly available again (a rate budget
    /// refilled, a new UTC day); `None` for connection caps.
    pub reset_secs: Option<u64>,
}

impl Limited {
    /// The stable error code: `rate_limited`, `too_many_connections` or
    /// `quota_exceeded`.
    pub fn code(&self) -> &'static str {
        match self.bound {
            Bound::Rate(_) => "rate_limited",
            Bound::UserConnections | Bound::TenantConnections => "too_many_connections",
            Bound::DailyTokens => "quota_exceeded",
        }
    }

    /// `Retry-After` (whole seconds, rounded up) when known, and
    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (when known).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::with_capacity(4);
        if let Some(retry_after) = self.retry_after {
            let secs = rate::ceil_secs(retry_after).max(1);
            headers.push((http::header::RETRY_AFTER, HeaderValue::from(secs)));
        }
        headers.push((LIMIT.clone(), HeaderValue::from(self.limit)));
        headers.push((REMAINING.clone(), HeaderValue::from(self.remaining)));
        if let Some(reset) = self.reset_secs {
            headers.push((RESET.clone(), HeaderValue::from(reset)));
        }
        headers
    }
}

static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Every limit of this process. See the module docs.
pub struct Limits {
    /// `limits.enabled`: off, rate limits and quotas always allow.
    enabled: bool,
    /// Budgets are the fleet's, through the bus: `limits.cluster_wide` and
    /// a bus shared with other instances.
    cluster: bool,
    /// Redis, for cluster-wide budgets.
    bus: Arc<dyn Bus>,
    /// In config order; the first one is for unknown tier names.
    tiers: Vec<TierConfig>,
    /// `limits.ip_requests_per_minute`.
    ip_per_minute: u32,
    /// The local rate limiters (the whole story on one instance, the
    /// fallback in a fleet).
    rates: rate::RateTable,
    /// Connections open now (shared with the permits).
    caps: Arc<caps::Caps>,
    /// Daily token counters (shared with the reservations).
    quotas: Arc<quota::Quotas>,
    /// Tenant spending today.
    budgets: budget::Budgets,
    /// Refusals of every kind, for metrics.
    refused: AtomicU64,
    /// The housekeeping task, stopped when this is dropped.
    housekeeping: Mutex<Option<JoinHandle<()>>>,
}

impl Limits {
    /// Limits as `config` sets them, sharing budgets through `bus` when it
    /// is shared and `config.cluster_wide`. Starts the housekeeping task on
    /// the current tokio runtime (outside one, call [`housekeep`] yourself).
    ///
    /// [`housekeep`]: Self::housekeep
    pub fn new(config: &LimitsConfig, bus: Arc<dyn Bus>) -> Arc<Self> {
        let mut tiers = config.tiers.clone();
        if tiers.is_empty() {
            // Validation requires a tier; stay usable without one.
            tiers.push(TierConfig::default());
        }
        let cluster = config.cluster_wide && bus.is_shared();
        let limits = Arc::new(Self {
            enabled: config.enabled,
            cluster,
            rates: rate::RateTable::new(&tiers, config.ip_requests_per_minute, TokioClock::new()),
            tiers,
            ip_per_minute: config.ip_requests_per_minute.max(1),
            caps: Arc::new(caps::Caps::default()),
            quotas: Arc::new(quota::Quotas::new(Arc::clone(&bus), cluster)),
            bus,
            budgets: budget::Budgets::new(&config.budgets),
            refused: AtomicU64::new(0),
            housekeeping: Mutex::new(None),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let period = Duration::from_secs(config.housekeeping_secs.max(1));
            // The first sweep is due a period from now, not from whenever
            // the task first runs.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let task = runtime.spawn(housekeeping(Arc::downgrade(&limits), tick));
            *limits
                .housekeeping
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task);
        }
        limits
    }

    /// The tier named `name`, or the first tier.
    pub fn tier(&self, name: &str) -> &TierConfig {
        &self.tiers[self.tier_index(name)]
    }

    /// Counts one `kind` for `key` (a principal key, or a client address
    /// for [`Kind::Ip`]) under `tier`'s budget: the fleet's through Redis
    /// when cluster-wide and Redis answers, else this instance's.
    pub async fn check(&self, kind: Kind, key: &str, tier: &str) -> Result<Allowance, Limited> {
        if !self.enabled {
            return Ok(Allowance::UNLIMITED);
        }
        let tier = self.tier_index(tier);
        let result = match self.shared_check(kind, key, tier).await {
            Some(result) => result,
            None => self.rates.check(kind, tier, key),
        };
        if let Err(limited) = &result {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::metrics::get().limited(kind.as_str());
            tracing::debug!(
                kind = kind.as_str(),
                key,
                limit = limited.limit,
                "rate limited"
            );
        }
        result
    }

    /// Takes a slot for a new connection of `user` of `tenant` under
    /// `tier`'s caps (this instance's connections); the permit frees it
    /// when dropped.
    pub fn connect(
        &self,
        tenant: &str,
        user: &str,
        tier: &str,
    ) -> Result<ConnectionPermit, Limited> {
        let tier = self.tier(tier);
        let permit = self.caps.acquire(
            tenant,
            user,
            tier.max_connections_per_user,
            tier.max_connections_per_tenant,
        );
        if let Err(limited) = &permit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::metrics::get().limited("connections_cap");
            tracing::info!(
                tenant,
                user,
                bound = %limited.bound,
                limit = limited.limit,
                "connection refused: cap reached"
            );
        }
        permit
    }

    /// Reserves `estimate` tokens (an upper bound of the call's usage) of
    /// `user`'s daily quota under `tier` before a call; see the module
    /// docs for the rule. Settle the reservation with the real usage.
    pub async fn reserve_tokens(
        &self,
        tenant: &str,
        user: &str,
        tier: &str,
        estimate: u64,
    ) -> Result<Reservation, Limited> {
        let quota = self.tier(tier).daily_tokens;
        if !self.enabled || quota == 0 {
            return Ok(Reservation::unmetered(estimate));
        }
        let reserved = self
            .quotas
            .reserve(tenant, user, quota, estimate, Day::today())
            .await;
        if let Err(limited) = &reserved {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::metrics::get().limited("daily_tokens");
            tracing::info!(
                tenant,
                user,
                quota,
                remaining = limited.remaining,
                estimate,
                "tokens refused: daily quota"
            );
        }
        reserved
    }

    /// `user`'s tokens today: settled and reserved (the fleet's when
    /// cluster-wide and Redis answers, else this instance's).
    pub async fn tokens_today(&self, tenant: &str, user: &str) -> QuotaCount {
        self.quotas.count(tenant, user, Day::today().yyyymmdd).await
    }

    /// Adds the cost of a reply to `tenant`'s spending today (this
    /// instance), warning at the alert threshold and at the whole budget.
    pub fn record_cost(&self, tenant: &str, usd: f64) {
        self.budgets.record(tenant, usd, Day::today().yyyymmdd);
    }

    /// Budget thresholds crossed since start (for metrics).
    pub fn budget_alerts(&self) -> u64 {
        self.budgets.alerts()
    }

    /// Refusals of every kind since start (for metrics).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Keys held by the local rate limiters now.
    pub fn tracked_keys(&self) -> usize {
        self.rates.len()
    }

    /// Forgets rate-limit keys as good as fresh, and counters of days gone
    /// by. The housekeeping task calls it every `limits.housekeeping_secs`.
    pub fn housekeep(&self) {
        self.rates.housekeep();
        let today = Day::today().yyyymmdd;
        self.quotas.housekeep(today);
        self.budgets.housekeep(today);
    }

    /// Waits until every settled reservation has reached the shared
    /// counter (or failed to). Call it when draining.
    pub async fn flush(&self) {
        self.quotas.flush().await;
    }

    fn tier_index(&self, name: &str) -> usize {
        self.tiers.iter().position(|t| t.name == name).unwrap_or(0)
    }

    /// The fleet's verdict, `None` when not cluster-wide or Redis is away.
    async fn shared_check(
        &self,
        kind: Kind,
        key: &str,
        tier: usize,
    ) -> Option<Result<Allowance, Limited>> {
        if !self.cluster {
            return None;
        }
        let tier = &self.tiers[tier];
        let per_minute = match kind {
            Kind::Request => tier.requests_per_minute,
            Kind::Message => tier.messages_per_minute,
            Kind::Connection => tier.connections_per_minute,
            Kind::Ip => self.ip_per_minute,
        }
        .max(1);
        let bus_key = format!("{}:{key}", kind.as_str());
        let decision = self.bus.rate_limit(&bus_key, per_minute, 1).await?;
        Some(shared_outcome(kind, per_minute, decision))
    }
}

/// Redis's GCRA decision in the HTTP layer's terms.
fn shared_outcome(
    kind: Kind,
    per_minute: u32,
    decision: RateDecision,
) -> Result<Allowance, Limited> {
    let limit = u64::from(per_minute);
    if decision.allowed {
        Ok(Allowance {
            limit,
            remaining: u64::from(decision.remaining).min(limit),
            reset_secs: rate::ceil_secs(decision.reset),
        })
    } else {
        Err(Limited {
            bound: Bound::Rate(kind),
            limit,
            remaining: 0,
            retry_after: Some(decision.retry_after),
            reset_secs: Some(rate::ceil_secs(decision.reset)),
        })
    }
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("enabled", &self.enabled)
            .field("cluster", &self.cluster)
            .field("tiers", &self.tiers.len())
            .field("tracked_keys", &self.rates.len())
            .field("quotas", &self.quotas)
            .finish_non_exhaustive()
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        let task = self
            .housekeeping
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// At every `tick`, until the limits are dropped: [`Limits::housekeep`].
async fn housekeeping(limits: Weak<Limits>, mut tick: tokio::time::Interval) {
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        limits.housekeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_reservations_can_cross_threads() {
        fn send<T: Send>(_: &T) {}
        let bus: Arc<dyn Bus> = Arc::new(crate::cluster::LocalBus::new(
            "n".into(),
            &crate::config::Config::default(),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let limits = Limits::new(&LimitsConfig::default(), bus);
        send(&limits.check(Kind::Message, "t/u", "default"));
        send(&limits.reserve_tokens("t", "u", "default", 1));
        send(&limits.flush());
    }

    #[test]
    fn limited_headers_round_up_retry_after_and_omit_the_unknown() {
        let rate = Limited {
            bound: Bound::Rate(Kind::Message),
            limit: 60,
            remaining: 0,
            retry_after: Some(Duration::from_millis(200)),
            reset_secs: Some(60),
        };
        let headers: Vec<(String, String)> = rate
            .headers()
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            headers,
            [
                ("retry-after", "1"),
                ("x-ratelimit-limit", "60"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "60"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert_eq!(rate.code(), "rate_limited");
        let cap = Limited {
            bound: Bound::UserConnections,
            limit: 4,
            remaining: 0,
            retry_after: None,
            reset_secs: None,
        };
        let names: Vec<_> = cap.headers().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, [LIMIT.clone(), REMAINING.clone()]);
        assert_eq!(cap.code(), "too_many_connections");
        assert!(Allowance::UNLIMITED.headers().is_empty());
    }
}

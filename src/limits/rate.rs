//! Local rate limits: governor's keyed GCRA limiters, one per tier and
//! kind plus one per client address, on tokio's clock.
//!
//! Governor keeps one quota per limiter, so each tier has its own three
//! limiters (requests, messages, connections); a key's state lives in the
//! limiter of the tier it was checked under. The state stores are
//! governor's mutex-guarded `HashMap` (not its `dashmap` feature): a check
//! holds the lock for a few arithmetic steps, the load is split over the
//! limiters, and it spares the build a concurrent map crate.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use super::clock::TokioClock;
use super::{Allowance, Bound, Kind, Limited};
use crate::config::TierConfig;

/// A keyed GCRA limiter on tokio's clock that reports what is left.
type KeyedLimiter =
    RateLimiter<String, HashMapStateStore<String>, TokioClock, StateInformationMiddleware>;

/// Every local limiter.
pub(super) struct RateTable {
    /// Per tier, in config order: requests, messages, connections.
    tiers: Vec<[KeyedLimiter; 3]>,
    /// Requests per client address, whatever the tier.
    ip: KeyedLimiter,
}

impl RateTable {
    /// Limiters for `tiers` and for client addresses, all on `clock`.
    pub(super) fn new(tiers: &[TierConfig], ip_per_minute: u32, clock: TokioClock) -> Self {
        let tiers = tiers
            .iter()
            .map(|tier| {
                [
                    limiter(tier.requests_per_minute, clock),
                    limiter(tier.messages_per_minute, clock),
                    limiter(tier.connections_per_minute, clock),
                ]
            })
            .collect();
        Self {
            tiers,
            ip: limiter(ip_per_minute, clock),
        }
    }

    /// Counts one `kind` for `key` under the tier at `tier` (ignored for
    /// [`Kind::Ip`]).
    pub(super) fn check(&self, kind: Kind, tier: usize, key: &str) -> Result<Allowance, Limited> {
        let limiter = self.limiter(kind, tier);
        let key = key.to_owned();
        match limiter.check_key(&key) {
            Ok(snapshot) => {
                let quota = snapshot.quota();
                let limit = quota.burst_size().get();
                let remaining = snapshot.remaining_burst_capacity().min(limit);
                // Full again once every used cell has replenished.
                let reset = quota.replenish_interval() * (limit - remaining);
                Ok(Allowance {
                    limit: u64::from(limit),
                    remaining: u64::from(remaining),
                    reset_secs: ceil_secs(reset),
                })
            }
            Err(not_until) => {
                let quota = not_until.quota();
                let limit = quota.burst_size().get();
                let retry_after = not_until.wait_time_from(limiter.clock().now());
                // One cell conforms after `retry_after`; the rest follow
                // evenly.
                let reset = retry_after + quota.replenish_interval() * (limit - 1);
                Err(Limited {
                    bound: Bound::Rate(kind),
                    limit: u64::from(limit),
                    remaining: 0,
                    retry_after: Some(retry_after),
                    reset_secs: Some(ceil_secs(reset)),
                })
            }
        }
    }

    /// Forgets keys whose state is as good as fresh (idle for a full
    /// replenish), and gives the memory back.
    pub(super) fn housekeep(&self) {
        for limiter in self.all() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys held, over every limiter.
    pub(super) fn len(&self) -> usize {
        self.all().map(KeyedLimiter::len).sum()
    }

    fn limiter(&self, kind: Kind, tier: usize) -> &KeyedLimiter {
        let index = match kind {
            Kind::Ip => return &self.ip,
            Kind::Request => 0,
            Kind::Message => 1,
            Kind::Connection => 2,
        };
        // `tier` comes from `Limits::tier_index`, always in range; the
        // first tier is the fallback all the same.
        let tier = self.tiers.get(tier).or_else(|| self.tiers.first());
        tier.map_or(&self.ip, |limiters| &limiters[index])
    }

    fn all(&self) -> impl Iterator<Item = &KeyedLimiter> {
        self.tiers
            .iter()
            .flat_map(|limiters| limiters.iter())
            .chain(std::iter::once(&self.ip))
    }
}

/// A limiter of `per_minute` cells: a burst of all of them, replenishing
/// evenly over the minute.
fn limiter(per_minute: u32, clock: TokioClock) -> KeyedLimiter {
    // Config validation keeps every per-minute figure at least 1.
    let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    RateLimiter::new(
        Quota::per_minute(per_minute),
        HashMapStateStore::default(),
        clock,
    )
}

/// Whole seconds, rounded up (a wait of 0.2 s is "retry in 1 s").
pub(super) fn ceil_secs(duration: Duration) -> u64 {
    duration
        .as_nanos()
        .div_ceil(1_000_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
}

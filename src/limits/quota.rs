//! Daily token quotas: reserve an estimate before a call, settle the real
//! usage after it.
//!
//! A user's day has `used` (settled tokens) and `reserved` (estimates of
//! replies in flight). [`admits`] is the one admission rule, here and in
//! the Redis script. Every reservation is also counted in this instance's
//! own ledger, so while Redis is away the fallback knows at least this
//! instance's share of the day.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::day::Day;
use super::{Bound, Limited};
use crate::cluster::{Bus, QuotaCount};

/// Whether a reservation of `estimate` tokens may start, given the day's
/// `quota`, `used` and `reserved` tokens.
///
/// Refused once the day is spent (`used >= quota`), and while replies in
/// flight hold so much that this one might not fit
/// (`used + reserved + estimate > quota`). With nothing in flight, any
/// estimate is admitted while the day is not spent: an estimate larger than
/// what is left (or than the whole quota) can still run, alone. So, as long
/// as each reply stays within its estimate, usage ends at most one reply
/// over the quota, however many streams run at once.
pub(crate) fn admits(quota: u64, used: u64, reserved: u64, estimate: u64) -> bool {
    used < quota
        && (reserved == 0 || used.saturating_add(reserved).saturating_add(estimate) <= quota)
}

/// The ledgers of daily token quotas.
pub(super) struct Quotas {
    /// This instance's counters per (tenant, user), for the day in each.
    local: Mutex<HashMap<(String, String), DayCount>>,
    /// Keeps the day's counters of the fleet (when `cluster`).
    bus: Arc<dyn Bus>,
    /// Reserve and settle through the bus first.
    cluster: bool,
    /// Settles on their way to the bus (`Limits::flush` waits for them).
    writes: TaskTracker,
}

/// One user's counters for one day.
#[derive(Debug, Clone, Copy, Default)]
struct DayCount {
    /// `yyyymmdd` of the counters.
    day: u32,
    used: u64,
    reserved: u64,
}

impl Quotas {
    pub(super) fn new(bus: Arc<dyn Bus>, cluster: bool) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            bus,
            cluster,
            writes: TaskTracker::new(),
        }
    }

    /// Reserves `estimate` of `user`'s `quota` for `day` (see [`admits`]).
    pub(super) async fn reserve(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        quota: u64,
        estimate: u64,
        day: Day,
    ) -> Result<Reservation, Limited> {
        if self.cluster
            && let Some(decision) = self
                .bus
                .reserve_quota(tenant, user, day.yyyymmdd, quota, estimate)
                .await
        {
            if !decision.admitted {
                return Err(refused(quota, decision.count, day));
            }
            // This instance's share, for the fallback while Redis is away.
            self.with_local(tenant, user, day.yyyymmdd, |count| {
                count.reserved += estimate;
            });
            return Ok(self.reservation(tenant, user, day, estimate, true));
        }
        let admitted = self.with_local(tenant, user, day.yyyymmdd, |count| {
            if admits(quota, count.used, count.reserved, estimate) {
                count.reserved += estimate;
                Ok(())
            } else {
                Err(QuotaCount {
                    used: count.used,
                    reserved: count.reserved,
                })
            }
        });
        match admitted {
            Ok(()) => Ok(self.reservation(tenant, user, day, estimate, false)),
            Err(count) => Err(refused(quota, count, day)),
        }
    }

    /// `user`'s counters for `day`: the fleet's through the bus, else this
    /// instance's.
    pub(super) async fn count(&self, tenant: &str, user: &str, day: u32) -> QuotaCount {
        if self.cluster
            && let Some(count) = self.bus.quota_count(tenant, user, day).await
        {
            return count;
        }
        let local = self.lock();
        local
            .get(&(tenant.to_owned(), user.to_owned()))
            .filter(|count| count.day == day)
            .map(|count| QuotaCount {
                used: count.used,
                reserved: count.reserved,
            })
            .unwrap_or_default()
    }

    /// Forgets counters of days gone by (none of their reservations is in
    /// flight any more, or what is is no longer checked against).
    pub(super) fn housekeep(&self, today: u32) {
        self.lock().retain(|_, count| count.day >= today);
    }

    /// Waits until every settle has reached the bus (or given up).
    pub(super) async fn flush(&self) {
        self.writes.close();
        self.writes.wait().await;
        self.writes.reopen();
    }

    fn reservation(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        day: Day,
        estimate: u64,
        on_bus: bool,
    ) -> Reservation {
        Reservation {
            ledger: Some(Ledger {
                quotas: Arc::clone(self),
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                day: day.yyyymmdd,
                on_bus,
            }),
            estimate,
        }
    }

    /// Runs `f` on `user`'s counters for `day`, starting them afresh when
    /// they were of an earlier day.
    fn with_local<T>(
        &self,
        tenant: &str,
        user: &str,
        day: u32,
        f: impl FnOnce(&mut DayCount) -> T,
    ) -> T {
        let mut local = self.lock();
        let count = local
            .entry((tenant.to_owned(), user.to_owned()))
            .or_default();
        if count.day != day {
            *count = DayCount {
                day,
                ..DayCount::default()
            };
        }
        f(count)
    }

    fn settle(&self, ledger: &Ledger, estimate: u64, actual: u64) {
        {
            let mut local = self.lock();
            // A reservation of a day gone by has nothing left to correct
            // here: that day's counters are no longer checked.
            if let Some(count) = local
                .get_mut(&(ledger.tenant.clone(), ledger.user.clone()))
                .filter(|count| count.day == ledger.day)
            {
                count.reserved = count.reserved.saturating_sub(estimate);
                count.used = count.used.saturating_add(actual);
            }
        }
        if !ledger.on_bus {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                tenant = %ledger.tenant,
                user = %ledger.user,
                "token quota settled outside the runtime: the shared counter keeps the estimate"
            );
            return;
        };
        let bus = Arc::clone(&self.bus);
        let (tenant, user, day) = (ledger.tenant.clone(), ledger.user.clone(), ledger.day);
        self.writes.spawn_on(
            async move {
                if !bus
                    .settle_quota(&tenant, &user, day, estimate, actual)
                    .await
                {
                    tracing::warn!(
                        %tenant,
                        %user,
                        "redis away: the shared token counter keeps this reply's estimate"
                    );
                }
            },
            &runtime,
        );
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), DayCount>> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("users", &self.lock().len())
            .field("cluster", &self.cluster)
            .field("pending_writes", &self.writes.len())
            .finish()
    }
}

/// Why a reservation was refused, for the HTTP layer.
fn refused(quota: u64, count: QuotaCount, day: Day) -> Limited {
    let spent = count.used >= quota;
    Limited {
        bound: Bound::DailyTokens,
        limit: quota,
        remaining: quota.saturating_sub(count.used.saturating_add(count.reserved)),
        // Spent: tomorrow (UTC). Held by replies in flight: as soon as one
        // settles, which no one can tell.
        retry_after: spent.then(|| Duration::from_secs(day.secs_left)),
        reset_secs: Some(day.secs_left),
    }
}

/// Tokens held for one call until it is settled.
///
/// [`settle`](Self::settle) replaces the estimate with the real usage;
/// dropping an unsettled reservation (an error path, a panic) settles it at
/// the estimate, so no usage is ever lost from the accounts.
#[derive(Debug)]
pub struct Reservation {
    /// Where it is counted; `None`: not metered (limits off, or the tier
    /// has no daily quota).
    ledger: Option<Ledger>,
    /// Tokens held.
    estimate: u64,
}

/// Where a reservation is counted.
struct Ledger {
    quotas: Arc<Quotas>,
    tenant: String,
    user: String,
    /// `yyyymmdd` it counts in (a reply crossing midnight counts in the
    /// day it started).
    day: u32,
    /// The bus holds it too (the shared counter admitted it).
    on_bus: bool,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("tenant", &self.tenant)
            .field("user", &self.user)
            .field("day", &self.day)
            .field("on_bus", &self.on_bus)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// A reservation that counts nothing.
    pub(super) fn unmetered(estimate: u64) -> Self {
        Self {
            ledger: None,
            estimate,
        }
    }

    /// The tokens reserved.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Whether a quota counts this call (false: limits off, or the tier
    /// has no daily quota).
    pub fn is_metered(&self) -> bool {
        self.ledger.is_some()
    }

    /// Records the call's real usage (prompt + completion tokens) in place
    /// of the estimate. Usage above the estimate is recorded in full.
    pub fn settle(mut self, actual: u64) {
        self.finish(actual);
    }

    fn finish(&mut self, actual: u64) {
        if let Some(ledger) = self.ledger.take() {
            ledger.quotas.settle(&ledger, self.estimate, actual);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let estimate = self.estimate;
        self.finish(estimate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::LocalBus;
    use crate::config::Config;

    fn quotas() -> Arc<Quotas> {
        let bus = Arc::new(LocalBus::new("n".into(), &Config::default()));
        Arc::new(Quotas::new(bus, false))
    }

    fn day(yyyymmdd: u32) -> Day {
        Day {
            yyyymmdd,
            secs_left: 60,
        }
    }

    #[test]
    fn admission_rule() {
        // Fits.
        assert!(admits(100, 0, 0, 100));
        assert!(admits(100, 40, 20, 40));
        // In-flight replies hold what is left.
        assert!(!admits(100, 40, 20, 41));
        // Nothing in flight: the last reply of the day may run alone,
        // even with an estimate over the whole quota.
        assert!(admits(100, 99, 0, 500));
        assert!(admits(100, 0, 0, 500));
        // Spent.
        assert!(!admits(100, 100, 0, 1));
        assert!(!admits(100, 150, 0, 0));
    }

    #[tokio::test]
    async fn a_new_day_starts_from_zero_and_old_settles_do_not_leak_into_it() {
        let quotas = quotas();
        let yesterday = quotas.reserve("t", "u", 100, 60, day(1)).await.unwrap();
        quotas
            .reserve("t", "u", 100, 40, day(1))
            .await
            .unwrap()
            .settle(100);
        assert!(quotas.reserve("t", "u", 100, 1, day(1)).await.is_err());
        // The next day: everything available, even while yesterday's
        // reply is still in flight.
        let today = quotas.reserve("t", "u", 100, 100, day(2)).await.unwrap();
        yesterday.settle(70);
        let count = quotas.count("t", "u", 2).await;
        assert_eq!((count.used, count.reserved), (0, 100));
        today.settle(10);
        assert_eq!(quotas.count("t", "u", 2).await.used, 10);
        quotas.housekeep(3);
        assert!(quotas.lock().is_empty());
    }

    #[tokio::test]
    async fn a_dropped_reservation_counts_its_estimate() {
        let quotas = quotas();
        drop(quotas.reserve("t", "u", 100, 30, day(1)).await.unwrap());
        let count = quotas.count("t", "u", 1).await;
        assert_eq!((count.used, count.reserved), (30, 0));
    }
}

//! The global retry budget: retries may add only a bounded share of load,
//! so an outage cannot multiply traffic into a retry storm (Finagle's and
//! linkerd's retry budgets).
//!
//! This unit owns one decision: may one more retry happen now? It keeps no
//! per-request state; the caller [`deposits`](RetryBudget::deposit) once per
//! client request (not per attempt, or retries would earn retries) and
//! [`withdraws`](RetryBudget::try_withdraw) before every retry or fail-over
//! attempt.
//!
//! # Behaviour
//!
//! Over a rolling [`BudgetConfig::window`], the retries allowed are
//! `min_per_window + ratio * requests`, where `requests` counts the deposits
//! in the window. A withdrawal succeeds (and counts) only if one more retry
//! fits: fractions of a retry earned by deposits do not add up to a retry
//! until they make a whole one. Deposits and withdrawals older than the
//! window stop counting, so an exhausted budget refills as time passes.
//! The reserve `min_per_window` lets a quiet gateway still retry.
//!
//! Time is tokio's ([`tokio::time::Instant`]), so tests pause the clock and
//! advance it instead of sleeping.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;

/// Tuning for the retry budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per request in the window (0.2: retries add at most
    /// 20 % load on top of the reserve).
    pub ratio: f64,
    /// Retries allowed in any window regardless of traffic, so a gateway
    /// with little traffic can still retry.
    pub min_per_window: u32,
    /// How far back requests and retries count.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_window: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// The retry budget shared by every route (by reference or `Arc`).
///
/// A std mutex, not a tokio one: every critical section is a few counter
/// updates, never held across an `.await`.
#[derive(Debug)]
pub struct RetryBudget {
    /// The reserve, in retry units of [`SCALE`].
    reserve: u64,
    /// Retry units of [`SCALE`] each deposit earns. Fixed point, so that
    /// e.g. 100 requests at ratio 0.29 earn exactly 29 retries rather than
    /// 28.999… of them.
    earned_per_request: u64,
    /// `[deposits, withdrawals]` in the rolling window.
    window: Mutex<Window>,
}

/// Fixed-point units per retry (a millionth of a retry is the precision of
/// `ratio`).
const SCALE: u64 = 1_000_000;

impl RetryBudget {
    /// A budget with nothing deposited or withdrawn. A negative or NaN
    /// ratio earns nothing.
    pub fn new(config: BudgetConfig) -> Self {
        // `as` saturates: NaN and negatives become 0, huge ratios u64::MAX.
        let earned_per_request = (config.ratio * SCALE as f64).round() as u64;
        Self {
            reserve: u64::from(config.min_per_window) * SCALE,
            earned_per_request,
            window: Mutex::new(Window::new(config.window, Instant::now())),
        }
    }

    /// Records that one client request started.
    pub fn deposit(&self) {
        self.lock().add(Instant::now(), [1, 0]);
    }

    /// Whether one retry may happen now; if so, it is counted against the
    /// budget.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.lock();
        let [deposits, withdrawals] = window.totals(now);
        let allowed = self
            .reserve
            .saturating_add(self.earned_per_request.saturating_mul(deposits));
        let needed = withdrawals.saturating_add(1).saturating_mul(SCALE);
        if needed > allowed {
            return false;
        }
        window.add(now, [0, 1]);
        true
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // Every section is a counter update that cannot panic half-way, so
        // a poisoned lock is still good.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn budget(ratio: f64, min_per_window: u32) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio,
            min_per_window,
            window: Duration::from_secs(10),
        })
    }

    fn withdrawals(budget: &RetryBudget) -> usize {
        std::iter::from_fn(|| budget.try_withdraw().then_some(())).count()
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_min_retries_without_requests() {
        let budget = budget(0.2, 3);
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "exhausted");
        assert!(
            !budget.try_withdraw(),
            "refusals are not counted, still out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_earns_its_ratio_of_a_retry() {
        let budget = budget(0.2, 0);
        assert!(!budget.try_withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.try_withdraw(), "0.8 of a retry is not a retry");
        budget.deposit();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_adds_on_top_of_the_reserve() {
        let budget = budget(0.5, 2);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact_for_decimal_fractions() {
        let budget = budget(0.29, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget), 29);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_budget_refills_as_the_window_rolls() {
        let budget = budget(0.2, 2);
        assert_eq!(withdrawals(&budget), 2);
        advance(Duration::from_secs(8)).await;
        assert!(!budget.try_withdraw(), "withdrawals still in the window");
        advance(Duration::from_secs(2)).await;
        assert_eq!(withdrawals(&budget), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_fall_out_of_the_window() {
        let budget = budget(1.0, 0);
        for _ in 0..3 {
            budget.deposit();
        }
        advance(Duration::from_secs(10)).await;
        assert!(!budget.try_withdraw(), "earned retries expired unused");
        budget.deposit();
        assert_eq!(withdrawals(&budget), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn nonsensical_ratios_earn_nothing() {
        for ratio in [-1.0, f64::NAN] {
            let budget = budget(ratio, 1);
            for _ in 0..100 {
                budget.deposit();
            }
            assert_eq!(withdrawals(&budget), 1, "ratio {ratio}");
        }
    }
}

//! A circuit breaker for one upstream target, whose call outcome is known
//! only when a stream ends.
//!
//! The breaker owns one decision: may a new request be sent to this target
//! now? It hands out a [`Permit`] per request; the caller resolves it when
//! the stream ends (`success`, `failure`, or `cancel`), which may be minutes
//! later. Which errors are failures is the caller's business (DESIGN.md §6:
//! timeouts and in-band stream errors are failures, a client disconnect is
//! a cancel).
//!
//! # Behaviour
//!
//! - **Closed**: every request gets a permit. Outcomes are counted in a
//!   rolling window of [`BreakerConfig::window`]. After each failure, if the
//!   window holds at least [`BreakerConfig::min_requests`] outcomes and the
//!   failure share is at least [`BreakerConfig::failure_ratio`], the breaker
//!   opens. Cancelled permits count as neither success nor failure.
//! - **Open**: no permits, until [`BreakerConfig::cooldown`] has passed since
//!   it opened; then it is half-open. The change is lazy: it happens when
//!   someone asks ([`Breaker::state`], [`Breaker::try_acquire`]), so no timer
//!   task exists.
//! - **Half-open**: at most [`BreakerConfig::half_open_probes`] permits are
//!   out at once. The first probe to succeed closes the breaker with an empty
//!   window; the first to fail opens it again with a new cooldown. A
//!   cancelled probe frees its slot and changes nothing else.
//! - **Late outcomes are ignored.** Every state change starts a new
//!   *generation*, and a permit only counts in the generation it was issued
//!   in. A stream admitted while closed that ends after the breaker opened
//!   cannot close it (only probes can), cannot reopen it or stretch its
//!   cooldown, and cannot pollute the fresh window of a later closed period:
//!   the breaker already acted on the evidence of that period. Likewise a
//!   probe that resolves after another probe decided the half-open period
//!   changes nothing, and cannot free a slot in a later half-open period.
//!
//! Dropping a permit without resolving it is a cancel, so an aborted task
//! cannot leak a half-open probe slot.
//!
//! Time is tokio's ([`tokio::time::Instant`]), so tests pause the clock and
//! advance it instead of sleeping.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;

/// Tuning for one breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// How far back outcomes count toward the failure ratio.
    pub window: Duration,
    /// Outcomes the window must hold before the ratio may open the breaker,
    /// so one early failure cannot open it.
    pub min_requests: u32,
    /// Share of failures (0.0–1.0) in the window that opens the breaker.
    pub failure_ratio: f64,
    /// How long an open breaker refuses requests before it lets probes in.
    pub cooldown: Duration,
    /// Probes allowed out at once while half-open (0 is treated as 1: a
    /// breaker that never probes could never close).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            min_requests: 5,
            failure_ratio: 0.5,
            cooldown: Duration::from_secs(15),
            half_open_probes: 1,
        }
    }
}

/// The breaker's state as callers (and metrics) see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests are refused until the cooldown has passed.
    Open,
    /// A bounded number of probe requests decide whether to close or reopen.
    HalfOpen,
}

/// What the breaker's rolling window holds now: the evidence it judges the
/// target by (for operators; see [`Breaker::recent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recent {
    /// Requests that ended with a verdict (successes and failures;
    /// cancelled ones count as neither).
    pub outcomes: u64,
    /// Of those, failures.
    pub failures: u64,
}

impl Recent {
    /// The failure share (0.0 when the window is empty).
    pub fn error_rate(&self) -> f64 {
        if self.outcomes == 0 {
            0.0
        } else {
            self.failures as f64 / self.outcomes as f64
        }
    }
}

/// The circuit breaker of one upstream target, shared as `Arc<Breaker>`.
///
/// A std mutex, not a tokio one: every critical section is a few counter
/// updates, never held across an `.await`.
#[derive(Debug)]
pub struct Breaker {
    /// Thresholds and durations, fixed for the breaker's life.
    config: BreakerConfig,
    /// Everything that changes as outcomes arrive.
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where the state machine is.
    state: State,
    /// Bumped on every state change; a permit only counts in the generation
    /// that issued it, which is how late outcomes are ignored.
    generation: u64,
    /// Outcomes of the current closed period: `[requests, failures]`,
    /// where requests counts successes and failures alike.
    window: Window,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open {
        /// When the cooldown started.
        since: Instant,
    },
    HalfOpen {
        /// Probe permits issued in this half-open period and not yet
        /// resolved.
        probes: u32,
    },
}

/// How a permit ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Cancel,
}

impl Breaker {
    /// A closed breaker with an empty window.
    pub fn new(config: BreakerConfig) -> Self {
        let window = Window::new(config.window, Instant::now());
        Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window,
            }),
        }
    }

    /// The current state. An open breaker whose cooldown has passed reports
    /// (and becomes) half-open.
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        inner.end_cooldown(Instant::now(), &self.config);
        match inner.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// The outcomes in the rolling window now ([`BreakerConfig::window`]):
    /// those of the current closed period, or, while open or half-open,
    /// of the closed period that opened it (until they age out). A probe
    /// that closes the breaker starts an empty window. Reading changes
    /// nothing.
    pub fn recent(&self) -> Recent {
        let now = Instant::now();
        let inner = self.lock();
        let [outcomes, failures] = inner.window.totals(now);
        Recent { outcomes, failures }
    }

    /// A permit to send one request, or `None` while open, or while
    /// half-open with every probe slot taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut inner = self.lock();
        inner.end_cooldown(Instant::now(), &self.config);
        match &mut inner.state {
            State::Closed => {}
            State::Open { .. } => return None,
            State::HalfOpen { probes } => {
                if *probes >= self.config.half_open_probes.max(1) {
                    return None;
                }
                *probes += 1;
            }
        }
        Some(Permit {
            breaker: Some(Arc::clone(self)),
            generation: inner.generation,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every section leaves `Inner` consistent (no section can panic
        // half-way through a transition), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one permit's outcome; see the module docs for the rules.
    fn resolve(&self, generation: u64, outcome: Outcome) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.generation != generation {
            // Issued in an earlier period: the breaker has moved on.
            return;
        }
        match (inner.state, outcome) {
            (State::Closed, Outcome::Success) => inner.window.add(now, [1, 0]),
            (State::Closed, Outcome::Failure) => {
                inner.window.add(now, [1, 1]);
                let [requests, failures] = inner.window.totals(now);
                if requests >= u64::from(self.config.min_requests)
                    && failures as f64 >= self.config.failure_ratio * requests as f64
                {
                    inner.open(now);
                }
            }
            (State::HalfOpen { .. }, Outcome::Success) => inner.close(now),
            (State::HalfOpen { .. }, Outcome::Failure) => inner.open(now),
            (State::HalfOpen { probes }, Outcome::Cancel) => {
                inner.state = State::HalfOpen {
                    probes: probes.saturating_sub(1),
                };
            }
            // A cancel while closed counts as nothing. No permit is ever
            // issued while open, so a current-generation one cannot be here.
            (State::Closed, Outcome::Cancel) | (State::Open { .. }, _) => {}
        }
    }
}

impl Inner {
    /// Open → half-open once the cooldown has passed.
    fn end_cooldown(&mut self, now: Instant, config: &BreakerConfig) {
        if let State::Open { since } = self.state
            && now.saturating_duration_since(since) >= config.cooldown
        {
            self.transition(State::HalfOpen { probes: 0 });
        }
    }

    fn open(&mut self, now: Instant) {
        self.transition(State::Open { since: now });
    }

    /// Back to closed, judging only outcomes from now on.
    fn close(&mut self, now: Instant) {
        self.window.reset(now);
        self.transition(State::Closed);
    }

    fn transition(&mut self, state: State) {
        self.state = state;
        self.generation = self.generation.wrapping_add(1);
    }
}

/// Leave to send one request to the target; resolve it when the stream
/// ends. Dropping it unresolved counts as [`Permit::cancel`].
#[derive(Debug)]
#[must_use = "a permit must be resolved when the request ends, or it counts as cancelled"]
pub struct Permit {
    /// The breaker to report to; `None` once resolved, so `Drop` knows the
    /// outcome is already in.
    breaker: Option<Arc<Breaker>>,
    /// The breaker generation this permit was issued in; outcomes from an
    /// older generation are ignored.
    generation: u64,
}

impl Permit {
    /// The request succeeded (the stream ended normally).
    pub fn success(mut self) {
        self.resolve(Outcome::Success);
    }

    /// The request failed in a way that says the target is unhealthy
    /// (error status, timeout, in-band stream error).
    pub fn failure(mut self) {
        self.resolve(Outcome::Failure);
    }

    /// The request ended without a verdict on the target (the client went
    /// away, or the error was the request's own fault).
    pub fn cancel(mut self) {
        self.resolve(Outcome::Cancel);
    }

    fn resolve(&mut self, outcome: Outcome) {
        if let Some(breaker) = self.breaker.take() {
            breaker.resolve(self.generation, outcome);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.resolve(Outcome::Cancel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn breaker(config: BreakerConfig) -> Arc<Breaker> {
        Arc::new(Breaker::new(config))
    }

    fn fail(b: &Arc<Breaker>, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("breaker should admit").failure();
        }
    }

    fn succeed(b: &Arc<Breaker>, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("breaker should admit").success();
        }
    }

    /// Opens a default-config breaker and waits out its cooldown.
    async fn half_open(b: &Arc<Breaker>) {
        fail(b, b.config.min_requests.max(1));
        assert_eq!(b.state(), BreakerState::Open);
        advance(b.config.cooldown).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn recent_reports_the_window_outcomes_and_forgets_them_on_close() {
        let b = breaker(BreakerConfig::default());
        assert_eq!(b.recent(), Recent::default());
        assert!(b.recent().error_rate().abs() < f64::EPSILON);
        succeed(&b, 3);
        fail(&b, 1);
        b.try_acquire().expect("breaker should admit").cancel();
        let recent = b.recent();
        assert_eq!(
            recent,
            Recent {
                outcomes: 4,
                failures: 1
            }
        );
        assert!((recent.error_rate() - 0.25).abs() < f64::EPSILON);
        advance(b.config.window).await;
        assert_eq!(b.recent(), Recent::default(), "aged out of the window");
        half_open(&b).await;
        assert_eq!(
            b.recent().failures,
            u64::from(b.config.min_requests),
            "half-open still shows the failures that opened it"
        );
        b.try_acquire().expect("a probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.recent(), Recent::default(), "closing starts afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_failure_ratio_only_after_min_requests() {
        let b = breaker(BreakerConfig::default());
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed, "4 of min 5 requests");
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_the_failure_ratio() {
        let b = breaker(BreakerConfig::default());
        succeed(&b, 6);
        fail(&b, 5);
        assert_eq!(b.state(), BreakerState::Closed, "5 of 11 failed");
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open, "6 of 12 is the ratio");
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_count_while_in_the_window() {
        let b = breaker(BreakerConfig::default());
        fail(&b, 4);
        advance(Duration::from_secs(24)).await;
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_older_than_the_window_stop_counting() {
        let b = breaker(BreakerConfig::default());
        fail(&b, 4);
        // Past the 30 s window, into a different ring bucket than the old
        // outcomes (so expiry, not bucket reuse, is what drops them).
        advance(Duration::from_secs(35)).await;
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed, "only 4 in the window");
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn open_breaker_refuses_permits_until_the_cooldown_passes() {
        let b = breaker(BreakerConfig::default());
        fail(&b, 5);
        assert!(b.try_acquire().is_none());
        advance(Duration::from_secs(15) - Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_the_configured_probes() {
        let b = breaker(BreakerConfig {
            half_open_probes: 3,
            ..BreakerConfig::default()
        });
        half_open(&b).await;
        let probes: Vec<Permit> = (0..3).filter_map(|_| b.try_acquire()).collect();
        assert_eq!(probes.len(), 3);
        assert!(b.try_acquire().is_none());
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_probes_is_treated_as_one() {
        let b = breaker(BreakerConfig {
            half_open_probes: 0,
            ..BreakerConfig::default()
        });
        half_open(&b).await;
        let _probe = b.try_acquire().expect("one probe");
        assert!(b.try_acquire().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_with_a_fresh_window() {
        let b = breaker(BreakerConfig::default());
        half_open(&b).await;
        b.try_acquire().expect("probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
        // The 5 failures that opened it are still within 30 s, but the new
        // closed period does not see them.
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_a_new_cooldown() {
        let b = breaker(BreakerConfig::default());
        half_open(&b).await;
        b.try_acquire().expect("probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_secs(15) - Duration::from_millis(1)).await;
        assert!(b.try_acquire().is_none(), "cooldown restarted at the probe");
        advance(Duration::from_millis(1)).await;
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_requests_count_as_neither_success_nor_failure() {
        let b = breaker(BreakerConfig::default());
        succeed(&b, 2);
        for _ in 0..5 {
            b.try_acquire().expect("closed").cancel();
        }
        fail(&b, 2);
        // As failures, the cancels would have opened it (7 of 9).
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        // As successes, 3 of 10 would be below the ratio.
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_frees_its_slot_without_changing_state() {
        let b = breaker(BreakerConfig::default());
        half_open(&b).await;
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_none());
        probe.cancel();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().expect("slot freed").success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_permit_is_a_cancel() {
        let b = breaker(BreakerConfig::default());
        for _ in 0..5 {
            drop(b.try_acquire().expect("closed"));
        }
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed, "drops are not outcomes");

        fail(&b, 1);
        advance(Duration::from_secs(15)).await;
        drop(b.try_acquire().expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_some(), "dropped probe freed its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_from_before_the_breaker_opened_are_ignored() {
        let b = breaker(BreakerConfig::default());
        let late_success = b.try_acquire().expect("closed");
        let late_failure = b.try_acquire().expect("closed");
        fail(&b, 5);
        late_success.success();
        assert_eq!(b.state(), BreakerState::Open, "only a probe may close it");

        advance(Duration::from_secs(15)).await;
        let probe = b.try_acquire().expect("probe");
        late_failure.failure();
        assert_eq!(b.state(), BreakerState::HalfOpen, "only a probe may reopen");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_permits_do_not_touch_a_later_closed_window() {
        let b = breaker(BreakerConfig::default());
        let late: Vec<Permit> = (0..5).filter_map(|_| b.try_acquire()).collect();
        half_open(&b).await;
        b.try_acquire().expect("probe").success();
        for permit in late {
            permit.failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_probe_from_an_earlier_half_open_period_is_ignored() {
        let b = breaker(BreakerConfig {
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        half_open(&b).await;
        let failing = b.try_acquire().expect("probe 1");
        let stale = b.try_acquire().expect("probe 2");
        failing.failure();
        advance(Duration::from_secs(15)).await;
        let _probes: Vec<Permit> = (0..2).filter_map(|_| b.try_acquire()).collect();
        stale.success();
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "stale probe cannot close"
        );
        assert!(b.try_acquire().is_none(), "nor free a slot");
    }
}

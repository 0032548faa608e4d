//! How long to wait before retrying an upstream request.
//!
//! This unit owns one answer and no timers: [`Backoff::delay`], our own
//! delay before retry number `n`. (The delay a provider asks for is parsed
//! where its header is read, in `provider::retry_after`.) The caller sleeps
//! (on tokio time) and decides which one wins and whether a wait is worth
//! it at all.
//!
//! # Behaviour
//!
//! - The delay before retry `n` (0 for the first retry) is drawn uniformly
//!   from `[d/2, d]` where `d = min(base * 2^n, max)` ("equal jitter"): it
//!   grows exponentially so a struggling upstream gets room, never drops
//!   below half the ceiling so retries stay spaced, and is random so many
//!   clients cut off together do not come back together. Any `n` is fine;
//!   the ceiling saturates at `max` instead of overflowing.

use std::time::Duration;

/// Exponential backoff with equal jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Ceiling of the delay before the first retry; it doubles per retry.
    pub base: Duration,
    /// Highest ceiling, so late retries still happen within a reply's
    /// patience.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(4),
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (0 for the first retry): a
    /// uniformly random value in `[d/2, d]`, `d` being the capped
    /// exponential ceiling.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let floor = ceiling / 2;
        // Jitter is drawn in nanoseconds; a span beyond u64 nanoseconds
        // (centuries) is clamped, which keeps the result inside the bounds.
        let span = u64::try_from((ceiling - floor).as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(fastrand::u64(0..=span))
    }

    /// `min(base * 2^retry, max)`, saturating instead of overflowing.
    fn ceiling(&self, retry: u32) -> Duration {
        2u32.checked_pow(retry)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: usize = 2_000;

    #[test]
    fn delay_stays_within_equal_jitter_bounds_of_the_capped_ceiling() {
        let backoff = Backoff::default();
        let ceilings_ms = [
            250, 500, 1000, 2000, 4000, 4000, 4000, 4000, 4000, 4000, 4000,
        ];
        for (retry, ceiling_ms) in (0..).zip(ceilings_ms) {
            let ceiling = Duration::from_millis(ceiling_ms);
            for _ in 0..SAMPLES {
                let delay = backoff.delay(retry);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "retry {retry}: {delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
    }

    #[test]
    fn delay_is_spread_across_its_range() {
        let backoff = Backoff::default();
        let samples: Vec<Duration> = (0..SAMPLES).map(|_| backoff.delay(2)).collect();
        let (low, high) = (Duration::from_millis(600), Duration::from_millis(900));
        assert!(samples.iter().any(|d| *d < low), "never in the low part");
        assert!(samples.iter().any(|d| *d > high), "never in the high part");
    }

    #[test]
    fn ceiling_grows_monotonically_up_to_max() {
        let backoff = Backoff::default();
        let ceilings: Vec<Duration> = (0..64).map(|r| backoff.ceiling(r)).collect();
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(ceilings[0], Duration::from_millis(250));
        assert_eq!(ceilings[63], backoff.max);
    }

    #[test]
    fn huge_retry_numbers_saturate_at_max() {
        let backoff = Backoff::default();
        for retry in [31, 32, 33, 64, 1_000, u32::MAX] {
            let delay = backoff.delay(retry);
            assert!(delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4));
        }
        let unbounded = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        for retry in [0, 1, u32::MAX] {
            assert!(unbounded.delay(retry) >= Duration::MAX / 2);
        }
    }

    #[test]
    fn base_above_max_is_capped_from_the_first_retry() {
        let backoff = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(1),
        };
        assert!(backoff.delay(0) <= Duration::from_secs(1));
    }

    #[test]
    fn zero_base_means_no_delay() {
        let backoff = Backoff {
            base: Duration::ZERO,
            max: Duration::from_secs(4),
        };
        assert_eq!(backoff.delay(5), Duration::ZERO);
    }
}

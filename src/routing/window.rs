//! A rolling-window pair of counters, shared by the circuit breaker
//! (requests, failures) and the retry budget (deposits, withdrawals).
//!
//! The window is a ring of [`BUCKETS`] buckets, each `span / BUCKETS` wide,
//! numbered from an origin instant. A slot is reused for a newer bucket
//! number by clearing it first, and a slot whose number is [`BUCKETS`] or
//! more behind the current one is stale and counts as empty, so no sweep is
//! ever needed. An event therefore counts for at least
//! `span - span / BUCKETS` and at most `span`.
//!
//! Counters saturate rather than wrap. Time is tokio's
//! ([`tokio::time::Instant`]), so tests pause the clock and advance it.
//! The window does no locking: each owner guards it with its own mutex.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window: the precision with which old events expire.
const BUCKETS: usize = 10;

/// Two event counters over a rolling window of a fixed span.
///
/// What the two counters mean is the owner's business; [`Window::add`] and
/// [`Window::totals`] keep them in the same order.
#[derive(Debug)]
pub(super) struct Window {
    /// Time zero of the bucket numbering.
    origin: Instant,
    /// How long one bucket covers (never zero, so numbering cannot divide
    /// by zero).
    width: Duration,
    /// Bucket `n` (counted from `origin`) lives at index `n % BUCKETS`.
    buckets: [Bucket; BUCKETS],
}

/// One slot of the ring.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket number this slot currently holds; a slot holding an
    /// older number is stale and counts as empty.
    number: u64,
    /// The two counters' events recorded in this bucket.
    counts: [u32; 2],
}

impl Window {
    /// An empty window covering `span`, its bucket numbering starting at
    /// `now`.
    pub(super) fn new(span: Duration, now: Instant) -> Self {
        Self {
            origin: now,
            width: (span / BUCKETS as u32).max(Duration::from_nanos(1)),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Forgets every event and restarts the bucket numbering at `now`.
    pub(super) fn reset(&mut self, now: Instant) {
        self.origin = now;
        self.buckets = [Bucket::default(); BUCKETS];
    }

    /// Adds `counts` to the two counters at `now` (saturating).
    pub(super) fn add(&mut self, now: Instant, counts: [u32; 2]) {
        let number = self.number(now);
        let bucket = &mut self.buckets[(number % BUCKETS as u64) as usize];
        if bucket.number != number {
            *bucket = Bucket {
                number,
                ..Bucket::default()
            };
        }
        for (count, added) in bucket.counts.iter_mut().zip(counts) {
            *count = count.saturating_add(added);
        }
    }

    /// The two counters' sums over the buckets still in the window at
    /// `now`. (At most [`BUCKETS`] `u32`s each, so a `u64` cannot
    /// overflow.)
    pub(super) fn totals(&self, now: Instant) -> [u64; 2] {
        let number = self.number(now);
        self.buckets
            .iter()
            .filter(|b| {
                number
                    .checked_sub(b.number)
                    .is_some_and(|age| age < BUCKETS as u64)
            })
            .fold([0, 0], |[first, second], b| {
                [
                    first + u64::from(b.counts[0]),
                    second + u64::from(b.counts[1]),
                ]
            })
    }

    /// The bucket number `now` falls in, counted from `origin` (an instant
    /// before `origin` falls in bucket 0).
    fn number(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.width.as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const SPAN: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn counts_both_counters_in_order() {
        let mut w = Window::new(SPAN, Instant::now());
        w.add(Instant::now(), [1, 0]);
        w.add(Instant::now(), [1, 1]);
        w.add(Instant::now(), [0, 1]);
        assert_eq!(w.totals(Instant::now()), [2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn events_count_for_the_span_minus_one_bucket_at_least() {
        let mut w = Window::new(SPAN, Instant::now());
        w.add(Instant::now(), [1, 1]);
        advance(Duration::from_secs(9)).await;
        assert_eq!(w.totals(Instant::now()), [1, 1], "still in the window");
        advance(Duration::from_secs(1)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0], "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn events_expire_by_bucket_not_by_exact_age() {
        let mut w = Window::new(SPAN, Instant::now());
        // Late in bucket 0: expires when bucket 10 starts, 9.5 s later.
        advance(Duration::from_millis(500)).await;
        w.add(Instant::now(), [1, 0]);
        advance(Duration::from_millis(9_499)).await;
        assert_eq!(w.totals(Instant::now()), [1, 0]);
        advance(Duration::from_millis(1)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_slot_drops_its_stale_counts() {
        let mut w = Window::new(SPAN, Instant::now());
        w.add(Instant::now(), [5, 5]);
        // Bucket 10 shares slot 0 with bucket 0.
        advance(SPAN).await;
        w.add(Instant::now(), [1, 0]);
        assert_eq!(w.totals(Instant::now()), [1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_slots_count_as_empty_without_being_overwritten() {
        let mut w = Window::new(SPAN, Instant::now());
        w.add(Instant::now(), [3, 0]);
        advance(Duration::from_secs(5)).await;
        w.add(Instant::now(), [0, 2]);
        // Bucket 12: bucket 0 has expired though slot 0 still holds it;
        // bucket 5 has not.
        advance(Duration::from_secs(7)).await;
        assert_eq!(w.totals(Instant::now()), [0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_forgets_everything_and_restarts_numbering() {
        let mut w = Window::new(SPAN, Instant::now());
        advance(Duration::from_millis(1_500)).await;
        w.add(Instant::now(), [4, 4]);
        w.reset(Instant::now());
        assert_eq!(w.totals(Instant::now()), [0, 0]);
        // Bucket 0 of the new numbering lasts a full width from the reset.
        w.add(Instant::now(), [1, 0]);
        advance(Duration::from_millis(9_999)).await;
        assert_eq!(w.totals(Instant::now()), [1, 0]);
        advance(Duration::from_millis(1)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn counters_saturate_instead_of_wrapping() {
        let mut w = Window::new(SPAN, Instant::now());
        w.add(Instant::now(), [u32::MAX, 1]);
        w.add(Instant::now(), [1, u32::MAX]);
        assert_eq!(
            w.totals(Instant::now()),
            [u64::from(u32::MAX), u64::from(u32::MAX)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_span_still_works() {
        let mut w = Window::new(Duration::ZERO, Instant::now());
        assert_eq!(w.width, Duration::from_nanos(1));
        w.add(Instant::now(), [1, 1]);
        assert_eq!(w.totals(Instant::now()), [1, 1]);
        advance(Duration::from_nanos(10)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0]);
    }
}

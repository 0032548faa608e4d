//! Latency histograms (HdrHistogram, microseconds) and their summaries.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clients::{End, Reply};

/// A latency histogram in microseconds, 1 µs to 10 min.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(
            Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
            }),
        )
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn add(&mut self, other: &Self) {
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Summary {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        Summary {
            n: self.0.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: self.0.max() as f64 / 1000.0,
            mean: self.0.mean() / 1000.0,
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub n: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What a set of replies measured.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Request → first token.
    pub ttft: Latency,
    /// Upstream write → client read, every token.
    pub relay: Latency,
    /// Between consecutive tokens' reads.
    pub gap: Latency,
    pub replies: u64,
    pub tokens: u64,
    pub done: u64,
    pub errors: u64,
    pub truncated: u64,
}

impl Tally {
    /// Adds a reply that should have carried `expected` tokens; a complete
    /// reply with fewer counts as truncated.
    pub fn add(&mut self, reply: &Reply, expected: u32) {
        self.replies += 1;
        self.tokens += reply.tokens.len() as u64;
        if let Some(ttft) = reply.ttft {
            self.ttft.record(ttft);
        }
        let mut last: Option<u64> = None;
        for &(stamp, read) in &reply.tokens {
            self.relay.record_us(read.saturating_sub(stamp) / 1000);
            if let Some(last) = last {
                self.gap.record_us(read.saturating_sub(last) / 1000);
            }
            last = Some(read);
        }
        match &reply.end {
            End::Done if reply.tokens.len() == expected as usize => self.done += 1,
            End::Done | End::Truncated => self.truncated += 1,
            End::Error(_) => self.errors += 1,
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.ttft.add(&other.ttft);
        self.relay.add(&other.relay);
        self.gap.add(&other.gap);
        self.replies += other.replies;
        self.tokens += other.tokens;
        self.done += other.done;
        self.errors += other.errors;
        self.truncated += other.truncated;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reply_counts_as_truncated() {
        let reply = Reply {
            ttft: Some(Duration::from_millis(2)),
            tokens: vec![(0, 1_000_000), (5_000_000, 6_000_000)],
            end: End::Done,
        };
        let mut tally = Tally::default();
        tally.add(&reply, 2);
        tally.add(&reply, 3);
        assert_eq!((tally.done, tally.truncated, tally.tokens), (1, 1, 4));
        let relay = tally.relay.summary();
        assert_eq!(relay.n, 4);
        assert!((relay.max - 1.0).abs() < 0.01, "{relay:?}");
        assert!((tally.gap.summary().p50 - 5.0).abs() < 0.01);
    }
}

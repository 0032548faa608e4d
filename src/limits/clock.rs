//! Governor on tokio's clock, so a paused test clock (`tokio::time::pause`
//! and `advance`) drives the rate limiters like every other timer here.

use governor::clock::{Clock, ReasonablyRealtime};
use governor::nanos::Nanos;
use tokio::time::Instant;

/// Time since the limiters were built, read from tokio's clock.
///
/// Governor's instants must implement `Add<Nanos>`, which (orphan rule)
/// cannot be written for `tokio::time::Instant`; so, like governor's own
/// fake clock, the instant is [`Nanos`] since a fixed origin.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    /// The instant all readings are relative to.
    origin: Instant,
}

impl TokioClock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

// Tokio's clock runs at real time unless a test pauses it.
impl ReasonablyRealtime for TokioClock {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_tokio_clock() {
        let clock = TokioClock::new();
        assert_eq!(clock.now(), Nanos::from(Duration::ZERO));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now(), Nanos::from(Duration::from_millis(1500)));
    }
}

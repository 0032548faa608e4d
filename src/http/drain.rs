//! The graceful drain an instance goes through on SIGTERM or Ctrl-C.
//!
//! 1. **Unready.** `/readyz` answers 503 `draining`, so load balancers stop
//!    sending new clients; the listener stops accepting.
//! 2. **Clients move.** With other instances behind Redis, every WebSocket
//!    is closed with 1012 (*service restart*: reconnect and resume), in
//!    batches of `server.drain_batch_size` every
//!    `server.drain_batch_interval_ms` so the rest of the fleet is not
//!    stampeded, and every native SSE stream ends with a `reconnect` event.
//!    The replies they were reading keep being produced here and mirrored
//!    to Redis, so the clients resume them on another instance without a
//!    gap. Alone (no Redis), nowhere else could resume them: connections
//!    stay until the replies they stream end, then close with 1012.
//! 3. **Replies finish.** The instance waits for running replies (and the
//!    connections still open) up to `server.shutdown_grace_secs`, the drain
//!    timeout; what is still running then is cancelled and ends with a
//!    typed error.
//! 4. **Flush.** The persister writes what it acknowledged, the Redis
//!    mirrors their last batches, and the process exits 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// One instance's drain: whether it started, and the batches clients are
/// moved off in.
#[derive(Debug)]
pub struct Drain {
    started: CancellationToken,
    /// Other instances can take the clients over (Redis is configured).
    hand_off: bool,
    batch_size: u64,
    batch_interval: Duration,
    tickets: AtomicU64,
}

impl Drain {
    /// A drain that moves clients off in batches of `batch_size` every
    /// `batch_interval` when `hand_off` (other instances exist).
    pub fn new(hand_off: bool, batch_size: usize, batch_interval: Duration) -> Self {
        Self {
            started: CancellationToken::new(),
            hand_off,
            batch_size: (batch_size as u64).max(1),
            batch_interval,
            tickets: AtomicU64::new(0),
        }
    }

    /// Starts the drain (once; later calls do nothing).
    pub fn begin(&self) {
        if !self.started.is_cancelled() {
            tracing::info!(hand_off = self.hand_off, "draining");
            crate::metrics::get().draining.set(1);
            self.started.cancel();
        }
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.started.is_cancelled()
    }

    /// Resolves when the drain starts.
    pub async fn started(&self) {
        self.started.cancelled().await;
    }

    /// Whether clients are moved to other instances (rather than kept until
    /// their replies end).
    pub fn hands_off(&self) -> bool {
        self.hand_off
    }

    /// Resolves when it is this caller's turn to move its client: callers
    /// are numbered as they ask and move `batch_size` at a time.
    pub async fn turn(&self) {
        self.started().await;
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let batch = u32::try_from(ticket / self.batch_size).unwrap_or(u32::MAX);
        tokio::time::sleep(self.batch_interval.saturating_mul(batch)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clients_move_in_batches() {
        let drain = std::sync::Arc::new(Drain::new(true, 2, Duration::from_millis(100)));
        let start = tokio::time::Instant::now();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let drain = std::sync::Arc::clone(&drain);
            waits.push(tokio::spawn(async move {
                drain.turn().await;
                start.elapsed()
            }));
        }
        tokio::task::yield_now().await;
        assert!(!drain.is_draining());
        drain.begin();
        let mut moved = Vec::new();
        for wait in waits {
            moved.push(wait.await.unwrap_or_default());
        }
        moved.sort();
        let ms: Vec<u128> = moved.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![0, 0, 100, 100, 200]);
    }
}

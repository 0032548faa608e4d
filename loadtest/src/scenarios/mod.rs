//! The scenarios. Each starts what it needs (the paced upstream, gateway
//! processes, Redis), drives bounded load on loopback, and returns an
//! [`Output`](crate::report::Output).

pub mod chaos;
pub mod connections;
pub mod fanout;
pub mod overhead;
pub mod slow;
pub mod throughput;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::procs::{Gateway, GatewayOptions};
use crate::upstream::Upstream;

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub gateway_bin: PathBuf,
    pub http: reqwest::Client,
    pub progress: Arc<Progress>,
}

impl Ctx {
    pub fn new(gateway_bin: PathBuf) -> Self {
        // The workspace builds reqwest without a default TLS provider (the
        // gateway picks one); the load generator only speaks plain HTTP.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self {
            gateway_bin,
            http,
            progress: Arc::new(Progress::default()),
        }
    }

    /// A gateway (node `a`, no Redis) in front of `upstream`.
    pub async fn gateway(&self, upstream: &Upstream, extra: &str) -> Result<Gateway, String> {
        Gateway::start(GatewayOptions {
            bin: self.gateway_bin.clone(),
            upstream: upstream.base_url(),
            node: "a".into(),
            redis: None,
            database: None,
            extra: extra.into(),
            port: None,
        })
        .await
    }
}

/// Live progress: what runs, and counters, printed every second.
#[derive(Debug, Default)]
pub struct Progress {
    pub label: Mutex<String>,
    pub replies: AtomicU64,
    pub tokens: AtomicU64,
    pub failures: AtomicU64,
}

impl Progress {
    pub fn set(&self, label: impl Into<String>) {
        *self
            .label
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = label.into();
    }

    pub fn reply(&self, reply: &crate::clients::Reply) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        self.tokens
            .fetch_add(reply.tokens.len() as u64, Ordering::Relaxed);
        if reply.end != crate::clients::End::Done {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prints a line to stderr every second until the task is aborted.
    pub fn ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let progress = Arc::clone(self);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let label = progress
                    .label
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                eprintln!(
                    "[{:6.1}s] {label} · replies {} · tokens {} · not done {}",
                    start.elapsed().as_secs_f64(),
                    progress.replies.load(Ordering::Relaxed),
                    progress.tokens.load(Ordering::Relaxed),
                    progress.failures.load(Ordering::Relaxed),
                );
            }
        })
    }
}

/// Runs `f` for `0..n` with at most `width` at a time; results in order.
pub async fn batched<T, F, Fut>(n: usize, width: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + width.max(1)).min(n);
        out.extend(futures_util::future::join_all((start..end).map(&f)).await);
        start = end;
    }
    out
}

/// Source address 127.0.0.x for connection `i` (spreads connections over
/// eight addresses, past the ephemeral port range of one).
pub fn source(i: usize) -> u8 {
    1 + (i % 8) as u8
}

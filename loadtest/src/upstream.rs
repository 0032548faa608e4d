//! The paced upstream: an OpenAI-compatible `POST /v1/chat/completions`
//! that streams SSE chunks whose pace, size and faults the request itself
//! asks for, so every run is self-contained.
//!
//! The last message's content carries the pacing as `key=value` words
//! (anything else is ignored): `tokens=20 delay_us=25000 bytes=8
//! first_us=0 cut=0 status=200`. Each token's text starts with the time it
//! was written (nanoseconds since [`epoch`], hex), so a client in this
//! process measures every token's relay latency, direct or through the
//! gateway, against one clock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::serve::ListenerExt as _;
use serde_json::Value;

/// The process's clock origin for token stamps.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What one request asks the upstream to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub tokens: u32,
    pub delay: Duration,
    /// Bytes per token (at least the stamp's length, padded with `x`).
    pub bytes: usize,
    /// Delay before the first token.
    pub first: Duration,
    /// Close the stream without finishing after this many tokens (0: never).
    pub cut: u32,
    /// Answer with this status and a JSON error instead (200: stream).
    pub status: u16,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            tokens: 20,
            delay: Duration::from_millis(25),
            bytes: 8,
            first: Duration::ZERO,
            cut: 0,
            status: 200,
        }
    }
}

impl Pace {
    /// The words a client puts in its message.
    pub fn words(&self) -> String {
        format!(
            "tokens={} delay_us={} bytes={} first_us={} cut={} status={}",
            self.tokens,
            self.delay.as_micros(),
            self.bytes,
            self.first.as_micros(),
            self.cut,
            self.status
        )
    }

    pub fn parse(text: &str) -> Self {
        let mut pace = Self::default();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let Ok(n) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "tokens" => pace.tokens = u32::try_from(n).unwrap_or(u32::MAX),
                "delay_us" => pace.delay = Duration::from_micros(n),
                "bytes" => pace.bytes = usize::try_from(n).unwrap_or(64).min(65_536),
                "first_us" => pace.first = Duration::from_micros(n),
                "cut" => pace.cut = u32::try_from(n).unwrap_or(0),
                "status" => pace.status = u16::try_from(n).unwrap_or(200),
                _ => {}
            }
        }
        pace
    }
}

/// One token's text: the stamp in hex, `x` padding, a space.
pub fn token_text(stamp_ns: u64, bytes: usize) -> String {
    let mut text = format!("{stamp_ns:x}");
    while text.len() + 1 < bytes {
        text.push('x');
    }
    text.push(' ');
    text
}

/// The stamps in relayed text (tokens may arrive coalesced or split
/// between frames only at token boundaries, which `rest` carries over).
pub fn stamps(text: &str, rest: &mut String, out: &mut Vec<u64>) {
    rest.push_str(text);
    while let Some(end) = rest.find(' ') {
        let token: String = rest.drain(..=end).collect();
        let hex = token.trim_end().trim_end_matches('x');
        if let Ok(stamp) = u64::from_str_radix(hex, 16) {
            out.push(stamp);
        }
    }
}

/// What the upstream has served.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
}

/// A running paced upstream.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(listen: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(Arc::clone(&counters));
        // Each chunk leaves at once, as from a real provider's edge (no
        // Nagle delay waiting for the previous chunk's ACK).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Ok(Self {
            addr,
            counters,
            task,
        })
    }

    /// The OpenAI base URL (`http://addr/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Serves until the process ends.
    pub async fn wait(mut self) {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        task.await.ok();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn complete(State(counters): State<Arc<Counters>>, body: Bytes) -> Response {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let last = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let pace = Pace::parse(last);
    if pace.status != 200 {
        return Response::builder()
            .status(pace.status)
            .header("content-type", "application/json")
            .body(Body::from(
                r#"{"error":{"message":"paced upstream: asked to fail","type":"server_error"}}"#,
            ))
            .unwrap_or_default();
    }
    let stream = async_stream(pace, counters);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn chunk(content: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"paced\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"paced\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

fn async_stream(
    pace: Pace,
    counters: Arc<Counters>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(0u32, move |sent| {
        let counters = Arc::clone(&counters);
        async move {
            if pace.cut != 0 && sent == pace.cut {
                // A cut: the body stops without finish_reason or [DONE].
                return None;
            }
            if sent == pace.tokens {
                let end = format!(
                    "data: {{\"id\":\"paced\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"paced\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":8,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
                    pace.tokens,
                    pace.tokens + 8
                );
                return Some((Ok(Bytes::from(end)), sent + 1));
            }
            if sent > pace.tokens {
                return None;
            }
            let wait = if sent == 0 { pace.first } else { pace.delay };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            counters.tokens.fetch_add(1, Ordering::Relaxed);
            Some((Ok(chunk(&token_text(now_ns(), pace.bytes))), sent + 1))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_round_trips_through_its_words() {
        let pace = Pace {
            tokens: 7,
            delay: Duration::from_micros(1500),
            bytes: 32,
            first: Duration::from_millis(3),
            cut: 4,
            status: 200,
        };
        assert_eq!(Pace::parse(&format!("hello {} !", pace.words())), pace);
    }

    #[test]
    fn stamps_survive_coalescing_and_padding() {
        let text = format!("{}{}", token_text(0xabc, 12), token_text(0x1f, 2));
        assert_eq!(text.len(), 12 + 3);
        let mut rest = String::new();
        let mut out = Vec::new();
        let (a, b) = text.split_at(5);
        stamps(a, &mut rest, &mut out);
        assert!(out.is_empty());
        stamps(b, &mut rest, &mut out);
        assert_eq!(out, vec![0xabc, 0x1f]);
        assert!(rest.is_empty());
    }
}

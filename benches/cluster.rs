//! Cross-instance latency through Redis: two real gateway processes (`a`
//! and `b`) sharing one `redis-server` and one SQLite file, both started
//! by the bench on loopback. A benchmark, not a test: run it with
//!
//! ```sh
//! cargo bench --bench cluster
//! ```
//!
//! It prints a Markdown table of:
//!
//! 1. **typing A → B**: user `u` has a WebSocket on each instance, both
//!    subscribed to one conversation; `typing` frames sent on A (alternating
//!    `true`/`false`) are timed until B receives them. Sequentially (one at
//!    a time), and under load: several pairs (one conversation each) at an
//!    aggregate target rate for a bounded time, correlated through a
//!    per-conversation FIFO of send times (typing is delivered in order per
//!    publisher); what never arrives counts as lost.
//! 2. **resume on B of a reply produced on A**, from the `resume` frame to
//!    the first `delta`: finished replies (from offset 0), and replies still
//!    streaming on A (from the offset A's client reached, after a short
//!    reconnect gap), each on a fresh WebSocket on B. Replies come from the
//!    built-in `mock` provider.
//!
//! Knobs (environment): `SPILLWAY_BENCH_TYPING_N` (2000),
//! `SPILLWAY_BENCH_RATES` (`1000,5000` msg/s), `SPILLWAY_BENCH_LOAD_SECS`
//! (5), `SPILLWAY_BENCH_PAIRS` (8), `SPILLWAY_BENCH_RESUMES` (200),
//! `SPILLWAY_BENCH_REDIS_SERVER` (`redis-server`), and
//! `SPILLWAY_BENCH_CLIENT_NAGLE=1` to leave Nagle's algorithm on in the
//! bench's WebSocket clients (off by default, as in browsers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a bench binary

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The gateway binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_spillway");

/// How long a start, a handshake or one expected frame may take before the
/// bench gives up on it (a guard, not a measurement).
const WAIT: Duration = Duration::from_secs(15);

/// How long the sequential typing run waits for one frame before counting
/// it lost.
const TYPING_WAIT: Duration = Duration::from_secs(2);

/// Frames a connection's reader keeps for the bench before dropping more.
const READER_QUEUE: usize = 65_536;

/// Words of a finished (fast) mock reply.
const FAST_TOKENS: u32 = 48;

/// Pace of the mid-stream (slow) mock reply, and its length (long enough
/// never to finish before the bench cancels it).
const SLOW_TOKEN_MS: u64 = 5;
const SLOW_TOKENS: u32 = 2_000;

/// How long the A client is "away" before the B client resumes at A's
/// offset: the reply keeps streaming meanwhile, so the resume has a
/// backlog to read from Redis (about `GAP / SLOW_TOKEN_MS` tokens).
const RECONNECT_GAP: Duration = Duration::from_millis(20);

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------ processes

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn redis_server_bin() -> PathBuf {
    std::env::var_os("SPILLWAY_BENCH_REDIS_SERVER")
        .or_else(|| std::env::var_os("SPILLWAY_TEST_REDIS_SERVER"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A throwaway `redis-server` on a free loopback port, no persistence.
/// Killed on drop.
#[derive(Debug)]
struct Redis {
    _child: Child,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spillway-bench-redis-")
            .tempdir()
            .unwrap();
        for attempt in 1..=5 {
            let port = free_port();
            let mut child = Command::new(redis_server_bin())
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--protected-mode", "no"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("run redis-server (install it, or set SPILLWAY_BENCH_REDIS_SERVER)");
            let deadline = Instant::now() + WAIT;
            loop {
                if redis_ping(port).await {
                    return Self {
                        _child: child,
                        port,
                        _dir: dir,
                    };
                }
                if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                    break;
                }
                sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill().await;
            eprintln!("redis-server on port {port} did not start (attempt {attempt})");
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Whether 127.0.0.1:`port` answers an inline `PING` with `+PONG`.
async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 64];
        while !answer.ends_with(b"\r\n") {
            let n = stream.read(&mut buffer).await.ok()?;
            if n == 0 {
                return None;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
        Some(answer.starts_with(b"+PONG"))
    };
    matches!(
        timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

/// One `spillway serve` process. Killed on drop.
#[derive(Debug)]
struct Gateway {
    name: String,
    _child: Child,
    addr: String,
    /// The last lines of its log, for a failure message.
    log: Arc<Mutex<VecDeque<String>>>,
    _dir: TempDir,
}

impl Gateway {
    /// Starts node `name` sharing the SQLite file `database` and `redis`,
    /// and waits until it listens and `/readyz` answers 200.
    async fn start(name: &str, database: &Path, redis: &Redis, http: &reqwest::Client) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("spillway-bench-node-{name}-"))
            .tempdir()
            .unwrap();
        let config = format!(
            r#"[server]
listen = "127.0.0.1:0"

[log]
level = "info"

[store]
database_url = "sqlite://{database}?mode=rwc"
data_dir = "{data}"
batch_max_delay_ms = 5

[chat]
max_generations_per_user = 64

[[providers]]
name = "mock-fast"
kind = "mock"
mock_tokens = {FAST_TOKENS}
mock_token_delay_ms = 0

[[providers]]
name = "mock-slow"
kind = "mock"
mock_tokens = {SLOW_TOKENS}
mock_token_delay_ms = {SLOW_TOKEN_MS}

[[models]]
name = "fast"
targets = [{{ provider = "mock-fast", model = "mock" }}]

[[models]]
name = "slow"
targets = [{{ provider = "mock-slow", model = "mock" }}]

[cluster]
redis_url = "{redis}"
node_id = "{name}"
heartbeat_ms = 500
"#,
            database = database.display(),
            data = dir.path().display(),
            redis = redis.url(),
        );
        let config_path = dir.path().join("spillway.toml");
        std::fs::write(&config_path, config).unwrap();

        let mut command = Command::new(BIN);
        // Only the config file configures it (not the machine's SPILLWAY_*).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SPILLWAY_") {
                command.env_remove(&key);
            }
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0"])
            .env("SPILLWAY_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn spillway");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let keep = |log: &Mutex<VecDeque<String>>, line: String| {
            let mut log = log.lock().unwrap();
            if log.len() >= 200 {
                log.pop_front();
            }
            log.push_back(line);
        };
        let addr = timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let addr = line.split("listening on http://").nth(1).map(|rest| {
                    rest.split(|c: char| c == '"' || c.is_whitespace())
                        .next()
                        .unwrap()
                        .to_owned()
                });
                keep(&log, line);
                if addr.is_some() {
                    return addr;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            let log: Vec<String> = log.lock().unwrap().iter().cloned().collect();
            panic!(
                "gateway {name} did not start listening; its log:\n{}",
                log.join("\n")
            )
        });
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep(&sink, line);
            }
        });
        let gateway = Self {
            name: name.to_owned(),
            _child: child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let status = http
                .get(gateway.url("/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            if status.as_ref().is_ok_and(|s| *s == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {name} not ready ({status:?}); its log:\n{}",
                gateway.log_tail()
            );
            sleep(Duration::from_millis(50)).await;
        }
        gateway
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_tail(&self) -> String {
        let log: Vec<String> = self.log.lock().unwrap().iter().cloned().collect();
        log.join("\n")
    }

    /// A new conversation of `user`.
    async fn conversation(&self, http: &reqwest::Client, user: &str) -> String {
        let response = http
            .post(self.url("/v1/conversations"))
            .header("x-spillway-user", user)
            .json(&json!({ "title": "bench" }))
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(response.status().as_u16(), 201, "create a conversation");
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// The bus counters of `/readyz` (`checks.redis`).
    async fn bus_counters(&self, http: &reqwest::Client) -> Value {
        match http.get(self.url("/readyz")).send().await {
            Ok(response) => {
                let body: Value = response.json().await.unwrap_or(Value::Null);
                body["checks"]["redis"].clone()
            }
            Err(err) => json!({ "error": err.to_string() }),
        }
    }
}

// ------------------------------------------------------------ the client

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A native-protocol WebSocket. A reader task timestamps every JSON frame
/// the moment it is read and hands it over through a bounded queue, so a
/// frame's receive time does not depend on when the bench looks at it (and
/// the socket is always read, so pings are answered).
#[derive(Debug)]
struct Ws {
    sink: SplitSink<WsStream, Message>,
    rx: mpsc::Receiver<(Instant, Value)>,
    reader: JoinHandle<()>,
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Ws {
    async fn connect(addr: &str, user: &str) -> Self {
        let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("spillway.v1"),
        );
        request
            .headers_mut()
            .insert("x-spillway-user", HeaderValue::from_str(user).unwrap());
        // TCP_NODELAY, as browsers and most WebSocket clients set it
        // (tokio-tungstenite's `connect_async` leaves Nagle on, which adds up
        // to a delayed-ACK timeout to back-to-back small frames).
        let nagle = std::env::var_os("SPILLWAY_BENCH_CLIENT_NAGLE").is_some();
        let connect = tokio_tungstenite::connect_async_with_config(request, None, !nagle);
        let (ws, _) = timeout(WAIT, connect)
            .await
            .expect("handshake within the timeout")
            .expect("handshake succeeds");
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::channel(READER_QUEUE);
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message {
                    let at = Instant::now();
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if tx.try_send((at, frame)).is_err() && tx.is_closed() {
                        return;
                    }
                }
            }
        });
        let mut ws = Self { sink, rx, reader };
        let (_, hello) = ws
            .until(WAIT, |f| f["type"] == "hello")
            .await
            .expect("hello");
        assert_eq!(hello["user_id"], user, "{hello}");
        ws
    }

    async fn send(&mut self, frame: &Value) {
        timeout(WAIT, self.sink.send(Message::text(frame.to_string())))
            .await
            .expect("write within the timeout")
            .expect("write succeeds");
    }

    /// The next frame matching `wanted` within `within` (others skipped).
    async fn until(
        &mut self,
        within: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Option<(Instant, Value)> {
        let deadline = Instant::now() + within;
        loop {
            let (at, frame) = timeout(deadline.saturating_duration_since(Instant::now()), async {
                self.rx.recv().await
            })
            .await
            .ok()??;
            if wanted(&frame) {
                return Some((at, frame));
            }
        }
    }

    /// `subscribe`, up to its `presence` snapshot. The conversation may
    /// have been created on the other instance a moment ago, so an error
    /// is retried a few times.
    async fn subscribe(&mut self, conversation_id: &str) {
        for _ in 0..20 {
            self.send(&json!({ "type": "subscribe", "conversation_id": conversation_id }))
                .await;
            let (_, frame) = self
                .until(WAIT, |f| {
                    f["type"] == "error"
                        || (f["type"] == "presence"
                            && f["event"] == "snapshot"
                            && f["conversation_id"] == conversation_id)
                })
                .await
                .expect("the presence snapshot");
            if frame["type"] == "presence" {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot subscribe to {conversation_id}");
    }

    fn typing(conversation_id: &str, typing: bool) -> Value {
        json!({ "type": "typing", "conversation_id": conversation_id, "typing": typing })
    }
}

/// `ws` (on A) and `peer` (on B), both `user`'s, both subscribed to a new
/// conversation; returns it once B has seen A join.
async fn pair(a: &Gateway, b: &Gateway, http: &reqwest::Client, user: &str) -> (String, Ws, Ws) {
    let conversation = a.conversation(http, user).await;
    let mut on_b = Ws::connect(&b.addr, user).await;
    on_b.subscribe(&conversation).await;
    let mut on_a = Ws::connect(&a.addr, user).await;
    on_a.subscribe(&conversation).await;
    on_b.until(WAIT, |f| f["type"] == "presence" && f["event"] == "join")
        .await
        .expect("B sees the device on A join");
    (conversation, on_a, on_b)
}

// ------------------------------------------------------------ statistics

#[derive(Debug, Default)]
struct Row {
    scenario: String,
    samples: Vec<Duration>,
    rate: Option<(f64, f64)>,
    lost: Option<u64>,
    note: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &mut [Row]) {
    println!(
        "| scenario | n | target / achieved msg/s | p50 ms | p90 ms | p99 ms | max ms | lost | notes |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in rows.iter_mut() {
        row.samples.sort_unstable();
        let s = &row.samples;
        let rate = row
            .rate
            .map(|(target, achieved)| format!("{target:.0} / {achieved:.0}"))
            .unwrap_or_else(|| "—".into());
        let lost = row
            .lost
            .map(|l| l.to_string())
            .unwrap_or_else(|| "—".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            s.len(),
            rate,
            ms(percentile(s, 50.0)),
            ms(percentile(s, 90.0)),
            ms(percentile(s, 99.0)),
            ms(s.last().copied().unwrap_or_default()),
            lost,
            row.note,
        );
    }
}

// ------------------------------------------------------------ scenarios

/// 1a: one typing frame at a time, A → B.
async fn typing_sequential(a: &Gateway, b: &Gateway, http: &reqwest::Client, n: usize) -> Row {
    let (conversation, mut on_a, mut on_b) = pair(a, b, http, "u").await;
    let warmup = 50;
    let mut samples = Vec::with_capacity(n);
    let mut lost = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..warmup + n {
        if Instant::now() >= deadline {
            break;
        }
        let value = i % 2 == 0;
        let sent = Instant::now();
        on_a.send(&Ws::typing(&conversation, value)).await;
        match on_b
            .until(TYPING_WAIT, |f| {
                f["type"] == "typing" && f["typing"] == value
            })
            .await
        {
            Some((at, _)) if i >= warmup => samples.push(at - sent),
            Some(_) => {}
            None => lost += 1,
        }
    }
    Row {
        scenario: "typing A→B, sequential (1 pair)".into(),
        note: format!("{warmup} warm-up frames not counted"),
        lost: Some(lost),
        samples,
        ..Row::default()
    }
}

/// 1b: `pairs` conversations, typing sent on A at an aggregate `rate` for
/// `duration`, matched on B against per-conversation FIFOs of send times.
async fn typing_load(
    a: &Gateway,
    b: &Gateway,
    http: &reqwest::Client,
    pairs: usize,
    rate: f64,
    duration: Duration,
) -> Row {
    type Fifo = Arc<Mutex<VecDeque<(bool, Instant)>>>;
    let mut conversations = Vec::new();
    let mut senders = Vec::new();
    let mut fifos: Vec<Fifo> = Vec::new();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let lost = Arc::new(AtomicU64::new(0));
    let unmatched = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut matchers = Vec::new();
    for p in 0..pairs {
        let (conversation, on_a, mut on_b) = pair(a, b, http, &format!("load-{rate}-{p}")).await;
        let fifo: Fifo = Arc::default();
        let (samples, lost, unmatched, done) = (
            Arc::clone(&samples),
            Arc::clone(&lost),
            Arc::clone(&unmatched),
            Arc::clone(&done),
        );
        let queue = Arc::clone(&fifo);
        let hard_stop = Instant::now() + duration + Duration::from_secs(30);
        matchers.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= hard_stop
                    || (done.load(Ordering::Acquire) && queue.lock().unwrap().is_empty())
                {
                    break;
                }
                let Some((at, frame)) = on_b
                    .until(Duration::from_millis(50), |f| f["type"] == "typing")
                    .await
                else {
                    continue;
                };
                let value = frame["typing"].as_bool().unwrap_or(true);
                let mut queue = queue.lock().unwrap();
                let mut matched = false;
                // Frames that never came (coalesced away or dropped) are the
                // ones skipped to reach the first of this value.
                while let Some((sent_value, sent)) = queue.pop_front() {
                    if sent_value == value {
                        samples.lock().unwrap().push(at - sent);
                        matched = true;
                        break;
                    }
                    lost.fetch_add(1, Ordering::Relaxed);
                }
                if !matched {
                    unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
            on_b
        }));
        conversations.push(conversation);
        senders.push(on_a);
        fifos.push(fifo);
    }

    // The sender: everything due by now, round-robin, then sleep until the
    // next one is due (tokio's timer is ~1 ms, so at high rates it sends
    // small bursts).
    let mut values = vec![false; pairs];
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
        while sent < due {
            let p = (sent % pairs as u64) as usize;
            values[p] = !values[p];
            fifos[p]
                .lock()
                .unwrap()
                .push_back((values[p], Instant::now()));
            senders[p]
                .send(&Ws::typing(&conversations[p], values[p]))
                .await;
            sent += 1;
        }
        let next = started + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(next).await;
    }
    let sending = started.elapsed();
    done.store(true, Ordering::Release);
    let mut receivers = Vec::new();
    for matcher in matchers {
        receivers.push(matcher.await.unwrap());
    }
    let left: u64 = fifos.iter().map(|f| f.lock().unwrap().len() as u64).sum();
    let lost = lost.load(Ordering::Relaxed) + left;
    let unmatched = unmatched.load(Ordering::Relaxed);
    drop(senders);
    drop(receivers);
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut note = format!(
        "{pairs} pairs, {:.1} s; {sent} sent, {} matched",
        sending.as_secs_f64(),
        samples.len()
    );
    if unmatched > 0 {
        note.push_str(&format!(", {unmatched} unmatched arrivals"));
    }
    if lost > 0 {
        note.push_str(" (after a loss, latencies are upper bounds)");
    }
    Row {
        scenario: format!("typing A→B, load {rate:.0} msg/s"),
        samples,
        rate: Some((rate, sent as f64 / sending.as_secs_f64())),
        lost: Some(lost),
        note,
    }
}

fn generation_of(ack: &Value) -> (String, u64) {
    (
        ack["generation_id"]
            .as_str()
            .expect("generation_id")
            .to_owned(),
        ack["epoch"].as_u64().expect("epoch"),
    )
}

/// Sends `content` with `model` and returns the ack's (generation, epoch).
async fn send_message(ws: &mut Ws, conversation: &str, id: &str, model: &str) -> (String, u64) {
    ws.send(&json!({
        "type": "send", "conversation_id": conversation,
        "content": "Tell me something.", "client_message_id": id, "model": model,
    }))
    .await;
    let (_, ack) = ws
        .until(WAIT, |f| {
            f["type"] == "ack" || (f["type"] == "error" && f["client_message_id"] == id)
        })
        .await
        .expect("the ack");
    assert_eq!(ack["type"], "ack", "{ack}");
    generation_of(&ack)
}

fn ends(generation: &str) -> impl Fn(&Value) -> bool + '_ {
    move |f| f["generation_id"] == generation && (f["type"] == "done" || f["type"] == "error")
}

/// 2a: replies produced (and finished) on A, each resumed from offset 0 on
/// a fresh WebSocket on B.
async fn resume_finished(a: &Gateway, b: &Gateway, http: &reqwest::Client, m: usize) -> (Row, Row) {
    let user = "resume-finished";
    let conversation = a.conversation(http, user).await;
    let mut on_a = Ws::connect(&a.addr, user).await;
    let mut replies = Vec::with_capacity(m);
    let deadline = Instant::now() + Duration::from_secs(60);
    for j in 0..m {
        if Instant::now() >= deadline {
            break;
        }
        let (generation, epoch) =
            send_message(&mut on_a, &conversation, &format!("f-{j}"), "fast").await;
        let (_, end) = on_a
            .until(WAIT, ends(&generation))
            .await
            .expect("the reply ends on A");
        assert_eq!(end["type"], "done", "{end}");
        replies.push((generation, epoch));
    }
    drop(on_a);
    // Let the last mirror batches (and terminal statuses) land.
    sleep(Duration::from_millis(300)).await;

    let mut first = Vec::with_capacity(m);
    let mut whole = Vec::with_capacity(m);
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (generation, epoch) in &replies {
        if Instant::now() >= deadline {
            break;
        }
        let mut on_b = Ws::connect(&b.addr, user).await;
        let sent = Instant::now();
        on_b.send(&json!({
            "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0,
        }))
        .await;
        let Some((at, frame)) = on_b
            .until(WAIT, |f| {
                f["generation_id"] == *generation && (f["type"] == "delta" || f["type"] == "error")
            })
            .await
        else {
            failed += 1;
            continue;
        };
        if frame["type"] != "delta" || frame["offset"] != 0 {
            failed += 1;
            continue;
        }
        first.push(at - sent);
        match on_b.until(WAIT, ends(generation)).await {
            Some((at, end)) if end["type"] == "done" => whole.push(at - sent),
            _ => failed += 1,
        }
    }
    (
        Row {
            scenario: "resume on B, finished reply, offset 0 → first delta".into(),
            samples: first,
            lost: Some(failed),
            note: format!(
                "fresh WS per resume (handshake not timed); {FAST_TOKENS}-word mock reply"
            ),
            ..Row::default()
        },
        Row {
            scenario: "resume on B, finished reply, offset 0 → done".into(),
            samples: whole,
            lost: Some(failed),
            note: "whole reply replayed from Redis".into(),
            ..Row::default()
        },
    )
}

/// 2b: replies still streaming on A; A's client reads to a random offset,
/// is away for [`RECONNECT_GAP`], and a fresh WebSocket on B resumes at
/// that offset. The reply is cancelled after the first delta.
async fn resume_mid_stream(a: &Gateway, b: &Gateway, http: &reqwest::Client, m: usize) -> Row {
    let user = "resume-live";
    let conversation = a.conversation(http, user).await;
    let mut on_a = Ws::connect(&a.addr, user).await;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut samples = Vec::with_capacity(m);
    let mut failed = 0;
    let mut backlog = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    for j in 0..m {
        if Instant::now() >= deadline {
            break;
        }
        let mut on_b = Ws::connect(&b.addr, user).await;
        let (generation, epoch) =
            send_message(&mut on_a, &conversation, &format!("l-{j}"), "slow").await;
        let target = rng.u64(4..=12);
        let (_, frame) = on_a
            .until(WAIT, |f| {
                f["generation_id"] == generation
                    && f["type"] == "delta"
                    && f["next"].as_u64().unwrap_or(0) >= target
            })
            .await
            .expect("A streams the reply");
        let cut = frame["next"].as_u64().unwrap();
        sleep(RECONNECT_GAP).await;
        let sent = Instant::now();
        on_b.send(&json!({
            "type": "resume", "generation_id": generation, "epoch": epoch, "offset": cut,
        }))
        .await;
        match on_b
            .until(WAIT, |f| {
                f["generation_id"] == generation && (f["type"] == "delta" || f["type"] == "error")
            })
            .await
        {
            Some((at, frame)) if frame["type"] == "delta" && frame["offset"] == cut => {
                samples.push(at - sent);
                backlog += frame["next"].as_u64().unwrap_or(cut) - cut;
            }
            _ => failed += 1,
        }
        drop(on_b);
        on_a.send(&json!({ "type": "cancel", "generation_id": generation }))
            .await;
        on_a.until(WAIT, ends(&generation))
            .await
            .expect("the cancelled reply ends on A");
    }
    let mean_backlog = backlog as f64 / samples.len().max(1) as f64;
    Row {
        scenario: "resume on B, reply streaming on A, at A's offset → first delta".into(),
        lost: Some(failed),
        note: format!(
            "client away {} ms, mock {SLOW_TOKEN_MS} ms/word; first frame carried {mean_backlog:.1} words on average",
            RECONNECT_GAP.as_millis()
        ),
        samples,
        ..Row::default()
    }
}

// ------------------------------------------------------------ main

#[tokio::main]
async fn main() {
    let typing_n: usize = env_or("SPILLWAY_BENCH_TYPING_N", 2_000);
    let pairs: usize = env_or("SPILLWAY_BENCH_PAIRS", 8).max(1);
    let load_secs: f64 = env_or("SPILLWAY_BENCH_LOAD_SECS", 5.0_f64).clamp(0.1, 30.0);
    let resumes: usize = env_or("SPILLWAY_BENCH_RESUMES", 200);
    let rates: Vec<f64> = std::env::var("SPILLWAY_BENCH_RATES")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .filter(|r: &f64| *r > 0.0)
        .collect();

    // reqwest is built without a default crypto backend.
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let http = reqwest::Client::builder().build().unwrap();

    let started = Instant::now();
    let redis = Redis::start().await;
    let shared = tempfile::Builder::new()
        .prefix("spillway-bench-db-")
        .tempdir()
        .unwrap();
    let database = shared.path().join("shared.db");
    // One after the other: the first one creates and migrates the file.
    let a = Gateway::start("a", &database, &redis, &http).await;
    let b = Gateway::start("b", &database, &redis, &http).await;
    eprintln!("a on {}, b on {}, redis on {}", a.addr, b.addr, redis.url());

    let mut rows = Vec::new();
    eprintln!("typing, sequential ({typing_n})…");
    rows.push(typing_sequential(&a, &b, &http, typing_n).await);
    for rate in &rates {
        eprintln!("typing, load {rate} msg/s for {load_secs} s…");
        rows.push(
            typing_load(
                &a,
                &b,
                &http,
                pairs,
                *rate,
                Duration::from_secs_f64(load_secs),
            )
            .await,
        );
    }
    eprintln!("resume, finished replies ({resumes})…");
    let (first, whole) = resume_finished(&a, &b, &http, resumes).await;
    rows.push(first);
    rows.push(whole);
    eprintln!("resume, mid-stream ({resumes})…");
    rows.push(resume_mid_stream(&a, &b, &http, resumes).await);

    let redis_version = std::process::Command::new(redis_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!();
    println!(
        "Cross-instance latency: 2 gateway processes + redis-server + this client on one machine \
         ({} CPUs), loopback, shared SQLite file. {redis_version}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    print_table(&mut rows);
    println!();
    for gateway in [&a, &b] {
        println!(
            "- bus counters of {}: {}",
            gateway.name,
            gateway.bus_counters(&http).await
        );
    }
    println!(
        "- total bench time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

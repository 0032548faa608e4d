//! The test harness: a scriptable fake upstream (the only fake in the
//! suite) and helpers to run the real gateway on a random port.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

pub mod cluster;
pub mod db;
pub mod redis;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use spillway::config::Config;
use spillway::http::Gateway;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// One step of a scripted upstream response body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes (one body chunk).
    Send(Bytes),
    /// Wait (tokio time, so paused-clock tests can use it).
    Sleep(Duration),
    /// Wait until the test calls [`FakeUpstream::release`].
    AwaitRelease,
}

/// A scripted upstream response.
#[derive(Debug, Clone)]
pub struct Script {
    /// Close the connection without any response, right after the request
    /// arrived (a reset before headers). Only honoured for a connection's
    /// first request.
    pub reset: bool,
    /// How long the upstream waits before sending its status and headers.
    pub header_delay: Duration,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub steps: Vec<Step>,
}

impl Script {
    /// A `text/event-stream` 200 with these steps.
    pub fn sse(steps: Vec<Step>) -> Self {
        Self {
            reset: false,
            header_delay: Duration::ZERO,
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            steps,
        }
    }

    /// A recorded transcript, sent as one chunk.
    pub fn transcript(path: &str) -> Self {
        let bytes = std::fs::read(fixture(path)).expect("fixture exists");
        Self::sse(vec![Step::Send(Bytes::from(bytes))])
    }

    /// A JSON response with `status`.
    pub fn json(status: u16, body: Value) -> Self {
        Self {
            reset: false,
            header_delay: Duration::ZERO,
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            steps: vec![Step::Send(Bytes::from(body.to_string()))],
        }
    }

    /// A connection closed before any response.
    pub fn reset() -> Self {
        Self {
            reset: true,
            ..Self::sse(Vec::new())
        }
    }

    /// Delays the status line and headers by `delay`.
    pub fn delay_headers(mut self, delay: Duration) -> Self {
        self.header_delay = delay;
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Path of a recorded fixture under `tests/fixtures/providers`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/providers")
        .join(name)
}

/// `data: <json>\n\n`
pub fn data(json: &Value) -> Step {
    Step::Send(Bytes::from(format!("data: {json}\n\n")))
}

/// An OpenAI `chat.completion.chunk` carrying `content`.
pub fn openai_text_chunk(content: &str) -> Step {
    data(&json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
        "choices": [{ "index": 0, "delta": { "content": content }, "finish_reason": null }]
    }))
}

/// The finish chunk, the usage chunk and `[DONE]`.
pub fn openai_finish(prompt_tokens: u64, completion_tokens: u64) -> Vec<Step> {
    vec![
        data(&json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
            "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }]
        })),
        data(&json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
            "choices": [],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens }
        })),
        Step::Send(Bytes::from_static(b"data: [DONE]\n\n")),
    ]
}

/// A complete OpenAI stream of `tokens`, `delay` apart.
pub fn openai_stream(tokens: &[&str], delay: Duration) -> Script {
    let mut steps = Vec::new();
    for token in tokens {
        if !delay.is_zero() {
            steps.push(Step::Sleep(delay));
        }
        steps.push(openai_text_chunk(token));
    }
    steps.extend(openai_finish(7, tokens.len() as u64));
    Script::sse(steps)
}

/// A request the fake upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When it arrived (tokio time: virtual in paused-clock tests).
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

/// When and how an upstream response body ended.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub at: Instant,
    /// Whether the script ran to its end (false: the gateway went away).
    pub completed: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    scripts: Mutex<VecDeque<Script>>,
    /// Answers every request once `scripts` is empty.
    default: Mutex<Option<Script>>,
    requests: Mutex<Vec<Recorded>>,
    closed: Mutex<Vec<Closed>>,
    closed_notify: Notify,
    release: Notify,
}

/// A scriptable OpenAI/Anthropic-style upstream on a random port: answers
/// each POST with the next queued [`Script`], records every request, and
/// reports when each response body ended and why.
#[derive(Debug, Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
}

impl FakeState {
    /// Pops the next script if it is a reset.
    fn take_reset(&self) -> bool {
        let mut scripts = self.scripts.lock().unwrap();
        if scripts.front().is_some_and(|s| s.reset) {
            scripts.pop_front();
            return true;
        }
        false
    }
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let accept_state = Arc::clone(&state);
        // Our own accept loop (not axum::serve) so a script can reset a
        // connection before any response.
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = Arc::clone(&accept_state);
                let app = app.clone();
                tokio::spawn(async move {
                    if state.take_reset() {
                        let mut request = [0u8; 4096];
                        let _ = tcp.readable().await;
                        let _ = tcp.try_read(&mut request);
                        state.requests.lock().unwrap().push(Recorded {
                            at: Instant::now(),
                            path: "<reset>".into(),
                            headers: HeaderMap::new(),
                            body: Value::Null,
                        });
                        drop(tcp);
                        return;
                    }
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                });
            }
        });
        Self { addr, state }
    }

    /// Answers every request with `script` once the queue is empty.
    pub fn set_default(&self, script: Script) {
        *self.state.default.lock().unwrap() = Some(script);
    }

    /// The base URL to configure as the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues the answer to the next request.
    pub fn push(&self, script: Script) {
        self.state.scripts.lock().unwrap().push_back(script);
    }

    /// Lets every body waiting at [`Step::AwaitRelease`] continue.
    pub fn release(&self) {
        self.state.release.notify_waiters();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn closed(&self) -> Vec<Closed> {
        self.state.closed.lock().unwrap().clone()
    }

    /// Waits until `n` response bodies have ended.
    pub async fn wait_closed(&self, n: usize) -> Vec<Closed> {
        loop {
            let notified = self.state.closed_notify.notified();
            let closed = self.closed();
            if closed.len() >= n {
                return closed;
            }
            notified.await;
        }
    }
}

/// Records the end of a response body when the body is dropped: either it
/// ran to completion, or hyper dropped it because the peer went away.
struct CloseGuard {
    state: Arc<FakeState>,
    completed: bool,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.state.closed.lock().unwrap().push(Closed {
            at: Instant::now(),
            completed: self.completed,
        });
        self.state.closed_notify.notify_waiters();
    }
}

async fn answer(State(state): State<Arc<FakeState>>, request: axum::extract::Request) -> Response {
    let path = request.uri().path().to_owned();
    let headers = request.headers().clone();
    let bytes = axum::body::to_bytes(request.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Recorded {
        at: Instant::now(),
        path,
        headers,
        body,
    });
    let queued = state.scripts.lock().unwrap().pop_front();
    let script = queued.or_else(|| state.default.lock().unwrap().clone());
    let Some(script) = script else {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("no script queued"))
            .unwrap();
    };
    if !script.header_delay.is_zero() {
        tokio::time::sleep(script.header_delay).await;
    }
    let mut guard = CloseGuard {
        state: Arc::clone(&state),
        completed: false,
    };
    let steps = script.steps;
    let stream = async_stream::stream! {
        for step in steps {
            match step {
                Step::Send(bytes) => yield Ok::<_, std::convert::Infallible>(bytes),
                Step::Sleep(duration) => tokio::time::sleep(duration).await,
                Step::AwaitRelease => guard.state.release.notified().await,
            }
        }
        guard.completed = true;
        drop(guard);
    };
    let mut builder = Response::builder().status(script.status);
    for (name, value) in &script.headers {
        builder = builder.header(name, value);
    }
    builder.body(Body::from_stream(stream)).unwrap()
}

/// Parses config text as a file would be (no environment overrides).
pub fn test_config(toml: &str) -> Config {
    Config::parse(toml, Path::new("test.toml"), Vec::new()).expect("valid config")
}

/// The real gateway, serving on a random loopback port in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    /// Removed when the gateway is dropped.
    _data_dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// Starts a gateway from TOML config text.
    pub async fn start(toml: &str) -> Self {
        Self::start_with(test_config(toml)).await
    }

    pub async fn start_with(mut config: Config) -> Self {
        // Each gateway gets its own data dir (SQLite file and journal),
        // unless the test chose one.
        let data_dir = (config.store == spillway::config::StoreConfig::default()).then(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            config.store.data_dir = dir.path().display().to_string();
            dir
        });
        let gateway = Gateway::open(config).await.expect("gateway starts");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("gateway addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = Arc::clone(&gateway);
        let server = tokio::spawn(async move {
            spillway::http::serve(listener, served, async {
                drop(stopped.await);
            })
            .await
            .expect("gateway serves");
        });
        Self {
            addr,
            gateway,
            stop: Some(stop),
            server,
            _data_dir: data_dir,
        }
    }

    /// A gateway with one OpenAI-kind provider `fake` at `upstream`, serving
    /// model `gpt-test` (upstream name `fake-model`).
    pub async fn openai(upstream: &FakeUpstream) -> Self {
        Self::start(&openai_config(upstream)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The gateway's persister (persistence must be on).
    pub fn persister(&self) -> &spillway::store::persister::Persister {
        self.gateway.persister.as_ref().expect("persistence is on")
    }

    /// The gateway's store (persistence must be on).
    pub fn store(&self) -> &Arc<dyn spillway::store::Store> {
        self.gateway.store.as_ref().expect("persistence is on")
    }

    /// `POST /v1/chat/completions` with `body`.
    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        client()
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// Asks the server to drain and waits for it to stop.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        (&mut self.server).await.expect("server task");
    }
}

/// Config text for [`TestGateway::openai`].
pub fn openai_config(upstream: &FakeUpstream) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "fake"
kind = "openai"
base_url = "{}"

[[models]]
name = "gpt-test"
targets = [{{ provider = "fake", model = "fake-model" }}]
"#,
        upstream.base_url()
    )
}

/// A minimal chat request body.
pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [{ "role": "user", "content": "Say hello" }]
    })
}

/// One parsed SSE event from the gateway: a comment, `[DONE]`, or JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Comment(String),
    Done,
    Json(Value),
}

/// An incremental SSE reader over a reqwest response (simple: the gateway
/// only writes `data:` lines and comments, LF line ends).
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` at the end of the body.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let block = block.trim_end_matches('\n');
                if let Some(comment) = block.strip_prefix(':') {
                    return Some(ClientEvent::Comment(comment.trim().to_owned()));
                }
                let data = block.strip_prefix("data: ").expect("data line");
                if data == "[DONE]" {
                    return Some(ClientEvent::Done);
                }
                return Some(ClientEvent::Json(
                    serde_json::from_str(data).expect("json data"),
                ));
            }
            match self.response.chunk().await.expect("body chunk") {
                Some(chunk) => self
                    .buffer
                    .push_str(std::str::from_utf8(&chunk).expect("utf8")),
                None => return None,
            }
        }
    }

    /// Reads until some `delta.content` has arrived; returns what it read.
    pub async fn until_content(&mut self) -> Vec<ClientEvent> {
        let mut seen = Vec::new();
        while content_of(&seen).is_empty() {
            seen.push(
                self.next()
                    .await
                    .expect("stream open until the first token"),
            );
        }
        seen
    }

    /// Everything up to the end of the body.
    pub async fn collect(mut self) -> Vec<ClientEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }

    /// Gives back the response (to drop it, closing the connection).
    pub fn into_inner(self) -> reqwest::Response {
        self.response
    }
}

/// The concatenated `delta.content` of `events`.
pub fn content_of(events: &[ClientEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Json(v) => v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// A client without connection pooling, so dropping a response closes its
/// connection.
pub fn client() -> reqwest::Client {
    // reqwest is built without a default crypto backend (see http/mod.rs).
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// The final event of a stream that failed: its `error` object. Panics
/// (failing the test) when the stream ended any other way.
pub fn final_error(events: &[ClientEvent]) -> &Value {
    assert!(
        !events.contains(&ClientEvent::Done),
        "a failed stream has no [DONE]: {events:?}"
    );
    match events.last() {
        Some(ClientEvent::Json(last)) if last.get("error").is_some() => &last["error"],
        other => panic!("expected a final error event, got {other:?}"),
    }
}

/// The gateway binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_spillway");

/// A spawned gateway process and everything it logged so far.
#[derive(Debug)]
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Process {
    /// Spawns `spillway serve` with `args` and `env`, waits for it to listen.
    pub async fn serve(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, false).await
    }

    /// Like [`serve`](Self::serve), but the gateway does not inherit the
    /// test's own `SPILLWAY_*` variables (`SPILLWAY_TEST_*` aside), so only
    /// its config file and `env` configure it (say, no `SPILLWAY_REDIS_URL`
    /// of the machine's).
    pub async fn serve_isolated(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, true).await
    }

    async fn spawn(args: &[&str], env: &[(&str, &str)], isolated: bool) -> Self {
        let mut command = tokio::process::Command::new(BIN);
        if isolated {
            for (key, _) in std::env::vars_os() {
                let name = key.to_string_lossy();
                if name.starts_with("SPILLWAY_") && !name.starts_with("SPILLWAY_TEST_") {
                    command.env_remove(&key);
                }
            }
        }
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("SPILLWAY_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn spillway");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stderr.take().unwrap(),
        ));
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "gateway logs within 30 s; its log so far:\n{}",
                        log.lock().unwrap()
                    )
                })
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "gateway exited before listening; its log:\n{}",
                        log.lock().unwrap()
                    )
                });
            log.lock().unwrap().push_str(&line);
            log.lock().unwrap().push('\n');
            if let Some(rest) = line.split("http://").nth(1) {
                break rest
                    .split(|c: char| c == '"' || c.is_whitespace())
                    .next()
                    .unwrap()
                    .to_owned();
            }
        };
        let sink = std::sync::Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id (while it has not been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway process is running")
    }

    /// Sends `SIG<signal>` (`"TERM"`, `"KILL"`, `"STOP"`, …) to the process.
    pub async fn signal(&self, signal: &str) {
        redis::send_signal(self.pid(), signal).await;
    }

    /// SIGKILL (a crash: no drain, no goodbye to Redis) and waits until the
    /// process is gone.
    pub async fn kill(&mut self) -> std::process::ExitStatus {
        self.child.start_kill().expect("SIGKILL the gateway");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("a killed gateway exits at once")
            .expect("wait for the gateway")
    }

    /// SIGTERM (a graceful shutdown) and waits up to `within` for the exit.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM").await;
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway exits after SIGTERM")
            .expect("wait for the gateway")
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

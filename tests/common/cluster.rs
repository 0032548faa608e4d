//! Several real gateway processes that behave as one: they share one
//! PostgreSQL database (a fresh one per test) and one Redis server of the
//! test's own, and call one [`FakeUpstream`] serving the model `chat`. Plus
//! a small client of the native WebSocket protocol to drive them.
//!
//! ```ignore
//! let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
//! let conversation = cluster.node("a").conversation("u").await;
//! let mut a1 = cluster.node("a").ws("u").await;
//! ```

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::db::{TestDatabase, postgres_database};
use super::redis::RedisServer;
use super::{FakeUpstream, Process, Script, Step, client, openai_finish, openai_text_chunk};

/// How long one expected frame or answer may take before the test fails.
/// A guard against "never arrives", not a latency assertion.
pub const WAIT: Duration = Duration::from_secs(15);

/// The model every node serves (`fake-model` at the fake upstream).
pub const MODEL: &str = "chat";

/// The `[cluster]` timings of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `cluster.heartbeat_ms`: node heartbeat and presence refresh.
    pub heartbeat_ms: u64,
    /// `cluster.position_check_ms`: how often a follower re-reads the meta.
    pub position_check_ms: u64,
    /// `cluster.presence_grace_ms`: 0 = a dropped connection leaves at once.
    pub presence_grace_ms: u64,
    /// More TOML appended to every node's config file (whole sections, e.g.
    /// `"[generation]\nmax_frame_bytes = 64\n"`; not `[server]`, `[store]`,
    /// `[cluster]`, providers or models, which the harness writes).
    pub extra_toml: String,
}

impl Default for ClusterSettings {
    /// Fast timings: heartbeat every 400 ms, position check every 200 ms, no
    /// presence grace.
    fn default() -> Self {
        Self {
            heartbeat_ms: 400,
            position_check_ms: 200,
            presence_grace_ms: 0,
            extra_toml: String::new(),
        }
    }
}

/// Gateway processes sharing a database, a Redis (unless started with
/// [`Cluster::start_without_redis`]) and an upstream.
#[derive(Debug)]
pub struct Cluster {
    pub upstream: FakeUpstream,
    /// `None` for [`Cluster::start_without_redis`].
    pub redis: Option<RedisServer>,
    pub database_url: String,
    pub nodes: Vec<Node>,
    pub settings: ClusterSettings,
    /// Drops the database after the nodes (fields drop in order).
    _database: TestDatabase,
}

impl Cluster {
    /// Starts Redis, a fresh database, the fake upstream and one node per
    /// name (`node_id` = the name), one after the other (the first one
    /// migrates the database), and waits until each answers `/readyz` 200.
    pub async fn start(names: &[&str], settings: ClusterSettings) -> Self {
        let redis = RedisServer::start_new().await;
        Self::start_inner(names, settings, Some(redis)).await
    }

    /// The same nodes without `[cluster]` at all: each is a single instance
    /// with its in-process bus (the default), sharing only the database.
    pub async fn start_without_redis(names: &[&str]) -> Self {
        Self::start_inner(names, ClusterSettings::default(), None).await
    }

    async fn start_inner(
        names: &[&str],
        settings: ClusterSettings,
        redis: Option<RedisServer>,
    ) -> Self {
        let upstream = FakeUpstream::start().await;
        let (database, database_url) = postgres_database().await;
        let mut cluster = Self {
            upstream,
            redis,
            database_url,
            nodes: Vec::new(),
            settings,
            _database: database,
        };
        for name in names {
            let node = cluster.spawn_node(name).await;
            cluster.nodes.push(node);
        }
        cluster
    }

    /// Writes `name`'s config and starts it (waiting for `/readyz` 200 when
    /// Redis is configured).
    pub async fn spawn_node(&self, name: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("spillway-node-{name}-"))
            .tempdir()
            .expect("temporary directory");
        let config = self.config_text(name, dir.path());
        let config_path = dir.path().join("spillway.toml");
        std::fs::write(&config_path, &config).expect("write the node's config");
        // SPILLWAY_TEST_NODE_LOG_LEVEL=debug (say) for more when debugging.
        let level =
            std::env::var("SPILLWAY_TEST_NODE_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
        let process = Process::serve_isolated(
            &["--config", config_path.to_str().expect("utf-8 path")],
            &[("SPILLWAY_LOG_LEVEL", &level)],
        )
        .await;
        let node = Node {
            id: name.to_owned(),
            process,
            config_path,
            config,
            _dir: dir,
        };
        if self.redis.is_some() {
            node.wait_readyz(200).await;
        }
        node
    }

    /// Like [`spawn_node`](Self::spawn_node), with `server_toml` (lines of
    /// `[server]` settings, e.g. `"shutdown_grace_secs = 20"`) added to the
    /// node's `[server]` section.
    pub async fn spawn_node_with_server(&self, name: &str, server_toml: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("spillway-node-{name}-"))
            .tempdir()
            .expect("temporary directory");
        let config = self.config_text(name, dir.path()).replacen(
            "[server]\n",
            &format!("[server]\n{server_toml}\n"),
            1,
        );
        let config_path = dir.path().join("spillway.toml");
        std::fs::write(&config_path, &config).expect("write the node's config");
        let process = Process::serve_isolated(
            &["--config", config_path.to_str().expect("utf-8 path")],
            &[("SPILLWAY_LOG_LEVEL", "info")],
        )
        .await;
        let node = Node {
            id: name.to_owned(),
            process,
            config_path,
            config,
            _dir: dir,
        };
        if self.redis.is_some() {
            node.wait_readyz(200).await;
        }
        node
    }

    /// The config file of node `name`, its data (journal) under `data_dir`.
    pub fn config_text(&self, name: &str, data_dir: &std::path::Path) -> String {
        let mut text = format!(
            r#"[server]
listen = "127.0.0.1:0"

[store]
database_url = "{database}"
data_dir = "{data}"
max_connections = 4
batch_max_delay_ms = 5

[[providers]]
name = "fake"
kind = "openai"
base_url = "{upstream}"

[[models]]
name = "{MODEL}"
targets = [{{ provider = "fake", model = "fake-model" }}]
"#,
            database = self.database_url,
            data = data_dir.display(),
            upstream = self.upstream.base_url(),
        );
        if let Some(redis) = &self.redis {
            text.push_str(&format!(
                r#"
[cluster]
redis_url = "{url}"
node_id = "{name}"
heartbeat_ms = {heartbeat}
position_check_ms = {position}
presence_grace_ms = {grace}
"#,
                url = redis.url(),
                heartbeat = self.settings.heartbeat_ms,
                position = self.settings.position_check_ms,
                grace = self.settings.presence_grace_ms,
            ));
        }
        if !self.settings.extra_toml.is_empty() {
            text.push('\n');
            text.push_str(&self.settings.extra_toml);
            text.push('\n');
        }
        text
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.id == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|node| node.id == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The test's Redis server (panics for a cluster without one).
    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("this cluster has Redis")
    }
}

/// One gateway process of a [`Cluster`]. Prints the tail of its log when
/// dropped during a panic (a failing test), so the failure shows what the
/// node did.
#[derive(Debug)]
pub struct Node {
    /// The name, also its `cluster.node_id`.
    pub id: String,
    pub process: Process,
    pub config_path: PathBuf,
    pub config: String,
    /// Holds the config file and the persister's journal.
    _dir: TempDir,
}

impl Node {
    /// `host:port` it listens on.
    pub fn addr(&self) -> &str {
        &self.process.addr
    }

    pub fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// `GET /readyz`: the status and the JSON body (`Null` if not JSON).
    pub async fn readyz(&self) -> (u16, Value) {
        let response = timeout(WAIT, client().get(self.url("/readyz")).send())
            .await
            .expect("/readyz answers within the timeout")
            .expect("/readyz answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Polls `/readyz` (every 50 ms, up to 20 s) until it answers `status`;
    /// returns that body.
    pub async fn wait_readyz(&self, status: u16) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (got, body) = self.readyz().await;
            if got == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: /readyz still answers {got} {body}, not {status}\n{}",
                self.id,
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new conversation of `user`, created with `POST /v1/conversations`.
    pub async fn conversation(&self, user: &str) -> String {
        let response = client()
            .post(self.url("/v1/conversations"))
            .header("x-spillway-user", user)
            .json(&json!({ "title": "cluster test" }))
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(response.status().as_u16(), 201, "create a conversation");
        let body: Value = response.json().await.expect("JSON");
        body["id"].as_str().expect("an id").to_owned()
    }

    /// A WebSocket connection as `user`, after its `hello`.
    pub async fn ws(&self, user: &str) -> WsClient {
        WsClient::connect(self.addr(), user).await
    }

    /// SIGKILL and wait until the process is gone.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.process.log_text();
        let all: Vec<&str> = log.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- node {} log (last {lines} lines) ---\n{}",
            self.id,
            all[start..].join("\n")
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(200));
        }
    }
}

// ------------------------------------------------------------ the client

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client of the native protocol: one WebSocket (`spillway.v1`), JSON
/// frames.
#[derive(Debug)]
pub struct WsClient {
    pub ws: Ws,
    /// The `hello` frame.
    pub hello: Value,
    /// Which gateway it talks to, for messages.
    pub addr: String,
}

impl WsClient {
    /// Connects to `addr` (`host:port`) as `user` (`X-Spillway-User`) and
    /// reads `hello`.
    pub async fn connect(addr: &str, user: &str) -> Self {
        Self::connect_path(addr, "/v1/ws", user).await
    }

    /// Connects to `path` (with its query) on `addr` as `user` and reads
    /// `hello`.
    pub async fn connect_path(addr: &str, path: &str, user: &str) -> Self {
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("spillway.v1"),
        );
        request
            .headers_mut()
            .insert("x-spillway-user", HeaderValue::from_str(user).unwrap());
        let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake within the timeout")
            .expect("handshake succeeds");
        let mut client = Self {
            ws,
            hello: Value::Null,
            addr: addr.to_owned(),
        };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["user_id"], user);
        client.hello = hello;
        client
    }

    pub async fn send(&mut self, frame: Value) {
        timeout(WAIT, self.ws.send(Message::text(frame.to_string())))
            .await
            .expect("write within the timeout")
            .expect("write succeeds");
    }

    /// The next JSON frame (control frames skipped); fails the test after
    /// [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        let addr = self.addr.clone();
        self.recv_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("a frame from {addr} within {WAIT:?}"))
    }

    /// The next JSON frame within `wait`, or `None`.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let message = timeout(deadline - Instant::now(), self.ws.next())
                .await
                .ok()?
                .expect("socket open")
                .expect("valid WebSocket message");
            match message {
                Message::Text(text) => return Some(serde_json::from_str(text.as_str()).unwrap()),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    }

    /// Reads frames until one matches `wanted` (within `within` in all);
    /// returns it and the frames before it.
    pub async fn until(
        &mut self,
        within: Duration,
        what: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.recv_within(left).await else {
                panic!(
                    "{what} did not arrive from {} within {within:?}; got {before:#?}",
                    self.addr
                );
            };
            if wanted(&frame) {
                return (frame, before);
            }
            before.push(frame);
        }
    }

    /// Closes the connection cleanly (a close frame) and drops it.
    pub async fn close(mut self) {
        let _ = timeout(WAIT, self.ws.close(None)).await;
        // Read until the server's close (or the end) so it is processed.
        let _ = timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// `subscribe`, then its `presence` snapshot (returned).
    pub async fn subscribe(&mut self, conversation_id: &str) -> Value {
        self.send(json!({ "type": "subscribe", "conversation_id": conversation_id }))
            .await;
        let (snapshot, before) = self
            .until(WAIT, "the presence snapshot", |f| {
                f["type"] == "presence"
                    && f["event"] == "snapshot"
                    && f["conversation_id"] == conversation_id
            })
            .await;
        assert!(
            before.iter().all(|f| f["type"] != "error"),
            "subscribe failed: {before:?}"
        );
        snapshot
    }

    /// Sends `content` as `client_message_id` and reads its `ack` (the
    /// sending connection's next direct answer; room events before it are
    /// returned as the second value).
    pub async fn send_message(
        &mut self,
        conversation_id: &str,
        content: &str,
        client_message_id: &str,
    ) -> (Value, Vec<Value>) {
        self.send(json!({
            "type": "send",
            "conversation_id": conversation_id,
            "content": content,
            "client_message_id": client_message_id,
        }))
        .await;
        let (ack, before) = self
            .until(WAIT, "the ack", |f| {
                f["type"] == "ack" || (f["type"] == "error" && f["client_message_id"].is_string())
            })
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["client_message_id"], client_message_id);
        assert_eq!(ack["conversation_id"], conversation_id);
        (ack, before)
    }

    /// Reads up to (and including) the `reply` of `generation_id`; returns
    /// it and the frames before it.
    pub async fn until_reply(&mut self, generation_id: &str) -> (Value, Vec<Value>) {
        self.until(WAIT, "the reply announcement", |f| {
            f["type"] == "reply" && f["generation_id"] == generation_id
        })
        .await
    }

    /// `resume` of `generation_id` at `(epoch, offset)`.
    pub async fn resume(&mut self, generation_id: &str, epoch: u64, offset: u64) {
        self.send(json!({
            "type": "resume", "generation_id": generation_id,
            "epoch": epoch, "offset": offset,
        }))
        .await;
    }

    /// Streams `generation_id` from `from` to its terminal frame (`done` or
    /// `error`), each frame within `within`. Frames of other kinds
    /// (`presence`, `typing`, `message`, `reply`s of other generations) are
    /// set aside in [`Streamed::others`].
    pub async fn stream_within(
        &mut self,
        generation_id: &str,
        from: u64,
        within: Duration,
    ) -> Streamed {
        let mut streamed = Streamed::at(from);
        self.continue_stream(generation_id, &mut streamed, within, |_| false)
            .await;
        streamed
    }

    /// [`stream_within`](Self::stream_within) with [`WAIT`].
    pub async fn stream(&mut self, generation_id: &str, from: u64) -> Streamed {
        self.stream_within(generation_id, from, WAIT).await
    }

    /// Folds frames of `generation_id` into `streamed` until its terminal
    /// frame, or until `stop(streamed)` holds after a frame; returns whether
    /// it ended (terminal frame seen). Each frame must come within `within`.
    pub async fn continue_stream(
        &mut self,
        generation_id: &str,
        streamed: &mut Streamed,
        within: Duration,
        stop: impl Fn(&Streamed) -> bool,
    ) -> bool {
        loop {
            let frame = self.recv_within(within).await.unwrap_or_else(|| {
                panic!(
                    "{generation_id} from {}: no frame within {within:?} after {:?} \
                     (text so far {:?})",
                    self.addr,
                    streamed.frames.last(),
                    streamed.text
                )
            });
            if frame["generation_id"] != generation_id || frame["type"] == "reply" {
                streamed.others.push(frame);
                continue;
            }
            if streamed.take(generation_id, frame) {
                return true;
            }
            if stop(streamed) {
                return false;
            }
        }
    }

    /// Sends `ping` and reads up to its `pong`; returns the frames before
    /// it (queued events).
    pub async fn ping(&mut self, id: u64) -> Vec<Value> {
        self.send(json!({ "type": "ping", "id": id })).await;
        let (pong, before) = self
            .until(WAIT, "the pong", |f| f["type"] == "pong" && f["id"] == id)
            .await;
        assert_eq!(pong, json!({ "type": "pong", "id": id }));
        before
    }

    /// Sends `ping` and asserts that the very next frame is its `pong`.
    pub async fn assert_usable(&mut self, id: u64) {
        self.send(json!({ "type": "ping", "id": id })).await;
        let pong = self.recv().await;
        assert_eq!(pong, json!({ "type": "pong", "id": id }));
    }
}

/// What a client got of one generation.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// Its frames, in order (the terminal one last).
    pub frames: Vec<Value>,
    /// The concatenated `delta` text.
    pub text: String,
    /// Where to resume from: the `next` of the last frame.
    pub next: u64,
    /// Frames of anything else that arrived meanwhile.
    pub others: Vec<Value>,
}

impl Streamed {
    /// Nothing yet, expecting the first frame at `offset`.
    pub fn at(offset: u64) -> Self {
        Self {
            next: offset,
            ..Self::default()
        }
    }

    /// Folds in one frame of `generation_id`, checking that it continues
    /// exactly where the previous one ended (`offset` = previous `next`);
    /// returns whether it ends the stream (`done` or `error`).
    pub fn take(&mut self, generation_id: &str, frame: Value) -> bool {
        assert_eq!(frame["generation_id"], generation_id, "{frame}");
        let kind = frame["type"].as_str().unwrap().to_owned();
        if kind == "error" {
            self.frames.push(frame);
            return true;
        }
        assert_eq!(
            frame["offset"].as_u64(),
            Some(self.next),
            "frames are contiguous: {frame} after {:?}",
            self.frames.last()
        );
        let next = frame["next"].as_u64().unwrap();
        assert!(next >= self.next, "{frame}");
        if kind == "delta" {
            self.text.push_str(frame["text"].as_str().unwrap());
            assert!(next > self.next, "a delta covers events: {frame}");
        }
        self.next = next;
        self.frames.push(frame);
        kind == "done"
    }

    pub fn kinds(&self) -> Vec<String> {
        self.frames
            .iter()
            .map(|f| f["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The terminal (or last) frame.
    pub fn last(&self) -> &Value {
        self.frames.last().expect("at least one frame")
    }

    /// The first generation frame.
    pub fn first(&self) -> &Value {
        self.frames.first().expect("at least one frame")
    }
}

/// `presence` for user `user` alone with `devices` connections.
pub fn presence(conversation_id: &str, event: &str, user: &str, devices: u64) -> Value {
    json!({
        "type": "presence", "conversation_id": conversation_id,
        "event": event, "users": [user], "devices": devices,
    })
}

/// Tokens of a ~60-token reply, multi-byte characters included, each one
/// distinct so a lost or duplicated token shows.
pub fn long_reply(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 4 {
            0 => format!("w{i:02} "),
            1 => format!("é{i:02}ü "),
            2 => format!("日{i:02}本 "),
            _ => format!("🌊{i:02}\n"),
        })
        .collect()
}

/// A seed for a test's random choices: `SPILLWAY_TEST_SEED` if set, else a
/// random one. Printed, so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("SPILLWAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: seed {seed} (replay with SPILLWAY_TEST_SEED={seed})");
    seed
}

/// `&str`s of `tokens`.
pub fn refs(tokens: &[String]) -> Vec<&str> {
    tokens.iter().map(String::as_str).collect()
}

/// An OpenAI stream: `before`, `pace` apart, then a stall until
/// [`FakeUpstream::release`] (forever if nobody releases it), then `after`,
/// `pace` apart, and the finish.
pub fn stalling_stream(before: &[String], after: &[String], pace: Duration) -> Script {
    let mut steps = Vec::new();
    for token in before {
        steps.push(Step::Sleep(pace));
        steps.push(openai_text_chunk(token));
    }
    steps.push(Step::AwaitRelease);
    for token in after {
        steps.push(Step::Sleep(pace));
        steps.push(openai_text_chunk(token));
    }
    steps.extend(openai_finish(7, (before.len() + after.len()) as u64));
    Script::sse(steps)
}

/// Releases the upstream's stalled bodies every few ms (a body only hears
/// a release once it waits for one) until the task is aborted.
pub fn release_until_stopped(upstream: &FakeUpstream) -> tokio::task::JoinHandle<()> {
    let upstream = upstream.clone();
    tokio::spawn(async move {
        loop {
            upstream.release();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

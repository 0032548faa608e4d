//! Authentication and authorization over real sockets: a negative matrix.
//!
//! The in-process gateway (`auth.enabled = true`, listening on a real port)
//! is called over HTTP, SSE and WebSocket with no credential, malformed
//! ones, JWTs (HS256, RS256, ES256) that are expired, not yet valid, for
//! another audience or issuer, wrongly signed, unsigned or revoked, API keys
//! that are unknown, wrong, revoked or lack the `chat` scope, and widget
//! visitor tokens from allowed and disallowed origins; users and tenants try
//! each other's conversations and replies. Every refusal is checked for its
//! documented status, error code or WebSocket close code, *and* for having
//! changed nothing: the other user's data is intact, a reply streaming
//! alongside on another connection keeps flowing to its end, the refused
//! request created nothing upstream or in the store. The CLI's `keys`
//! and `revoke-token` commands run as the real binary against the gateway's
//! own SQLite file.
//!
//! Secrets come from environment variables with a name unique to each test.
//! `std::env::set_var` is `unsafe` in edition 2024 and the crate forbids
//! unsafe code (tests included), so a test that needs them runs itself again
//! in a child process of this test binary that has them set (see
//! [`secrets`]). The RS256 / ES256 keys are test-only PEM files in
//! `tests/fixtures/auth/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use spillway::config::{Config, WidgetConfig};
use spillway::store::{MessageStatus, Owner};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

/// Upper bound on every single wait.
const WAIT: Duration = Duration::from_secs(10);

/// The `iss` and `aud` the gateway requires of user JWTs.
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "spillway-test";

/// The tenant of a JWT that names none (`auth.default_tenant`).
const DEFAULT_TENANT: &str = "default";

/// The widget every widget test configures, its tenant and its one origin.
const WIDGET: &str = "pk_test_widget_one";
const WIDGET_TENANT: &str = "acme";
const GOOD_ORIGIN: &str = "https://good.example";
const BAD_ORIGIN: &str = "https://evil.example";

/// An environment variable no test sets: the visitor secret of gateways
/// without widgets (the default name might be set on the machine).
const UNSET_VISITOR_ENV: &str = "SPILLWAY_TEST_UNSET_VISITOR_SECRET";

// ------------------------------------------------------------- secrets

/// The secrets of one test, in environment variables only its process has.
#[derive(Debug, Clone)]
struct Secrets {
    hs256_env: String,
    hs256: String,
    visitor_env: String,
    visitor: String,
}

impl Secrets {
    fn of(n: u32) -> Self {
        Self {
            hs256_env: format!("SPILLWAY_TEST_JWT_SECRET_{n}"),
            hs256: format!("hs256-test-secret-{n}-0123456789abcdefghijklmnop"),
            visitor_env: format!("SPILLWAY_TEST_VISITOR_SECRET_{n}"),
            visitor: format!("visitor-test-secret-{n}-0123456789abcdefghijklm"),
        }
    }

    fn vars(&self) -> [(&str, &str); 2] {
        [
            (&self.hs256_env, &self.hs256),
            (&self.visitor_env, &self.visitor),
        ]
    }
}

/// The secrets of test `test` (number `n`): `Some` in a process that has
/// them in its environment, which then runs the test. Otherwise this runs
/// `test` (and only it) again in a child process of this test binary with
/// the variables set, fails if the child does, and returns `None`: the
/// caller returns at once. (`cargo test` and nextest both run the binary's
/// libtest harness, which `--exact` filters to the one test.)
async fn secrets(test: &str, n: u32) -> Option<Secrets> {
    let secrets = Secrets::of(n);
    let present = secrets
        .vars()
        .iter()
        .all(|(name, value)| std::env::var(name).is_ok_and(|set| set == *value));
    if present {
        return Some(secrets);
    }
    let output = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .envs(secrets.vars())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the test in a child process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test} failed in its child process (the one with its secrets set):\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    None
}

// -------------------------------------------------------------- config

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).expect("auth fixture exists")
}

/// A gateway in front of `upstream` with credentials required: RS256 and
/// ES256 user JWTs (the fixture public keys) with the test issuer and
/// audience, a 30 s leeway, the revocation list reloaded every second and
/// API keys not cached. A long grace, so a reply outlives a disconnect.
fn base_config(upstream: &FakeUpstream) -> Config {
    let mut config = test_config(&format!(
        "{}\n[generation]\ngrace_secs = 300\n",
        openai_config(upstream)
    ));
    let auth = &mut config.auth;
    auth.enabled = true;
    auth.leeway_secs = 30;
    auth.recheck_secs = 1;
    auth.key_cache_secs = 0;
    auth.jwt.issuer = ISSUER.into();
    auth.jwt.audience = AUDIENCE.into();
    auth.jwt.public_key_files = vec![
        fixture_path("rsa_public.pem"),
        fixture_path("ec_public.pem"),
    ];
    auth.visitors.secret_env = UNSET_VISITOR_ENV.into();
    config
}

/// Adds HS256 (from `secrets`) and the test widget (its visitor tokens
/// signed with `secrets`' visitor secret).
fn with_secrets(config: &mut Config, secrets: &Secrets) {
    let auth = &mut config.auth;
    auth.jwt.hs256_secret_env = secrets.hs256_env.clone();
    auth.visitors.secret_env = secrets.visitor_env.clone();
    auth.widgets = vec![WidgetConfig {
        key: WIDGET.into(),
        tenant: WIDGET_TENANT.into(),
        origins: vec![GOOD_ORIGIN.into()],
        tier: String::new(),
    }];
}

async fn gateway_with(upstream: &FakeUpstream, tune: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = base_config(upstream);
    tune(&mut config);
    TestGateway::start_with(config).await
}

// --------------------------------------------------------------- tokens

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims for `user` (no tenant claim: the default tenant), valid
/// for an hour, with a fresh `jti`.
fn claims(user: &str) -> Value {
    let now = now();
    json!({
        "sub": user,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("sign a test token")
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap()
}

/// An RS256 token with the trusted fixture key.
fn rs256(claims: &Value) -> String {
    sign(Algorithm::RS256, &rsa_key(), claims)
}

/// A valid RS256 token of `user` in the default tenant.
fn token(user: &str) -> String {
    rs256(&claims(user))
}

/// A valid RS256 token of `user` in `tenant`.
fn token_in(tenant: &str, user: &str) -> String {
    let mut claims = claims(user);
    claims["tenant"] = json!(tenant);
    rs256(&claims)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn b64url_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut held = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let value = B64.iter().position(|b| *b == c).expect("base64url") as u32;
        bits = (bits << 6) | value;
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    out
}

/// The (unverified) claims of a token.
fn payload_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&b64url_decode(payload)).expect("JSON claims")
}

/// `token` with its payload replaced by `claims` (the signature kept).
fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// A hand-built unsigned token: `alg: none`, empty signature.
fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

// ----------------------------------------------------------------- HTTP

/// What a request presents.
#[derive(Debug, Clone, Default)]
struct Cred {
    /// `Authorization: Bearer …`
    token: Option<String>,
    /// `X-Spillway-User` (API keys act for it; ignored for other tokens).
    user: Option<String>,
    /// `Origin`
    origin: Option<String>,
}

impl Cred {
    fn none() -> Self {
        Self::default()
    }

    fn bearer(token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..Self::default()
        }
    }

    fn key(key: &str, user: &str) -> Self {
        Self {
            token: Some(key.to_owned()),
            user: Some(user.to_owned()),
            origin: None,
        }
    }

    fn visitor(token: &str, origin: Option<&str>) -> Self {
        Self {
            token: Some(token.to_owned()),
            user: None,
            origin: origin.map(str::to_owned),
        }
    }

    fn with_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    fn with_origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.to_owned());
        self
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(token) = &self.token {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        if let Some(user) = &self.user {
            headers.push(("x-spillway-user", user.clone()));
        }
        if let Some(origin) = &self.origin {
            headers.push(("origin", origin.clone()));
        }
        headers
    }
}

/// `method path` with `cred` (and a JSON `body`).
async fn call(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    cred: &Cred,
    body: Option<Value>,
) -> reqwest::Response {
    call_with(gateway, method, path, cred, body, &[]).await
}

async fn call_with(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    cred: &Cred,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client().request(method, gateway.url(path));
    for (name, value) in cred.headers() {
        request = request.header(name, value);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    timeout(WAIT, request.send())
        .await
        .unwrap_or_else(|_| panic!("{path} answers within {WAIT:?}"))
        .expect("the gateway answers")
}

/// Asserts `response` is the typed error `status` / `code`; returns the
/// `error` object.
async fn refused(response: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    let got = response.status().as_u16();
    let nosniff = response.headers().get("x-content-type-options").cloned();
    let text = timeout(WAIT, response.text()).await.unwrap().unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{what}: a JSON error body ({err}): {text:?}"));
    let error = &body["error"];
    assert_eq!(error["code"], code, "{what}: code ({text})");
    match status {
        401 => assert_eq!(error["type"], "authentication_error", "{what}: {text}"),
        403 => assert_eq!(error["type"], "permission_error", "{what}: {text}"),
        _ => {}
    }
    assert!(error["request_id"].is_string(), "{what}: {text}");
    assert_eq!(
        nosniff.as_ref().and_then(|v| v.to_str().ok()),
        Some("nosniff"),
        "{what}: security headers on errors too"
    );
    error.clone()
}

/// Asserts `response` has `status`; returns its JSON body (`Null` if none).
async fn expect_status(response: reqwest::Response, status: u16, what: &str) -> Value {
    let got = response.status().as_u16();
    let text = timeout(WAIT, response.text()).await.unwrap().unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}

/// Creates a conversation titled `title` as `cred`; returns its id.
async fn create_conversation(gateway: &TestGateway, cred: &Cred, title: &str) -> String {
    let response = call(
        gateway,
        "POST",
        "/v1/conversations",
        cred,
        Some(json!({ "title": title })),
    )
    .await;
    let body = expect_status(response, 201, "create a conversation").await;
    body["id"].as_str().unwrap().to_owned()
}

/// The ids of `cred`'s conversations (`GET /v1/conversations`).
async fn conversation_ids(gateway: &TestGateway, cred: &Cred) -> Vec<String> {
    let response = call(gateway, "GET", "/v1/conversations", cred, None).await;
    let body = expect_status(response, 200, "list conversations").await;
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The messages of a conversation as `cred` sees them.
async fn messages(gateway: &TestGateway, cred: &Cred, conversation: &str) -> Vec<Value> {
    let path = format!("/v1/conversations/{conversation}/messages");
    let response = call(gateway, "GET", &path, cred, None).await;
    let body = expect_status(response, 200, "list messages").await;
    body["data"].as_array().unwrap().clone()
}

/// Everything the store holds for `tenant`/`user` (after a flush).
async fn stored(gateway: &TestGateway, tenant: &str, user: &str) -> spillway::store::UserExport {
    gateway.persister().flushed().await;
    gateway
        .store()
        .export_user(&Owner {
            tenant_id: tenant.into(),
            user_id: user.into(),
        })
        .await
        .unwrap()
}

/// A new API key of `tenant` with `scopes`, stored; returns the key and
/// its id.
async fn api_key(gateway: &TestGateway, tenant: &str, scopes: &[&str]) -> (String, String) {
    let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
    let (key, row) = spillway::auth::new_key(tenant, "test", &scopes, "").unwrap();
    gateway.store().create_api_key(&row).await.unwrap();
    (key, row.id)
}

/// The events of an SSE body: (event name, JSON data).
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_owned();
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = Some(value.to_owned());
                }
            }
            data.map(|data| (name, serde_json::from_str(&data).expect("JSON event data")))
        })
        .collect()
}

/// The concatenated `delta` text of SSE events.
fn delta_text(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(name, _)| name == "delta")
        .map(|(_, data)| data["text"].as_str().unwrap())
        .collect()
}

/// A bounded poll: `tick` sleeps a little, failing the test past [`WAIT`].
struct Poll {
    deadline: Instant,
    what: &'static str,
}

impl Poll {
    fn new(what: &'static str) -> Self {
        Self {
            deadline: Instant::now() + WAIT,
            what,
        }
    }

    async fn tick(&self) {
        assert!(
            Instant::now() < self.deadline,
            "timed out after {WAIT:?} waiting until {}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------ WebSocket

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Upgrades `/v1/ws{query}` with `headers`, offering `spillway.v1`.
async fn ws_connect(gateway: &TestGateway, query: &str, headers: &[(&str, String)]) -> Ws {
    let mut request = format!("ws://{}/v1/ws{query}", gateway.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("spillway.v1"),
    );
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let (ws, response) = timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake within the timeout")
        .expect("handshake succeeds");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// A protocol client.
struct Client {
    ws: Ws,
    hello: Value,
}

impl Client {
    /// Connects with `cred`'s headers and reads `hello`.
    async fn open(gateway: &TestGateway, cred: &Cred) -> Self {
        Self::open_at(gateway, "", &cred.headers()).await
    }

    /// Connects to `/v1/ws{query}` with `headers` and reads `hello`.
    async fn open_at(gateway: &TestGateway, query: &str, headers: &[(&str, String)]) -> Self {
        let ws = ws_connect(gateway, query, headers).await;
        let mut client = Self {
            ws,
            hello: Value::Null,
        };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        client.hello = hello;
        client
    }

    fn user(&self) -> &str {
        self.hello["user_id"].as_str().unwrap()
    }

    async fn send(&mut self, frame: Value) {
        timeout(WAIT, self.ws.send(Message::text(frame.to_string())))
            .await
            .expect("write within the timeout")
            .expect("write succeeds");
    }

    /// The next JSON frame (control frames skipped).
    async fn recv(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let message = timeout(deadline - Instant::now(), self.ws.next())
                .await
                .expect("a frame within the timeout")
                .expect("socket open")
                .expect("valid WebSocket message");
            match message {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes: its close code and reason, and the
    /// text frames before it.
    async fn closed(&mut self) -> (u16, String, Vec<Value>) {
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            let message = timeout(deadline - Instant::now(), self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("the server closes within {WAIT:?} (frames so far: {before:?})")
                });
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string(), before);
                }
                Some(Ok(Message::Close(None))) => panic!("closed without a code"),
                Some(Ok(Message::Text(text))) => {
                    before.push(serde_json::from_str(text.as_str()).unwrap());
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("socket failed before a close frame: {err}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Sends `ping` and asserts the very next frame is its `pong`.
    async fn assert_usable(&mut self, id: u64) {
        self.send(json!({ "type": "ping", "id": id })).await;
        let pong = self.recv().await;
        assert_eq!(pong, json!({ "type": "pong", "id": id }));
    }

    /// Sends `frame` and returns the next frame (the answer).
    async fn ask(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        self.recv().await
    }
}

/// Upgrades `/v1/ws{query}` with `headers` and expects the refusal: the
/// close code and reason, with no frame before it.
async fn ws_refused(
    gateway: &TestGateway,
    query: &str,
    headers: &[(&str, String)],
) -> (u16, String) {
    let ws = ws_connect(gateway, query, headers).await;
    let mut client = Client {
        ws,
        hello: Value::Null,
    };
    let (code, reason, before) = client.closed().await;
    assert!(before.is_empty(), "no frame before a refusal: {before:?}");
    (code, reason)
}

// ------------------------------------------------------------ bystander

/// "one ", "two ", a stall until released, then "three".
fn stalling_stream() -> Script {
    let mut steps = vec![
        openai_text_chunk("one "),
        openai_text_chunk("two "),
        Step::AwaitRelease,
        openai_text_chunk("three"),
    ];
    steps.extend(openai_finish(7, 3));
    Script::sse(steps)
}

/// Releases the upstream's stalled bodies every few ms until aborted.
fn release_until_stopped(upstream: &FakeUpstream) -> tokio::task::JoinHandle<()> {
    let upstream = upstream.clone();
    tokio::spawn(async move {
        loop {
            upstream.release();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// A reply streaming to a legitimate user on its own WebSocket while the
/// test throws bad requests at the gateway: it must stream on to its end.
struct Bystander {
    client: Client,
    owner: Owner,
    conversation: String,
    generation: String,
    epoch: u64,
    text: String,
}

/// Starts a bystander as `cred` (whose principal is `owner`): a
/// conversation, a message, a reply streamed up to its stall.
async fn bystander(
    gateway: &TestGateway,
    upstream: &FakeUpstream,
    cred: &Cred,
    owner: Owner,
) -> Bystander {
    let conversation = create_conversation(gateway, cred, "bystander").await;
    upstream.push(stalling_stream());
    let mut client = Client::open(gateway, cred).await;
    assert_eq!(client.user(), owner.user_id);
    client
        .send(json!({
            "type": "send", "conversation_id": conversation,
            "content": "count to three", "client_message_id": "bystander-1",
        }))
        .await;
    let mut generation = None;
    let mut epoch = 0;
    let mut text = String::new();
    while text.len() < "one two ".len() {
        let frame = client.recv().await;
        match frame["type"].as_str().unwrap() {
            "ack" => {
                generation = Some(frame["generation_id"].as_str().unwrap().to_owned());
                epoch = frame["epoch"].as_u64().unwrap();
            }
            "delta" => text.push_str(frame["text"].as_str().unwrap()),
            "error" => panic!("the bystander's send failed: {frame}"),
            _ => {}
        }
    }
    assert_eq!(text, "one two ");
    Bystander {
        client,
        owner,
        conversation,
        generation: generation.expect("an ack before the reply"),
        epoch,
        text,
    }
}

impl Bystander {
    /// Releases the stalled upstream; the reply must stream on, on the same
    /// connection, to its `done`, and be stored complete.
    async fn finish(mut self, gateway: &TestGateway, upstream: &FakeUpstream) {
        let releaser = release_until_stopped(upstream);
        loop {
            let frame = self.client.recv().await;
            match frame["type"].as_str().unwrap() {
                "delta" => self.text.push_str(frame["text"].as_str().unwrap()),
                "done" => {
                    assert_eq!(frame["generation_id"], self.generation);
                    break;
                }
                "error" => {
                    releaser.abort();
                    panic!("the bystander's reply was disturbed: {frame}");
                }
                _ => {}
            }
        }
        releaser.abort();
        assert_eq!(self.text, "one two three");
        self.client.assert_usable(7).await;
        let poll = Poll::new("the bystander's reply is stored");
        loop {
            let export = stored(gateway, &self.owner.tenant_id, &self.owner.user_id).await;
            let reply = export
                .messages
                .iter()
                .find(|m| m.generation_id.as_deref() == Some(self.generation.as_str()));
            if let Some(reply) = reply {
                assert_eq!(reply.status, MessageStatus::Complete);
                assert_eq!(reply.content, "one two three");
                assert_eq!(reply.conversation_id, self.conversation);
                return;
            }
            poll.tick().await;
        }
    }
}

// ================================================================ tests

#[tokio::test]
async fn no_credential_is_401_missing_credentials_everywhere_and_changes_nothing() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let ada = Cred::bearer(&token("ada"));
    let by = bystander(&gateway, &upstream, &ada, owner(DEFAULT_TENANT, "ada")).await;
    let conversation = by.conversation.clone();
    let generation = by.generation.clone();

    // The development-mode header must not work as a credential any more.
    let anonymous = Cred::none().with_user("ada");
    let send = json!({ "content": "hi", "client_message_id": "anon-1" });
    let cases: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/conversations".into(), None),
        (
            "POST",
            "/v1/conversations".into(),
            Some(json!({ "title": "anon" })),
        ),
        ("GET", format!("/v1/conversations/{conversation}"), None),
        (
            "GET",
            format!("/v1/conversations/{conversation}/messages"),
            None,
        ),
        (
            "PATCH",
            format!("/v1/conversations/{conversation}"),
            Some(json!({ "title": "pwned" })),
        ),
        ("DELETE", format!("/v1/conversations/{conversation}"), None),
        (
            "POST",
            format!("/v1/conversations/{conversation}/messages"),
            Some(send.clone()),
        ),
        (
            "POST",
            format!("/v1/conversations/{conversation}/messages?user=ada"),
            Some(send),
        ),
        ("GET", "/v1/me/export".into(), None),
        ("GET", "/v1/me/generations".into(), None),
        ("DELETE", "/v1/me".into(), None),
        (
            "POST",
            "/v1/chat/completions".into(),
            Some(chat_body("gpt-test", true)),
        ),
        (
            "POST",
            "/v1/chat/completions".into(),
            Some(chat_body("gpt-test", false)),
        ),
        ("GET", format!("/v1/generations/{generation}/events"), None),
        (
            "GET",
            format!("/v1/generations/{generation}/events?user=ada&from=0"),
            None,
        ),
        ("POST", format!("/v1/generations/{generation}/cancel"), None),
        (
            "POST",
            format!("/v1/generations/{generation}/cancel?user=ada"),
            None,
        ),
    ];
    for (method, path, body) in cases {
        let what = format!("{method} {path} without a credential");
        for cred in [&Cred::none(), &anonymous] {
            let response = call(&gateway, method, &path, cred, body.clone()).await;
            refused(response, 401, "missing_credentials", &what).await;
        }
    }
    for (query, headers) in [
        ("", vec![]),
        ("?user=ada", vec![]),
        ("", vec![("x-spillway-user", "ada".to_owned())]),
    ] {
        let (code, reason) = ws_refused(&gateway, query, &headers).await;
        assert_eq!(
            (code, reason.as_str()),
            (4401, "missing_credentials"),
            "{query} {headers:?}"
        );
    }

    // Nothing changed: one upstream request (the bystander's), ada's one
    // conversation with its title and its one user message so far.
    assert_eq!(
        upstream.requests().len(),
        1,
        "a refused request reached the upstream"
    );
    assert_eq!(
        conversation_ids(&gateway, &ada).await,
        vec![conversation.clone()]
    );
    let path = format!("/v1/conversations/{conversation}");
    let body = expect_status(call(&gateway, "GET", &path, &ada, None).await, 200, "get").await;
    assert_eq!(body["title"], "bystander");
    by.finish(&gateway, &upstream).await;
    let export = stored(&gateway, DEFAULT_TENANT, "ada").await;
    assert_eq!(export.conversations.len(), 1);
    assert_eq!(
        export.messages.len(),
        2,
        "the message and its reply, nothing else"
    );
}

#[tokio::test]
async fn malformed_credentials_are_401_and_change_nothing() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let ada = Cred::bearer(&token("ada"));
    let by = bystander(&gateway, &upstream, &ada, owner(DEFAULT_TENANT, "ada")).await;
    let generation = by.generation.clone();

    let long = format!(
        "{}.{}.{}",
        "a".repeat(3000),
        "b".repeat(3000),
        "c".repeat(3000)
    );
    let mut no_sub = claims("ada");
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut long_sub = claims("ada");
    long_sub["sub"] = json!("u".repeat(200));
    let mut space_sub = claims("ada");
    space_sub["sub"] = json!("ada lovelace");
    let authorizations: Vec<(String, &str)> = vec![
        ("Bearer".into(), "invalid_credentials"),
        ("Bearer ".into(), "invalid_credentials"),
        ("Basic YWRhOnNlY3JldA==".into(), "invalid_credentials"),
        ("Token abc.def.ghi".into(), "invalid_credentials"),
        ("Bearer not-a-token".into(), "invalid_credentials"),
        ("Bearer a.b".into(), "invalid_credentials"),
        ("Bearer a.b.c".into(), "invalid_credentials"),
        ("Bearer a.b.c.d".into(), "invalid_credentials"),
        (format!("Bearer {long}"), "invalid_credentials"),
        (format!("Bearer {}", rs256(&no_sub)), "invalid_credentials"),
        (
            format!("Bearer {}", rs256(&long_sub)),
            "invalid_credentials",
        ),
        (
            format!("Bearer {}", rs256(&space_sub)),
            "invalid_credentials",
        ),
        ("Bearer sk_spl_".into(), "invalid_api_key"),
        (
            "Bearer sk_spl_nothex0000000000_secret".into(),
            "invalid_api_key",
        ),
        (
            format!("Bearer sk_spl_0123456789abcdef_{}", "0".repeat(63)),
            "invalid_api_key",
        ),
    ];
    for (authorization, code) in &authorizations {
        let what = format!("Authorization: {:.60}", authorization);
        let headers = [("authorization", authorization.as_str())];
        let response = call_with(
            &gateway,
            "POST",
            "/v1/conversations",
            &Cred::none(),
            Some(json!({ "title": "malformed" })),
            &headers,
        )
        .await;
        refused(response, 401, code, &what).await;
        let response = call_with(
            &gateway,
            "POST",
            "/v1/chat/completions",
            &Cred::none(),
            Some(chat_body("gpt-test", true)),
            &headers,
        )
        .await;
        refused(response, 401, code, &what).await;
        let (close, reason) =
            ws_refused(&gateway, "", &[("authorization", authorization.clone())]).await;
        assert_eq!(
            (close, reason.as_str()),
            (4401, *code),
            "{what} on a WebSocket"
        );
    }
    // Query tokens (EventSource, browser WebSockets).
    for (token, code) in [
        ("not-a-token", "invalid_credentials"),
        ("a.b.c", "invalid_credentials"),
        ("sk_spl_zz", "invalid_api_key"),
    ] {
        let path = format!("/v1/generations/{generation}/events?access_token={token}");
        refused(
            call(&gateway, "GET", &path, &Cred::none(), None).await,
            401,
            code,
            token,
        )
        .await;
        let (close, reason) = ws_refused(&gateway, &format!("?access_token={token}"), &[]).await;
        assert_eq!(
            (close, reason.as_str()),
            (4401, code),
            "{token} on a WebSocket"
        );
    }
    // The scheme is case-insensitive (a positive control).
    let lower = [("authorization", format!("bearer {}", token("ada")))];
    let lower: Vec<(&str, &str)> = lower.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let response = call_with(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::none(),
        None,
        &lower,
    )
    .await;
    expect_status(response, 200, "lower-case bearer").await;

    // Nothing changed.
    assert_eq!(
        upstream.requests().len(),
        1,
        "a refused request reached the upstream"
    );
    assert_eq!(
        conversation_ids(&gateway, &ada).await,
        vec![by.conversation.clone()]
    );
    by.finish(&gateway, &upstream).await;
}

fn owner(tenant: &str, user: &str) -> Owner {
    Owner {
        tenant_id: tenant.into(),
        user_id: user.into(),
    }
}

/// The JWT algorithms under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn algorithm(self) -> Algorithm {
        match self {
            Self::Hs256 => Algorithm::HS256,
            Self::Rs256 => Algorithm::RS256,
            Self::Es256 => Algorithm::ES256,
        }
    }

    /// The trusted key and an untrusted one of the same kind.
    fn keys(self, secrets: Option<&Secrets>) -> (EncodingKey, EncodingKey) {
        match self {
            Self::Hs256 => (
                EncodingKey::from_secret(secrets.expect("HS256 needs secrets").hs256.as_bytes()),
                EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes-long"),
            ),
            Self::Rs256 => (
                rsa_key(),
                EncodingKey::from_rsa_pem(&fixture_bytes("rsa_other_private.pem")).unwrap(),
            ),
            Self::Es256 => (
                EncodingKey::from_ec_pem(&fixture_bytes("ec_private.pem")).unwrap(),
                EncodingKey::from_ec_pem(&fixture_bytes("ec_other_private.pem")).unwrap(),
            ),
        }
    }
}

/// What a case expects.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Accepted,
    /// Refused with 401 and one of these codes.
    Refused(&'static [&'static str]),
}

/// Valid tokens of `alg` are accepted on HTTP, SSE and WebSocket; each bad
/// one is refused with its code on all three; a revoked `jti` is refused
/// (store + periodic reload, and at once with `note_revoked`) and closes a
/// live connection; nothing a refused token tried changed anything.
async fn jwt_matrix(alg: Alg, secrets: Option<&Secrets>) {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| {
        if let Some(secrets) = secrets {
            with_secrets(config, secrets);
        }
    })
    .await;
    let (good_key, other_key) = alg.keys(secrets);
    let good = |claims: &Value| sign(alg.algorithm(), &good_key, claims);
    let valid = good(&claims("ada"));
    let ada = Cred::bearer(&valid);

    // Accepted on every transport.
    let conversation = create_conversation(&gateway, &ada, "ada's").await;
    let mut live = Client::open(&gateway, &ada).await;
    assert_eq!(live.user(), "ada");
    let mut by_query = Client::open_at(&gateway, &format!("?access_token={valid}"), &[]).await;
    assert_eq!(by_query.user(), "ada");
    let unknown = uuid::Uuid::now_v7();
    let path = format!("/v1/generations/{unknown}/events?access_token={valid}");
    expect_status(
        call(&gateway, "GET", &path, &Cred::none(), None).await,
        204,
        "SSE",
    )
    .await;

    let now = now();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = claims("ada");
        change(&mut claims);
        claims
    };
    let mut bob_claims = claims("bob");
    bob_claims["exp"] = payload_of(&valid)["exp"].clone();
    let public_pem = fixture_bytes(if alg == Alg::Es256 {
        "ec_public.pem"
    } else {
        "rsa_public.pem"
    });
    const EXPIRED: &[&str] = &["token_expired"];
    const IMMATURE: &[&str] = &["token_not_yet_valid"];
    const AUDIENCE_CODE: &[&str] = &["invalid_audience"];
    const ISSUER_CODE: &[&str] = &["invalid_issuer"];
    const SIGNATURE: &[&str] = &["invalid_signature"];
    const MALFORMED: &[&str] = &["invalid_credentials"];
    // `alg: none` cannot even be parsed by the JWT library (not a known
    // algorithm): malformed, or a refused algorithm; 401 either way.
    const UNSIGNED: &[&str] = &["invalid_credentials", "invalid_signature"];
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "expired beyond the leeway",
            good(&with(&|c| c["exp"] = json!(now - 120))),
            Expect::Refused(EXPIRED),
        ),
        (
            "expired within the leeway",
            good(&with(&|c| c["exp"] = json!(now - 5))),
            Expect::Accepted,
        ),
        (
            "nbf beyond the leeway",
            good(&with(&|c| c["nbf"] = json!(now + 600))),
            Expect::Refused(IMMATURE),
        ),
        (
            "nbf within the leeway",
            good(&with(&|c| c["nbf"] = json!(now + 5))),
            Expect::Accepted,
        ),
        (
            "another audience",
            good(&with(&|c| c["aud"] = json!("another-service"))),
            Expect::Refused(AUDIENCE_CODE),
        ),
        (
            "audiences without ours",
            good(&with(&|c| c["aud"] = json!(["a", "b"]))),
            Expect::Refused(AUDIENCE_CODE),
        ),
        (
            "audiences with ours",
            good(&with(&|c| c["aud"] = json!(["a", AUDIENCE]))),
            Expect::Accepted,
        ),
        (
            "another issuer",
            good(&with(&|c| c["iss"] = json!("https://evil.example"))),
            Expect::Refused(ISSUER_CODE),
        ),
        (
            "signed with another key",
            sign(alg.algorithm(), &other_key, &claims("ada")),
            Expect::Refused(SIGNATURE),
        ),
        (
            "payload swapped for bob's",
            tampered(&valid, &bob_claims),
            Expect::Refused(SIGNATURE),
        ),
        (
            "HS256 keyed with the public key",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&public_pem),
                &claims("ada"),
            ),
            Expect::Refused(SIGNATURE),
        ),
        (
            "HS512 (not accepted)",
            sign(
                Algorithm::HS512,
                &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
                &claims("ada"),
            ),
            Expect::Refused(SIGNATURE),
        ),
        (
            "alg none",
            unsigned(&claims("ada")),
            Expect::Refused(UNSIGNED),
        ),
        (
            "alg none, signature kept",
            format!(
                "{}{}",
                unsigned(&claims("ada")),
                valid.rsplit('.').next().unwrap()
            ),
            Expect::Refused(UNSIGNED),
        ),
        (
            "no exp",
            good(&with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))),
            Expect::Refused(MALFORMED),
        ),
        (
            "exp not a number",
            good(&with(&|c| c["exp"] = json!("tomorrow"))),
            Expect::Refused(MALFORMED),
        ),
        (
            "no sub",
            good(&with(&|c| drop(c.as_object_mut().unwrap().remove("sub")))),
            Expect::Refused(MALFORMED),
        ),
    ];
    for (what, token, expect) in &cases {
        let what = format!("{alg:?} {what}");
        match expect {
            Expect::Accepted => {
                let cred = Cred::bearer(token);
                assert_eq!(
                    conversation_ids(&gateway, &cred).await,
                    vec![conversation.clone()],
                    "{what}"
                );
                let mut client =
                    Client::open_at(&gateway, &format!("?access_token={token}"), &[]).await;
                assert_eq!(client.user(), "ada", "{what}");
                client.assert_usable(1).await;
            }
            Expect::Refused(codes) => {
                let response = call(
                    &gateway,
                    "POST",
                    "/v1/conversations",
                    &Cred::bearer(token),
                    Some(json!({ "title": "refused" })),
                )
                .await;
                let error = refused_with(response, 401, codes, &what).await;
                let code = error["code"].as_str().unwrap().to_owned();
                let path = format!("/v1/generations/{unknown}/events?access_token={token}");
                let response = call(&gateway, "GET", &path, &Cred::none(), None).await;
                refused(response, 401, &code, &format!("{what} (SSE)")).await;
                let (close, reason) =
                    ws_refused(&gateway, &format!("?access_token={token}"), &[]).await;
                assert_eq!(
                    (close, reason.as_str()),
                    (4401, code.as_str()),
                    "{what} (WebSocket)"
                );
            }
        }
    }
    // Nothing a refused token tried changed anything.
    assert_eq!(
        conversation_ids(&gateway, &ada).await,
        vec![conversation.clone()]
    );
    assert_eq!(
        stored(&gateway, DEFAULT_TENANT, "ada")
            .await
            .conversations
            .len(),
        1
    );
    assert!(
        stored(&gateway, DEFAULT_TENANT, "bob")
            .await
            .conversations
            .is_empty()
    );
    live.assert_usable(2).await;

    // Revocation by `jti`, through the store; the gateway reloads the list
    // every `recheck_secs` (1 s here).
    let revocable_claims = claims("ada");
    let jti = revocable_claims["jti"].as_str().unwrap().to_owned();
    let exp_ms = i64::try_from(revocable_claims["exp"].as_u64().unwrap() * 1000).unwrap();
    let revocable = good(&revocable_claims);
    let revocable_cred = Cred::bearer(&revocable);
    assert_eq!(
        conversation_ids(&gateway, &revocable_cred).await,
        vec![conversation.clone()]
    );
    let mut doomed = Client::open(&gateway, &revocable_cred).await;
    gateway.store().revoke_token(&jti, exp_ms).await.unwrap();
    let poll = Poll::new("a revoked token is refused");
    loop {
        let response = call(&gateway, "GET", "/v1/conversations", &revocable_cred, None).await;
        if response.status() == 401 {
            refused(response, 401, "token_revoked", "revoked (HTTP)").await;
            break;
        }
        poll.tick().await;
    }
    let (close, reason, _) = doomed.closed().await;
    assert_eq!(
        (close, reason.as_str()),
        (4401, "token_revoked"),
        "a live connection on a revoked token"
    );
    let (close, reason) = ws_refused(&gateway, &format!("?access_token={revocable}"), &[]).await;
    assert_eq!((close, reason.as_str()), (4401, "token_revoked"));
    let path = format!("/v1/generations/{unknown}/events?access_token={revocable}");
    refused(
        call(&gateway, "GET", &path, &Cred::none(), None).await,
        401,
        "token_revoked",
        "SSE",
    )
    .await;

    // In the same process `note_revoked` takes effect at once.
    let instant_claims = claims("ada");
    let instant_jti = instant_claims["jti"].as_str().unwrap().to_owned();
    let instant = Cred::bearer(&good(&instant_claims));
    assert_eq!(
        conversation_ids(&gateway, &instant).await,
        vec![conversation.clone()]
    );
    gateway
        .store()
        .revoke_token(&instant_jti, exp_ms)
        .await
        .unwrap();
    gateway.gateway.auth.note_revoked(&instant_jti);
    let response = call(&gateway, "GET", "/v1/conversations", &instant, None).await;
    refused(response, 401, "token_revoked", "note_revoked").await;

    // Other tokens of the same user are unaffected, and so are their
    // connections.
    assert_eq!(conversation_ids(&gateway, &ada).await, vec![conversation]);
    live.assert_usable(3).await;
    by_query.assert_usable(4).await;
    assert!(upstream.requests().is_empty());
}

/// Like [`refused`], with any of `codes`.
async fn refused_with(
    response: reqwest::Response,
    status: u16,
    codes: &[&str],
    what: &str,
) -> Value {
    let got = response.status().as_u16();
    let text = timeout(WAIT, response.text()).await.unwrap().unwrap();
    assert_eq!(got, status, "{what}: status (body {text})");
    let body: Value = serde_json::from_str(&text).unwrap();
    let code = body["error"]["code"].as_str().unwrap_or_default();
    assert!(
        codes.contains(&code),
        "{what}: code {code}, expected one of {codes:?}"
    );
    body["error"].clone()
}

#[tokio::test]
async fn jwt_hs256_valid_tokens_pass_and_every_bad_one_is_refused_with_its_code() {
    let Some(secrets) = secrets(
        "jwt_hs256_valid_tokens_pass_and_every_bad_one_is_refused_with_its_code",
        1,
    )
    .await
    else {
        return;
    };
    jwt_matrix(Alg::Hs256, Some(&secrets)).await;
}

#[tokio::test]
async fn jwt_rs256_valid_tokens_pass_and_every_bad_one_is_refused_with_its_code() {
    jwt_matrix(Alg::Rs256, None).await;
}

#[tokio::test]
async fn jwt_es256_valid_tokens_pass_and_every_bad_one_is_refused_with_its_code() {
    jwt_matrix(Alg::Es256, None).await;
}

#[tokio::test]
async fn jwt_without_aud_or_iss_is_refused_when_the_gateway_requires_them() {
    // `auth.jwt.audience` / `issuer` are documented as *required* when
    // set ("Required iss / aud; empty: not checked"): a token that simply
    // leaves the claim out must not pass.
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let mut no_aud = claims("ada");
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut no_iss = claims("ada");
    no_iss.as_object_mut().unwrap().remove("iss");
    let mut accepted = Vec::new();
    for (what, claims, code) in [
        ("no aud", no_aud, "invalid_audience"),
        ("no iss", no_iss, "invalid_issuer"),
    ] {
        let response = call(
            &gateway,
            "POST",
            "/v1/conversations",
            &Cred::bearer(&rs256(&claims)),
            Some(json!({ "title": what })),
        )
        .await;
        if response.status() == 401 {
            refused(response, 401, code, what).await;
        } else {
            accepted.push(format!("{what}: {}", response.status()));
        }
    }
    assert!(
        accepted.is_empty(),
        "tokens without a required claim were accepted: {accepted:?}"
    );
    assert!(
        stored(&gateway, DEFAULT_TENANT, "ada")
            .await
            .conversations
            .is_empty()
    );
}

#[tokio::test]
async fn api_keys_act_for_their_tenant_and_unknown_wrong_revoked_or_unscoped_keys_are_refused() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let (key, key_id) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin_only, _) = api_key(&gateway, "t-a", &["admin"]).await;
    let (doomed_key, doomed_id) = api_key(&gateway, "t-a", &["chat"]).await;
    let sam = Cred::key(&key, "sam");

    // Valid: the OpenAI endpoint, acting as `X-Spillway-User`.
    upstream.push(openai_stream(&["Hel", "lo"], Duration::ZERO));
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &sam,
        Some(chat_body("gpt-test", true)),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    assert_eq!(content_of(&events), "Hello");
    let poll = Poll::new("the OpenAI exchange is stored for t-a/sam");
    let openai_conversation = loop {
        let export = stored(&gateway, "t-a", "sam").await;
        if let Some(conversation) = export.conversations.first() {
            assert_eq!(conversation.metadata["source"], "openai");
            break conversation.id.clone();
        }
        poll.tick().await;
    };
    // The history API, as the same user.
    let made = create_conversation(&gateway, &sam, "sam's").await;
    let mut ids = conversation_ids(&gateway, &sam).await;
    ids.sort();
    let mut expected = vec![openai_conversation.clone(), made.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    // Without `X-Spillway-User` the key acts as itself.
    let itself = Cred::bearer(&key);
    let own = create_conversation(&gateway, &itself, "the key's own").await;
    assert_eq!(conversation_ids(&gateway, &itself).await, vec![own]);
    assert_eq!(
        stored(&gateway, "t-a", &format!("key:{key_id}"))
            .await
            .conversations
            .len(),
        1
    );
    // A WebSocket of the key, as sam.
    let mut live = Client::open(&gateway, &sam).await;
    assert_eq!(live.user(), "sam");

    // Unknown (well-formed, never stored), wrong secret, malformed: 401.
    let (unknown, _) =
        spillway::auth::new_key("t-a", "never stored", &["chat".into()], "").unwrap();
    let wrong_secret = format!("sk_spl_{key_id}_{}", "f".repeat(64));
    let truncated = key[..key.len() - 1].to_owned();
    for (what, bad) in [
        ("unknown key", unknown.as_str()),
        ("wrong secret", wrong_secret.as_str()),
        ("truncated secret", truncated.as_str()),
    ] {
        let cred = Cred::key(bad, "sam");
        let response = call(
            &gateway,
            "POST",
            "/v1/chat/completions",
            &cred,
            Some(chat_body("gpt-test", false)),
        )
        .await;
        refused(response, 401, "invalid_api_key", what).await;
        let response = call(
            &gateway,
            "POST",
            "/v1/conversations",
            &cred,
            Some(json!({})),
        )
        .await;
        refused(response, 401, "invalid_api_key", what).await;
        let response = call(&gateway, "GET", "/v1/conversations", &cred, None).await;
        refused(response, 401, "invalid_api_key", what).await;
        let (close, reason) = ws_refused(&gateway, "", &cred.headers()).await;
        assert_eq!(
            (close, reason.as_str()),
            (4401, "invalid_api_key"),
            "{what}"
        );
    }

    // Without the `chat` scope: 403 forbidden everywhere.
    let unscoped = Cred::key(&admin_only, "sam");
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &unscoped,
        Some(chat_body("gpt-test", true)),
    )
    .await;
    refused(response, 403, "forbidden", "no chat scope: OpenAI").await;
    let response = call(&gateway, "GET", "/v1/conversations", &unscoped, None).await;
    refused(response, 403, "forbidden", "no chat scope: history").await;
    let response = call(
        &gateway,
        "POST",
        "/v1/conversations",
        &unscoped,
        Some(json!({})),
    )
    .await;
    refused(response, 403, "forbidden", "no chat scope: create").await;
    let path = format!(
        "/v1/generations/{}/events?access_token={admin_only}",
        uuid::Uuid::now_v7()
    );
    refused(
        call(&gateway, "GET", &path, &Cred::none(), None).await,
        403,
        "forbidden",
        "no chat scope: SSE",
    )
    .await;
    let (close, reason) = ws_refused(&gateway, "", &unscoped.headers()).await;
    assert_eq!((close, reason.as_str()), (4403, "forbidden"));

    // Revoked: refused from then on (no key cache here), and a live
    // connection on it is closed at its next re-check.
    let doomed = Cred::key(&doomed_key, "sam");
    expect_status(
        call(&gateway, "GET", "/v1/conversations", &doomed, None).await,
        200,
        "before",
    )
    .await;
    let mut doomed_ws = Client::open(&gateway, &doomed).await;
    assert!(gateway.store().revoke_api_key(&doomed_id).await.unwrap());
    let poll = Poll::new("a revoked key is refused");
    loop {
        let response = call(&gateway, "GET", "/v1/conversations", &doomed, None).await;
        if response.status() == 401 {
            refused(response, 401, "invalid_api_key", "revoked key").await;
            break;
        }
        poll.tick().await;
    }
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &doomed,
        Some(chat_body("gpt-test", false)),
    )
    .await;
    refused(response, 401, "invalid_api_key", "revoked key: OpenAI").await;
    let (close, reason, _) = doomed_ws.closed().await;
    assert_eq!(
        (close, reason.as_str()),
        (4401, "invalid_api_key"),
        "a live connection on a revoked key"
    );
    let (close, reason) = ws_refused(&gateway, "", &doomed.headers()).await;
    assert_eq!((close, reason.as_str()), (4401, "invalid_api_key"));

    // Nothing changed: one upstream request, sam's two conversations, the
    // keys as they were (but the revoked one), the good key still good.
    assert_eq!(
        upstream.requests().len(),
        1,
        "a refused request reached the upstream"
    );
    let mut ids = conversation_ids(&gateway, &sam).await;
    ids.sort();
    assert_eq!(ids, expected);
    live.assert_usable(1).await;
    let keys = gateway.store().list_api_keys(Some("t-a")).await.unwrap();
    assert_eq!(keys.len(), 3);
    for row in keys {
        assert_eq!(row.revoked_at.is_some(), row.id == doomed_id, "{row:?}");
    }
}

#[tokio::test]
async fn another_users_conversations_and_replies_are_not_found_and_stay_intact() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let bob = Cred::bearer(&token("bob"));
    let by = bystander(&gateway, &upstream, &bob, owner(DEFAULT_TENANT, "bob")).await;
    let (conversation, generation, epoch) =
        (by.conversation.clone(), by.generation.clone(), by.epoch);
    let ada_token = token("ada");
    let ada = Cred::bearer(&ada_token);

    // The history API: 404 conversation_not_found, never 403.
    let send = json!({ "content": "mine now", "client_message_id": "ada-1" });
    for (method, path, body) in [
        ("GET", format!("/v1/conversations/{conversation}"), None),
        (
            "GET",
            format!("/v1/conversations/{conversation}/messages"),
            None,
        ),
        (
            "PATCH",
            format!("/v1/conversations/{conversation}"),
            Some(json!({ "title": "mine now" })),
        ),
        ("DELETE", format!("/v1/conversations/{conversation}"), None),
        (
            "POST",
            format!("/v1/conversations/{conversation}/messages"),
            Some(send),
        ),
    ] {
        let what = format!("ada: {method} {path}");
        refused(
            call(&gateway, method, &path, &ada, body).await,
            404,
            "conversation_not_found",
            &what,
        )
        .await;
    }
    // Lists and exports hold nothing of bob's, whatever header ada adds.
    assert!(conversation_ids(&gateway, &ada).await.is_empty());
    assert!(
        conversation_ids(&gateway, &ada.clone().with_user("bob"))
            .await
            .is_empty()
    );
    let export = expect_status(
        call(&gateway, "GET", "/v1/me/export", &ada, None).await,
        200,
        "export",
    )
    .await;
    assert_eq!(export["user"]["user_id"], "ada");
    assert_eq!(export["conversations"], json!([]));
    assert_eq!(export["messages"], json!([]));
    let active = expect_status(
        call(&gateway, "GET", "/v1/me/generations", &ada, None).await,
        200,
        "active",
    )
    .await;
    assert_eq!(active["data"], json!([]));

    // Bob's reply: cancel 404, resume 204 (HTTP); WS errors that say nothing.
    let path = format!("/v1/generations/{generation}/cancel");
    refused(
        call(&gateway, "POST", &path, &ada, None).await,
        404,
        "generation_not_found",
        "cancel",
    )
    .await;
    let path = format!("/v1/generations/{generation}/events");
    expect_status(
        call(&gateway, "GET", &path, &ada, None).await,
        204,
        "SSE resume",
    )
    .await;
    let path = format!(
        "/v1/generations/{generation}/events?access_token={ada_token}&from=0&epoch={epoch}"
    );
    expect_status(
        call(&gateway, "GET", &path, &Cred::none(), None).await,
        204,
        "SSE resume",
    )
    .await;
    let last_event_id = format!("{generation}:{epoch}:1");
    let path = format!("/v1/generations/{generation}/events");
    let response = call_with(
        &gateway,
        "GET",
        &path,
        &ada,
        None,
        &[("last-event-id", &last_event_id)],
    )
    .await;
    expect_status(response, 204, "SSE resume with Last-Event-ID").await;
    let mut ws = Client::open(&gateway, &ada).await;
    let answer = ws
        .ask(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0 }))
        .await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "reload_from_history", "{answer}");
    assert_eq!(answer["generation_id"], generation);
    let answer = ws
        .ask(json!({ "type": "cancel", "generation_id": generation }))
        .await;
    assert_eq!(answer["code"], "generation_not_found", "{answer}");
    let answer = ws
        .ask(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    assert_eq!(answer["code"], "conversation_not_found", "{answer}");
    let answer = ws
        .ask(json!({ "type": "send", "conversation_id": conversation, "content": "hi", "client_message_id": "ada-2" }))
        .await;
    assert_eq!(answer["code"], "conversation_not_found", "{answer}");
    ws.assert_usable(1).await;

    // Ada erasing herself erases nothing of bob's.
    let erased = expect_status(
        call(&gateway, "DELETE", "/v1/me", &ada, None).await,
        200,
        "erase",
    )
    .await;
    assert_eq!(erased["conversations"], 0);

    // Bob's data is intact and his reply streams on to its end.
    let body = expect_status(
        call(
            &gateway,
            "GET",
            &format!("/v1/conversations/{conversation}"),
            &bob,
            None,
        )
        .await,
        200,
        "bob's conversation",
    )
    .await;
    assert_eq!(body["title"], "bystander");
    let active = expect_status(
        call(&gateway, "GET", "/v1/me/generations", &bob, None).await,
        200,
        "active",
    )
    .await;
    assert_eq!(active["data"][0]["generation_id"], generation);
    by.finish(&gateway, &upstream).await;
    let kept = messages(&gateway, &bob, &conversation).await;
    let contents: Vec<&str> = kept
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["count to three", "one two three"]);
    assert_eq!(
        upstream.requests().len(),
        1,
        "a refused send reached the upstream"
    );
}

#[tokio::test]
async fn tenants_never_see_each_others_data_even_for_the_same_user_id() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let (key_a, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (key_b, _) = api_key(&gateway, "t-b", &["chat"]).await;
    let sam_a = Cred::key(&key_a, "sam");
    let sam_b = Cred::key(&key_b, "sam");
    // The same principal as sam_b, through a JWT naming the tenant.
    let sam_b_jwt = Cred::bearer(&token_in("t-b", "sam"));
    let by = bystander(&gateway, &upstream, &sam_b, owner("t-b", "sam")).await;
    let (theirs, generation, epoch) = (by.conversation.clone(), by.generation.clone(), by.epoch);
    let ours = create_conversation(&gateway, &sam_a, "a's").await;

    assert_eq!(conversation_ids(&gateway, &sam_a).await, vec![ours.clone()]);
    assert_eq!(
        conversation_ids(&gateway, &sam_b).await,
        vec![theirs.clone()]
    );
    assert_eq!(
        conversation_ids(&gateway, &sam_b_jwt).await,
        vec![theirs.clone()]
    );
    // A JWT of sam in the default tenant is yet another user.
    assert!(
        conversation_ids(&gateway, &Cred::bearer(&token("sam")))
            .await
            .is_empty()
    );

    for (method, path, body) in [
        ("GET", format!("/v1/conversations/{theirs}"), None),
        ("GET", format!("/v1/conversations/{theirs}/messages"), None),
        (
            "PATCH",
            format!("/v1/conversations/{theirs}"),
            Some(json!({ "title": "t-a's now" })),
        ),
        ("DELETE", format!("/v1/conversations/{theirs}"), None),
        (
            "POST",
            format!("/v1/conversations/{theirs}/messages"),
            Some(json!({ "content": "hi", "client_message_id": "a-1" })),
        ),
    ] {
        let what = format!("t-a/sam: {method} {path}");
        refused(
            call(&gateway, method, &path, &sam_a, body).await,
            404,
            "conversation_not_found",
            &what,
        )
        .await;
    }
    let export = expect_status(
        call(&gateway, "GET", "/v1/me/export", &sam_a, None).await,
        200,
        "export",
    )
    .await;
    let exported: Vec<&str> = export["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(exported, [ours.as_str()]);
    assert!(
        export["messages"].as_array().unwrap().is_empty(),
        "{export}"
    );
    let active = expect_status(
        call(&gateway, "GET", "/v1/me/generations", &sam_a, None).await,
        200,
        "active",
    )
    .await;
    assert_eq!(active["data"], json!([]));
    let path = format!("/v1/generations/{generation}/cancel");
    refused(
        call(&gateway, "POST", &path, &sam_a, None).await,
        404,
        "generation_not_found",
        "cancel",
    )
    .await;
    let path = format!("/v1/generations/{generation}/events?from=0&epoch={epoch}");
    expect_status(
        call(&gateway, "GET", &path, &sam_a, None).await,
        204,
        "SSE resume",
    )
    .await;
    let mut ws = Client::open(&gateway, &sam_a).await;
    assert_eq!(ws.user(), "sam");
    let answer = ws
        .ask(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0 }))
        .await;
    assert_eq!(answer["code"], "reload_from_history", "{answer}");
    let answer = ws
        .ask(json!({ "type": "cancel", "generation_id": generation }))
        .await;
    assert_eq!(answer["code"], "generation_not_found", "{answer}");
    let answer = ws
        .ask(json!({ "type": "subscribe", "conversation_id": theirs }))
        .await;
    assert_eq!(answer["code"], "conversation_not_found", "{answer}");
    ws.assert_usable(1).await;

    // t-b's data is intact and its reply streams on.
    let body = expect_status(
        call(
            &gateway,
            "GET",
            &format!("/v1/conversations/{theirs}"),
            &sam_b_jwt,
            None,
        )
        .await,
        200,
        "t-b's conversation",
    )
    .await;
    assert_eq!(body["title"], "bystander");
    by.finish(&gateway, &upstream).await;
    assert_eq!(stored(&gateway, "t-b", "sam").await.messages.len(), 2);
    assert!(stored(&gateway, "t-a", "sam").await.messages.is_empty());
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn erasing_a_user_leaves_the_same_user_id_of_another_tenant_streaming() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |_| {}).await;
    let (key_a, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (key_b, _) = api_key(&gateway, "t-b", &["chat"]).await;
    let sam_a = Cred::key(&key_a, "sam");
    let sam_b = Cred::key(&key_b, "sam");
    let by = bystander(&gateway, &upstream, &sam_b, owner("t-b", "sam")).await;
    let theirs = by.conversation.clone();
    let ours = create_conversation(&gateway, &sam_a, "a's").await;

    // t-a's sam erases everything of theirs: t-a's data only.
    let erased = expect_status(
        call(&gateway, "DELETE", "/v1/me", &sam_a, None).await,
        200,
        "erase",
    )
    .await;
    assert_eq!(erased["conversations"], 1, "{erased}");
    assert!(conversation_ids(&gateway, &sam_a).await.is_empty());
    let path = format!("/v1/conversations/{ours}");
    refused(
        call(&gateway, "GET", &path, &sam_a, None).await,
        404,
        "conversation_not_found",
        "erased",
    )
    .await;

    // t-b's sam (same user id, other tenant) keeps everything, live state
    // included: the reply streams on, on the same connection.
    assert_eq!(
        conversation_ids(&gateway, &sam_b).await,
        vec![theirs.clone()]
    );
    by.finish(&gateway, &upstream).await;
    let kept = messages(&gateway, &sam_b, &theirs).await;
    assert_eq!(kept.len(), 2);
}

#[tokio::test]
async fn widget_sessions_need_a_known_key_and_an_allowed_origin_and_cors_follows_the_allowlist() {
    let Some(secrets) = secrets(
        "widget_sessions_need_a_known_key_and_an_allowed_origin_and_cors_follows_the_allowlist",
        2,
    )
    .await
    else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| with_secrets(config, &secrets)).await;
    let session = |origin: Option<&str>, key: &str| {
        let cred = Cred {
            origin: origin.map(str::to_owned),
            ..Cred::default()
        };
        let body = json!({ "key": key });
        let gateway = &gateway;
        async move { call(gateway, "POST", "/v1/widget/session", &cred, Some(body)).await }
    };

    let response = session(Some(GOOD_ORIGIN), WIDGET).await;
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some(GOOD_ORIGIN)
    );
    let body = expect_status(response, 200, "a session from the widget's origin").await;
    assert_eq!(body["object"], "visitor_session");
    let visitor_token = body["token"].as_str().unwrap().to_owned();
    let visitor = body["visitor_id"].as_str().unwrap().to_owned();
    assert!(visitor.starts_with("visitor:"), "{body}");
    assert!(body["expires_at"].as_u64().unwrap() > now());

    for origin in [
        Some(BAD_ORIGIN),
        None,
        Some("https://good.example.evil"),
        Some("http://good.example"),
        Some("https://good.example:8443"),
        Some("null"),
    ] {
        let response = session(origin, WIDGET).await;
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{origin:?}"
        );
        refused(
            response,
            403,
            "origin_not_allowed",
            &format!("session from {origin:?}"),
        )
        .await;
    }
    for origin in [Some(GOOD_ORIGIN), Some(BAD_ORIGIN), None] {
        let response = session(origin, "pk_test_unknown").await;
        refused(
            response,
            401,
            "invalid_widget_key",
            &format!("unknown key from {origin:?}"),
        )
        .await;
    }
    // A session asked for with the current token keeps the visitor.
    let renewed = Cred::visitor(&visitor_token, Some(GOOD_ORIGIN));
    let response = call(
        &gateway,
        "POST",
        "/v1/widget/session",
        &renewed,
        Some(json!({ "key": WIDGET })),
    )
    .await;
    let body = expect_status(response, 200, "renewal").await;
    assert_eq!(body["visitor_id"], visitor);

    // CORS preflights: the widget's origin only.
    let preflight = |origin: &'static str, path: &'static str| {
        let gateway = &gateway;
        async move {
            let headers = [
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ];
            call_with(
                gateway,
                "OPTIONS",
                path,
                &Cred::none().with_origin(origin),
                None,
                &headers,
            )
            .await
        }
    };
    for path in [
        "/v1/widget/session",
        "/v1/conversations",
        "/v1/generations/x/events",
    ] {
        let response = preflight(GOOD_ORIGIN, path).await;
        assert_eq!(response.status(), 204, "{path}");
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"], GOOD_ORIGIN,
            "{path}"
        );
        let methods = headers["access-control-allow-methods"].to_str().unwrap();
        assert!(methods.contains("POST"), "{methods}");
        let allowed = headers["access-control-allow-headers"].to_str().unwrap();
        assert!(allowed.contains("authorization"), "{allowed}");
        let response = preflight(BAD_ORIGIN, path).await;
        assert_eq!(response.status(), 403, "{path}");
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{path}"
        );
        assert!(
            response
                .headers()
                .get("access-control-allow-methods")
                .is_none(),
            "{path}"
        );
    }
    // A plain request from another origin gets no CORS grant either (the
    // browser keeps the answer from the page), even with a valid JWT.
    let jwt_from_elsewhere = Cred::bearer(&token("ada")).with_origin(BAD_ORIGIN);
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &jwt_from_elsewhere,
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // Nothing was created by any of it.
    let visitor_cred = Cred::visitor(&visitor_token, Some(GOOD_ORIGIN));
    assert!(conversation_ids(&gateway, &visitor_cred).await.is_empty());
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn visitor_tokens_work_only_from_an_allowed_origin_on_http_sse_and_websocket() {
    let Some(secrets) = secrets(
        "visitor_tokens_work_only_from_an_allowed_origin_on_http_sse_and_websocket",
        3,
    )
    .await
    else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| with_secrets(config, &secrets)).await;
    let response = call(
        &gateway,
        "POST",
        "/v1/widget/session",
        &Cred::none().with_origin(GOOD_ORIGIN),
        Some(json!({ "key": WIDGET })),
    )
    .await;
    let session = expect_status(response, 200, "session").await;
    let token = session["token"].as_str().unwrap().to_owned();
    let visitor = session["visitor_id"].as_str().unwrap().to_owned();
    let good = Cred::visitor(&token, Some(GOOD_ORIGIN));
    let bad = Cred::visitor(&token, Some(BAD_ORIGIN));
    let no_origin = Cred::visitor(&token, None);

    // HTTP.
    let response = call(
        &gateway,
        "POST",
        "/v1/conversations",
        &good,
        Some(json!({ "title": "widget chat" })),
    )
    .await;
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some(GOOD_ORIGIN)
    );
    let conversation = expect_status(response, 201, "create").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        conversation_ids(&gateway, &good).await,
        vec![conversation.clone()]
    );
    for (what, cred) in [("a bad origin", &bad), ("no origin", &no_origin)] {
        let response = call(&gateway, "GET", "/v1/conversations", cred, None).await;
        refused(response, 403, "origin_not_allowed", what).await;
        let response = call(
            &gateway,
            "POST",
            "/v1/conversations",
            cred,
            Some(json!({ "title": "x" })),
        )
        .await;
        refused(response, 403, "origin_not_allowed", what).await;
        let path = format!("/v1/conversations/{conversation}");
        refused(
            call(&gateway, "DELETE", &path, cred, None).await,
            403,
            "origin_not_allowed",
            what,
        )
        .await;
        let response = call(
            &gateway,
            "POST",
            "/v1/chat/completions",
            cred,
            Some(chat_body("gpt-test", true)),
        )
        .await;
        refused(response, 403, "origin_not_allowed", what).await;
    }

    // SSE with `?access_token=` (EventSource): send, then resume.
    upstream.push(openai_stream(&["Hi ", "there"], Duration::ZERO));
    let origin = Cred::none().with_origin(GOOD_ORIGIN);
    let path = format!("/v1/conversations/{conversation}/messages?access_token={token}");
    let send = json!({ "content": "hello", "client_message_id": "v-1" });
    let response = call(&gateway, "POST", &path, &origin, Some(send.clone())).await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&timeout(WAIT, response.text()).await.unwrap().unwrap());
    assert_eq!(events[0].0, "ack", "{events:?}");
    let generation = events[0].1["generation_id"].as_str().unwrap().to_owned();
    assert_eq!(delta_text(&events), "Hi there");
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    let resume = format!("/v1/generations/{generation}/events?access_token={token}&from=0");
    let response = call(&gateway, "GET", &resume, &origin, None).await;
    assert_eq!(response.status(), 200);
    let replay = sse_events(&timeout(WAIT, response.text()).await.unwrap().unwrap());
    assert_eq!(delta_text(&replay), "Hi there");
    for (what, cred) in [
        ("a bad origin", Cred::none().with_origin(BAD_ORIGIN)),
        ("no origin", Cred::none()),
    ] {
        let response = call(&gateway, "GET", &resume, &cred, None).await;
        refused(
            response,
            403,
            "origin_not_allowed",
            &format!("SSE resume from {what}"),
        )
        .await;
        let response = call(&gateway, "POST", &path, &cred, Some(send.clone())).await;
        refused(
            response,
            403,
            "origin_not_allowed",
            &format!("SSE send from {what}"),
        )
        .await;
        let cancel = format!("/v1/generations/{generation}/cancel?access_token={token}");
        let response = call(&gateway, "POST", &cancel, &cred, None).await;
        refused(
            response,
            403,
            "origin_not_allowed",
            &format!("SSE cancel from {what}"),
        )
        .await;
    }

    // WebSocket with `?access_token=`.
    let query = format!("?access_token={token}");
    let mut ws = Client::open_at(&gateway, &query, &[("origin", GOOD_ORIGIN.to_owned())]).await;
    assert_eq!(ws.user(), visitor);
    let answer = ws
        .ask(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    assert_eq!(answer["type"], "presence", "{answer}");
    for headers in [vec![("origin", BAD_ORIGIN.to_owned())], vec![]] {
        let (close, reason) = ws_refused(&gateway, &query, &headers).await;
        assert_eq!(
            (close, reason.as_str()),
            (4403, "origin_not_allowed"),
            "{headers:?}"
        );
    }

    // Nothing changed: the visitor's one conversation, its two messages,
    // in the widget's tenant; one upstream request.
    ws.assert_usable(1).await;
    assert_eq!(
        conversation_ids(&gateway, &good).await,
        vec![conversation.clone()]
    );
    assert_eq!(messages(&gateway, &good, &conversation).await.len(), 2);
    let export = stored(&gateway, WIDGET_TENANT, &visitor).await;
    assert_eq!(export.conversations.len(), 1);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_revoked_visitor_token_cannot_be_renewed_into_the_same_visitor() {
    let Some(secrets) = secrets(
        "a_revoked_visitor_token_cannot_be_renewed_into_the_same_visitor",
        4,
    )
    .await
    else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| with_secrets(config, &secrets)).await;
    let ask = |cred: Cred| {
        let gateway = &gateway;
        async move {
            let response = call(
                gateway,
                "POST",
                "/v1/widget/session",
                &cred,
                Some(json!({ "key": WIDGET })),
            )
            .await;
            expect_status(response, 200, "session").await
        }
    };
    let session = ask(Cred::none().with_origin(GOOD_ORIGIN)).await;
    let token = session["token"].as_str().unwrap().to_owned();
    let visitor = session["visitor_id"].as_str().unwrap().to_owned();
    let good = Cred::visitor(&token, Some(GOOD_ORIGIN));
    let conversation = create_conversation(&gateway, &good, "private").await;

    // Revoke the token (store and this process).
    let claims = payload_of(&token);
    let jti = claims["jti"].as_str().unwrap();
    let exp_ms = i64::try_from(claims["exp"].as_u64().unwrap() * 1000).unwrap();
    gateway.store().revoke_token(jti, exp_ms).await.unwrap();
    gateway.gateway.auth.note_revoked(jti);
    let response = call(&gateway, "GET", "/v1/conversations", &good, None).await;
    refused(response, 401, "token_revoked", "the revoked visitor token").await;

    // Renewing with it may give a fresh anonymous session, never the
    // revoked visitor's identity (and with it the visitor's data).
    let renewed = ask(good.clone()).await;
    assert_ne!(
        renewed["visitor_id"], visitor,
        "a revoked visitor token was renewed into the same visitor"
    );
    let fresh = Cred::visitor(renewed["token"].as_str().unwrap(), Some(GOOD_ORIGIN));
    let path = format!("/v1/conversations/{conversation}");
    refused(
        call(&gateway, "GET", &path, &fresh, None).await,
        404,
        "conversation_not_found",
        "renewed",
    )
    .await;
}

#[tokio::test]
async fn a_websocket_closes_4401_when_its_token_expires_and_others_stay_open() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| config.auth.leeway_secs = 0).await;
    let mut short = claims("ada");
    let expires = now() + 2;
    short["exp"] = json!(expires);
    let short = rs256(&short);
    let mut doomed = Client::open(&gateway, &Cred::bearer(&short)).await;
    let mut lasting = Client::open(&gateway, &Cred::bearer(&token("ada"))).await;

    let (close, reason, before) = doomed.closed().await;
    assert_eq!(
        (close, reason.as_str()),
        (4401, "token_expired"),
        "{before:?}"
    );
    assert!(now() >= expires, "closed before the token expired");
    // The same token is refused over HTTP too (the connection closes at
    // `exp` itself, as RFC 7519 says; the JWT library still accepts a token
    // during the second of its `exp`, so this may take a moment). The
    // other connection stays open.
    let poll = Poll::new("the expired token is refused over HTTP");
    loop {
        let response = call(
            &gateway,
            "GET",
            "/v1/conversations",
            &Cred::bearer(&short),
            None,
        )
        .await;
        if response.status() == 401 {
            refused(response, 401, "token_expired", "the expired token").await;
            break;
        }
        poll.tick().await;
    }
    lasting.assert_usable(1).await;
}

#[tokio::test]
async fn a_token_with_a_fractional_exp_still_expires_on_a_websocket() {
    // RFC 7519 NumericDate may be fractional, and the JWT library accepts
    // it (rounded); the connection must still end when the token does.
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| config.auth.leeway_secs = 0).await;
    let mut short = claims("ada");
    short["exp"] = json!(now() as f64 + 2.5);
    let short = rs256(&short);
    let mut doomed = Client::open(&gateway, &Cred::bearer(&short)).await;
    assert_eq!(doomed.user(), "ada");
    let (close, reason, _) = doomed.closed().await;
    assert_eq!((close, reason.as_str()), (4401, "token_expired"));
}

#[tokio::test]
async fn an_auth_frame_with_a_fresh_token_keeps_the_connection_open_past_the_old_expiry() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| config.auth.leeway_secs = 0).await;
    let mut short = claims("ada");
    let expires = now() + 3;
    short["exp"] = json!(expires);
    let mut client = Client::open(&gateway, &Cred::bearer(&rs256(&short))).await;

    let fresh = claims("ada");
    let answer = client
        .ask(json!({ "type": "auth", "token": rs256(&fresh) }))
        .await;
    assert_eq!(
        answer,
        json!({ "type": "authenticated", "expires_at": fresh["exp"] })
    );
    // A bad token in a later `auth` frame is an error; the fresh one stays.
    let mut expired = claims("ada");
    expired["exp"] = json!(now() - 60);
    let answer = client
        .ask(json!({ "type": "auth", "token": rs256(&expired) }))
        .await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "token_expired", "{answer}");
    let answer = client
        .ask(json!({ "type": "auth", "token": "garbage" }))
        .await;
    assert_eq!(answer["code"], "invalid_credentials", "{answer}");

    // Past the first token's expiry the connection is still open.
    let poll = Poll::new("the first token has expired");
    while now() <= expires + 1 {
        poll.tick().await;
    }
    client.assert_usable(1).await;
    let conversation =
        create_conversation(&gateway, &Cred::bearer(&token("ada")), "still ada").await;
    let answer = client
        .ask(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    assert_eq!(answer["type"], "presence", "{answer}");
    assert_eq!(answer["users"], json!(["ada"]));
}

#[tokio::test]
async fn an_auth_frame_with_another_users_token_is_forbidden_and_the_connection_stays_its_users() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| config.auth.leeway_secs = 0).await;
    let ada = Cred::bearer(&token("ada"));
    let bob = Cred::bearer(&token("bob"));
    let adas = create_conversation(&gateway, &ada, "ada's").await;
    let bobs = create_conversation(&gateway, &bob, "bob's").await;

    let mut client = Client::open(&gateway, &ada).await;
    for (what, token) in [
        ("bob", token("bob")),
        ("ada of another tenant", token_in("t-x", "ada")),
    ] {
        let answer = client.ask(json!({ "type": "auth", "token": token })).await;
        assert_eq!(answer["type"], "error", "{what}: {answer}");
        assert_eq!(answer["code"], "forbidden", "{what}: {answer}");
    }
    // Still ada: her conversation, not bob's.
    let answer = client
        .ask(json!({ "type": "subscribe", "conversation_id": bobs }))
        .await;
    assert_eq!(answer["code"], "conversation_not_found", "{answer}");
    let answer = client
        .ask(json!({ "type": "subscribe", "conversation_id": adas }))
        .await;
    assert_eq!(answer["type"], "presence", "{answer}");
    assert_eq!(answer["users"], json!(["ada"]));

    // And still on ada's credential: a short-lived connection offered bob's
    // long-lived token closes when ada's token expires.
    let mut short = claims("ada");
    short["exp"] = json!(now() + 4);
    let mut expiring = Client::open(&gateway, &Cred::bearer(&rs256(&short))).await;
    let answer = expiring
        .ask(json!({ "type": "auth", "token": token("bob") }))
        .await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    let (close, reason, _) = expiring.closed().await;
    assert_eq!((close, reason.as_str()), (4401, "token_expired"));

    // Bob's conversation is untouched.
    let body = expect_status(
        call(
            &gateway,
            "GET",
            &format!("/v1/conversations/{bobs}"),
            &bob,
            None,
        )
        .await,
        200,
        "bob's conversation",
    )
    .await;
    assert_eq!(body["title"], "bob's");
    client.assert_usable(1).await;
}

#[tokio::test]
async fn responses_carry_security_headers() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&["ok"], Duration::ZERO));
    let gateway = gateway_with(&upstream, |_| {}).await;
    let ada = Cred::bearer(&token("ada"));
    let unknown = uuid::Uuid::now_v7();
    let preflight = [("access-control-request-method", "POST")];
    let cases: Vec<(&str, reqwest::Response)> = vec![
        (
            "healthz",
            call(&gateway, "GET", "/healthz", &Cred::none(), None).await,
        ),
        (
            "401",
            call(&gateway, "GET", "/v1/conversations", &Cred::none(), None).await,
        ),
        (
            "200",
            call(&gateway, "GET", "/v1/conversations", &ada, None).await,
        ),
        (
            "no route",
            call(&gateway, "GET", "/v1/nope", &ada, None).await,
        ),
        (
            "204",
            call(
                &gateway,
                "GET",
                &format!("/v1/generations/{unknown}/events"),
                &ada,
                None,
            )
            .await,
        ),
        (
            "preflight",
            call_with(
                &gateway,
                "OPTIONS",
                "/v1/conversations",
                &Cred::none().with_origin(BAD_ORIGIN),
                None,
                &preflight,
            )
            .await,
        ),
        (
            "stream",
            call(
                &gateway,
                "POST",
                "/v1/chat/completions",
                &ada,
                Some(chat_body("gpt-test", true)),
            )
            .await,
        ),
        (
            "page",
            call(&gateway, "GET", "/", &Cred::none(), None).await,
        ),
    ];
    for (what, response) in cases {
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(
            headers["referrer-policy"], "strict-origin-when-cross-origin",
            "{what}"
        );
        let policy = headers["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        if what == "page" {
            assert!(policy.contains("default-src 'self'"), "{what}: {policy}");
        } else {
            assert!(policy.contains("default-src 'none'"), "{what}: {policy}");
            assert!(
                policy.contains("frame-ancestors 'none'"),
                "{what}: {policy}"
            );
        }
        drop(timeout(WAIT, response.bytes()).await);
    }
}

/// Runs the real binary with `args`, without the machine's `SPILLWAY_*`
/// variables (but `SPILLWAY_TEST_*`).
async fn cli(args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("SPILLWAY_") && !name.starts_with("SPILLWAY_TEST_") {
            command.env_remove(&key);
        }
    }
    timeout(
        Duration::from_secs(60),
        command.args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("the CLI ends")
    .expect("run the CLI")
}

#[tokio::test]
async fn cli_keys_and_revoke_token_work_against_a_gateway_on_the_same_database() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spillway.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[store]
data_dir = "{data}"

[auth]
enabled = true
key_cache_secs = 0
recheck_secs = 1

[auth.jwt]
public_key_files = ["{rsa}"]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[auth.visitors]
secret_env = "{UNSET_VISITOR_ENV}"
"#,
            data = dir.path().join("data").display(),
            rsa = fixture_path("rsa_public.pem"),
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();

    // keys create: the key once on stdout, the id on stderr.
    let out = cli(&[
        "keys", "create", "--tenant", "acme", "--name", "ci", "--config", config,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sk_spl_") && !key.contains('\n'), "{key:?}");
    let (id, secret) = key["sk_spl_".len()..].split_once('_').unwrap();
    assert!(stderr.contains(id), "{stderr}");
    assert!(
        !stderr.contains(secret),
        "the secret only on stdout: {stderr}"
    );

    let mut process = Process::serve_isolated(&["--config", config], &[]).await;
    let url = |path: &str| process.url(path);
    let get = |token: String, user: Option<&'static str>| {
        let url = url("/v1/conversations");
        async move {
            let mut request = client().get(url).bearer_auth(token);
            if let Some(user) = user {
                request = request.header("x-spillway-user", user);
            }
            timeout(WAIT, request.send()).await.unwrap().unwrap()
        }
    };
    // The key authenticates against the gateway on the same database.
    let response = client()
        .post(url("/v1/conversations"))
        .bearer_auth(&key)
        .header("x-spillway-user", "sam")
        .json(&json!({ "title": "from the CLI's key" }))
        .send()
        .await
        .unwrap();
    let conversation = expect_status(response, 201, "create with the CLI's key").await;
    let body = expect_status(get(key.clone(), Some("sam")).await, 200, "list").await;
    assert_eq!(body["data"][0]["id"], conversation["id"]);
    let response = client()
        .post(url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("mock", false))
        .send()
        .await
        .unwrap();
    expect_status(response, 200, "the OpenAI endpoint with the CLI's key").await;

    // keys list: the key, never its secret (nor its hash).
    let out = cli(&["keys", "list", "--config", config]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout).unwrap();
    let line = listed
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{listed}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[..4], [id, "acme", "active", "chat"], "{line}");
    assert!(!listed.contains(secret), "{listed}");
    assert!(!listed.contains(&spillway::auth::hash(secret)), "{listed}");
    let out = cli(&["keys", "list", "--tenant", "other", "--config", config]).await;
    assert!(String::from_utf8(out.stdout).unwrap().trim().is_empty());

    // keys revoke: the gateway refuses the key from then on.
    let out = cli(&["keys", "revoke", id, "--config", config]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let poll = Poll::new("the revoked key is refused");
    loop {
        let response = get(key.clone(), Some("sam")).await;
        if response.status() == 401 {
            refused(response, 401, "invalid_api_key", "the revoked key").await;
            break;
        }
        poll.tick().await;
    }
    let out = cli(&["keys", "list", "--config", config]).await;
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(id) && l.contains("\trevoked\t")),
        "{listed}"
    );
    let out = cli(&["keys", "revoke", "0000000000000000", "--config", config]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key"));

    // revoke-token: a JWT refused once the gateway reloads its list.
    let doomed_claims = claims("ada");
    let jti = doomed_claims["jti"].as_str().unwrap();
    let exp = doomed_claims["exp"].to_string();
    let doomed = rs256(&doomed_claims);
    let other = token("ada");
    expect_status(get(doomed.clone(), None).await, 200, "before revoke-token").await;
    let out = cli(&[
        "revoke-token",
        "--config",
        config,
        jti,
        "--expires-at",
        &exp,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let poll = Poll::new("the revoked token is refused");
    loop {
        let response = get(doomed.clone(), None).await;
        if response.status() == 401 {
            refused(response, 401, "token_revoked", "the revoked token").await;
            break;
        }
        poll.tick().await;
    }
    // Nothing else changed: ada's other token works; sam's conversation is
    // still there (seen through a new key of the tenant).
    expect_status(get(other, None).await, 200, "another token of the user").await;
    let out = cli(&["keys", "create", "--tenant", "acme", "--config", config]).await;
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let body = expect_status(get(second, Some("sam")).await, 200, "list with a new key").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], conversation["id"]);
    process.kill().await;
}

// ------------------------------------------------------------ JWKS URL

/// What the test's JWKS endpoint answers.
#[derive(Debug, Clone)]
struct JwksAnswer {
    status: u16,
    body: String,
    cache_control: Option<String>,
}

impl JwksAnswer {
    /// A 200 with a key set of `keys`.
    fn keys(keys: &[Value]) -> Self {
        Self {
            status: 200,
            body: json!({ "keys": keys }).to_string(),
            cache_control: None,
        }
    }

    /// A bare `status` with an empty JSON body.
    fn status(status: u16) -> Self {
        Self {
            status,
            body: "{}".into(),
            cache_control: None,
        }
    }

    fn cache_control(mut self, value: &str) -> Self {
        self.cache_control = Some(value.to_owned());
        self
    }
}

#[derive(Debug)]
struct JwksState {
    answer: std::sync::Mutex<JwksAnswer>,
    /// Requests received (fetches by the gateway).
    fetches: std::sync::atomic::AtomicUsize,
}

/// The identity provider's JWKS endpoint, on a real loopback socket:
/// answers every request with the current [`JwksAnswer`], counts them, and
/// can go down (its port closed, its connections cut).
#[derive(Debug)]
struct JwksServer {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<JwksState>,
    /// The accept loop; it owns every connection's task.
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(answer: JwksAnswer) -> Self {
        use axum::extract::State;
        use std::sync::Arc;

        async fn serve(State(state): State<Arc<JwksState>>) -> axum::response::Response {
            state
                .fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = state.answer.lock().unwrap().clone();
            let mut response = axum::response::Response::builder()
                .status(answer.status)
                .header("content-type", "application/json");
            if let Some(value) = &answer.cache_control {
                response = response.header("cache-control", value);
            }
            response.body(axum::body::Body::from(answer.body)).unwrap()
        }

        let state = Arc::new(JwksState {
            answer: std::sync::Mutex::new(answer),
            fetches: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropped with this task: aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { return };
                        let service = hyper_util::service::TowerToHyperService::new(app.clone());
                        connections.spawn(async move {
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn answer(&self, answer: JwksAnswer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    fn fetches(&self) -> usize {
        self.state.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the port and cuts every connection.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The fixture public key `name` (`rsa_public`, `ec_other_public`, …) as a
/// JWK with `kid` (and `use: sig`, `alg` as given).
fn jwk(name: &str, kid: &str, alg: Option<&str>) -> Value {
    let text = std::fs::read_to_string(fixture_path(&format!("{name}.jwk.json"))).unwrap();
    let mut jwk: Value = serde_json::from_str(&text).unwrap();
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    jwk
}

/// A token of `user` signed with the fixture private key `pem` (RS256 for
/// `rsa_*`, ES256 for `ec_*`), naming `kid`.
fn signed_with(pem: &str, kid: Option<&str>, user: &str) -> String {
    let bytes = fixture_bytes(pem);
    let (algorithm, key) = if pem.starts_with("rsa") {
        (Algorithm::RS256, EncodingKey::from_rsa_pem(&bytes).unwrap())
    } else {
        (Algorithm::ES256, EncodingKey::from_ec_pem(&bytes).unwrap())
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims(user), &key).unwrap()
}

/// A gateway whose only RS256 / ES256 keys come from `jwks`' URL, with
/// `jwks_cache_secs` and `jwks_refetch_secs` as given.
async fn jwks_gateway(
    upstream: &FakeUpstream,
    jwks: &JwksServer,
    cache_secs: u64,
    refetch_secs: u64,
) -> TestGateway {
    let url = jwks.url();
    gateway_with(upstream, move |config| {
        let jwt = &mut config.auth.jwt;
        jwt.public_key_files = Vec::new();
        jwt.jwks_url = url;
        jwt.jwks_cache_secs = cache_secs;
        jwt.jwks_refetch_secs = refetch_secs;
    })
    .await
}

/// `GET /v1/conversations` with `token`: its status (the body read).
async fn list_status(gateway: &TestGateway, token: &str) -> u16 {
    let response = call(
        gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(token),
        None,
    )
    .await;
    let status = response.status().as_u16();
    drop(timeout(WAIT, response.bytes()).await);
    status
}

/// Tokens signed with a key the JWKS URL serves verify (RS256 and ES256,
/// by `kid`), fetched once at start; a token naming a served kid but
/// signed with another key does not. When the provider rotates (serves a
/// new kid, drops the old), the first token with the new kid is accepted
/// after one refetch, and the old kid is refused from then on without
/// another fetch.
#[tokio::test]
async fn jwks_url_keys_verify_tokens_and_a_rotated_in_kid_is_fetched_at_once() {
    let upstream = FakeUpstream::start().await;
    let jwks = JwksServer::start(JwksAnswer::keys(&[
        jwk("rsa_public", "k1", Some("RS256")),
        jwk("ec_public", "e1", None),
    ]))
    .await;
    let gateway = jwks_gateway(&upstream, &jwks, 300, 30).await;
    assert_eq!(jwks.fetches(), 1, "fetched at start");

    let k1 = signed_with("rsa_private.pem", Some("k1"), "ada");
    let e1 = signed_with("ec_private.pem", Some("e1"), "ada");
    assert_eq!(list_status(&gateway, &k1).await, 200, "RS256 with k1");
    assert_eq!(list_status(&gateway, &e1).await, 200, "ES256 with e1");
    let forged = signed_with("rsa_other_private.pem", Some("k1"), "ada");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&forged),
        None,
    )
    .await;
    refused(
        response,
        401,
        "invalid_signature",
        "k1 named, another key signed",
    )
    .await;
    assert_eq!(jwks.fetches(), 1, "known kids need no fetch");

    // The provider rotates: k2 in, k1 out.
    jwks.answer(JwksAnswer::keys(&[jwk(
        "rsa_other_public",
        "k2",
        Some("RS256"),
    )]));
    let k2 = signed_with("rsa_other_private.pem", Some("k2"), "ada");
    assert_eq!(list_status(&gateway, &k2).await, 200, "the rotated-in kid");
    assert_eq!(jwks.fetches(), 2, "one refetch for the unknown kid");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&k1),
        None,
    )
    .await;
    refused(response, 401, "invalid_signature", "the rotated-out kid").await;
    assert_eq!(list_status(&gateway, &k2).await, 200, "k2 still");
    assert_eq!(jwks.fetches(), 2, "no refetch within the window");
}

/// A flood of tokens with made-up kids, with the JWKS server up: each is
/// refused 401 `invalid_signature`, and together they start one fetch
/// (within `jwks_refetch_secs`), not one each; the served key keeps
/// working.
#[tokio::test]
async fn unknown_kids_are_refused_401_and_start_at_most_one_fetch_per_window() {
    let upstream = FakeUpstream::start().await;
    let jwks = JwksServer::start(JwksAnswer::keys(&[jwk("rsa_public", "k1", None)])).await;
    let gateway = jwks_gateway(&upstream, &jwks, 300, 3_600).await;
    assert_eq!(jwks.fetches(), 1, "fetched at start");

    let flood = (0..20).map(|i| {
        let token = signed_with("rsa_private.pem", Some(&format!("made-up-{i}")), "ada");
        let gateway = &gateway;
        async move {
            let response = call(
                gateway,
                "GET",
                "/v1/conversations",
                &Cred::bearer(&token),
                None,
            )
            .await;
            refused(response, 401, "invalid_signature", "a made-up kid").await;
        }
    });
    futures_util::future::join_all(flood).await;
    assert_eq!(jwks.fetches(), 2, "one fetch for the whole flood");
    let more = signed_with("rsa_private.pem", Some("made-up-again"), "ada");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&more),
        None,
    )
    .await;
    refused(response, 401, "invalid_signature", "a made-up kid later").await;
    assert_eq!(jwks.fetches(), 2, "still within the window");

    let k1 = signed_with("rsa_private.pem", Some("k1"), "ada");
    assert_eq!(list_status(&gateway, &k1).await, 200, "the served key");
    assert_eq!(jwks.fetches(), 2);
}

/// The JWKS server failing (500s while the cache keeps expiring) and then
/// gone (port closed): the last good keys keep verifying, and an unknown
/// kid is 401, not 503 (there is a key set; it lacks the kid).
#[tokio::test]
async fn cached_jwks_keys_keep_working_while_the_jwks_server_fails_or_is_gone() {
    let upstream = FakeUpstream::start().await;
    let jwks = JwksServer::start(JwksAnswer::keys(&[jwk("rsa_public", "k1", None)])).await;
    // Due for a refresh every second, so refreshes fail while we watch.
    let gateway = jwks_gateway(&upstream, &jwks, 1, 1).await;
    let k1 = signed_with("rsa_private.pem", Some("k1"), "ada");
    assert_eq!(list_status(&gateway, &k1).await, 200);

    jwks.answer(JwksAnswer::status(500));
    let failing_since = jwks.fetches();
    let poll = Poll::new("two failed refreshes");
    while jwks.fetches() < failing_since + 2 {
        poll.tick().await;
    }
    assert_eq!(
        list_status(&gateway, &k1).await,
        200,
        "after failed refreshes"
    );

    jwks.stop().await;
    let unknown = signed_with("rsa_private.pem", Some("k9"), "ada");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&unknown),
        None,
    )
    .await;
    refused(
        response,
        401,
        "invalid_signature",
        "an unknown kid, server gone",
    )
    .await;
    assert_eq!(
        list_status(&gateway, &k1).await,
        200,
        "with the server gone"
    );
}

/// Until a first fetch succeeds, a token only the URL's keys could verify
/// is refused 503 `auth_unavailable` (retryable), and the gateway starts
/// all the same. The first answer here is a valid key set padded past
/// 256 KiB: refused for its size alone. Once the provider serves the set
/// normally, the same token is accepted.
#[tokio::test]
async fn tokens_are_503_auth_unavailable_until_the_jwks_is_first_fetched() {
    let upstream = FakeUpstream::start().await;
    let padded = json!({
        "keys": [jwk("rsa_public", "k1", None)],
        "padding": "x".repeat(spillway::auth::jwks::JWKS_MAX_BYTES),
    });
    let jwks = JwksServer::start(JwksAnswer {
        status: 200,
        body: padded.to_string(),
        cache_control: None,
    })
    .await;
    let gateway = jwks_gateway(&upstream, &jwks, 300, 1).await;
    assert_eq!(jwks.fetches(), 1, "tried at start");
    let k1 = signed_with("rsa_private.pem", Some("k1"), "ada");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&k1),
        None,
    )
    .await;
    let error = refused(response, 503, "auth_unavailable", "no key set yet").await;
    assert_eq!(error["type"], "server_error");

    jwks.answer(JwksAnswer::keys(&[jwk("rsa_public", "k1", None)]));
    let poll = Poll::new("the token is accepted once the keys are fetched");
    loop {
        match list_status(&gateway, &k1).await {
            200 => break,
            503 => poll.tick().await,
            other => panic!("{other}: only 503 until the keys are fetched, then 200"),
        }
    }
}

/// A key the provider removes stops verifying once the cached set
/// expires and is refreshed in the background (a token with a known kid
/// never starts a fetch): after `jwks_cache_secs` (here 1 s) without
/// `Cache-Control`, and after the answer's shorter `max-age` (1 s, with
/// `jwks_cache_secs` 300: were it ignored, k1 would verify for 5 minutes
/// and the poll time out). The kid that stays keeps verifying.
#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_once_the_cached_set_expires() {
    let upstream = FakeUpstream::start().await;
    let both = [jwk("rsa_public", "k1", None), jwk("ec_public", "e1", None)];
    let k1 = signed_with("rsa_private.pem", Some("k1"), "ada");
    let e1 = signed_with("ec_private.pem", Some("e1"), "ada");
    for (cache_secs, cache_control) in [(1, None), (300, Some("public, max-age=1"))] {
        let with_header = |answer: JwksAnswer| match cache_control {
            Some(value) => answer.cache_control(value),
            None => answer,
        };
        let jwks = JwksServer::start(with_header(JwksAnswer::keys(&both))).await;
        // A known kid never starts a fetch: only the expiry can drop k1.
        let gateway = jwks_gateway(&upstream, &jwks, cache_secs, 1).await;
        assert_eq!(list_status(&gateway, &k1).await, 200, "{cache_control:?}");

        jwks.answer(with_header(JwksAnswer::keys(&[jwk(
            "ec_public",
            "e1",
            None,
        )])));
        let poll = Poll::new("the removed key is refused");
        while list_status(&gateway, &k1).await == 200 {
            poll.tick().await;
        }
        let response = call(
            &gateway,
            "GET",
            "/v1/conversations",
            &Cred::bearer(&k1),
            None,
        )
        .await;
        refused(response, 401, "invalid_signature", "the removed key").await;
        assert_eq!(list_status(&gateway, &e1).await, 200, "the key that stays");
        gateway.shutdown().await;
        jwks.stop().await;
    }
}

/// Two PEM keys of one algorithm are both trusted (the documented way to
/// rotate a PEM key: add the new file, then remove the old): a token
/// without `kid` signed with either verifies, one signed with neither does
/// not.
#[tokio::test]
async fn every_pem_key_of_an_algorithm_is_tried_so_a_new_one_can_be_added_before_rotating() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway_with(&upstream, |config| {
        config.auth.jwt.public_key_files = vec![
            fixture_path("rsa_public.pem"),
            fixture_path("rsa_other_public.pem"),
        ];
    })
    .await;
    for pem in ["rsa_private.pem", "rsa_other_private.pem"] {
        let token = signed_with(pem, None, "ada");
        assert_eq!(list_status(&gateway, &token).await, 200, "{pem}");
    }
    let ec = signed_with("ec_private.pem", None, "ada");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&ec),
        None,
    )
    .await;
    refused(
        response,
        401,
        "invalid_signature",
        "no ES256 key configured",
    )
    .await;
}

/// `auth.jwt.jwks_url` is checked at config load: https anywhere, http
/// only for a loopback host; anything else is a typed error naming the
/// key.
#[test]
fn a_jwks_url_over_plain_http_is_refused_at_config_load_unless_loopback() {
    let load = |url: &str| {
        Config::parse(
            &format!("[auth.jwt]\njwks_url = \"{url}\"\n"),
            std::path::Path::new("test.toml"),
            Vec::new(),
        )
    };
    for url in [
        "https://idp.example/.well-known/jwks.json",
        "http://127.0.0.1:8081/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ] {
        let config = load(url).unwrap_or_else(|err| panic!("{url}: {err}"));
        assert_eq!(config.auth.jwt.jwks_url, url);
    }
    for url in [
        "http://idp.example/.well-known/jwks.json",
        "http://10.0.0.5/jwks",
        "ftp://idp.example/jwks",
        "not a url",
        "https://user:secret@idp.example/jwks",
    ] {
        match load(url) {
            Err(spillway::config::ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "auth.jwt.jwks_url", "{url}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    let err = load("http://idp.example/jwks").unwrap_err().to_string();
    assert!(
        err.contains("auth.jwt.jwks_url") && err.contains("https"),
        "{err}"
    );
    let err = load("https://user:secret@idp.example/jwks")
        .unwrap_err()
        .to_string();
    assert!(
        !err.contains("secret"),
        "credentials are not repeated: {err}"
    );
}

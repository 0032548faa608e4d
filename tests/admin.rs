//! The admin API over real sockets: an in-process gateway on a real port
//! with a real SQLite file, a fake upstream, HTTP and WebSocket clients.
//!
//! Who may call (401 without a credential, 403 with any but an admin API
//! key; development mode), and each endpoint against real state: breaker
//! outcomes of real upstream calls, live WebSockets and generations, usage
//! stored by real replies (and the row cap), revocations that take effect
//! at once though keys are cached and the revocation list is not reloaded,
//! and a disconnect that closes one user's WebSockets with 4409 while
//! everyone else's stay open. The usage query itself runs against SQLite
//! and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use spillway::config::Config;
use spillway::store::{
    ConversationRow, MessageRow, MessageStatus, Record, Store, UsageQuery, UsageTotal, now_ms,
    utc_day,
};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Upper bound on every single wait.
const WAIT: Duration = Duration::from_secs(10);

/// One day in Unix milliseconds.
const DAY: i64 = 86_400_000;

/// The node id every gateway here runs as.
const NODE: &str = "admin-test-node";

/// An environment variable no test sets: the visitor secret (the default
/// name might be set on the machine).
const UNSET_VISITOR_ENV: &str = "SPILLWAY_TEST_UNSET_VISITOR_SECRET";

/// The close code and reason of an operator's disconnect.
const CLOSED_BY_OPERATOR: (u16, &str) = (4409, "closed by operator");

// -------------------------------------------------------------- gateway

/// A gateway in front of `upstream` (model `gpt-test` → `fake`/`fake-model`,
/// priced at 1 and 2 USD per million prompt and completion tokens) with
/// credentials required: API keys, and RS256 user JWTs checked with the
/// fixture key. Verified API keys are cached for an hour and the
/// revocation list is reloaded hourly, so only the admin API's own
/// invalidation can make a revocation take effect at once.
fn auth_config(upstream: &FakeUpstream) -> Config {
    let mut config = test_config(&format!(
        "{}\n[cluster]\nnode_id = \"{NODE}\"\n\n\
         [[pricing]]\nmodel = \"fake-model\"\ninput_per_million = 1.0\noutput_per_million = 2.0\n",
        openai_config(upstream)
    ));
    let auth = &mut config.auth;
    auth.enabled = true;
    auth.key_cache_secs = 3600;
    auth.recheck_secs = 3600;
    auth.jwt.public_key_files = vec![auth_fixture("rsa_public.pem")];
    auth.visitors.secret_env = UNSET_VISITOR_ENV.into();
    config
}

/// The same gateway in development mode (`auth.enabled = false`).
fn development_config(upstream: &FakeUpstream) -> Config {
    let mut config = auth_config(upstream);
    config.auth.enabled = false;
    config
}

fn auth_fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A new API key of `tenant` with `scopes`, stored; returns the key and
/// its id.
async fn api_key(gateway: &TestGateway, tenant: &str, scopes: &[&str]) -> (String, String) {
    let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
    let (key, row) = spillway::auth::new_key(tenant, "test", &scopes, "").unwrap();
    gateway.store().create_api_key(&row).await.unwrap();
    (key, row.id)
}

/// A user JWT (RS256, the fixture key) for `user` of `tenant` with `jti`,
/// valid for an hour; and its `exp`.
fn user_token(user: &str, tenant: &str, jti: &str) -> (String, u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = now + 3600;
    let claims = json!({ "sub": user, "tenant": tenant, "iat": now, "exp": exp, "jti": jti });
    let pem = std::fs::read(auth_fixture("rsa_private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    (token, exp)
}

// ----------------------------------------------------------------- HTTP

/// What a request presents.
#[derive(Debug, Clone, Default)]
struct Cred {
    /// `Authorization: Bearer …`
    bearer: Option<String>,
    /// `X-Spillway-User`
    user: Option<String>,
}

impl Cred {
    fn none() -> Self {
        Self::default()
    }

    fn bearer(token: &str) -> Self {
        Self {
            bearer: Some(token.to_owned()),
            user: None,
        }
    }

    fn key(key: &str, user: &str) -> Self {
        Self {
            bearer: Some(key.to_owned()),
            user: Some(user.to_owned()),
        }
    }

    fn user(user: &str) -> Self {
        Self {
            bearer: None,
            user: Some(user.to_owned()),
        }
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(token) = &self.bearer {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        if let Some(user) = &self.user {
            headers.push(("x-spillway-user", user.clone()));
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
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client().request(method, gateway.url(path));
    for (name, value) in cred.headers() {
        request = request.header(name, value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    timeout(WAIT, request.send())
        .await
        .unwrap_or_else(|_| panic!("{path} answers within {WAIT:?}"))
        .expect("the gateway answers")
}

/// Asserts `response` is the typed JSON error `status` / `code`; returns
/// the `error` object.
async fn refused(response: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    let got = response.status().as_u16();
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
    error.clone()
}

/// Asserts `response` is a 200 with a JSON body; returns it.
async fn ok_json(response: reqwest::Response, what: &str) -> Value {
    let status = response.status().as_u16();
    let text = timeout(WAIT, response.text()).await.unwrap().unwrap();
    assert_eq!(status, 200, "{what}: status (body {text})");
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{what}: JSON ({err}): {text}"))
}

/// `GET path` as `admin`, expecting 200.
async fn admin_get(gateway: &TestGateway, admin: &str, path: &str) -> Value {
    ok_json(
        call(gateway, "GET", path, &Cred::bearer(admin), None).await,
        path,
    )
    .await
}

/// `POST path` as `admin` with `body`, expecting 200.
async fn admin_post(gateway: &TestGateway, admin: &str, path: &str, body: Option<Value>) -> Value {
    ok_json(
        call(gateway, "POST", path, &Cred::bearer(admin), body).await,
        path,
    )
    .await
}

/// Creates a conversation as `cred` and sends one message in it through
/// the native SSE endpoint, reading the reply to its `done`.
async fn send_message(gateway: &TestGateway, cred: &Cred, content: &str) {
    let created = call(gateway, "POST", "/v1/conversations", cred, Some(json!({}))).await;
    assert_eq!(created.status().as_u16(), 201, "create a conversation");
    let created: Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let response = call(
        gateway,
        "POST",
        &format!("/v1/conversations/{id}/messages"),
        cred,
        Some(json!({ "content": content, "client_message_id": content })),
    )
    .await;
    assert_eq!(response.status().as_u16(), 200, "send a message");
    let text = timeout(WAIT, response.text()).await.unwrap().unwrap();
    assert!(text.contains("event: done"), "the reply ends: {text}");
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// "one ", a stall until released, then "two".
fn stalling_stream() -> Script {
    let mut steps = vec![
        openai_text_chunk("one "),
        Step::AwaitRelease,
        openai_text_chunk("two"),
    ];
    steps.extend(openai_finish(7, 2));
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

// ------------------------------------------------------------ WebSocket

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A native-protocol client past its `hello`.
struct Client {
    ws: Ws,
}

impl Client {
    /// Connects to `/v1/ws` with `cred` and reads `hello`.
    async fn open(gateway: &TestGateway, cred: &Cred) -> Self {
        let mut request = format!("ws://{}/v1/ws", gateway.addr)
            .into_client_request()
            .unwrap();
        let headers = request.headers_mut();
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("spillway.v1"),
        );
        for (name, value) in cred.headers() {
            headers.insert(name, HeaderValue::from_str(&value).unwrap());
        }
        let (ws, response) = timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake within the timeout")
            .expect("handshake succeeds");
        assert_eq!(response.status().as_u16(), 101);
        let mut client = Self { ws };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        client
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

    /// Reads until the server closes: its close code and reason.
    async fn closed(&mut self) -> (u16, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            let message = timeout(deadline - Instant::now(), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("the server closes within {WAIT:?}"));
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => panic!("closed without a code"),
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("socket failed before a close frame: {err}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Sends `ping` and asserts the very next frame is its `pong`: the
    /// connection is open and served.
    async fn assert_usable(&mut self, id: u64) {
        timeout(
            WAIT,
            self.ws.send(Message::text(
                json!({ "type": "ping", "id": id }).to_string(),
            )),
        )
        .await
        .expect("write within the timeout")
        .expect("write succeeds");
        let pong = self.recv().await;
        assert_eq!(pong, json!({ "type": "pong", "id": id }));
    }
}

/// `GET /admin/v1/instance`'s live WebSocket count, polled until it is
/// `n`.
async fn wait_websockets(gateway: &TestGateway, admin: &str, n: u64) {
    let poll = Poll::new("the instance counts the expected WebSockets");
    loop {
        let instance = admin_get(gateway, admin, "/admin/v1/instance").await;
        if instance["websockets"] == n {
            return;
        }
        poll.tick().await;
    }
}

// ================================================================ tests

#[tokio::test]
async fn every_endpoint_refuses_no_credential_with_401_and_non_admin_credentials_with_403() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (chat, chat_id) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;
    let (jwt, exp) = user_token("ada", "t-a", "jti-kept");
    // Lives through every refused disconnect.
    let mut ada = Client::open(&gateway, &Cred::key(&chat, "ada")).await;
    // Well formed, never stored.
    let (stranger, _) = spillway::auth::new_key("t-a", "stranger", &["admin".into()], "").unwrap();

    let endpoints: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/admin/v1/providers".into(), None),
        ("GET", "/admin/v1/instance".into(), None),
        ("GET", "/admin/v1/usage".into(), None),
        ("POST", format!("/admin/v1/keys/{chat_id}/revoke"), None),
        (
            "POST",
            "/admin/v1/tokens/revoke".into(),
            Some(json!({ "jti": "jti-kept", "expires_at": exp })),
        ),
        ("POST", "/admin/v1/users/t-a/ada/disconnect".into(), None),
    ];
    for (method, path, body) in &endpoints {
        let what = |who: &str| format!("{method} {path} {who}");
        let cases = [
            (
                Cred::none(),
                401,
                "missing_credentials",
                "without a credential",
            ),
            (
                Cred::user("ada"),
                401,
                "missing_credentials",
                "with only a user header",
            ),
            (
                Cred::bearer("nonsense"),
                401,
                "invalid_credentials",
                "with a malformed token",
            ),
            (
                Cred::bearer(&stranger),
                401,
                "invalid_api_key",
                "with an unknown key",
            ),
            (Cred::key(&chat, "ada"), 403, "forbidden", "with a chat key"),
            (Cred::bearer(&jwt), 403, "forbidden", "with a user JWT"),
        ];
        for (cred, status, code, who) in cases {
            let response = call(&gateway, method, path, &cred, body.clone()).await;
            refused(response, status, code, &what(who)).await;
        }
    }

    // The refusals changed nothing: the chat key and the JWT still work,
    // nothing was revoked, ada's WebSocket is still served.
    for cred in [Cred::key(&chat, "ada"), Cred::bearer(&jwt)] {
        let response = call(&gateway, "GET", "/v1/conversations", &cred, None).await;
        ok_json(response, "the refused credentials still chat").await;
    }
    assert!(gateway.store().revoked_tokens().await.unwrap().is_empty());
    let row = gateway
        .store()
        .get_api_key(&chat_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.revoked_at, None);
    ada.assert_usable(1).await;
    // And the admin key is let in.
    let instance = admin_get(&gateway, &admin, "/admin/v1/instance").await;
    assert_eq!(instance["websockets"], 1);
}

#[tokio::test]
async fn providers_show_each_target_with_its_breaker_state_and_window_outcomes() {
    let upstream = FakeUpstream::start().await;
    let mut config = auth_config(&upstream);
    // One attempt per request; the breaker opens at one failure in two.
    config.routing.max_attempts = 1;
    config.breaker.min_requests = 2;
    config.breaker.failure_ratio = 0.5;
    config.breaker.cooldown_secs = 3600;
    let gateway = TestGateway::start_with(config).await;
    let (chat, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;

    let before = admin_get(&gateway, &admin, "/admin/v1/providers").await;
    assert_eq!(
        before,
        json!({
            "window_secs": 30,
            "models": [{
                "model": "gpt-test",
                "targets": [{
                    "provider": "fake",
                    "upstream_model": "fake-model",
                    "tier": 0,
                    "weight": 1,
                    "breaker": "closed",
                    "recent": { "outcomes": 0, "failures": 0, "error_rate": 0.0 },
                }],
            }],
        })
    );

    // One reply that succeeds, one the upstream fails with a 500.
    let cred = Cred::key(&chat, "ada");
    upstream.push(openai_stream(&["fine"], Duration::ZERO));
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &cred,
        Some(chat_body("gpt-test", false)),
    )
    .await;
    ok_json(response, "a completion").await;
    upstream.push(Script::json(
        500,
        json!({ "error": { "message": "boom", "type": "server_error" } }),
    ));
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &cred,
        Some(chat_body("gpt-test", false)),
    )
    .await;
    assert!(
        response.status().is_server_error(),
        "the upstream failure reaches the client: {}",
        response.status()
    );

    let poll = Poll::new("both outcomes are in the breaker's window");
    let target = loop {
        let providers = admin_get(&gateway, &admin, "/admin/v1/providers").await;
        let target = providers["models"][0]["targets"][0].clone();
        if target["recent"]["outcomes"] == 2 {
            break target;
        }
        poll.tick().await;
    };
    assert_eq!(target["breaker"], "open", "{target}");
    assert_eq!(
        target["recent"],
        json!({ "outcomes": 2, "failures": 1, "error_rate": 0.5 })
    );
}

#[tokio::test]
async fn instance_reports_its_ids_websockets_generations_and_bus() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (chat, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;

    let idle = admin_get(&gateway, &admin, "/admin/v1/instance").await;
    assert_eq!(idle["node"], NODE);
    let instance = idle["instance"].as_str().unwrap();
    assert!(instance.starts_with(&format!("{NODE}@")), "{idle}");
    assert_eq!(idle["websockets"], 0);
    assert_eq!(
        idle["generations"],
        json!({ "running": 0, "resumable": 0, "held": 0 })
    );
    assert_eq!(
        idle["bus"],
        json!({ "mode": "local", "ok": true, "instances": 1, "followers": 0 })
    );

    let _ada = Client::open(&gateway, &Cred::key(&chat, "ada")).await;
    let mut bob = Client::open(&gateway, &Cred::key(&chat, "bob")).await;
    // A reply held at its stall: running.
    upstream.push(stalling_stream());
    let response = call(
        &gateway,
        "POST",
        "/v1/chat/completions",
        &Cred::key(&chat, "cy"),
        Some(chat_body("gpt-test", true)),
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = SseReader::new(response);
    reader.until_content().await;
    let busy = admin_get(&gateway, &admin, "/admin/v1/instance").await;
    assert_eq!(busy["websockets"], 2, "{busy}");
    assert_eq!(busy["generations"]["running"], 1, "{busy}");
    assert_eq!(busy["instance"], instance, "the same instance");

    // Released, the reply ends: no longer running.
    let releaser = release_until_stopped(&upstream);
    let rest = reader.collect().await;
    releaser.abort();
    assert!(rest.contains(&ClientEvent::Done), "{rest:?}");
    let poll = Poll::new("the reply is no longer running");
    loop {
        let now = admin_get(&gateway, &admin, "/admin/v1/instance").await;
        let generations = &now["generations"];
        if generations["running"] == 0 {
            assert_eq!(
                generations["held"].as_u64().unwrap(),
                generations["resumable"].as_u64().unwrap(),
                "what is held and not running is resumable: {now}"
            );
            break;
        }
        poll.tick().await;
    }

    // A client that leaves is no longer counted.
    bob.ws.close(None).await.unwrap();
    wait_websockets(&gateway, &admin, 1).await;
}

#[tokio::test]
async fn usage_sums_tokens_requests_and_cost_per_day_tenant_provider_and_model() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["hi ", "there"], Duration::ZERO));
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (chat_a, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (chat_b, _) = api_key(&gateway, "t-b", &["chat"]).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;

    // Three replies in tenant t-a (two users), one in t-b; each 7 prompt
    // and 2 completion tokens.
    send_message(&gateway, &Cred::key(&chat_a, "ada"), "a1").await;
    send_message(&gateway, &Cred::key(&chat_a, "ada"), "a2").await;
    send_message(&gateway, &Cred::key(&chat_a, "bob"), "b1").await;
    send_message(&gateway, &Cred::key(&chat_b, "cy"), "c1").await;

    let poll = Poll::new("all four replies are counted");
    let all = loop {
        gateway.persister().flushed().await;
        let all = admin_get(&gateway, &admin, "/admin/v1/usage").await;
        let counted: i64 = all["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["requests"].as_i64().unwrap())
            .sum();
        if counted == 4 {
            break all;
        }
        poll.tick().await;
    };
    // The days are the store's own (per user), summed over users here.
    let day = gateway.store().usage_days("t-a").await.unwrap()[0]
        .day
        .clone();
    let row = |tenant: &str, requests: i64| {
        let prompt = 7 * requests;
        let completion = 2 * requests;
        json!({
            "day": day,
            "tenant": tenant,
            "provider": "fake",
            "model": "fake-model",
            "requests": requests,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost_usd": (prompt as f64 * 1.0 + completion as f64 * 2.0) / 1e6,
        })
    };
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{all}");
    for (got, want) in data.iter().zip([row("t-a", 3), row("t-b", 1)]) {
        for field in ["day", "tenant", "provider", "model", "requests"] {
            assert_eq!(got[field], want[field], "{field}: {all}");
        }
        for field in ["prompt_tokens", "completion_tokens"] {
            assert_eq!(got[field], want[field], "{field}: {all}");
        }
        let cost = got["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - want["cost_usd"].as_f64().unwrap()).abs() < 1e-12,
            "cost: {all}"
        );
    }
    assert_eq!(all["tenant"], Value::Null);
    assert_eq!(all["truncated"], false);
    assert_eq!(all["max_rows"], 10_000);
    // By default the last 31 days, today included.
    let today = utc_day(now_ms());
    assert!(all["to"] == today || all["to"] == day, "{all}");
    let to = all["to"].as_str().unwrap();
    assert!(all["from"].as_str().unwrap() < to);

    // One tenant.
    let one = admin_get(&gateway, &admin, "/admin/v1/usage?tenant=t-b").await;
    assert_eq!(one["tenant"], "t-b");
    let data = one["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{one}");
    assert_eq!(data[0]["tenant"], "t-b");
    assert_eq!(data[0]["requests"], 1);
    let none = admin_get(&gateway, &admin, "/admin/v1/usage?tenant=nobody").await;
    assert_eq!(none["data"], json!([]));
    // The days bound it: the day itself, and the days after it.
    let exact = admin_get(
        &gateway,
        &admin,
        &format!("/admin/v1/usage?from={day}&to={day}"),
    )
    .await;
    assert_eq!(exact["data"].as_array().unwrap().len(), 2, "{exact}");
    assert_eq!(
        (exact["from"].clone(), exact["to"].clone()),
        (json!(day), json!(day))
    );
    let later = utc_day(now_ms() + 2 * DAY);
    let after = admin_get(
        &gateway,
        &admin,
        &format!("/admin/v1/usage?from={later}&to={later}"),
    )
    .await;
    assert_eq!(after["data"], json!([]), "{after}");

    // Bad parameters are typed 400s naming the parameter.
    for (query, code, param) in [
        ("from=2025-02-30", "invalid_value", Some("from")),
        ("to=2025-13-01", "invalid_value", Some("to")),
        ("from=yesterday", "invalid_value", Some("from")),
        (
            "from=2025-03-02&to=2025-03-01",
            "invalid_value",
            Some("from"),
        ),
        (
            "from=2020-01-01&to=2025-01-01",
            "invalid_value",
            Some("from"),
        ),
        ("tenant=", "invalid_value", Some("tenant")),
        ("bogus=1", "invalid_query", None),
    ] {
        let path = format!("/admin/v1/usage?{query}");
        let response = call(&gateway, "GET", &path, &Cred::bearer(&admin), None).await;
        let error = refused(response, 400, code, &path).await;
        assert_eq!(error["param"], json!(param), "{path}: {error}");
    }
}

#[tokio::test]
async fn usage_answers_at_most_ten_thousand_rows_and_says_when_it_cut() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;
    let at = now_ms();
    let day = utc_day(at);
    let conversation = conversation("bulk", "ada", at);
    // 10 000 (day, tenant, provider, model) groups: one per model.
    let mut records = vec![Record::Conversation(conversation.clone())];
    records.extend(
        (0..10_000).map(|i| Record::Message(reply(&conversation, &format!("m{i:05}"), at))),
    );
    gateway.store().write_batch(&records).await.unwrap();
    let path = format!("/admin/v1/usage?from={day}&to={day}");
    let full = admin_get(&gateway, &admin, &path).await;
    assert_eq!(full["data"].as_array().unwrap().len(), 10_000);
    assert_eq!(full["truncated"], false, "exactly the cap is not cut");

    // One more group: cut at the cap, first rows kept (by model here).
    let extra = reply(&conversation, "m10000", at);
    gateway
        .store()
        .write_batch(&[Record::Message(extra)])
        .await
        .unwrap();
    let cut = admin_get(&gateway, &admin, &path).await;
    let data = cut["data"].as_array().unwrap();
    assert_eq!(data.len(), 10_000);
    assert_eq!(cut["truncated"], true);
    assert_eq!(data[0]["model"], "m00000");
    assert_eq!(data[9_999]["model"], "m09999");
}

#[tokio::test]
async fn revoking_a_key_refuses_it_at_once_though_verified_keys_are_cached() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (doomed, doomed_id) = api_key(&gateway, "t-a", &["chat"]).await;
    let (kept, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin, admin_id) = api_key(&gateway, "ops", &["admin"]).await;
    let cred = Cred::key(&doomed, "ada");
    // Verified once: now cached for an hour.
    let response = call(&gateway, "GET", "/v1/conversations", &cred, None).await;
    ok_json(response, "the key works").await;

    let path = format!("/admin/v1/keys/{doomed_id}/revoke");
    let revoked = admin_post(&gateway, &admin, &path, None).await;
    assert_eq!(revoked["id"], doomed_id.as_str());
    assert_eq!(revoked["tenant"], "t-a");
    let revoked_at = revoked["revoked_at"].as_i64().expect("a revocation time");
    let row = gateway
        .store()
        .get_api_key(&doomed_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.revoked_at, Some(revoked_at));

    for (method, path) in [
        ("GET", "/v1/conversations"),
        ("POST", "/v1/chat/completions"),
    ] {
        let body = (method == "POST").then(|| chat_body("gpt-test", false));
        let response = call(&gateway, method, path, &cred, body).await;
        refused(
            response,
            401,
            "invalid_api_key",
            &format!("revoked: {path}"),
        )
        .await;
    }
    // Another key of the tenant is untouched.
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::key(&kept, "ada"),
        None,
    )
    .await;
    ok_json(response, "the other key works").await;
    // Again: the first revocation time stays.
    let again = admin_post(&gateway, &admin, &path, None).await;
    assert_eq!(again["revoked_at"], revoked_at);
    // No such key: 404.
    let response = call(
        &gateway,
        "POST",
        "/admin/v1/keys/0123456789abcdef/revoke",
        &Cred::bearer(&admin),
        None,
    )
    .await;
    refused(response, 404, "api_key_not_found", "an unknown key").await;
    // An operator can revoke their own key; it stops working at once too.
    admin_post(
        &gateway,
        &admin,
        &format!("/admin/v1/keys/{admin_id}/revoke"),
        None,
    )
    .await;
    let response = call(
        &gateway,
        "GET",
        "/admin/v1/instance",
        &Cred::bearer(&admin),
        None,
    )
    .await;
    refused(response, 401, "invalid_api_key", "the revoked admin key").await;
}

#[tokio::test]
async fn revoking_a_token_refuses_its_jwt_at_once_and_stores_the_revocation() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;
    let (doomed, exp) = user_token("ada", "t-a", "jti-doomed");
    let (kept, _) = user_token("ada", "t-a", "jti-kept");
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&doomed),
        None,
    )
    .await;
    ok_json(response, "the token works").await;

    let revoked = admin_post(
        &gateway,
        &admin,
        "/admin/v1/tokens/revoke",
        Some(json!({ "jti": "jti-doomed", "expires_at": exp })),
    )
    .await;
    assert_eq!(revoked, json!({ "jti": "jti-doomed", "expires_at": exp }));
    // At once here, though the list is reloaded only hourly.
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&doomed),
        None,
    )
    .await;
    refused(response, 401, "token_revoked", "the revoked token").await;
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::bearer(&kept),
        None,
    )
    .await;
    ok_json(response, "another token of the user works").await;
    // Stored for the other instances (and restarts).
    assert_eq!(
        gateway.store().revoked_tokens().await.unwrap(),
        vec!["jti-doomed".to_owned()]
    );

    for (body, code, param) in [
        (json!({ "expires_at": exp }), "invalid_type", None),
        (
            json!({ "jti": "", "expires_at": exp }),
            "invalid_value",
            Some("jti"),
        ),
        (
            json!({ "jti": "x", "expires_at": "soon" }),
            "invalid_type",
            Some("expires_at"),
        ),
        (
            json!({ "jti": "x", "expires_at": exp, "extra": 1 }),
            "invalid_type",
            Some("extra"),
        ),
    ] {
        let response = call(
            &gateway,
            "POST",
            "/admin/v1/tokens/revoke",
            &Cred::bearer(&admin),
            Some(body.clone()),
        )
        .await;
        let error = refused(response, 400, code, &body.to_string()).await;
        assert_eq!(error["param"], json!(param), "{body}: {error}");
    }
    assert_eq!(gateway.store().revoked_tokens().await.unwrap().len(), 1);
}

#[tokio::test]
async fn disconnect_closes_that_users_websockets_with_4409_and_no_one_elses() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(auth_config(&upstream)).await;
    let (chat_a, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (chat_b, _) = api_key(&gateway, "t-b", &["chat"]).await;
    let (admin, _) = api_key(&gateway, "ops", &["admin"]).await;
    let mut ada_phone = Client::open(&gateway, &Cred::key(&chat_a, "ada")).await;
    let mut ada_laptop = Client::open(&gateway, &Cred::key(&chat_a, "ada")).await;
    let mut bob = Client::open(&gateway, &Cred::key(&chat_a, "bob")).await;
    // Same user id, another tenant: another user.
    let mut other_ada = Client::open(&gateway, &Cred::key(&chat_b, "ada")).await;

    let answer = admin_post(&gateway, &admin, "/admin/v1/users/t-a/ada/disconnect", None).await;
    assert_eq!(answer, json!({ "closed": 2, "close_code": 4409 }));
    for client in [&mut ada_phone, &mut ada_laptop] {
        let (code, reason) = client.closed().await;
        assert_eq!((code, reason.as_str()), CLOSED_BY_OPERATOR);
    }
    bob.assert_usable(1).await;
    other_ada.assert_usable(2).await;
    wait_websockets(&gateway, &admin, 2).await;

    // Nobody left to close: 0, and the others still stay.
    for path in [
        "/admin/v1/users/t-a/ada/disconnect",
        "/admin/v1/users/t-a/nobody/disconnect",
    ] {
        let answer = admin_post(&gateway, &admin, path, None).await;
        assert_eq!(answer["closed"], 0, "{path}");
    }
    bob.assert_usable(3).await;
    other_ada.assert_usable(4).await;
    // The user may connect again (a disconnect is not a ban).
    let mut back = Client::open(&gateway, &Cred::key(&chat_a, "ada")).await;
    back.assert_usable(5).await;
}

#[tokio::test]
async fn development_mode_still_wants_an_admin_key_checked_against_the_store() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(development_config(&upstream)).await;
    let (chat, _) = api_key(&gateway, "t-a", &["chat"]).await;
    let (admin, admin_id) = api_key(&gateway, "ops", &["admin"]).await;
    // Anyone can chat by naming themselves…
    let response = call(
        &gateway,
        "GET",
        "/v1/conversations",
        &Cred::user("ada"),
        None,
    )
    .await;
    ok_json(response, "development mode chats").await;

    // …but not administer.
    for (cred, status, code, what) in [
        (Cred::none(), 401, "missing_credentials", "nothing"),
        (
            Cred::user("ada"),
            401,
            "missing_credentials",
            "a user header",
        ),
        (
            Cred::bearer("nonsense"),
            401,
            "invalid_api_key",
            "a bad token",
        ),
        (Cred::key(&chat, "ada"), 403, "forbidden", "a chat key"),
    ] {
        let response = call(&gateway, "GET", "/admin/v1/instance", &cred, None).await;
        refused(response, status, code, what).await;
    }
    let instance = admin_get(&gateway, &admin, "/admin/v1/instance").await;
    assert_eq!(instance["node"], NODE);
    // Checked uncached: revoked, refused at once.
    admin_post(
        &gateway,
        &admin,
        &format!("/admin/v1/keys/{admin_id}/revoke"),
        None,
    )
    .await;
    let response = call(
        &gateway,
        "GET",
        "/admin/v1/instance",
        &Cred::bearer(&admin),
        None,
    )
    .await;
    refused(response, 401, "invalid_api_key", "the revoked admin key").await;
}

#[tokio::test]
async fn development_mode_without_a_store_has_no_admin_api() {
    let upstream = FakeUpstream::start().await;
    let mut config = development_config(&upstream);
    config.store.enabled = false;
    let gateway = TestGateway::start_with(config).await;
    let (key, _) = spillway::auth::new_key("ops", "x", &["admin".into()], "").unwrap();
    for (method, path) in [
        ("GET", "/admin/v1/instance"),
        ("GET", "/admin/v1/usage"),
        ("POST", "/admin/v1/users/default/ada/disconnect"),
    ] {
        for cred in [Cred::user("ada"), Cred::bearer(&key), Cred::none()] {
            let response = call(&gateway, method, path, &cred, None).await;
            refused(response, 404, "not_found", path).await;
        }
    }
    // The rest of the gateway serves.
    let response = call(&gateway, "GET", "/v1/models", &Cred::user("ada"), None).await;
    ok_json(response, "models").await;
}

// ------------------------------------------------- the store's usage query

fn conversation(tenant: &str, user: &str, created_at: i64) -> ConversationRow {
    ConversationRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: tenant.to_owned(),
        user_id: user.to_owned(),
        title: None,
        metadata: json!({}),
        created_at,
        updated_at: created_at,
    }
}

/// An assistant reply by `model` (provider `p`): 10 prompt and 1
/// completion tokens, 0.5 USD.
fn reply(conversation: &ConversationRow, model: &str, created_at: i64) -> MessageRow {
    MessageRow {
        id: uuid::Uuid::now_v7().to_string(),
        conversation_id: conversation.id.clone(),
        tenant_id: conversation.tenant_id.clone(),
        user_id: conversation.user_id.clone(),
        role: "assistant".to_owned(),
        content: "x".to_owned(),
        status: MessageStatus::Complete,
        model: Some(model.to_owned()),
        provider: Some("p".to_owned()),
        prompt_tokens: Some(10),
        completion_tokens: Some(1),
        cost_usd: Some(0.5),
        usage_estimated: false,
        client_message_id: None,
        generation_id: Some(uuid::Uuid::now_v7().to_string()),
        created_at,
    }
}

/// Two tenants, three users, three days: the totals sum users, and the
/// days, the tenant and the limit bound them.
async fn usage_totals_sum_users_within_days_tenant_and_limit(store: Arc<dyn Store>) {
    // 2026-01-01 00:00 UTC.
    const T0: i64 = 1_767_225_600_000;
    let ada = conversation("acme", "ada", T0);
    let bob = conversation("acme", "bob", T0);
    let zed = conversation("zeta", "zed", T0);
    let mut user_message = reply(&ada, "m1", T0 + 5);
    user_message.role = "user".to_owned();
    let records = vec![
        Record::Conversation(ada.clone()),
        Record::Conversation(bob.clone()),
        Record::Conversation(zed.clone()),
        Record::Message(reply(&ada, "m1", T0 + 1)),
        Record::Message(reply(&ada, "m1", T0 + 2)),
        Record::Message(reply(&bob, "m1", T0 + 3)),
        Record::Message(reply(&ada, "m2", T0 + 4)),
        Record::Message(user_message),
        Record::Message(reply(&zed, "m1", T0 + 6)),
        Record::Message(reply(&ada, "m1", T0 + DAY)),
        Record::Message(reply(&bob, "m1", T0 + 2 * DAY)),
    ];
    store.write_batch(&records).await.unwrap();
    let total = |day: &str, tenant: &str, model: &str, n: i64| UsageTotal {
        day: day.to_owned(),
        tenant_id: tenant.to_owned(),
        provider: "p".to_owned(),
        model: model.to_owned(),
        messages: n,
        prompt_tokens: 10 * n,
        completion_tokens: n,
        cost_usd: 0.5 * n as f64,
    };
    let query = |tenant: Option<&str>, from: &str, to: &str, limit: u32| UsageQuery {
        tenant_id: tenant.map(str::to_owned),
        from: from.to_owned(),
        to: to.to_owned(),
        limit,
    };
    let all = store
        .usage_totals(&query(None, "2026-01-01", "2026-01-03", 100))
        .await
        .unwrap();
    assert_eq!(
        all,
        [
            total("2026-01-01", "acme", "m1", 3),
            total("2026-01-01", "acme", "m2", 1),
            total("2026-01-01", "zeta", "m1", 1),
            total("2026-01-02", "acme", "m1", 1),
            total("2026-01-03", "acme", "m1", 1),
        ]
    );
    let acme_day_two = store
        .usage_totals(&query(Some("acme"), "2026-01-02", "2026-01-02", 100))
        .await
        .unwrap();
    assert_eq!(acme_day_two, [total("2026-01-02", "acme", "m1", 1)]);
    let zeta = store
        .usage_totals(&query(Some("zeta"), "2025-12-01", "2026-12-31", 100))
        .await
        .unwrap();
    assert_eq!(zeta, [total("2026-01-01", "zeta", "m1", 1)]);
    let first_two = store
        .usage_totals(&query(None, "2026-01-01", "2026-01-03", 2))
        .await
        .unwrap();
    assert_eq!(first_two, all[..2]);
    let before = store
        .usage_totals(&query(None, "2025-01-01", "2025-12-31", 100))
        .await
        .unwrap();
    assert!(before.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::db::sqlite_store(dir.path()).await;
    usage_totals_sum_users_within_days_tenant_and_limit(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_on_postgres() {
    let (store, _db) = common::db::postgres_store().await;
    usage_totals_sum_users_within_days_tenant_and_limit(store).await;
}

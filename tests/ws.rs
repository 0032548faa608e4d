//! The native protocol over a real WebSocket (`GET /v1/ws`, `spillway.v1`),
//! driven by tokio-tungstenite against the scriptable fake upstream: the
//! handshake, send → ack → reply → deltas → usage → done, idempotent sends,
//! multi-device delivery with presence and typing, cancel, byte-exact resume
//! over many disconnect points, resume errors, grace expiry, bad input and
//! the per-connection limits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spillway::config::Config;
use spillway::store::{MessageStatus, Owner};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

/// The upstream's pace between tokens.
const PACE: Duration = Duration::from_millis(3);

// ---------------------------------------------------------------- helpers

/// Config for a gateway in front of `upstream`, adjusted by `tune`.
fn config(upstream: &FakeUpstream, tune: impl FnOnce(&mut Config)) -> Config {
    let mut config = test_config(&openai_config(upstream));
    tune(&mut config);
    config
}

fn owner(user: &str) -> Owner {
    Owner {
        tenant_id: "default".into(),
        user_id: user.into(),
    }
}

/// A new conversation of `user`, created through the history API.
async fn conversation(gateway: &TestGateway, user: &str) -> String {
    let response = client()
        .post(gateway.url("/v1/conversations"))
        .header("x-spillway-user", user)
        .json(&json!({ "title": "ws test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// A WebSocket upgrade of `/v1/ws` offering `protocols`, as `user`.
async fn handshake(
    gateway: &TestGateway,
    user: Option<&str>,
    protocols: &str,
) -> (
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    handshake_at(gateway, "/v1/ws", user, protocols).await
}

/// A WebSocket upgrade of `path` (with its query) offering `protocols`.
async fn handshake_at(
    gateway: &TestGateway,
    path: &str,
    user: Option<&str>,
    protocols: &str,
) -> (
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let mut request = format!("ws://{}{path}", gateway.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    if let Some(user) = user {
        request
            .headers_mut()
            .insert("x-spillway-user", HeaderValue::from_str(user).unwrap());
    }
    timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake within the timeout")
        .expect("handshake succeeds")
}

/// A protocol client: one WebSocket, JSON frames.
struct Client {
    ws: Ws,
    /// The `hello` frame.
    hello: Value,
}

impl Client {
    /// Connects as `user` and reads `hello`.
    async fn connect(gateway: &TestGateway, user: &str) -> Self {
        let (ws, _) = handshake(gateway, Some(user), "spillway.v1").await;
        let mut client = Self {
            ws,
            hello: Value::Null,
        };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["user_id"], user);
        client.hello = hello;
        client
    }

    async fn send(&mut self, frame: Value) {
        self.send_raw(Message::text(frame.to_string())).await;
    }

    async fn send_raw(&mut self, message: Message) {
        timeout(WAIT, self.ws.send(message))
            .await
            .expect("write within the timeout")
            .expect("write succeeds");
    }

    /// The next JSON frame (control frames are skipped; tungstenite answers
    /// pings itself).
    async fn recv(&mut self) -> Value {
        self.recv_within(WAIT)
            .await
            .expect("a frame within the timeout")
    }

    /// The next JSON frame within `wait`, or `None`.
    async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
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

    /// Reads until the server closes; returns the close code. Text frames
    /// before the close are returned too.
    async fn closed(&mut self) -> (u16, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let message = timeout(WAIT, self.ws.next())
                .await
                .expect("closed within the timeout");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), before),
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

    /// Sends `ping` and asserts that the very next frame is its `pong`.
    async fn assert_usable(&mut self, id: u64) {
        self.send(json!({ "type": "ping", "id": id })).await;
        let pong = self.recv().await;
        assert_eq!(pong, json!({ "type": "pong", "id": id }));
    }

    /// Sends a message and reads its `ack`.
    async fn send_message(&mut self, conversation_id: &str, content: &str, id: &str) -> Value {
        self.send(json!({
            "type": "send",
            "conversation_id": conversation_id,
            "content": content,
            "client_message_id": id,
        }))
        .await;
        let ack = self.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["client_message_id"], id);
        assert_eq!(ack["conversation_id"], conversation_id);
        ack
    }

    /// Reads frames up to (not including) the `reply` of `generation_id`;
    /// returns those frames.
    async fn until_reply(&mut self, generation_id: &str) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "reply" && frame["generation_id"] == generation_id {
                return before;
            }
            before.push(frame);
        }
    }

    /// Streams `generation_id` from `from` until its terminal frame.
    async fn stream(&mut self, generation_id: &str, from: u64) -> Streamed {
        let mut streamed = Streamed {
            frames: Vec::new(),
            text: String::new(),
            next: from,
        };
        loop {
            let frame = self.recv().await;
            let terminal = streamed.take(generation_id, frame);
            if terminal {
                return streamed;
            }
        }
    }
}

/// What a client got of one generation.
#[derive(Debug)]
struct Streamed {
    /// Its frames, in order.
    frames: Vec<Value>,
    /// The concatenated delta text.
    text: String,
    /// Where to resume from: the `next` of the last frame.
    next: u64,
}

impl Streamed {
    /// Folds in one frame of `generation_id` (checking that it continues
    /// exactly where the previous one ended); returns whether it ends the
    /// stream.
    fn take(&mut self, generation_id: &str, frame: Value) -> bool {
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

    fn kinds(&self) -> Vec<String> {
        self.frames
            .iter()
            .map(|f| f["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn last(&self) -> &Value {
        self.frames.last().unwrap()
    }
}

/// Text chunks of `tokens`, `PACE` apart, then `AwaitRelease` (the body
/// stalls until released, or until the gateway goes away).
fn stalling_stream(tokens: &[&str]) -> Script {
    let mut steps = Vec::new();
    for token in tokens {
        steps.push(Step::Sleep(PACE));
        steps.push(openai_text_chunk(token));
    }
    steps.push(Step::AwaitRelease);
    steps.extend(openai_finish(7, tokens.len() as u64));
    Script::sse(steps)
}

/// Releases the upstream's stalled bodies every few ms (a body only hears
/// a release once it waits for one) until the task is aborted.
fn release_until_stopped(upstream: &FakeUpstream) -> tokio::task::JoinHandle<()> {
    let upstream = upstream.clone();
    tokio::spawn(async move {
        loop {
            upstream.release();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// A complete OpenAI stream of `tokens` (no pacing) that finishes with
/// `reason`.
fn stream_finishing(tokens: &[&str], reason: &str) -> Script {
    let mut steps: Vec<Step> = tokens.iter().map(|t| openai_text_chunk(t)).collect();
    let mut finish = openai_finish(7, tokens.len() as u64);
    finish[0] = data(&json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
        "choices": [{ "index": 0, "delta": {}, "finish_reason": reason }]
    }));
    steps.extend(finish);
    Script::sse(steps)
}

/// Waits (bounded) until the store holds an assistant message for
/// `generation_id`, flushing the persister; returns it.
async fn stored_reply(
    gateway: &TestGateway,
    user: &str,
    generation_id: &str,
) -> spillway::store::MessageRow {
    let deadline = Instant::now() + WAIT;
    loop {
        gateway.persister().flushed().await;
        let export = gateway.store().export_user(&owner(user)).await.unwrap();
        if let Some(message) = export
            .messages
            .into_iter()
            .find(|m| m.generation_id.as_deref() == Some(generation_id))
        {
            return message;
        }
        assert!(
            Instant::now() < deadline,
            "the reply of {generation_id} was never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until the upstream has seen `n` bodies end.
async fn upstream_closed(upstream: &FakeUpstream, n: usize) -> Vec<Closed> {
    timeout(WAIT, upstream.wait_closed(n))
        .await
        .expect("the upstream connection ends within the timeout")
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn the_handshake_echoes_the_subprotocol_and_says_hello_and_anonymous_is_closed_4401() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;

    // Offered among others: exactly `spillway.v1` comes back.
    let (mut ws, response) = handshake(&gateway, Some("ada"), "chat.other, spillway.v1").await;
    assert_eq!(response.status().as_u16(), 101);
    let echoed: Vec<_> = response
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(echoed, vec!["spillway.v1".to_owned()]);
    let hello = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let hello: Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["user_id"], "ada");
    assert!(!hello["connection_id"].as_str().unwrap().is_empty());
    assert_eq!(hello["heartbeat_ms"], 20_000);
    drop(ws);

    // No user: upgraded, then closed with 4401 before any frame.
    let (ws, response) = handshake(&gateway, None, "spillway.v1").await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "spillway.v1");
    let mut anonymous = Client {
        ws,
        hello: Value::Null,
    };
    let (code, before) = anonymous.closed().await;
    assert_eq!(code, 4401);
    assert!(before.is_empty(), "no frame before the close: {before:?}");
}

#[tokio::test]
async fn send_is_acked_streamed_contiguously_to_done_and_stored() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["Hel", "lo", ", ", "wörld", " 🌍", " — ", "日本語", "!"];
    upstream.push(openai_stream(&tokens, PACE));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;

    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Say hello", "m-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let message_id = ack["message_id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generation).is_ok());
    assert!(uuid::Uuid::parse_str(&message_id).is_ok());
    let epoch = ack["epoch"].as_u64().unwrap();
    assert!(epoch > 0);

    // The sender was subscribed: a presence snapshot, then the reply.
    let before = ada.until_reply(&generation).await;
    assert_eq!(
        before,
        vec![json!({
            "type": "presence", "conversation_id": conversation,
            "event": "snapshot", "users": ["ada"], "devices": 1,
        })]
    );
    let streamed = ada.stream(&generation, 0).await;
    assert_eq!(streamed.text, tokens.concat());
    let kinds = streamed.kinds();
    let deltas = kinds.iter().take_while(|k| *k == "delta").count();
    assert!(deltas >= 1);
    assert_eq!(&kinds[deltas..], ["usage", "done"], "{kinds:?}");
    for frame in &streamed.frames {
        assert_eq!(frame["epoch"].as_u64(), Some(epoch), "{frame}");
    }
    let usage = &streamed.frames[deltas];
    assert_eq!(usage["prompt_tokens"], 7);
    assert_eq!(usage["completion_tokens"], tokens.len());
    let done = streamed.last();
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["offset"], done["next"]);

    // What the upstream was asked.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let messages = requests[0].body["messages"].as_array().unwrap();
    assert_eq!(messages.last().unwrap()["content"], "Say hello");
    assert!(upstream_closed(&upstream, 1).await[0].completed);

    // Both messages are stored.
    gateway.persister().flushed().await;
    let export = gateway.store().export_user(&owner("ada")).await.unwrap();
    assert_eq!(export.messages.len(), 2, "{:?}", export.messages);
    let user = &export.messages[0];
    assert_eq!(user.id, message_id);
    assert_eq!(user.role, "user");
    assert_eq!(user.content, "Say hello");
    assert_eq!(user.client_message_id.as_deref(), Some("m-1"));
    assert_eq!(user.conversation_id, conversation);
    let reply = &export.messages[1];
    assert_eq!(reply.role, "assistant");
    assert_eq!(reply.content, tokens.concat());
    assert_eq!(reply.status, MessageStatus::Complete);
    assert_eq!(reply.generation_id.as_deref(), Some(generation.as_str()));
    assert_eq!(reply.completion_tokens, Some(tokens.len() as i64));
    ada.assert_usable(1).await;
}

#[tokio::test]
async fn a_finish_that_arrives_on_its_own_keeps_the_frames_contiguous() {
    // The upstream sends its finish, then stalls before its usage: the
    // finish event is the last in the log for a while, read on its own.
    let upstream = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("cut "), openai_text_chunk("short")];
    let mut finish = openai_finish(3, 2);
    finish[0] = data(&json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
        "choices": [{ "index": 0, "delta": {}, "finish_reason": "length" }]
    }));
    steps.push(Step::Sleep(Duration::from_millis(20)));
    steps.push(finish.remove(0));
    steps.push(Step::AwaitRelease);
    steps.extend(finish);
    upstream.push(Script::sse(steps));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;

    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Go", "s-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    ada.until_reply(&generation).await;
    let mut streamed = Streamed {
        frames: Vec::new(),
        text: String::new(),
        next: 0,
    };
    // Text (offsets 0 and 1), then something that covers the finish (2).
    while streamed.next < 3 {
        let frame = ada.recv().await;
        assert!(!streamed.take(&generation, frame));
    }
    assert_eq!(streamed.text, "cut short");
    let releaser = release_until_stopped(&upstream);
    let rest = ada.stream(&generation, 3).await;
    releaser.abort();
    assert_eq!(rest.kinds(), ["usage", "done"]);
    assert_eq!(rest.last()["finish_reason"], "length");
    // Resuming past the finish still tells its reason.
    ada.send(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 3 }))
        .await;
    let resumed = ada.stream(&generation, 3).await;
    assert_eq!(resumed.kinds(), ["usage", "done"]);
    assert_eq!(resumed.last()["finish_reason"], "length");
}

#[tokio::test]
async fn a_resent_client_message_id_gets_the_same_ack_and_one_upstream_request() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["one ", "two ", "three"];
    upstream.set_default(openai_stream(&tokens, PACE));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;

    let mut ada = Client::connect(&gateway, "ada").await;
    let first = ada.send_message(&conversation, "Count", "same").await;
    let generation = first["generation_id"].as_str().unwrap().to_owned();
    // Resent at once, while the reply runs: the second ack comes among the
    // first send's room events (snapshot, reply), the reply only once.
    ada.send(json!({ "type": "send", "conversation_id": conversation,
                     "content": "Count", "client_message_id": "same" }))
        .await;
    let mut events = Vec::new();
    let mut acks = Vec::new();
    while acks.is_empty() || events.len() < 2 {
        let frame = ada.recv().await;
        if frame["type"] == "ack" {
            acks.push(frame);
        } else {
            events.push(frame);
        }
    }
    assert_eq!(acks, vec![first.clone()]);
    assert_eq!(events[0]["event"], "snapshot");
    assert_eq!(events[1]["type"], "reply");
    assert_eq!(events[1]["generation_id"], generation);
    let streamed = ada.stream(&generation, 0).await;
    assert_eq!(streamed.text, tokens.concat());
    // Resent after the reply finished.
    let third = ada.send_message(&conversation, "Count", "same").await;
    assert_eq!(third, first);
    // And from another connection after this one left (a client that lost
    // the ack resends on reconnect).
    drop(ada);
    let mut again = Client::connect(&gateway, "ada").await;
    let fourth = again.send_message(&conversation, "Count", "same").await;
    assert_eq!(fourth, first);
    // It rejoined the conversation; the reply is over, so nothing else.
    assert_eq!(again.recv().await["event"], "snapshot");
    again.assert_usable(1).await;

    assert_eq!(upstream.requests().len(), 1, "one reply for one message");
    gateway.persister().flushed().await;
    let export = gateway.store().export_user(&owner("ada")).await.unwrap();
    let users: Vec<_> = export
        .messages
        .iter()
        .filter(|m| m.role == "user")
        .collect();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].id, first["message_id"].as_str().unwrap());
}

#[tokio::test]
async fn two_devices_share_messages_replies_and_typing_and_unsubscribe_stops_delivery() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["Both ", "devices ", "see ", "this."];
    upstream.set_default(openai_stream(&tokens, PACE));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;
    let other = conversation_of(&gateway, "ada").await;

    let mut phone = Client::connect(&gateway, "ada").await;
    let mut laptop = Client::connect(&gateway, "ada").await;
    assert_ne!(phone.hello["connection_id"], laptop.hello["connection_id"]);
    let subscribe = json!({ "type": "subscribe", "conversation_id": conversation });
    let presence = |event: &str, devices: usize| {
        json!({
            "type": "presence", "conversation_id": conversation,
            "event": event, "users": ["ada"], "devices": devices,
        })
    };
    laptop.send(subscribe.clone()).await;
    assert_eq!(laptop.recv().await, presence("snapshot", 1));
    phone.send(subscribe.clone()).await;
    // The second device lists the user once, with two devices, and the
    // first device hears it join.
    assert_eq!(phone.recv().await, presence("snapshot", 2));
    assert_eq!(laptop.recv().await, presence("join", 2));

    // Typing reaches the other device, never the sender.
    phone
        .send(json!({ "type": "typing", "conversation_id": conversation }))
        .await;
    assert_eq!(
        laptop.recv().await,
        json!({ "type": "typing", "conversation_id": conversation, "user_id": "ada", "typing": true })
    );
    laptop
        .send(json!({ "type": "typing", "conversation_id": conversation, "typing": false }))
        .await;
    // The phone's next frame is the laptop's typing: it never got its own.
    assert_eq!(
        phone.recv().await,
        json!({ "type": "typing", "conversation_id": conversation, "user_id": "ada", "typing": false })
    );

    // The phone sends: the laptop sees the message and streams the reply.
    let ack = phone
        .send_message(&conversation, "Hello from the phone", "p-1")
        .await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let message = laptop.recv().await;
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["conversation_id"], conversation);
    assert_eq!(message["message"]["id"], ack["message_id"]);
    assert_eq!(message["message"]["role"], "user");
    assert_eq!(message["message"]["content"], "Hello from the phone");
    assert_eq!(message["message"]["client_message_id"], "p-1");
    let reply = laptop.recv().await;
    assert_eq!(
        reply,
        json!({ "type": "reply", "conversation_id": conversation,
                "generation_id": generation, "epoch": ack["epoch"] })
    );
    // The sender gets no `message` of its own message: its next frame is
    // the reply.
    let reply_on_phone = phone.recv().await;
    assert_eq!(reply_on_phone, reply);
    let (on_phone, on_laptop) =
        tokio::join!(phone.stream(&generation, 0), laptop.stream(&generation, 0));
    assert_eq!(on_phone.text, tokens.concat());
    assert_eq!(on_laptop.text, tokens.concat());
    assert_eq!(on_phone.last()["type"], "done");
    assert_eq!(on_laptop.last()["type"], "done");

    // The laptop unsubscribes: the next message reaches only the phone.
    laptop
        .send(json!({ "type": "unsubscribe", "conversation_id": conversation }))
        .await;
    laptop.assert_usable(1).await;
    // The phone hears the laptop leave.
    assert_eq!(phone.recv().await, presence("leave", 1));
    let ack = phone
        .send_message(&conversation, "Only the phone", "p-2")
        .await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    // Events are queued in order: had the laptop been sent the message or
    // the reply, they would come before this snapshot.
    laptop
        .send(json!({ "type": "subscribe", "conversation_id": other }))
        .await;
    assert_eq!(laptop.recv().await["conversation_id"], other);
    assert_eq!(phone.until_reply(&generation).await, Vec::<Value>::new());
    let on_phone = phone.stream(&generation, 0).await;
    assert_eq!(on_phone.text, tokens.concat());
    assert_eq!(laptop.recv_within(Duration::from_millis(100)).await, None);
    // Typing in the old room is refused now.
    laptop
        .send(json!({ "type": "typing", "conversation_id": conversation }))
        .await;
    assert_eq!(laptop.recv().await["code"], "not_subscribed");
}

/// A second conversation of `user` (created in the store directly).
async fn conversation_of(gateway: &TestGateway, user: &str) -> String {
    let now = spillway::store::now_ms();
    let row = spillway::store::ConversationRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: "default".into(),
        user_id: user.into(),
        title: None,
        metadata: json!({}),
        created_at: now,
        updated_at: now,
    };
    gateway.store().create_conversation(&row).await.unwrap();
    row.id
}

#[tokio::test]
async fn cancel_stops_the_reply_closes_the_upstream_and_stores_it_aborted() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["This ", "reply ", "will ", "be ", "cut "];
    upstream.push(stalling_stream(&tokens));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;

    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Go on", "c-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ada.until_reply(&generation).await;
    // Read until everything before the stall has arrived.
    let mut streamed = Streamed {
        frames: Vec::new(),
        text: String::new(),
        next: 0,
    };
    while streamed.text != tokens.concat() {
        let frame = ada.recv().await;
        assert!(!streamed.take(&generation, frame), "ended early");
    }
    ada.send(json!({ "type": "cancel", "generation_id": generation }))
        .await;
    let error = ada.recv().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "cancelled");
    assert_eq!(error["generation_id"], generation);
    assert_eq!(error["retryable"], false);

    let closed = upstream_closed(&upstream, 1).await;
    assert!(
        !closed[0].completed,
        "the upstream body was cut, not finished"
    );
    let stored = stored_reply(&gateway, "ada", &generation).await;
    assert_eq!(stored.status, MessageStatus::Aborted);
    assert_eq!(stored.content, tokens.concat());

    // Cancelling it again, or something unknown: typed errors.
    ada.send(json!({ "type": "cancel", "generation_id": "nope" }))
        .await;
    let error = ada.recv().await;
    assert_eq!(error["code"], "generation_not_found");
    assert_eq!(error["generation_id"], "nope");
    ada.assert_usable(1).await;
}

/// Tokens of a ~60-token reply, multi-byte characters included, each one
/// distinct so a lost or duplicated token shows.
fn long_reply() -> Vec<String> {
    (0..60)
        .map(|i| match i % 4 {
            0 => format!("w{i:02} "),
            1 => format!("é{i:02}ü "),
            2 => format!("日{i:02}本 "),
            _ => format!("🌊{i:02}\n"),
        })
        .collect()
}

#[tokio::test]
async fn resume_after_disconnects_at_many_points_is_byte_exact() {
    let upstream = FakeUpstream::start().await;
    let tokens = long_reply();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let whole = tokens.concat();
    upstream.set_default(openai_stream(&token_refs, PACE));
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.generation.grace_secs = 60;
        // Many reconnects: not what the connection rate limit is about.
        c.limits.tiers[0].connections_per_minute = 10_000;
        // Small frames, so even a resume far behind takes several frames.
        c.generation.max_frame_bytes = 64;
    }))
    .await;
    let conversation = conversation(&gateway, "ada").await;
    let mut rng = fastrand::Rng::with_seed(0x5EED);
    let mut disconnects = 0;
    let mut subscribed_resumes = 0;
    let mut restarts = 0;

    for round in 0..8 {
        let mut client = Client::connect(&gateway, "ada").await;
        let ack = client
            .send_message(&conversation, "Tell me a long story", &format!("r-{round}"))
            .await;
        let generation = ack["generation_id"].as_str().unwrap().to_owned();
        let epoch = ack["epoch"].as_u64().unwrap();
        let mut streamed = Streamed {
            frames: Vec::new(),
            text: String::new(),
            next: 0,
        };
        // This connection is subscribed to the conversation (the sender is).
        let mut subscribed = true;
        'reply: loop {
            // Read a random number of frames (0 included: disconnect right
            // after the resume), then drop the socket without a close.
            for _ in 0..rng.usize(0..4) {
                let frame = client.recv().await;
                match frame["type"].as_str().unwrap() {
                    // Devices come and go around the reconnects.
                    "presence" => {}
                    // The connection streams the reply from offset 0: what
                    // the client holds is replaced.
                    "reply" => {
                        assert!(subscribed, "a `reply` only in a subscribed room: {frame}");
                        assert_eq!(frame["generation_id"], generation);
                        restarts += 1;
                        streamed = Streamed {
                            frames: Vec::new(),
                            text: String::new(),
                            next: 0,
                        };
                    }
                    _ => {
                        if streamed.take(&generation, frame) {
                            break 'reply;
                        }
                    }
                }
            }
            drop(client);
            disconnects += 1;
            client = Client::connect(&gateway, "ada").await;
            let resume = json!({
                "type": "resume", "generation_id": generation,
                "epoch": epoch, "offset": streamed.next,
            });
            let subscribe = json!({ "type": "subscribe", "conversation_id": conversation });
            // Some clients also rejoin the conversation, before or after
            // the resume.
            match rng.u8(0..3) {
                0 => {
                    subscribed = false;
                    client.send(resume).await;
                }
                1 => {
                    subscribed = true;
                    client.send(subscribe).await;
                    client.send(resume).await;
                }
                _ => {
                    subscribed = true;
                    client.send(resume).await;
                    client.send(subscribe).await;
                }
            }
            subscribed_resumes += usize::from(subscribed);
        }
        assert_eq!(
            streamed.text, whole,
            "round {round}: the text across reconnects is byte-exact"
        );
        assert_eq!(streamed.last()["type"], "done");
        assert_eq!(streamed.last()["next"].as_u64(), Some(streamed.next));
        // Whatever is still queued (a late snapshot) comes before the pong.
        client.send(json!({ "type": "ping", "id": round })).await;
        loop {
            let frame = client.recv().await;
            if frame["type"] == "pong" {
                break;
            }
            assert_eq!(frame["type"], "presence", "{frame}");
        }
    }
    assert!(disconnects >= 40, "only {disconnects} disconnects");
    assert!(subscribed_resumes >= 10, "only {subscribed_resumes}");
    // Both orders of `reply` and `resume` happened.
    assert!(
        restarts >= 1 && restarts < subscribed_resumes,
        "{restarts} restarts"
    );
    // Nobody's disconnect cancelled an upstream.
    let closed = upstream_closed(&upstream, 8).await;
    assert!(closed.iter().all(|c| c.completed), "{closed:?}");
}

#[tokio::test]
async fn a_resume_then_a_subscribe_continues_the_reply_without_restarting_it() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["one ", "two ", "three ", "four"];
    upstream.push(stalling_stream(&tokens));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Count", "rs-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    ada.until_reply(&generation).await;
    let first = ada.recv().await;
    assert_eq!(first["text"], "one ");
    drop(ada);

    // Back: resume where it got to, then rejoin the conversation. The
    // room's announcement of the running reply must not restart it.
    let mut ada = Client::connect(&gateway, "ada").await;
    ada.send(json!({ "type": "resume", "generation_id": generation,
                     "epoch": epoch, "offset": first["next"] }))
        .await;
    ada.send(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    let mut streamed = Streamed {
        frames: Vec::new(),
        text: "one ".to_owned(),
        next: first["next"].as_u64().unwrap(),
    };
    let mut snapshots = 0;
    while streamed.text != tokens.concat() {
        let frame = ada.recv().await;
        if frame["type"] == "presence" {
            snapshots += 1;
            continue;
        }
        assert_ne!(frame["type"], "reply", "the resumed reply is not restarted");
        assert!(!streamed.take(&generation, frame));
    }
    let releaser = release_until_stopped(&upstream);
    let next = streamed.next;
    let rest = ada.stream(&generation, next).await;
    releaser.abort();
    // (An empty delta may cover the finish event if it was read alone.)
    assert_eq!(rest.text, "");
    assert!(rest.kinds().ends_with(&["usage".into(), "done".into()]));
    if snapshots == 0 {
        assert_eq!(ada.recv().await["event"], "snapshot");
    }
    ada.assert_usable(1).await;
}

#[tokio::test]
async fn resume_from_every_offset_of_a_finished_reply_replays_the_exact_rest() {
    let upstream = FakeUpstream::start().await;
    let tokens = long_reply();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    upstream.push(stream_finishing(&token_refs, "length"));
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.generation.max_frame_bytes = 64;
    }))
    .await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Story", "f-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    ada.until_reply(&generation).await;
    let full = ada.stream(&generation, 0).await;
    assert_eq!(full.text, tokens.concat());
    assert_eq!(full.last()["finish_reason"], "length");
    let end = full.next;
    assert!(end > tokens.len() as u64);

    // Every offset, from the start to the end of the log: the text before
    // it (per event, one token each) plus the replay is the whole reply.
    let mut fresh = Client::connect(&gateway, "ada").await;
    for offset in 0..=end {
        fresh
            .send(json!({ "type": "resume", "generation_id": generation,
                          "epoch": epoch, "offset": offset }))
            .await;
        let rest = fresh.stream(&generation, offset).await;
        let before: String = tokens[..(offset as usize).min(tokens.len())].concat();
        assert_eq!(before + &rest.text, tokens.concat(), "offset {offset}");
        assert_eq!(rest.last()["type"], "done");
        assert_eq!(rest.last()["finish_reason"], "length", "offset {offset}");
    }
    fresh.assert_usable(1).await;
}

#[tokio::test]
async fn bad_resumes_say_reload_from_history_and_the_connection_stays_usable() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["a", "b"], Duration::ZERO));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Hi", "x-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    ada.until_reply(&generation).await;
    let full = ada.stream(&generation, 0).await;

    let unknown = uuid::Uuid::now_v7().to_string();
    let cases = [
        (unknown.as_str(), epoch, 0),
        ("garbage-id", epoch, 0),
        ("", epoch, 0),
        (generation.as_str(), epoch + 1, 0),
        (generation.as_str(), 0, 0),
        (generation.as_str(), epoch, full.next + 1),
        (generation.as_str(), epoch, u64::MAX),
    ];
    for (i, (id, epoch, offset)) in cases.into_iter().enumerate() {
        ada.send(
            json!({ "type": "resume", "generation_id": id, "epoch": epoch, "offset": offset }),
        )
        .await;
        let error = ada.recv().await;
        assert_eq!(error["type"], "error", "case {i}: {error}");
        assert_eq!(error["code"], "reload_from_history", "case {i}: {error}");
        assert_eq!(error["generation_id"], id, "case {i}");
        assert_eq!(error["retryable"], false);
        ada.assert_usable(i as u64).await;
    }

    // Another user cannot resume (or learn about) ada's reply.
    let mut eve = Client::connect(&gateway, "eve").await;
    eve.send(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0 }))
        .await;
    assert_eq!(eve.recv().await["code"], "reload_from_history");
    eve.send(json!({ "type": "cancel", "generation_id": generation }))
        .await;
    assert_eq!(eve.recv().await["code"], "generation_not_found");
    eve.assert_usable(1).await;

    // Malformed resume values are invalid frames.
    for bad in [
        json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": -1 }),
        json!({ "type": "resume", "generation_id": generation, "epoch": "x", "offset": 0 }),
        json!({ "type": "resume", "generation_id": 7, "epoch": epoch, "offset": 0 }),
        json!({ "type": "resume", "generation_id": generation }),
    ] {
        ada.send(bad.clone()).await;
        let error = ada.recv().await;
        assert_eq!(error["code"], "invalid_frame", "{bad}: {error}");
        ada.assert_usable(99).await;
    }

    // A good resume still works on the same connection.
    ada.send(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0 }))
        .await;
    assert_eq!(ada.stream(&generation, 0).await.text, "ab");
}

#[tokio::test]
async fn a_reply_nobody_resumes_is_cancelled_after_the_grace_and_stored_aborted() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["Partial ", "answer"];
    upstream.push(stalling_stream(&tokens));
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.generation.grace_secs = 1;
    }))
    .await;
    let conversation = conversation(&gateway, "ada").await;

    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "Start", "g-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    ada.until_reply(&generation).await;
    let mut streamed = Streamed {
        frames: Vec::new(),
        text: String::new(),
        next: 0,
    };
    while streamed.text != tokens.concat() {
        let frame = ada.recv().await;
        assert!(!streamed.take(&generation, frame));
    }
    drop(ada);
    let gone = Instant::now();

    let closed = upstream_closed(&upstream, 1).await;
    assert!(!closed[0].completed, "cancelled, not finished");
    assert!(
        closed[0].at.duration_since(gone) >= Duration::from_millis(900),
        "the upstream ran on for the grace period"
    );
    let stored = stored_reply(&gateway, "ada", &generation).await;
    assert_eq!(stored.status, MessageStatus::Aborted);
    assert_eq!(stored.content, tokens.concat());
    assert_eq!(stored.user_id, "ada");

    // Coming back now: the reply replays to its end, which says `aborted`.
    let mut back = Client::connect(&gateway, "ada").await;
    back.send(json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": streamed.next }))
        .await;
    let rest = back.stream(&generation, streamed.next).await;
    assert_eq!(rest.text, "");
    assert_eq!(rest.last()["type"], "error");
    assert_eq!(rest.last()["code"], "aborted");
}

#[tokio::test]
async fn bad_input_gets_typed_errors_oversized_frames_close_1009_and_others_stream_on() {
    let upstream = FakeUpstream::start().await;
    let tokens: Vec<String> = (0..40).map(|i| format!("t{i} ")).collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    upstream.push(openai_stream(&token_refs, Duration::from_millis(10)));
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.chat.max_message_bytes = 1024;
        c.chat.ws_max_message_bytes = 4096;
    }))
    .await;
    let bob_conversation = conversation(&gateway, "bob").await;
    let ada_conversation = conversation(&gateway, "ada").await;

    // Bob's reply streams the whole time.
    let mut bob = Client::connect(&gateway, "bob").await;
    let ack = bob.send_message(&bob_conversation, "Stream", "b-1").await;
    let bob_generation = ack["generation_id"].as_str().unwrap().to_owned();
    bob.until_reply(&bob_generation).await;
    let bob_reads = tokio::spawn(async move {
        let streamed = bob.stream(&bob_generation, 0).await;
        (bob, streamed)
    });

    let mut ada = Client::connect(&gateway, "ada").await;
    let text = |s: &str| Message::text(s.to_owned());
    let cases: Vec<(Message, &str)> = vec![
        (text("not json"), "invalid_json"),
        (text("{\"type\": \"ping\""), "invalid_json"),
        (text("[1, 2]"), "invalid_frame"),
        (text("42"), "invalid_frame"),
        (text("{\"kind\": \"ping\"}"), "invalid_frame"),
        (text("{\"type\": 3}"), "invalid_frame"),
        (text("{\"type\": \"dance\"}"), "unknown_frame_type"),
        (text("{\"type\": \"ack\"}"), "unknown_frame_type"),
        (text("{\"type\": \"send\"}"), "invalid_frame"),
        (text("{\"type\": \"ping\", \"extra\": true}"), "invalid_frame"),
        (
            Message::Binary(Bytes::from_static(b"\x00\x01binary")),
            "binary_not_supported",
        ),
        (
            text(&json!({ "type": "subscribe", "conversation_id": bob_conversation }).to_string()),
            "conversation_not_found",
        ),
        (
            text(&json!({ "type": "subscribe", "conversation_id": "not-a-uuid" }).to_string()),
            "conversation_not_found",
        ),
        (
            text(
                &json!({ "type": "subscribe", "conversation_id": uuid::Uuid::now_v7().to_string() })
                    .to_string(),
            ),
            "conversation_not_found",
        ),
        (
            text(&json!({ "type": "typing", "conversation_id": ada_conversation }).to_string()),
            "not_subscribed",
        ),
        (
            text(
                &json!({ "type": "send", "conversation_id": ada_conversation,
                         "content": "   ", "client_message_id": "e-1" })
                .to_string(),
            ),
            "invalid_frame",
        ),
        (
            text(
                &json!({ "type": "send", "conversation_id": ada_conversation,
                         "content": "x".repeat(2000), "client_message_id": "e-2" })
                .to_string(),
            ),
            "invalid_frame",
        ),
        (
            text(
                &json!({ "type": "send", "conversation_id": ada_conversation,
                         "content": "hi", "client_message_id": "e-3", "model": "no-such-model" })
                .to_string(),
            ),
            "model_not_found",
        ),
    ];
    for (i, (message, code)) in cases.into_iter().enumerate() {
        ada.send_raw(message).await;
        let error = ada.recv().await;
        assert_eq!(error["type"], "error", "case {i}: {error}");
        assert_eq!(error["code"], code, "case {i}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        assert_eq!(error["retryable"], false, "case {i}");
        ada.assert_usable(i as u64).await;
    }
    // A send into someone else's conversation names the client message.
    ada.send(json!({ "type": "send", "conversation_id": bob_conversation,
                     "content": "hi", "client_message_id": "e-4" }))
        .await;
    let error = ada.recv().await;
    assert_eq!(error["code"], "conversation_not_found");
    assert_eq!(error["client_message_id"], "e-4");
    ada.assert_usable(100).await;
    assert_eq!(
        upstream.requests().len(),
        1,
        "no bad input reached the upstream"
    );

    // Over the WebSocket message limit: closed with 1009.
    ada.send(json!({ "type": "ping", "id": "x".repeat(8 * 1024) }))
        .await;
    let (code, before) = ada.closed().await;
    assert_eq!(code, 1009);
    assert!(before.is_empty(), "{before:?}");

    let (mut bob, streamed) = timeout(WAIT, bob_reads).await.unwrap().unwrap();
    assert_eq!(streamed.text, tokens.concat());
    assert_eq!(streamed.last()["type"], "done");
    bob.assert_usable(1).await;
}

#[tokio::test]
async fn per_user_replies_and_per_connection_subscriptions_are_bounded() {
    let upstream = FakeUpstream::start().await;
    upstream.push(stalling_stream(&["held"]));
    upstream.set_default(openai_stream(&["ok"], Duration::ZERO));
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.chat.max_generations_per_user = 1;
        c.chat.max_subscriptions = 1;
    }))
    .await;
    let first = conversation(&gateway, "ada").await;
    let second = conversation(&gateway, "ada").await;

    // One reply at a time per user, across connections.
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&first, "One", "l-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ada.until_reply(&generation).await;
    let delta = ada.recv().await;
    assert_eq!(delta["text"], "held");
    let mut other_device = Client::connect(&gateway, "ada").await;
    other_device
        .send(json!({ "type": "send", "conversation_id": first,
                      "content": "Two", "client_message_id": "l-2" }))
        .await;
    let error = other_device.recv().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "too_many_generations");
    assert_eq!(error["retryable"], true);
    assert_eq!(error["client_message_id"], "l-2");
    // The refused send still joined the conversation: this device now
    // streams the running reply too.
    assert_eq!(other_device.recv().await["event"], "snapshot");
    assert_eq!(other_device.recv().await["generation_id"], generation);
    // The first device hears the second one join.
    assert_eq!(ada.recv().await["event"], "join");
    let releaser = release_until_stopped(&upstream);
    let streamed = ada.stream(&generation, 1).await;
    assert_eq!(streamed.last()["type"], "done");
    let streamed = other_device.stream(&generation, 0).await;
    assert_eq!(streamed.text, "held");
    releaser.abort();
    // Once it is done, the next one may start.
    let ack = other_device.send_message(&first, "Two", "l-2").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let before = other_device.until_reply(&generation).await;
    assert_eq!(before, Vec::<Value>::new());
    assert_eq!(other_device.stream(&generation, 0).await.text, "ok");
    assert_eq!(upstream.requests().len(), 2);

    // One subscription per connection.
    let mut reader = Client::connect(&gateway, "ada").await;
    reader
        .send(json!({ "type": "subscribe", "conversation_id": first }))
        .await;
    assert_eq!(reader.recv().await["event"], "snapshot");
    reader
        .send(json!({ "type": "subscribe", "conversation_id": second }))
        .await;
    let error = reader.recv().await;
    assert_eq!(error["code"], "too_many_subscriptions");
    assert_eq!(error["retryable"], false);
    // Subscribing again to the same one is fine; after leaving it, another.
    reader
        .send(json!({ "type": "subscribe", "conversation_id": first }))
        .await;
    assert_eq!(reader.recv().await["event"], "snapshot");
    reader
        .send(json!({ "type": "unsubscribe", "conversation_id": first }))
        .await;
    reader
        .send(json!({ "type": "subscribe", "conversation_id": second }))
        .await;
    let snapshot = reader.recv().await;
    assert_eq!(snapshot["event"], "snapshot");
    assert_eq!(snapshot["conversation_id"], second);
    reader.assert_usable(1).await;
}

#[tokio::test]
async fn a_connection_past_its_lifetime_is_told_to_reconnect_with_4001() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.chat.max_connection_secs = 1;
    }))
    .await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let opened = Instant::now();
    ada.assert_usable(1).await;
    let (code, before) = ada.closed().await;
    assert_eq!(code, 4001);
    assert!(before.is_empty(), "{before:?}");
    assert!(opened.elapsed() >= Duration::from_millis(900));
    // A new connection is welcome.
    let mut again = Client::connect(&gateway, "ada").await;
    again.assert_usable(2).await;
}

#[tokio::test]
async fn the_model_gets_the_whole_context_when_the_user_comes_back_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["answer"], Duration::ZERO));
    let gateway = TestGateway::openai(&upstream).await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "first", "t-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ada.until_reply(&generation).await;
    assert_eq!(ada.stream(&generation, 0).await.text, "answer");
    // A page reload: the room closes, and the next send comes right away
    // (before the persister's batch reached the store).
    drop(ada);
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "second", "t-2").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ada.until_reply(&generation).await;
    assert_eq!(ada.stream(&generation, 0).await.text, "answer");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].body["messages"],
        json!([
            { "role": "user", "content": "first" },
            { "role": "assistant", "content": "answer" },
            { "role": "user", "content": "second" },
        ])
    );
}

#[tokio::test]
async fn a_session_reconnect_subscribes_its_conversations_again_for_its_user_only() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let first = conversation(&gateway, "ada").await;
    let second = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    assert_eq!(ada.hello["restored"], false);
    let session = ada.hello["session_id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&session).is_ok(), "{}", ada.hello);
    for conversation in [&first, &second] {
        ada.send(json!({ "type": "subscribe", "conversation_id": conversation }))
            .await;
        assert_eq!(ada.recv().await["event"], "snapshot");
    }
    ada.send(json!({ "type": "unsubscribe", "conversation_id": first }))
        .await;
    ada.assert_usable(1).await;
    drop(ada);

    // Back with the session: the same id, restored, and the conversation
    // still subscribed is subscribed again (its snapshot comes first).
    let path = format!("/v1/ws?session={session}");
    let (ws, _) = handshake_at(&gateway, &path, Some("ada"), "spillway.v1").await;
    let mut again = Client {
        ws,
        hello: Value::Null,
    };
    let hello = again.recv().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["session_id"], session);
    assert_eq!(hello["restored"], true);
    let snapshot = again.recv().await;
    assert_eq!(snapshot["event"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["conversation_id"], second);
    // It is subscribed: typing from another device reaches it.
    let mut phone = Client::connect(&gateway, "ada").await;
    phone
        .send(json!({ "type": "subscribe", "conversation_id": second }))
        .await;
    assert_eq!(phone.recv().await["event"], "snapshot");
    assert_eq!(again.recv().await["event"], "join");

    // Another user presenting ada's session id gets a fresh session.
    let (ws, _) = handshake_at(&gateway, &path, Some("bob"), "spillway.v1").await;
    let mut bob = Client {
        ws,
        hello: Value::Null,
    };
    let hello = bob.recv().await;
    assert_eq!(hello["restored"], false);
    assert_ne!(hello["session_id"], session);
    bob.assert_usable(1).await;
}

#[tokio::test]
async fn a_device_that_reconnects_within_the_presence_grace_makes_no_flicker() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.cluster.presence_grace_ms = 400;
    }))
    .await;
    let conversation = conversation(&gateway, "ada").await;
    let subscribe = json!({ "type": "subscribe", "conversation_id": conversation });
    let presence = |event: &str, devices: usize| {
        json!({
            "type": "presence", "conversation_id": conversation,
            "event": event, "users": ["ada"], "devices": devices,
        })
    };
    let mut phone = Client::connect(&gateway, "ada").await;
    phone.send(subscribe.clone()).await;
    assert_eq!(phone.recv().await, presence("snapshot", 1));
    let mut laptop = Client::connect(&gateway, "ada").await;
    laptop.send(subscribe.clone()).await;
    assert_eq!(laptop.recv().await, presence("snapshot", 2));
    assert_eq!(phone.recv().await, presence("join", 2));

    // The laptop's network drops; it reconnects at once and subscribes
    // again: it takes its own place, so the phone hears neither a leave
    // nor a join, and the laptop's snapshot still counts two devices.
    drop(laptop);
    let mut laptop = Client::connect(&gateway, "ada").await;
    laptop.send(subscribe.clone()).await;
    assert_eq!(laptop.recv().await, presence("snapshot", 2));
    laptop
        .send(json!({ "type": "typing", "conversation_id": conversation }))
        .await;
    // Frames arrive in order: a leave or join would come before this.
    assert_eq!(
        phone.recv().await,
        json!({ "type": "typing", "conversation_id": conversation, "user_id": "ada", "typing": true })
    );

    // Gone for good: the phone hears the leave once the grace has passed.
    drop(laptop);
    assert_eq!(phone.recv().await, presence("leave", 1));
}

#[tokio::test]
async fn rooms_are_forgotten_once_nobody_is_in_them_and_nothing_runs() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["a", "b"], Duration::ZERO));
    // A dropped connection leaves at once (no presence grace).
    let gateway = TestGateway::start_with(config(&upstream, |c| {
        c.cluster.presence_grace_ms = 0;
    }))
    .await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    let ack = ada.send_message(&conversation, "hi", "r-1").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ada.until_reply(&generation).await;
    assert_eq!(ada.stream(&generation, 0).await.text, "ab");
    assert_eq!(
        gateway.gateway.chat.rooms(),
        1,
        "the room is held while ada is in it"
    );
    drop(ada);
    let mut rooms = 1;
    for _ in 0..200 {
        rooms = gateway.gateway.chat.rooms();
        if rooms == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rooms, 0, "an empty, idle room is forgotten");
}

#[tokio::test]
async fn deleting_a_conversation_ends_its_live_state_and_later_sends_are_refused() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["a"], Duration::ZERO));
    let gateway = TestGateway::start_with(config(&upstream, |_| {})).await;
    let conversation = conversation(&gateway, "ada").await;
    let mut ada = Client::connect(&gateway, "ada").await;
    ada.send(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    assert_eq!(ada.recv().await["event"], "snapshot");
    let response = client()
        .delete(gateway.url(&format!("/v1/conversations/{conversation}")))
        .header("x-spillway-user", "ada")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let told = ada.recv().await;
    assert_eq!(told["code"], "conversation_not_found", "{told}");
    assert_eq!(gateway.gateway.chat.rooms(), 0);
    ada.send(json!({ "type": "send", "conversation_id": conversation,
                     "content": "still here?", "client_message_id": "gone-1" }))
        .await;
    let refused = ada.recv().await;
    assert_eq!(refused["code"], "conversation_not_found", "{refused}");
    assert!(upstream.requests().is_empty(), "nothing reached the model");
}

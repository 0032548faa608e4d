//! The graceful drain with real processes: SIGTERM during live streams.
//! Every client either receives its complete reply or reconnects and
//! resumes to it (with Redis: on the other instance); no reply is silently
//! truncated; the process exits 0 within the drain timeout; every
//! acknowledged message is stored.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

/// The drain timeout of the instance that drains.
const GRACE_SECS: u64 = 20;

fn story(words: usize) -> Vec<String> {
    (0..words).map(|i| format!("w{i} ")).collect()
}

fn refs(tokens: &[String]) -> Vec<&str> {
    tokens.iter().map(String::as_str).collect()
}

/// Reads `generation_id` on `client` into `streamed` until the terminal
/// frame or the server's close; returns the close code, if one came.
async fn read_until_close(
    client: &mut WsClient,
    generation_id: &str,
    streamed: &mut Streamed,
) -> Option<u16> {
    loop {
        let message = timeout(Duration::from_secs(30), client.ws.next())
            .await
            .expect("a frame or the close within 30 s");
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame["generation_id"] == generation_id && frame["type"] != "reply" {
                    streamed.take(generation_id, frame);
                }
            }
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// One SSE event: its `id`, `event` name and JSON `data`.
#[derive(Debug)]
struct Event {
    id: Option<String>,
    name: String,
    data: Value,
}

/// Reads a native SSE stream event by event.
struct Sse {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Sse {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event {
                    id: None,
                    name: String::new(),
                    data: Value::Null,
                };
                for line in block.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.to_owned());
                    } else if let Some(name) = line.strip_prefix("event: ") {
                        event.name = name.to_owned();
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data = serde_json::from_str(data).unwrap();
                    }
                }
                if event.name.is_empty() {
                    continue; // a comment (heartbeat)
                }
                return Some(event);
            }
            let chunk = timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("SSE bytes within 30 s")?;
            let Ok(chunk) = chunk else { return None };
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// What an SSE client got of a reply.
#[derive(Debug, Default)]
struct SseReply {
    generation_id: String,
    text: String,
    last_id: Option<String>,
    done: bool,
    reconnect: bool,
}

impl SseReply {
    /// Reads events until `done`, a `reconnect`, the end, or `stop`.
    async fn read(&mut self, sse: &mut Sse, stop: impl Fn(&Self) -> bool) {
        while let Some(event) = sse.next().await {
            if event.id.is_some() {
                self.last_id.clone_from(&event.id);
            }
            match event.name.as_str() {
                "ack" => {
                    self.generation_id = event.data["generation_id"].as_str().unwrap().to_owned();
                }
                "delta" => self.text.push_str(event.data["text"].as_str().unwrap()),
                "done" => {
                    self.done = true;
                    return;
                }
                "error" => panic!("the reply failed: {}", event.data),
                "reconnect" => {
                    assert_eq!(event.data["generation_id"], self.generation_id.as_str());
                    self.reconnect = true;
                    assert!(
                        sse.next().await.is_none(),
                        "the stream ends after reconnect"
                    );
                    return;
                }
                _ => {}
            }
            if stop(self) {
                return;
            }
        }
    }
}

/// `POST /v1/conversations/{id}/messages` as `user` on `node`: the reply as SSE.
async fn sse_send(node: &Node, user: &str, conversation: &str, id: &str) -> Sse {
    let response = client()
        .post(node.url(&format!(
            "/v1/conversations/{conversation}/messages?user={user}"
        )))
        .json(&json!({ "content": "Tell me a story", "client_message_id": id }))
        .send()
        .await
        .unwrap();
    Sse::new(response)
}

/// Polls `node` until `conversation` of `user` holds the user message and
/// a complete assistant message with `text`.
async fn assert_stored(node: &Node, user: &str, conversation: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let response = client()
            .get(node.url(&format!("/v1/conversations/{conversation}/messages")))
            .header("x-spillway-user", user)
            .send()
            .await
            .unwrap();
        last = response.json().await.unwrap();
        let messages = last["data"].as_array().cloned().unwrap_or_default();
        let user_stored = messages.iter().any(|m| m["role"] == "user");
        let reply = messages.iter().find(|m| m["role"] == "assistant");
        if user_stored && reply.is_some_and(|m| m["status"] == "complete") {
            assert_eq!(reply.unwrap()["content"], text, "{last}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{user}'s messages were not all stored: {last}");
}

/// Waits for `node`'s process to exit after SIGTERM, within the drain
/// timeout (plus process start-up slack); it must exit 0.
async fn assert_exits_cleanly(node: &mut Node, sent: Instant) {
    let status = timeout(
        Duration::from_secs(GRACE_SECS + 5),
        node.process.child.wait(),
    )
    .await
    .expect("the gateway exits within the drain timeout")
    .unwrap();
    eprintln!("exited {:?} after SIGTERM", sent.elapsed());
    assert!(status.success(), "exit status {status:?}");
    let log = node.process.log_text();
    assert!(log.contains("drained"), "{log}");
}

/// One instance alone (no Redis): nowhere else could resume, so the
/// streams it serves run to their ends (WebSocket, native SSE and the
/// OpenAI-compatible endpoint), then the process exits 0 with everything
/// stored.
#[tokio::test]
async fn alone_an_instance_finishes_its_replies_then_exits() {
    let mut cluster = Cluster::start_without_redis(&[]).await;
    let tokens = story(50);
    let whole = tokens.concat();
    cluster
        .upstream
        .set_default(openai_stream(&refs(&tokens), Duration::from_millis(40)));
    let node = cluster
        .spawn_node_with_server("solo", &format!("shutdown_grace_secs = {GRACE_SECS}"))
        .await;
    cluster.nodes.push(node);
    let node = cluster.node("solo");

    let ws_conversation = node.conversation("u1").await;
    let mut ws = node.ws("u1").await;
    let (ack, _) = ws.send_message(&ws_conversation, "Story", "m-ws").await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    ws.until_reply(&generation).await;
    let mut ws_reply = Streamed::at(0);
    ws.continue_stream(&generation, &mut ws_reply, WAIT, |s| s.next >= 3)
        .await;

    let sse_conversation = node.conversation("u2").await;
    let mut sse = sse_send(node, "u2", &sse_conversation, "m-sse").await;
    let mut sse_reply = SseReply::default();
    sse_reply.read(&mut sse, |r| !r.text.is_empty()).await;

    let openai = client()
        .post(node.url("/v1/chat/completions"))
        .json(&chat_body(MODEL, true))
        .send()
        .await
        .unwrap();
    let mut openai = SseReader::new(openai);
    let mut openai_events = openai.until_content().await;

    let sent = Instant::now();
    node.process.signal("TERM").await;

    let code = read_until_close(&mut ws, &generation, &mut ws_reply).await;
    assert_eq!(ws_reply.text, whole, "the WebSocket reply is complete");
    assert_eq!(ws_reply.last()["type"], "done");
    assert_eq!(code, Some(1012), "then the drain closes it: reconnect");

    sse_reply.read(&mut sse, |_| false).await;
    assert!(sse_reply.done && !sse_reply.reconnect, "{sse_reply:?}");
    assert_eq!(sse_reply.text, whole);

    openai_events.extend(openai.collect().await);
    assert_eq!(content_of(&openai_events), whole);
    assert!(
        openai_events.contains(&ClientEvent::Done),
        "ends with [DONE]"
    );

    assert_exits_cleanly(cluster.node_mut("solo"), sent).await;

    // A fresh instance on the same database finds everything acknowledged.
    let check = cluster.spawn_node("check").await;
    assert_stored(&check, "u1", &ws_conversation, &whole).await;
    assert_stored(&check, "u2", &sse_conversation, &whole).await;
}

/// Two instances and Redis: SIGTERM on A moves its clients (WebSocket
/// close 1012, in batches; native SSE `reconnect`); A keeps producing the
/// replies; each client resumes on B from where it was, to the complete
/// reply; A exits 0 and every message is stored.
#[tokio::test]
async fn with_redis_clients_resume_on_the_other_instance() {
    let mut cluster = Cluster::start(&["b"], ClusterSettings::default()).await;
    let tokens = story(60);
    let whole = tokens.concat();
    cluster
        .upstream
        .set_default(openai_stream(&refs(&tokens), Duration::from_millis(40)));
    let a = cluster
        .spawn_node_with_server(
            "a",
            &format!(
                "shutdown_grace_secs = {GRACE_SECS}\ndrain_batch_size = 1\ndrain_batch_interval_ms = 100"
            ),
        )
        .await;
    cluster.nodes.push(a);
    let (a, b) = (cluster.node("a"), cluster.node("b"));

    let mut ws_clients = Vec::new();
    for user in ["u1", "u2"] {
        let conversation = a.conversation(user).await;
        let mut ws = a.ws(user).await;
        let (ack, _) = ws
            .send_message(&conversation, "Story", &format!("m-{user}"))
            .await;
        let generation = ack["generation_id"].as_str().unwrap().to_owned();
        let epoch = ack["epoch"].as_u64().unwrap();
        ws.until_reply(&generation).await;
        let mut streamed = Streamed::at(0);
        ws.continue_stream(&generation, &mut streamed, WAIT, |s| s.next >= 3)
            .await;
        ws_clients.push((user, conversation, ws, generation, epoch, streamed));
    }
    let sse_conversation = a.conversation("u3").await;
    let mut sse = sse_send(a, "u3", &sse_conversation, "m-u3").await;
    let mut sse_reply = SseReply::default();
    sse_reply.read(&mut sse, |r| !r.text.is_empty()).await;

    let sent = Instant::now();
    a.process.signal("TERM").await;

    // WebSockets: closed with 1012 mid-reply; resumed on B to the end.
    for (user, _, ws, generation, epoch, streamed) in &mut ws_clients {
        let code = read_until_close(ws, generation, streamed).await;
        assert_eq!(code, Some(1012), "{user}: told to reconnect");
        assert!(
            streamed.text.len() < whole.len(),
            "{user}: moved before its reply ended (the drain did not wait)"
        );
        let cut = streamed.next;
        let mut resumer = b.ws(user).await;
        resumer.resume(generation, *epoch, cut).await;
        let rest = resumer.stream(generation, cut).await;
        assert_eq!(rest.last()["type"], "done", "{user}: {:?}", rest.last());
        assert_eq!(
            streamed.text.clone() + &rest.text,
            whole,
            "{user}: cut at {cut} on A, resumed on B: complete, no gap, no repeat"
        );
    }

    // SSE: a `reconnect` event ends the stream; Last-Event-ID on B
    // resumes it.
    sse_reply.read(&mut sse, |_| false).await;
    assert!(sse_reply.reconnect, "told to reconnect: {sse_reply:?}");
    assert!(!sse_reply.done);
    let last_id = sse_reply
        .last_id
        .clone()
        .expect("an event id to resume from");
    let resumed = client()
        .get(b.url(&format!(
            "/v1/generations/{}/events?user=u3",
            sse_reply.generation_id
        )))
        .header("last-event-id", last_id)
        .send()
        .await
        .unwrap();
    let mut resumed = Sse::new(resumed);
    sse_reply.read(&mut resumed, |_| false).await;
    assert!(sse_reply.done, "{sse_reply:?}");
    assert_eq!(sse_reply.text, whole, "the SSE reply is complete on B");

    assert_exits_cleanly(cluster.node_mut("a"), sent).await;
    let b = cluster.node("b");
    for (user, conversation, ..) in &ws_clients {
        assert_stored(b, user, conversation, &whole).await;
    }
    assert_stored(b, "u3", &sse_conversation, &whole).await;
}

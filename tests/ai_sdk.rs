//! Vercel AI SDK compatibility: `POST /v1/ai/chat` speaks the UI message
//! stream, `GET /v1/ai/chat/{id}/stream` is `useChat`'s resume request. The
//! wire format is checked part by part, then the real `ai` package's
//! client (`DefaultChatTransport` + `readUIMessageStream`, what `useChat`
//! runs) consumes both endpoints. `scripts/test.sh` installs it under
//! `tests/browser/node_modules`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn body(id: &str, text: &str) -> Value {
    json!({
        "id": id,
        "trigger": "submit-message",
        "messages": [{ "id": "m1", "role": "user", "parts": [{ "type": "text", "text": text }] }]
    })
}

async fn post(gateway: &TestGateway, user: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gateway.url("/v1/ai/chat"))
        .header("x-spillway-user", user)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn resume(gateway: &TestGateway, user: &str, chat: &str) -> reqwest::Response {
    client()
        .get(gateway.url(&format!("/v1/ai/chat/{chat}/stream")))
        .header("x-spillway-user", user)
        .send()
        .await
        .unwrap()
}

/// The JSON parts of a stream, asserting it ends with exactly one `[DONE]`.
fn parts(events: &[ClientEvent]) -> Vec<Value> {
    assert_eq!(events.last(), Some(&ClientEvent::Done), "{events:?}");
    assert_eq!(
        events.iter().filter(|e| **e == ClientEvent::Done).count(),
        1
    );
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Json(v) => Some(v.clone()),
            _ => None,
        })
        .collect()
}

fn text_of(parts: &[Value]) -> String {
    parts
        .iter()
        .filter(|p| p["type"] == "text-delta")
        .map(|p| p["delta"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_reply_is_the_exact_ui_message_stream() {
    let upstream = FakeUpstream::start().await;
    // Tokens apart in time: ones that arrive together are coalesced into
    // one delta (by design), and this test pins the exact parts.
    upstream.push(openai_stream(
        &["Hel", "lo", " 🚀"],
        Duration::from_millis(30),
    ));
    let gateway = TestGateway::openai(&upstream).await;

    let response = post(&gateway, "ada", &body("chat-1", "Hi")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let parts = parts(&SseReader::new(response).collect().await);
    let message_id = parts[0]["messageId"].as_str().unwrap().to_owned();
    assert!(message_id.starts_with("msg-"), "{message_id}");
    assert_eq!(
        parts,
        vec![
            json!({ "type": "start", "messageId": message_id }),
            json!({ "type": "text-start", "id": "text-1" }),
            json!({ "type": "text-delta", "id": "text-1", "delta": "Hel" }),
            json!({ "type": "text-delta", "id": "text-1", "delta": "lo" }),
            json!({ "type": "text-delta", "id": "text-1", "delta": " 🚀" }),
            json!({ "type": "text-end", "id": "text-1" }),
            json!({ "type": "finish", "finishReason": "stop" }),
        ]
    );
    // The UI messages went upstream as OpenAI chat messages, model defaulted.
    let sent = &upstream.requests()[0].body;
    assert_eq!(sent["model"], "fake-model");
    assert_eq!(
        sent["messages"],
        json!([{ "role": "user", "content": "Hi" }])
    );
}

#[tokio::test]
async fn an_upstream_failure_mid_reply_is_an_error_part_not_a_finish() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript(
        "composed-openai-chat-error-midstream.sse",
    ));
    let gateway = TestGateway::openai(&upstream).await;

    let response = post(&gateway, "ada", &body("chat-err", "Hi")).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let parts = parts(&SseReader::new(response).collect().await);
    assert!(!text_of(&parts).is_empty(), "the partial text came first");
    assert!(
        parts.iter().all(|p| p["type"] != "finish"),
        "never a clean finish: {parts:?}"
    );
    let n = parts.len();
    assert_eq!(parts[n - 2], json!({ "type": "text-end", "id": "text-1" }));
    assert_eq!(
        parts[n - 1],
        json!({
            "type": "error",
            "errorText": "upstream_unavailable: The synthetic provider rejected this streamed request."
        })
    );
}

#[tokio::test]
async fn bad_bodies_are_typed_400s_naming_the_field() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let long = "x".repeat(129);
    let cases = [
        (body("", "Hi"), "id"),
        (body(&long, "Hi"), "id"),
        (
            json!({ "id": "c", "messages": [{ "role": "tool", "parts": [{ "type": "text", "text": "x" }] }] }),
            "messages[0].role",
        ),
        (json!({ "id": "c", "messages": [] }), "messages"),
        (
            json!({ "id": "c", "model": "no-such-model", "messages": [{ "role": "user", "parts": [{ "type": "text", "text": "x" }] }] }),
            "model",
        ),
    ];
    for (request, param) in cases {
        let response = post(&gateway, "ada", &request).await;
        let status = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        assert!(matches!(status, 400 | 404), "{request} → {status} {error}");
        assert_eq!(error["error"]["param"], param, "{request} → {error}");
        assert!(error["error"]["code"].is_string(), "{error}");
    }
    // Not JSON at all.
    let response = client()
        .post(gateway.url("/v1/ai/chat"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert!(upstream.requests().is_empty(), "nothing reached upstream");
}

#[tokio::test]
async fn the_resume_request_replays_a_live_reply_from_its_start() {
    let upstream = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("Part one."), Step::AwaitRelease];
    steps.push(openai_text_chunk(" Part two."));
    steps.extend(openai_finish(3, 2));
    upstream.push(Script::sse(steps));
    let gateway = TestGateway::openai(&upstream).await;

    // The first tab reads the first token, then goes away (a reload).
    let mut first = SseReader::new(post(&gateway, "ada", &body("chat-r", "Hi")).await);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e| matches!(e, ClientEvent::Json(v) if v["type"] == "text-delta"))
    {
        seen.push(first.next().await.expect("first token"));
    }
    drop(first.into_inner());

    // Another user asking for the same chat id finds nothing.
    assert_eq!(resume(&gateway, "mallory", "chat-r").await.status(), 204);
    assert_eq!(resume(&gateway, "ada", "no-such-chat").await.status(), 204);

    let again = resume(&gateway, "ada", "chat-r").await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-vercel-ai-ui-message-stream"], "v1");
    upstream.release();
    let parts = parts(&SseReader::new(again).collect().await);
    assert_eq!(parts[0]["type"], "start");
    assert_eq!(
        text_of(&parts),
        "Part one. Part two.",
        "from the start, once"
    );
    assert_eq!(
        parts.last().unwrap(),
        &json!({ "type": "finish", "finishReason": "stop" })
    );
    assert_eq!(upstream.requests().len(), 1, "one generation, read twice");
}

#[tokio::test]
async fn ai_sdk_chats_are_stored_as_history() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&["Stored", " reply"], Duration::ZERO));
    let gateway = TestGateway::openai(&upstream).await;

    let events = SseReader::new(post(&gateway, "kay", &body("chat-s", "Remember me")).await)
        .collect()
        .await;
    assert_eq!(text_of(&parts(&events)), "Stored reply");
    gateway.persister().flushed().await;

    let list: Value = client()
        .get(gateway.url("/v1/conversations"))
        .header("x-spillway-user", "kay")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversations = list["data"].as_array().unwrap();
    assert_eq!(conversations.len(), 1, "{list}");
    assert_eq!(conversations[0]["metadata"]["source"], "ai-sdk");
    let id = conversations[0]["id"].as_str().unwrap();
    let messages: Value = client()
        .get(gateway.url(&format!("/v1/conversations/{id}/messages")))
        .header("x-spillway-user", "kay")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = messages["data"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["content"], "Remember me");
    assert_eq!(messages[1]["content"], "Stored reply");
    assert_eq!(messages[1]["status"], "complete");
}

/// `node ai_sdk_client.mjs …` in `tests/browser` (where the `ai` package
/// is installed). Fails, never skips, without node or the package.
async fn ai_client(args: &[&str]) -> Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/ai/package.json").exists(),
        "the `ai` npm package is missing: run scripts/test.sh (it runs npm ci in tests/browser)"
    );
    let output = tokio::process::Command::new("node")
        .arg("ai_sdk_client.mjs")
        .args(args)
        .current_dir(&dir)
        .output()
        .await
        .expect("node runs (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "ai_sdk_client.mjs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("ai_sdk_client prints JSON")
}

#[tokio::test]
async fn the_ai_packages_own_client_reads_replies_and_resumes() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["The", " AI", " SDK", " reads", " this", " — naïve ✓."];
    upstream.push(openai_stream(&tokens, Duration::from_millis(5)));
    let gateway = TestGateway::openai(&upstream).await;
    let base = gateway.url("");

    let sent = ai_client(&["send", &base, "ada", "chat-node", "Hello"]).await;
    assert_eq!(sent["text"], tokens.concat(), "{sent}");
    assert_eq!(sent["role"], "assistant");
    assert_eq!(sent["errors"], json!([]));
    assert!(
        sent["types"].as_array().unwrap().contains(&json!("text")),
        "{sent}"
    );

    // useChat's resume request, for a reply still held, and for none.
    let resumed = ai_client(&["resume", &base, "ada", "chat-node"]).await;
    assert_eq!(resumed["text"], tokens.concat(), "{resumed}");
    let none = ai_client(&["resume", &base, "ada", "chat-unknown"]).await;
    assert_eq!(none, json!({ "none": true }));
}

//! `/metrics` scraped from a real gateway after real events: a stream, a
//! fail-over, a slow-consumer close and a rate-limit rejection each move
//! their counters, with the expected labels; no label carries a user id.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One scrape: `name{labels}` → value, as the exposition writes them.
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    async fn of(gateway: &TestGateway) -> Self {
        let response = client().get(gateway.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = response.text().await.unwrap();
        assert!(text.ends_with("# EOF\n"), "a complete exposition");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { text, samples }
    }

    /// The sample named exactly `key` (0 when absent).
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }
}

/// Two providers for `gpt-test`: `down` (always 503) first, then `up`.
fn failover_config(down: &FakeUpstream, up: &FakeUpstream) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[routing]
retries_per_target = 0

[[providers]]
name = "down"
kind = "openai"
base_url = "{}"

[[providers]]
name = "up"
kind = "openai"
base_url = "{}"

[[models]]
name = "gpt-test"
targets = [{{ provider = "down", model = "m-down", tier = 0 }}, {{ provider = "up", model = "m-up", tier = 1 }}]

[[limits.tiers]]
name = "default"
requests_per_minute = 2
"#,
        down.base_url(),
        up.base_url()
    )
}

/// A stream that fails over from `down` to `up`: the attempts of both
/// are counted by outcome, the fail-over by route, and the relayed stream
/// by transport, target and tenant usage.
#[tokio::test]
async fn a_stream_and_a_failover_move_their_counters() {
    let down = FakeUpstream::start().await;
    down.set_default(Script::json(
        503,
        json!({ "error": { "message": "overloaded" } }),
    ));
    let up = FakeUpstream::start().await;
    up.set_default(openai_stream(
        &["Hello", " there", " friend"],
        Duration::ZERO,
    ));
    let gateway = TestGateway::start(&failover_config(&down, &up)).await;
    let before = Scrape::of(&gateway).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    assert_eq!(content_of(&events), "Hello there friend");

    let after = Scrape::of(&gateway).await;
    let moved = |key: &str| after.get(key) - before.get(key);
    assert_eq!(
        moved(r#"spillway_upstream_attempts_total{provider="down",outcome="unavailable"}"#),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(
        moved(r#"spillway_upstream_attempts_total{provider="up",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"spillway_upstream_failovers_total{route="gpt-test"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"spillway_upstream_deltas_total{provider="up",model="m-up"}"#),
        3.0
    );
    assert_eq!(
        moved(r#"spillway_upstream_ttft_seconds_count{provider="up",model="m-up"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"spillway_upstream_inter_token_seconds_count{provider="up",model="m-up"}"#),
        2.0
    );
    assert_eq!(
        moved(r#"spillway_connections_opened_total{transport="openai"}"#),
        1.0
    );
    assert_eq!(moved("spillway_generations_started_total"), 1.0);
    // Usage is billed from the upstream's report (7 prompt, 3 completion).
    let completion = r#"spillway_usage_tokens_total{tenant="default",provider="up",model="m-up",kind="completion"}"#;
    let mut usage = after.get(completion);
    for _ in 0..100 {
        if usage > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        usage = Scrape::of(&gateway).await.get(completion);
    }
    assert_eq!(usage, 3.0);
    // The breaker of each target is exported (closed: 0).
    assert!(
        after
            .text
            .contains(r#"spillway_breaker_state{provider="up",model="m-up"} 0"#),
        "{}",
        after.text
    );
}

/// A request over the tier's budget is refused (429) and counted by
/// reason; the user's id appears in no label.
#[tokio::test]
async fn a_rate_limit_rejection_is_counted_by_reason() {
    let down = FakeUpstream::start().await;
    let up = FakeUpstream::start().await;
    let gateway = TestGateway::start(&failover_config(&down, &up)).await;
    let before = Scrape::of(&gateway).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client()
            .get(gateway.url("/v1/conversations"))
            .header("x-spillway-user", "ada-lovelace")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let after = Scrape::of(&gateway).await;
    assert_eq!(
        after.get(r#"spillway_rate_limited_total{reason="request"}"#)
            - before.get(r#"spillway_rate_limited_total{reason="request"}"#),
        1.0,
        "{}",
        after.text
    );
    assert!(!after.text.contains("ada-lovelace"));
}

/// A WebSocket client that stops reading is closed as a slow consumer
/// (1013), counted under `connection_closes{transport="ws",reason="slow_consumer"}`,
/// and the live connection gauge falls back.
#[tokio::test]
async fn a_slow_consumer_close_is_counted() {
    let upstream = FakeUpstream::start().await;
    let mut config = test_config(&openai_config(&upstream));
    config.generation.max_reply_bytes = 64 * 1024 * 1024;
    config.chat.write_timeout_ms = 300;
    let gateway = TestGateway::start_with(config).await;
    let piece = "x".repeat(4095) + " ";
    let mut steps = vec![openai_text_chunk("start ")];
    for _ in 0..2048 {
        steps.push(openai_text_chunk(&piece));
    }
    steps.extend(openai_finish(10, 2049));
    upstream.push(Script::sse(steps));

    let created: Value = client()
        .post(gateway.url("/v1/conversations"))
        .header("x-spillway-user", "slow")
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation = created["id"].as_str().unwrap().to_owned();

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gateway.addr).await.unwrap();
    let mut request = format!("ws://{}/v1/ws", gateway.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "spillway.v1".parse().unwrap());
    request
        .headers_mut()
        .insert("x-spillway-user", "slow".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let before = Scrape::of(&gateway).await;
    assert_eq!(before.get(r#"spillway_connections{transport="ws"}"#), 1.0);
    ws.send(Message::Text(
        json!({ "type": "send", "conversation_id": conversation, "content": "a lot", "client_message_id": "m1" })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    // Read up to the ack, then never again; the gateway gives up on the
    // socket.
    let generation = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            if frame["type"] == "ack" {
                break frame["generation_id"].as_str().unwrap().to_owned();
            }
        }
    };
    let mut closed = false;
    for _ in 0..600 {
        if gateway.gateway.connections.is_empty() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(closed, "the slow connection was closed");
    let after = Scrape::of(&gateway).await;
    assert_eq!(
        after.get(r#"spillway_connection_closes_total{transport="ws",reason="slow_consumer"}"#),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.get(r#"spillway_connections_opened_total{transport="ws"}"#),
        1.0
    );
    // The gauge counts the socket until it is gone (the close handshake
    // may wait a little for the client).
    drop(ws);
    let mut live = 1.0;
    for _ in 0..400 {
        live = Scrape::of(&gateway)
            .await
            .get(r#"spillway_connections{transport="ws"}"#);
        if live == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(live, 0.0, "the live WebSocket gauge fell back to 0");
    // The reply kept streaming into its log; reading it again from the
    // start hands over many events per frame.
    let resumed = client()
        .get(gateway.url(&format!(
            "/v1/generations/{generation}/events?user=slow&from=0"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let body = resumed.text().await.unwrap();
    assert!(body.contains("event: done"), "the reply completed");
    let resumed = Scrape::of(&gateway).await;
    let frames = resumed.get("spillway_coalesced_frames_total");
    let events = resumed.get("spillway_coalesced_events_total");
    assert!(frames >= 1.0, "{}", resumed.text);
    assert!(
        events >= 2.0 * frames,
        "{frames} frames merged {events} events"
    );
}

/// With `server.admin_listen` set, `/metrics` moves to the admin address
/// and the public listener no longer serves it.
#[tokio::test]
async fn metrics_can_move_to_the_admin_listener() {
    let mut config = test_config("[server]\nlisten = \"127.0.0.1:0\"\n");
    config.server.admin_listen = "127.0.0.1:0".into();
    let gateway = TestGateway::start_with(config).await;
    let response = client().get(gateway.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 404);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let app = spillway::http::admin_router(std::sync::Arc::clone(&gateway.gateway));
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let response = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("# TYPE spillway_draining gauge")
    );
}

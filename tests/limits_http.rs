//! Rate limits and caps as clients meet them, over real sockets: 429 with
//! `Retry-After` and `X-RateLimit-*` on HTTP, a typed error on a
//! WebSocket, nothing started upstream for a refused request, and other
//! users untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const WAIT: Duration = Duration::from_secs(15);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn chat(gateway: &TestGateway, user: &str) -> reqwest::Response {
    client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-spillway-user", user)
        .json(&chat_body("gpt-test", false))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn completions_past_the_message_rate_are_429_with_headers_and_never_reach_the_upstream() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["ok"], Duration::ZERO));
    let mut config = test_config(&openai_config(&upstream));
    config.limits.tiers[0].messages_per_minute = 3;
    let gateway = TestGateway::start_with(config).await;

    for _ in 0..3 {
        assert_eq!(chat(&gateway, "ada").await.status().as_u16(), 200);
    }
    let refused = chat(&gateway, "ada").await;
    assert_eq!(refused.status().as_u16(), 429);
    let headers = refused.headers().clone();
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(headers["x-ratelimit-limit"], "3");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(headers.contains_key("x-ratelimit-reset"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        upstream.requests().len(),
        3,
        "the refused call cost nothing"
    );

    // Another user has a budget of their own.
    assert_eq!(chat(&gateway, "bob").await.status().as_u16(), 200);
    assert_eq!(upstream.requests().len(), 4);
}

async fn ws(gateway: &TestGateway, user: &str) -> Ws {
    let mut request = format!("ws://{}/v1/ws", gateway.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("spillway.v1"),
    );
    request
        .headers_mut()
        .insert("x-spillway-user", HeaderValue::from_str(user).unwrap());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    ws
}

async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Some(json!({ "closed": frame.map(|f| u16::from(f.code)) }));
            }
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

#[tokio::test]
async fn websocket_connections_past_the_cap_get_a_typed_error_and_1013_and_a_closed_one_frees_its_slot()
 {
    let upstream = FakeUpstream::start().await;
    let mut config = test_config(&openai_config(&upstream));
    config.limits.tiers[0].max_connections_per_user = 2;
    let gateway = TestGateway::start_with(config).await;

    let mut first = ws(&gateway, "ada").await;
    assert_eq!(next_json(&mut first).await.unwrap()["type"], "hello");
    let mut second = ws(&gateway, "ada").await;
    assert_eq!(next_json(&mut second).await.unwrap()["type"], "hello");

    let mut third = ws(&gateway, "ada").await;
    let error = next_json(&mut third).await.unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "too_many_connections");
    assert_eq!(error["retryable"], true);
    assert_eq!(next_json(&mut third).await.unwrap()["closed"], 1013);

    // Another user is not affected; ada's first connection still works.
    let mut bob = ws(&gateway, "bob").await;
    assert_eq!(next_json(&mut bob).await.unwrap()["type"], "hello");
    first
        .send(Message::text(
            json!({ "type": "ping", "id": 1 }).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(next_json(&mut first).await.unwrap()["type"], "pong");

    // Closing one frees a slot.
    second.close(None).await.unwrap();
    drop(second);
    let mut admitted = false;
    for _ in 0..100 {
        let mut again = ws(&gateway, "ada").await;
        if next_json(&mut again).await.unwrap()["type"] == "hello" {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a closed connection's slot is freed");
}

//! Per-connection backpressure over a real WebSocket: a client that stops
//! reading costs the gateway a bounded number of bytes, slows neither the
//! upstream nor anyone else, is closed as a slow consumer (1013), and can
//! resume to the exact text.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket to the gateway as `user`, with a receive buffer of
/// `recv_buffer` bytes (small: the client cannot absorb much).
async fn connect(gateway: &TestGateway, user: &str, recv_buffer: Option<u32>) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(gateway.addr).await.unwrap();
    let mut request = format!("ws://{}/v1/ws", gateway.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "spillway.v1".parse().unwrap());
    request
        .headers_mut()
        .insert("x-spillway-user", user.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    ws
}

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("valid frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

async fn conversation(gateway: &TestGateway, user: &str) -> String {
    let response = client()
        .post(gateway.url("/v1/conversations"))
        .header("x-spillway-user", user)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_client_that_stops_reading_is_bounded_isolated_closed_and_resumable() {
    let upstream = FakeUpstream::start().await;
    let mut config = test_config(&openai_config(&upstream));
    config.generation.max_reply_bytes = 64 * 1024 * 1024;
    config.generation.grace_secs = 60;
    config.chat.write_timeout_ms = 2_000;
    let gateway = TestGateway::start_with(config).await;

    // The slow client's reply: 16 MiB of text, as fast as the upstream can.
    let piece = "x".repeat(4095) + " ";
    let pieces = 4096;
    let mut steps = vec![openai_text_chunk("start ")];
    for _ in 0..pieces {
        steps.push(openai_text_chunk(&piece));
    }
    steps.extend(openai_finish(10, pieces as u64 + 1));
    upstream.push(Script::sse(steps));
    let expected = format!("start {}", piece.repeat(pieces));

    let slow_conversation = conversation(&gateway, "slow").await;
    let mut slow = connect(&gateway, "slow", Some(4096)).await;
    slow.send(Message::Text(
        json!({ "type": "send", "conversation_id": slow_conversation, "content": "a lot please", "client_message_id": "m1" })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    // Read up to the first delta, then stop reading.
    let mut text = String::new();
    let mut next;
    let mut generation = Value::Null;
    let mut epoch = Value::Null;
    loop {
        let frame = next_frame(&mut slow).await;
        if frame["type"] == "ack" {
            generation = frame["generation_id"].clone();
            epoch = frame["epoch"].clone();
        }
        if frame["type"] == "delta" {
            text.push_str(frame["text"].as_str().unwrap());
            next = frame["next"].as_u64().unwrap();
            break;
        }
    }

    // The upstream is read to its end at full speed, whatever the client.
    let closed = tokio::time::timeout(Duration::from_secs(20), upstream.wait_closed(1))
        .await
        .expect("the upstream was read to the end");
    assert!(closed[0].completed, "the upstream body ran to completion");

    // Another user's reply streams meanwhile, in full.
    let mut paced = Vec::new();
    for i in 0..20 {
        paced.push(format!(" t{i}"));
    }
    let paced_refs: Vec<&str> = paced.iter().map(String::as_str).collect();
    upstream.push(openai_stream(&paced_refs, Duration::from_millis(5)));
    let fast_conversation = conversation(&gateway, "fast").await;
    let mut fast = connect(&gateway, "fast", None).await;
    fast.send(Message::Text(
        json!({ "type": "send", "conversation_id": fast_conversation, "content": "hi", "client_message_id": "f1" })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut fast_text = String::new();
    loop {
        let frame = next_frame(&mut fast).await;
        match frame["type"].as_str() {
            Some("delta") => fast_text.push_str(frame["text"].as_str().unwrap()),
            Some("done") => break,
            Some("error") => panic!("{frame}"),
            _ => {}
        }
    }
    assert_eq!(fast_text, paced.concat());

    // While jammed, the gateway holds at most a frame or so for the slow
    // connection beyond the shared log.
    let mut most = 0;
    let mut slow_closed = false;
    for _ in 0..200 {
        let live = gateway.gateway.connections.all();
        for (_, stats) in &live {
            most = most.max(stats.buffered_bytes());
        }
        if live.len() < 2 {
            slow_closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("most bytes held for one connection while jammed: {most}");
    assert!(
        most <= 64 * 1024,
        "buffered {most} bytes for one connection"
    );
    assert!(
        slow_closed,
        "the slow connection was closed after its write timeout"
    );

    // The slow client drains what the kernel held and finds the 1013 close.
    let mut close_code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(Message::Text(frame)))) => {
                let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
                if frame["type"] == "delta" {
                    text.push_str(frame["text"].as_str().unwrap());
                    next = frame["next"].as_u64().unwrap();
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => break,
        }
    }
    assert_eq!(close_code, Some(1013), "closed as a slow consumer");

    // It resumes from where it got to, to the exact text.
    let mut resumed = connect(&gateway, "slow", None).await;
    resumed
        .send(Message::Text(
            json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": next })
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    loop {
        let frame = next_frame(&mut resumed).await;
        match frame["type"].as_str() {
            Some("delta") => text.push_str(frame["text"].as_str().unwrap()),
            Some("done") => break,
            Some("error") => panic!("{frame}"),
            _ => {}
        }
    }
    assert_eq!(text.len(), expected.len());
    assert!(text == expected, "resumed to the exact text");
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_4000() {
    let upstream = FakeUpstream::start().await;
    let mut config = test_config(&openai_config(&upstream));
    config.chat.ping_interval_secs = 1;
    config.chat.pong_timeout_secs = 1;
    let gateway = TestGateway::start_with(config).await;
    // tungstenite answers pings only while it is being read: not reading
    // is not answering.
    let mut silent = connect(&gateway, "quiet", None).await;
    let mut gone = false;
    for _ in 0..200 {
        if gateway.gateway.connections.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "the silent connection was closed");
    let mut close_code = None;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(5), silent.next()).await
    {
        if let Message::Close(frame) = message {
            close_code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(close_code, Some(4000));
}

//! Bad input gets a typed error, and leaves other streams untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Sends `body` raw and returns (status, error code, param).
async fn reject(gateway: &TestGateway, body: Vec<u8>) -> (u16, String, Value) {
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(body["error"]["request_id"].is_string());
    (
        status,
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["param"].clone(),
    )
}

#[tokio::test]
async fn bad_requests_get_typed_errors_while_a_stream_keeps_flowing() {
    let upstream = FakeUpstream::start().await;
    let tokens: Vec<String> = (0..40).map(|i| format!(" t{i}")).collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    upstream.push(openai_stream(&token_refs, Duration::from_millis(10)));
    let mut config = spillway::config::Config::parse(
        &openai_config(&upstream),
        std::path::Path::new("test.toml"),
        Vec::new(),
    )
    .unwrap();
    config.server.max_body_bytes = 4096;
    let gateway = TestGateway::start_with(config).await;

    // A healthy stream runs alongside every bad request.
    let stream = gateway.post_chat(&chat_body("gpt-test", true)).await;
    let alongside = tokio::spawn(SseReader::new(stream).collect());

    let cases: Vec<(&str, Vec<u8>, u16, &str, Value)> = vec![
        (
            "malformed JSON",
            b"{\"model\": \"gpt-test\", ".to_vec(),
            400,
            "invalid_json",
            Value::Null,
        ),
        (
            "trailing garbage",
            br#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]} x"#.to_vec(),
            400,
            "invalid_json",
            Value::Null,
        ),
        (
            "not an object",
            b"[1,2,3]".to_vec(),
            400,
            "invalid_type",
            Value::Null,
        ),
        (
            "model of the wrong type",
            br#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            400,
            "invalid_type",
            Value::from("model"),
        ),
        (
            "messages of the wrong type",
            br#"{"model":"gpt-test","messages":"hi"}"#.to_vec(),
            400,
            "invalid_type",
            Value::from("messages"),
        ),
        (
            "unknown role",
            br#"{"model":"gpt-test","messages":[{"role":"wizard","content":"x"}]}"#.to_vec(),
            400,
            "invalid_type",
            Value::from("messages[0].role"),
        ),
        (
            "stream of the wrong type",
            br#"{"model":"gpt-test","stream":"yes","messages":[{"role":"user","content":"x"}]}"#
                .to_vec(),
            400,
            "invalid_type",
            Value::from("stream"),
        ),
        (
            "missing messages",
            br#"{"model":"gpt-test"}"#.to_vec(),
            400,
            "invalid_type",
            Value::Null,
        ),
        (
            "empty messages",
            br#"{"model":"gpt-test","messages":[]}"#.to_vec(),
            400,
            "invalid_value",
            Value::from("messages"),
        ),
        (
            "message without content",
            br#"{"model":"gpt-test","messages":[{"role":"user"}]}"#.to_vec(),
            400,
            "invalid_value",
            Value::from("messages[0].content"),
        ),
        (
            "n > 1",
            br#"{"model":"gpt-test","n":3,"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            400,
            "unsupported_value",
            Value::from("n"),
        ),
        (
            "unknown model",
            br#"{"model":"gpt-nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "model_not_found",
            Value::from("model"),
        ),
        (
            "non-UTF-8 body",
            b"{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            400,
            "invalid_encoding",
            Value::Null,
        ),
        (
            "oversized body",
            format!(
                r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(8192)
            )
            .into_bytes(),
            413,
            "request_too_large",
            Value::Null,
        ),
    ];
    for (what, body, status, code, param) in cases {
        let (got_status, got_code, got_param) = reject(&gateway, body).await;
        assert_eq!((got_status, got_code.as_str()), (status, code), "{what}");
        if !param.is_null() {
            assert_eq!(got_param, param, "{what}: param");
        }
    }
    // Only the healthy stream ever reached the upstream.
    assert_eq!(upstream.requests().len(), 1);

    let events = alongside.await.unwrap();
    assert_eq!(content_of(&events), tokens.concat());
    assert_eq!(events.last(), Some(&ClientEvent::Done));
}

#[tokio::test]
async fn oversized_chunked_body_without_content_length_is_rejected() {
    let upstream = FakeUpstream::start().await;
    let mut config = spillway::config::Config::parse(
        &openai_config(&upstream),
        std::path::Path::new("test.toml"),
        Vec::new(),
    )
    .unwrap();
    config.server.max_body_bytes = 1024;
    let gateway = TestGateway::start_with(config).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 64])).collect();
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let response = client()
        .get(gateway.url("/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

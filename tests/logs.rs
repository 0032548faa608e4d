//! Log capture from the real binary: every line of a request's work
//! carries its request id (the HTTP handler's lines and the reply's own
//! task, a failed upstream attempt included); the request id and the
//! client's W3C trace context travel upstream; no secret or message
//! content is logged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const REQUEST_ID: &str = "req-log-capture-4242";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const PROVIDER_KEY: &str = "sk-upstream-secret-log-capture-0123456789";
const SECRET_PROMPT: &str = "my-private-prompt-text-7781";

/// The JSON log lines of `log` that mention `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test]
async fn every_line_of_a_requests_work_carries_its_request_id() {
    let upstream = FakeUpstream::start().await;
    // The first attempt fails (logged as a warning by the reply's task),
    // the retry streams.
    upstream.push(Script::json(
        503,
        json!({ "error": { "message": "overloaded" } }),
    ));
    upstream.push(openai_stream(&["Hi", " there"], Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[store]
data_dir = "{data}"

[routing]
retries_per_target = 1
backoff_base_ms = 1
backoff_max_ms = 2

[[providers]]
name = "fake"
kind = "openai"
base_url = "{base}"
api_key_env = "SPILLWAY_TEST_LOG_KEY"

[[models]]
name = "gpt-test"
targets = [{{ provider = "fake", model = "fake-model" }}]
"#,
        data = dir.path().display(),
        base = upstream.base_url()
    );
    let path = dir.path().join("spillway.toml");
    std::fs::write(&path, config).unwrap();
    let gateway = Process::serve_isolated(
        &["--config", path.to_str().unwrap()],
        &[
            ("SPILLWAY_LOG_LEVEL", "debug"),
            ("SPILLWAY_TEST_LOG_KEY", PROVIDER_KEY),
        ],
    )
    .await;

    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-request-id", REQUEST_ID)
        .header("traceparent", TRACEPARENT)
        .header("x-spillway-user", "alice")
        .json(&json!({
            "model": "gpt-test",
            "stream": true,
            "messages": [{ "role": "user", "content": SECRET_PROMPT }]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], REQUEST_ID);
    let events = SseReader::new(response).collect().await;
    assert_eq!(content_of(&events), "Hi there");
    let chunk_id = events
        .iter()
        .find_map(|e| match e {
            ClientEvent::Json(v) => v["id"].as_str().map(str::to_owned),
            _ => None,
        })
        .expect("a chunk with an id");
    let generation = chunk_id.trim_start_matches("chatcmpl-").to_owned();

    // Upstream: both attempts carry the request id and a child of the
    // client's trace (same trace id, a new parent id, same flags).
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.headers["x-request-id"], REQUEST_ID);
        let traceparent = request.headers["traceparent"].to_str().unwrap();
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{traceparent}"
        );
        assert!(traceparent.ends_with("-01"));
        assert_ne!(traceparent, TRACEPARENT, "a child, not the client's span");
    }

    // The reply's last lines (usage, the stored message) come after the
    // stream: wait for them.
    let mut log = String::new();
    for _ in 0..100 {
        log = gateway.log_text();
        if lines_with(&log, &generation)
            .iter()
            .any(|l| l.contains("generation finished") || l.contains("usage"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let of_generation = lines_with(&log, &generation);
    assert!(
        of_generation.len() >= 2,
        "the reply's work is logged: {log}"
    );
    for line in &of_generation {
        assert!(line.contains(REQUEST_ID), "no request id on: {line}");
        let _: Value = serde_json::from_str(line).expect("JSON lines");
    }
    let failed = lines_with(&log, "upstream attempt failed");
    assert_eq!(failed.len(), 1, "{log}");
    assert!(
        failed[0].contains(REQUEST_ID) && failed[0].contains(&generation),
        "the failed attempt's warning names its request and reply: {}",
        failed[0]
    );
    let of_request = lines_with(&log, REQUEST_ID);
    assert!(of_request.len() >= of_generation.len());

    for secret in [PROVIDER_KEY, SECRET_PROMPT, "Hi there"] {
        assert!(!log.contains(secret), "{secret:?} reached the log");
    }
}

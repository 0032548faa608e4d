//! The official OpenAI Python SDK, pointed at the gateway's `base_url`,
//! sees exactly what the upstream sent. `scripts/test.sh` installs the SDK
//! into `target/test-venv`; `SPILLWAY_TEST_PYTHON` may name another Python.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The Python with the `openai` package. Fails (never skips) without it.
fn python() -> PathBuf {
    let candidate = std::env::var_os("SPILLWAY_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python"),
        PathBuf::from,
    );
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with the openai SDK at {}: run scripts/test.sh (it installs it) or set SPILLWAY_TEST_PYTHON",
        candidate.display()
    );
    candidate
}

async fn run_sdk(gateway: &TestGateway, model: &str, mode: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_consumer.py");
    let output = tokio::process::Command::new(python())
        .arg(script)
        .arg(gateway.url("/v1"))
        .arg(model)
        .arg(mode)
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "sdk_consumer.py {mode} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("sdk_consumer prints JSON")
}

#[tokio::test]
async fn openai_python_sdk_streams_the_upstream_text() {
    let upstream = FakeUpstream::start().await;
    let tokens = [
        "The", " quick", " brown", " fox", " — ", "naïve", " café", " 🚀", ".",
    ];
    upstream.push(openai_stream(&tokens, Duration::from_millis(2)));
    let gateway = TestGateway::openai(&upstream).await;

    let seen = run_sdk(&gateway, "gpt-test", "stream").await;
    assert_eq!(seen["text"], tokens.concat());
    assert_eq!(seen["finish"], "stop");
    assert_eq!(
        seen["usage"],
        json!({ "prompt_tokens": 7, "completion_tokens": tokens.len(), "total_tokens": 7 + tokens.len() })
    );
}

#[tokio::test]
async fn openai_python_sdk_gets_a_whole_completion() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript("openai-chat-text-include-usage.sse"));
    let gateway = TestGateway::openai(&upstream).await;

    let seen = run_sdk(&gateway, "gpt-test", "complete").await;
    // The text of the recorded gpt-4o stream, reassembled.
    assert_eq!(
        seen["text"],
        "I'm unable to provide real-time weather updates. To get the current weather in San Francisco, I recommend checking a reliable weather website or a weather app."
    );
    assert_eq!(seen["finish"], "stop");
    assert_eq!(seen["usage"]["prompt_tokens"], 14);
    assert_eq!(seen["usage"]["completion_tokens"], 30);
    assert!(seen["id"].as_str().unwrap().starts_with("chatcmpl-"));
}

#[tokio::test]
async fn openai_python_sdk_raises_on_an_error_mid_stream() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript(
        "composed-openai-chat-error-midstream.sse",
    ));
    let gateway = TestGateway::openai(&upstream).await;

    let seen = run_sdk(&gateway, "gpt-test", "stream-error").await;
    assert_eq!(
        seen["error"],
        "The synthetic provider rejected this streamed request."
    );
    assert_eq!(seen["text"], "I'm unable to");
}

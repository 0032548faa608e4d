//! How the gateway routes around misbehaving providers, scenario by
//! scenario, against the scriptable fake upstream on tokio's paused clock:
//! each test asserts the attempts the upstream saw, the (virtual) delays
//! between them, a bound on the whole call, and what the client received.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use spillway::config::{Config, FallbackOn};
use spillway::generation::{Outcome, Read, Registry, Reply, StartOptions};
use spillway::routing::{AfterCommit, Router};
use spillway::usage::{AttemptOutcome, Pricing};
use tokio::time::Instant;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// One route `chat` over `primary` then (optionally) `fallback`, with short
/// timeouts: first token 5 s, idle 3 s, backoff from 200 ms.
fn config(primary: &FakeUpstream, fallback: Option<(&FakeUpstream, bool)>) -> Config {
    let mut toml = format!(
        r#"
[routing]
ttft_timeout_ms = 5000
idle_timeout_ms = 3000
backoff_base_ms = 200
backoff_max_ms = 2000

[[providers]]
name = "primary"
kind = "openai"
base_url = "{}"
"#,
        primary.base_url()
    );
    let mut targets = r#"{ provider = "primary", model = "primary-model" }"#.to_owned();
    if let Some((fallback, prefill)) = fallback {
        toml.push_str(&format!(
            "\n[[providers]]\nname = \"fallback\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
            fallback.base_url()
        ));
        targets.push_str(&format!(
            r#", {{ provider = "fallback", model = "fallback-model", prefill = {prefill} }}"#
        ));
    }
    toml.push_str(&format!(
        "\n[[models]]\nname = \"chat\"\ntargets = [{targets}]\n"
    ));
    let mut config = test_config(&toml);
    // The paused clock jumps while real threads (SQLite's) work: keep
    // persistence, which these scenarios do not look at, out of them.
    config.store.enabled = false;
    config
}

/// Streams a chat request and returns everything the client saw.
async fn chat(gateway: &TestGateway) -> Vec<ClientEvent> {
    let mut body = chat_body("chat", true);
    body["stream_options"] = json!({ "include_usage": true });
    let response = gateway.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    SseReader::new(response).collect().await
}

/// Sends a chat request that must fail before any byte: (status, error).
async fn chat_error(gateway: &TestGateway) -> (u16, Value) {
    let response = gateway.post_chat(&chat_body("chat", false)).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

fn chunks(events: &[ClientEvent]) -> Vec<&Value> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Json(v) => Some(v),
            _ => None,
        })
        .collect()
}

fn usage_of(events: &[ClientEvent]) -> Value {
    let usage: Vec<&Value> = chunks(events)
        .into_iter()
        .filter(|c| c.get("usage").is_some())
        .collect();
    assert_eq!(usage.len(), 1, "exactly one usage chunk");
    usage[0]["usage"].clone()
}

fn rate_limited() -> Script {
    Script::json(
        429,
        json!({ "error": { "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded" } }),
    )
}

fn unavailable(status: u16) -> Script {
    Script::json(
        status,
        json!({ "error": { "message": "The server is overloaded", "type": "server_error" } }),
    )
}

fn ok(tokens: &[&str]) -> Script {
    openai_stream(tokens, Duration::ZERO)
}

/// Gaps between consecutive requests an upstream saw.
fn gaps(upstream: &FakeUpstream) -> Vec<Duration> {
    let requests = upstream.requests();
    requests.windows(2).map(|w| w[1].at - w[0].at).collect()
}

fn assert_within(value: Duration, low: Duration, high: Duration, what: &str) {
    assert!(
        value >= low && value <= high,
        "{what}: {value:?} not within [{low:?}, {high:?}]"
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limited_with_retry_after_waits_as_asked_then_succeeds() {
    let primary = FakeUpstream::start().await;
    primary.push(rate_limited().header("retry-after", "2"));
    primary.push(ok(&["after", " waiting"]));
    let gateway = TestGateway::start_with(config(&primary, None)).await;

    let start = Instant::now();
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "after waiting");
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    assert_eq!(primary.requests().len(), 2);
    assert_within(
        gaps(&primary)[0],
        MS(2000),
        MS(2050),
        "Retry-After honoured",
    );
    assert!(start.elapsed() < MS(2500), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_honoured_too() {
    let primary = FakeUpstream::start().await;
    let when = std::time::SystemTime::now() + Duration::from_secs(3);
    primary.push(rate_limited().header("retry-after", &httpdate::fmt_http_date(when)));
    primary.push(ok(&["dated"]));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "dated");
    // The date has one-second resolution and the wall clock runs on while
    // virtual time is paused: somewhere between 1 and 3 seconds.
    assert_within(
        gaps(&primary)[0],
        MS(1000),
        MS(3050),
        "HTTP-date Retry-After",
    );
}

#[tokio::test(start_paused = true)]
async fn persistent_429_without_retry_after_is_bounded_and_backs_off() {
    let primary = FakeUpstream::start().await;
    primary.set_default(rate_limited());
    let gateway = TestGateway::start_with(config(&primary, None)).await;

    let start = Instant::now();
    let (status, error) = chat_error(&gateway).await;
    assert_eq!(status, 429);
    assert_eq!(error["code"], "upstream_rate_limited");
    // One attempt and `retries_per_target` (2) retries, no more.
    assert_eq!(primary.requests().len(), 3);
    let gaps = gaps(&primary);
    // Equal jitter: retry n waits within [d/2, d], d = 200 ms * 2^n.
    assert_within(gaps[0], MS(100), MS(210), "first backoff");
    assert_within(gaps[1], MS(200), MS(410), "second backoff");
    assert!(start.elapsed() < MS(700), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_500_once_is_retried_on_the_same_target() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(unavailable(500));
    primary.push(ok(&["second", " try"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "second try");
    assert_eq!(primary.requests().len(), 2);
    assert!(
        fallback.requests().is_empty(),
        "no fail-over for a transient error"
    );
    assert_within(gaps(&primary)[0], MS(100), MS(210), "backoff");
    assert_eq!(chunks(&events)[0]["model"], "primary-model");
}

#[tokio::test(start_paused = true)]
async fn a_persistent_503_fails_over_to_the_next_target() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    fallback.push(ok(&["from", " the", " fallback"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;

    let start = Instant::now();
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "from the fallback");
    assert_eq!(primary.requests().len(), 3, "one attempt and two retries");
    assert_eq!(fallback.requests().len(), 1);
    assert_eq!(fallback.requests()[0].body["model"], "fallback-model");
    assert!(start.elapsed() < MS(700), "{:?}", start.elapsed());
    // Fail-over accounting: the answer names the model that answered, and
    // the usage is the fallback's (the failed attempts produced nothing).
    for chunk in chunks(&events) {
        assert_eq!(chunk["model"], "fallback-model");
    }
    assert_eq!(
        usage_of(&events),
        json!({ "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10 })
    );
}

#[tokio::test(start_paused = true)]
async fn a_persistent_503_with_nowhere_to_go_returns_the_original_error() {
    let primary = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let (status, error) = chat_error(&gateway).await;
    assert_eq!(status, 502);
    assert_eq!(error["code"], "upstream_unavailable");
    assert_eq!(error["message"], "The server is overloaded");
    assert_eq!(primary.requests().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_connection_reset_before_headers_is_retried() {
    let primary = FakeUpstream::start().await;
    primary.push(Script::reset());
    primary.push(ok(&["made", " it"]));
    let gateway = TestGateway::start_with(config(&primary, None)).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "made it");
    let requests = primary.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].path, "<reset>");
    assert_within(gaps(&primary)[0], MS(100), MS(210), "backoff after a reset");
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_abandoned_at_the_first_token_limit_and_not_retried() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    // Accepts the connection and the request, never answers.
    primary.set_default(ok(&["never"]).delay_headers(Duration::from_secs(3600)));
    fallback.push(ok(&["rescued"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;

    let start = Instant::now();
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "rescued");
    assert_eq!(
        primary.requests().len(),
        1,
        "a timed-out target is not retried"
    );
    let waited = fallback.requests()[0].at - primary.requests()[0].at;
    assert_within(waited, MS(5000), MS(5050), "first-token limit");
    assert!(start.elapsed() < MS(5500), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_alone_ends_in_a_timeout_within_the_budget() {
    let primary = FakeUpstream::start().await;
    primary.set_default(ok(&["never"]).delay_headers(Duration::from_secs(3600)));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let start = Instant::now();
    // A streaming client: the stream opens after one heartbeat interval
    // (15 s) only if the upstream is still silent then; with a 5 s first
    // token limit the error comes first, as a plain 504.
    let response = gateway.post_chat(&chat_body("chat", true)).await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert_eq!(primary.requests().len(), 1);
    assert_within(start.elapsed(), MS(5000), MS(5100), "bounded by the limit");
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_token_fails_over() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    // Headers at once, first token after 10 s.
    let mut steps = vec![
        Step::Sleep(Duration::from_secs(10)),
        openai_text_chunk("late"),
    ];
    steps.extend(openai_finish(1, 1));
    primary.push(Script::sse(steps));
    fallback.push(ok(&["prompt", " answer"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;

    let events = chat(&gateway).await;
    assert_eq!(
        content_of(&events),
        "prompt answer",
        "nothing of the slow target"
    );
    assert_eq!(primary.requests().len(), 1);
    let waited = fallback.requests()[0].at - primary.requests()[0].at;
    assert_within(waited, MS(5000), MS(5050), "first-token limit");
    let closed = primary.wait_closed(1).await;
    assert!(!closed[0].completed, "the slow stream was cut");
}

/// A primary that streams `The answer is` + ` forty` and dies.
fn cut_stream() -> Script {
    Script::sse(vec![
        openai_text_chunk("The answer is"),
        openai_text_chunk(" forty"),
    ])
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_mid_answer_continues_seamlessly_on_a_prefill_fallback() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(cut_stream());
    fallback.push(ok(&[" two", "."]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, true)))).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "The answer is forty two.");
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    let finishes = chunks(&events)
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 1, "one seamless answer");
    assert_eq!(primary.requests().len(), 1);
    // The fallback got the conversation plus the partial answer to continue.
    let messages = fallback.requests()[0].body["messages"].clone();
    assert_eq!(
        messages,
        json!([
            { "role": "user", "content": "Say hello" },
            { "role": "assistant", "content": "The answer is forty" }
        ])
    );
    // Usage bills both: the cut attempt estimated (prompt 9 chars, 19 chars
    // of content, four per token) and the fallback's report (7 + 2).
    assert_eq!(
        usage_of(&events),
        json!({ "prompt_tokens": 3 + 7, "completion_tokens": 5 + 2, "total_tokens": 17 })
    );
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_whose_prefill_trimmed_whitespace_does_not_double_it() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(Script::sse(vec![openai_text_chunk("Hello ")]));
    fallback.push(ok(&[" world"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, true)))).await;
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "Hello world");
    assert_eq!(
        fallback.requests()[0].body["messages"][1]["content"],
        "Hello"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_without_a_prefill_fallback_ends_with_a_typed_error() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(cut_stream());
    fallback.set_default(ok(&["unused"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "The answer is forty");
    let error = final_error(&events);
    assert_eq!(error["code"], "upstream_protocol_error");
    assert!(
        fallback.requests().is_empty(),
        "it cannot continue the answer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stall_mid_stream_is_detected_within_the_idle_timeout() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("Stalled after this")];
    steps.push(Step::Sleep(Duration::from_secs(3600)));
    primary.push(Script::sse(steps));
    fallback.push(ok(&[" sentence."]));
    fallback.push(ok(&["healthy"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, true)))).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "Stalled after this sentence.");
    let waited = fallback.requests()[0].at - primary.requests()[0].at;
    assert_within(waited, MS(3000), MS(3050), "idle timeout");
    let closed = primary.wait_closed(1).await;
    assert!(!closed[0].completed, "the stalled connection was closed");

    // The gateway is healthy afterwards (the primary's breaker has one
    // failure: still closed, but the fallback answers this one).
    primary.push(ok(&["healthy"]));
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "healthy");
}

#[tokio::test(start_paused = true)]
async fn a_fallback_that_rejects_the_prefill_does_not_mask_the_real_failure() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(cut_stream());
    fallback.push(Script::json(
        400,
        json!({ "error": { "message": "assistant prefill is not supported", "type": "invalid_request_error" } }),
    ));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, true)))).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "The answer is forty");
    let error = final_error(&events);
    assert_eq!(
        error["code"], "upstream_protocol_error",
        "the original failure"
    );
    assert!(
        !error["message"].as_str().unwrap().contains("prefill"),
        "{error}"
    );
    assert_eq!(fallback.requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_first_chunk_is_retried_and_no_garbage_reaches_the_client() {
    let primary = FakeUpstream::start().await;
    primary.push(Script::sse(vec![
        Step::Send(Bytes::from_static(
            b"data: {\"choices\": [{\"delta\": {\"content\": \"garb",
        )),
        Step::Send(Bytes::from_static(b"\n\n")),
    ]));
    primary.push(ok(&["clean"]));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "clean");
    assert_eq!(primary.requests().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_chunk_mid_answer_ends_cleanly_and_the_gateway_stays_up() {
    let primary = FakeUpstream::start().await;
    primary.push(Script::sse(vec![
        openai_text_chunk("Good so far"),
        Step::Send(Bytes::from_static(
            b"data: {\"choices\": [{\"delta\": \x01garbage}]\n\n",
        )),
        openai_text_chunk(" and then some"),
    ]));
    primary.push(ok(&["still", " serving"]));
    let gateway = TestGateway::start_with(config(&primary, None)).await;

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "Good so far");
    let error = final_error(&events);
    assert_eq!(error["code"], "upstream_protocol_error");
    let raw: String = format!("{events:?}");
    assert!(!raw.contains("garbage"), "no garbage to the client: {raw}");

    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "still serving");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_without_done_is_finalised_at_once_with_usage() {
    let primary = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("complete")];
    let mut finish = openai_finish(4, 1);
    finish.pop(); // no [DONE]; the body just ends
    steps.extend(finish);
    primary.push(Script::sse(steps));
    let gateway = TestGateway::start_with(config(&primary, None)).await;

    let start = Instant::now();
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "complete");
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    assert_eq!(
        usage_of(&events),
        json!({ "prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5 })
    );
    assert!(
        start.elapsed() < MS(50),
        "finalised at EOF: {:?}",
        start.elapsed()
    );
    assert_eq!(primary.requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn finish_then_a_stall_before_done_is_finalised_within_the_idle_timeout() {
    let primary = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("done talking")];
    let mut finish = openai_finish(4, 2);
    finish.pop();
    steps.extend(finish);
    steps.push(Step::Sleep(Duration::from_secs(3600)));
    primary.push(Script::sse(steps));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let start = Instant::now();
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "done talking");
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    assert_eq!(usage_of(&events)["total_tokens"], 6);
    assert_within(start.elapsed(), MS(3000), MS(3100), "idle timeout");
}

fn context_length() -> Script {
    Script::json(
        400,
        json!({ "error": { "message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error", "code": "context_length_exceeded" } }),
    )
}

#[tokio::test(start_paused = true)]
async fn context_length_exceeded_gets_one_attempt_and_the_providers_reason() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(context_length());
    fallback.set_default(ok(&["unused"]));
    let gateway = TestGateway::start_with(config(&primary, Some((&fallback, false)))).await;
    let (status, error) = chat_error(&gateway).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "context_length_exceeded");
    assert_eq!(
        error["message"],
        "This model's maximum context length is 8192 tokens."
    );
    assert_eq!(primary.requests().len(), 1);
    assert!(fallback.requests().is_empty());
}

#[tokio::test(start_paused = true)]
async fn context_length_fails_over_where_the_route_says_so() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(context_length());
    fallback.push(ok(&["long", " context"]));
    let mut config = config(&primary, Some((&fallback, false)));
    config.models[0].fallback_on = vec![FallbackOn::ContextLength];
    let gateway = TestGateway::start_with(config).await;
    let events = chat(&gateway).await;
    assert_eq!(content_of(&events), "long context");
    assert_eq!(primary.requests().len(), 1);
    assert_eq!(fallback.requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn content_policy_gets_one_attempt_and_the_reason_is_propagated() {
    let primary = FakeUpstream::start().await;
    primary.set_default(Script::json(
        400,
        json!({ "error": { "message": "Your request was rejected as a result of our safety system.", "type": "invalid_request_error", "code": "content_policy_violation" } }),
    ));
    let gateway = TestGateway::start_with(config(&primary, None)).await;
    let (status, error) = chat_error(&gateway).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "content_policy_violation");
    assert_eq!(
        error["message"],
        "Your request was rejected as a result of our safety system."
    );
    assert_eq!(primary.requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_primary_down_for_a_while_is_skipped_then_probed_then_used_again() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    fallback.set_default(ok(&["fallback"]));
    let mut config = config(&primary, Some((&fallback, false)));
    config.routing.retries_per_target = 0;
    config.breaker.min_requests = 3;
    config.breaker.failure_ratio = 0.5;
    config.breaker.cooldown_secs = 10;
    let gateway = TestGateway::start_with(config).await;

    // The outage: three failures open the breaker; the fallback serves.
    for _ in 0..3 {
        assert_eq!(content_of(&chat(&gateway).await), "fallback");
    }
    assert_eq!(primary.requests().len(), 3);
    // Open: the primary is skipped, costing no attempt and no latency.
    for _ in 0..3 {
        let start = Instant::now();
        assert_eq!(content_of(&chat(&gateway).await), "fallback");
        assert!(start.elapsed() < MS(20), "{:?}", start.elapsed());
    }
    assert_eq!(primary.requests().len(), 3, "no request while open");

    // The primary recovers; after the cooldown one probe goes through.
    primary.set_default(ok(&["primary"]));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(content_of(&chat(&gateway).await), "primary");
    assert_eq!(primary.requests().len(), 4);
    // Closed again: the primary serves.
    assert_eq!(content_of(&chat(&gateway).await), "primary");
    assert_eq!(primary.requests().len(), 5);
    assert_eq!(fallback.requests().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_that_fails_reopens_the_breaker() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    fallback.set_default(ok(&["fallback"]));
    let mut config = config(&primary, Some((&fallback, false)));
    config.routing.retries_per_target = 0;
    config.breaker.min_requests = 2;
    config.breaker.cooldown_secs = 10;
    let gateway = TestGateway::start_with(config).await;
    for _ in 0..2 {
        chat(&gateway).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    chat(&gateway).await; // the probe, still failing
    assert_eq!(primary.requests().len(), 3);
    chat(&gateway).await; // open again: skipped
    assert_eq!(primary.requests().len(), 3);
}

/// Starts a generation directly on the registry (retained, so its usage
/// record can be read) and drains it.
async fn generation_record(config: &Config) -> (Outcome, spillway::usage::UsageRecord) {
    let (outcome, record, _) = generation_run(config, AfterCommit::Continue).await;
    (outcome, record)
}

/// Like [`generation_record`], with a choice of what happens after the
/// commit point; also returns the reply as a reader assembled it.
async fn generation_run(
    config: &Config,
    after_commit: AfterCommit,
) -> (Outcome, spillway::usage::UsageRecord, Reply) {
    let router = Arc::new(Router::from_config(config).unwrap());
    let registry = Arc::new(Registry::new(
        config.generation.clone(),
        Pricing::from_config(&config.pricing),
    ));
    let request = serde_json::from_value(chat_body("chat", true)).unwrap();
    let options = StartOptions {
        grace: Duration::ZERO,
        retain: Duration::from_secs(60),
        after_commit,
        persist: None,
    };
    let mut subscriber = registry
        .start(&router, router.route("chat").unwrap(), request, options)
        .unwrap();
    let mut reply = Reply::default();
    let mut restarts = 0;
    let outcome = loop {
        match subscriber.read().await {
            Read::Frames(frames) => {
                for frame in &frames {
                    restarts +=
                        usize::from(frame.event == spillway::provider::ProviderEvent::Restart);
                    reply.apply(frame);
                }
            }
            Read::End(outcome) => break outcome,
        }
    };
    assert!(restarts <= 1);
    let generation = Arc::clone(subscriber.generation());
    for _ in 0..100 {
        if generation.usage().is_some() {
            break;
        }
        tokio::time::sleep(MS(1)).await;
    }
    let record = generation.usage().cloned().expect("a usage record");
    (outcome, record, reply)
}

#[tokio::test(start_paused = true)]
async fn usage_records_bill_the_answering_model_and_list_failed_attempts() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    fallback.push(ok(&["a", "b", "c"]));
    let mut config = config(&primary, Some((&fallback, false)));
    config.routing.retries_per_target = 0;
    config.pricing = vec![spillway::config::PriceConfig {
        model: "fallback-model".into(),
        input_per_million: 1.0,
        output_per_million: 2.0,
    }];
    let (outcome, record) = generation_record(&config).await;
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(record.outcome, "complete");
    assert_eq!(record.provider.as_deref(), Some("fallback"));
    assert_eq!(record.upstream_model.as_deref(), Some("fallback-model"));
    assert_eq!(record.attempts.len(), 2);
    assert_eq!(
        record.attempts[0].outcome,
        AttemptOutcome::Failed(spillway::provider::ErrorClass::Unavailable)
    );
    assert_eq!(
        record.attempts[0].billed, None,
        "a failed attempt is not billed"
    );
    assert_eq!(record.attempts[1].outcome, AttemptOutcome::Ok);
    assert_eq!(
        (record.usage.prompt_tokens, record.usage.completion_tokens),
        (7, 3)
    );
    assert!(!record.estimated);
    let cost = record.cost_usd.unwrap();
    assert!((cost - (7.0 + 6.0) / 1e6).abs() < 1e-12, "{cost}");
}

#[tokio::test(start_paused = true)]
async fn usage_is_recorded_for_failed_replies_with_an_estimate_marked_as_such() {
    let primary = FakeUpstream::start().await;
    primary.push(cut_stream());
    let config = config(&primary, None);
    let (outcome, record) = generation_record(&config).await;
    assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
    assert_eq!(record.outcome, "failed");
    assert_eq!(record.error, Some("upstream_protocol_error"));
    assert!(record.estimated, "the cut stream sent no usage");
    // "The answer is forty": 19 chars → 5 tokens; prompt "Say hello" → 3.
    assert_eq!(
        (record.usage.prompt_tokens, record.usage.completion_tokens),
        (3, 5)
    );
}

#[tokio::test(start_paused = true)]
async fn the_restart_hook_restarts_a_cut_reply_on_a_target_without_prefill() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.push(cut_stream());
    fallback.push(ok(&["A fresh", " answer."]));
    let config = config(&primary, Some((&fallback, false)));
    let (outcome, record, reply) = generation_run(&config, AfterCommit::Restart).await;
    assert_eq!(outcome, Outcome::Complete);
    // Readers that honour the restart marker keep only the new reply.
    assert_eq!(reply.text, "A fresh answer.");
    assert_eq!(record.upstream_model.as_deref(), Some("fallback-model"));
    // The fallback was asked from scratch, without a prefill.
    assert_eq!(
        fallback.requests()[0].body["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(record.attempts.len(), 2);
    assert!(
        record.attempts[0].billed.is_some(),
        "the cut attempt's tokens were spent"
    );
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_fails_over_instead_of_retrying() {
    let primary = FakeUpstream::start().await;
    let fallback = FakeUpstream::start().await;
    primary.set_default(unavailable(503));
    fallback.set_default(ok(&["fallback"]));
    let mut config = config(&primary, Some((&fallback, false)));
    // One retry per window, none earned by requests.
    config.routing.retry_budget_min = 1;
    config.routing.retry_budget_ratio = 0.0;
    config.breaker.min_requests = 100;
    let gateway = TestGateway::start_with(config).await;

    assert_eq!(content_of(&chat(&gateway).await), "fallback");
    // First request: an attempt, the one budgeted retry, then fail-over.
    assert_eq!(primary.requests().len(), 2);
    assert_eq!(content_of(&chat(&gateway).await), "fallback");
    // Second request: no budget left, so no retry: straight to the fallback.
    assert_eq!(primary.requests().len(), 3);
}

#[test]
fn a_plan_tries_tiers_in_order_and_shares_a_tier_by_weight() {
    let toml = r#"
[[providers]]
name = "a"
kind = "mock"
[[providers]]
name = "b"
kind = "mock"
[[providers]]
name = "c"
kind = "mock"

[[models]]
name = "chat"
targets = [
  { provider = "a", model = "a", tier = 0, weight = 3 },
  { provider = "b", model = "b", tier = 0, weight = 1 },
  { provider = "c", model = "c", tier = 1 },
]
"#;
    let router = Router::from_config(&test_config(toml)).unwrap();
    let route = router.route("chat").unwrap();
    let mut a_first = 0;
    let rounds = 4000;
    for _ in 0..rounds {
        let plan = route.plan();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[2], 2, "the lower tier comes last, always");
        a_first += usize::from(plan[0] == 0);
    }
    // Weight 3 of 4: about 3000 of 4000 (binomial sd ~27; allow ±8 sd).
    assert!((2780..=3220).contains(&a_first), "{a_first} of {rounds}");
}

//! `POST /v1/chat/completions` and `GET /v1/models` over real sockets,
//! against the scriptable fake upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;

#[tokio::test]
async fn streams_tokens_in_order_and_ends_with_done() {
    let upstream = FakeUpstream::start().await;
    let tokens = ["Hel", "lo", ",", " wor", "ld", "!"];
    upstream.push(openai_stream(&tokens, Duration::from_millis(5)));
    let gateway = TestGateway::openai(&upstream).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.contains_key("x-request-id"));

    let events = SseReader::new(response).collect().await;
    assert!(
        matches!(events.first(), Some(ClientEvent::Comment(_))),
        "the stream opens with a heartbeat comment: {events:?}"
    );
    assert_eq!(content_of(&events), tokens.concat());
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    let chunks: Vec<&Value> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Json(v) => Some(v),
            _ => None,
        })
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(
            chunk["model"], "fake-model",
            "the model that actually answered"
        );
        assert_eq!(chunk["id"], chunks[0]["id"], "one id per completion");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string());
    assert_eq!(finish.unwrap()["choices"][0]["finish_reason"], "stop");
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage chunk unless the client asked for it"
    );

    // The upstream was asked for a stream with usage, under its own name.
    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["model"], "fake-model");
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
    assert_eq!(sent.body["messages"][0]["content"], "Say hello");
}

#[tokio::test]
async fn tokens_reach_the_client_while_the_upstream_is_still_streaming() {
    let upstream = FakeUpstream::start().await;
    let mut steps = vec![openai_text_chunk("first")];
    steps.push(Step::AwaitRelease);
    steps.push(openai_text_chunk(" second"));
    steps.extend(openai_finish(3, 2));
    upstream.push(Script::sse(steps));
    let gateway = TestGateway::openai(&upstream).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    let mut reader = SseReader::new(response);
    // The upstream is blocked after its first token: the client must see
    // that token now, not when the reply is complete.
    let mut seen = reader.until_content().await;
    assert_eq!(content_of(&seen), "first");
    assert!(upstream.closed().is_empty(), "upstream still streaming");
    upstream.release();
    seen.extend(reader.collect().await);
    assert_eq!(content_of(&seen), "first second");
    assert_eq!(seen.last(), Some(&ClientEvent::Done));
}

#[tokio::test]
async fn usage_chunk_is_sent_only_when_the_client_asks() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&["a", "b"], Duration::ZERO));
    let gateway = TestGateway::openai(&upstream).await;
    let mut body = chat_body("gpt-test", true);
    body["stream_options"] = json!({ "include_usage": true });
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).collect().await;
    let usage: Vec<&Value> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Json(v) if v.get("usage").is_some() => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["choices"], json!([]));
    assert_eq!(
        usage[0]["usage"],
        json!({ "prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9 })
    );
    // OpenAI order: finish chunk, usage chunk, [DONE].
    let n = events.len();
    assert_eq!(events[n - 1], ClientEvent::Done);
    assert!(matches!(&events[n - 2], ClientEvent::Json(v) if v.get("usage").is_some()));
}

#[tokio::test]
async fn upstream_error_mid_stream_ends_with_an_error_event_and_no_done() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript(
        "composed-openai-chat-error-midstream.sse",
    ));
    let gateway = TestGateway::openai(&upstream).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let events = SseReader::new(response).collect().await;
    assert!(
        !events.contains(&ClientEvent::Done),
        "never a clean end: {events:?}"
    );
    let last = final_error(&events);
    assert_eq!(last["code"], "upstream_unavailable");
    assert_eq!(
        last["message"],
        "The synthetic provider rejected this streamed request."
    );
    assert_eq!(last["retryable"], true);
    assert!(
        !content_of(&events).is_empty(),
        "the partial text was relayed first"
    );
}

#[tokio::test]
async fn upstream_cut_off_before_finishing_is_an_error_not_a_short_answer() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::sse(vec![
        openai_text_chunk("partial"),
        openai_text_chunk(" answ"),
    ]));
    let gateway = TestGateway::openai(&upstream).await;
    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    let events = SseReader::new(response).collect().await;
    assert_eq!(content_of(&events), "partial answ");
    let last = final_error(&events);
    assert_eq!(last["code"], "upstream_protocol_error");
}

#[tokio::test]
async fn client_disconnect_closes_the_upstream_connection() {
    let upstream = FakeUpstream::start().await;
    // One token, then a long stall: the only way the upstream body can end
    // early is the gateway closing the connection.
    let mut steps = vec![openai_text_chunk("hello")];
    steps.push(Step::Sleep(Duration::from_secs(30)));
    steps.extend(openai_finish(1, 1));
    upstream.push(Script::sse(steps));
    let gateway = TestGateway::openai(&upstream).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    let mut reader = SseReader::new(response);
    reader.until_content().await;
    let disconnected = Instant::now();
    drop(reader);

    let closed = tokio::time::timeout(Duration::from_secs(10), upstream.wait_closed(1))
        .await
        .expect("the gateway closed its upstream connection before the upstream's stall ended");
    assert!(
        !closed[0].completed,
        "the upstream body was cut, not finished"
    );
    let latency = closed[0].at.duration_since(disconnected);
    println!("upstream closed {latency:?} after the client disconnected");
    // Nothing lingers: the generation is gone from the registry.
    let registry = &gateway.gateway.generations;
    for _ in 0..100 {
        if registry.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(registry.is_empty(), "the abandoned generation was dropped");
}

#[tokio::test]
async fn non_streaming_request_gets_one_completion_with_tool_calls_and_usage() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript("openai-chat-parallel-tool-calls.sse"));
    let gateway = TestGateway::openai(&upstream).await;
    let response = gateway.post_chat(&chat_body("gpt-test", false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fake-model");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "call_JMW1whyEaYG438VE1OIflxA2");
    assert_eq!(calls[0]["function"]["name"], "GetWeatherArgs");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Edinburgh");
    assert_eq!(calls[1]["function"]["name"], "get_stock_price");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    // The upstream is always asked to stream, even for a non-streaming call.
    assert_eq!(upstream.requests()[0].body["stream"], true);
}

#[tokio::test]
async fn anthropic_replies_are_relayed_as_openai_chunks() {
    let upstream = FakeUpstream::start().await;
    upstream.push(Script::transcript("anthropic-tool-use.sse"));
    let config = format!(
        r#"
[[providers]]
name = "claude"
kind = "anthropic"
base_url = "{}"

[[models]]
name = "claude-test"
targets = [{{ provider = "claude", model = "claude-sonnet-4" }}]
"#,
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;
    let mut body = chat_body("claude-test", true);
    body["stream_options"] = json!({ "include_usage": true });
    body["messages"] = json!([
        { "role": "system", "content": "Be brief." },
        { "role": "user", "content": "Weather in Paris?" }
    ]);
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).collect().await;
    assert_eq!(
        content_of(&events),
        "I'll check the current weather in Paris for you."
    );
    let mut arguments = String::new();
    let mut names = Vec::new();
    let mut finish = None;
    let mut usage = None;
    for event in &events {
        let ClientEvent::Json(chunk) = event else {
            continue;
        };
        if let Some(calls) = chunk["choices"][0]["delta"]["tool_calls"].as_array() {
            for call in calls {
                if let Some(name) = call["function"]["name"].as_str() {
                    names.push((call["id"].as_str().unwrap().to_owned(), name.to_owned()));
                }
                arguments.push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
        if chunk.get("usage").is_some() {
            usage = Some(chunk["usage"].clone());
        }
    }
    assert_eq!(
        names,
        vec![(
            "toolu_01NRLabsLyVHZPKxbKvkfSMn".to_owned(),
            "get_weather".to_owned()
        )]
    );
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({ "location": "Paris" })
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(
        usage.unwrap(),
        json!({ "prompt_tokens": 377, "completion_tokens": 65, "total_tokens": 442, "prompt_tokens_details": { "cached_tokens": 0 } })
    );
    assert_eq!(events.last(), Some(&ClientEvent::Done));

    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["model"], "claude-sonnet-4");
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["messages"][0]["role"], "user");
}

#[tokio::test]
async fn provider_unreachable_before_any_byte_is_a_502() {
    // A port nothing listens on: bind, note the port, close.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = format!(
        r#"
[[providers]]
name = "gone"
kind = "openai"
base_url = "http://127.0.0.1:{closed_port}/v1"

[[models]]
name = "gpt-test"
targets = [{{ provider = "gone", model = "m" }}]
"#
    );
    let gateway = TestGateway::start(&config).await;
    for stream in [true, false] {
        let response = gateway.post_chat(&chat_body("gpt-test", stream)).await;
        assert_eq!(response.status(), 502, "stream={stream}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_unreachable");
        assert_eq!(body["error"]["type"], "upstream_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("gone"));
    }
}

#[tokio::test]
async fn upstream_rejections_keep_their_status_and_reason() {
    let upstream = FakeUpstream::start().await;
    upstream.push(
        Script::json(
            429,
            json!({ "error": { "message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded" } }),
        )
        .header("retry-after", "7"),
    );
    upstream.push(Script::json(
        400,
        json!({ "error": { "message": "This model's maximum context length is 128000 tokens.", "type": "invalid_request_error", "code": "context_length_exceeded" } }),
    ));
    upstream.push(Script::json(401, json!({ "error": { "message": "Incorrect API key provided: sk-abc***", "type": "invalid_request_error", "code": "invalid_api_key" } })));
    // No retries: this is about how each rejection reaches the client.
    let mut config = test_config(&openai_config(&upstream));
    config.routing.retries_per_target = 0;
    let gateway = TestGateway::start_with(config).await;

    let send = || {
        client()
            .post(gateway.url("/v1/chat/completions"))
            .json(&chat_body("gpt-test", true))
            .send()
    };
    let limited = send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_rate_limited");

    let too_long = send().await.unwrap();
    assert_eq!(too_long.status(), 400);
    let body: Value = too_long.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(
        body["error"]["message"],
        "This model's maximum context length is 128000 tokens."
    );
    assert_eq!(body["error"]["retryable"], false);

    // The provider's complaint about *our* key is not forwarded verbatim.
    let auth = send().await.unwrap();
    assert_eq!(auth.status(), 502);
    let body: Value = auth.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_auth_failed");
    assert!(!body.to_string().contains("sk-abc"));
}

#[tokio::test]
async fn models_endpoint_lists_configured_names() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let body: Value = client()
        .get(gateway.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["gpt-test"]);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_comments_keep_an_idle_stream_alive() {
    let upstream = FakeUpstream::start().await;
    // 40 s of (paused-clock) silence before the first token.
    let mut steps = vec![
        Step::Sleep(Duration::from_secs(40)),
        openai_text_chunk("late"),
    ];
    steps.extend(openai_finish(1, 1));
    upstream.push(Script::sse(steps));
    // A first-token limit above the silence.
    let mut config = test_config(&openai_config(&upstream));
    config.routing.ttft_timeout_ms = 120_000;
    // Paused clock: no SQLite threads racing it (see tests/resilience.rs).
    config.store.enabled = false;
    let gateway = TestGateway::start_with(config).await;
    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    let events = SseReader::new(response).collect().await;
    let before_token: Vec<&ClientEvent> = events
        .iter()
        .take_while(|e| !matches!(e, ClientEvent::Json(_)))
        .collect();
    // One comment when the stream opens, then one per idle 15 s: at 15 s
    // and 30 s.
    assert_eq!(
        before_token,
        vec![
            &ClientEvent::Comment("spillway stream open".into()),
            &ClientEvent::Comment("keep-alive".into()),
            &ClientEvent::Comment("keep-alive".into()),
        ]
    );
    assert_eq!(content_of(&events), "late");
    assert_eq!(events.last(), Some(&ClientEvent::Done));
}

#[tokio::test]
async fn a_stream_from_the_built_in_mock_provider_completes() {
    let gateway = TestGateway::start(
        "[[providers]]\nname = \"mock\"\nkind = \"mock\"\nmock_tokens = 12\nmock_token_delay_ms = 0\n\n[[models]]\nname = \"mock\"\ntargets = [{ provider = \"mock\", model = \"mock\" }]\n",
    )
    .await;
    let response = gateway.post_chat(&chat_body("mock", true)).await;
    let events = SseReader::new(response).collect().await;
    let text = content_of(&events);
    assert!(text.starts_with("[mock] "), "clearly labelled: {text}");
    assert_eq!(text.split(' ').count(), 12);
    assert_eq!(events.last(), Some(&ClientEvent::Done));
}

#[tokio::test]
async fn request_id_from_the_client_is_echoed() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-request-id", "req-123")
        .json(&chat_body("no-such-model", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "req-123");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_slow_to_answer_still_gets_the_stream_opened_within_a_heartbeat() {
    let upstream = FakeUpstream::start().await;
    // No status line for 40 s, then a normal stream.
    upstream.push(
        openai_stream(&["slow", " start"], Duration::ZERO).delay_headers(Duration::from_secs(40)),
    );
    // No status line for 40 s, then a refusal.
    upstream.push(
        Script::json(
            503,
            json!({ "error": { "message": "Service overloaded", "type": "server_error" } }),
        )
        .delay_headers(Duration::from_secs(40)),
    );
    // A first-token limit above the delay, and no retries, so the 503 is
    // the answer.
    let mut config = test_config(&openai_config(&upstream));
    config.routing.ttft_timeout_ms = 120_000;
    // Paused clock: no SQLite threads racing it (see tests/resilience.rs).
    config.store.enabled = false;
    config.routing.retries_per_target = 0;
    let gateway = TestGateway::start_with(config).await;

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    assert_eq!(
        response.status(),
        200,
        "opened after one heartbeat interval"
    );
    let events = SseReader::new(response).collect().await;
    assert!(matches!(events.first(), Some(ClientEvent::Comment(_))));
    assert_eq!(content_of(&events), "slow start");
    assert_eq!(events.last(), Some(&ClientEvent::Done));

    let response = gateway.post_chat(&chat_body("gpt-test", true)).await;
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    let last = final_error(&events);
    assert_eq!(last["code"], "upstream_unavailable");
    assert_eq!(last["message"], "Service overloaded");
}

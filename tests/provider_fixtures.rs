//! The OpenAI and Anthropic adapters against recorded provider transcripts
//! (`tests/fixtures/providers/`, see its README.md).
//!
//! Every expected value below was read off the fixture files (with a small
//! Python script over the reference WHATWG parser) and is written here as a
//! literal, so a decoding change shows up as a failure. Each transcript is
//! fed in one read and one byte per read; both must give identical events.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use spillway::provider::{
    ChatRequest, ErrorClass, EventStream, FinishReason, ProviderError, ProviderEvent,
    ToolCallDelta, Usage, anthropic, openai,
};

/// The production default of `upstream.max_event_bytes`.
const CAP: usize = 1024 * 1024;

fn read_fixture(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/providers")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

#[derive(Debug, Clone, Copy)]
enum Adapter {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy)]
enum Feed {
    Whole,
    ByteByByte,
}

fn decode(adapter: Adapter, bytes: &[u8], feed: Feed) -> EventStream {
    let size = match feed {
        Feed::Whole => bytes.len().max(1),
        Feed::ByteByByte => 1,
    };
    let reads: Vec<Result<Bytes, io::Error>> = bytes
        .chunks(size)
        .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
        .collect();
    let body = futures_util::stream::iter(reads);
    match adapter {
        Adapter::OpenAi => openai::decode_stream(body, CAP),
        Adapter::Anthropic => anthropic::decode_stream(body, CAP),
    }
}

/// Drains a stream: its events, then its error if it failed. Asserts that
/// an error is the last item.
async fn drain(mut stream: EventStream) -> (Vec<ProviderEvent>, Option<ProviderError>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(err) => {
                assert!(
                    stream.next().await.is_none(),
                    "nothing may follow an error (after {err})"
                );
                return (events, Some(err));
            }
        }
    }
    (events, None)
}

/// One assembled tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

impl Call {
    fn new(id: &str, name: &str, arguments: &str) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }
    }
}

/// A whole reply, assembled from the normalized events the way a client of
/// the OpenAI surface would.
#[derive(Debug, Default, PartialEq)]
struct Reply {
    text: String,
    reasoning: String,
    refusal: String,
    tool_calls: Vec<Call>,
    finishes: Vec<FinishReason>,
    usages: Vec<Usage>,
    error: Option<ProviderError>,
}

/// Assembles `events`, checking the adapter contract on the way: a call's
/// first fragment (and only it) carries id and name, call indexes are dense
/// from 0, only usage follows a finish, and a stream that ends without an
/// error has finished.
fn assemble(events: &[ProviderEvent], error: Option<ProviderError>) -> Reply {
    let mut reply = Reply::default();
    let mut calls: BTreeMap<u32, Call> = BTreeMap::new();
    for event in events {
        if !reply.finishes.is_empty() {
            assert!(
                matches!(event, ProviderEvent::Usage(_) | ProviderEvent::Finish(_)),
                "only usage may follow a finish, got {event:?}"
            );
        }
        match event {
            ProviderEvent::Text(text) => reply.text.push_str(text),
            ProviderEvent::Reasoning(text) => reply.reasoning.push_str(text),
            ProviderEvent::Refusal(text) => reply.refusal.push_str(text),
            ProviderEvent::ToolCall(ToolCallDelta {
                index,
                id,
                name,
                arguments,
            }) => match calls.get_mut(index) {
                None => {
                    let (Some(id), Some(name)) = (id, name) else {
                        panic!("first fragment of call {index} lacks id or name: {event:?}");
                    };
                    calls.insert(*index, Call::new(id, name, arguments));
                }
                Some(call) => {
                    assert!(
                        id.is_none() && name.is_none(),
                        "later fragment of call {index} repeats id/name: {event:?}"
                    );
                    call.arguments.push_str(arguments);
                }
            },
            ProviderEvent::Usage(usage) => reply.usages.push(*usage),
            ProviderEvent::Finish(reason) => reply.finishes.push(reason.clone()),
            ProviderEvent::Restart => panic!("adapters never emit the gateway's restart marker"),
        }
    }
    for (position, index) in calls.keys().enumerate() {
        assert_eq!(*index as usize, position, "tool call indexes are dense");
    }
    reply.tool_calls = calls.into_values().collect();
    if error.is_none() {
        assert_eq!(
            reply.finishes.len(),
            1,
            "a clean stream finishes exactly once"
        );
    }
    reply.error = error;
    reply
}

/// Decodes `bytes` in one read and byte by byte; both must agree exactly.
async fn replay_bytes(adapter: Adapter, bytes: &[u8]) -> (Vec<ProviderEvent>, Reply) {
    let (events, error) = drain(decode(adapter, bytes, Feed::Whole)).await;
    let (bytewise, bytewise_error) = drain(decode(adapter, bytes, Feed::ByteByByte)).await;
    assert_eq!(bytewise, events, "byte-by-byte events differ from one read");
    assert_eq!(
        bytewise_error, error,
        "byte-by-byte error differs from one read"
    );
    let reply = assemble(&events, error);
    (events, reply)
}

async fn replay(adapter: Adapter, file: &str) -> Reply {
    replay_bytes(adapter, &read_fixture(file)).await.1
}

fn usage(prompt: u64, completion: u64, cached: Option<u64>) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_prompt_tokens: cached,
    }
}

fn args_json(call: &Call) -> Value {
    serde_json::from_str(&call.arguments)
        .unwrap_or_else(|err| panic!("arguments of {} are not JSON: {err}", call.id))
}

fn error(class: ErrorClass, message: &str) -> ProviderError {
    ProviderError::new(class, message)
}

// ---------------------------------------------------------------- OpenAI

#[tokio::test]
async fn openai_text_with_include_usage_relays_text_then_stop_then_usage() {
    let reply = replay(Adapter::OpenAi, "openai-chat-text-include-usage.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "I'm unable to provide real-time weather updates. To get the current weather \
                   in San Francisco, I recommend checking a reliable weather website or a \
                   weather app."
                .to_owned(),
            finishes: vec![FinishReason::Stop],
            usages: vec![usage(14, 30, None)],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn openai_parallel_tool_calls_accumulate_by_index() {
    let reply = replay(Adapter::OpenAi, "openai-chat-parallel-tool-calls.sse").await;
    assert_eq!(
        reply,
        Reply {
            tool_calls: vec![
                Call::new(
                    "call_JMW1whyEaYG438VE1OIflxA2",
                    "GetWeatherArgs",
                    r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#,
                ),
                Call::new(
                    "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                    "get_stock_price",
                    r#"{"ticker": "AAPL", "exchange": "NASDAQ"}"#,
                ),
            ],
            finishes: vec![FinishReason::ToolCalls],
            usages: vec![usage(149, 60, None)],
            ..Reply::default()
        }
    );
    assert_eq!(
        args_json(&reply.tool_calls[0]),
        json!({"city": "Edinburgh", "country": "GB", "units": "c"})
    );
    assert_eq!(
        args_json(&reply.tool_calls[1]),
        json!({"ticker": "AAPL", "exchange": "NASDAQ"})
    );
}

#[tokio::test]
async fn openai_single_tool_call_finishes_with_tool_calls() {
    let reply = replay(Adapter::OpenAi, "openai-chat-single-tool-call.sse").await;
    assert_eq!(
        reply,
        Reply {
            tool_calls: vec![Call::new(
                "call_c91SqDXlYFuETYv8mUHzz6pp",
                "GetWeatherArgs",
                r#"{"city":"Edinburgh","country":"UK","units":"c"}"#,
            )],
            finishes: vec![FinishReason::ToolCalls],
            usages: vec![usage(76, 24, None)],
            ..Reply::default()
        }
    );
    assert_eq!(
        args_json(&reply.tool_calls[0]),
        json!({"city": "Edinburgh", "country": "UK", "units": "c"})
    );
}

#[tokio::test]
async fn openai_token_limit_finishes_with_length() {
    let reply = replay(Adapter::OpenAi, "openai-chat-finish-length.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "{\"".to_owned(),
            finishes: vec![FinishReason::Length],
            usages: vec![usage(79, 1, None)],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn openai_refusal_deltas_become_refusal_not_text() {
    let reply = replay(Adapter::OpenAi, "openai-chat-refusal.sse").await;
    assert_eq!(
        reply,
        Reply {
            refusal: "I'm sorry, I can't assist with that request.".to_owned(),
            finishes: vec![FinishReason::Stop],
            usages: vec![usage(79, 11, None)],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn openai_logprobs_are_dropped_and_text_still_relayed() {
    let (events, reply) =
        replay_bytes(Adapter::OpenAi, &read_fixture("openai-chat-logprobs.sse")).await;
    assert_eq!(
        events,
        vec![
            ProviderEvent::Text("Foo".to_owned()),
            ProviderEvent::Text("!".to_owned()),
            ProviderEvent::Finish(FinishReason::Stop),
            ProviderEvent::Usage(usage(9, 2, None)),
        ]
    );
    assert_eq!(reply.text, "Foo!");
}

#[tokio::test]
async fn openai_error_midstream_after_text_is_unavailable_and_never_finishes() {
    let reply = replay(Adapter::OpenAi, "composed-openai-chat-error-midstream.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "I'm unable to".to_owned(),
            error: Some(error(
                ErrorClass::Unavailable,
                "The synthetic provider rejected this streamed request.",
            )),
            ..Reply::default()
        }
    );
}

/// The first `n` blocks of an LF-only transcript, each with its blank line.
fn first_blocks(file: &str, n: usize) -> Vec<u8> {
    let bytes = read_fixture(file);
    let text =
        std::str::from_utf8(&bytes).unwrap_or_else(|err| panic!("{file} is not UTF-8: {err}"));
    let blocks: Vec<&str> = text.split("\n\n").take(n).collect();
    assert_eq!(blocks.len(), n);
    format!("{}\n\n", blocks.join("\n\n")).into_bytes()
}

#[tokio::test]
async fn openai_stream_cut_off_before_a_finish_reason_is_a_protocol_error() {
    let cut = first_blocks("openai-chat-text-include-usage.sse", 10);
    let expected = Reply {
        text: "I'm unable to provide real-time weather updates.".to_owned(),
        error: Some(error(
            ErrorClass::Protocol,
            "upstream stream ended before the reply finished",
        )),
        ..Reply::default()
    };
    let (_, reply) = replay_bytes(Adapter::OpenAi, &cut).await;
    assert_eq!(reply, expected);

    // Cut in the middle of the next event: the partial block is discarded.
    let full = read_fixture("openai-chat-text-include-usage.sse");
    let (_, reply) = replay_bytes(Adapter::OpenAi, &full[..cut.len() + 100]).await;
    assert_eq!(reply, expected);

    // Nothing at all.
    let (events, reply) = replay_bytes(Adapter::OpenAi, b"").await;
    assert!(events.is_empty());
    assert_eq!(reply.error.map(|e| e.class), Some(ErrorClass::Protocol));
}

#[tokio::test]
async fn openai_stream_ending_after_finish_without_done_is_complete() {
    // Everything up to the usage chunk, [DONE] lost: the finish reason is
    // what makes the reply complete.
    let cut = first_blocks("openai-chat-text-include-usage.sse", 33);
    let (_, reply) = replay_bytes(Adapter::OpenAi, &cut).await;
    assert_eq!(reply.error, None);
    assert_eq!(reply.finishes, vec![FinishReason::Stop]);
    assert_eq!(reply.usages, vec![usage(14, 30, None)]);
}

#[tokio::test]
async fn openai_done_without_a_finish_reason_is_a_protocol_error() {
    let mut bytes = first_blocks("openai-chat-logprobs.sse", 3);
    bytes.extend_from_slice(b"data: [DONE]\n\n");
    let (_, reply) = replay_bytes(Adapter::OpenAi, &bytes).await;
    assert_eq!(
        reply,
        Reply {
            text: "Foo!".to_owned(),
            error: Some(error(
                ErrorClass::Protocol,
                "upstream sent [DONE] before a finish reason",
            )),
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn openai_malformed_json_chunk_is_a_protocol_error() {
    let mut bytes = first_blocks("openai-chat-logprobs.sse", 2);
    bytes.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"\n\n");
    bytes.extend_from_slice(&read_fixture("openai-chat-logprobs.sse")[..]);
    let (events, reply) = replay_bytes(Adapter::OpenAi, &bytes).await;
    assert_eq!(events, vec![ProviderEvent::Text("Foo".to_owned())]);
    let err = reply.error.expect("an error");
    assert_eq!(err.class, ErrorClass::Protocol);
    assert!(
        err.message.starts_with("malformed upstream chunk: "),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn openai_in_band_error_types_map_to_classes() {
    let cases = [
        (
            r#"{"type":"server_error","code":null}"#,
            ErrorClass::Unavailable,
        ),
        (
            r#"{"type":"tokens","code":"rate_limit_exceeded"}"#,
            ErrorClass::RateLimited,
        ),
        (
            r#"{"type":"invalid_request_error","code":"context_length_exceeded"}"#,
            ErrorClass::ContextLength,
        ),
        // A compatible server with a numeric code and no type.
        (r#"{"code":503}"#, ErrorClass::Unavailable),
    ];
    for (wire, class) in cases {
        let mut wire: Value = serde_json::from_str(wire).expect("case is JSON");
        wire["message"] = json!("upstream says no");
        let bytes = format!("data: {}\n\n", json!({ "error": wire })).into_bytes();
        let (events, reply) = replay_bytes(Adapter::OpenAi, &bytes).await;
        assert!(events.is_empty());
        assert_eq!(
            reply.error,
            Some(error(class, "upstream says no")),
            "{wire}"
        );
    }
}

const COMPLETION: &str = r#"{
  "id": "chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9",
  "object": "chat.completion",
  "created": 1745941925,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Let me look that up.",
        "refusal": null,
        "tool_calls": [
          {
            "id": "call_9VxXzBAdWkN0DSN7OGmCTVR4",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\",\"unit\":\"celsius\"}"}
          },
          {
            "id": "call_bN4s0VfYH2RrnA4S0KXy0T6E",
            "type": "function",
            "function": {"name": "get_time", "arguments": "{\"timezone\":\"Europe/Paris\"}"}
          }
        ],
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "tool_calls"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 58,
    "total_tokens": 1175,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_f5bdcc3276"
}"#;

/// The same reply as [`COMPLETION`], streamed (each call in one delta).
const COMPLETION_AS_STREAM: &str = concat!(
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":"Let me look that up."},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_9VxXzBAdWkN0DSN7OGmCTVR4","type":"function","function":{"name":"get_weather","arguments":"{\"location\":\"Paris, France\",\"unit\":\"celsius\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_bN4s0VfYH2RrnA4S0KXy0T6E","type":"function","function":{"name":"get_time","arguments":"{\"timezone\":\"Europe/Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-BRjVtBqCVfUl5hSQq1kcV2WmE0Ri9","object":"chat.completion.chunk","created":1745941925,"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":1117,"completion_tokens":58,"total_tokens":1175,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0}}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

#[tokio::test]
async fn openai_non_streaming_completion_gives_the_events_a_stream_would() {
    let expected = vec![
        ProviderEvent::Text("Let me look that up.".to_owned()),
        ProviderEvent::ToolCall(ToolCallDelta {
            index: 0,
            id: Some("call_9VxXzBAdWkN0DSN7OGmCTVR4".to_owned()),
            name: Some("get_weather".to_owned()),
            arguments: r#"{"location":"Paris, France","unit":"celsius"}"#.to_owned(),
        }),
        ProviderEvent::ToolCall(ToolCallDelta {
            index: 1,
            id: Some("call_bN4s0VfYH2RrnA4S0KXy0T6E".to_owned()),
            name: Some("get_time".to_owned()),
            arguments: r#"{"timezone":"Europe/Paris"}"#.to_owned(),
        }),
        ProviderEvent::Finish(FinishReason::ToolCalls),
        ProviderEvent::Usage(usage(1117, 58, Some(1024))),
    ];

    let completion = openai::decode_completion(COMPLETION.as_bytes()).expect("decodes");
    assert_eq!(completion, expected);

    let (streamed, reply) = replay_bytes(Adapter::OpenAi, COMPLETION_AS_STREAM.as_bytes()).await;
    assert_eq!(reply.error, None);
    assert_eq!(streamed, completion);
    assert_eq!(
        args_json(&reply.tool_calls[0]),
        json!({"location": "Paris, France", "unit": "celsius"})
    );
    assert_eq!(
        args_json(&reply.tool_calls[1]),
        json!({"timezone": "Europe/Paris"})
    );
}

#[test]
fn openai_non_streaming_error_body_is_classified() {
    let body = br#"{"error":{"message":"Rate limit reached for gpt-4o","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    assert_eq!(
        openai::decode_completion(body),
        Err(error(
            ErrorClass::RateLimited,
            "Rate limit reached for gpt-4o"
        ))
    );
    let err = openai::decode_completion(b"<html>502</html>").expect_err("not JSON");
    assert_eq!(err.class, ErrorClass::Protocol);
}

// ------------------------------------------------------------- Anthropic

/// These three transcripts end without the blank line after
/// `message_stop`, so SSE discards it; `message_delta` already carried the
/// stop reason, and that is what makes the reply complete.
const WITHOUT_FINAL_BLANK_LINE: [&str; 3] = [
    "anthropic-text-basic.sse",
    "anthropic-tool-use.sse",
    "anthropic-refusal-stop-reason.sse",
];

#[tokio::test]
async fn anthropic_transcripts_whose_message_stop_is_lost_still_finish_cleanly() {
    for file in WITHOUT_FINAL_BLANK_LINE {
        let bytes = read_fixture(file);
        assert!(
            !bytes.ends_with(b"\n\n"),
            "{file} has its blank line after all"
        );
        assert!(
            std::str::from_utf8(&bytes)
                .expect("UTF-8")
                .trim_end()
                .ends_with("data: {\"type\":\"message_stop\"}"),
            "{file}"
        );
        let reply = replay(Adapter::Anthropic, file).await;
        assert_eq!(reply.error, None, "{file}");
        assert_eq!(reply.finishes.len(), 1, "{file}");
    }
}

#[tokio::test]
async fn anthropic_text_basic_relays_text_end_turn_and_usage() {
    let reply = replay(Adapter::Anthropic, "anthropic-text-basic.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "Hello there!".to_owned(),
            finishes: vec![FinishReason::Stop],
            usages: vec![usage(11, 6, None)],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn anthropic_tool_use_streams_input_json_as_call_arguments() {
    let reply = replay(Adapter::Anthropic, "anthropic-tool-use.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "I'll check the current weather in Paris for you.".to_owned(),
            tool_calls: vec![Call::new(
                "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                "get_weather",
                r#"{"location": "Paris"}"#,
            )],
            finishes: vec![FinishReason::ToolCalls],
            usages: vec![usage(377, 65, Some(0))],
            ..Reply::default()
        }
    );
    assert_eq!(
        args_json(&reply.tool_calls[0]),
        json!({"location": "Paris"})
    );
}

#[tokio::test]
async fn anthropic_refusal_stop_reason_is_content_filter() {
    let reply = replay(Adapter::Anthropic, "anthropic-refusal-stop-reason.sse").await;
    assert_eq!(
        reply,
        Reply {
            finishes: vec![FinishReason::ContentFilter],
            usages: vec![usage(20, 0, None)],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn anthropic_thinking_is_reasoning_and_padded_json_parses() {
    // Payloads carry trailing spaces inside `data:` ("...}   }"); the
    // signature delta is not relayed; message_delta repeats the input
    // figures (newer API versions), which we take.
    let reply = replay(
        Adapter::Anthropic,
        "anthropic-thinking-signature-padded-json.sse",
    )
    .await;
    assert_eq!(
        reply,
        Reply {
            text: "Hi".to_owned(),
            reasoning: "Simple educational question about what a solar eclipse is. This is \
                        benign general knowledge \u{2014} definitions are fine. Also the user \
                        called me \"claudius\" \u{2014} I'm Claude. Minor correction or just \
                        roll with it politely."
                .to_owned(),
            finishes: vec![FinishReason::ContentFilter],
            usages: vec![usage(28, 106, Some(0))],
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn anthropic_recorded_text_then_tool_use() {
    let reply = replay(
        Adapter::Anthropic,
        "anthropic-text-then-tool-use-recorded.sse",
    )
    .await;
    assert_eq!(
        reply,
        Reply {
            text: "I'll help you find information about the Tigers game today and provide \
                   weather advice for appropriate clothing. Let me check both for you.\n\n\
                   First, let me search for the Tigers game schedule:"
                .to_owned(),
            tool_calls: vec![Call::new(
                "toolu_014cZKakAghgvhi4Y99XBUru",
                "search",
                r#"{"query": "Detroit Tigers baseball game today time schedule"}"#,
            )],
            finishes: vec![FinishReason::ToolCalls],
            usages: vec![usage(465, 96, Some(0))],
            ..Reply::default()
        }
    );
    assert_eq!(
        args_json(&reply.tool_calls[0]),
        json!({"query": "Detroit Tigers baseball game today time schedule"})
    );
}

#[tokio::test]
async fn anthropic_overloaded_error_event_is_unavailable() {
    let reply = replay(Adapter::Anthropic, "anthropic-error-overloaded.sse").await;
    assert_eq!(
        reply,
        Reply {
            error: Some(error(ErrorClass::Unavailable, "Overloaded")),
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn anthropic_error_midstream_after_text_is_unavailable_and_never_finishes() {
    let reply = replay(Adapter::Anthropic, "composed-anthropic-error-midstream.sse").await;
    assert_eq!(
        reply,
        Reply {
            text: "Hello there".to_owned(),
            error: Some(error(ErrorClass::Unavailable, "Overloaded")),
            ..Reply::default()
        }
    );
}

#[tokio::test]
async fn anthropic_stream_cut_off_before_a_stop_reason_is_a_protocol_error() {
    // Up to content_block_stop: all the text, but no message_delta.
    let cut = first_blocks("anthropic-text-basic.sse", 7);
    let (_, reply) = replay_bytes(Adapter::Anthropic, &cut).await;
    assert_eq!(
        reply,
        Reply {
            text: "Hello there!".to_owned(),
            error: Some(error(
                ErrorClass::Protocol,
                "upstream stream ended before the reply finished",
            )),
            ..Reply::default()
        }
    );
}

// ------------------------------------------------- Anthropic requests

#[test]
fn anthropic_request_translation_moves_system_builds_tool_blocks_and_merges_turns() {
    let request: ChatRequest = serde_json::from_value(json!({
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "Weather in Paris and Lyon?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"location\":\"Lyon\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
            {"role": "tool", "tool_call_id": "call_2",
             "content": [{"type": "text", "text": "15°C, rain"}]},
            {"role": "user", "content": "Which is warmer?"}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a place",
            "parameters": {"type": "object",
                           "properties": {"location": {"type": "string"}},
                           "required": ["location"]}
        }}],
        "tool_choice": "auto",
        "temperature": 0.2,
        "stop": "END",
        "user": "user-42",
        "response_format": {"type": "text"}
    }))
    .expect("a valid OpenAI request");

    let body = anthropic::translate_request(&request, 4096);
    assert_eq!(
        body,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "stream": true,
            "system": "You are a weather assistant.\n\nUse metric units.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather in Paris and Lyon?"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather",
                     "input": {"location": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_weather",
                     "input": {"location": "Lyon"}}
                ]},
                // Both tool results and the next user message: one user turn,
                // results first.
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C, sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "15°C, rain"},
                    {"type": "text", "text": "Which is warmer?"}
                ]}
            ],
            "temperature": 0.2,
            "stop_sequences": ["END"],
            "tools": [{
                "name": "get_weather",
                "description": "Current weather for a place",
                "input_schema": {"type": "object",
                                 "properties": {"location": {"type": "string"}},
                                 "required": ["location"]}
            }],
            "tool_choice": {"type": "auto"},
            "metadata": {"user_id": "user-42"}
        })
    );
}

#[test]
fn anthropic_request_translation_token_limit_and_tool_choice() {
    let request = |extra: Value| -> ChatRequest {
        let mut value = json!({
            "model": "claude-haiku-4-5",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "lookup", "arguments": "not json"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "done"}
            ]
        });
        for (key, field) in extra.as_object().expect("an object") {
            value[key] = field.clone();
        }
        serde_json::from_value(value).expect("a valid request")
    };

    let body = anthropic::translate_request(&request(json!({})), 1024);
    assert_eq!(body["max_tokens"], 1024);
    assert!(body.get("system").is_none());
    assert!(body.get("tool_choice").is_none());
    // Assistant text then its call; unparsable arguments become `{}`.
    assert_eq!(
        body["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "text", "text": "Hello!"},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
        ]})
    );

    let body = anthropic::translate_request(&request(json!({"max_tokens": 100})), 1024);
    assert_eq!(body["max_tokens"], 100);
    let body = anthropic::translate_request(
        &request(json!({"max_tokens": 100, "max_completion_tokens": 256})),
        1024,
    );
    assert_eq!(body["max_tokens"], 256);

    let body = anthropic::translate_request(&request(json!({"tool_choice": "required"})), 1024);
    assert_eq!(body["tool_choice"], json!({"type": "any"}));
    let body = anthropic::translate_request(&request(json!({"tool_choice": "none"})), 1024);
    assert_eq!(body["tool_choice"], json!({"type": "none"}));
    let body = anthropic::translate_request(
        &request(json!({"tool_choice": {"type": "function", "function": {"name": "lookup"}}})),
        1024,
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "lookup"})
    );
}

// ------------------------------------------------- Anthropic edge cases

/// An Anthropic stream built from `(event, data)` pairs.
fn anthropic_events(events: &[(&str, Value)]) -> Vec<u8> {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test]
async fn anthropic_tool_called_without_parameters_gets_empty_object_arguments() {
    let bytes = anthropic_events(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_now", "name": "get_time", "input": {}}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let (_, reply) = replay_bytes(Adapter::Anthropic, &bytes).await;
    assert_eq!(
        reply.tool_calls,
        vec![Call::new("toolu_now", "get_time", "{}")]
    );
    assert_eq!(reply.finishes, vec![FinishReason::ToolCalls]);
    assert_eq!(reply.error, None);
}

#[tokio::test]
async fn anthropic_server_tool_input_is_not_relayed_as_a_client_tool_call() {
    let bytes = anthropic_events(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 5}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": "{\"query\":\"rust\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "text_delta", "text": "Found it."}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let (_, reply) = replay_bytes(Adapter::Anthropic, &bytes).await;
    assert_eq!(reply.text, "Found it.");
    assert!(reply.tool_calls.is_empty(), "{:?}", reply.tool_calls);
    assert_eq!(reply.error, None);
}

#[test]
fn anthropic_tools_without_a_description_omit_the_field() {
    let request: ChatRequest = serde_json::from_value(json!({
        "model": "claude-haiku-4-5",
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [{"type": "function", "function": {"name": "get_time"}}]
    }))
    .unwrap();
    let body = anthropic::translate_request(&request, 1024);
    assert_eq!(
        body["tools"],
        json!([{"name": "get_time", "input_schema": {"type": "object"}}])
    );
}

//! The Gemini adapter against the recorded `streamGenerateContent?alt=sse`
//! transcripts (`tests/fixtures/providers/gemini-*.sse`, see its README.md),
//! plus request translation and error classification.
//!
//! Every expected value was read off the fixture files and is written here
//! as a literal, so a decoding change shows up as a failure. Each transcript
//! is fed in one read, one byte per read, and split in two at every byte;
//! all must give identical events and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use spillway::provider::{
    ChatRequest, ErrorClass, EventStream, FinishReason, ProviderError, ProviderEvent,
    ToolCallDelta, Usage, gemini,
};

/// The production defaults of `upstream.max_event_bytes` and
/// `upstream.max_error_body_bytes`.
const EVENT_CAP: usize = 1024 * 1024;
const ERROR_CAP: usize = 64 * 1024;

const FIXTURES: [&str; 5] = [
    "gemini-sse-basic-crlf.sse",
    "gemini-sse-error-midstream-raw-json.sse",
    "gemini-sse-function-call-vertex.sse",
    "gemini-sse-prompt-blocked.sse",
    "gemini-sse-thinking-function-call.sse",
];

fn read_fixture(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/providers")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// Decodes `reads` as one body.
fn decode_reads(reads: Vec<&[u8]>, error_cap: usize) -> EventStream {
    let reads: Vec<Result<Bytes, io::Error>> = reads
        .into_iter()
        .map(|read| Ok(Bytes::copy_from_slice(read)))
        .collect();
    gemini::decode_stream(futures_util::stream::iter(reads), EVENT_CAP, error_cap)
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

type Outcome = (Vec<ProviderEvent>, Option<ProviderError>);

/// Decodes `bytes` in one read and byte by byte; both must agree exactly.
async fn decode(bytes: &[u8]) -> Outcome {
    let whole = drain(decode_reads(vec![bytes], ERROR_CAP)).await;
    let bytewise = drain(decode_reads(bytes.chunks(1).collect(), ERROR_CAP)).await;
    assert_eq!(
        bytewise, whole,
        "byte-by-byte decoding differs from one read"
    );
    check_contract(&whole);
    whole
}

/// Decodes `bytes` split in two reads at every position; each must agree
/// with `expected`.
async fn assert_every_split_agrees(bytes: &[u8], expected: &Outcome, what: &str) {
    for at in 0..=bytes.len() {
        let (head, tail) = bytes.split_at(at);
        let split = drain(decode_reads(vec![head, tail], ERROR_CAP)).await;
        assert_eq!(&split, expected, "{what}: split at byte {at}");
    }
}

/// The adapter contract: a stream that ends cleanly has exactly one
/// `Finish`; only `Usage` follows it; a failed stream never finished.
fn check_contract((events, error): &Outcome) {
    let finishes = events
        .iter()
        .filter(|e| matches!(e, ProviderEvent::Finish(_)))
        .count();
    if error.is_some() {
        assert_eq!(finishes, 0, "a failed stream must not finish: {events:?}");
    } else {
        assert_eq!(finishes, 1, "a clean stream finishes once: {events:?}");
        let at = events
            .iter()
            .position(|e| matches!(e, ProviderEvent::Finish(_)))
            .unwrap();
        assert!(
            events[at + 1..]
                .iter()
                .all(|e| matches!(e, ProviderEvent::Usage(_))),
            "only usage may follow the finish: {events:?}"
        );
    }
}

fn text(text: &str) -> ProviderEvent {
    ProviderEvent::Text(text.to_owned())
}

fn reasoning(text: &str) -> ProviderEvent {
    ProviderEvent::Reasoning(text.to_owned())
}

fn usage(prompt: u64, completion: u64, cached: Option<u64>) -> ProviderEvent {
    ProviderEvent::Usage(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_prompt_tokens: cached,
    })
}

fn error(class: ErrorClass, message: &str) -> ProviderError {
    ProviderError::new(class, message)
}

/// Checks a tool-call event: index, id, name, and arguments that parse to
/// `args`. Gemini sends whole calls, so each is one event.
fn assert_call(event: &ProviderEvent, index: u32, id: &str, name: &str, args: &Value) {
    let ProviderEvent::ToolCall(ToolCallDelta {
        index: got_index,
        id: got_id,
        name: got_name,
        arguments,
    }) = event
    else {
        panic!("expected a tool call, got {event:?}");
    };
    assert_eq!(*got_index, index);
    assert_eq!(got_id.as_deref(), Some(id));
    assert_eq!(got_name.as_deref(), Some(name));
    let parsed: Value = serde_json::from_str(arguments)
        .unwrap_or_else(|err| panic!("arguments {arguments:?} are not JSON: {err}"));
    assert_eq!(&parsed, args);
}

// ------------------------------------------------------------- fixtures

#[tokio::test]
async fn basic_crlf_relays_text_then_stop_then_the_latest_usage() {
    let (events, err) = decode(&read_fixture("gemini-sse-basic-crlf.sse")).await;
    assert_eq!(err, None);
    assert_eq!(
        events,
        vec![
            text("The"),
            text(" capital of Wyoming"),
            text(" is **Cheyenne**.\n"),
            ProviderEvent::Finish(FinishReason::Stop),
            usage(7, 10, None),
        ]
    );
}

#[tokio::test]
async fn thought_parts_are_reasoning_and_a_function_call_finishes_with_tool_calls() {
    let (events, err) = decode(&read_fixture("gemini-sse-thinking-function-call.sse")).await;
    assert_eq!(err, None);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(
        events[0],
        reasoning(
            "**Calculating the Days**\n\nI've determined the user's request involves \
             calculating the days until New Year's Eve. I need to get the current date and \
             the date of New Year's Eve. My plan involves using `default_api.now()` to get \
             the current date and time. Then, I can perform the calculation to find the time \
             difference.\n\n\n"
        )
    );
    assert_eq!(
        events[1],
        reasoning(
            "**Determining the Approach**\n\nI'm now zeroing in on the best method. Having \
             established the core requirement -- the number of days until New Year's Eve -- \
             I've identified `default_api.now()` as my primary tool for retrieving the current \
             date. I'll need to define December 31st of the current year. I've also recognized \
             the need to calculate the difference, which isn't a direct function. I'll \
             calculate this myself after getting today's date.\n\n\n"
        )
    );
    // No id from Gemini: a generated one; the thought signature is dropped.
    assert_call(&events[2], 0, "call_0", "now", &json!({}));
    assert_eq!(events[3], ProviderEvent::Finish(FinishReason::ToolCalls));
    // Completion = candidates (6) + thoughts (168).
    assert_eq!(events[4], usage(38, 174, None));
}

#[tokio::test]
async fn vertex_function_call_in_one_chunk_without_usage() {
    let (events, err) = decode(&read_fixture("gemini-sse-function-call-vertex.sse")).await;
    assert_eq!(err, None);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_call(
        &events[0],
        0,
        "call_0",
        "getTemperature",
        &json!({ "city": "San Jose" }),
    );
    assert_eq!(events[1], ProviderEvent::Finish(FinishReason::ToolCalls));
}

#[tokio::test]
async fn bare_json_error_midstream_fails_the_reply_despite_finish_reasons() {
    let (events, err) = decode(&read_fixture("gemini-sse-error-midstream-raw-json.sse")).await;
    assert_eq!(events, vec![text("First "), text("Second ")]);
    assert_eq!(
        err,
        Some(error(
            ErrorClass::Unavailable,
            "The operation was cancelled."
        ))
    );
}

#[tokio::test]
async fn blocked_prompt_is_a_content_policy_error() {
    // The recording's only event lacks its blank line, so SSE discards it;
    // it still explains the failure.
    let bytes = read_fixture("gemini-sse-prompt-blocked.sse");
    let expected = error(
        ErrorClass::ContentPolicy,
        "the provider blocked the prompt (blockReason SAFETY)",
    );
    let (events, err) = decode(&bytes).await;
    assert_eq!(events, vec![]);
    assert_eq!(err, Some(expected.clone()));

    // Terminated as the live API sends it: the same error, from the event.
    let mut terminated = bytes.clone();
    terminated.extend_from_slice(b"\r\n");
    let (events, err) = decode(&terminated).await;
    assert_eq!(events, vec![]);
    assert_eq!(err, Some(expected));
}

#[tokio::test]
async fn every_fixture_decodes_the_same_however_it_is_split() {
    for file in FIXTURES {
        let bytes = read_fixture(file);
        let expected = decode(&bytes).await;
        assert_every_split_agrees(&bytes, &expected, file).await;
    }
}

// ------------------------------------------------- the bare JSON error

#[tokio::test]
async fn bare_json_error_is_captured_when_split_at_every_byte() {
    // The error follows a finished CRLF transcript: the finish must not win.
    let mut bytes = read_fixture("gemini-sse-basic-crlf.sse");
    bytes.extend_from_slice(
        b"{\r\n  \"error\": {\r\n    \"code\": 429,\r\n    \"message\": \"Resource has been \
          exhausted (e.g. check quota).\",\r\n    \"status\": \"RESOURCE_EXHAUSTED\"\r\n  }\r\n}\r\n",
    );
    let expected = (
        vec![
            text("The"),
            text(" capital of Wyoming"),
            text(" is **Cheyenne**.\n"),
        ],
        Some(error(
            ErrorClass::RateLimited,
            "Resource has been exhausted (e.g. check quota).",
        )),
    );
    assert_eq!(decode(&bytes).await, expected);
    assert_every_split_agrees(&bytes, &expected, "crlf + error").await;

    let raw = read_fixture("gemini-sse-error-midstream-raw-json.sse");
    let expected = (
        vec![text("First "), text("Second ")],
        Some(error(
            ErrorClass::Unavailable,
            "The operation was cancelled.",
        )),
    );
    assert_every_split_agrees(&raw, &expected, "raw json fixture").await;
}

#[tokio::test]
async fn bare_json_error_as_the_whole_body_after_a_bom() {
    let body = b"\xEF\xBB\xBF{\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\
                 \"status\":\"UNAVAILABLE\"}}";
    let (events, err) = decode(body).await;
    assert_eq!(events, vec![]);
    assert_eq!(
        err,
        Some(error(ErrorClass::Unavailable, "The model is overloaded."))
    );
}

#[tokio::test]
async fn bare_json_error_after_other_noise_is_still_found() {
    let mut bytes = read_fixture("gemini-sse-error-midstream-raw-json.sse");
    bytes.splice(0..0, b"-- proxy says hi {\n\n".iter().copied());
    let (events, err) = decode(&bytes).await;
    assert_eq!(events, vec![text("First "), text("Second ")]);
    assert_eq!(
        err,
        Some(error(
            ErrorClass::Unavailable,
            "The operation was cancelled."
        ))
    );
}

#[tokio::test]
async fn short_non_sse_noise_is_ignored_but_oversized_noise_fails() {
    let mut bytes = b"# not sse\n\n".to_vec();
    bytes.extend_from_slice(&read_fixture("gemini-sse-basic-crlf.sse"));
    let (events, err) = decode(&bytes).await;
    assert_eq!(err, None);
    assert_eq!(events.len(), 5);

    // The same bytes with room for only 4 bytes of non-SSE text: something
    // we could not read came, so the reply cannot be trusted.
    for reads in [vec![&bytes[..]], bytes.chunks(1).collect()] {
        let (events, err) = drain(decode_reads(reads, 4)).await;
        assert_eq!(events.len(), 3, "text only: {events:?}");
        assert_eq!(
            err,
            Some(error(
                ErrorClass::Protocol,
                "upstream sent more than 4 bytes outside SSE events",
            ))
        );
    }

    // An error body larger than the bound cannot be parsed either.
    let raw = read_fixture("gemini-sse-error-midstream-raw-json.sse");
    let (_, err) = drain(decode_reads(vec![&raw[..]], 64)).await;
    assert_eq!(
        err,
        Some(error(
            ErrorClass::Protocol,
            "upstream sent more than 64 bytes outside SSE events",
        ))
    );
}

// --------------------------------------------------- synthetic streams

fn sse(chunks: &[Value]) -> Vec<u8> {
    chunks
        .iter()
        .flat_map(|chunk| format!("data: {chunk}\r\n\r\n").into_bytes())
        .collect()
}

#[tokio::test]
async fn stream_cut_before_any_finish_reason_is_a_protocol_error() {
    let cut_error = error(
        ErrorClass::Protocol,
        "upstream stream ended before the reply finished",
    );
    let full = read_fixture("gemini-sse-basic-crlf.sse");
    let text_of = |events: &[ProviderEvent]| {
        events
            .iter()
            .map(|e| match e {
                ProviderEvent::Text(t) => t.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect::<String>()
    };

    // Two whole events, then the body ends.
    let second_end = full
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"\r\n\r\n")
        .nth(1)
        .unwrap()
        .0
        + 4;
    let (events, err) = decode(&full[..second_end]).await;
    assert_eq!(text_of(&events), "The capital of Wyoming");
    assert_eq!(err, Some(cut_error.clone()));

    // The final event (with its STOP) cut off in the middle, or lacking only
    // its blank line: it is discarded, so the reply did not finish.
    for end in [second_end + 100, full.len() - 2] {
        let (events, err) = decode(&full[..end]).await;
        assert_eq!(text_of(&events), "The capital of Wyoming", "cut at {end}");
        assert_eq!(err, Some(cut_error.clone()), "cut at {end}");
    }

    // Nothing at all.
    assert_eq!(decode(b"").await, (vec![], Some(cut_error)));
}

#[tokio::test]
async fn the_latest_finish_reason_wins_and_is_mapped() {
    let cases = [
        ("STOP", FinishReason::Stop),
        ("MAX_TOKENS", FinishReason::Length),
        ("SAFETY", FinishReason::ContentFilter),
        ("RECITATION", FinishReason::ContentFilter),
        ("BLOCKLIST", FinishReason::ContentFilter),
        ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
        ("SPII", FinishReason::ContentFilter),
        ("IMAGE_SAFETY", FinishReason::ContentFilter),
        (
            "MALFORMED_FUNCTION_CALL",
            FinishReason::Other("malformed_function_call".to_owned()),
        ),
        ("OTHER", FinishReason::Other("other".to_owned())),
    ];
    for (reason, expected) in cases {
        let bytes = sse(&[
            json!({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}]}),
            json!({"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": reason}],
                   "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 3,
                                     "thoughtsTokenCount": 4, "cachedContentTokenCount": 8}}),
        ]);
        let (events, err) = decode(&bytes).await;
        assert_eq!(err, None, "{reason}");
        assert_eq!(
            events,
            vec![
                text("a"),
                text("b"),
                ProviderEvent::Finish(expected),
                usage(12, 7, Some(8)),
            ],
            "{reason}"
        );
    }
}

#[tokio::test]
async fn function_call_ids_from_gemini_are_kept_and_indexes_count_calls() {
    let bytes = sse(&[
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "Checking."},
            {"functionCall": {"id": "fc-7", "name": "lookup", "args": {"q": "a", "n": [1, 2]}}},
        ]}}]}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "lookup"}},
            {"functionCall": {"name": "other", "args": {"nested": {"x": null}}},
             "thoughtSignature": "c2ln"},
        ]}, "finishReason": "STOP"}]}),
    ]);
    let (events, err) = decode(&bytes).await;
    assert_eq!(err, None);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events[0], text("Checking."));
    assert_call(
        &events[1],
        0,
        "fc-7",
        "lookup",
        &json!({"q": "a", "n": [1, 2]}),
    );
    assert_call(&events[2], 1, "call_1", "lookup", &json!({}));
    assert_call(
        &events[3],
        2,
        "call_2",
        "other",
        &json!({"nested": {"x": null}}),
    );
    assert_eq!(events[4], ProviderEvent::Finish(FinishReason::ToolCalls));
}

#[tokio::test]
async fn in_band_data_error_and_malformed_chunks_fail() {
    let bytes = sse(&[
        json!({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}),
        json!({"error": {"code": 500, "message": "An internal error has occurred.",
                         "status": "INTERNAL"}}),
    ]);
    assert_eq!(
        decode(&bytes).await,
        (
            vec![text("Hi")],
            Some(error(
                ErrorClass::Unavailable,
                "An internal error has occurred."
            ))
        )
    );

    let (events, err) = decode(b"data: {\"candidates\": [\r\n\r\n").await;
    assert_eq!(events, vec![]);
    let err = err.unwrap();
    assert_eq!(err.class, ErrorClass::Protocol);
    assert!(
        err.message.starts_with("malformed upstream chunk: "),
        "{}",
        err.message
    );
}

// ------------------------------------------------------ error bodies

#[test]
fn error_bodies_are_classified_by_status() {
    let body = |status: &str, message: &str| json!({"error": {"code": 400, "message": message, "status": status}});
    let cases = [
        (
            body("RESOURCE_EXHAUSTED", "Quota exceeded."),
            ErrorClass::InvalidRequest,
            ErrorClass::RateLimited,
        ),
        (
            body("UNAVAILABLE", "The model is overloaded."),
            ErrorClass::InvalidRequest,
            ErrorClass::Unavailable,
        ),
        (
            body("INTERNAL", "Internal error."),
            ErrorClass::InvalidRequest,
            ErrorClass::Unavailable,
        ),
        (
            body("CANCELLED", "Cancelled."),
            ErrorClass::InvalidRequest,
            ErrorClass::Unavailable,
        ),
        (
            body("DEADLINE_EXCEEDED", "Deadline expired."),
            ErrorClass::Unavailable,
            ErrorClass::Timeout,
        ),
        (
            body(
                "INVALID_ARGUMENT",
                "The input token count (1234567) exceeds the maximum number of tokens \
                 allowed (1048576).",
            ),
            ErrorClass::InvalidRequest,
            ErrorClass::ContextLength,
        ),
        (
            body(
                "INVALID_ARGUMENT",
                "Unable to submit request because it has an empty text parameter.",
            ),
            ErrorClass::InvalidRequest,
            ErrorClass::InvalidRequest,
        ),
        (
            body("PERMISSION_DENIED", "Permission denied."),
            ErrorClass::InvalidRequest,
            ErrorClass::Auth,
        ),
        (
            body("UNAUTHENTICATED", "Missing credentials."),
            ErrorClass::InvalidRequest,
            ErrorClass::Auth,
        ),
        (
            body("NOT_FOUND", "models/nope is not found."),
            ErrorClass::InvalidRequest,
            ErrorClass::InvalidRequest,
        ),
        (
            body("FAILED_PRECONDITION", "User location is not supported."),
            ErrorClass::Unavailable,
            ErrorClass::Unavailable,
        ),
    ];
    for (body, status_class, expected) in cases {
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        assert_eq!(
            gemini::classify_error_body(&body, status_class),
            Some((expected, message)),
            "{body}"
        );
    }
}

#[test]
fn bad_api_key_array_form_and_non_error_bodies() {
    // Google answers a bad key with 400 INVALID_ARGUMENT.
    let bad_key = json!({"error": {"code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}});
    assert_eq!(
        gemini::classify_error_body(&bad_key, ErrorClass::InvalidRequest),
        Some((
            ErrorClass::Auth,
            "API key not valid. Please pass a valid API key.".to_owned()
        ))
    );

    let array = json!([{"error": {"code": 429, "message": "Slow down.",
                                  "status": "RESOURCE_EXHAUSTED"}}]);
    assert_eq!(
        gemini::classify_error_body(&array, ErrorClass::RateLimited),
        Some((ErrorClass::RateLimited, "Slow down.".to_owned()))
    );

    let no_message = json!({"error": {"code": 503, "status": "UNAVAILABLE"}});
    assert_eq!(
        gemini::classify_error_body(&no_message, ErrorClass::Unavailable),
        Some((
            ErrorClass::Unavailable,
            "upstream reported UNAVAILABLE".to_owned()
        ))
    );

    for body in [
        json!({"message": "nope"}),
        json!("error"),
        json!({"error": "x"}),
    ] {
        assert_eq!(
            gemini::classify_error_body(&body, ErrorClass::InvalidRequest),
            None,
            "{body}"
        );
    }
}

// ---------------------------------------------------------- requests

fn request(value: Value) -> ChatRequest {
    serde_json::from_value(value).unwrap()
}

#[test]
fn system_and_developer_messages_become_the_system_instruction() {
    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.JPG?x=1"}},
            ]},
        ],
        "user": "u-1",
        "logprobs": true,
    })));
    assert_eq!(
        body,
        json!({
            "contents": [
                {"role": "user", "parts": [
                    {"text": "Hi"},
                    {"text": "What is this?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
                    {"fileData": {"mimeType": "image/jpeg",
                                  "fileUri": "https://example.com/cat.JPG?x=1"}},
                ]},
            ],
            "systemInstruction": {"parts": [{"text": "Be brief.\n\nAnswer in French."}]},
        })
    );
}

#[test]
fn generation_config_carries_limits_and_sampling() {
    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 10,
        "max_completion_tokens": 256,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END", "STOP"],
    })));
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens": 256, "temperature": 0.5, "topP": 0.9,
               "stopSequences": ["END", "STOP"]})
    );

    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 10,
        "stop": "END",
    })));
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens": 10, "stopSequences": ["END"]})
    );

    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Hi"}],
    })));
    assert_eq!(
        body,
        json!({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
    );
}

#[test]
fn tools_and_tool_choice_are_declared() {
    let tools = json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather of a city.",
            "parameters": {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "additionalProperties": {"type": "object", "additionalProperties": false},
                    "days": {"type": "array", "items": {"type": "object",
                        "properties": {"d": {"type": "integer"}}, "additionalProperties": false}},
                },
                "required": ["city"],
                "additionalProperties": false,
            },
        }},
        {"type": "function", "function": {"name": "now"}},
    ]);
    let expected_tools = json!([{"functionDeclarations": [
        {
            "name": "get_weather",
            "description": "Weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "additionalProperties": {"type": "object"},
                    "days": {"type": "array", "items": {"type": "object",
                        "properties": {"d": {"type": "integer"}}}},
                },
                "required": ["city"],
            },
        },
        {"name": "now"},
    ]}]);
    let cases = [
        (json!("auto"), Some(json!({"mode": "AUTO"}))),
        (json!("none"), Some(json!({"mode": "NONE"}))),
        (json!("required"), Some(json!({"mode": "ANY"}))),
        (
            json!({"type": "function", "function": {"name": "now"}}),
            Some(json!({"mode": "ANY", "allowedFunctionNames": ["now"]})),
        ),
        (Value::Null, None),
    ];
    for (choice, expected) in cases {
        let mut value = json!({
            "model": "gemini-2.5-flash",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": tools,
        });
        if !choice.is_null() {
            value["tool_choice"] = choice.clone();
        }
        let body = gemini::translate_request(&request(value));
        assert_eq!(body["tools"], expected_tools, "{choice}");
        assert_eq!(
            body.get("toolConfig"),
            expected
                .map(|mode| json!({"functionCallingConfig": mode}))
                .as_ref(),
            "{choice}"
        );
    }

    // No tools, no calling config.
    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Hi"}],
        "tool_choice": "none",
    })));
    assert_eq!(body.get("tools"), None);
    assert_eq!(body.get("toolConfig"), None);
}

#[test]
fn a_tool_round_trip_becomes_function_call_and_response_parts() {
    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_time", "arguments": "not json"}},
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_1",
             "content": [{"type": "text", "text": "12:00"}]},
            {"role": "user", "content": "Thanks. And tomorrow?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "forecast", "arguments": "{\"day\":1}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "20C"},
            {"role": "tool", "tool_call_id": "unknown", "name": "named", "content": "?"},
        ],
    })));
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {}}},
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "18C"}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}},
                {"text": "Thanks. And tomorrow?"},
            ]},
            {"role": "model", "parts": [
                {"text": "Let me check."},
                {"functionCall": {"name": "forecast", "args": {"day": 1}}},
            ]},
            {"role": "user", "parts": [
                // The id was reused by a later turn: the latest call wins.
                {"functionResponse": {"name": "forecast", "response": {"content": "20C"}}},
                {"functionResponse": {"name": "named", "response": {"content": "?"}}},
            ]},
        ])
    );
}

#[test]
fn a_trailing_assistant_prefill_stays_the_final_model_turn() {
    let body = gemini::translate_request(&request(json!({
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "A long one."},
            {"role": "assistant", "content": "Once upon a time"},
        ],
    })));
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Tell me a story."}, {"text": "A long one."}]},
            {"role": "model", "parts": [{"text": "Once upon a time"}]},
        ])
    );
}

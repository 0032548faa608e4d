//! `request_json`: the OpenAI-compatible chat completion request body
//! (`http::openai::check_request`), then the Anthropic and Gemini request
//! translations of every accepted request.
//!
//! Input: the request body, raw bytes (invalid UTF-8 included).
//!
//! Checks:
//! - no panic, in parsing, checking, or translating;
//! - a rejection is a typed client error: HTTP 400 or 413, type
//!   `invalid_request_error`, a non-empty code, and it renders as a
//!   response with that status;
//! - an accepted request satisfies what the endpoint promises to the rest
//!   of the gateway: a non-blank `model`, at least one message, and the
//!   delivery fields (`stream`, `stream_options`, `n`) taken out of `extra`;
//! - serialized and checked again it is accepted and serializes the same
//!   (what the gateway forwards upstream is a fixed point), floats up to
//!   rounding: serde_json's default float parser (without the
//!   `float_roundtrip` feature) is not correctly rounded, so a float can
//!   move by an ULP or so per parse (`regressions/request_json/
//!   float-drift-not-a-crash` is such an input: 1e42 written out in full
//!   is forwarded as 9.999999999999999e41).

use axum::response::IntoResponse;
use serde_json::Value;
use spillway::http::openai::check_request;
use spillway::provider::{anthropic, gemini};

/// Runs the checks on one fuzz input.
pub fn check(data: &[u8]) {
    let request = match check_request(data) {
        Ok(request) => request,
        Err(err) => {
            crate::trace!(
                "request_json: rejected: {} {}: {}",
                err.status,
                err.code,
                err.message
            );
            let status = err.status.as_u16();
            assert!(
                status == 400 || status == 413,
                "a rejected body got HTTP {status}: {err:?}"
            );
            assert_eq!(err.kind, "invalid_request_error", "{err:?}");
            assert!(!err.code.is_empty(), "a rejection without a code: {err:?}");
            assert!(
                !err.retryable,
                "a malformed body is marked retryable: {err:?}"
            );
            let response = err.into_response();
            assert_eq!(response.status().as_u16(), status);
            return;
        }
    };
    crate::trace!(
        "request_json: accepted ({} messages)",
        request.messages.len()
    );
    assert!(!request.model.trim().is_empty(), "accepted a blank model");
    assert!(!request.messages.is_empty(), "accepted no messages");
    for delivery in ["stream", "stream_options", "n"] {
        assert!(
            !request.extra.contains_key(delivery),
            "'{delivery}' was left in the forwarded extras"
        );
    }
    let _ = request.token_limit();
    let _ = request.prompt_chars();
    for message in &request.messages {
        let _ = message.joined_text();
        let _ = message.text_len();
    }

    let anthropic = anthropic::translate_request(&request, 4096);
    let _ = anthropic.to_string();
    let gemini = gemini::translate_request(&request);
    let _ = gemini.to_string();

    let forwarded = serde_json::to_string(&request).expect("a ChatRequest serializes");
    let again = match check_request(forwarded.as_bytes()) {
        Ok(again) => again,
        Err(err) => panic!("the serialized request is rejected: {err:?}\n{forwarded}"),
    };
    let forwarded_again = serde_json::to_string(&again).expect("a ChatRequest serializes");
    if forwarded != forwarded_again {
        let before: Value = serde_json::from_str(&forwarded).expect("serialized JSON parses");
        let after: Value = serde_json::from_str(&forwarded_again).expect("serialized JSON parses");
        assert!(
            same_up_to_float_rounding(&before, &after),
            "serializing is not a fixed point:\n before: {forwarded}\n after:  {forwarded_again}"
        );
    }
}

/// Whether `a` and `b` are the same JSON, except that floats may differ by
/// a few ULPs (relative 1e-14).
fn same_up_to_float_rounding(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            if x.is_f64() || y.is_f64() {
                let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) else {
                    return false;
                };
                (x - y).abs() <= 1e-14 * x.abs().max(y.abs())
            } else {
                false
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(x, y)| same_up_to_float_rounding(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same_up_to_float_rounding(vx, vy))
        }
        _ => a == b,
    }
}

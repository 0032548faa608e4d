//! `ws_frame`: the WebSocket client frame parser
//! (`protocol::parse_client_frame`), which sees every text message a
//! client sends.
//!
//! Input: the message text (invalid UTF-8 is replaced, as a WebSocket
//! text message is always UTF-8).
//!
//! Checks:
//! - no panic;
//! - a rejection serializes (`ServerFrame::to_json`) to a JSON object with
//!   `"type": "error"`, one of the parser's codes, a string message,
//!   `"retryable": false`;
//! - the message stays proportional to the input (it may quote the
//!   offending field, escaped, but must not blow up);
//! - an accepted frame was a JSON object whose `type` is the frame's kind.

use spillway::protocol::{ClientFrame, parse_client_frame};

/// The codes `parse_client_frame` answers with.
const CODES: [&str; 3] = ["invalid_json", "invalid_frame", "unknown_frame_type"];

/// The frame's `type`: its variant name in snake case (read from `Debug`,
/// so frames added to the protocol later need no change here).
fn kind(frame: &ClientFrame) -> String {
    let debug = format!("{frame:?}");
    let name = debug.split([' ', '{', '(']).next().unwrap_or_default();
    let mut snake = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake
}

/// Runs the checks on one fuzz input.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_client_frame(&text) {
        Ok(frame) => {
            crate::trace!("ws_frame: accepted {frame:?}");
            let value: serde_json::Value =
                serde_json::from_str(&text).expect("an accepted frame is JSON");
            assert_eq!(
                value.get("type").and_then(|t| t.as_str()),
                Some(kind(&frame).as_str()),
                "accepted frame {frame:?} has another type"
            );
        }
        Err(frame) => {
            assert_eq!(
                frame.event_name(),
                "error",
                "a rejection is not an error frame"
            );
            let json = frame.to_json();
            crate::trace!("ws_frame: rejected: {json}");
            let value: serde_json::Value =
                serde_json::from_str(&json).expect("the error frame serializes to JSON");
            assert_eq!(value["type"], "error", "{json}");
            let code = value["code"]
                .as_str()
                .expect("the error frame has a string code");
            assert!(
                CODES.contains(&code),
                "unexpected error code {code}: {json}"
            );
            let message = value["message"]
                .as_str()
                .expect("the error frame has a message");
            assert!(!message.is_empty(), "empty error message");
            assert!(
                message.len() <= 1024 + 12 * text.len(),
                "error message of {} bytes for a {}-byte frame",
                message.len(),
                text.len()
            );
            assert_eq!(value["retryable"], false, "{json}");
        }
    }
}

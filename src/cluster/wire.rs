//! How log events and outcomes are written in Redis: compact JSON that
//! every instance of any version since this one reads back exactly.

use serde::{Deserialize, Serialize};

use crate::generation::{CancelReason, Outcome};
use crate::provider::{
    ErrorClass, FinishReason, ProviderError, ProviderEvent, ToolCallDelta, Usage,
};

/// A [`ProviderEvent`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireEvent {
    /// Visible text.
    Text(String),
    /// Reasoning text.
    Reasoning(String),
    /// Refusal text.
    Refusal(String),
    /// A tool-call fragment.
    ToolCall {
        /// The call's position.
        index: u32,
        /// The call id (first fragment).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The function name (first fragment).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Argument text.
        arguments: String,
    },
    /// Usage.
    Usage {
        /// Prompt tokens.
        prompt_tokens: u64,
        /// Completion tokens.
        completion_tokens: u64,
        /// Cached prompt tokens.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cached_prompt_tokens: Option<u64>,
    },
    /// The finish reason (OpenAI's vocabulary).
    Finish(String),
    /// The reply restarts on another target.
    Restart,
}

impl From<&ProviderEvent> for WireEvent {
    fn from(event: &ProviderEvent) -> Self {
        match event {
            ProviderEvent::Text(text) => Self::Text(text.clone()),
            ProviderEvent::Reasoning(text) => Self::Reasoning(text.clone()),
            ProviderEvent::Refusal(text) => Self::Refusal(text.clone()),
            ProviderEvent::ToolCall(call) => Self::ToolCall {
                index: call.index,
                id: call.id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
            ProviderEvent::Usage(usage) => Self::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cached_prompt_tokens: usage.cached_prompt_tokens,
            },
            ProviderEvent::Finish(reason) => Self::Finish(reason.as_str().to_owned()),
            ProviderEvent::Restart => Self::Restart,
        }
    }
}

impl From<WireEvent> for ProviderEvent {
    fn from(event: WireEvent) -> Self {
        match event {
            WireEvent::Text(text) => Self::Text(text),
            WireEvent::Reasoning(text) => Self::Reasoning(text),
            WireEvent::Refusal(text) => Self::Refusal(text),
            WireEvent::ToolCall {
                index,
                id,
                name,
                arguments,
            } => Self::ToolCall(ToolCallDelta {
                index,
                id,
                name,
                arguments,
            }),
            WireEvent::Usage {
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens,
            } => Self::Usage(Usage {
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens,
            }),
            WireEvent::Finish(reason) => Self::Finish(FinishReason::from_openai(&reason)),
            WireEvent::Restart => Self::Restart,
        }
    }
}

/// Events as the JSON array a stream entry holds.
pub(crate) fn encode_events(events: &[ProviderEvent]) -> String {
    let wire: Vec<WireEvent> = events.iter().map(WireEvent::from).collect();
    serde_json::to_string(&wire).unwrap_or_else(|_| "[]".to_owned())
}

/// A stream entry's JSON array back as events; `None` if malformed.
pub(crate) fn decode_events(json: &str) -> Option<Vec<ProviderEvent>> {
    let wire: Vec<WireEvent> = serde_json::from_str(json).ok()?;
    Some(wire.into_iter().map(ProviderEvent::from).collect())
}

/// A terminal outcome on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireOutcome {
    Complete,
    Failed {
        code: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    Cancelled {
        reason: String,
    },
}

/// An outcome as the meta hash's `status` JSON.
pub fn encode_outcome(outcome: &Outcome) -> String {
    let wire = match outcome {
        Outcome::Complete => WireOutcome::Complete,
        Outcome::Failed(err) => WireOutcome::Failed {
            code: err.class.code().to_owned(),
            message: err.message.clone(),
            status: err.status,
        },
        Outcome::Cancelled(reason) => WireOutcome::Cancelled {
            reason: match reason {
                CancelReason::Abandoned => "abandoned",
                CancelReason::Requested => "requested",
                CancelReason::Shutdown => "shutdown",
            }
            .to_owned(),
        },
    };
    serde_json::to_string(&wire).unwrap_or_default()
}

/// The meta hash's `status` JSON back as an outcome; an unreadable one is
/// an interruption (the reply cannot be trusted to be whole).
pub fn decode_outcome(json: &str) -> Outcome {
    match serde_json::from_str::<WireOutcome>(json) {
        Ok(WireOutcome::Complete) => Outcome::Complete,
        Ok(WireOutcome::Failed {
            code,
            message,
            status,
        }) => {
            let class = ErrorClass::from_code(&code).unwrap_or(ErrorClass::Unavailable);
            let mut err = ProviderError::new(class, message);
            err.status = status;
            Outcome::Failed(err)
        }
        Ok(WireOutcome::Cancelled { reason }) => Outcome::Cancelled(match reason.as_str() {
            "abandoned" => CancelReason::Abandoned,
            "requested" => CancelReason::Requested,
            _ => CancelReason::Shutdown,
        }),
        Err(_) => Outcome::Failed(ProviderError::new(
            ErrorClass::Interrupted,
            "the reply's end could not be read",
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn events_round_trip() {
        let events = vec![
            ProviderEvent::Text("héllo \"x\"\n".into()),
            ProviderEvent::Reasoning("think".into()),
            ProviderEvent::Refusal("no".into()),
            ProviderEvent::ToolCall(ToolCallDelta {
                index: 1,
                id: Some("call_1".into()),
                name: Some("f".into()),
                arguments: "{\"a\":".into(),
            }),
            ProviderEvent::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_prompt_tokens: Some(1),
            }),
            ProviderEvent::Finish(FinishReason::Other("weird".into())),
            ProviderEvent::Restart,
        ];
        let json = encode_events(&events);
        assert_eq!(decode_events(&json).unwrap(), events);
        assert_eq!(decode_events("{not json"), None);
    }

    #[test]
    fn outcomes_round_trip() {
        let mut err = ProviderError::new(ErrorClass::RateLimited, "slow down");
        err.status = Some(429);
        for outcome in [
            Outcome::Complete,
            Outcome::Failed(err),
            Outcome::Failed(ProviderError::new(ErrorClass::Interrupted, "gone")),
            Outcome::Cancelled(CancelReason::Requested),
            Outcome::Cancelled(CancelReason::Abandoned),
            Outcome::Cancelled(CancelReason::Shutdown),
        ] {
            assert_eq!(decode_outcome(&encode_outcome(&outcome)), outcome);
        }
        assert!(matches!(
            decode_outcome("garbage"),
            Outcome::Failed(ProviderError {
                class: ErrorClass::Interrupted,
                ..
            })
        ));
    }
}

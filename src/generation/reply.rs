//! A reply assembled from a generation's frames: what a non-streaming
//! response returns and what persistence will store.

use std::collections::BTreeMap;

use crate::provider::{FinishReason, ProviderEvent, Usage};

use super::Frame;

/// The whole assistant message, built up frame by frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The visible answer.
    pub text: String,
    /// The model's reasoning, where it streamed any.
    pub reasoning: String,
    /// A refusal message, where the model refused.
    pub refusal: String,
    /// Tool calls by index, arguments accumulated.
    pub tool_calls: BTreeMap<u32, ToolCall>,
    /// Why the model stopped.
    pub finish: Option<FinishReason>,
    /// The provider's usage report.
    pub usage: Option<Usage>,
}

/// One accumulated tool call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// The call id.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The JSON arguments text.
    pub arguments: String,
}

impl Reply {
    /// Folds one frame into the reply.
    pub fn apply(&mut self, frame: &Frame) {
        match &frame.event {
            ProviderEvent::Text(text) => self.text.push_str(text),
            ProviderEvent::Reasoning(text) => self.reasoning.push_str(text),
            ProviderEvent::Refusal(text) => self.refusal.push_str(text),
            ProviderEvent::ToolCall(delta) => {
                let call = self.tool_calls.entry(delta.index).or_default();
                if let Some(id) = &delta.id {
                    call.id.clone_from(id);
                }
                if let Some(name) = &delta.name {
                    call.name.clone_from(name);
                }
                call.arguments.push_str(&delta.arguments);
            }
            ProviderEvent::Usage(usage) => self.usage = Some(*usage),
            ProviderEvent::Finish(reason) => self.finish = Some(reason.clone()),
            // The reply starts over: what came before is not part of it.
            ProviderEvent::Restart => *self = Self::default(),
        }
    }
}

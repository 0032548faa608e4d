//! The Anthropic Messages API (`POST /v1/messages`, `stream: true`).
//!
//! Stream semantics: `message_start` carries input usage; each content block
//! opens with `content_block_start` (text, thinking or `tool_use` with id and
//! name), grows by `content_block_delta` (`text_delta`, `thinking_delta`,
//! `input_json_delta` with `partial_json`, `signature_delta`) and closes with
//! `content_block_stop`; `message_delta` carries the stop reason and the
//! cumulative output usage; `message_stop` ends the stream; `ping` is a
//! keep-alive; `event: error` after HTTP 200 is an in-band failure.
//!
//! Requests are translated from the OpenAI shape: system and developer
//! messages become `system`, tool results become `tool_result` blocks of a
//! user turn, assistant tool calls become `tool_use` blocks, consecutive
//! turns of one role are merged, and `max_tokens` (required by Anthropic)
//! defaults to the provider's `default_max_tokens`.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::request::{Content, Role};
use super::sse::{SseDecoder, SseEvent};
use super::{
    ApiKey, BuildError, ChatRequest, ErrorClass, EventStream, FinishReason, Provider,
    ProviderError, ProviderEvent, ToolCallDelta, Usage, WireDecoder,
};
use crate::config::{ProviderConfig, UpstreamConfig};

/// The API version we speak.
const API_VERSION: &str = "2023-06-01";

/// An Anthropic Messages upstream.
#[derive(Debug)]
pub struct AnthropicProvider {
    name: String,
    /// `…/v1/messages`, precomputed.
    url: String,
    key: Option<ApiKey>,
    client: reqwest::Client,
    /// `max_tokens` when the client set none (Anthropic requires one).
    default_max_tokens: u32,
    max_event_bytes: usize,
    max_error_body_bytes: usize,
}

impl AnthropicProvider {
    /// Builds the adapter from its configuration.
    pub fn new(config: &ProviderConfig, upstream: &UpstreamConfig) -> Result<Self, BuildError> {
        let base = config
            .base_url
            .as_deref()
            .unwrap_or("https://api.anthropic.com/v1");
        Ok(Self {
            name: config.name.clone(),
            url: format!("{}/messages", base.trim_end_matches('/')),
            key: ApiKey::from_config(config)?,
            client: super::http_client(config, upstream)?,
            default_max_tokens: config.default_max_tokens,
            max_event_bytes: upstream.max_event_bytes,
            max_error_body_bytes: upstream.max_error_body_bytes,
        })
    }
}

impl Provider for AnthropicProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let body = translate_request(&request, self.default_max_tokens);
            let mut call = self
                .client
                .post(&self.url)
                .header("anthropic-version", API_VERSION)
                .json(&body);
            call = crate::telemetry::propagate(call, request.trace.as_ref());
            if let Some(key) = &self.key {
                call = call.header("x-api-key", key.expose());
            }
            let response = super::send(
                &self.name,
                call,
                self.max_error_body_bytes,
                classify_error_body,
            )
            .await?;
            Ok(decode_stream(response.bytes_stream(), self.max_event_bytes))
        })
    }
}

/// Decodes an Anthropic Messages SSE body into normalized events.
pub fn decode_stream<S, E>(body: S, max_event_bytes: usize) -> EventStream
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    super::event_stream(
        SseDecoder::new(body, max_event_bytes),
        StreamDecoder::default(),
    )
}

/// A `tool_use` block being streamed.
#[derive(Debug, Clone, Copy)]
struct ToolBlock {
    /// The call's index among the reply's tool calls.
    index: u32,
    /// Whether any argument text has been emitted for it.
    has_arguments: bool,
}

/// The per-stream state of the event decoder.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// Input tokens from `message_start` (including cache reads/writes).
    prompt_tokens: u64,
    /// Cache reads from `message_start`.
    cached_prompt_tokens: Option<u64>,
    /// Content block index → its tool call, for `tool_use` blocks.
    tool_blocks: HashMap<u32, ToolBlock>,
    /// Stop reason seen in `message_delta`.
    finished: bool,
    /// `message_stop` seen.
    done: bool,
}

impl WireDecoder for StreamDecoder {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<ProviderEvent>, ProviderError> {
        if self.done {
            return Ok(Vec::new());
        }
        let wire: WireEvent = serde_json::from_str(&event.data).map_err(|err| {
            ProviderError::protocol(format!("malformed upstream event '{}': {err}", event.event))
        })?;
        let mut events = Vec::new();
        match wire {
            WireEvent::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.prompt_tokens = usage.prompt_tokens();
                    self.cached_prompt_tokens = usage.cache_read_input_tokens;
                }
            }
            WireEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::ToolUse { id, name, input } => {
                    let tool_index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                    // Streams open tool blocks with `input: {}` and send the
                    // arguments as deltas; a block that already carries its
                    // input (non-empty) gets it as the first fragment.
                    let arguments = match input {
                        Some(Value::Object(map)) if !map.is_empty() => {
                            Value::Object(map).to_string()
                        }
                        _ => String::new(),
                    };
                    self.tool_blocks.insert(
                        index,
                        ToolBlock {
                            index: tool_index,
                            has_arguments: !arguments.is_empty(),
                        },
                    );
                    events.push(ProviderEvent::ToolCall(ToolCallDelta {
                        index: tool_index,
                        id: Some(id),
                        name: Some(name),
                        arguments,
                    }));
                }
                // Blocks open empty in streams; keep any seed text.
                Block::Text { text } if !text.is_empty() => events.push(ProviderEvent::Text(text)),
                Block::Thinking { thinking } if !thinking.is_empty() => {
                    events.push(ProviderEvent::Reasoning(thinking));
                }
                Block::Text { .. } | Block::Thinking { .. } => {}
                Block::Other => {}
            },
            WireEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if !text.is_empty() => {
                    events.push(ProviderEvent::Text(text));
                }
                BlockDelta::ThinkingDelta { thinking } if !thinking.is_empty() => {
                    events.push(ProviderEvent::Reasoning(thinking));
                }
                // Input of blocks that are not client tool calls (server
                // tools run by Anthropic) is not relayed.
                BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    if let Some(block) = self.tool_blocks.get_mut(&index) {
                        block.has_arguments = true;
                        events.push(ProviderEvent::ToolCall(ToolCallDelta {
                            index: block.index,
                            id: None,
                            name: None,
                            arguments: partial_json,
                        }));
                    }
                }
                _ => {}
            },
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.stop_reason {
                    self.finished = true;
                    events.push(ProviderEvent::Finish(finish_reason(&reason)));
                }
                if let Some(usage) = usage {
                    // Newer API versions repeat the input figures here.
                    if usage.input_tokens.is_some() {
                        self.prompt_tokens = usage.prompt_tokens();
                        self.cached_prompt_tokens = usage.cache_read_input_tokens;
                    }
                    events.push(ProviderEvent::Usage(Usage {
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: usage.output_tokens.unwrap_or(0),
                        cached_prompt_tokens: self.cached_prompt_tokens,
                    }));
                }
            }
            WireEvent::MessageStop => {
                self.done = true;
                if !self.finished {
                    return Err(ProviderError::protocol(
                        "upstream sent message_stop without a stop reason",
                    ));
                }
            }
            WireEvent::Error { error } => return Err(in_band_error(&error)),
            // A tool called without parameters streams no input at all;
            // OpenAI clients parse the arguments as JSON, so send `{}`.
            WireEvent::ContentBlockStop { index } => {
                if let Some(block) = self.tool_blocks.get(&index)
                    && !block.has_arguments
                {
                    events.push(ProviderEvent::ToolCall(ToolCallDelta {
                        index: block.index,
                        arguments: "{}".to_owned(),
                        ..ToolCallDelta::default()
                    }));
                }
            }
            WireEvent::Ping | WireEvent::Other => {}
        }
        Ok(events)
    }

    /// The body ended. A reply whose `message_delta` carried a stop reason
    /// is complete even if `message_stop` was lost (e.g. a final event
    /// without its blank line, which SSE discards).
    fn on_eof(&mut self) -> Result<Vec<ProviderEvent>, ProviderError> {
        self.done = true;
        if self.finished {
            Ok(Vec::new())
        } else {
            Err(ProviderError::protocol(
                "upstream stream ended before the reply finished",
            ))
        }
    }

    fn is_over(&self) -> bool {
        self.done
    }
}

/// Maps Anthropic's `stop_reason` to OpenAI's vocabulary.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

fn in_band_error(error: &WireError) -> ProviderError {
    let class = classify(error, ErrorClass::Unavailable);
    ProviderError::new(class, error.message.clone())
}

/// Anthropic has no dedicated context-length error type: an over-long
/// prompt is an `invalid_request_error` whose message says so.
fn classify(error: &WireError, fallback: ErrorClass) -> ErrorClass {
    if error.kind != "invalid_request_error" {
        return super::class_from_error_type(&error.kind, fallback);
    }
    let message = error.message.to_ascii_lowercase();
    if message.contains("prompt is too long") || message.contains("context window") {
        ErrorClass::ContextLength
    } else {
        ErrorClass::InvalidRequest
    }
}

/// Classifies an error body: `{"type":"error","error":{"type","message"}}`.
pub(crate) fn classify_error_body(
    body: &Value,
    status_class: ErrorClass,
) -> Option<(ErrorClass, String)> {
    let error: WireError = serde_json::from_value(body.get("error")?.clone()).ok()?;
    Some((classify(&error, status_class), error.message))
}

/// Translates an OpenAI-shaped request into an Anthropic Messages body.
pub fn translate_request(request: &ChatRequest, default_max_tokens: u32) -> Value {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for message in &request.messages {
        let (role, blocks) = match message.role {
            Role::System | Role::Developer => {
                system.push(message.joined_text());
                continue;
            }
            Role::User => ("user", content_blocks(message.content.as_ref())),
            Role::Assistant => {
                let mut blocks = content_blocks(message.content.as_ref());
                for call in message.tool_calls.iter().flatten() {
                    let input = serde_json::from_str::<Value>(&call.function.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            Role::Tool => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.clone().unwrap_or_default(),
                    "content": message.joined_text(),
                })],
            ),
        };
        match turns.last_mut() {
            Some((last_role, last_blocks)) if *last_role == role => last_blocks.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(request.model));
    body.insert(
        "max_tokens".into(),
        json!(request.token_limit().unwrap_or(default_max_tokens)),
    );
    body.insert("stream".into(), json!(true));
    body.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, content)| json!({ "role": role, "content": content }))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(temperature) = request.temperature {
        body.insert("temperature".into(), json!(temperature));
    }
    if let Some(top_p) = request.top_p {
        body.insert("top_p".into(), json!(top_p));
    }
    if let Some(stop) = &request.stop {
        body.insert("stop_sequences".into(), json!(stop.to_vec()));
    }
    if let Some(tools) = &request.tools {
        let tools: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let mut decl = json!({
                    "name": tool.function.name,
                    "input_schema": tool.function.parameters.clone()
                        .unwrap_or_else(|| json!({ "type": "object" })),
                });
                if let (Some(description), Some(map)) =
                    (&tool.function.description, decl.as_object_mut())
                {
                    map.insert("description".into(), json!(description));
                }
                decl
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = request.tool_choice.as_ref().and_then(tool_choice) {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(user) = &request.user {
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    Value::Object(body)
}

fn content_blocks(content: Option<&Content>) -> Vec<Value> {
    match content {
        None => Vec::new(),
        Some(Content::Text(text)) if text.is_empty() => Vec::new(),
        Some(Content::Text(text)) => vec![json!({ "type": "text", "text": text })],
        Some(Content::Parts(parts)) => parts.iter().filter_map(content_part).collect(),
    }
}

fn content_part(part: &Value) -> Option<Value> {
    match part.get("type")?.as_str()? {
        "text" => Some(json!({ "type": "text", "text": part.get("text")?.as_str()? })),
        "image_url" => {
            let url = part.get("image_url")?.get("url")?.as_str()?;
            let source = match url.strip_prefix("data:") {
                Some(rest) => {
                    let (media_type, data) = rest.split_once(";base64,")?;
                    json!({ "type": "base64", "media_type": media_type, "data": data })
                }
                None => json!({ "type": "url", "url": url }),
            };
            Some(json!({ "type": "image", "source": source }))
        }
        _ => None,
    }
}

fn tool_choice(choice: &Value) -> Option<Value> {
    match choice {
        Value::String(mode) => match mode.as_str() {
            "auto" => Some(json!({ "type": "auto" })),
            "required" => Some(json!({ "type": "any" })),
            "none" => Some(json!({ "type": "none" })),
            _ => None,
        },
        Value::Object(_) => {
            let name = choice.get("function")?.get("name")?.as_str()?;
            Some(json!({ "type": "tool", "name": name }))
        }
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        #[serde(default)]
        index: u32,
    },
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: WireError,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Option<Value>,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Anthropic reports cache reads and writes apart from `input_tokens`;
    /// OpenAI's `prompt_tokens` includes them, so we add them up.
    fn prompt_tokens(&self) -> u64 {
        self.input_tokens.unwrap_or(0)
            + self.cache_creation_input_tokens.unwrap_or(0)
            + self.cache_read_input_tokens.unwrap_or(0)
    }
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

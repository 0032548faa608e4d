//! OpenAI-compatible chat completions: OpenAI itself, vLLM, Ollama's `/v1`,
//! Groq, OpenRouter, LiteLLM and friends.
//!
//! We always stream upstream (with `stream_options.include_usage`, so usage
//! is known for every reply) and assemble non-streaming answers from the
//! generation log. An upstream that answers a streaming request with a
//! plain `application/json` completion anyway (some proxies do) is decoded
//! by [`decode_completion`] into the same events.
//!
//! Stream semantics: a chunk's `choices[0].delta` carries text, refusal,
//! reasoning or tool-call fragments; a non-null `finish_reason` finishes the
//! reply; a chunk with `usage` reports tokens (OpenAI sends it after the
//! finish chunk, with `choices: []`); `data: {"error": …}` is an in-band
//! failure; `data: [DONE]` ends the stream. Only choice 0 is relayed (the
//! edge rejects `n > 1`). Logprobs are not relayed.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sse::{SseDecoder, SseEvent};
use super::{
    ApiKey, BuildError, ChatRequest, ErrorClass, EventStream, FinishReason, Provider,
    ProviderError, ProviderEvent, ToolCallDelta, Usage, WireDecoder,
};
use crate::config::{ProviderConfig, UpstreamConfig};

/// An OpenAI-compatible upstream.
#[derive(Debug)]
pub struct OpenAiProvider {
    name: String,
    /// `…/v1/chat/completions`, precomputed.
    url: String,
    key: Option<ApiKey>,
    client: reqwest::Client,
    max_event_bytes: usize,
    max_error_body_bytes: usize,
}

impl OpenAiProvider {
    /// Builds the adapter from its configuration.
    pub fn new(config: &ProviderConfig, upstream: &UpstreamConfig) -> Result<Self, BuildError> {
        let base = config
            .base_url
            .as_deref()
            .unwrap_or("https://api.openai.com/v1");
        Ok(Self {
            name: config.name.clone(),
            url: format!("{}/chat/completions", base.trim_end_matches('/')),
            key: ApiKey::from_config(config)?,
            client: super::http_client(config, upstream)?,
            max_event_bytes: upstream.max_event_bytes,
            max_error_body_bytes: upstream.max_error_body_bytes,
        })
    }

    /// The JSON body we send: the request plus streaming with usage.
    fn body(request: ChatRequest) -> Value {
        let mut body = match serde_json::to_value(request) {
            Ok(Value::Object(map)) => map,
            // A ChatRequest always serializes to an object.
            _ => Map::new(),
        };
        body.insert("stream".into(), Value::Bool(true));
        body.insert(
            "stream_options".into(),
            serde_json::json!({ "include_usage": true }),
        );
        Value::Object(body)
    }
}

impl Provider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let trace = request.trace.clone();
            let mut call = self.client.post(&self.url).json(&Self::body(request));
            call = crate::telemetry::propagate(call, trace.as_ref());
            if let Some(key) = &self.key {
                call = call.bearer_auth(key.expose());
            }
            let response = super::send(
                &self.name,
                call,
                self.max_error_body_bytes,
                classify_error_body,
            )
            .await?;
            let is_json = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            if is_json {
                let body = response
                    .bytes()
                    .await
                    .map_err(|err| ProviderError::from_transport(&self.name, &err))?;
                let events = decode_completion(&body)?;
                return Ok(futures_util::stream::iter(events.into_iter().map(Ok)).boxed());
            }
            Ok(decode_stream(response.bytes_stream(), self.max_event_bytes))
        })
    }
}

/// Decodes an OpenAI chat-completions SSE body into normalized events.
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

/// The per-stream state of the chunk decoder.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    finished: bool,
    done: bool,
}

impl StreamDecoder {
    /// Decodes one event's `data`.
    pub fn on_data(&mut self, data: &str) -> Result<Vec<ProviderEvent>, ProviderError> {
        if self.done {
            return Ok(Vec::new());
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return if self.finished {
                Ok(Vec::new())
            } else {
                Err(ProviderError::protocol(
                    "upstream sent [DONE] before a finish reason",
                ))
            };
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|err| ProviderError::protocol(format!("malformed upstream chunk: {err}")))?;
        if let Some(error) = chunk.error {
            return Err(in_band_error(&error));
        }
        let mut events = Vec::new();
        if let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                push_delta(&mut events, delta);
            }
            if let Some(reason) = choice.finish_reason {
                self.finished = true;
                events.push(ProviderEvent::Finish(FinishReason::from_openai(&reason)));
            }
        }
        if let Some(usage) = chunk.usage {
            events.push(ProviderEvent::Usage(usage.into()));
        }
        Ok(events)
    }
}

impl WireDecoder for StreamDecoder {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<ProviderEvent>, ProviderError> {
        self.on_data(&event.data)
    }

    /// The body ended. A reply that finished is complete even without
    /// `[DONE]` (the terminator adds nothing once the finish reason is
    /// known); one that did not finish was cut off.
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

fn push_delta(events: &mut Vec<ProviderEvent>, delta: Delta) {
    if let Some(reasoning) = delta.reasoning_content.or(delta.reasoning)
        && !reasoning.is_empty()
    {
        events.push(ProviderEvent::Reasoning(reasoning));
    }
    if let Some(text) = delta.content
        && !text.is_empty()
    {
        events.push(ProviderEvent::Text(text));
    }
    if let Some(refusal) = delta.refusal
        && !refusal.is_empty()
    {
        events.push(ProviderEvent::Refusal(refusal));
    }
    for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let function = call.function.unwrap_or_default();
        let arguments = function.arguments.unwrap_or_default();
        if call.id.is_none() && function.name.is_none() && arguments.is_empty() {
            continue;
        }
        events.push(ProviderEvent::ToolCall(ToolCallDelta {
            index: call
                .index
                .unwrap_or(u32::try_from(position).unwrap_or(u32::MAX)),
            id: call.id,
            name: function.name,
            arguments,
        }));
    }
}

/// Decodes a whole (non-streaming) chat completion into the events a
/// stream of it would have produced.
pub fn decode_completion(body: &[u8]) -> Result<Vec<ProviderEvent>, ProviderError> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|err| ProviderError::protocol(format!("malformed upstream completion: {err}")))?;
    if let Some(error) = completion.error {
        return Err(in_band_error(&error));
    }
    let choice = completion
        .choices
        .into_iter()
        .find(|c| c.index == 0)
        .ok_or_else(|| ProviderError::protocol("upstream completion has no choices"))?;
    let mut events = Vec::new();
    if let Some(message) = choice.message {
        let calls = message.tool_calls.unwrap_or_default();
        let delta = Delta {
            content: message.content,
            refusal: message.refusal,
            reasoning_content: message.reasoning_content,
            reasoning: None,
            tool_calls: None,
        };
        push_delta(&mut events, delta);
        for (index, call) in calls.into_iter().enumerate() {
            events.push(ProviderEvent::ToolCall(ToolCallDelta {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                id: Some(call.id),
                name: Some(call.function.name),
                arguments: call.function.arguments,
            }));
        }
    }
    let reason = choice.finish_reason.unwrap_or_else(|| "stop".to_owned());
    events.push(ProviderEvent::Finish(FinishReason::from_openai(&reason)));
    if let Some(usage) = completion.usage {
        events.push(ProviderEvent::Usage(usage.into()));
    }
    Ok(events)
}

/// Classifies an error body: `{"error":{"message","type","code"}}`.
pub(crate) fn classify_error_body(
    body: &Value,
    status_class: ErrorClass,
) -> Option<(ErrorClass, String)> {
    let error: WireError = serde_json::from_value(body.get("error")?.clone()).ok()?;
    let provider_error = classify(&error, status_class);
    Some((provider_error.class, provider_error.message))
}

/// An error sent inside a 200 stream or completion.
fn in_band_error(error: &WireError) -> ProviderError {
    classify(error, ErrorClass::Unavailable)
}

fn classify(error: &WireError, fallback: ErrorClass) -> ProviderError {
    let kind = [error.kind.as_deref(), error.code_str().as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let class = super::class_from_error_type(&kind, fallback);
    let message = error
        .message
        .clone()
        .unwrap_or_else(|| "upstream reported an error".to_owned());
    ProviderError::new(class, message)
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    /// DeepSeek / vLLM name for reasoning text.
    #[serde(default)]
    reasoning_content: Option<String>,
    /// OpenRouter / Ollama name for reasoning text.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallChunk>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallChunk {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionChunk>,
}

#[derive(Debug, Default, Deserialize)]
struct FunctionChunk {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_prompt_tokens: usage.prompt_tokens_details.and_then(|d| d.cached_tokens),
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<Value>,
}

impl WireError {
    /// `code` is a string at OpenAI and a number at some compatibles.
    fn code_str(&self) -> Option<String> {
        match &self.code {
            Some(Value::String(code)) => Some(code.clone()),
            Some(Value::Number(code)) => Some(code.to_string()),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    message: Option<CompletionMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<super::request::ToolCall>>,
}

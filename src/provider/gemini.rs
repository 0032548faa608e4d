//! Google Gemini `POST {base}/models/{model}:streamGenerateContent?alt=sse`
//! (the Developer API; Vertex AI speaks the same format under its own base
//! URL).
//!
//! Stream semantics: every `data:` event is a whole `GenerateContentResponse`
//! chunk. Its `candidates[0].content.parts[]` carry text (`thought: true`
//! marks reasoning) and whole function calls (`functionCall {name, args,
//! id?}`, never split across chunks); `finishReason` may appear on several
//! chunks and `usageMetadata` is repeated and grows, so both are remembered
//! and reported once, at the end of the body: Gemini has no terminator (no
//! `[DONE]`, no `message_stop`). `promptFeedback.blockReason` with no
//! candidates means the prompt itself was refused.
//!
//! **Errors outside SSE.** When Google fails a stream after it began, it
//! may write its error as bare (often pretty-printed) JSON with no `data:`
//! prefix. SSE ignores such lines, so a small line scanner watches the raw
//! bytes before the SSE layer does and keeps the lines that cannot be SSE
//! fields (bounded by `upstream.max_error_body_bytes`); at the end of the
//! body, if they hold `{"error": {…}}`, the reply fails with that error even
//! when finish reasons were seen (Gemini repeats `STOP` on ordinary chunks,
//! so a finish reason alone does not prove the reply is whole).
//!
//! Requests are translated from the OpenAI shape: system and developer
//! messages become `systemInstruction`, assistant turns are `model` turns
//! with `functionCall` parts, tool results are `functionResponse` parts of a
//! user turn, consecutive turns of one role are merged, and sampling options
//! go into `generationConfig`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::request::{Content, Role};
use super::sse::{SseDecoder, SseEvent};
use super::{
    ApiKey, BuildError, ChatRequest, ErrorClass, EventStream, FinishReason, Provider,
    ProviderError, ProviderEvent, ToolCallDelta, Usage, WireDecoder,
};
use crate::config::{ProviderConfig, UpstreamConfig};

/// The Developer API's base URL.
const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// A Gemini upstream.
#[derive(Debug)]
pub struct GeminiProvider {
    name: String,
    /// The base URL without a trailing slash; the model goes after it.
    base_url: String,
    key: Option<ApiKey>,
    client: reqwest::Client,
    max_event_bytes: usize,
    max_error_body_bytes: usize,
}

impl GeminiProvider {
    /// Builds the adapter from its configuration.
    pub fn new(config: &ProviderConfig, upstream: &UpstreamConfig) -> Result<Self, BuildError> {
        let base = config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Ok(Self {
            name: config.name.clone(),
            base_url: base.trim_end_matches('/').to_owned(),
            key: ApiKey::from_config(config)?,
            client: super::http_client(config, upstream)?,
            max_event_bytes: upstream.max_event_bytes,
            max_error_body_bytes: upstream.max_error_body_bytes,
        })
    }

    /// `…/models/{model}:streamGenerateContent?alt=sse`. A model written
    /// with Google's `models/` resource prefix is accepted too.
    fn url(&self, model: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!(
            "{}/models/{model}:streamGenerateContent?alt=sse",
            self.base_url
        )
    }
}

impl Provider for GeminiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let body = translate_request(&request);
            let mut call = self.client.post(self.url(&request.model)).json(&body);
            call = crate::telemetry::propagate(call, request.trace.as_ref());
            if let Some(key) = &self.key {
                call = call.header("x-goog-api-key", key.expose());
            }
            let response = super::send(
                &self.name,
                call,
                self.max_error_body_bytes,
                classify_error_body,
            )
            .await?;
            Ok(decode_stream(
                response.bytes_stream(),
                self.max_event_bytes,
                self.max_error_body_bytes,
            ))
        })
    }
}

// ------------------------------------------------------------ the stream

/// Decodes a Gemini `alt=sse` body into normalized events. Events larger
/// than `max_event_bytes` fail the stream; at most `max_error_body_bytes` of
/// non-SSE text (a bare JSON error) is kept for the end of the body.
pub fn decode_stream<S, E>(
    body: S,
    max_event_bytes: usize,
    max_error_body_bytes: usize,
) -> EventStream
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let scanner = Arc::new(Mutex::new(LineScanner::new(max_error_body_bytes)));
    let feed = Arc::clone(&scanner);
    let body = body.inspect(move |read| {
        if let Ok(bytes) = read {
            lock(&feed).feed(bytes);
        }
    });
    super::event_stream(
        SseDecoder::new(body, max_event_bytes),
        StreamDecoder {
            scanner,
            finish: None,
            usage: None,
            calls: 0,
            done: false,
        },
    )
}

/// The per-stream state of the chunk decoder.
#[derive(Debug)]
struct StreamDecoder {
    /// What the raw bytes held besides SSE, shared with the body wrapper.
    scanner: Arc<Mutex<LineScanner>>,
    /// The latest `finishReason`.
    finish: Option<String>,
    /// The latest `usageMetadata`.
    usage: Option<Usage>,
    /// Function calls relayed so far (the next call's index).
    calls: u32,
    /// The body ended (or the reply failed).
    done: bool,
}

impl StreamDecoder {
    fn on_data(&mut self, data: &str) -> Result<Vec<ProviderEvent>, ProviderError> {
        if data.trim().is_empty() {
            return Ok(Vec::new());
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|err| ProviderError::protocol(format!("malformed upstream chunk: {err}")))?;
        if let Some(err) = chunk_failure(&chunk) {
            return Err(err);
        }
        let mut events = Vec::new();
        if let Some(candidate) = chunk.candidates.into_iter().next() {
            let parts = candidate.content.map(|c| c.parts).unwrap_or_default();
            for part in parts {
                self.push_part(&mut events, part);
            }
            if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(reason);
            }
        }
        if let Some(usage) = chunk.usage_metadata {
            self.usage = Some(usage.into());
        }
        Ok(events)
    }

    fn push_part(&mut self, events: &mut Vec<ProviderEvent>, part: Part) {
        if let Some(call) = part.function_call {
            let index = self.calls;
            self.calls = self.calls.saturating_add(1);
            let arguments = match call.args {
                Some(args @ Value::Object(_)) => args.to_string(),
                _ => "{}".to_owned(),
            };
            events.push(ProviderEvent::ToolCall(ToolCallDelta {
                index,
                id: Some(
                    call.id
                        .filter(|id| !id.is_empty())
                        .unwrap_or_else(|| format!("call_{index}")),
                ),
                name: Some(call.name),
                arguments,
            }));
        } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
            if part.thought == Some(true) {
                events.push(ProviderEvent::Reasoning(text));
            } else {
                events.push(ProviderEvent::Text(text));
            }
        }
        // `thoughtSignature`, inline data and code-execution parts are not
        // relayed.
    }
}

impl WireDecoder for StreamDecoder {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<ProviderEvent>, ProviderError> {
        if self.done {
            return Ok(Vec::new());
        }
        let decoded = self.on_data(&event.data);
        if decoded.is_err() {
            self.done = true;
        }
        decoded
    }

    /// The body ended: a bare JSON error fails the reply; otherwise the
    /// latest finish reason finishes it, followed by the latest usage. No
    /// finish reason at all means the reply was cut off.
    fn on_eof(&mut self) -> Result<Vec<ProviderEvent>, ProviderError> {
        self.done = true;
        let (raw_error, trailing) = {
            let scanner = lock(&self.scanner);
            (scanner.raw_error(), scanner.unterminated_data())
        };
        if let Some(err) = raw_error {
            return Err(err);
        }
        if let Some(reason) = &self.finish {
            let mut events = vec![ProviderEvent::Finish(finish_reason(reason, self.calls > 0))];
            if let Some(usage) = self.usage {
                events.push(ProviderEvent::Usage(usage));
            }
            return Ok(events);
        }
        // The SSE layer discards a final event without its blank line (see
        // `provider/sse.rs`), so its content is never relayed; but if it says
        // why the reply failed (a blocked prompt, an error), that beats a
        // bare protocol error.
        let salvaged = trailing
            .and_then(|data| serde_json::from_str::<Chunk>(&data).ok())
            .and_then(|chunk| chunk_failure(&chunk));
        Err(salvaged.unwrap_or_else(|| {
            ProviderError::protocol("upstream stream ended before the reply finished")
        }))
    }

    fn is_over(&self) -> bool {
        self.done
    }
}

/// The failure a chunk reports, if any: an in-band error, or a prompt
/// blocked before any candidate was generated.
fn chunk_failure(chunk: &Chunk) -> Option<ProviderError> {
    if let Some(error) = &chunk.error {
        return Some(in_band_error(error));
    }
    let feedback = chunk.prompt_feedback.as_ref()?;
    let reason = feedback.block_reason.as_deref().filter(|r| !r.is_empty())?;
    if !chunk.candidates.is_empty() {
        return None;
    }
    let mut message = format!("the provider blocked the prompt (blockReason {reason})");
    if let Some(detail) = feedback
        .block_reason_message
        .as_deref()
        .filter(|m| !m.is_empty())
    {
        message.push_str(": ");
        message.push_str(detail);
    }
    Some(ProviderError::new(ErrorClass::ContentPolicy, message))
}

/// Maps Gemini's `finishReason` to OpenAI's vocabulary. Gemini says `STOP`
/// after function calls too; OpenAI clients expect `tool_calls` then.
fn finish_reason(reason: &str, called_tools: bool) -> FinishReason {
    match reason {
        "STOP" if called_tools => FinishReason::ToolCalls,
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        other => FinishReason::Other(other.to_ascii_lowercase()),
    }
}

fn lock(scanner: &Mutex<LineScanner>) -> MutexGuard<'_, LineScanner> {
    // The scanner holds plain buffers; a panic elsewhere cannot leave them
    // in a state worse than truncated.
    scanner.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The UTF-8 byte order mark, which the SSE layer strips once at the start.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Watches the raw body, before the SSE layer, for what SSE would drop.
///
/// - Lines that cannot be SSE fields (their first byte is neither an ASCII
///   letter nor `:`), such as a bare JSON error, are kept, joined by LF, up
///   to `limit` bytes.
/// - The lines of the block being received (since the last blank line) are
///   kept up to `limit` bytes, so that a final block the SSE layer discards
///   can still explain a failure.
///
/// Line ends are CR, LF or CRLF (also when a CRLF is split across reads),
/// as in `provider/sse.rs`.
#[derive(Debug, Default)]
struct LineScanner {
    limit: usize,
    /// Non-SSE lines, each followed by LF.
    foreign: Vec<u8>,
    /// Non-SSE bytes were dropped at the limit.
    foreign_truncated: bool,
    /// The current block's lines, each followed by LF.
    block: Vec<u8>,
    /// Bytes of the current block were dropped at the limit.
    block_truncated: bool,
    /// The next byte starts a line.
    at_line_start: bool,
    /// The previous byte was CR (an LF now completes that line end).
    after_cr: bool,
    /// The current line is a non-SSE line.
    capturing: bool,
    /// How many bytes of a leading BOM have been matched; `None` once the
    /// start of the body is behind us.
    bom_matched: Option<usize>,
}

impl LineScanner {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            at_line_start: true,
            bom_matched: Some(0),
            ..Self::default()
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        for &byte in chunk {
            if let Some(matched) = self.bom_matched {
                if BOM.get(matched) == Some(&byte) {
                    let matched = matched + 1;
                    self.bom_matched = (matched < BOM.len()).then_some(matched);
                    continue;
                }
                // Not a BOM after all: those bytes start the first line.
                self.bom_matched = None;
                for &bom_byte in &BOM[..matched] {
                    self.feed_byte(bom_byte);
                }
            }
            self.feed_byte(byte);
        }
    }

    fn feed_byte(&mut self, byte: u8) {
        let crlf_tail = byte == b'\n' && self.after_cr;
        self.after_cr = byte == b'\r';
        if byte == b'\n' || byte == b'\r' {
            if crlf_tail {
                // The line already ended at the CR.
                return;
            }
            if self.at_line_start {
                // A blank line: the SSE layer dispatches the block.
                self.block.clear();
                self.block_truncated = false;
            } else {
                push_capped(
                    &mut self.block,
                    &mut self.block_truncated,
                    self.limit,
                    b'\n',
                );
                if self.capturing {
                    push_capped(
                        &mut self.foreign,
                        &mut self.foreign_truncated,
                        self.limit,
                        b'\n',
                    );
                }
                self.capturing = false;
            }
            self.at_line_start = true;
            return;
        }
        if self.at_line_start {
            self.at_line_start = false;
            self.capturing = !(byte.is_ascii_alphabetic() || byte == b':');
        }
        push_capped(&mut self.block, &mut self.block_truncated, self.limit, byte);
        if self.capturing {
            push_capped(
                &mut self.foreign,
                &mut self.foreign_truncated,
                self.limit,
                byte,
            );
        }
    }

    /// The error the non-SSE text reports: `{"error": {…}}` (or Google's
    /// array form, `[{"error": {…}}]`) parsed from the whole text or from
    /// its last line that opens an object. Non-SSE text that was cut at the
    /// limit and holds no such error is a protocol error: something large
    /// came that we could not read. Shorter noise is ignored, as SSE does.
    fn raw_error(&self) -> Option<ProviderError> {
        if self.foreign.is_empty() {
            return None;
        }
        let text = self.foreign.trim_ascii();
        let last_object = text
            .windows(2)
            .rposition(|pair| pair == b"\n{")
            .map(|at| &text[at + 1..]);
        let parsed = [Some(text), last_object]
            .into_iter()
            .flatten()
            .find_map(|candidate| {
                let value = serde_json::Deserializer::from_slice(candidate)
                    .into_iter::<Value>()
                    .next()?
                    .ok()?;
                let error: WireError =
                    serde_json::from_value(error_object(&value)?.clone()).ok()?;
                Some(in_band_error(&error))
            });
        if parsed.is_some() {
            return parsed;
        }
        self.foreign_truncated.then(|| {
            ProviderError::protocol(format!(
                "upstream sent more than {} bytes outside SSE events",
                self.limit
            ))
        })
    }

    /// The data of a final block that was not followed by a blank line
    /// (which the SSE layer discards), if it had any.
    fn unterminated_data(&self) -> Option<String> {
        if self.block.is_empty() || self.block_truncated {
            return None;
        }
        let text = std::str::from_utf8(&self.block).ok()?;
        let data: Vec<&str> = text
            .lines()
            .filter_map(|line| {
                if line == "data" {
                    Some("")
                } else {
                    let value = line.strip_prefix("data:")?;
                    Some(value.strip_prefix(' ').unwrap_or(value))
                }
            })
            .collect();
        (!data.is_empty()).then(|| data.join("\n"))
    }
}

fn push_capped(buffer: &mut Vec<u8>, truncated: &mut bool, limit: usize, byte: u8) {
    if buffer.len() < limit {
        buffer.push(byte);
    } else {
        *truncated = true;
    }
}

// ---------------------------------------------------------------- errors

/// Classifies an error body: `{"error":{"code","message","status"}}` (or
/// the same inside a one-element array). `status_class` is the fallback for
/// statuses we do not map.
pub fn classify_error_body(body: &Value, status_class: ErrorClass) -> Option<(ErrorClass, String)> {
    let error: WireError = serde_json::from_value(error_object(body)?.clone()).ok()?;
    let err = classify(&error, status_class);
    Some((err.class, err.message))
}

/// The `error` object of an error body.
fn error_object(body: &Value) -> Option<&Value> {
    let error = match body {
        Value::Array(items) => items.first()?.get("error")?,
        other => other.get("error")?,
    };
    error.is_object().then_some(error)
}

/// An error sent after HTTP 200: its `code` (an HTTP status) stands in for
/// the status we did not get.
fn in_band_error(error: &WireError) -> ProviderError {
    let fallback = match error.code.as_ref().and_then(Value::as_u64) {
        Some(code @ 400..=599) => ErrorClass::from_status(u16::try_from(code).unwrap_or(500)),
        _ => ErrorClass::Unavailable,
    };
    classify(error, fallback)
}

/// Classifies by Google's canonical `status`, falling back to `fallback`.
fn classify(error: &WireError, fallback: ErrorClass) -> ProviderError {
    let status = error.status.as_deref().unwrap_or_default();
    let message = match error.message.as_deref() {
        Some(message) if !message.is_empty() => message.to_owned(),
        _ if !status.is_empty() => format!("upstream reported {status}"),
        _ => "upstream reported an error".to_owned(),
    };
    let lower = message.to_ascii_lowercase();
    let class = match status {
        "RESOURCE_EXHAUSTED" => ErrorClass::RateLimited,
        "DEADLINE_EXCEEDED" => ErrorClass::Timeout,
        "UNAVAILABLE" | "INTERNAL" | "CANCELLED" => ErrorClass::Unavailable,
        "PERMISSION_DENIED" | "UNAUTHENTICATED" => ErrorClass::Auth,
        "INVALID_ARGUMENT" if exceeds_context(&lower) => ErrorClass::ContextLength,
        // A bad key is a 400 INVALID_ARGUMENT at Google.
        "INVALID_ARGUMENT" if is_bad_key(error, &lower) => ErrorClass::Auth,
        "INVALID_ARGUMENT" => ErrorClass::InvalidRequest,
        _ => fallback,
    };
    ProviderError::new(class, message)
}

/// Whether an `INVALID_ARGUMENT` message says the input does not fit, as in
/// "The input token count (1234567) exceeds the maximum number of tokens
/// allowed (1048576)."
fn exceeds_context(message: &str) -> bool {
    let about_input =
        message.contains("input") || message.contains("prompt") || message.contains("context");
    let about_tokens = message.contains("token") || message.contains("context");
    let too_big = message.contains("exceed") || message.contains("too long");
    about_input && about_tokens && too_big
}

fn is_bad_key(error: &WireError, message: &str) -> bool {
    message.contains("api key not valid")
        || error
            .details
            .iter()
            .flatten()
            .any(|detail| detail.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID"))
}

// --------------------------------------------------------------- request

/// Translates an OpenAI-shaped request into a `GenerateContentRequest` body
/// (the model goes in the URL).
pub fn translate_request(request: &ChatRequest) -> Value {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // Tool call id → function name, from the assistant turns so far: Gemini
    // matches a function response to its call by name.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    for message in &request.messages {
        let (role, parts) = match message.role {
            Role::System | Role::Developer => {
                let text = message.joined_text();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => ("user", content_parts(message.content.as_ref())),
            Role::Assistant => {
                let mut parts = content_parts(message.content.as_ref());
                for call in message.tool_calls.iter().flatten() {
                    call_names.insert(&call.id, &call.function.name);
                    let args = serde_json::from_str::<Value>(&call.function.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    parts.push(json!({
                        "functionCall": { "name": call.function.name, "args": args },
                    }));
                }
                ("model", parts)
            }
            Role::Tool => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                let name = call_names
                    .get(id)
                    .copied()
                    .or(message.name.as_deref())
                    .unwrap_or(id);
                let response = json!({
                    "functionResponse": {
                        "name": name,
                        "response": { "content": message.joined_text() },
                    },
                });
                ("user", vec![response])
            }
        };
        // Gemini rejects turns without parts.
        if parts.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last_role, last_parts)) if *last_role == role => last_parts.extend(parts),
            _ => turns.push((role, parts)),
        }
    }

    let mut body = Map::new();
    body.insert(
        "contents".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, parts)| json!({ "role": role, "parts": parts }))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({ "parts": [{ "text": system.join("\n\n") }] }),
        );
    }
    let mut config = Map::new();
    if let Some(limit) = request.token_limit() {
        config.insert("maxOutputTokens".into(), json!(limit));
    }
    if let Some(temperature) = request.temperature {
        config.insert("temperature".into(), json!(temperature));
    }
    if let Some(top_p) = request.top_p {
        config.insert("topP".into(), json!(top_p));
    }
    if let Some(stop) = &request.stop {
        config.insert("stopSequences".into(), json!(stop.to_vec()));
    }
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    let tools = request.tools.as_deref().unwrap_or_default();
    if !tools.is_empty() {
        let declarations: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let mut decl = Map::new();
                decl.insert("name".into(), json!(tool.function.name));
                if let Some(description) = &tool.function.description {
                    decl.insert("description".into(), json!(description));
                }
                if let Some(parameters) = &tool.function.parameters {
                    let mut parameters = parameters.clone();
                    strip_unsupported_keywords(&mut parameters);
                    decl.insert("parameters".into(), parameters);
                }
                Value::Object(decl)
            })
            .collect();
        body.insert(
            "tools".into(),
            json!([{ "functionDeclarations": declarations }]),
        );
        // Without declarations a calling config means nothing (and OpenAI
        // rejects `tool_choice` without `tools` anyway).
        if let Some(config) = request.tool_choice.as_ref().and_then(tool_config) {
            body.insert("toolConfig".into(), config);
        }
    }
    Value::Object(body)
}

fn content_parts(content: Option<&Content>) -> Vec<Value> {
    match content {
        None => Vec::new(),
        Some(Content::Text(text)) if text.is_empty() => Vec::new(),
        Some(Content::Text(text)) => vec![json!({ "text": text })],
        Some(Content::Parts(parts)) => parts.iter().filter_map(content_part).collect(),
    }
}

/// One OpenAI content part: text, or an image (a data URL inline, any other
/// URL as `fileData`, which Gemini fetches where it can). Other kinds are
/// dropped.
fn content_part(part: &Value) -> Option<Value> {
    match part.get("type")?.as_str()? {
        "text" => {
            let text = part.get("text")?.as_str()?;
            (!text.is_empty()).then(|| json!({ "text": text }))
        }
        "image_url" => {
            let url = match part.get("image_url")? {
                Value::String(url) => url.as_str(),
                object => object.get("url")?.as_str()?,
            };
            match url.strip_prefix("data:") {
                Some(rest) => {
                    let (mime_type, data) = rest.split_once(";base64,")?;
                    Some(json!({ "inlineData": { "mimeType": mime_type, "data": data } }))
                }
                None => {
                    let mut file = Map::new();
                    if let Some(mime_type) = image_mime_type(url) {
                        file.insert("mimeType".into(), json!(mime_type));
                    }
                    file.insert("fileUri".into(), json!(url));
                    Some(json!({ "fileData": file }))
                }
            }
        }
        _ => None,
    }
}

/// An image URL's MIME type, from its extension.
fn image_mime_type(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
    match extension.as_str() {
        "png" => Some("image/png"),
        "jpg" | "jpeg" => Some("image/jpeg"),
        "webp" => Some("image/webp"),
        "gif" => Some("image/gif"),
        "heic" => Some("image/heic"),
        "heif" => Some("image/heif"),
        _ => None,
    }
}

/// Removes the JSON Schema keywords OpenAI clients commonly send that
/// Gemini's OpenAPI-subset `Schema` rejects as unknown fields (`$schema`,
/// `additionalProperties`, which strict-mode tools always carry), at every
/// level of the schema. Property *names* are never touched.
fn strip_unsupported_keywords(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    map.remove("$schema");
    map.remove("additionalProperties");
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "definitions" => {
                if let Value::Object(children) = value {
                    children.values_mut().for_each(strip_unsupported_keywords);
                }
            }
            "items" | "not" => match value {
                Value::Array(items) => items.iter_mut().for_each(strip_unsupported_keywords),
                other => strip_unsupported_keywords(other),
            },
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Value::Array(items) = value {
                    items.iter_mut().for_each(strip_unsupported_keywords);
                }
            }
            _ => {}
        }
    }
}

fn tool_config(choice: &Value) -> Option<Value> {
    let config = match choice {
        Value::String(mode) => match mode.as_str() {
            "auto" => json!({ "mode": "AUTO" }),
            "none" => json!({ "mode": "NONE" }),
            "required" => json!({ "mode": "ANY" }),
            _ => return None,
        },
        Value::Object(_) => {
            let name = choice.get("function")?.get("name")?.as_str()?;
            json!({ "mode": "ANY", "allowedFunctionNames": [name] })
        }
        _ => return None,
    };
    Some(json!({ "functionCallingConfig": config }))
}

// ------------------------------------------------------------ wire types

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<WireFunctionCall>,
}

#[derive(Debug, Deserialize)]
struct WireFunctionCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
    #[serde(default)]
    block_reason_message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
}

impl From<WireUsage> for Usage {
    /// Thinking tokens are billed as output, and `promptTokenCount` already
    /// includes the cached part.
    fn from(usage: WireUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt_token_count.unwrap_or(0),
            completion_tokens: usage.candidates_token_count.unwrap_or(0)
                + usage.thoughts_token_count.unwrap_or(0),
            cached_prompt_tokens: usage.cached_content_token_count,
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireError {
    /// The HTTP status Google would have used.
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
    /// The canonical status name (`RESOURCE_EXHAUSTED`, …).
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Option<Vec<Value>>,
}

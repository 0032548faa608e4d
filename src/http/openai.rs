//! The OpenAI-compatible surface: `POST /v1/chat/completions` and
//! `GET /v1/models`, in OpenAI's wire format whichever provider serves the
//! model, so any OpenAI SDK pointed at the gateway's `base_url` just works.
//!
//! A completion is a generation read through a cursor like every other
//! transport's: the handler starts it, waits until the upstream accepted
//! the request (until then a failure is still a plain HTTP error with the
//! right status), then either streams frames as `chat.completion.chunk`s or
//! folds them into one `chat.completion`. This endpoint's callers cannot
//! resume, so the grace period is 0: a client that disconnects cancels the
//! upstream at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use futures_util::Stream;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Gateway, RequestId};
use crate::error::ApiError;
use crate::generation::{Frame, Outcome, PersistTo, Read, Reply, StartOptions, Subscriber};
use crate::provider::request::{Content, Role};
use crate::provider::{ChatRequest, ProviderEvent, Usage};
use crate::routing::AfterCommit;
use crate::store::persister::Persister;
use crate::store::{ConversationRow, MessageRow, MessageStatus, Owner, Record};

/// `GET /v1/models`: the configured model names.
pub async fn list_models(State(gateway): State<Arc<Gateway>>) -> Response {
    let data: Vec<Value> = gateway
        .routes
        .models()
        .map(|name| json!({ "id": name, "object": "model", "created": 0, "owned_by": "spillway" }))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    request: Request,
) -> Response {
    match complete(gateway, &request_id, request, Surface::OpenAi).await {
        Ok(response) => response,
        Err(err) => err.with_request_id(&request_id).into_response(),
    }
}

/// What the client asked for besides the chat request itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Delivery {
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

/// Which stateless chat API a request came in on: both run the same
/// path (credentials, limits, quota, persistence, one generation), and
/// differ in their body, the reply's wire format and whether it can be
/// resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Surface {
    /// `POST /v1/chat/completions`: no resume (grace 0).
    OpenAi,
    /// `POST /v1/ai/chat` (`super::ai_sdk`): the AI SDK's UI message
    /// stream, resumable by chat id within the native grace and window.
    AiSdk,
}

impl Surface {
    /// The `source` a persisted exchange's conversation records.
    fn source(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::AiSdk => "ai-sdk",
        }
    }
}

pub(super) async fn complete(
    gateway: Arc<Gateway>,
    request_id: &str,
    request: Request,
    surface: Surface,
) -> Result<Response, ApiError> {
    let limit = gateway.config.server.max_body_bytes;
    // Development mode: anyone may call, and `X-Spillway-User` (if any)
    // names whose history a persisted exchange goes to. With credentials
    // required, the principal is that owner.
    let caller = if gateway.auth.enabled() {
        let credentials = crate::auth::Credentials::headers(request.headers());
        Some(super::principal(&gateway, credentials).await?)
    } else {
        None
    };
    let owner = match &caller {
        Some(principal) => Some(principal.owner()),
        None => super::dev_owner(request.headers()),
    };
    let trace = crate::telemetry::Trace::from_headers(request_id, request.headers());
    let body = super::read_body(request.into_body(), limit).await?;
    let (mut chat, delivery, chat_id) = match surface {
        Surface::OpenAi => {
            let (chat, delivery) = parse_request(&body)?;
            (chat, delivery, None)
        }
        Surface::AiSdk => {
            let (chat, chat_id) = super::ai_sdk::parse(&body, &gateway.config)?;
            let delivery = Delivery {
                stream: true,
                include_usage: false,
            };
            (chat, delivery, Some(chat_id))
        }
    };
    chat.trace = Some(trace);
    // Limits count under the principal, or in development mode under the
    // named user (anonymous calls share one key).
    let (limit_key, tier, tenant, user) = match (&caller, &owner) {
        (Some(principal), _) => (
            principal.limit_key(),
            principal.tier.clone(),
            principal.tenant.clone(),
            principal.user.clone(),
        ),
        (None, Some(owner)) => (
            format!("{}/{}", owner.tenant_id, owner.user_id),
            gateway.auth.config().default_tier.clone(),
            owner.tenant_id.clone(),
            owner.user_id.clone(),
        ),
        (None, None) => (
            "anonymous".to_owned(),
            gateway.auth.config().default_tier.clone(),
            super::DEV_TENANT.to_owned(),
            "anonymous".to_owned(),
        ),
    };
    gateway
        .limits
        .check(crate::limits::Kind::Message, &limit_key, &tier)
        .await
        .map_err(|limited| super::limited_error(&limited))?;
    let prompt_chars: usize = chat
        .messages
        .iter()
        .map(crate::provider::Message::text_len)
        .sum();
    let max_completion = chat
        .max_completion_tokens
        .or(chat.max_tokens)
        .map(u64::from);
    let reservation = gateway
        .limits
        .reserve_tokens(
            &tenant,
            &user,
            &tier,
            crate::chat::quota_estimate(prompt_chars, max_completion),
        )
        .await
        .map_err(|limited| super::limited_error(&limited))?;

    let route = gateway
        .routes
        .route(&chat.model)
        .ok_or_else(|| ApiError::unknown_model(&chat.model))?;
    let persist = match &gateway.persister {
        Some(persister) if gateway.config.store.persist_openai => {
            Some(persist_request(persister, owner, &chat, surface.source()).await)
        }
        _ => None,
    };
    let (grace, retain) = match surface {
        Surface::OpenAi => (Duration::ZERO, Duration::ZERO),
        // A reload re-asks for the stream by chat id: keep the reply as the
        // native protocol does.
        Surface::AiSdk => (
            Duration::from_secs(gateway.config.generation.grace_secs),
            Duration::from_secs(gateway.config.generation.resume_window_secs),
        ),
    };
    let options = StartOptions {
        grace,
        retain,
        // OpenAI clients cannot be told to discard a partial answer.
        after_commit: AfterCommit::Continue,
        persist,
    };
    let model = route.name.clone();
    let mut subscriber = match gateway
        .generations
        .start(&gateway.routes, route, chat, options)
    {
        Ok(subscriber) => subscriber,
        Err(err) => {
            reservation.settle(0);
            return Err(err.into());
        }
    };
    crate::chat::meter(
        reservation,
        Arc::clone(subscriber.generation()),
        Arc::clone(&gateway.limits),
        tenant,
    );
    tracing::info!(
        generation = %subscriber.generation().id(),
        model = %model,
        stream = delivery.stream,
        "generation started"
    );
    if delivery.stream {
        // Hold the response until the upstream accepts, so an upstream that
        // refuses still gets its HTTP status to the client; but never leave
        // the client silent for longer than a heartbeat: past that, open the
        // stream and let a late refusal arrive as its error event.
        let heartbeat = gateway.config.server.heartbeat();
        if let Ok(Err(outcome)) = tokio::time::timeout(heartbeat, subscriber.accepted()).await {
            return Err(ApiError::from(&outcome));
        }
        if let Some(chat_id) = chat_id {
            gateway
                .ai_streams
                .remember(&limit_key, &chat_id, subscriber.generation().id());
            return Ok(super::ai_sdk::response(subscriber, heartbeat));
        }
        let body = sse_body(subscriber, delivery, heartbeat, request_id.to_owned());
        Ok(sse_response(Body::from_stream(body)))
    } else {
        if let Err(outcome) = subscriber.accepted().await {
            return Err(ApiError::from(&outcome));
        }
        collect(subscriber).await
    }
}

/// Records an OpenAI-compatible request as a new conversation of its user
/// (`X-Spillway-User`, else `api`; never the request body's `user` field,
/// which any caller can set to anyone) holding
/// the request's last user message; the reply joins it when it ends. The
/// records are queued, not awaited to disk: nobody waits for an ack here,
/// and the stream must not wait on persistence.
async fn persist_request(
    persister: &Persister,
    owner: Option<Owner>,
    chat: &ChatRequest,
    source: &'static str,
) -> PersistTo {
    let owner = owner.unwrap_or_else(|| Owner {
        tenant_id: super::DEV_TENANT.to_owned(),
        user_id: "api".to_owned(),
    });
    let now = crate::store::now_ms();
    let conversation_id = uuid::Uuid::now_v7().to_string();
    let conversation = ConversationRow {
        id: conversation_id.clone(),
        tenant_id: owner.tenant_id.clone(),
        user_id: owner.user_id.clone(),
        title: None,
        metadata: json!({ "source": source }),
        created_at: now,
        updated_at: now,
    };
    let last_user = chat.messages.iter().rev().find(|m| m.role == Role::User);
    let message = last_user.map(|m| MessageRow {
        id: uuid::Uuid::now_v7().to_string(),
        conversation_id: conversation_id.clone(),
        tenant_id: owner.tenant_id.clone(),
        user_id: owner.user_id.clone(),
        role: "user".into(),
        // PostgreSQL cannot store NUL in text.
        content: m.joined_text().replace('\0', "\u{FFFD}"),
        status: MessageStatus::Complete,
        model: None,
        provider: None,
        prompt_tokens: None,
        completion_tokens: None,
        cost_usd: None,
        usage_estimated: false,
        client_message_id: None,
        generation_id: None,
        created_at: now,
    });
    let mut records = vec![Record::Conversation(conversation)];
    records.extend(message.map(Record::Message));
    for record in &records {
        if let Err(err) = persister.enqueue(record).await {
            tracing::error!(%err, "could not queue the request for persistence");
        }
    }
    PersistTo {
        owner,
        conversation_id,
    }
}

/// Parses and checks a chat completion request body as the endpoint does
/// (for fuzzing and tools); every rejection is a typed 400.
pub fn check_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    parse_request(body).map(|(chat, _)| chat)
}

/// Parses and checks a chat completion request. Every rejection is a typed
/// 400 naming the field at fault.
pub(super) fn parse_request(body: &[u8]) -> Result<(ChatRequest, Delivery), ApiError> {
    let mut chat: ChatRequest = super::parse_json(body)?;
    let delivery = take_delivery(&mut chat.extra)?;
    if chat.model.trim().is_empty() {
        return Err(
            ApiError::invalid_request("invalid_value", "'model' must not be empty")
                .with_param("model"),
        );
    }
    if chat.messages.is_empty() {
        return Err(ApiError::invalid_request(
            "invalid_value",
            "'messages' must contain at least one message",
        )
        .with_param("messages"));
    }
    for (i, message) in chat.messages.iter().enumerate() {
        let has_content = match &message.content {
            Some(Content::Text(_)) => true,
            Some(Content::Parts(parts)) => !parts.is_empty(),
            None => false,
        };
        let needs_content = match message.role {
            Role::Assistant => message.tool_calls.as_ref().is_none_or(Vec::is_empty),
            _ => true,
        };
        if needs_content && !has_content {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!("messages[{i}] has no content"),
            )
            .with_param(format!("messages[{i}].content")));
        }
        if message.role == Role::Tool && message.tool_call_id.is_none() {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!("messages[{i}] is a tool result without tool_call_id"),
            )
            .with_param(format!("messages[{i}].tool_call_id")));
        }
    }
    Ok((chat, delivery))
}

/// Takes `stream`, `stream_options` and `n` out of the forwarded extras:
/// they describe how the gateway answers, not what the upstream does.
fn take_delivery(extra: &mut Map<String, Value>) -> Result<Delivery, ApiError> {
    let stream = match extra.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => {
            return Err(
                ApiError::invalid_request("invalid_type", "'stream' must be a boolean")
                    .with_param("stream"),
            );
        }
    };
    let include_usage = match extra.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => {
                return Err(ApiError::invalid_request(
                    "invalid_type",
                    "'stream_options.include_usage' must be a boolean",
                )
                .with_param("stream_options.include_usage"));
            }
        },
        Some(_) => {
            return Err(ApiError::invalid_request(
                "invalid_type",
                "'stream_options' must be an object",
            )
            .with_param("stream_options"));
        }
    };
    match extra.remove("n") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(ApiError::invalid_request(
                "unsupported_value",
                "Only n = 1 is supported: the gateway relays one choice per request",
            )
            .with_param("n"));
        }
    }
    Ok(Delivery {
        stream,
        include_usage,
    })
}

/// The SSE response around `body`, with the headers that keep proxies from
/// buffering it.
pub(super) fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The writer loop: wait for frames past the cursor, write everything
/// available as one chunk, repeat. A comment heartbeat opens the stream
/// (before the first token) and fills every idle `heartbeat`.
fn sse_body(
    mut subscriber: Subscriber,
    delivery: Delivery,
    heartbeat: Duration,
    request_id: String,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let generation = Arc::clone(subscriber.generation());
    let mut encoder = ChunkEncoder::new(
        format!("chatcmpl-{}", generation.id()),
        generation.created(),
        delivery.include_usage,
    );
    let mut heartbeat = super::Heartbeat::new(heartbeat);
    async_stream::stream! {
        let _counted = crate::metrics::get().connection("openai");
        yield Ok(Bytes::from_static(b": spillway stream open\n\n"));
        loop {
            let read = tokio::select! {
                read = subscriber.read() => read,
                () = heartbeat.due() => {
                    yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                    continue;
                }
            };
            heartbeat.wrote();
            match read {
                Read::Frames(frames) => {
                    // `model` names the upstream model answering now.
                    let chunk = encoder.encode(&frames, &generation.answering_model());
                    if !chunk.is_empty() {
                        yield Ok(chunk);
                    }
                }
                Read::End(Outcome::Complete) => {
                    yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
                    break;
                }
                Read::End(outcome) => {
                    // Never a clean end for a reply that did not finish.
                    let error = ApiError::from(&outcome).with_request_id(&request_id);
                    yield Ok(Bytes::from(error.sse_event()));
                    break;
                }
            }
        }
    }
}

/// Turns frames into `chat.completion.chunk` SSE events, serialized from
/// borrowed structs into one buffer that is reused once the previous write
/// has gone out (no `serde_json::Value` per token).
#[derive(Debug)]
struct ChunkEncoder {
    id: String,
    created: u64,
    include_usage: bool,
    /// The first delta carries `role: assistant`, as OpenAI's does.
    sent_role: bool,
    out: BytesMut,
}

/// One `chat.completion.chunk`, as OpenAI streams it.
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallOut<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// OpenAI's `usage` object.
#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<CachedOut>,
}

#[derive(Serialize)]
struct CachedOut {
    cached_tokens: u64,
}

impl From<&Usage> for UsageOut {
    fn from(usage: &Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens(),
            prompt_tokens_details: usage
                .cached_prompt_tokens
                .map(|cached_tokens| CachedOut { cached_tokens }),
        }
    }
}

impl ChunkEncoder {
    fn new(id: String, created: u64, include_usage: bool) -> Self {
        Self {
            id,
            created,
            include_usage,
            sent_role: false,
            out: BytesMut::new(),
        }
    }

    /// The SSE text of `frames` (possibly empty: a usage frame the client
    /// did not ask for writes nothing).
    fn encode(&mut self, frames: &[Frame], model: &str) -> Bytes {
        for frame in frames {
            self.push(&frame.event, model);
        }
        self.out.split().freeze()
    }

    /// Appends the event for `event`, if it has one.
    fn push(&mut self, event: &ProviderEvent, model: &str) {
        let mut delta = Delta::default();
        let mut finish_reason = None;
        let mut usage = None;
        match event {
            ProviderEvent::Text(text) => delta.content = Some(text),
            ProviderEvent::Reasoning(text) => delta.reasoning_content = Some(text),
            ProviderEvent::Refusal(text) => delta.refusal = Some(text),
            ProviderEvent::ToolCall(call) => {
                delta.tool_calls = Some([ToolCallOut {
                    index: call.index,
                    id: call.id.as_deref(),
                    kind: call.id.as_ref().map(|_| "function"),
                    function: FunctionOut {
                        name: call.name.as_deref(),
                        arguments: &call.arguments,
                    },
                }]);
            }
            ProviderEvent::Finish(reason) => finish_reason = Some(reason.as_str()),
            // This endpoint never asks for restarts (AfterCommit::Continue).
            ProviderEvent::Restart => return,
            ProviderEvent::Usage(u) => {
                if !self.include_usage {
                    return;
                }
                usage = Some(UsageOut::from(u));
            }
        }
        // A usage chunk has no choices; every other has exactly one.
        let one;
        let choices: &[Choice<'_>] = if usage.is_some() {
            &[]
        } else {
            if !self.sent_role {
                self.sent_role = true;
                delta.role = Some("assistant");
            }
            one = [Choice {
                index: 0,
                delta,
                finish_reason,
            }];
            &one
        };
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model,
            choices,
            usage,
        };
        self.out.extend_from_slice(b"data: ");
        let written = serde_json::to_writer((&mut self.out).writer(), &chunk);
        // Serializing borrowed strings and integers into memory cannot fail.
        debug_assert!(written.is_ok());
        self.out.extend_from_slice(b"\n\n");
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!(UsageOut::from(usage))
}

/// Reads the whole reply and answers with one `chat.completion`. A reply
/// that fails, even after content, is an error response: the client has
/// seen nothing yet.
async fn collect(mut subscriber: Subscriber) -> Result<Response, ApiError> {
    let generation = Arc::clone(subscriber.generation());
    let mut reply = Reply::default();
    loop {
        match subscriber.read().await {
            Read::Frames(frames) => frames.iter().for_each(|f| reply.apply(f)),
            Read::End(Outcome::Complete) => break,
            Read::End(outcome) => return Err(ApiError::from(&outcome)),
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let has_calls = !reply.tool_calls.is_empty();
    message.insert(
        "content".into(),
        if reply.text.is_empty() && has_calls {
            Value::Null
        } else {
            json!(reply.text)
        },
    );
    if !reply.refusal.is_empty() {
        message.insert("refusal".into(), json!(reply.refusal));
    }
    if !reply.reasoning.is_empty() {
        message.insert("reasoning_content".into(), json!(reply.reasoning));
    }
    if has_calls {
        let calls: Vec<Value> = reply
            .tool_calls
            .values()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments },
                })
            })
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let finish = reply.finish.as_ref().map_or("stop", |f| f.as_str());
    let mut body = json!({
        "id": format!("chatcmpl-{}", generation.id()),
        "object": "chat.completion",
        "created": generation.created(),
        "model": generation.answering_model(),
        "choices": [{ "index": 0, "message": message, "finish_reason": finish }],
    });
    if let (Some(usage), Some(map)) = (reply.usage, body.as_object_mut()) {
        map.insert("usage".into(), usage_json(&usage));
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{FinishReason, ToolCallDelta};

    fn frames(events: Vec<ProviderEvent>) -> Vec<Frame> {
        events
            .into_iter()
            .zip(0..)
            .map(|(event, offset)| Frame {
                offset,
                next: offset + 1,
                event,
            })
            .collect()
    }

    /// The `data:` payloads of `text`, parsed.
    fn payloads(text: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(text).expect("utf-8");
        assert!(
            text.ends_with("\n\n"),
            "every event is terminated: {text:?}"
        );
        text.split_terminator("\n\n")
            .map(|event| {
                let data = event.strip_prefix("data: ").expect("one data line");
                serde_json::from_str(data).expect("JSON")
            })
            .collect()
    }

    fn chunk(delta: Value, finish_reason: Value) -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        })
    }

    #[test]
    fn every_event_kind_becomes_the_chunk_openai_would_send() {
        let mut encoder = ChunkEncoder::new("chatcmpl-1".into(), 7, true);
        let events = vec![
            ProviderEvent::Reasoning("hm \"q\"".into()),
            ProviderEvent::Text("héllo\n".into()),
            ProviderEvent::Refusal("no".into()),
            ProviderEvent::ToolCall(ToolCallDelta {
                index: 1,
                id: Some("call_1".into()),
                name: Some("f".into()),
                arguments: String::new(),
            }),
            ProviderEvent::ToolCall(ToolCallDelta {
                index: 1,
                id: None,
                name: None,
                arguments: "{\"a\":".into(),
            }),
            ProviderEvent::Restart,
            ProviderEvent::Finish(FinishReason::ToolCalls),
            ProviderEvent::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_prompt_tokens: Some(2),
            }),
        ];
        let out = encoder.encode(&frames(events), "m");
        let expected = vec![
            chunk(
                json!({ "role": "assistant", "reasoning_content": "hm \"q\"" }),
                Value::Null,
            ),
            chunk(json!({ "content": "héllo\n" }), Value::Null),
            chunk(json!({ "refusal": "no" }), Value::Null),
            chunk(
                json!({ "tool_calls": [{ "index": 1, "id": "call_1", "type": "function",
                    "function": { "name": "f", "arguments": "" } }] }),
                Value::Null,
            ),
            chunk(
                json!({ "tool_calls": [{ "index": 1, "function": { "arguments": "{\"a\":" } }] }),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [],
                "usage": { "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                    "prompt_tokens_details": { "cached_tokens": 2 } },
            }),
        ];
        assert_eq!(payloads(&out), expected);
    }

    #[test]
    fn usage_is_written_only_when_asked_for_and_the_buffer_starts_fresh_per_write() {
        let mut encoder = ChunkEncoder::new("chatcmpl-1".into(), 7, false);
        let usage = ProviderEvent::Usage(Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: None,
        });
        assert!(encoder.encode(&frames(vec![usage]), "m").is_empty());
        let first = encoder.encode(&frames(vec![ProviderEvent::Text("a".into())]), "m");
        let second = encoder.encode(&frames(vec![ProviderEvent::Text("b".into())]), "m");
        assert_eq!(
            payloads(&first),
            vec![chunk(
                json!({ "role": "assistant", "content": "a" }),
                Value::Null
            )]
        );
        assert_eq!(
            payloads(&second),
            vec![chunk(json!({ "content": "b" }), Value::Null)]
        );
    }
}

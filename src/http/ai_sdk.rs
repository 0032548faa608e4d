//! Vercel AI SDK compatibility: `POST /v1/ai/chat` answers with the AI
//! SDK's **UI message stream** (`x-vercel-ai-ui-message-stream: v1`), so a
//! React app using `useChat` (its default `DefaultChatTransport`) can point
//! at the gateway unchanged; `GET /v1/ai/chat/{id}/stream` is the resume
//! request `useChat({ resume: true })` sends after a reload.
//!
//! The request runs the OpenAI endpoint's path (`super::openai::complete`
//! with [`Surface::AiSdk`](super::openai::Surface)): the same credentials,
//! limits, quota, persistence and one generation read through a cursor.
//! Only the body, the wire format and the grace differ: the reply is held
//! like a native one so the resume request finds it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::openai::Surface;
use super::{Gateway, RequestId};
use crate::config::Config;
use crate::error::ApiError;
use crate::generation::{Frame, GenerationId, Outcome, Read, Subscriber};
use crate::provider::{ChatRequest, ProviderEvent};

/// `POST /v1/ai/chat`
pub async fn chat(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    request: Request,
) -> Response {
    match super::openai::complete(gateway, &request_id, request, Surface::AiSdk).await {
        Ok(response) => response,
        Err(err) => err.with_request_id(&request_id).into_response(),
    }
}

/// `GET /v1/ai/chat/{id}/stream`: the chat's latest reply from its start,
/// while this instance holds it; 204 otherwise (the AI SDK then shows the
/// messages it has).
pub async fn resume(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    Path(chat_id): Path<String>,
    request: Request,
) -> Response {
    let key = if gateway.auth.enabled() {
        let credentials = crate::auth::Credentials::headers(request.headers());
        match super::principal(&gateway, credentials).await {
            Ok(principal) => principal.limit_key(),
            Err(err) => return err.with_request_id(&request_id).into_response(),
        }
    } else {
        // The key `complete` files the chat under in development mode.
        super::dev_owner(request.headers()).map_or_else(
            || "anonymous".to_owned(),
            |owner| format!("{}/{}", owner.tenant_id, owner.user_id),
        )
    };
    let held = gateway
        .ai_streams
        .find(&key, &chat_id)
        .and_then(|id| gateway.generations.get(id));
    match held {
        Some(generation) => response(generation.subscribe(0), gateway.config.server.heartbeat()),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// The request body (`DefaultChatTransport` sends `id`, `messages`,
/// `trigger`, `messageId`, plus whatever the app adds in `body`).
#[derive(Debug, Deserialize)]
struct ChatBody {
    id: String,
    messages: Vec<UiMessage>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UiMessage {
    role: String,
    #[serde(default)]
    parts: Vec<Value>,
}

/// Chat ids are the client's; bounded so they cannot bloat the map.
const MAX_CHAT_ID: usize = 128;

/// The body as a chat request for the model (text parts only; other parts,
/// such as files or tool results, are not sent upstream) and the chat id.
/// Every rejection is a typed 400 naming the field.
pub(super) fn parse(body: &[u8], config: &Config) -> Result<(ChatRequest, String), ApiError> {
    let parsed: ChatBody = super::parse_json(body)?;
    if parsed.id.is_empty() || parsed.id.len() > MAX_CHAT_ID {
        return Err(ApiError::invalid_request(
            "invalid_value",
            format!("'id' must be 1 to {MAX_CHAT_ID} bytes"),
        )
        .with_param("id"));
    }
    let mut messages = Vec::with_capacity(parsed.messages.len());
    for (i, message) in parsed.messages.iter().enumerate() {
        if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!("messages[{i}].role must be system, user or assistant"),
            )
            .with_param(format!("messages[{i}].role")));
        }
        let text: String = message
            .parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        if !text.is_empty() {
            messages.push(json!({ "role": message.role, "content": text }));
        }
    }
    let model = parsed
        .model
        .filter(|m| !m.is_empty())
        .or_else(|| {
            (!config.chat.default_model.is_empty()).then(|| config.chat.default_model.clone())
        })
        .or_else(|| config.models.first().map(|m| m.name.clone()))
        .unwrap_or_default();
    // The OpenAI endpoint's own parser checks the rest (empty, no model…).
    let openai = json!({ "model": model, "messages": messages });
    let (chat, _) = super::openai::parse_request(openai.to_string().as_bytes())?;
    Ok((chat, parsed.id))
}

/// The UI message stream of a reply read from `subscriber`'s cursor.
pub(super) fn response(mut subscriber: Subscriber, heartbeat: std::time::Duration) -> Response {
    let message_id = format!("msg-{}", subscriber.generation().id());
    let stream = async_stream::stream! {
        let _counted = crate::metrics::get().connection("ai-sdk");
        yield Ok::<_, std::convert::Infallible>(Bytes::from_static(b": spillway stream open\n\n"));
        yield Ok(part(&json!({ "type": "start", "messageId": message_id })));
        let mut encoder = PartEncoder::default();
        let mut heartbeat = super::Heartbeat::new(heartbeat);
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
                    let out = encoder.frames(&frames);
                    if !out.is_empty() {
                        yield Ok(Bytes::from(out));
                    }
                }
                Read::End(outcome) => {
                    yield Ok(Bytes::from(encoder.end(&outcome)));
                    yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
                    break;
                }
            }
        }
    };
    let mut response = super::openai::sse_response(Body::from_stream(stream));
    response.headers_mut().insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    response
}

fn part(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Turns log frames into UI message stream parts: one text part and one
/// reasoning part at most, each opened by its first delta.
#[derive(Debug, Default)]
struct PartEncoder {
    text_open: bool,
    reasoning_open: bool,
    finish: Option<String>,
}

impl PartEncoder {
    fn frames(&mut self, frames: &[Frame]) -> String {
        let mut out = String::new();
        for frame in frames {
            match &frame.event {
                ProviderEvent::Text(text) | ProviderEvent::Refusal(text) => {
                    self.close_reasoning(&mut out);
                    if !self.text_open {
                        self.text_open = true;
                        push(&mut out, &json!({ "type": "text-start", "id": "text-1" }));
                    }
                    push(
                        &mut out,
                        &json!({ "type": "text-delta", "id": "text-1", "delta": text }),
                    );
                }
                ProviderEvent::Reasoning(text) => {
                    if !self.reasoning_open {
                        self.reasoning_open = true;
                        push(
                            &mut out,
                            &json!({ "type": "reasoning-start", "id": "reasoning-1" }),
                        );
                    }
                    push(
                        &mut out,
                        &json!({ "type": "reasoning-delta", "id": "reasoning-1", "delta": text }),
                    );
                }
                ProviderEvent::Finish(reason) => self.finish = Some(reason.as_str().to_owned()),
                // No tools are offered, restarts are not asked for
                // (AfterCommit::Continue) and usage is server-side.
                ProviderEvent::ToolCall(_) | ProviderEvent::Restart | ProviderEvent::Usage(_) => {}
            }
        }
        out
    }

    fn close_reasoning(&mut self, out: &mut String) {
        if self.reasoning_open {
            self.reasoning_open = false;
            push(
                out,
                &json!({ "type": "reasoning-end", "id": "reasoning-1" }),
            );
        }
    }

    /// The closing parts: `finish`, or an `error` (never a clean finish
    /// for a reply that did not complete).
    fn end(&mut self, outcome: &Outcome) -> String {
        let mut out = String::new();
        self.close_reasoning(&mut out);
        if self.text_open {
            self.text_open = false;
            push(&mut out, &json!({ "type": "text-end", "id": "text-1" }));
        }
        if matches!(outcome, Outcome::Complete) {
            let reason = match self.finish.as_deref() {
                Some("stop") | None => "stop",
                Some("length") => "length",
                Some("content_filter") => "content-filter",
                Some("tool_calls") => "tool-calls",
                Some(_) => "other",
            };
            push(
                &mut out,
                &json!({ "type": "finish", "finishReason": reason }),
            );
        } else {
            let err = ApiError::from(outcome);
            push(
                &mut out,
                &json!({ "type": "error", "errorText": format!("{}: {}", err.code, err.message) }),
            );
        }
        out
    }
}

fn push(out: &mut String, value: &Value) {
    out.push_str("data: ");
    out.push_str(&value.to_string());
    out.push_str("\n\n");
}

/// AI SDK chat ids (per caller) → their latest reply, bounded: past the
/// bound the oldest entry goes. An entry whose reply is no longer held
/// simply finds nothing.
#[derive(Debug)]
pub struct Streams {
    capacity: usize,
    entries: Mutex<Entries>,
}

/// (caller, chat id) pairs, with their insertion order for eviction.
type ChatKey = (String, String);

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<ChatKey, GenerationId>,
    order: VecDeque<ChatKey>,
}

impl Streams {
    /// A map of at most `capacity` chats (`generation.max_live`: no more
    /// replies can be held anyway).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(Entries::default()),
        }
    }

    pub(super) fn remember(&self, caller: &str, chat_id: &str, generation: GenerationId) {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let Entries { map, order } = &mut *guard;
        let key = (caller.to_owned(), chat_id.to_owned());
        if map.insert(key.clone(), generation).is_none() {
            order.push_back(key);
        }
        while map.len() > self.capacity {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            map.remove(&oldest);
        }
    }

    fn find(&self, caller: &str, chat_id: &str) -> Option<GenerationId> {
        let guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        guard
            .map
            .get(&(caller.to_owned(), chat_id.to_owned()))
            .copied()
    }
}

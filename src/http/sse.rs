//! The native protocol over Server-Sent Events, for clients that cannot
//! hold a WebSocket (and for `EventSource`):
//!
//! - `POST /v1/conversations/{id}/messages` sends a message and answers
//!   with the reply as SSE;
//! - `GET /v1/generations/{id}/events` resumes a reply from `Last-Event-ID`
//!   (or `?from=&epoch=`), EventSource-compatible; 204 when there is
//!   nothing to resume;
//! - `POST /v1/generations/{id}/cancel` stops a reply.
//!
//! Events are named after the WebSocket frames (`ack`, `delta`, `done`,
//! `error`, …) with the same JSON; generation events carry
//! `id: <generation>:<epoch>:<next>`, so a reconnecting `EventSource`
//! resumes exactly where it stopped. The body is pulled by the socket: a
//! slow client holds back only its own cursor.
//!
//! `EventSource` cannot set headers: in development mode the user may be
//! named with `?user=` (the authentication work replaces it with a token or
//! cookie on the same seam).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use super::{Gateway, RequestId};
use crate::chat::{Lookup, ResumeError};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::protocol::ServerFrame;
use crate::store::Owner;

/// `?user=&from=&epoch=`
#[derive(Debug, Deserialize)]
pub struct SseQuery {
    #[serde(default)]
    user: Option<String>,
    /// A bearer token, for `EventSource` (it cannot set headers).
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    epoch: Option<u64>,
}

/// `POST /v1/conversations/{id}/messages` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    content: String,
    client_message_id: String,
    #[serde(default)]
    model: Option<String>,
}

/// The query, or a typed 400 (axum's own rejection is plain text).
fn query(query: Result<Query<SseQuery>, QueryRejection>) -> Result<SseQuery, ApiError> {
    query.map(|Query(query)| query).map_err(|err| {
        ApiError::invalid_request(
            "invalid_value",
            format!("Invalid query string: {}", err.body_text()),
        )
    })
}

async fn caller(
    gateway: &Gateway,
    headers: &HeaderMap,
    query: &SseQuery,
) -> Result<crate::auth::Principal, ApiError> {
    let credentials = crate::auth::Credentials {
        headers,
        query_token: query.access_token.as_deref(),
        query_user: query.user.as_deref(),
    };
    super::principal(gateway, credentials).await
}

async fn owner(
    gateway: &Gateway,
    headers: &HeaderMap,
    query: &SseQuery,
) -> Result<Owner, ApiError> {
    caller(gateway, headers, query).await.map(|p| p.owner())
}

fn sse_response(body: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One SSE event: `id:` (for generation events), `event:`, `data:`.
fn event(frame: &ServerFrame, id: Option<String>) -> String {
    let mut out = String::new();
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(frame.event_name());
    out.push_str("\ndata: ");
    out.push_str(&frame.to_json());
    out.push_str("\n\n");
    out
}

/// The resume point a generation frame leaves the client at.
fn event_id(frame: &ServerFrame) -> Option<String> {
    match frame {
        ServerFrame::Delta {
            generation_id,
            epoch,
            next,
            ..
        }
        | ServerFrame::Reasoning {
            generation_id,
            epoch,
            next,
            ..
        }
        | ServerFrame::ToolCall {
            generation_id,
            epoch,
            next,
            ..
        }
        | ServerFrame::Usage {
            generation_id,
            epoch,
            next,
            ..
        }
        | ServerFrame::Done {
            generation_id,
            epoch,
            next,
            ..
        }
        | ServerFrame::Restart {
            generation_id,
            epoch,
            next,
            ..
        } => Some(format!("{generation_id}:{epoch}:{next}")),
        _ => None,
    }
}

/// The event that ends a stream when its instance drains and another can
/// take over: reconnect (soon: `retry: 250`) and resume with
/// `Last-Event-ID`.
fn reconnect_event(generation_id: &str) -> String {
    let data = serde_json::json!({
        "type": "reconnect",
        "reason": "draining",
        "generation_id": generation_id,
    });
    format!("retry: 250\nevent: reconnect\ndata: {data}\n\n")
}

/// Streams `generation` from `offset` as SSE, after `first` events. When
/// the instance drains and others can resume the reply, the stream ends
/// with a `reconnect` event; alone, it runs to the reply's end.
fn stream_reply(
    gateway: &Arc<Gateway>,
    generation: Arc<Generation>,
    offset: u64,
    first: Vec<String>,
    permit: crate::limits::ConnectionPermit,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let mut heartbeat = super::Heartbeat::new(gateway.config.server.heartbeat());
    let gateway = Arc::clone(gateway);
    let generation_id = generation.id().to_string();
    let mut reads = crate::chat::reads(generation.subscribe(offset));
    let mut finish = String::new();
    async_stream::stream! {
        // The connection's slot under the caps, freed when the stream ends.
        let _permit = permit;
        let _counted = crate::metrics::get().connection("sse");
        let hand_off = async {
            if gateway.drain.hands_off() {
                gateway.drain.started().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(hand_off);
        yield Ok(Bytes::from_static(b": spillway stream open\n\n"));
        for text in first {
            yield Ok(Bytes::from(text));
        }
        loop {
            let next = tokio::select! {
                biased;
                () = &mut hand_off => {
                    crate::metrics::get().close("sse", "drain");
                    yield Ok(Bytes::from(reconnect_event(&generation_id)));
                    break;
                }
                next = reads.next() => next,
                () = heartbeat.due() => {
                    yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                    continue;
                }
            };
            heartbeat.wrote();
            let Some((generation, read)) = next else { break };
            let mut out = String::new();
            let frames = crate::chat::encode(&generation, read, &mut finish);
            let terminal = frames.iter().any(|f| matches!(f, ServerFrame::Done { .. } | ServerFrame::Error { .. }));
            for frame in &frames {
                out.push_str(&event(frame, event_id(frame)));
            }
            if !out.is_empty() {
                yield Ok(Bytes::from(out));
            }
            if terminal {
                break;
            }
        }
    }
}

/// `POST /v1/conversations/{id}/messages`: send, and stream the reply.
pub async fn send(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    Path(conversation_id): Path<String>,
    query: Result<Query<SseQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let result = async {
        let query = self::query(query)?;
        let principal = caller(&gateway, request.headers(), &query).await?;
        let owner = principal.owner();
        let permit = super::ws::admit(&gateway, &principal)
            .await
            .map_err(|limited| super::limited_error(&limited))?;
        let limit = gateway.config.server.max_body_bytes;
        let trace = crate::telemetry::Trace::from_headers(&request_id, request.headers());
        let body = super::read_body(request.into_body(), limit).await?;
        let body: SendBody = super::parse_json(&body)?;
        let sent = gateway.chat.send(
            None,
            &principal,
            &conversation_id,
            body.content,
            body.client_message_id,
            body.model,
        );
        let ack = crate::telemetry::scoped(trace, sent).await.map_err(|err| {
            if let crate::chat::ChatError::Limited(limited) = &err {
                return super::limited_error(limited);
            }
            let mut api = ApiError::invalid_request(err.code(), err.to_string());
            api.status = match err {
                crate::chat::ChatError::NotFound => StatusCode::NOT_FOUND,
                crate::chat::ChatError::UnknownModel(_) => StatusCode::NOT_FOUND,
                crate::chat::ChatError::TooManyGenerations(_) => StatusCode::TOO_MANY_REQUESTS,
                crate::chat::ChatError::Invalid(_) => StatusCode::BAD_REQUEST,
                crate::chat::ChatError::InProgress => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            api.retryable = err.retryable();
            if api.status == StatusCode::TOO_MANY_REQUESTS {
                api.kind = "rate_limit_error";
                api.retry_after = Some(Duration::from_secs(1));
            } else if api.status == StatusCode::SERVICE_UNAVAILABLE {
                api.kind = "server_error";
                api.retry_after = Some(Duration::from_secs(1));
            }
            api
        })?;
        let ServerFrame::Ack { generation_id, .. } = &ack else {
            return Err(ApiError::invalid_request("internal_error", "no ack"));
        };
        let generation = gateway
            .chat
            .generation_of(&owner, generation_id)
            .ok_or_else(|| {
                ApiError::invalid_request("generation_not_found", "the reply is gone")
            })?;
        Ok(sse_response(stream_reply(
            &gateway,
            generation,
            0,
            vec![event(&ack, None)],
            permit,
        )))
    }
    .await;
    result.unwrap_or_else(|err| err.with_request_id(&request_id).into_response())
}

/// `GET /v1/generations/{id}/events`: resume from `Last-Event-ID`
/// (`<generation>:<epoch>:<offset>`) or `?from=` (and `?epoch=`).
pub async fn events(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    Path(generation_id): Path<String>,
    query: Result<Query<SseQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let query = self::query(query)?;
        let principal = caller(&gateway, &headers, &query).await?;
        let owner = principal.owner();
        // A header that is not visible ASCII is malformed (400), not
        // absent: ignoring it would silently replay from offset 0.
        let last = headers
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let (epoch, offset) = match last {
            Some(last) => {
                let mut parts = last.rsplitn(3, ':');
                let offset = parts.next().and_then(|p| p.parse::<u64>().ok());
                let epoch = parts.next().and_then(|p| p.parse::<u64>().ok());
                let id = parts.next();
                match (id, epoch, offset) {
                    (Some(id), Some(epoch), Some(offset)) if id == generation_id => {
                        (Some(epoch), offset)
                    }
                    _ => {
                        return Err(ApiError::invalid_request(
                            "invalid_value",
                            "Last-Event-ID is not an event id of this generation",
                        )
                        .with_param("Last-Event-ID"));
                    }
                }
            }
            None => (query.epoch, query.from.unwrap_or(0)),
        };
        let generation = match gateway.chat.lookup_generation(&owner, &generation_id).await {
            Lookup::Found(generation) => generation,
            // Nothing to resume: 204 makes EventSource stop reconnecting.
            Lookup::Missing => return Ok(StatusCode::NO_CONTENT.into_response()),
            Lookup::Unavailable => return Err(cluster_unavailable()),
        };
        let epoch = epoch.unwrap_or_else(|| generation.epoch());
        let generation = match gateway
            .chat
            .resume_target(&owner, &generation_id, epoch, offset)
            .await
        {
            Ok(generation) => generation,
            Err(ResumeError::Unavailable) => return Err(cluster_unavailable()),
            Err(err) => {
                let frame = err.frame(&generation_id);
                let body = futures_util::stream::iter([Ok(Bytes::from(event(&frame, None)))]);
                return Ok(sse_response(body));
            }
        };
        if generation.outcome().is_some() && offset >= generation.len() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let permit = super::ws::admit(&gateway, &principal)
            .await
            .map_err(|limited| super::limited_error(&limited))?;
        Ok(sse_response(stream_reply(
            &gateway,
            generation,
            offset,
            Vec::new(),
            permit,
        )))
    }
    .await;
    result.unwrap_or_else(|err: ApiError| err.with_request_id(&request_id).into_response())
}

/// 503: the reply may be on another instance, which cannot be reached now.
fn cluster_unavailable() -> ApiError {
    let mut err = ApiError::invalid_request(
        "unavailable",
        "Replies of other instances cannot be reached now; retry shortly",
    );
    err.status = StatusCode::SERVICE_UNAVAILABLE;
    err.kind = "server_error";
    err.retryable = true;
    err.retry_after = Some(Duration::from_secs(1));
    err
}

/// `POST /v1/generations/{id}/cancel`
pub async fn cancel(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    Path(generation_id): Path<String>,
    query: Result<Query<SseQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let query = self::query(query)?;
        let owner = owner(&gateway, &headers, &query).await?;
        if !gateway.chat.cancel(&owner, &generation_id).await {
            let mut err = ApiError::invalid_request("generation_not_found", "No such generation");
            err.status = StatusCode::NOT_FOUND;
            return Err(err);
        }
        Ok(StatusCode::ACCEPTED.into_response())
    }
    .await;
    result.unwrap_or_else(|err: ApiError| err.with_request_id(&request_id).into_response())
}

//! The history API: conversations, their messages, and a user's data
//! (export and erasure, the pair privacy law requires).
//!
//! Every route is scoped to the requesting user. Until authentication
//! lands, the user comes from the `X-Spillway-User` header (development
//! mode; see `docs/conversations.md`). Another user's conversation is "not
//! found", never "forbidden". Reads and these writes go to the database
//! directly (they are not on a stream's path); when it is down they answer
//! 503 `store_unavailable`, retryable.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Gateway, RequestId};
use crate::error::ApiError;
use crate::store::{
    ConversationRow, MessageRow, Order, Owner, Page, PageRequest, Store, StoreError, now_ms,
};

/// Largest page.
const MAX_LIMIT: u32 = 200;
/// Page size when the client names none.
const DEFAULT_LIMIT: u32 = 50;
/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 200;
/// Largest metadata object, serialized.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The requesting user, proven by the request's credentials
/// (`crate::auth`; development mode: `X-Spillway-User`).
#[derive(Debug, Clone)]
pub struct User(pub Owner);

impl FromRequestParts<Arc<Gateway>> for User {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let credentials = crate::auth::Credentials::headers(&parts.headers);
        match super::principal(gateway, credentials).await {
            Ok(principal) => Ok(Self(principal.owner())),
            Err(err) => {
                let id = RequestId::from_request_parts(parts, gateway)
                    .await
                    .map_or_else(|e| match e {}, |r| r.0);
                Err(err.with_request_id(&id).into_response())
            }
        }
    }
}

/// `?limit=&after=&order=`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    after: Option<String>,
    order: Option<Order>,
}

impl PageQuery {
    fn page(self, default_order: Order) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!("'limit' must be between 1 and {MAX_LIMIT}"),
            )
            .with_param("limit"));
        }
        if let Some(after) = &self.after
            && uuid::Uuid::parse_str(after).is_err()
        {
            return Err(ApiError::invalid_request(
                "invalid_value",
                "'after' is not a cursor from this API",
            )
            .with_param("after"));
        }
        Ok(PageRequest {
            after: self.after,
            limit,
            order: self.order.unwrap_or(default_order),
        })
    }
}

/// `POST /v1/conversations` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

/// `PATCH /v1/conversations/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    title: String,
}

fn unavailable(err: &StoreError) -> ApiError {
    tracing::warn!(%err, "store unavailable");
    let mut api = ApiError::invalid_request(
        "store_unavailable",
        "The database is unavailable; retry shortly",
    );
    api.status = StatusCode::SERVICE_UNAVAILABLE;
    api.kind = "server_error";
    api.retryable = true;
    api.retry_after = Some(std::time::Duration::from_secs(1));
    api
}

/// The database, or 503 when persistence is switched off.
fn store(gateway: &Gateway) -> Result<&Arc<dyn Store>, ApiError> {
    gateway.store.as_ref().ok_or_else(|| {
        let mut err = ApiError::invalid_request(
            "persistence_disabled",
            "This gateway runs without a database ([store] enabled = false)",
        );
        err.status = StatusCode::SERVICE_UNAVAILABLE;
        err.kind = "server_error";
        err.retryable = false;
        err
    })
}

fn not_found() -> ApiError {
    let mut err = ApiError::invalid_request("conversation_not_found", "No such conversation");
    err.status = StatusCode::NOT_FOUND;
    err
}

fn check_title(title: &str) -> Result<(), ApiError> {
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::invalid_request(
            "invalid_value",
            format!("'title' must be at most {MAX_TITLE_CHARS} characters"),
        )
        .with_param("title"));
    }
    Ok(())
}

/// The wire form of a conversation.
pub fn conversation_json(row: &ConversationRow) -> Value {
    json!({
        "id": row.id,
        "object": "conversation",
        "title": row.title,
        "metadata": row.metadata,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    })
}

/// The wire form of a message.
pub fn message_json(row: &MessageRow) -> Value {
    let usage = match (row.prompt_tokens, row.completion_tokens) {
        (Some(prompt), Some(completion)) => json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "estimated": row.usage_estimated,
        }),
        _ => Value::Null,
    };
    json!({
        "id": row.id,
        "object": "message",
        "conversation_id": row.conversation_id,
        "role": row.role,
        "content": row.content,
        "status": row.status,
        "model": row.model,
        "provider": row.provider,
        "usage": usage,
        "cost_usd": row.cost_usd,
        "client_message_id": row.client_message_id,
        "generation_id": row.generation_id,
        "created_at": row.created_at,
    })
}

fn list_json<T>(page: &Page<T>, item: fn(&T) -> Value) -> Value {
    json!({
        "object": "list",
        "data": page.items.iter().map(item).collect::<Vec<_>>(),
        "next_cursor": page.next,
        "has_more": page.next.is_some(),
    })
}

/// Runs a handler body, attaching the request id to its error.
fn respond(request_id: &str, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|err| err.with_request_id(request_id).into_response())
}

/// `POST /v1/conversations`
pub async fn create(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    request: Request,
) -> Response {
    let result = async {
        let limit = gateway.config.server.max_body_bytes;
        let body = super::read_body(request.into_body(), limit).await?;
        let body: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
            CreateBody::default()
        } else {
            super::parse_json(&body)?
        };
        if let Some(title) = &body.title {
            check_title(title)?;
        }
        let metadata = body.metadata.unwrap_or_else(|| json!({}));
        if !metadata.is_object() || metadata.to_string().len() > MAX_METADATA_BYTES {
            return Err(ApiError::invalid_request(
                "invalid_value",
                format!("'metadata' must be a JSON object of at most {MAX_METADATA_BYTES} bytes"),
            )
            .with_param("metadata"));
        }
        let now = now_ms();
        let row = ConversationRow {
            id: uuid::Uuid::now_v7().to_string(),
            tenant_id: owner.tenant_id,
            user_id: owner.user_id,
            title: body.title,
            metadata,
            created_at: now,
            updated_at: now,
        };
        store(&gateway)?
            .create_conversation(&row)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok((StatusCode::CREATED, Json(conversation_json(&row))).into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `GET /v1/conversations`
pub async fn list(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(query) =
            query.map_err(|e| ApiError::invalid_request("invalid_query", e.body_text()))?;
        let page = query.page(Order::Desc)?;
        let page = store(&gateway)?
            .list_conversations(&owner, &page)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Json(list_json(&page, conversation_json)).into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `GET /v1/conversations/{id}`
pub async fn get(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let row = store(&gateway)?
            .get_conversation(&owner, &id)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(not_found)?;
        Ok(Json(conversation_json(&row)).into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `PATCH /v1/conversations/{id}`: rename.
pub async fn rename(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let limit = gateway.config.server.max_body_bytes;
        let body = super::read_body(request.into_body(), limit).await?;
        let body: RenameBody = super::parse_json(&body)?;
        check_title(&body.title)?;
        let renamed = store(&gateway)?
            .rename_conversation(&owner, &id, &body.title, now_ms())
            .await
            .map_err(|e| unavailable(&e))?;
        if !renamed {
            return Err(not_found());
        }
        let row = store(&gateway)?
            .get_conversation(&owner, &id)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(not_found)?;
        Ok(Json(conversation_json(&row)).into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `DELETE /v1/conversations/{id}`
pub async fn delete(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let deleted = store(&gateway)?.delete_conversation(&owner, &id)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(not_found)?;
        // Nothing live may outlive the deletion (cached history, replies).
        gateway.chat.forget_conversation(&id);
        Ok(Json(json!({ "id": id, "object": "conversation", "deleted": true, "messages_deleted": deleted.messages }))
            .into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `GET /v1/conversations/{id}/messages`
pub async fn messages(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(query) =
            query.map_err(|e| ApiError::invalid_request("invalid_query", e.body_text()))?;
        let page = query.page(Order::Asc)?;
        let page = store(&gateway)?
            .list_messages(&owner, &id, &page)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(not_found)?;
        Ok(Json(list_json(&page, message_json)).into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `GET /v1/me/export`: everything stored about the user, as JSON.
pub async fn export(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
) -> Response {
    let result = async {
        let export = store(&gateway)?
            .export_user(&owner)
            .await
            .map_err(|e| unavailable(&e))?;
        let body = json!({
            "object": "export",
            "user": { "tenant_id": export.owner.tenant_id, "user_id": export.owner.user_id },
            "exported_at": now_ms(),
            "conversations": export.conversations.iter().map(conversation_json).collect::<Vec<_>>(),
            "messages": export.messages.iter().map(message_json).collect::<Vec<_>>(),
            "usage": export.usage,
        });
        let mut response = Json(body).into_response();
        response.headers_mut().insert(
            http::header::CONTENT_DISPOSITION,
            http::HeaderValue::from_static("attachment; filename=\"spillway-export.json\""),
        );
        Ok(response)
    }
    .await;
    respond(&request_id, result)
}

/// `DELETE /v1/me`: erases everything stored about the user.
pub async fn erase(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    User(owner): User,
) -> Response {
    let result = async {
        let deleted = store(&gateway)?
            .delete_user(&owner)
            .await
            .map_err(|e| unavailable(&e))?;
        gateway.chat.forget_user(&owner);
        Ok(Json(json!({
            "object": "erasure",
            "deleted": true,
            "conversations": deleted.conversations,
            "messages": deleted.messages,
            "usage_days": deleted.usage_days,
        }))
        .into_response())
    }
    .await;
    respond(&request_id, result)
}

/// `GET /v1/me/generations`: the user's replies running now, on every
/// instance, oldest first, with what a client needs to resume each
/// (`generation_id`, `epoch`; resume from the offset it holds, or 0).
pub async fn active(State(gateway): State<Arc<Gateway>>, User(owner): User) -> Response {
    let active = gateway.chat.active(&owner).await;
    let data: Vec<serde_json::Value> = active
        .iter()
        .map(|a| {
            json!({
                "generation_id": a.generation_id,
                "conversation_id": a.conversation_id,
                "epoch": a.epoch,
                "node": a.instance.split_once('@').map_or(a.instance.as_str(), |(node, _)| node),
                "created": a.created,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

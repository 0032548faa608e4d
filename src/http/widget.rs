//! `POST /v1/widget/session`: a page's public widget key, from an origin
//! the widget allows, is exchanged for a signed, expiring visitor token
//! (`crate::auth`). Sent again with the current token, it renews it for the
//! same visitor.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Gateway, RequestId};
use crate::auth::Credentials;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    /// The widget's public key (`pk_…`).
    key: String,
}

/// `POST /v1/widget/session`
pub async fn session(
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let result = async {
        let body = super::read_body(body, 4 * 1024).await?;
        let body: SessionBody = super::parse_json(&body)?;
        let credentials = Credentials::headers(&parts.headers);
        let (token, visitor) = gateway
            .auth
            .issue_visitor(&body.key, &credentials)
            .map_err(crate::auth::AuthError::api)?;
        Ok::<_, crate::error::ApiError>(
            Json(json!({
                "object": "visitor_session",
                "token": token,
                "visitor_id": visitor.user,
                "expires_at": visitor.expires_at,
            }))
            .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|err| err.with_request_id(&request_id).into_response())
}

//! `ApiError`: the one error type at the HTTP edge.
//!
//! Handlers return it; it maps to an HTTP status and an OpenAI-shaped JSON
//! body (`{"error":{"message","type","code","param","request_id"}}`), or,
//! once a stream has started, to the terminal SSE error event. Modules keep
//! their own small error types and convert at the edge.

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::generation::{CancelReason, Outcome, RegistryError};
use crate::provider::{ErrorClass, ProviderError};

/// An error as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (before a stream starts).
    pub status: StatusCode,
    /// OpenAI's error `type`: `invalid_request_error`, `rate_limit_error`,
    /// `server_error`, …
    pub kind: &'static str,
    /// A stable machine-readable code (see `docs/errors.md`).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Whether the same request may succeed later.
    pub retryable: bool,
    /// How long to wait before retrying, when known.
    pub retry_after: Option<Duration>,
    /// The request's id (also in the `x-request-id` header).
    pub request_id: Option<String>,
    /// Extra response headers (`X-RateLimit-*`).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            param: None,
            retryable: status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
            retry_after: None,
            request_id: None,
            headers: Vec::new(),
        }
    }

    /// 400 for a request the gateway cannot accept.
    pub fn invalid_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 404 for a model nobody configured.
    pub fn unknown_model(model: &str) -> Self {
        let mut err = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model '{model}' does not exist on this gateway"),
        );
        err.param = Some("model".into());
        err
    }

    /// 404 for a path with no route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("No route for {path}"),
        )
    }

    /// 413 for a body over `server.max_body_bytes`.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body exceeds the limit of {limit} bytes"),
        )
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Attaches the request id.
    pub fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }

    /// The terminal SSE event of a stream that fails after it started:
    /// OpenAI's unnamed `data: {"error": …}` frame.
    pub fn sse_event(&self) -> String {
        format!("data: {}\n\n", self.body())
    }

    fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
                "param": self.param,
                "retryable": self.retryable,
                "request_id": self.request_id,
            }
        })
    }
}

impl From<&ProviderError> for ApiError {
    fn from(err: &ProviderError) -> Self {
        use ErrorClass as C;
        let (status, kind) = match err.class {
            C::Connect | C::Unavailable | C::Protocol | C::ReplyTooLarge => {
                (StatusCode::BAD_GATEWAY, "upstream_error")
            }
            C::Interrupted => (StatusCode::BAD_GATEWAY, "server_error"),
            C::Gap => (StatusCode::CONFLICT, "invalid_request_error"),
            // The provider rejected the gateway's own key: an operator
            // problem, reported without details of the credentials.
            C::Auth => (StatusCode::BAD_GATEWAY, "upstream_error"),
            C::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_error"),
            C::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            C::InvalidRequest | C::ContextLength | C::ContentPolicy => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
        };
        let message = match err.class {
            C::Auth => "The provider rejected the gateway's credentials".to_owned(),
            _ => err.message.clone(),
        };
        let mut api = Self::new(status, kind, err.class.code(), message);
        api.retryable = err.class.is_retryable();
        api.retry_after = err.retry_after;
        api
    }
}

impl From<&Outcome> for ApiError {
    /// The error a client sees for a generation that did not complete.
    fn from(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Failed(err) => Self::from(err),
            Outcome::Cancelled(CancelReason::Shutdown) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "server_shutting_down",
                "The gateway is shutting down; retry on another instance".into(),
            ),
            Outcome::Cancelled(_) => {
                let mut err = Self::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    "generation_cancelled",
                    "The reply was cancelled".into(),
                );
                err.retryable = false;
                err
            }
            // Not an error; callers only convert failed outcomes. Reported
            // as an internal error should it ever happen.
            Outcome::Complete => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "The reply completed unexpectedly".into(),
            ),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        let code = match err {
            RegistryError::Full { .. } => "capacity_exceeded",
            RegistryError::ShuttingDown => "server_shutting_down",
        };
        let mut api = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            code,
            err.to_string(),
        );
        api.retry_after = Some(Duration::from_secs(1));
        api
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        for (name, value) in &self.headers {
            response.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, value);
            }
        }
        response
    }
}

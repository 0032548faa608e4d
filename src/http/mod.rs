//! The HTTP edge: the axum router, its middleware, and serving.
//!
//! One file per surface: [`openai`] (the OpenAI-compatible API),
//! [`ai_sdk`] (the Vercel AI SDK's UI message stream),
//! [`conversations`] (the history API), [`ws`] and [`sse`] (the native
//! protocol), [`widget`], [`admin`] (the operators' API), [`ops`]
//! (`/healthz`, `/readyz`, `/metrics`) and [`assets`] (the demo page, the
//! widget, the SDK and the embed page);
//! [`server`] accepts connections and [`drain`] is the graceful shutdown. Every handler returns [`ApiError`] on
//! failure; every response carries an `x-request-id` (the client's, when it
//! sent one, else a fresh UUIDv7).

pub mod admin;
pub mod ai_sdk;
pub mod assets;
pub mod conversations;
pub mod drain;
pub mod openai;
pub mod ops;
pub mod server;
pub mod sse;
pub mod widget;
pub mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, OriginalUri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::request::Parts;
use http::{HeaderName, Request};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId as TowerRequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::config::{Config, ProviderKind};
use crate::error::ApiError;
use crate::generation::Registry;
use crate::provider::{ApiKey, BuildError};
use crate::routing;
use crate::store::persister::{PersistError, Persister, Running};
use crate::store::{Owner, Store, StoreError};

/// The header carrying the request id, in and out.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a handler needs, shared by all requests.
#[derive(Debug)]
pub struct Gateway {
    /// The validated configuration.
    pub config: Config,
    /// Model name → provider targets, retries, breakers.
    pub routes: Arc<routing::Router>,
    /// Live generations on this instance.
    pub generations: Arc<Registry>,
    /// The database (history API reads and synchronous writes); `None`
    /// when persistence is switched off.
    pub store: Option<Arc<dyn Store>>,
    /// The write-behind path for messages; `None` when switched off.
    pub persister: Option<Persister>,
    /// The persister's tasks, taken at shutdown to flush.
    running: Mutex<Option<Running>>,
    /// Conversations live: rooms, presence, sends.
    pub chat: Arc<crate::chat::Chat>,
    /// Other instances (Redis), or none (the in-process bus).
    pub bus: Arc<dyn crate::cluster::Bus>,
    /// Live WebSocket connections.
    pub connections: ws::Connections,
    /// Who may call.
    pub auth: Arc<crate::auth::Auth>,
    /// Rate limits, caps and quotas.
    pub limits: Arc<crate::limits::Limits>,
    /// The graceful drain (SIGTERM).
    pub drain: drain::Drain,
    /// AI SDK chat ids → their latest reply, for the resume request.
    pub ai_streams: ai_sdk::Streams,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A provider could not be built.
    #[error(transparent)]
    Provider(#[from] BuildError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The persister's journal could not be opened.
    #[error(transparent)]
    Persister(#[from] PersistError),
    /// The credentials configuration cannot be used.
    #[error(transparent)]
    Auth(#[from] crate::auth::SetupError),
}

impl Gateway {
    /// Builds providers and routes, opens (and migrates, unless told not
    /// to) the database, starts the persister (which replays its journal),
    /// from a validated config.
    pub async fn open(config: Config) -> Result<Arc<Self>, StartError> {
        // Fix this process's log epoch now, at start.
        crate::generation::epoch();
        let routes = Arc::new(routing::Router::from_config(&config)?);
        let pricing = crate::usage::Pricing::from_config(&config.pricing);
        let mut registry = Registry::new(config.generation.clone(), pricing);
        let (store, persister, running) = if config.store.enabled {
            let store = crate::store::open(&config.store).await?;
            if config.store.migrate_on_start {
                store.migrate().await?;
            }
            let (persister, running) = Persister::start(Arc::clone(&store), &config.store).await?;
            registry = registry.with_persister(persister.clone());
            (Some(store), Some(persister), Some(running))
        } else {
            tracing::warn!("persistence is switched off ([store] enabled = false)");
            (None, None, None)
        };
        let generations = Arc::new(registry);
        let auth = Arc::new(crate::auth::Auth::new(&config, store.clone())?);
        auth.start().await;
        let bus = crate::cluster::open(&config);
        let limits = crate::limits::Limits::new(&config.limits, Arc::clone(&bus));
        let chat = Arc::new(crate::chat::Chat::new(
            &config,
            store.clone(),
            persister.clone(),
            Arc::clone(&generations),
            Arc::clone(&routes),
            Arc::clone(&bus),
            Arc::clone(&limits),
        ));
        chat.start();
        let drain = drain::Drain::new(
            bus.is_shared(),
            config.server.drain_batch_size,
            Duration::from_millis(config.server.drain_batch_interval_ms),
        );
        let ai_streams = ai_sdk::Streams::new(config.generation.max_live);
        Ok(Arc::new(Self {
            config,
            routes,
            generations,
            store,
            persister,
            running: Mutex::new(running),
            chat,
            bus,
            connections: ws::Connections::default(),
            auth,
            limits,
            ai_streams,
            drain,
        }))
    }

    /// Flushes the persister (once); called at the end of a drain.
    pub async fn flush_persister(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(running) = running {
            let deadline = Duration::from_secs(self.config.store.shutdown_flush_secs);
            running.shutdown(deadline).await;
        }
    }

    /// Problems `serve` would refuse to start with that are not in the file
    /// itself: API key variables that are not set in this environment.
    pub fn check_keys(config: &Config) -> Vec<String> {
        config
            .providers
            .iter()
            .filter(|p| p.kind != ProviderKind::Mock)
            .filter_map(|p| ApiKey::from_config(p).err())
            .map(|err| err.to_string())
            .collect()
    }
}

pub use server::{run, serve};

/// The application router with its middleware. `/metrics` and the admin
/// API are on it unless `server.admin_listen` moves them to
/// [`admin_router`].
pub fn router(gateway: Arc<Gateway>) -> Router {
    let operator = if gateway.config.server.admin_listen.is_empty() {
        operator_routes()
    } else {
        Router::new()
    };
    Router::new()
        .merge(operator)
        .route("/", get(assets::index))
        .route("/widget.js", get(assets::widget_js))
        .route("/sdk/spillway.js", get(assets::sdk_js))
        .route("/sdk/spillway.d.ts", get(assets::sdk_types))
        .route("/embed", get(assets::embed))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/ai/chat", post(ai_sdk::chat))
        .route("/v1/ai/chat/{id}/stream", get(ai_sdk::resume))
        .route(
            "/v1/conversations",
            post(conversations::create).get(conversations::list),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::get)
                .patch(conversations::rename)
                .delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/messages",
            get(conversations::messages).post(sse::send),
        )
        .route(
            "/v1/me",
            axum::routing::delete(conversations::erase),
        )
        .route("/v1/me/export", get(conversations::export))
        .route("/v1/me/generations", get(conversations::active))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/widget/session", post(widget::session))
        .route("/v1/generations/{id}/events", get(sse::events))
        .route("/v1/generations/{id}/cancel", post(sse::cancel))
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            client_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            request_limits,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            edge_headers,
        ))
        .with_state(gateway)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            // Method, path and request id only: never headers (they carry
            // keys) or bodies (they carry messages).
            let id = request
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuidV7))
}

/// What only operators call: `/metrics` (and the admin API).
fn operator_routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .merge(admin::routes())
}

/// The router of `server.admin_listen`: the operator routes alone (plus
/// the probes), with request ids.
pub fn admin_router(gateway: Arc<Gateway>) -> Router {
    operator_routes()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .fallback(no_route)
        .with_state(gateway)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuidV7))
}

/// The request's own bounds, before any other work: a request target
/// longer than `server.max_url_bytes` is refused with 414, and a body that
/// stalls for `server.body_timeout_secs` ends the request (408).
async fn request_limits(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let server = &gateway.config.server;
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if target > server.max_url_bytes {
        let mut err = ApiError::invalid_request(
            "url_too_long",
            format!(
                "The request target is longer than {} bytes",
                server.max_url_bytes
            ),
        );
        err.status = http::StatusCode::URI_TOO_LONG;
        return err.into_response();
    }
    let timeout = Duration::from_secs(server.body_timeout_secs);
    let request = request
        .map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(timeout, body)));
    next.run(request).await
}

/// Headers every response carries, and CORS: a browser page may call from
/// an origin one of the widgets allows (any origin in development mode).
/// Preflight requests are answered here.
async fn edge_headers(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use http::header::{self, HeaderValue};
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = origin
        .as_ref()
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| !gateway.auth.enabled() || gateway.auth.cors_origin_allowed(o));
    let preflight = request.method() == http::Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let status = if allowed {
            http::StatusCode::NO_CONTENT
        } else {
            http::StatusCode::FORBIDDEN
        };
        let mut response = status.into_response();
        if allowed {
            let headers = response.headers_mut();
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PATCH, DELETE"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "authorization, content-type, last-event-id, x-request-id, x-spillway-user",
                ),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    if let Some(origin) = origin.filter(|_| allowed) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset",
            ),
        );
    }
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("strict-origin-when-cross-origin"),
    );
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        // The API answers JSON and event streams: nothing to load, nowhere
        // to be framed. Pages (the demo, the embed) set their own.
        let html = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/html"));
        let policy = if html {
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'self'"
        } else {
            "default-src 'none'; frame-ancestors 'none'"
        };
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(policy),
        );
    }
    response
}

/// Requests per minute from one client address (health probes excepted):
/// a 429 before any other work.
async fn client_limit(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    if !probe && let Some(address) = client_address(&gateway, &request) {
        let checked = gateway
            .limits
            .check(crate::limits::Kind::Ip, &address, "")
            .await;
        if let Err(limited) = checked {
            return limited_error(&limited).into_response();
        }
    }
    next.run(request).await
}

/// The client's address: the trusted proxy's header when configured
/// (`auth.client_ip_header`), else the peer's.
fn client_address(gateway: &Gateway, request: &axum::extract::Request) -> Option<String> {
    let header = &gateway.auth.config().client_ip_header;
    if !header.is_empty() {
        return request
            .headers()
            .get(header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().chars().take(64).collect());
    }
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip().to_string())
}

async fn no_route(RequestId(id): RequestId, OriginalUri(uri): OriginalUri) -> Response {
    ApiError::no_route(uri.path())
        .with_request_id(&id)
        .into_response()
}

/// Reads a request body up to `limit` bytes: 413 past it, 408 if it
/// stalls (`server.body_timeout_secs`), 400 if it breaks off.
pub(crate) async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(err) => {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let mut cause = std::error::Error::source(&err);
            let mut stalled = false;
            while let Some(inner) = cause {
                stalled |= inner.is::<tower_http::timeout::TimeoutError>();
                cause = inner.source();
            }
            if too_large {
                Err(ApiError::body_too_large(limit))
            } else if stalled {
                let mut err = ApiError::invalid_request(
                    "request_timeout",
                    "The request body stopped arriving",
                );
                err.status = http::StatusCode::REQUEST_TIMEOUT;
                Err(err)
            } else {
                Err(ApiError::invalid_request(
                    "invalid_body",
                    "The request body could not be read",
                ))
            }
        }
    }
}

/// Parses a JSON body into `T`; every rejection is a typed 400 naming the
/// field at fault.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::invalid_request("invalid_encoding", "The request body is not valid UTF-8")
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_data() {
            let api =
                ApiError::invalid_request("invalid_type", format!("Invalid request: {inner}"));
            if path == "." {
                api
            } else {
                api.with_param(path)
            }
        } else {
            ApiError::invalid_request(
                "invalid_json",
                format!("The request body is not valid JSON: {inner}"),
            )
        }
    })?;
    deserializer.end().map_err(|err| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body is not valid JSON: {err}"),
        )
    })?;
    Ok(value)
}

/// The caller, proven by `credentials`, allowed to chat; every refusal is a
/// typed 401/403 (development mode without a user: `missing_user`).
pub(crate) async fn principal(
    gateway: &Gateway,
    credentials: crate::auth::Credentials<'_>,
) -> Result<crate::auth::Principal, ApiError> {
    use crate::auth::AuthError;
    match gateway.auth.authenticate(&credentials).await {
        Ok(principal) if principal.has_scope("chat") => {
            gateway
                .limits
                .check(
                    crate::limits::Kind::Request,
                    &principal.limit_key(),
                    &principal.tier,
                )
                .await
                .map_err(|limited| limited_error(&limited))?;
            Ok(principal)
        }
        Ok(_) => Err(AuthError::Forbidden.api()),
        Err(AuthError::Missing) if !gateway.auth.enabled() => {
            let mut err = ApiError::invalid_request(
                "missing_user",
                "Name the user with X-Spillway-User (or ?user=) in development mode",
            );
            err.status = http::StatusCode::UNAUTHORIZED;
            err.kind = "authentication_error";
            Err(err)
        }
        Err(err) => Err(err.api()),
    }
}

/// A rate-limit or quota refusal as a 429 with `Retry-After` and the
/// `X-RateLimit-*` headers.
pub(crate) fn limited_error(limited: &crate::limits::Limited) -> ApiError {
    let mut err = ApiError::invalid_request(limited.code(), limited.to_string());
    err.status = http::StatusCode::TOO_MANY_REQUESTS;
    err.kind = "rate_limit_error";
    err.retryable = true;
    err.retry_after = limited.retry_after;
    err.headers = limited.headers();
    err
}

/// The header naming the user in development mode (until authentication is
/// configured, which switches it off; see docs/conversations.md).
pub const DEV_USER: HeaderName = HeaderName::from_static("x-spillway-user");

/// The tenant every development-mode user belongs to.
pub const DEV_TENANT: &str = "default";

/// The user a request names with `X-Spillway-User`, if it names a valid one
/// (1 to 128 visible ASCII characters).
pub fn dev_owner(headers: &http::HeaderMap) -> Option<Owner> {
    owner_named(headers.get(DEV_USER)?.to_str().ok()?)
}

/// The development-mode user called `name`, if it is a valid name (1 to
/// 128 visible ASCII characters).
pub fn owner_named(name: &str) -> Option<Owner> {
    let user = name.trim();
    let valid = !user.is_empty() && user.len() <= 128 && user.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| Owner {
        tenant_id: DEV_TENANT.to_owned(),
        user_id: user.to_owned(),
    })
}

/// The request id, as set (or kept) by the request-id middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        Ok(Self(id))
    }
}

/// Fresh request ids are UUIDv7: unique and sortable by time.
#[derive(Debug, Clone, Copy)]
struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<TowerRequestId> {
        let id = uuid::Uuid::now_v7().to_string();
        http::HeaderValue::from_str(&id)
            .ok()
            .map(TowerRequestId::new)
    }
}

/// The keep-alive clock of a streaming response: due once the stream has
/// written nothing for `every`. One timer per stream, re-armed only when it
/// fires early, instead of a timer registered and dropped around every read.
pub(crate) struct Heartbeat {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    every: Duration,
    last: tokio::time::Instant,
}

impl Heartbeat {
    pub(crate) fn new(every: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            sleep: Box::pin(tokio::time::sleep_until(now + every)),
            every,
            last: now,
        }
    }

    /// Records a write: the next keep-alive is due `every` from now.
    pub(crate) fn wrote(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Resolves when a keep-alive is due, and counts it as the write it
    /// is about to be. Cancel-safe: dropping it loses nothing.
    pub(crate) async fn due(&mut self) {
        loop {
            self.sleep.as_mut().await;
            let due = self.last + self.every;
            let now = tokio::time::Instant::now();
            if due <= now {
                self.last = now;
                self.sleep.as_mut().reset(now + self.every);
                return;
            }
            self.sleep.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Heartbeat;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_is_due_only_after_a_full_idle_interval_since_the_last_write() {
        let every = Duration::from_secs(15);
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(every);
        // Writes at 10 s and 20 s push the keep-alive to 35 s.
        tokio::time::sleep(Duration::from_secs(10)).await;
        heartbeat.wrote();
        tokio::time::sleep(Duration::from_secs(10)).await;
        heartbeat.wrote();
        heartbeat.due().await;
        assert_eq!(start.elapsed(), Duration::from_secs(35));
        // The keep-alive counts as a write: the next is due 15 s later.
        heartbeat.due().await;
        assert_eq!(start.elapsed(), Duration::from_secs(50));
    }
}

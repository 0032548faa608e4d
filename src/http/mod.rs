//! The HTTP edge: the axum router, its middleware, and serving.
//!
//! One file per surface: [`openai`] (the OpenAI-compatible API),
//! [`conversations`] (the history API) and [`assets`] (the demo page). Every handler returns [`ApiError`] on
//! failure; every response carries an `x-request-id` (the client's, when it
//! sent one, else a fresh UUIDv7).

pub mod assets;
pub mod conversations;
pub mod openai;
pub mod sse;
pub mod widget;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, OriginalUri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use http::request::Parts;
use http::{HeaderName, Request};
use tokio::net::TcpListener;
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

/// The application router with its middleware.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
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

/// Runs the gateway until a shutdown signal, then drains.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::telemetry::init(&config.log);
    let addr = config.server.listen_addr()?;
    let gateway = Gateway::open(config).await?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let models: Vec<&str> = gateway.routes.models().collect();
    let node = gateway.bus.node().to_owned();
    tracing::info!(%local, ?models, %node, "spillway listening on http://{local}");
    serve(listener, gateway, crate::shutdown::signal()).await?;
    Ok(())
}

/// Serves `gateway` on `listener` until `shutdown` resolves; then stops
/// accepting, lets streams finish for `server.shutdown_grace_secs`, and
/// cancels what is still running.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs(gateway.config.server.shutdown_grace_secs);
    let registry = Arc::clone(&gateway.generations);
    let flushed = Arc::clone(&gateway);
    let app = router(gateway).into_make_service_with_connect_info::<SocketAddr>();
    // Tokens are tiny writes that must leave at once: no Nagle delay.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
    });
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let graceful = async move {
        shutdown.await;
        draining_tx.send_replace(true);
    };
    // After the grace period, cancel the generations still streaming so
    // their connections end (with a typed error event) and serve returns.
    let drain_registry = Arc::clone(&registry);
    let mut draining = draining_rx.clone();
    let deadline = tokio::spawn(async move {
        if draining.wait_for(|d| *d).await.is_ok() {
            tokio::time::sleep(grace).await;
            drain_registry.shutdown(Duration::from_secs(5)).await;
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await?;
    deadline.abort();
    registry.shutdown(Duration::from_secs(5)).await;
    // Generations have handed over their replies: flush them to the
    // database (what does not make it stays journaled).
    flushed.flush_persister().await;
    flushed.limits.flush().await;
    // Others see this instance gone at once, not after its heartbeat lapses.
    flushed.bus.leave().await;
    Ok(())
}

async fn healthz(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok", "node": gateway.bus.node() }))
}

/// `GET /readyz`: whether this instance should get traffic, with each
/// check: the database answers (when persistence is on) and, with Redis
/// configured, the bus is connected (unless `cluster.ready_requires_redis`
/// is off, when a Redis fault is reported but does not make it unready).
async fn readyz(axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>) -> Response {
    let store = match &gateway.store {
        Some(store) => {
            let probe = tokio::time::timeout(Duration::from_secs(2), store.ping()).await;
            match probe {
                Ok(Ok(())) => serde_json::json!({ "ok": true }),
                Ok(Err(err)) => serde_json::json!({ "ok": false, "error": err.to_string() }),
                Err(_) => serde_json::json!({ "ok": false, "error": "timed out" }),
            }
        }
        None => serde_json::json!({ "ok": true, "enabled": false }),
    };
    let health = gateway.bus.health();
    let shared = health.mode == "redis";
    let redis = serde_json::json!({
        "configured": shared,
        "ok": health.ok,
        "instances": health.instances,
        "followers": health.followers,
        "dropped_inbound": health.dropped_inbound,
        "dropped_outbound": health.dropped_outbound,
        "recovered": health.recovered,
    });
    let store_ok = store["ok"].as_bool().unwrap_or(false);
    let redis_ok = !shared || health.ok || !gateway.config.cluster.ready_requires_redis;
    let ready = store_ok && redis_ok;
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unready" },
        "node": health.node,
        "checks": { "store": store, "redis": redis },
    });
    let status = if ready {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
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

/// Reads a request body up to `limit` bytes: 413 past it, 400 if it breaks
/// off.
pub(crate) async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(err) => {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::body_too_large(limit))
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

//! The HTTP edge: the axum router, its middleware, and serving.
//!
//! One file per surface: [`openai`] (the OpenAI-compatible API) and
//! [`assets`] (the demo page). Every handler returns [`ApiError`] on
//! failure; every response carries an `x-request-id` (the client's, when it
//! sent one, else a fresh UUIDv7).

pub mod assets;
pub mod openai;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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
}

impl Gateway {
    /// Builds providers, routes and the registry from a validated config.
    pub fn from_config(config: Config) -> Result<Arc<Self>, BuildError> {
        let routes = Arc::new(routing::Router::from_config(&config)?);
        let pricing = crate::usage::Pricing::from_config(&config.pricing);
        let generations = Arc::new(Registry::new(config.generation.clone(), pricing));
        Ok(Arc::new(Self {
            config,
            routes,
            generations,
        }))
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
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .fallback(no_route)
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
    let gateway = Gateway::from_config(config)?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let models: Vec<&str> = gateway.routes.models().collect();
    tracing::info!(%local, ?models, "spillway listening on http://{local}");
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
    Ok(())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn no_route(RequestId(id): RequestId, OriginalUri(uri): OriginalUri) -> Response {
    ApiError::no_route(uri.path())
        .with_request_id(&id)
        .into_response()
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

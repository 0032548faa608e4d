//! Accepting connections and the drain: our own accept loop over hyper, so
//! the edge's limits are ours to set (how long a client may take to send
//! its headers, how big they may be) and a shutdown drains as
//! [`super::drain`] describes, never hanging on an open stream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

use super::Gateway;
use crate::config::{Config, ServerConfig};

/// How long after the drain timeout (when running replies are cancelled)
/// the instance still waits for connections to close before it exits.
const AFTER_CANCEL: Duration = Duration::from_secs(5);

/// Runs the gateway until a shutdown signal, then drains.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::telemetry::init(&config.log);
    let addr = config.server.listen_addr()?;
    let admin = config.server.admin_addr()?;
    let gateway = Gateway::open(config).await?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let admin_listener = match admin {
        Some(admin) => Some(TcpListener::bind(admin).await?),
        None => None,
    };
    let models: Vec<&str> = gateway.routes.models().collect();
    let node = gateway.bus.node().to_owned();
    tracing::info!(%local, ?models, %node, "spillway listening on http://{local}");
    let admin_task = admin_listener.map(|listener| {
        if let Ok(admin) = listener.local_addr() {
            tracing::info!(%admin, "metrics and admin API on http://{admin}");
        }
        let app = super::admin_router(Arc::clone(&gateway));
        let builder = builder(&gateway.config.server);
        tokio::spawn(async move {
            accept(&listener, &app, &builder, None, std::future::pending()).await;
        })
    });
    serve(listener, gateway, crate::shutdown::signal()).await?;
    if let Some(task) = admin_task {
        task.abort();
    }
    Ok(())
}

/// The connection builder with the edge's limits: HTTP/1 headers must
/// arrive within `header_timeout_secs` (a slowloris client is cut off) and
/// fit `max_header_bytes` and `max_headers` (431 past them).
fn builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(server.header_timeout_secs))
        .max_buf_size(server.max_header_bytes.max(8192))
        .max_headers(server.max_headers);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Accepts connections on `listener` and serves `app` on each until
/// `stop` resolves; each connection is watched by `graceful`, when given.
async fn accept(
    listener: &TcpListener,
    app: &Router,
    builder: &Builder<TokioExecutor>,
    graceful: Option<&GracefulShutdown>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, most likely: back off rather
                    // than spin; the connections that hold them will close.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Tokens are tiny writes that must leave at once: no Nagle delay.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        let service = app
            .clone()
            .map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(remote));
                request
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(service))
            .into_owned();
        match graceful {
            Some(graceful) => {
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                });
            }
            None => {
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                });
            }
        }
    }
}

/// Serves `gateway` on `listener` until `shutdown` resolves, then drains
/// (see [`super::drain`]) and returns.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = super::router(Arc::clone(&gateway));
    let builder = builder(&gateway.config.server);
    let graceful = GracefulShutdown::new();
    accept(&listener, &app, &builder, Some(&graceful), shutdown).await;
    drop(listener);
    drain(&gateway, graceful).await;
    Ok(())
}

/// Steps 1 to 4 of the drain.
async fn drain(gateway: &Arc<Gateway>, graceful: GracefulShutdown) {
    gateway.drain.begin();
    let grace = Duration::from_secs(gateway.config.server.shutdown_grace_secs);
    let deadline = Instant::now() + grace;
    // HTTP connections finish their responses (streams end with their
    // replies, or at once with `reconnect` when handing off), then close.
    let mut http_closed = Box::pin(graceful.shutdown());
    let mut http_done = false;
    let settled =
        |gateway: &Gateway| gateway.connections.is_empty() && gateway.generations.running() == 0;
    loop {
        if http_done && settled(gateway) {
            break;
        }
        tokio::select! {
            () = &mut http_closed, if !http_done => http_done = true,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let running = gateway.generations.running();
    if running > 0 {
        tracing::warn!(
            running,
            "drain timeout reached: cancelling the replies still running"
        );
    }
    // Cancels what still runs (each ends with a typed error) and closes the
    // WebSockets still open (1001).
    gateway.generations.shutdown(AFTER_CANCEL).await;
    let hard_stop = Instant::now() + AFTER_CANCEL;
    while !(http_done && gateway.connections.is_empty()) {
        tokio::select! {
            () = &mut http_closed, if !http_done => http_done = true,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = tokio::time::sleep_until(hard_stop) => {
                tracing::warn!(
                    websockets = gateway.connections.len(),
                    http_closed = http_done,
                    "connections still open after the drain: closing them"
                );
                break;
            }
        }
    }
    // Generations have handed over their replies: flush them to the
    // database (what does not make it stays journaled).
    gateway.flush_persister().await;
    gateway.limits.flush().await;
    // The mirrors' last batches reach Redis; others see this instance gone
    // at once, not after its heartbeat lapses.
    gateway.bus.leave().await;
    tracing::info!("drained");
}

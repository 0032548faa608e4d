//! What operators and platforms probe: `/healthz` (the process answers),
//! `/readyz` (this instance should get traffic) and `/metrics`
//! (Prometheus; names and labels in [`crate::metrics`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::Gateway;
use crate::metrics::{self, TargetLabels, sync_counter};
use crate::routing::breaker::BreakerState;

/// `GET /healthz`: the process is alive.
pub async fn healthz(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok", "node": gateway.bus.node() }))
}

/// `GET /readyz`: whether this instance should get traffic, with each
/// check: not draining; the database answers (when persistence is on);
/// with Redis configured, the bus is connected (unless
/// `cluster.ready_requires_redis` is off, when a Redis fault is reported
/// but does not make it unready).
pub async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    let draining = gateway.drain.is_draining();
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
    let ready = !draining && store_ok && redis_ok;
    let status = match (ready, draining) {
        (true, _) => "ready",
        (false, true) => "draining",
        (false, false) => "unready",
    };
    let body = serde_json::json!({
        "status": status,
        "node": health.node,
        "checks": {
            "draining": { "ok": !draining },
            "store": store,
            "redis": redis,
        },
    });
    let code = if ready {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// `GET /metrics`: the OpenMetrics text exposition.
pub async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    gateway.refresh_metrics();
    let body = metrics::get().encode();
    ([(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

impl Gateway {
    /// Brings the metrics that are state, not events, up to date: running
    /// generations, breakers, the persister, the bus.
    pub fn refresh_metrics(&self) {
        let m = metrics::get();
        let running = self.generations.running();
        m.generations_running
            .set(i64::try_from(running).unwrap_or(i64::MAX));
        m.generations_held
            .set(i64::try_from(self.generations.len()).unwrap_or(i64::MAX));
        for (provider, model, state) in self.routes.breaker_states() {
            let value = match state {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            };
            m.breaker_state
                .get_or_create(&TargetLabels { provider, model })
                .set(value);
        }
        if let Some(persister) = &self.persister {
            let stats = persister.stats();
            m.persister_queue.set(stats.pending.load(Ordering::Relaxed));
            m.persister_spill_bytes
                .set(i64::try_from(stats.spill_bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            sync_counter(
                &m.persister_journaled,
                stats.journaled.load(Ordering::Relaxed),
            );
            sync_counter(&m.persister_stored, stats.stored.load(Ordering::Relaxed));
            sync_counter(
                &m.persister_write_errors,
                stats.write_errors.load(Ordering::Relaxed),
            );
        }
        let health = self.bus.health();
        m.redis_connected
            .set(i64::from(health.mode == "redis" && health.ok));
        sync_counter(&m.redis_position_replays, health.recovered);
        for (direction, total) in [
            ("inbound", health.dropped_inbound),
            ("outbound", health.dropped_outbound),
        ] {
            sync_counter(
                &m.redis_dropped
                    .get_or_create(&metrics::DirectionLabels { direction }),
                total,
            );
        }
    }
}

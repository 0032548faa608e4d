//! The admin API (`/admin/v1/*`): what an operator sees of this instance
//! and does to it. `docs/admin.md` is the reference.
//!
//! - `GET providers`: every model's targets with their breaker state and
//!   the outcomes in the breaker's window;
//! - `GET instance`: this instance's connections, generations and bus;
//! - `GET usage`: tokens, replies and cost per day, tenant, provider and
//!   model (the cost dashboard), bounded;
//! - `POST keys/{id}/revoke`, `POST tokens/revoke`: revocation that takes
//!   effect on this instance at once;
//! - `POST users/{tenant}/{user}/disconnect`: closes that user's
//!   WebSockets here with [`close::CLOSED_BY_OPERATOR`].
//!
//! Every endpoint wants an API key with the `admin` scope ([`Admin`]): no
//! credential (or an invalid one) is a 401, any other credential a 403.
//! That holds in development mode too (`auth.enabled = false`, where
//! chat endpoints check nothing): there the key is checked against the
//! store directly, and without a store the admin API answers 404 as if it
//! did not exist, since nothing could prove an operator.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Gateway, REQUEST_ID, RequestId};
use crate::auth::{AuthError, Credentials, KEY_PREFIX, Kind, Principal};
use crate::error::ApiError;
use crate::protocol::close;
use crate::routing::breaker::BreakerState;
use crate::store::{Owner, Store, StoreError, UsageQuery, utc_day};

/// The scope an API key needs for the admin API.
pub const ADMIN_SCOPE: &str = "admin";

/// Most rows `GET /admin/v1/usage` answers with; past it the answer says
/// `truncated` and the operator narrows the days or names a tenant.
pub const MAX_USAGE_ROWS: u32 = 10_000;

/// Most days one usage request may span, so one request cannot make the
/// database aggregate years of rows.
pub const MAX_USAGE_DAYS: i64 = 366;

/// Days a usage request covers when it names no `from`: the last 31,
/// today included.
const DEFAULT_USAGE_DAYS: i64 = 31;

/// One day in Unix milliseconds.
const DAY_MS: i64 = 86_400_000;

/// The admin API's routes, for [`super::router`] (or the admin listener).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/admin/v1/providers", get(providers))
        .route("/admin/v1/instance", get(instance))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/keys/{id}/revoke", post(revoke_key))
        .route("/admin/v1/tokens/revoke", post(revoke_token))
        .route(
            "/admin/v1/users/{tenant}/{user}/disconnect",
            post(disconnect),
        )
}

/// Proof that the caller is an operator: an API key with the `admin`
/// scope. As a handler's first extractor it refuses everyone else before
/// the request is looked at further.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The key's id (logged with every change an operator makes; never
    /// the secret).
    pub key_id: String,
    /// The key's tenant.
    pub tenant: String,
}

impl FromRequestParts<Arc<Gateway>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let principal = if gateway.auth.enabled() {
            gateway
                .auth
                .authenticate(&Credentials::headers(&parts.headers))
                .await
        } else {
            match &gateway.store {
                Some(store) => development_key(store.as_ref(), &parts.headers).await,
                None => {
                    return Err(ApiError::no_route(parts.uri.path()).with_request_id(&request_id));
                }
            }
        };
        match principal {
            Ok(principal) if principal.has_scope(ADMIN_SCOPE) => match principal.kind {
                Kind::ApiKey(key_id) => Ok(Self {
                    key_id,
                    tenant: principal.tenant,
                }),
                // Only API keys carry scopes an operator grants.
                _ => Err(AuthError::Forbidden.api().with_request_id(&request_id)),
            },
            Ok(_) => Err(AuthError::Forbidden.api().with_request_id(&request_id)),
            Err(err) => Err(err.api().with_request_id(&request_id)),
        }
    }
}

/// The API key in `Authorization: Bearer sk_spl_…`, checked against the
/// store (development mode, where [`crate::auth::Auth::authenticate`]
/// checks nothing). Uncached: a revoked key stops working at once.
async fn development_key(store: &dyn Store, headers: &HeaderMap) -> Result<Principal, AuthError> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let token = header
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or(AuthError::Malformed)?;
    let (id, secret) = token
        .strip_prefix(KEY_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or(AuthError::InvalidKey)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() != 64 {
        return Err(AuthError::InvalidKey);
    }
    let row = match store.get_api_key(id).await {
        Ok(Some(row)) => row,
        Ok(None) => return Err(AuthError::InvalidKey),
        Err(err) => {
            tracing::warn!(%err, "key store unavailable");
            return Err(AuthError::Unavailable);
        }
    };
    if row.revoked_at.is_some() || !same_hash(&row.secret_hash, &crate::auth::hash(secret)) {
        return Err(AuthError::InvalidKey);
    }
    Ok(Principal {
        tenant: row.tenant_id,
        user: format!("key:{id}"),
        tier: row.tier,
        scopes: row.scopes.split_whitespace().map(str::to_owned).collect(),
        kind: Kind::ApiKey(id.to_owned()),
        expires_at: None,
        jti: None,
    })
}

/// Compares two hex digests in time independent of where they differ.
fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `GET /admin/v1/providers`: each model's targets in the order they are
/// configured: provider, upstream model, tier, weight, breaker state, and
/// the outcomes in the breaker's window (`breaker.window_secs`).
async fn providers(_admin: Admin, State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let routes = &gateway.routes;
    let models: Vec<Value> = routes
        .models()
        .filter_map(|name| routes.route(name))
        .map(|route| {
            let targets: Vec<Value> = route
                .targets
                .iter()
                .map(|target| {
                    let recent = target.breaker.recent();
                    json!({
                        "provider": target.provider.name(),
                        "upstream_model": target.model,
                        "tier": target.tier,
                        "weight": target.weight,
                        "breaker": breaker_name(target.breaker.state()),
                        "recent": {
                            "outcomes": recent.outcomes,
                            "failures": recent.failures,
                            "error_rate": recent.error_rate(),
                        },
                    })
                })
                .collect();
            json!({ "model": route.name, "targets": targets })
        })
        .collect();
    Json(json!({
        "window_secs": gateway.config.breaker.window_secs,
        "models": models,
    }))
}

/// The breaker state as the API names it.
fn breaker_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

/// `GET /admin/v1/instance`: this instance only (the fleet is every
/// instance's answer, or the metrics).
async fn instance(_admin: Admin, State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let health = gateway.bus.health();
    let held = gateway.generations.len();
    let running = gateway.generations.running();
    Json(json!({
        "node": gateway.bus.node(),
        "instance": gateway.bus.instance(),
        "websockets": gateway.connections.len(),
        "generations": {
            "running": running,
            "resumable": held.saturating_sub(running),
            "held": held,
        },
        "bus": {
            "mode": health.mode,
            "ok": health.ok,
            "instances": health.instances,
            "followers": health.followers,
        },
    }))
}

/// `GET /admin/v1/usage` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    /// One tenant; all when absent.
    #[serde(default)]
    tenant: Option<String>,
    /// First day (`YYYY-MM-DD`, UTC), inclusive.
    #[serde(default)]
    from: Option<String>,
    /// Last day, inclusive; today when absent.
    #[serde(default)]
    to: Option<String>,
}

/// `GET /admin/v1/usage?tenant=&from=&to=`: usage per day, tenant,
/// provider and model, at most [`MAX_USAGE_ROWS`] rows.
async fn usage(
    _admin: Admin,
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    answer_usage(&gateway, params)
        .await
        .map_err(|err| err.with_request_id(&request_id))
}

async fn answer_usage(
    gateway: &Gateway,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|err| {
        ApiError::invalid_request(
            "invalid_query",
            format!("Invalid query: {}", err.body_text()),
        )
    })?;
    let tenant = match params.tenant {
        Some(tenant) if tenant.is_empty() || tenant.len() > 128 => {
            return Err(invalid_value("tenant", "a tenant id of 1 to 128 bytes"));
        }
        tenant => tenant,
    };
    let to = match &params.to {
        Some(text) => parse_day(text).ok_or_else(|| invalid_value("to", "a date YYYY-MM-DD"))?,
        None => crate::store::now_ms().div_euclid(DAY_MS),
    };
    let from = match &params.from {
        Some(text) => parse_day(text).ok_or_else(|| invalid_value("from", "a date YYYY-MM-DD"))?,
        None => to - (DEFAULT_USAGE_DAYS - 1),
    };
    if from > to {
        return Err(invalid_value("from", "a day no later than 'to'"));
    }
    if to - from + 1 > MAX_USAGE_DAYS {
        return Err(invalid_value(
            "from",
            &format!("at most {MAX_USAGE_DAYS} days before 'to'"),
        ));
    }
    let query = UsageQuery {
        tenant_id: tenant,
        from: utc_day(from * DAY_MS),
        to: utc_day(to * DAY_MS),
        // One more than shown tells whether the answer was cut.
        limit: MAX_USAGE_ROWS + 1,
    };
    let mut rows = store(gateway)?
        .usage_totals(&query)
        .await
        .map_err(|err| unavailable(&err))?;
    let truncated = rows.len() > MAX_USAGE_ROWS as usize;
    rows.truncate(MAX_USAGE_ROWS as usize);
    let data: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "day": row.day,
                "tenant": row.tenant_id,
                "provider": row.provider,
                "model": row.model,
                "requests": row.messages,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "cost_usd": row.cost_usd,
            })
        })
        .collect();
    Ok(Json(json!({
        "tenant": query.tenant_id,
        "from": query.from,
        "to": query.to,
        "data": data,
        "truncated": truncated,
        "max_rows": MAX_USAGE_ROWS,
    })))
}

/// The days since 1970-01-01 of a `YYYY-MM-DD` date, if it is one (a real
/// calendar date, four-digit year).
fn parse_day(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
    if !shaped {
        return None;
    }
    let year: i64 = text[..4].parse().ok()?;
    let month: i64 = text[5..7].parse().ok()?;
    let day: i64 = text[8..].parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of
    // `utc_day`; a day past the month's end (02-30) comes back as another
    // date, which the round trip catches.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (utc_day(days * DAY_MS) == text).then_some(days)
}

/// `POST /admin/v1/keys/{id}/revoke`: revokes API key `id` (404 when there
/// is none) and drops it from this instance's key cache, so the next
/// request with it is refused here at once (on other instances within
/// `auth.key_cache_secs`; live WebSockets at their next credential
/// re-check).
async fn revoke_key(
    admin: Admin,
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let result = async {
        let store = store(&gateway)?;
        let found = store
            .revoke_api_key(&id)
            .await
            .map_err(|err| unavailable(&err))?;
        if !found {
            return Err(not_found("api_key_not_found", "No API key has this id"));
        }
        gateway.auth.forget_api_key(&id);
        let row = store
            .get_api_key(&id)
            .await
            .map_err(|err| unavailable(&err))?
            .ok_or_else(|| not_found("api_key_not_found", "No API key has this id"))?;
        tracing::info!(admin_key = %admin.key_id, key = %row.id, "admin revoked an API key");
        Ok(Json(json!({
            "id": row.id,
            "tenant": row.tenant_id,
            "revoked_at": row.revoked_at,
        })))
    }
    .await;
    result.map_err(|err| err.with_request_id(&request_id))
}

/// `POST /admin/v1/tokens/revoke` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeTokenBody {
    /// The token's `jti`.
    jti: String,
    /// The token's `exp` (Unix seconds): the entry is kept until then.
    expires_at: u64,
}

/// `POST /admin/v1/tokens/revoke`: revokes a JWT by its `jti` until it
/// expires; refused here at once, on other instances at their next reload
/// of the list (`auth.recheck_secs`), as are live WebSockets holding it.
async fn revoke_token(
    admin: Admin,
    State(gateway): State<Arc<Gateway>>,
    RequestId(request_id): RequestId,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let result = async {
        let bytes = super::read_body(body, gateway.config.server.max_body_bytes).await?;
        let body: RevokeTokenBody = super::parse_json(&bytes)?;
        if body.jti.is_empty() || body.jti.len() > 256 {
            return Err(invalid_value("jti", "a token id of 1 to 256 bytes"));
        }
        let until = i64::try_from(body.expires_at.saturating_mul(1000)).unwrap_or(i64::MAX);
        store(&gateway)?
            .revoke_token(&body.jti, until)
            .await
            .map_err(|err| unavailable(&err))?;
        gateway.auth.note_revoked(&body.jti);
        tracing::info!(admin_key = %admin.key_id, "admin revoked a token");
        Ok(Json(json!({
            "jti": body.jti,
            "expires_at": body.expires_at,
        })))
    }
    .await;
    result.map_err(|err| err.with_request_id(&request_id))
}

/// `POST /admin/v1/users/{tenant}/{user}/disconnect`: closes the user's
/// live WebSockets on this instance with [`close::CLOSED_BY_OPERATOR`];
/// answers how many. It does not stop them from connecting again (revoke
/// their credential for that), nor end SSE streams.
async fn disconnect(
    admin: Admin,
    State(gateway): State<Arc<Gateway>>,
    Path((tenant, user)): Path<(String, String)>,
) -> Json<Value> {
    let owner = Owner {
        tenant_id: tenant,
        user_id: user,
    };
    let closed = gateway.connections.close_owner(&owner);
    tracing::info!(admin_key = %admin.key_id, closed, "admin closed a user's connections");
    Json(json!({ "closed": closed, "close_code": close::CLOSED_BY_OPERATOR }))
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

/// 503 for a database that failed the query.
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

/// 404 for something that does not exist.
fn not_found(code: &'static str, message: &str) -> ApiError {
    let mut err = ApiError::invalid_request(code, message);
    err.status = StatusCode::NOT_FOUND;
    err
}

/// 400 `invalid_value` naming `param` and what it must be.
fn invalid_value(param: &str, expected: &str) -> ApiError {
    ApiError::invalid_request("invalid_value", format!("'{param}' must be {expected}"))
        .with_param(param)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_parse_only_as_real_calendar_dates() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2000-02-29"), Some(951_782_400_000 / DAY_MS));
        assert_eq!(parse_day("2026-11-22"), Some(1_795_305_600_000 / DAY_MS));
        assert_eq!(parse_day("1969-12-31"), Some(-1));
        for bad in [
            "",
            "2025-1-01",
            "2025-01-1",
            "2025/01/01",
            "2025-13-01",
            "2025-00-10",
            "2025-02-29",
            "2025-04-31",
            "2025-01-32",
            "+025-01-01",
            "2025-01-01T00:00",
            "２０２５-01-01",
        ] {
            assert_eq!(parse_day(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hashes_compare_equal_only_when_identical() {
        assert!(same_hash("abcd", "abcd"));
        assert!(!same_hash("abcd", "abce"));
        assert!(!same_hash("abcd", "abc"));
    }
}

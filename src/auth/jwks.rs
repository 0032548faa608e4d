//! JWT verification keys from JWKS documents: the keys a `{"keys":[…]}`
//! document holds ([`verifiers`], for `auth.jwt.jwks_file` and the URL),
//! and the [`KeyCache`] of the identity provider's `auth.jwt.jwks_url`.
//!
//! # The cache's behaviour
//!
//! - **At start** ([`KeyCache::start`]) the set is fetched once. A failure
//!   is logged, not fatal: until a fetch succeeds, a token that only the
//!   URL's keys could verify is refused `503 auth_unavailable` (retryable:
//!   the gateway cannot tell yet whether it is valid).
//! - **Refreshed** in the background once the set is older than its
//!   lifetime: `auth.jwt.jwks_cache_secs`, or the answer's
//!   `Cache-Control: max-age` when that is shorter (`no-cache` and
//!   `no-store` count as 0), but never shorter than
//!   `auth.jwt.jwks_refetch_secs`. A failed fetch keeps the last good set
//!   and is retried every `jwks_refetch_secs`.
//! - **Refetched on an unknown `kid`** ([`KeyCache::refetch_for_unknown`]):
//!   a token whose `kid` no key has (the provider rotated its keys) starts a
//!   fetch at once, but at most one such fetch per `jwks_refetch_secs`,
//!   however many tokens ask: a flood of made-up kids costs the provider
//!   one request per window, and a kid still unknown after it is `401`.
//! - **Bounded**: one fetch at a time; the whole fetch (connect, answer,
//!   body) within `auth.jwt.jwks_timeout_ms`; the body at most
//!   [`JWKS_MAX_BYTES`]; redirects are not followed (an https URL could
//!   otherwise send the gateway to plain http).
//! - **Only signature keys it can use** are kept: RSA keys for RS256 and
//!   EC P-256 keys for ES256, with `use` absent or `sig` and `alg` absent
//!   or matching. A document with no such key is a failed fetch (the last
//!   good set stays): an empty set would refuse every user at once.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{SetupError, Verifier};
use crate::config::JwtConfig;

/// The largest JWKS answer read; a larger one is a failed fetch. Real key
/// sets are a few KiB.
pub const JWKS_MAX_BYTES: usize = 256 * 1024;

/// The keys of the current set, shared with the requests checking tokens.
pub(super) type KeySet = Arc<Vec<Verifier>>;

/// The RS256 / ES256 signature keys of the JWKS `document`; keys of other
/// types, curves, algorithms or uses, and keys that do not parse, are
/// skipped.
pub(super) fn verifiers(document: &[u8]) -> Result<Vec<Verifier>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document = serde_json::from_slice(document)?;
    Ok(document
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .filter_map(|jwk| verifier(&jwk))
        .collect())
}

/// `jwk` as a verifier, if it is a signature key of a supported algorithm.
fn verifier(jwk: &Jwk) -> Option<Verifier> {
    if !matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    ) {
        return None;
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Verifier {
        kid: jwk.common.key_id.clone(),
        algorithm,
        key,
    })
}

/// Why one fetch of the JWKS failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// No connection, or the connection broke.
    #[error("request failed: {0}")]
    Request(#[source] reqwest::Error),
    /// The provider answered, but not 2xx (a redirect included).
    #[error("answered {0}")]
    Status(http::StatusCode),
    /// The body is larger than [`JWKS_MAX_BYTES`].
    #[error("the answer is larger than {JWKS_MAX_BYTES} bytes")]
    TooLarge,
    /// The whole fetch took longer than `jwks_timeout_ms`.
    #[error("no whole answer within {0:?}")]
    Timeout(Duration),
    /// The body is not a JWKS document.
    #[error("not a JWKS document: {0}")]
    Parse(#[source] serde_json::Error),
    /// The document holds no key this gateway can use.
    #[error("no RS256 or ES256 signature key in the set")]
    NoUsableKey,
}

/// The keys of `auth.jwt.jwks_url`, fetched and cached. See the module
/// docs.
pub(super) struct KeyCache {
    /// Where the keys are.
    url: reqwest::Url,
    /// `url` without query and fragment, for logs.
    shown: String,
    /// No redirects, the connect timeout set.
    client: reqwest::Client,
    /// `jwks_cache_secs`: the longest a set is used before a refresh.
    cache_for: Duration,
    /// `jwks_refetch_secs`: the window of token-triggered fetches, the
    /// retry period after a failure and the shortest lifetime.
    refetch_every: Duration,
    /// `jwks_timeout_ms`: one whole fetch.
    timeout: Duration,
    /// The last good set; `None` until a fetch succeeds.
    keys: RwLock<Option<KeySet>>,
    /// Held while fetching, so fetches never overlap and requests waiting
    /// for one see its result.
    fetching: tokio::sync::Mutex<()>,
    /// When a token last started a fetch (an unknown `kid`).
    last_on_demand: Mutex<Option<Instant>>,
    /// The background refresh, stopped when the cache is dropped.
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("url", &self.shown)
            .field("keys", &self.current().map(|keys| keys.len()))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KeyCache {
    /// The cache of `config.jwks_url` (validated by the config), nothing
    /// fetched yet; `None` when no URL is configured.
    pub(super) fn new(config: &JwtConfig) -> Result<Option<Self>, SetupError> {
        if config.jwks_url.is_empty() {
            return Ok(None);
        }
        let url = reqwest::Url::parse(&config.jwks_url)
            .map_err(|err| SetupError::Jwks(format!("auth.jwt.jwks_url: {err}")))?;
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let timeout = Duration::from_millis(config.jwks_timeout_ms.max(1));
        // reqwest is built without a default TLS crypto backend; ring's is
        // installed once per process (an error: one is installed already).
        static CRYPTO: std::sync::Once = std::sync::Once::new();
        CRYPTO.call_once(|| drop(rustls::crypto::ring::default_provider().install_default()));
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("spillway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| SetupError::Jwks(format!("auth.jwt.jwks_url: HTTP client: {err}")))?;
        Ok(Some(Self {
            url,
            shown: shown.to_string(),
            client,
            cache_for: Duration::from_secs(config.jwks_cache_secs.max(1)),
            refetch_every: Duration::from_secs(config.jwks_refetch_secs.max(1)),
            timeout,
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            refresher: Mutex::new(None),
        }))
    }

    /// Fetches the set now (a failure is logged), then keeps it fresh in
    /// the background until the cache is dropped.
    pub(super) async fn start(self: &Arc<Self>) {
        let first = self.refresh().await;
        let me = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut next = first;
            loop {
                tokio::time::sleep(next).await;
                let Some(cache) = me.upgrade() else { return };
                next = cache.refresh().await;
            }
        });
        if let Some(old) = lock(&self.refresher).replace(task) {
            old.abort();
        }
    }

    /// The last good set; `None` while no fetch has succeeded.
    pub(super) fn current(&self) -> Option<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The set after a fetch for a token the current one cannot check (an
    /// unknown `kid`, or no set yet): the fetch happens only if no token
    /// started one within `jwks_refetch_secs`; otherwise this is the
    /// current set (after the fetch in progress, if any).
    pub(super) async fn refetch_for_unknown(&self) -> Option<KeySet> {
        let _turn = self.fetching.lock().await;
        let due = {
            let mut last = lock(&self.last_on_demand);
            let due = last.is_none_or(|at| at.elapsed() >= self.refetch_every);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.fetch_and_keep().await;
        }
        self.current()
    }

    /// One fetch (after any in progress); returns when to refresh next.
    async fn refresh(&self) -> Duration {
        let _turn = self.fetching.lock().await;
        self.fetch_and_keep().await
    }

    /// Fetches the set and keeps it if it is good; returns when to refresh
    /// next: the set's lifetime, or the retry period after a failure. The
    /// caller holds `fetching`.
    async fn fetch_and_keep(&self) -> Duration {
        match self.fetch().await {
            Ok((keys, max_age)) => {
                let lifetime = self.lifetime(max_age);
                tracing::debug!(
                    url = %self.shown,
                    keys = keys.len(),
                    fresh_for_secs = lifetime.as_secs(),
                    "fetched the JWKS"
                );
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(keys));
                lifetime
            }
            Err(err) => {
                if self.current().is_some() {
                    tracing::warn!(url = %self.shown, %err, "could not refresh the JWKS; keeping the last good keys");
                } else {
                    tracing::warn!(url = %self.shown, %err, "could not fetch the JWKS; tokens signed with its keys are refused (503) until a fetch succeeds");
                }
                self.floor()
            }
        }
    }

    /// The shortest lifetime and the retry period: `jwks_refetch_secs`, or
    /// `jwks_cache_secs` when that is shorter.
    fn floor(&self) -> Duration {
        self.refetch_every.min(self.cache_for)
    }

    /// How long a set is used: `max_age` when the provider sent one and it
    /// is shorter than `jwks_cache_secs`, never shorter than the floor.
    fn lifetime(&self, max_age: Option<Duration>) -> Duration {
        max_age
            .map_or(self.cache_for, |age| age.min(self.cache_for))
            .max(self.floor())
    }

    /// The usable keys of the provider's set and its `max-age`, within the
    /// timeout.
    async fn fetch(&self) -> Result<(Vec<Verifier>, Option<Duration>), FetchError> {
        let (body, max_age) = tokio::time::timeout(self.timeout, self.download())
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        let keys = verifiers(&body).map_err(FetchError::Parse)?;
        if keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        Ok((keys, max_age))
    }

    /// The answer's body (at most [`JWKS_MAX_BYTES`]) and `max-age`.
    async fn download(&self) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|err| FetchError::Request(err.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status));
        }
        if response
            .content_length()
            .is_some_and(|length| length > JWKS_MAX_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let max_age = max_age(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| FetchError::Request(err.without_url()))?
        {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }
}

impl Drop for KeyCache {
    fn drop(&mut self) {
        let task = self
            .refresher
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// The `Cache-Control` lifetime of an answer: `max-age=N`, or 0 for
/// `no-cache` / `no-store`; `None` when it says neither.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|directive| {
            let directive = directive.trim();
            if directive.eq_ignore_ascii_case("no-cache")
                || directive.eq_ignore_ascii_case("no-store")
            {
                return Some(Duration::ZERO);
            }
            let (name, value) = directive.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            value
                .trim()
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The test fixture RSA public key as a JWK (`kty`, `n`, `e`).
    const RSA_JWK: &str = include_str!("../../tests/fixtures/auth/rsa_public.jwk.json");

    fn fixture_jwk(extra: Value) -> Value {
        let mut jwk: Value = serde_json::from_str(RSA_JWK).unwrap();
        for (name, value) in extra.as_object().unwrap() {
            jwk[name] = value.clone();
        }
        jwk
    }

    fn kids(document: &Value) -> Vec<(Option<String>, Algorithm)> {
        verifiers(document.to_string().as_bytes())
            .unwrap()
            .into_iter()
            .map(|v| (v.kid, v.algorithm))
            .collect()
    }

    /// Keys for other uses, algorithms, key types or curves are dropped;
    /// RS256 keys with `use` absent or `sig` and `alg` absent or RS256 are
    /// kept, and a key that does not parse does not spoil the others.
    #[test]
    fn only_rs256_and_es256_signature_keys_are_kept() {
        let ec: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/auth/ec_public.jwk.json"))
                .unwrap();
        let mut p384 = ec.clone();
        p384["crv"] = "P-384".into();
        p384["kid"] = "p384".into();
        let mut es256 = ec.clone();
        es256["kid"] = "ec".into();
        let document = serde_json::json!({ "keys": [
            fixture_jwk(serde_json::json!({"kid": "plain"})),
            fixture_jwk(serde_json::json!({"kid": "sig", "use": "sig", "alg": "RS256"})),
            fixture_jwk(serde_json::json!({"kid": "enc", "use": "enc"})),
            fixture_jwk(serde_json::json!({"kid": "rs512", "alg": "RS512"})),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
            {"kty": "RSA", "kid": "broken"},
            {"kid": "no-kty"},
            p384,
            es256,
        ]});
        assert_eq!(
            kids(&document),
            [
                (Some("plain".to_owned()), Algorithm::RS256),
                (Some("sig".to_owned()), Algorithm::RS256),
                (Some("ec".to_owned()), Algorithm::ES256),
            ]
        );
        assert!(verifiers(b"{\"no\":\"keys\"}").is_err());
    }

    /// `max-age` is read among other directives, in any case;
    /// `no-cache` and `no-store` mean 0; anything else is no lifetime.
    #[test]
    fn cache_control_max_age_is_read() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_str(value).unwrap(),
            );
            headers
        };
        assert_eq!(
            max_age(&headers("public, Max-Age=120, must-revalidate")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(max_age(&headers("no-store")), Some(Duration::ZERO));
        assert_eq!(max_age(&headers("public")), None);
        assert_eq!(max_age(&headers("max-age=soon")), None);
        assert_eq!(max_age(&HeaderMap::new()), None);
    }

    /// The lifetime is the provider's `max-age` when shorter than
    /// `jwks_cache_secs`, never below `jwks_refetch_secs`.
    #[test]
    fn lifetime_is_max_age_bounded_by_the_config() {
        let config = JwtConfig {
            jwks_url: "https://idp.example/jwks".into(),
            jwks_cache_secs: 300,
            jwks_refetch_secs: 30,
            ..JwtConfig::default()
        };
        let cache = KeyCache::new(&config).unwrap().unwrap();
        let secs = Duration::from_secs;
        assert_eq!(cache.lifetime(None), secs(300));
        assert_eq!(cache.lifetime(Some(secs(60))), secs(60));
        assert_eq!(cache.lifetime(Some(secs(86_400))), secs(300));
        assert_eq!(cache.lifetime(Some(Duration::ZERO)), secs(30));
    }
}

//! Who is calling: every request resolves to a [`Principal`] or is refused
//! with a typed [`AuthError`] (401 / 403; on a WebSocket, close 4401 /
//! 4403).
//!
//! Three credentials, all presented as `Authorization: Bearer <token>` (or,
//! where a browser cannot set headers — a WebSocket upgrade, an
//! `EventSource` — as `?access_token=<token>`):
//!
//! - **API keys** (`sk_spl_<id>_<secret>`) for server-to-server calls: random,
//!   shown once, stored as the SHA-256 of the secret, scoped to a tenant,
//!   revocable (`spillway keys create|list|revoke`). A key acts for its
//!   tenant; the calling backend names the end user with `X-Spillway-User`
//!   (else the user is `key:<id>`).
//! - **JWTs** minted by the customer's backend for its signed-in users:
//!   HS256 (a shared secret) or RS256 / ES256 (public keys from PEM files,
//!   a JWKS file, or the identity provider's JWKS URL fetched and cached by
//!   [`jwks`], matched by `kid`); `exp` required, `nbf`, `aud`, `iss`
//!   checked with `auth.leeway_secs`; a `jti` on the revocation list is
//!   refused, on connect and periodically on live connections.
//! - **Visitor tokens** for anonymous widget users: a page's public widget
//!   key (`pk_…`) is exchanged, from an allowed origin, for a signed,
//!   expiring token (`POST /v1/widget/session`); the token is only accepted
//!   with an `Origin` the widget allows.
//!
//! With `auth.enabled = false` (the default) the gateway is in development
//! mode: `X-Spillway-User` (or `?user=`) names the user, nothing is checked.
//! `docs/security.md` has the threat model.

pub mod jwks;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, Config, WidgetConfig};
use crate::store::{ApiKeyRow, Owner, Store};

/// The `kid` of visitor tokens (they are signed by the gateway itself).
const VISITOR_KID: &str = "spillway-visitor";
/// The `iss` of visitor tokens.
const VISITOR_ISSUER: &str = "spillway";
/// API keys start with this.
pub const KEY_PREFIX: &str = "sk_spl_";
/// Verified API keys cached at most.
const KEY_CACHE: usize = 10_000;

/// What a credential proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Development mode: the user named themselves.
    Dev,
    /// An API key (its id).
    ApiKey(String),
    /// A user with a JWT from the customer's backend.
    User,
    /// An anonymous visitor of a widget (its public key).
    Visitor(String),
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant everything is scoped to.
    pub tenant: String,
    /// The user (or `visitor:<id>`, or `key:<id>`).
    pub user: String,
    /// The rate-limit tier.
    pub tier: String,
    /// What the credential allows (`chat`, `admin`).
    pub scopes: Vec<String>,
    /// Which credential.
    pub kind: Kind,
    /// When the credential expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// The token's `jti`, for revocation.
    pub jti: Option<String>,
}

impl Principal {
    /// The owner of the conversations this principal may see.
    pub fn owner(&self) -> Owner {
        Owner {
            tenant_id: self.tenant.clone(),
            user_id: self.user.clone(),
        }
    }

    /// The key rate limits and quotas count under.
    pub fn limit_key(&self) -> String {
        match &self.kind {
            Kind::ApiKey(id) => format!("key:{id}"),
            _ => format!("{}/{}", self.tenant, self.user),
        }
    }

    /// Whether the credential carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a request was refused. Every variant has a stable code; none says
/// more than needed (no hint whether a key id exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential.
    #[error("authentication required: send 'Authorization: Bearer <token>'")]
    Missing,
    /// Not a token this gateway understands.
    #[error("the credential is malformed")]
    Malformed,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token is not valid yet (`nbf`).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The token's audience is not this gateway's.
    #[error("the token is for another audience")]
    WrongAudience,
    /// The token's issuer is not trusted.
    #[error("the token's issuer is not trusted")]
    WrongIssuer,
    /// The signature does not verify (or the algorithm is not accepted).
    #[error("the token's signature is invalid")]
    BadSignature,
    /// The token was revoked.
    #[error("the token was revoked")]
    Revoked,
    /// The API key is unknown, wrong or revoked.
    #[error("the API key is not valid")]
    InvalidKey,
    /// The widget key is unknown.
    #[error("the widget key is not valid")]
    UnknownWidget,
    /// The request's origin may not use this widget.
    #[error("this origin may not use this widget")]
    OriginNotAllowed,
    /// The credential does not allow this.
    #[error("the credential does not allow this")]
    Forbidden,
    /// The key store cannot be reached to check the credential.
    #[error("credentials cannot be checked now")]
    Unavailable,
}

impl AuthError {
    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "missing_credentials",
            Self::Malformed => "invalid_credentials",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongAudience => "invalid_audience",
            Self::WrongIssuer => "invalid_issuer",
            Self::BadSignature => "invalid_signature",
            Self::Revoked => "token_revoked",
            Self::InvalidKey => "invalid_api_key",
            Self::UnknownWidget => "invalid_widget_key",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "auth_unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::OriginNotAllowed | Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The WebSocket close code.
    pub fn close_code(self) -> u16 {
        match self {
            Self::OriginNotAllowed | Self::Forbidden => crate::protocol::close::FORBIDDEN,
            Self::Unavailable => crate::protocol::close::TRY_AGAIN_LATER,
            _ => crate::protocol::close::UNAUTHORIZED,
        }
    }

    /// As the edge error.
    pub fn api(self) -> crate::error::ApiError {
        let mut err = crate::error::ApiError::invalid_request(self.code(), self.to_string());
        err.status = self.status();
        err.kind = match self.status() {
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::SERVICE_UNAVAILABLE => "server_error",
            _ => "authentication_error",
        };
        err.retryable = self == Self::Unavailable;
        err
    }
}

/// Why the credentials configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A secret's environment variable is unset or too short.
    #[error("{0}")]
    Secret(String),
    /// A key file cannot be read or parsed.
    #[error("{0}")]
    KeyFile(String),
    /// The JWKS URL cannot be used (its HTTP client cannot be built).
    #[error("{0}")]
    Jwks(String),
}

/// What a request offers as credentials.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The request's headers (`Authorization`, `Origin`, `X-Spillway-User`).
    pub headers: &'a HeaderMap,
    /// `?access_token=` (WebSocket upgrades and `EventSource`).
    pub query_token: Option<&'a str>,
    /// `?user=` (development mode only).
    pub query_user: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    /// Credentials from headers alone.
    pub fn headers(headers: &'a HeaderMap) -> Self {
        Self {
            headers,
            query_token: None,
            query_user: None,
        }
    }

    fn bearer(&self) -> Option<&'a str> {
        let header = self
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match header {
            Some(value) => {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            }
            None => self.query_token,
        }
    }

    fn has_authorization(&self) -> bool {
        self.headers.contains_key(http::header::AUTHORIZATION) || self.query_token.is_some()
    }

    fn origin(&self) -> Option<&'a str> {
        self.headers
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
    }

    /// Whether the request comes from a page of the gateway's own origin
    /// (the `/embed` page): `Sec-Fetch-Site: same-origin`, or an `Origin`
    /// naming the `Host` it is sent to.
    /// The scheme is not compared: behind a TLS proxy the page is https
    /// while the gateway speaks http.
    fn same_origin(&self) -> bool {
        // Browsers send no `Origin` on same-origin GETs, but they do send
        // `Sec-Fetch-Site`, which no page can set.
        let fetch_site = self
            .headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok());
        if fetch_site == Some("same-origin") {
            return true;
        }
        let host = self
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok());
        let authority = self
            .origin()
            .and_then(|o| o.split_once("://"))
            .map(|(_, authority)| authority);
        matches!((host, authority), (Some(h), Some(a)) if !h.is_empty() && h.eq_ignore_ascii_case(a))
    }

    /// Whether these credentials come from a page that may use `widget`:
    /// one of its origins, or the gateway's own embed page.
    fn widget_page(&self, widget: &WidgetConfig) -> bool {
        origin_allowed(widget, self.origin()) || self.same_origin()
    }
}

/// A verification key for user JWTs.
struct Verifier {
    /// The `kid` a token names to pick this key; `None` for PEM files (any
    /// token of the algorithm may try it).
    kid: Option<String>,
    /// RS256 or ES256.
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The authentication service.
pub struct Auth {
    config: AuthConfig,
    store: Option<Arc<dyn Store>>,
    hs256: Option<DecodingKey>,
    /// Keys from `public_key_files` and `jwks_file`, fixed at start.
    verifiers: Vec<Verifier>,
    /// Keys from `jwks_url`, fetched and cached.
    jwks: Option<Arc<jwks::KeyCache>>,
    /// Signs and verifies visitor tokens.
    visitor: Option<(EncodingKey, DecodingKey)>,
    widgets: HashMap<String, WidgetConfig>,
    /// Revoked `jti`s, reloaded from the store every `recheck_secs`.
    revoked: RwLock<HashSet<String>>,
    /// Verified API keys and when they were checked (Unix ms).
    keys: Mutex<HashMap<String, (ApiKeyRow, u64)>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("Auth")
            .field("enabled", &self.config.enabled)
            .field("hs256", &self.hs256.is_some())
            .field("verifiers", &self.verifiers.len())
            .field("jwks", &self.jwks)
            .field("visitors", &self.visitor.is_some())
            .field("widgets", &self.widgets.len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> u64 {
    crate::cluster::now_ms() / 1000
}

impl Auth {
    /// The service `config` describes, reading secrets from the
    /// environment and keys from their files.
    pub fn new(config: &Config, store: Option<Arc<dyn Store>>) -> Result<Self, SetupError> {
        let auth = &config.auth;
        let secret = |var: &str| -> Result<Option<Vec<u8>>, SetupError> {
            if var.is_empty() {
                return Ok(None);
            }
            match std::env::var(var) {
                Ok(value) if value.len() >= 32 => Ok(Some(value.into_bytes())),
                Ok(_) => Err(SetupError::Secret(format!(
                    "{var} must hold at least 32 bytes"
                ))),
                Err(_) => Ok(None),
            }
        };
        let hs256 = match secret(&auth.jwt.hs256_secret_env)? {
            Some(bytes) => Some(DecodingKey::from_secret(&bytes)),
            None if auth.enabled && !auth.jwt.hs256_secret_env.is_empty() => {
                return Err(SetupError::Secret(format!(
                    "auth.jwt.hs256_secret_env names {}, which is not set",
                    auth.jwt.hs256_secret_env
                )));
            }
            None => None,
        };
        let mut visitor_secret = secret(&auth.visitors.secret_env)?;
        if visitor_secret.is_none() && !auth.enabled {
            // Development mode: the demo widget needs visitor tokens, and a
            // newcomer has set no secret. One for this process only.
            let mut bytes = vec![0u8; 32];
            getrandom::fill(&mut bytes).map_err(|err| {
                SetupError::Secret(format!("no randomness for a visitor secret: {err}"))
            })?;
            tracing::warn!(
                "{} is not set: visitor tokens are signed with a secret made for this process (they do not survive a restart or work on other instances)",
                auth.visitors.secret_env
            );
            visitor_secret = Some(bytes);
        }
        let visitor = visitor_secret.map(|bytes| {
            (
                EncodingKey::from_secret(&bytes),
                DecodingKey::from_secret(&bytes),
            )
        });
        if auth.enabled && !auth.widgets.is_empty() && visitor.is_none() {
            return Err(SetupError::Secret(format!(
                "widgets are configured but {} (auth.visitors.secret_env) is not set",
                auth.visitors.secret_env
            )));
        }
        let mut verifiers = Vec::new();
        for path in &auth.jwt.public_key_files {
            let pem =
                std::fs::read(path).map_err(|err| SetupError::KeyFile(format!("{path}: {err}")))?;
            let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                return Err(SetupError::KeyFile(format!(
                    "{path}: not an RSA or EC public key in PEM"
                )));
            };
            verifiers.push(Verifier {
                kid: None,
                algorithm,
                key,
            });
        }
        if !auth.jwt.jwks_file.is_empty() {
            let path = &auth.jwt.jwks_file;
            let text =
                std::fs::read(path).map_err(|err| SetupError::KeyFile(format!("{path}: {err}")))?;
            let keys = jwks::verifiers(&text)
                .map_err(|err| SetupError::KeyFile(format!("{path}: {err}")))?;
            if keys.is_empty() {
                return Err(SetupError::KeyFile(format!(
                    "{path}: no RS256 or ES256 signature key in the set"
                )));
            }
            verifiers.extend(keys);
        }
        // Development mode checks no token: nothing to fetch.
        let jwks = if auth.enabled {
            jwks::KeyCache::new(&auth.jwt)?.map(Arc::new)
        } else {
            None
        };
        Ok(Self {
            config: auth.clone(),
            store,
            hs256,
            verifiers,
            jwks,
            visitor,
            widgets: widgets(auth),
            revoked: RwLock::new(HashSet::new()),
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// Whether credentials are required.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The configuration.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Loads the revocation list (and fetches the JWKS URL's keys) now, and
    /// keeps reloading it every `auth.recheck_secs` (and the keys when they
    /// are due). A JWKS that cannot be fetched is logged, not fatal.
    pub async fn start(self: &Arc<Self>) {
        self.reload_revoked().await;
        if let Some(jwks) = &self.jwks {
            jwks.start().await;
        }
        let me = Arc::downgrade(self);
        let every = Duration::from_secs(self.config.recheck_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(auth) = me.upgrade() else { return };
                auth.reload_revoked().await;
            }
        });
    }

    async fn reload_revoked(&self) {
        let Some(store) = &self.store else { return };
        match store.revoked_tokens().await {
            Ok(list) => {
                *self.revoked.write().unwrap_or_else(PoisonError::into_inner) =
                    list.into_iter().collect();
            }
            Err(err) => tracing::warn!(%err, "could not reload the token revocation list"),
        }
    }

    /// Marks `jti` revoked here at once (the store has it for the others).
    pub fn note_revoked(&self, jti: &str) {
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jti.to_owned());
    }

    /// Who `credentials` prove the caller to be.
    pub async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Principal, AuthError> {
        if !self.config.enabled {
            // A widget visitor's token is honoured in development mode too,
            // so the widget works the same way in both modes.
            if let Some(token) = credentials.bearer()
                && jsonwebtoken::decode_header(token)
                    .is_ok_and(|h| h.kid.as_deref() == Some(VISITOR_KID))
            {
                let principal = self.visitor_token(token, credentials)?;
                self.check_revoked(&principal)?;
                return Ok(principal);
            }
            return self.dev(credentials);
        }
        let token = credentials
            .bearer()
            .ok_or(if credentials.has_authorization() {
                AuthError::Malformed
            } else {
                AuthError::Missing
            })?;
        if token.is_empty() || token.len() > 8 * 1024 {
            return Err(AuthError::Malformed);
        }
        if let Some(rest) = token.strip_prefix(KEY_PREFIX) {
            return self.api_key(rest, credentials).await;
        }
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let principal = if header.kid.as_deref() == Some(VISITOR_KID) {
            self.visitor_token(token, credentials)?
        } else {
            self.user_token(token, &header).await?
        };
        self.check_revoked(&principal)?;
        Ok(principal)
    }

    /// Re-checks a live connection's principal: not expired, not revoked
    /// (API keys: not revoked since).
    pub async fn still_valid(&self, principal: &Principal) -> Result<(), AuthError> {
        if !self.config.enabled {
            return Ok(());
        }
        if let Some(expires_at) = principal.expires_at
            && now_secs() > expires_at + self.config.leeway_secs
        {
            return Err(AuthError::Expired);
        }
        self.check_revoked(principal)?;
        if let Kind::ApiKey(id) = &principal.kind {
            lock(&self.keys).remove(id);
            let row = self.load_key(id).await?;
            if row.revoked_at.is_some() {
                return Err(AuthError::InvalidKey);
            }
        }
        Ok(())
    }

    fn check_revoked(&self, principal: &Principal) -> Result<(), AuthError> {
        if let Some(jti) = &principal.jti
            && self
                .revoked
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(jti)
        {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }

    fn dev(&self, credentials: &Credentials<'_>) -> Result<Principal, AuthError> {
        let owner = crate::http::dev_owner(credentials.headers)
            .or_else(|| credentials.query_user.and_then(crate::http::owner_named))
            .ok_or(AuthError::Missing)?;
        Ok(Principal {
            tenant: owner.tenant_id,
            user: owner.user_id,
            tier: self.config.default_tier.clone(),
            scopes: vec!["chat".into(), "admin".into()],
            kind: Kind::Dev,
            expires_at: None,
            jti: None,
        })
    }

    async fn load_key(&self, id: &str) -> Result<ApiKeyRow, AuthError> {
        let now = crate::cluster::now_ms();
        let ttl = self.config.key_cache_secs * 1000;
        if let Some((row, at)) = lock(&self.keys).get(id)
            && now.saturating_sub(*at) < ttl
        {
            return Ok(row.clone());
        }
        let store = self.store.as_ref().ok_or(AuthError::InvalidKey)?;
        let row = match store.get_api_key(id).await {
            Ok(Some(row)) => row,
            Ok(None) => return Err(AuthError::InvalidKey),
            Err(err) => {
                tracing::warn!(%err, "key store unavailable");
                return Err(AuthError::Unavailable);
            }
        };
        let mut keys = lock(&self.keys);
        if keys.len() >= KEY_CACHE {
            keys.clear();
        }
        keys.insert(id.to_owned(), (row.clone(), now));
        Ok(row)
    }

    async fn api_key(
        &self,
        rest: &str,
        credentials: &Credentials<'_>,
    ) -> Result<Principal, AuthError> {
        let (id, secret) = rest.split_once('_').ok_or(AuthError::InvalidKey)?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() != 64 {
            return Err(AuthError::InvalidKey);
        }
        let row = self.load_key(id).await?;
        if row.revoked_at.is_some() || !constant_time_eq(&row.secret_hash, &hash(secret)) {
            return Err(AuthError::InvalidKey);
        }
        // The backend holding the key names the user it acts for.
        let user = match crate::http::dev_owner(credentials.headers) {
            Some(owner) => owner.user_id,
            None => format!("key:{id}"),
        };
        Ok(Principal {
            tenant: row.tenant_id,
            user,
            tier: if row.tier.is_empty() {
                self.config.default_tier.clone()
            } else {
                row.tier
            },
            scopes: row.scopes.split_whitespace().map(str::to_owned).collect(),
            kind: Kind::ApiKey(id.to_owned()),
            expires_at: None,
            jti: None,
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if !self.config.jwt.audience.is_empty() {
            required.push("aud");
        }
        if !self.config.jwt.issuer.is_empty() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        if self.config.jwt.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.config.jwt.audience]);
        }
        if !self.config.jwt.issuer.is_empty() {
            validation.set_issuer(&[&self.config.jwt.issuer]);
        }
        validation
    }

    async fn user_token(&self, token: &str, header: &Header) -> Result<Principal, AuthError> {
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self.hs256.as_ref().ok_or(AuthError::BadSignature)?;
                jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                    token,
                    key,
                    &self.validation(header.alg),
                )
                .map_err(|err| classify(&err))?
                .claims
            }
            Algorithm::RS256 | Algorithm::ES256 => self.public_key_claims(token, header).await?,
            _ => return Err(AuthError::BadSignature),
        };
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let user = text(&self.config.jwt.user_claim).ok_or(AuthError::Malformed)?;
        if user.len() > 128 || !user.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Malformed);
        }
        Ok(Principal {
            tenant: text(&self.config.jwt.tenant_claim)
                .unwrap_or_else(|| self.config.default_tenant.clone()),
            user,
            tier: text(&self.config.jwt.tier_claim)
                .unwrap_or_else(|| self.config.default_tier.clone()),
            scopes: vec!["chat".into()],
            kind: Kind::User,
            expires_at: claims.get("exp").and_then(seconds),
            jti: text("jti"),
        })
    }

    /// The claims of an RS256 / ES256 token, verified with the key its
    /// `kid` names, or (no `kid`, or only PEM keys) with each key of its
    /// algorithm in turn. A `kid` no key has makes the JWKS URL's keys be
    /// fetched again (at most once per `jwks_refetch_secs`). While the
    /// URL's keys have never been fetched, a token no other key verifies is
    /// [`AuthError::Unavailable`]: it may well be valid.
    async fn public_key_claims(
        &self,
        token: &str,
        header: &Header,
    ) -> Result<serde_json::Map<String, Value>, AuthError> {
        let fetched = match &self.jwks {
            None => None,
            Some(jwks) => {
                let mut keys = jwks.current();
                let known = |keys: &Option<jwks::KeySet>| match header.kid.as_deref() {
                    Some(kid) => self
                        .verifiers
                        .iter()
                        .chain(keys.iter().flat_map(|keys| keys.iter()))
                        .any(|v| v.kid.as_deref() == Some(kid)),
                    None => keys.is_some(),
                };
                if !known(&keys) {
                    keys = jwks.refetch_for_unknown().await;
                }
                Some(keys)
            }
        };
        let url_keys = fetched.iter().flatten().flat_map(|keys| keys.iter());
        let of_alg: Vec<&Verifier> = self
            .verifiers
            .iter()
            .chain(url_keys)
            .filter(|v| v.algorithm == header.alg)
            .collect();
        // The key the token names; else the keys that name none.
        let named: Vec<&Verifier> = match header.kid.as_deref() {
            Some(kid) => of_alg
                .iter()
                .copied()
                .filter(|v| v.kid.as_deref() == Some(kid))
                .collect(),
            None => Vec::new(),
        };
        let candidates = if named.is_empty() {
            of_alg
                .into_iter()
                .filter(|v| header.kid.is_none() || v.kid.is_none())
                .collect()
        } else {
            named
        };
        let validation = self.validation(header.alg);
        for verifier in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &verifier.key,
                &validation,
            ) {
                Ok(data) => return Ok(data.claims),
                // Another key may verify it.
                Err(err) if classify(&err) == AuthError::BadSignature => {}
                // The signature verified; the claims did not.
                Err(err) => return Err(classify(&err)),
            }
        }
        if matches!(fetched, Some(None)) {
            return Err(AuthError::Unavailable);
        }
        Err(AuthError::BadSignature)
    }

    fn visitor_token(
        &self,
        token: &str,
        credentials: &Credentials<'_>,
    ) -> Result<Principal, AuthError> {
        let (_, key) = self.visitor.as_ref().ok_or(AuthError::BadSignature)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_issuer(&[VISITOR_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation)
            .map_err(|err| classify(&err))?;
        let claims = data.claims;
        let widget_key = claims
            .get("wid")
            .and_then(Value::as_str)
            .ok_or(AuthError::Malformed)?;
        let widget = self
            .widgets
            .get(widget_key)
            .ok_or(AuthError::UnknownWidget)?;
        if !credentials.widget_page(widget) {
            return Err(AuthError::OriginNotAllowed);
        }
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(AuthError::Malformed)?
            .to_owned();
        Ok(Principal {
            tenant: widget.tenant.clone(),
            user,
            tier: self.widget_tier(widget),
            scopes: vec!["chat".into()],
            kind: Kind::Visitor(widget.key.clone()),
            expires_at: claims.get("exp").and_then(seconds),
            jti: claims.get("jti").and_then(Value::as_str).map(str::to_owned),
        })
    }

    fn widget_tier(&self, widget: &WidgetConfig) -> String {
        if widget.tier.is_empty() {
            self.config.default_tier.clone()
        } else {
            widget.tier.clone()
        }
    }

    /// A visitor token for widget `key`, asked for from `credentials`'
    /// origin; a visitor presenting a valid token of the same widget keeps
    /// its identity. Returns the token and the visitor.
    pub fn issue_visitor(
        &self,
        key: &str,
        credentials: &Credentials<'_>,
    ) -> Result<(String, Principal), AuthError> {
        let widget = self.widgets.get(key).ok_or(AuthError::UnknownWidget)?;
        if !credentials.widget_page(widget) {
            return Err(AuthError::OriginNotAllowed);
        }
        let (encoding, _) = self.visitor.as_ref().ok_or(AuthError::UnknownWidget)?;
        let previous = credentials
            .bearer()
            .and_then(|token| self.visitor_token(token, credentials).ok())
            .filter(|p| self.check_revoked(p).is_ok())
            .filter(|p| p.kind == Kind::Visitor(widget.key.clone()));
        let user = previous.map_or_else(
            || format!("visitor:{}", uuid::Uuid::new_v4().simple()),
            |p| p.user,
        );
        let now = now_secs();
        let expires_at = now + self.config.visitors.ttl_secs;
        let claims = serde_json::json!({
            "iss": VISITOR_ISSUER,
            "sub": user,
            "wid": widget.key,
            "iat": now,
            "exp": expires_at,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(VISITOR_KID.to_owned());
        let token =
            jsonwebtoken::encode(&header, &claims, encoding).map_err(|_| AuthError::Malformed)?;
        let principal = Principal {
            tenant: widget.tenant.clone(),
            user,
            tier: self.widget_tier(widget),
            scopes: vec!["chat".into()],
            kind: Kind::Visitor(widget.key.clone()),
            expires_at: Some(expires_at),
            jti: claims["jti"].as_str().map(str::to_owned),
        };
        Ok((token, principal))
    }

    /// Whether a browser page at `origin` may call with `principal`'s
    /// credentials (CORS): a widget's origins for its visitors; any origin
    /// for other credentials (they are not for browsers on other sites, and
    /// a bearer token is not sent by a browser on its own).
    pub fn cors_origin_allowed(&self, origin: &str) -> bool {
        self.widgets
            .values()
            .any(|widget| origin_allowed(widget, Some(origin)))
    }

    /// The origins allowed to frame widget `key` (for `frame-ancestors`).
    pub fn widget_origins(&self, key: &str) -> Option<&[String]> {
        self.widgets.get(key).map(|w| w.origins.as_slice())
    }

    /// Drops API key `id` from this instance's verified-key cache, so the
    /// next request with it reads the store (the admin API calls this
    /// right after revoking the key: revocation takes effect here at once,
    /// on other instances within `auth.key_cache_secs`).
    pub fn forget_api_key(&self, id: &str) {
        lock(&self.keys).remove(id);
    }
}

/// The public key of the widget development mode always has (any origin,
/// tenant `default`), so the demo page works with no configuration.
pub const DEMO_WIDGET_KEY: &str = "pk_demo";

/// The configured widgets by key, plus the demo widget in development mode.
fn widgets(auth: &AuthConfig) -> HashMap<String, WidgetConfig> {
    let mut widgets: HashMap<String, WidgetConfig> = auth
        .widgets
        .iter()
        .map(|w| (w.key.clone(), w.clone()))
        .collect();
    if !auth.enabled {
        widgets
            .entry(DEMO_WIDGET_KEY.to_owned())
            .or_insert_with(|| WidgetConfig {
                key: DEMO_WIDGET_KEY.to_owned(),
                origins: vec!["*".to_owned()],
                ..WidgetConfig::default()
            });
    }
    widgets
}

/// Whether `origin` may use `widget`: listed, or the widget allows `*`. A
/// request without an `Origin` (not from a browser page) is refused unless
/// the widget allows any origin.
fn origin_allowed(widget: &WidgetConfig, origin: Option<&str>) -> bool {
    if widget.origins.iter().any(|o| o == "*") {
        return true;
    }
    origin.is_some_and(|origin| {
        widget
            .origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    })
}

/// A NumericDate claim (RFC 7519 allows fractions) in whole seconds.
fn seconds(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn classify(err: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match err.kind() {
        K::ExpiredSignature => AuthError::Expired,
        K::MissingRequiredClaim(claim) if claim == "aud" => AuthError::WrongAudience,
        K::MissingRequiredClaim(claim) if claim == "iss" => AuthError::WrongIssuer,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidAudience => AuthError::WrongAudience,
        K::InvalidIssuer => AuthError::WrongIssuer,
        K::InvalidSignature
        | K::InvalidAlgorithm
        | K::InvalidAlgorithmName
        | K::InvalidKeyFormat => AuthError::BadSignature,
        _ => AuthError::Malformed,
    }
}

/// SHA-256 of an API key's secret part, hex.
pub fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut out, b| {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(buf
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut out, b| {
            use std::fmt::Write as _;
            let _ = write!(out, "{b:02x}");
            out
        }))
}

/// A new API key for `tenant`: the whole key (shown once) and its stored
/// row (the secret's hash only).
pub fn new_key(
    tenant: &str,
    name: &str,
    scopes: &[String],
    tier: &str,
) -> Result<(String, ApiKeyRow), getrandom::Error> {
    let id = random_hex(8)?;
    let secret = random_hex(32)?;
    let key = format!("{KEY_PREFIX}{id}_{secret}");
    let row = ApiKeyRow {
        id,
        tenant_id: tenant.to_owned(),
        name: name.to_owned(),
        secret_hash: hash(&secret),
        scopes: scopes.join(" "),
        tier: tier.to_owned(),
        created_at: crate::store::now_ms(),
        revoked_at: None,
    };
    Ok((key, row))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_stored_hashed() {
        let (key, row) = new_key("acme", "ci", &["chat".into()], "").unwrap();
        let (other, _) = new_key("acme", "ci", &["chat".into()], "").unwrap();
        assert_ne!(key, other);
        let rest = key.strip_prefix(KEY_PREFIX).unwrap();
        let (id, secret) = rest.split_once('_').unwrap();
        assert_eq!(id, row.id);
        assert_eq!(secret.len(), 64);
        assert!(!row.secret_hash.contains(secret));
        assert_eq!(row.secret_hash, hash(secret));
        assert!(constant_time_eq(&row.secret_hash, &hash(secret)));
        assert!(!constant_time_eq(&row.secret_hash, &hash("x")));
    }

    #[test]
    fn origins_match_exactly_or_by_wildcard() {
        let widget = WidgetConfig {
            key: "pk_test_1".into(),
            origins: vec!["https://a.example".into()],
            ..WidgetConfig::default()
        };
        assert!(origin_allowed(&widget, Some("https://a.example")));
        assert!(!origin_allowed(&widget, Some("https://a.example.evil")));
        assert!(!origin_allowed(&widget, Some("http://a.example")));
        assert!(!origin_allowed(&widget, None));
        let any = WidgetConfig {
            origins: vec!["*".into()],
            ..widget
        };
        assert!(origin_allowed(&any, None));
    }
}

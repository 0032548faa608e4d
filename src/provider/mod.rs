//! Provider adapters: one per upstream wire format, all producing the same
//! normalized [`ProviderEvent`]s.
//!
//! - [`openai`]: OpenAI chat completions, which also covers vLLM, Ollama's
//!   `/v1`, Groq, OpenRouter and every other OpenAI-compatible server;
//! - [`anthropic`]: the Anthropic Messages API;
//! - [`gemini`]: Google Gemini `streamGenerateContent` (Developer API and
//!   Vertex AI);
//! - [`mock`]: the built-in demo / load-test provider (no network);
//! - [`sse`]: upstream Server-Sent Events decoding (WHATWG semantics over
//!   `sse-stream`, with our own cap on event size).
//!
//! An adapter never imports a transport: it receives a [`ChatRequest`] and
//! returns a stream of events. Everything HTTP-edge-shaped lives in `http/`.

pub mod anthropic;
pub mod gemini;
pub mod mock;
pub mod openai;
pub mod request;
pub mod retry_after;
pub mod sse;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::config::{ProviderConfig, ProviderKind, UpstreamConfig};
pub use request::{ChatRequest, Message};
use sse::{SseDecoder, SseError, SseEvent};

/// One normalized event of an upstream reply.
///
/// Adapters translate their provider's wire events into these; the
/// generation log stores them; transports translate them back into their own
/// wire format. Text-like deltas are separate variants so coalescing can
/// merge consecutive ones of the same kind.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// A piece of the answer's visible text.
    Text(String),
    /// A piece of the model's reasoning ("thinking"), where the provider
    /// streams it. Relayed as `reasoning_content` on the OpenAI surface.
    Reasoning(String),
    /// A piece of a refusal message (OpenAI structured outputs).
    Refusal(String),
    /// A fragment of a tool call. The first fragment of a call carries its
    /// `id` and `name`; later ones carry only argument text. `index` is the
    /// call's position among the reply's tool calls, starting at 0.
    ToolCall(ToolCallDelta),
    /// Token usage as reported by the provider.
    Usage(Usage),
    /// The model finished; usage may still follow.
    Finish(FinishReason),
    /// Not from a provider: the gateway's marker that the reply restarts
    /// from scratch on another target, so readers discard what came before.
    /// Only transports that can tell their clients (the native protocol's
    /// `restart`) ever get one.
    Restart,
}

/// A fragment of one tool call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCallDelta {
    /// Position of the call among the reply's tool calls.
    pub index: u32,
    /// The call id, on the call's first fragment only.
    pub id: Option<String>,
    /// The function name, on the call's first fragment only.
    pub name: Option<String>,
    /// A piece of the JSON arguments text.
    pub arguments: String,
}

/// Token usage of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens of the prompt (Anthropic: input tokens, including cache reads
    /// and writes, so the figure is comparable with OpenAI's).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache, where reported.
    pub cached_prompt_tokens: Option<u64>,
}

impl Usage {
    /// Prompt plus completion.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Why the model stopped, in OpenAI's vocabulary (the common denominator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// Natural end of the answer or a stop sequence.
    Stop,
    /// The token limit was reached.
    Length,
    /// The model wants tool results.
    ToolCalls,
    /// The provider filtered or refused the content.
    ContentFilter,
    /// A reason we do not map, passed through verbatim.
    Other(String),
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::Other(reason) => reason,
        }
    }

    /// Parses an OpenAI `finish_reason`.
    pub fn from_openai(reason: &str) -> Self {
        match reason {
            "stop" => Self::Stop,
            "length" => Self::Length,
            "tool_calls" | "function_call" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// What kind of failure an upstream error is. Routing (retry, fail-over,
/// breakers) and the HTTP edge (status codes) branch on this, never on text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The connection could not be made, or was reset before a response.
    Connect,
    /// A connect, read or first-token timeout.
    Timeout,
    /// HTTP 429 or a provider "rate limit" error.
    RateLimited,
    /// HTTP 5xx, 529 or a provider "overloaded" / "server" error.
    Unavailable,
    /// The provider rejected our key (401/403): an operator problem.
    Auth,
    /// The request is invalid for this provider (4xx other than the above).
    InvalidRequest,
    /// The prompt does not fit the model's context window.
    ContextLength,
    /// The provider refused on content-policy grounds.
    ContentPolicy,
    /// The upstream broke its protocol: malformed SSE or JSON, an event over
    /// the size cap, a stream that ended without finishing.
    Protocol,
    /// The reply outgrew the gateway's bound on a reply's size.
    ReplyTooLarge,
    /// Not from a provider: the instance producing the reply stopped
    /// (crashed or was killed) before it ended; what it produced is in the
    /// conversation's history as far as it was stored.
    Interrupted,
    /// Not from a provider: a reply followed from another instance cannot
    /// be continued without a gap (its log expired or lost entries); the
    /// client must reload the conversation from history.
    Gap,
}

impl ErrorClass {
    /// A stable snake_case code, used in error bodies and logs.
    pub fn code(self) -> &'static str {
        match self {
            Self::Connect => "upstream_unreachable",
            Self::Timeout => "upstream_timeout",
            Self::RateLimited => "upstream_rate_limited",
            Self::Unavailable => "upstream_unavailable",
            Self::Auth => "upstream_auth_failed",
            Self::InvalidRequest => "upstream_invalid_request",
            Self::ContextLength => "context_length_exceeded",
            Self::ContentPolicy => "content_policy_violation",
            Self::Protocol => "upstream_protocol_error",
            Self::ReplyTooLarge => "reply_too_large",
            Self::Interrupted => "interrupted",
            Self::Gap => "reload_from_history",
        }
    }

    /// Whether trying again (later, or elsewhere) can fix it.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Timeout | Self::RateLimited | Self::Unavailable | Self::Protocol
        )
    }

    /// Every class, for decoding a code.
    pub const ALL: [Self; 12] = [
        Self::Connect,
        Self::Timeout,
        Self::RateLimited,
        Self::Unavailable,
        Self::Auth,
        Self::InvalidRequest,
        Self::ContextLength,
        Self::ContentPolicy,
        Self::Protocol,
        Self::ReplyTooLarge,
        Self::Interrupted,
        Self::Gap,
    ];

    /// The class whose [`code`](Self::code) is `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.code() == code)
    }

    /// Classifies an upstream HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Auth,
            408 => Self::Timeout,
            413 => Self::ContextLength,
            429 => Self::RateLimited,
            400..=499 => Self::InvalidRequest,
            _ => Self::Unavailable,
        }
    }
}

/// An upstream failure, classified.
///
/// `message` is the provider's own reason where it gave one (it is passed to
/// the client, so a context-length rejection says what the provider said); it
/// never contains our request or credentials. Logs carry `class` and
/// `status` only, since provider messages may quote the prompt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", class.code())]
pub struct ProviderError {
    /// What kind of failure this is.
    pub class: ErrorClass,
    /// Human-readable reason, from the provider where possible.
    pub message: String,
    /// The upstream HTTP status, when the failure was an HTTP response.
    pub status: Option<u16>,
    /// How long the provider asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// An error of `class` with `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// A protocol violation by the upstream.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Protocol, message)
    }

    /// Classifies a transport error from reqwest. The message names the
    /// failure kind, never the URL's credentials (we put none in URLs).
    pub fn from_transport(provider: &str, err: &reqwest::Error) -> Self {
        // Anything else (a reset before headers, a broken body) is a
        // connection failure as far as routing is concerned.
        let class = if err.is_timeout() {
            ErrorClass::Timeout
        } else {
            ErrorClass::Connect
        };
        let what = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not be reached"
        } else if err.is_body() || err.is_decode() {
            "broke the connection mid-response"
        } else {
            "failed"
        };
        Self::new(class, format!("provider '{provider}' {what}"))
    }
}

/// The events of one upstream reply, in order. A stream that ends without an
/// error has delivered a [`ProviderEvent::Finish`]; adapters guarantee it.
pub type EventStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;

/// An upstream that can answer chat requests. Implemented once per wire
/// format; the router holds them as `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + fmt::Debug {
    /// The configured provider name (what `[[models]]` targets reference).
    fn name(&self) -> &str;

    /// Sends `request` upstream. Resolves once the upstream has accepted the
    /// request (HTTP 2xx with headers) or failed before any event; the
    /// returned stream then yields the reply. Dropping the stream closes the
    /// upstream connection, which is how a cancelled generation stops
    /// billing.
    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>>;
}

/// Builds the provider named by `config`. `upstream` holds the HTTP
/// settings shared by all network providers.
pub fn build(
    config: &ProviderConfig,
    upstream: &UpstreamConfig,
) -> Result<Arc<dyn Provider>, BuildError> {
    let provider: Arc<dyn Provider> = match config.kind {
        ProviderKind::Mock => Arc::new(mock::MockProvider::new(config)),
        ProviderKind::Openai => Arc::new(openai::OpenAiProvider::new(config, upstream)?),
        ProviderKind::Anthropic => Arc::new(anthropic::AnthropicProvider::new(config, upstream)?),
        ProviderKind::Gemini => Arc::new(gemini::GeminiProvider::new(config, upstream)?),
    };
    Ok(provider)
}

/// Why a provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The API key's environment variable is not set.
    #[error("provider '{provider}': environment variable {var} (api_key_env) is not set")]
    MissingKey {
        /// The provider's name.
        provider: String,
        /// The environment variable that should hold the key.
        var: String,
    },
    /// The HTTP client could not be built.
    #[error("provider '{provider}': {source}")]
    Client {
        /// The provider's name.
        provider: String,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },
}

/// The API key of a provider. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Reads the key named by `config.api_key_env`, if any.
    pub fn from_config(config: &ProviderConfig) -> Result<Option<Self>, BuildError> {
        let Some(var) = &config.api_key_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(key) if !key.is_empty() => Ok(Some(Self(key))),
            _ => Err(BuildError::MissingKey {
                provider: config.name.clone(),
                var: var.clone(),
            }),
        }
    }

    /// The key itself, for the one header that carries it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The reqwest client every network provider uses: connect and per-read
/// timeouts, never a total timeout (a stream may legitimately run for
/// minutes), `TCP_NODELAY`, no proxy from the environment surprises.
pub(crate) fn http_client(
    config: &ProviderConfig,
    upstream: &UpstreamConfig,
) -> Result<reqwest::Client, BuildError> {
    let connect_timeout = config
        .connect_timeout_ms
        .map_or_else(|| upstream.connect_timeout(), Duration::from_millis);
    // reqwest is built without a default TLS crypto backend (to avoid
    // compiling aws-lc); ring's is installed once per process. An error
    // means one is installed already, which is what we want.
    static CRYPTO: std::sync::Once = std::sync::Once::new();
    CRYPTO.call_once(|| drop(rustls::crypto::ring::default_provider().install_default()));
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(upstream.read_timeout())
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("spillway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| BuildError::Client {
            provider: config.name.clone(),
            source,
        })
}

/// Sends an upstream request: resolves with a 2xx response (status and
/// headers read, body not yet), or the classified failure.
pub(crate) async fn send(
    provider: &str,
    call: reqwest::RequestBuilder,
    max_error_body_bytes: usize,
    classify_body: fn(&serde_json::Value, ErrorClass) -> Option<(ErrorClass, String)>,
) -> Result<reqwest::Response, ProviderError> {
    let response = call
        .send()
        .await
        .map_err(|err| ProviderError::from_transport(provider, &err))?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(error_from_response(provider, response, max_error_body_bytes, classify_body).await)
    }
}

/// Turns a non-2xx upstream response into a classified error, reading at
/// most `limit` bytes of its body for the provider's reason.
async fn error_from_response(
    provider: &str,
    response: reqwest::Response,
    limit: usize,
    classify_body: fn(&serde_json::Value, ErrorClass) -> Option<(ErrorClass, String)>,
) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = read_capped(response, limit).await;
    let status_class = ErrorClass::from_status(status);
    let parsed = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| classify_body(&value, status_class));
    let (class, message) = match parsed {
        Some((class, message)) => (class, message),
        None => (
            status_class,
            format!("provider '{provider}' answered HTTP {status}"),
        ),
    };
    ProviderError {
        class,
        message,
        status: Some(status),
        retry_after,
    }
}

/// Reads a response body up to `limit` bytes; the rest is discarded.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    body
}

/// The `Retry-After` of a response, in seconds or as an HTTP-date.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    retry_after::parse_retry_after(value, std::time::SystemTime::now())
}

/// Classifies a provider error by its textual `type`/`code`, falling back to
/// `fallback` (the HTTP status's class, or `Unavailable` in-band). Shared
/// by the OpenAI and Anthropic adapters.
pub(crate) fn class_from_error_type(kind: &str, fallback: ErrorClass) -> ErrorClass {
    let kind = kind.to_ascii_lowercase();
    if kind.contains("context_length") || kind.contains("context_window") {
        ErrorClass::ContextLength
    } else if kind.contains("content_policy") || kind.contains("content_filter") {
        ErrorClass::ContentPolicy
    } else if kind.contains("rate_limit") {
        ErrorClass::RateLimited
    } else if kind.contains("overloaded") || kind.contains("server_error") || kind == "api_error" {
        ErrorClass::Unavailable
    } else if kind.contains("authentication")
        || kind.contains("permission")
        || kind.contains("api_key")
    {
        ErrorClass::Auth
    } else {
        fallback
    }
}

/// The wire-format half of an adapter: turns dispatched upstream SSE events
/// into normalized events. [`event_stream`] drives it.
pub(crate) trait WireDecoder: Send + 'static {
    /// Decodes one upstream event (possibly into none or several).
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<ProviderEvent>, ProviderError>;
    /// The upstream body ended: the last events (formats without a
    /// terminator finish here), or an error if the reply was cut off.
    fn on_eof(&mut self) -> Result<Vec<ProviderEvent>, ProviderError>;
    /// Whether the decoder has seen the end of the reply; later events are
    /// not read (the stream ends there).
    fn is_over(&self) -> bool;
}

/// Drives `decoder` over `sse`, yielding its events and ending after the
/// first error, after the decoder says the reply is over, or at EOF.
pub(crate) fn event_stream<D: WireDecoder>(sse: SseDecoder, decoder: D) -> EventStream {
    futures_util::stream::unfold(Some((sse, decoder)), |state| async move {
        let (mut sse, mut decoder) = state?;
        loop {
            let decoded = match sse.next().await {
                Some(Ok(event)) => decoder.on_event(&event),
                Some(Err(err)) => Err(from_sse_error(err)),
                None => decoder.on_eof(),
            };
            match decoded {
                Ok(events) if events.is_empty() && !decoder.is_over() => continue,
                Ok(events) => {
                    let next = (!decoder.is_over()).then_some((sse, decoder));
                    let items = futures_util::stream::iter(events.into_iter().map(Ok));
                    return Some((items.left_stream(), next));
                }
                Err(err) => {
                    let items = futures_util::stream::iter([Err(err)]);
                    return Some((items.right_stream(), None));
                }
            }
        }
    })
    .flatten()
    .boxed()
}

/// Maps an SSE decoding failure to a provider error.
fn from_sse_error(err: SseError) -> ProviderError {
    match err {
        SseError::Body(source) => {
            let timed_out = source
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout);
            if timed_out {
                ProviderError::new(ErrorClass::Timeout, "upstream stalled mid-stream")
            } else {
                ProviderError::new(ErrorClass::Connect, "upstream connection broke mid-stream")
            }
        }
        other => ProviderError::protocol(other.to_string()),
    }
}

/// Which kinds of provider are network adapters (as opposed to the mock).
pub fn is_network(kind: ProviderKind) -> bool {
    !matches!(kind, ProviderKind::Mock)
}

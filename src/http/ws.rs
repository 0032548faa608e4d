//! `GET /v1/ws`: the native protocol over WebSocket (`spillway.v1`).
//!
//! One task per connection runs one `select!` loop, in priority order:
//! shutdown and lifetime; the client's frames; the connection's outbox
//! (acks, messages, presence, typing, reply announcements); the replies it
//! streams (each read through its own cursor); the ping timer. Every write
//! waits for the socket (with a write timeout), so a slow client holds back
//! only its own cursors: the gateway never buffers more than one frame for
//! it beyond the log itself, and the upstream and other clients are never
//! slowed. Close codes are in [`crate::protocol::close`] and
//! `docs/protocol.md`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;

use super::Gateway;
use crate::auth::{AuthError, Principal};
use crate::chat::{ConnectionId, Outbox, Popped};
use crate::generation::{Generation, Read};
use crate::protocol::{ClientFrame, SUBPROTOCOL, ServerFrame, close};
use crate::store::Owner;

/// How long a closing connection waits for its close frame to go out.
const CLOSE_WINDOW: Duration = Duration::from_secs(5);

/// The close reason of a drain.
const DRAINING: &str = "server draining: reconnect and resume";

/// Live connections and what each holds, for limits, metrics and tests.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<HashMap<ConnectionId, Arc<ConnectionStats>>>,
}

/// What one connection holds in the gateway, in bytes and frames, whose
/// it is, and the handle that closes it from outside.
#[derive(Debug)]
pub struct ConnectionStats {
    /// Whose connection it is: what an operator's disconnect matches on.
    pub owner: Owner,
    /// Cancelled to close the connection with
    /// [`close::CLOSED_BY_OPERATOR`] (the admin API's disconnect); its
    /// loop watches it right after shutdown.
    closed_by_operator: tokio_util::sync::CancellationToken,
    /// Its outbox (non-token events).
    outbox: Mutex<Option<Arc<Outbox>>>,
    /// The frame being written now (0 when none): what a blocked socket
    /// holds us to.
    pending_write_bytes: AtomicUsize,
    /// Frames written so far.
    pub frames_sent: AtomicU64,
}

impl ConnectionStats {
    /// Bytes the gateway holds for this connection beyond the shared logs:
    /// its queued events plus the frame being written.
    pub fn buffered_bytes(&self) -> usize {
        let outbox = self
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |o| o.bytes());
        outbox + self.pending_write_bytes.load(Ordering::Relaxed)
    }
}

impl Connections {
    fn register(&self, outbox: &Arc<Outbox>, owner: Owner) -> (ConnectionId, Arc<ConnectionStats>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let stats = Arc::new(ConnectionStats {
            owner,
            closed_by_operator: tokio_util::sync::CancellationToken::new(),
            outbox: Mutex::new(Some(Arc::clone(outbox))),
            pending_write_bytes: AtomicUsize::new(0),
            frames_sent: AtomicU64::new(0),
        });
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&stats));
        (id, stats)
    }

    fn unregister(&self, id: ConnectionId) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Live connections now.
    pub fn len(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection's stats.
    pub fn all(&self) -> Vec<(ConnectionId, Arc<ConnectionStats>)> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, stats)| (*id, Arc::clone(stats)))
            .collect()
    }

    /// Closes `owner`'s live connections on this instance with
    /// [`close::CLOSED_BY_OPERATOR`]; returns how many were told to (each
    /// closes on its own task right after). A connection already told is
    /// not counted again.
    pub fn close_owner(&self, owner: &Owner) -> usize {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut told = 0;
        for stats in live.values() {
            if stats.owner == *owner && !stats.closed_by_operator.is_cancelled() {
                stats.closed_by_operator.cancel();
                told += 1;
            }
        }
        told
    }
}

/// `?user=` (development mode, for clients that cannot set headers) and
/// `?session=` (the session to pick up again).
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    #[serde(default)]
    user: Option<String>,
    /// A bearer token (browsers cannot set headers on an upgrade).
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

/// `GET /v1/ws`
pub async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    headers: http::HeaderMap,
    Query(query): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let credentials = crate::auth::Credentials {
        headers: &headers,
        query_token: query.access_token.as_deref(),
        query_user: query.user.as_deref(),
    };
    let principal = gateway.auth.authenticate(&credentials).await.and_then(|p| {
        if p.has_scope("chat") {
            Ok(p)
        } else {
            Err(crate::auth::AuthError::Forbidden)
        }
    });
    // A new connection counts against the principal's rate of new
    // connections and takes a slot under the per-user and per-tenant caps.
    let admitted = match &principal {
        Ok(principal) => admit(&gateway, principal).await.map(Some),
        Err(_) => Ok(None),
    };
    let limit = gateway.config.chat.ws_max_message_bytes;
    let session = query.session;
    ws.protocols([SUBPROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        // Chat frames are small: keep per-connection buffers small too.
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| async move {
            match (principal, admitted) {
                (Ok(principal), Ok(permit)) => {
                    let request_id = headers
                        .get(super::REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let span = tracing::info_span!("ws", request_id = %request_id);
                    tracing::Instrument::instrument(
                        run(gateway, principal, headers, session, socket),
                        span,
                    )
                    .await;
                    drop(permit);
                }
                (Ok(_), Err(limited)) => {
                    let mut socket = socket;
                    let frame = ServerFrame::error(limited.code(), limited.to_string(), true);
                    drop(socket.send(Message::Text(frame.to_json().into())).await);
                    drop(
                        socket
                            .send(Message::Close(Some(CloseFrame {
                                code: close::TRY_AGAIN_LATER,
                                reason: Utf8Bytes::from_static(limited.code()),
                            })))
                            .await,
                    );
                }
                (Err(err), _) => {
                    let reason = if err == AuthError::Missing && !gateway.auth.enabled() {
                        "name the user (X-Spillway-User or ?user=)"
                    } else {
                        err.code()
                    };
                    let mut socket = socket;
                    drop(
                        socket
                            .send(Message::Close(Some(CloseFrame {
                                code: err.close_code(),
                                reason: Utf8Bytes::from_static(reason),
                            })))
                            .await,
                    );
                }
            }
        })
}

/// Why the loop ends.
enum End {
    /// The client went away (or closed).
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
}

/// One connection's state.
struct Connection {
    gateway: Arc<Gateway>,
    owner: Owner,
    /// Who the credential says this is, and until when.
    principal: Principal,
    /// The upgrade request's headers, without its credential.
    headers: http::HeaderMap,
    id: ConnectionId,
    outbox: Arc<Outbox>,
    stats: Arc<ConnectionStats>,
    /// The replies being streamed, each through its own cursor.
    streams: SelectAll<BoxStream<'static, (Arc<Generation>, Read)>>,
    /// Generations already streamed here (a second `reply` or `resume` for
    /// one of them is ignored).
    streaming: HashSet<uuid::Uuid>,
    /// Finish reasons seen, per generation, for their `done` frame.
    finish: HashMap<uuid::Uuid, String>,
}

async fn run(
    gateway: Arc<Gateway>,
    principal: Principal,
    mut headers: http::HeaderMap,
    session: Option<String>,
    socket: WebSocket,
) {
    // Kept for in-band token refreshes (the `Origin` a visitor token is
    // checked against); the credential itself is not kept.
    headers.remove(http::header::AUTHORIZATION);
    let owner = principal.owner();
    let chat = &gateway.chat;
    let _counted = crate::metrics::get().connection("ws");
    let outbox = Arc::new(Outbox::new(chat.config().outbox_capacity));
    let (id, stats) = gateway.connections.register(&outbox, owner.clone());
    let config = chat.config().clone();
    let (mut sink, mut incoming) = socket.split();
    let mut connection = Connection {
        gateway: Arc::clone(&gateway),
        owner,
        principal,
        headers,
        id,
        outbox: Arc::clone(&outbox),
        stats,
        streams: SelectAll::new(),
        streaming: HashSet::new(),
        finish: HashMap::new(),
    };
    tracing::debug!(connection = id, "websocket connected");
    let (session, restored) = chat
        .open_session(id, &connection.owner, session.as_deref())
        .await;
    outbox.push(ServerFrame::Hello {
        connection_id: id.to_string(),
        session_id: session.id.clone(),
        restored,
        node: gateway.bus.node().to_owned(),
        user_id: connection.owner.user_id.clone(),
        heartbeat_ms: config.ping_interval_secs * 1000,
    });
    if restored {
        // Subscribe again to what the session had (each answers with its
        // snapshot); a conversation gone since is dropped from it.
        for conversation_id in &session.conversations {
            if let Err(err) = chat
                .subscribe(id, &connection.owner, &outbox, conversation_id)
                .await
            {
                chat.note_session(id, conversation_id, false);
                outbox.push(err.frame(None));
            }
        }
    }
    let write_timeout = Duration::from_millis(config.write_timeout_ms);
    let pong_timeout = Duration::from_secs(config.pong_timeout_secs);
    let mut ping = tokio::time::interval(Duration::from_secs(config.ping_interval_secs));
    ping.tick().await;
    // When the oldest unanswered ping must have its pong by: the
    // connection closes at that instant, not at the next tick.
    let mut pong_due: Option<Instant> = None;
    let lifetime = async {
        if config.max_connection_secs == 0 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_secs(config.max_connection_secs)).await;
    };
    tokio::pin!(lifetime);
    let shutdown = gateway.generations.shutting_down();
    // The credential is re-checked (revocation) every `auth.recheck_secs`,
    // and the connection ends when it expires unless an `auth` frame
    // brought a fresh one.
    let mut recheck =
        tokio::time::interval(Duration::from_secs(gateway.auth.config().recheck_secs));
    recheck.tick().await;

    // A drain moves the client off when its batch's turn comes (other
    // instances can resume its replies); alone, it closes once the replies
    // it streams have ended.
    let drain = &gateway.drain;
    let drain_signal = async {
        if drain.hands_off() {
            drain.turn().await;
        } else {
            drain.started().await;
        }
    };
    tokio::pin!(drain_signal);
    let mut close_when_idle = false;

    let end = loop {
        if close_when_idle && connection.streaming.is_empty() {
            break End::Close(close::SERVICE_RESTART, DRAINING);
        }
        let out: Vec<ServerFrame> = tokio::select! {
            biased;
            () = shutdown.cancelled() => break End::Close(close::GOING_AWAY, "server shutting down: reconnect and resume"),
            // An operator closed this user's connections (admin API).
            () = connection.stats.closed_by_operator.cancelled() => break End::Close(close::CLOSED_BY_OPERATOR, "closed by operator"),
            () = &mut drain_signal, if !close_when_idle => {
                if drain.hands_off() {
                    break End::Close(close::SERVICE_RESTART, DRAINING);
                }
                close_when_idle = true;
                Vec::new()
            }
            () = &mut lifetime => break End::Close(close::RECONNECT, "connection lifetime reached: reconnect and resume"),
            () = expiry(&connection.principal, gateway.auth.config().leeway_secs) => break End::Close(close::UNAUTHORIZED, "token_expired"),
            _ = recheck.tick() => match gateway.auth.still_valid(&connection.principal).await {
                Ok(()) | Err(AuthError::Unavailable) => Vec::new(),
                Err(err) => break End::Close(err.close_code(), err.code()),
            },
            message = incoming.next() => match message {
                None | Some(Ok(Message::Close(_))) => break End::Gone,
                Some(Err(err)) => {
                    let too_big = std::error::Error::source(&err)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                        .contains("too long")
                        || err.to_string().contains("too long")
                        || err.to_string().contains("Space limit");
                    if too_big {
                        break End::Close(close::TOO_BIG, "message too big");
                    }
                    break End::Gone;
                }
                Some(Ok(Message::Text(text))) => connection.handle(text.as_str()).await,
                Some(Ok(Message::Binary(_))) => vec![ServerFrame::error(
                    "binary_not_supported",
                    "frames are JSON text",
                    false,
                )],
                Some(Ok(Message::Pong(_))) => {
                    pong_due = None;
                    Vec::new()
                }
                // Pings are answered by the WebSocket layer.
                Some(Ok(Message::Ping(_))) => Vec::new(),
            },
            popped = outbox.pop() => match popped {
                Popped::Overflowed => break End::Close(close::SLOW_CONSUMER, "slow consumer: reconnect and resume"),
                Popped::Frame(frame) => match &frame {
                    // A reply this connection already streams (it resumed
                    // it first) is not announced again: `reply` means "from
                    // offset 0", which would make the client drop text.
                    ServerFrame::Reply { generation_id, .. } => {
                        let generation_id = generation_id.clone();
                        if connection.attach(&generation_id, 0).await {
                            vec![frame]
                        } else {
                            Vec::new()
                        }
                    }
                    _ => vec![frame],
                },
            },
            Some((generation, read)) = connection.streams.next() => connection.encode(&generation, read),
            () = async {
                match pong_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            } => break End::Close(close::PONG_TIMEOUT, "no pong"),
            _ = ping.tick() => {
                if pong_due.is_none() {
                    pong_due = Some(Instant::now() + pong_timeout);
                }
                if !send(&mut sink, &connection.stats, Message::Ping(Default::default()), write_timeout).await {
                    break End::Close(close::SLOW_CONSUMER, "slow consumer: reconnect and resume");
                }
                Vec::new()
            }
        };
        let mut blocked = false;
        for frame in out {
            let message = Message::Text(frame.to_json().into());
            if !send(&mut sink, &connection.stats, message, write_timeout).await {
                blocked = true;
                break;
            }
        }
        if blocked {
            break End::Close(close::SLOW_CONSUMER, "slow consumer: reconnect and resume");
        }
    };
    gateway.chat.disconnect(id);
    gateway.connections.unregister(id);
    if let End::Close(code, _) = end {
        crate::metrics::get().close("ws", close_reason(code));
    }
    if let End::Close(code, reason) = end {
        tracing::info!(connection = id, code, reason, "closing websocket");
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        // The close frame queues behind what the client has not read yet;
        // a client that drains within the window sees the code, a dead one
        // just sees the connection drop. Then wait (within the same window)
        // for the client's close, so the connection ends in a clean
        // handshake rather than a reset that could hide our code.
        let deadline = Instant::now() + CLOSE_WINDOW;
        if let Ok(Ok(())) = tokio::time::timeout_at(deadline, sink.send(frame)).await {
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout_at(deadline, incoming.next()).await
            {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    }
}

/// Writes one message within `timeout`; false if it did not go.
async fn send(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    stats: &ConnectionStats,
    message: Message,
    timeout: Duration,
) -> bool {
    let size = match &message {
        Message::Text(text) => text.len(),
        _ => 16,
    };
    stats.pending_write_bytes.store(size, Ordering::Relaxed);
    let sent = matches!(
        tokio::time::timeout(timeout, sink.send(message)).await,
        Ok(Ok(()))
    );
    stats.pending_write_bytes.store(0, Ordering::Relaxed);
    if sent {
        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
    }
    sent
}

impl Connection {
    /// Handles one client frame; returns the frames to send back at once.
    async fn handle(&mut self, text: &str) -> Vec<ServerFrame> {
        let frame = match crate::protocol::parse_client_frame(text) {
            Ok(frame) => frame,
            Err(error) => return vec![error],
        };
        let chat = &self.gateway.chat;
        match frame {
            ClientFrame::Send {
                conversation_id,
                content,
                client_message_id,
                model,
            } => {
                // Upstream calls carry the upgrade's request id (and trace).
                let request_id = self
                    .headers
                    .get(super::REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                let trace = crate::telemetry::Trace::from_headers(request_id, &self.headers);
                let sent = crate::telemetry::scoped(
                    trace,
                    chat.send(
                        Some((self.id, &self.outbox)),
                        &self.principal,
                        &conversation_id,
                        content,
                        client_message_id.clone(),
                        model,
                    ),
                )
                .await;
                match sent {
                    Ok(ack) => vec![ack],
                    Err(err) => vec![err.frame(Some(client_message_id))],
                }
            }
            ClientFrame::Cancel { generation_id } => {
                if chat.cancel(&self.owner, &generation_id).await {
                    Vec::new()
                } else {
                    vec![generation_error(
                        "generation_not_found",
                        "no such generation",
                        &generation_id,
                    )]
                }
            }
            ClientFrame::Resume {
                generation_id,
                epoch,
                offset,
            } => match chat
                .resume_target(&self.owner, &generation_id, epoch, offset)
                .await
            {
                Ok(generation) => {
                    // Already streamed here (from a `reply`): nothing to do.
                    self.stream(generation, offset);
                    Vec::new()
                }
                Err(err) => vec![err.frame(&generation_id)],
            },
            ClientFrame::Subscribe { conversation_id } => {
                match chat
                    .subscribe(self.id, &self.owner, &self.outbox, &conversation_id)
                    .await
                {
                    Ok(()) => Vec::new(),
                    Err(err) => vec![err.frame(None)],
                }
            }
            ClientFrame::Unsubscribe { conversation_id } => {
                chat.unsubscribe(self.id, &conversation_id);
                Vec::new()
            }
            ClientFrame::Typing {
                conversation_id,
                typing,
            } => match chat.typing(self.id, &self.owner, &conversation_id, typing) {
                Ok(()) => Vec::new(),
                Err(err) => vec![err.frame(None)],
            },
            ClientFrame::Ping { id } => vec![ServerFrame::Pong { id }],
            ClientFrame::Auth { token } => self.refresh(&token).await,
        }
    }

    /// An in-band token refresh: a valid token of the same user replaces
    /// the connection's credential.
    async fn refresh(&mut self, token: &str) -> Vec<ServerFrame> {
        let credentials = crate::auth::Credentials {
            headers: &self.headers,
            query_token: Some(token),
            query_user: None,
        };
        match self.gateway.auth.authenticate(&credentials).await {
            Ok(principal)
                if principal.tenant == self.principal.tenant
                    && principal.user == self.principal.user =>
            {
                let expires_at = principal.expires_at;
                self.principal = principal;
                vec![ServerFrame::Authenticated { expires_at }]
            }
            Ok(_) => vec![ServerFrame::error(
                "forbidden",
                "the token is for another user",
                false,
            )],
            Err(err) => vec![ServerFrame::error(err.code(), err.to_string(), false)],
        }
    }

    /// Starts streaming generation `id` (held here or followed from
    /// another instance) from `offset` through a new cursor; false when
    /// this connection streams it already.
    async fn attach(&mut self, id: &str, offset: u64) -> bool {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return true;
        };
        if self.streaming.contains(&uuid) {
            return false;
        }
        let Some(generation) = self.gateway.chat.find_generation(&self.owner, id).await else {
            return true;
        };
        self.stream(generation, offset)
    }

    /// Streams `generation` from `offset` unless this connection streams
    /// it already; false when it does.
    fn stream(&mut self, generation: Arc<Generation>, offset: u64) -> bool {
        if !self.streaming.insert(generation.id()) {
            return false;
        }
        self.streams
            .push(crate::chat::reads(generation.subscribe(offset)));
        true
    }

    /// The frames of one read.
    fn encode(&mut self, generation: &Arc<Generation>, read: Read) -> Vec<ServerFrame> {
        let finish = self.finish.entry(generation.id()).or_default();
        let frames = crate::chat::encode(generation, read, finish);
        if frames.iter().any(is_terminal) {
            self.finish.remove(&generation.id());
            self.streaming.remove(&generation.id());
        }
        frames
    }
}

/// The `reason` label of a close the gateway chose.
fn close_reason(code: u16) -> &'static str {
    match code {
        close::SLOW_CONSUMER => "slow_consumer",
        close::SERVICE_RESTART => "drain",
        close::GOING_AWAY => "shutdown",
        close::RECONNECT => "lifetime",
        close::PONG_TIMEOUT => "pong_timeout",
        close::UNAUTHORIZED | close::FORBIDDEN => "auth",
        close::TOO_BIG => "too_big",
        close::PROTOCOL_ERROR => "protocol",
        close::CLOSED_BY_OPERATOR => "operator",
        _ => "other",
    }
}

fn is_terminal(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Done { .. }
            | ServerFrame::Error {
                generation_id: Some(_),
                ..
            }
    )
}

fn generation_error(code: &str, message: &str, generation_id: &str) -> ServerFrame {
    ServerFrame::Error {
        code: code.to_owned(),
        message: message.to_owned(),
        retryable: false,
        generation_id: Some(generation_id.to_owned()),
        client_message_id: None,
    }
}

/// Resolves when `principal`'s credential has expired (past the leeway);
/// never for one that does not expire.
async fn expiry(principal: &Principal, leeway_secs: u64) {
    let Some(expires_at) = principal.expires_at else {
        return std::future::pending().await;
    };
    let deadline_ms = (expires_at + leeway_secs).saturating_mul(1000);
    let left = deadline_ms.saturating_sub(crate::cluster::now_ms());
    tokio::time::sleep(Duration::from_millis(left)).await;
}

/// Admits a new streaming connection of `principal`: its rate of new
/// connections and the caps on open ones. The permit holds the slot.
pub(crate) async fn admit(
    gateway: &Gateway,
    principal: &Principal,
) -> Result<crate::limits::ConnectionPermit, crate::limits::Limited> {
    gateway
        .limits
        .check(
            crate::limits::Kind::Connection,
            &principal.limit_key(),
            &principal.tier,
        )
        .await?;
    gateway
        .limits
        .connect(&principal.tenant, &principal.user, &principal.tier)
}

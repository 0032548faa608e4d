//! The native wire protocol, version 1 (`spillway.v1`): the JSON frames of
//! the WebSocket and the named events of the native SSE endpoints.
//! `docs/protocol.md` is the reference a client SDK is written from.
//!
//! Every frame is a JSON object with a `type`. Every server frame that
//! belongs to a generation carries `generation_id`, `epoch` and `offset`
//! (the offset of the first log event it covers) and `next` (the offset to
//! resume from after it).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The WebSocket subprotocol.
pub const SUBPROTOCOL: &str = "spillway.v1";

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// A user message; the reply streams back.
    Send {
        /// The conversation (must be the user's).
        conversation_id: String,
        /// The message text.
        content: String,
        /// The client's id for the message: a resend with the same id is
        /// acknowledged again, never stored or answered twice.
        client_message_id: String,
        /// A model name (default: the gateway's default chat model).
        #[serde(default)]
        model: Option<String>,
    },
    /// Stops a reply.
    Cancel {
        /// The generation to stop.
        generation_id: String,
    },
    /// Continues a reply from where the client got to.
    Resume {
        /// The generation.
        generation_id: String,
        /// The epoch the client saw.
        epoch: u64,
        /// The `next` of the last frame the client processed.
        offset: u64,
    },
    /// Receive a conversation's live events.
    Subscribe {
        /// The conversation (must be the user's).
        conversation_id: String,
    },
    /// Stop receiving a conversation's events.
    Unsubscribe {
        /// The conversation.
        conversation_id: String,
    },
    /// The user is (or stopped) typing.
    Typing {
        /// The conversation (must be subscribed).
        conversation_id: String,
        /// Typing now (default true).
        #[serde(default = "yes")]
        typing: bool,
    },
    /// Liveness check; answered with `pong`.
    Ping {
        /// Echoed back.
        #[serde(default)]
        id: Option<Value>,
    },
    /// A fresh token for the same user (before the current one expires),
    /// so the connection need not drop; answered with `authenticated`.
    Auth {
        /// The new bearer token.
        token: String,
    },
}

fn yes() -> bool {
    true
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The connection is ready.
    Hello {
        /// The connection's id (for logs and support).
        connection_id: String,
        /// The session: reconnect with `?session=` to get the same one
        /// back, on any instance, with its conversations subscribed again.
        session_id: String,
        /// Whether the session was restored (its conversations are being
        /// subscribed again: expect their snapshots).
        restored: bool,
        /// The instance serving the connection (for logs and support).
        node: String,
        /// The user the gateway sees.
        user_id: String,
        /// The server's ping interval, in ms.
        heartbeat_ms: u64,
    },
    /// A `send` was stored durably; its reply is `generation_id`.
    Ack {
        /// The client's id, echoed.
        client_message_id: String,
        /// The stored message's id.
        message_id: String,
        /// The conversation.
        conversation_id: String,
        /// The reply's generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
    },
    /// A reply started in a subscribed conversation (this connection
    /// streams it from now on).
    Reply {
        /// The conversation.
        conversation_id: String,
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Reply text (coalesced).
    Delta {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// First log offset covered.
        offset: u64,
        /// Resume point after this frame.
        next: u64,
        /// The text.
        text: String,
    },
    /// Reasoning text, where the model streams it.
    Reasoning {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// First log offset covered.
        offset: u64,
        /// Resume point.
        next: u64,
        /// The text.
        text: String,
    },
    /// A fragment of a tool call.
    ToolCall {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// First log offset covered.
        offset: u64,
        /// Resume point.
        next: u64,
        /// The call's index.
        index: u32,
        /// Its id (first fragment).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Its function name (first fragment).
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Argument text.
        arguments: String,
    },
    /// Tokens billed for the reply.
    Usage {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// Offset.
        offset: u64,
        /// Resume point.
        next: u64,
        /// Prompt tokens.
        prompt_tokens: u64,
        /// Completion tokens.
        completion_tokens: u64,
    },
    /// The reply finished.
    Done {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// Offset.
        offset: u64,
        /// Resume point (the end of the log).
        next: u64,
        /// Why it stopped.
        finish_reason: String,
    },
    /// The reply restarts on another provider: discard its partial text.
    Restart {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
        /// Offset.
        offset: u64,
        /// Resume point.
        next: u64,
    },
    /// Something failed.
    Error {
        /// A stable code (`docs/protocol.md`).
        code: String,
        /// For people.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
        /// The generation it concerns, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        generation_id: Option<String>,
        /// The client message it concerns, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
    },
    /// A message another device or participant sent.
    Message {
        /// The conversation.
        conversation_id: String,
        /// The message (as the history API shows it).
        message: Value,
    },
    /// Who is connected to a conversation.
    Presence {
        /// The conversation.
        conversation_id: String,
        /// `snapshot`, `join` or `leave`.
        event: String,
        /// The users concerned (for a snapshot: everyone present).
        users: Vec<String>,
        /// Devices (connections) present after the event: a user's second
        /// device joining is a `join` with the same user and one more device.
        devices: usize,
    },
    /// Someone is (or stopped) typing.
    Typing {
        /// The conversation.
        conversation_id: String,
        /// Who.
        user_id: String,
        /// Typing now.
        typing: bool,
    },
    /// Answer to `ping`.
    Pong {
        /// Echoed.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// Answer to `auth`: the connection now runs on the new token.
    Authenticated {
        /// When it expires (Unix seconds), if it does.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
}

impl ServerFrame {
    /// An error frame.
    pub fn error(code: &str, message: impl Into<String>, retryable: bool) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
            retryable,
            generation_id: None,
            client_message_id: None,
        }
    }

    /// The SSE event name of this frame (its `type`).
    pub fn event_name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Ack { .. } => "ack",
            Self::Reply { .. } => "reply",
            Self::Delta { .. } => "delta",
            Self::Reasoning { .. } => "reasoning",
            Self::ToolCall { .. } => "tool_call",
            Self::Usage { .. } => "usage",
            Self::Done { .. } => "done",
            Self::Restart { .. } => "restart",
            Self::Error { .. } => "error",
            Self::Message { .. } => "message",
            Self::Presence { .. } => "presence",
            Self::Typing { .. } => "typing",
            Self::Pong { .. } => "pong",
            Self::Authenticated { .. } => "authenticated",
        }
    }

    /// The JSON text of the frame.
    pub fn to_json(&self) -> String {
        // Serializing plain data to a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// WebSocket close codes the gateway uses (`docs/protocol.md`).
pub mod close {
    /// The client sent something that is not the protocol (binary frame,
    /// malformed frames beyond the tolerated count).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The client could not keep up (queue full, or a write blocked past
    /// the write timeout); reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 1013;
    /// The server is shutting down; reconnect (elsewhere) and resume.
    pub const GOING_AWAY: u16 = 1001;
    /// The instance is draining (a deploy or scale-down): reconnect, to
    /// another instance, and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// No pong within the timeout.
    pub const PONG_TIMEOUT: u16 = 4000;
    /// The connection reached its maximum lifetime; reconnect and resume.
    pub const RECONNECT: u16 = 4001;
    /// Not authenticated.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The credential is valid but may not be used here (a widget's
    /// visitor from an origin the widget does not allow).
    pub const FORBIDDEN: u16 = 4403;
    /// The server cannot check credentials now: retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// An operator closed this user's connections (`POST
    /// /admin/v1/users/{tenant}/{user}/disconnect`); do not reconnect on
    /// your own.
    pub const CLOSED_BY_OPERATOR: u16 = 4409;
}

/// Parses a client frame (a WebSocket text message), or the typed error
/// frame that answers it. Never panics, whatever the input.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, ServerFrame> {
    const KNOWN: [&str; 8] = [
        "send",
        "cancel",
        "resume",
        "subscribe",
        "unsubscribe",
        "typing",
        "ping",
        "auth",
    ];
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|err| ServerFrame::error("invalid_json", format!("not JSON: {err}"), false))?;
    let kind = value
        .get("type")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            ServerFrame::error(
                "invalid_frame",
                "a frame is a JSON object with a string 'type'",
                false,
            )
        })?;
    if !KNOWN.contains(&kind.as_str()) {
        return Err(ServerFrame::error(
            "unknown_frame_type",
            format!(
                "unknown frame type '{}'",
                kind.chars().take(64).collect::<String>()
            ),
            false,
        ));
    }
    serde_json::from_value(value).map_err(|err| {
        ServerFrame::error(
            "invalid_frame",
            format!("invalid '{kind}' frame: {err}"),
            false,
        )
    })
}

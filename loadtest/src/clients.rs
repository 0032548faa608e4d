//! The load generator's clients: one reply read over each transport (the
//! paced upstream directly, the gateway's OpenAI-compatible SSE, its
//! native SSE and its WebSocket), timing every token against the upstream's
//! stamps; and idle connections for the memory scenario.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::upstream::{self, now_ns};

/// Where a reply is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// The paced upstream itself (the baseline).
    Direct,
    /// `POST /v1/chat/completions` on the gateway.
    Openai,
    /// The native SSE transport (`POST /v1/conversations/{id}/messages`).
    Sse,
    /// The native WebSocket (`/v1/ws`).
    Ws,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Openai => "openai-sse",
            Self::Sse => "native-sse",
            Self::Ws => "ws",
        }
    }
}

/// How a reply ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum End {
    Done,
    Error(String),
    /// The stream stopped without `done`, `[DONE]` or an error.
    Truncated,
}

/// One reply as a client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Request written → first token read.
    pub ttft: Option<Duration>,
    /// (upstream write stamp, client read time), in ns since the epoch.
    pub tokens: Vec<(u64, u64)>,
    pub end: End,
}

/// Collects stamped tokens as text arrives.
#[derive(Debug)]
struct Timing {
    start: u64,
    ttft: Option<Duration>,
    tokens: Vec<(u64, u64)>,
    rest: String,
    scratch: Vec<u64>,
}

impl Timing {
    fn new() -> Self {
        Self {
            start: now_ns(),
            ttft: None,
            tokens: Vec::new(),
            rest: String::new(),
            scratch: Vec::new(),
        }
    }

    fn text(&mut self, text: &str) {
        let now = now_ns();
        self.scratch.clear();
        upstream::stamps(text, &mut self.rest, &mut self.scratch);
        if !self.scratch.is_empty() && self.ttft.is_none() {
            self.ttft = Some(Duration::from_nanos(now.saturating_sub(self.start)));
        }
        self.tokens.extend(self.scratch.iter().map(|&s| (s, now)));
    }

    fn end(self, end: End) -> Reply {
        Reply {
            ttft: self.ttft,
            tokens: self.tokens,
            end,
        }
    }
}

/// An SSE decoder for what this crate reads (LF or CRLF line ends).
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
    event: Option<String>,
    data: String,
}

impl SseDecoder {
    /// Feeds bytes; returns the complete events `(event name, data)`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(Option<String>, String)> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || self.event.is_some() {
                    events.push((self.event.take(), std::mem::take(&mut self.data)));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
            } else if let Some(value) = line.strip_prefix("event:") {
                self.event = Some(value.trim().to_owned());
            }
        }
        events
    }
}

/// One streamed OpenAI chat completion from `url` (the upstream's or the
/// gateway's `/v1/chat/completions`).
pub async fn openai(http: &reqwest::Client, url: &str, model: &str, content: &str) -> Reply {
    let mut timing = Timing::new();
    let body = json!({ "model": model, "stream": true,
        "messages": [{ "role": "user", "content": content }] });
    let response = match http.post(url).json(&body).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return timing.end(End::Error(format!("http {}", r.status().as_u16()))),
        Err(err) => return timing.end(End::Error(format!("request: {err}"))),
    };
    let mut decoder = SseDecoder::default();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return timing.end(End::Truncated);
        };
        for (_, data) in decoder.push(&chunk) {
            if data == "[DONE]" {
                return timing.end(End::Done);
            }
            let Ok(value) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if let Some(error) = value.get("error") {
                return timing.end(End::Error(error["code"].as_str().unwrap_or("error").into()));
            }
            if let Some(text) = value["choices"][0]["delta"]["content"].as_str() {
                timing.text(text);
            }
        }
    }
    timing.end(End::Truncated)
}

/// `POST /v1/conversations` for `user`: the new conversation's id.
pub async fn conversation(
    http: &reqwest::Client,
    base: &str,
    user: &str,
) -> Result<String, String> {
    let response = http
        .post(format!("{base}/v1/conversations"))
        .header("x-spillway-user", user)
        .json(&json!({ "title": "loadtest" }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    body["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("create conversation: {status} {body}"))
}

/// One message sent over the native SSE transport, its reply read.
pub async fn native_sse(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    conversation: &str,
    message_id: &str,
    content: &str,
) -> Reply {
    let mut timing = Timing::new();
    let url = format!("{base}/v1/conversations/{conversation}/messages");
    let body = json!({ "content": content, "client_message_id": message_id });
    let response = match http
        .post(url)
        .header("x-spillway-user", user)
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return timing.end(End::Error(format!("http {}", r.status().as_u16()))),
        Err(err) => return timing.end(End::Error(format!("request: {err}"))),
    };
    let mut decoder = SseDecoder::default();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return timing.end(End::Truncated);
        };
        for (event, data) in decoder.push(&chunk) {
            match event.as_deref() {
                Some("delta") => {
                    if let Ok(value) = serde_json::from_str::<Value>(&data) {
                        timing.text(value["text"].as_str().unwrap_or(""));
                    }
                }
                Some("done") => return timing.end(End::Done),
                Some("error") => {
                    let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                    return timing
                        .end(End::Error(value["code"].as_str().unwrap_or("error").into()));
                }
                _ => {}
            }
        }
    }
    timing.end(End::Truncated)
}

/// A loopback TCP connection from source address 127.0.0.`source`.
pub async fn connect_from(source: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, source)),
        0,
    ))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub type WsSink =
    futures_util::stream::SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
pub type WsStream = futures_util::stream::SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>;

/// The longest a reply may stay silent before a client gives up on it.
pub const REPLY_SILENCE: Duration = Duration::from_secs(30);

/// A native WebSocket connection that has had its `hello`.
#[derive(Debug)]
pub struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Connects as `user` from 127.0.0.`source`, with the receive buffer
    /// `recv_buffer` when set (a small one makes a slow consumer).
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        source: u8,
        recv_buffer: Option<u32>,
    ) -> Result<Self, String> {
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(size) = recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| e.to_string())?;
        }
        socket
            .bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, source)),
                0,
            ))
            .map_err(|e| format!("bind 127.0.0.{source}: {e}"))?;
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut request = format!("ws://{addr}/v1/ws?user={user}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("spillway.v1"),
        );
        let (socket, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut ws = Self { socket };
        match ws.next_json().await {
            Some(hello) if hello["type"] == "hello" => Ok(ws),
            other => Err(format!("expected hello, got {other:?}")),
        }
    }

    /// The next JSON text frame (None when the connection ended).
    pub async fn next_json(&mut self) -> Option<Value> {
        while let Some(message) = self.socket.next().await {
            match message.ok()? {
                Message::Text(text) => return serde_json::from_str(&text).ok(),
                Message::Close(_) => return None,
                _ => {}
            }
        }
        None
    }

    /// Sends one JSON frame.
    pub async fn frame(&mut self, frame: &Value) -> Result<(), String> {
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| e.to_string())
    }

    /// The writing and reading halves.
    pub fn split(self) -> (WsSink, WsStream) {
        self.socket.split()
    }

    /// Sends a message in `conversation` without reading the reply.
    pub async fn send(&mut self, conversation: &str, content: &str) -> Result<(), String> {
        // Unique across connections and runs: a resent id would be
        // answered with its first ack and no second reply.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frame = json!({ "type": "send", "conversation_id": conversation,
            "content": content, "client_message_id": format!("lt-{}-{n}", std::process::id()) });
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends a message and reads its reply to `done` or `error`.
    pub async fn reply(&mut self, conversation: &str, content: &str) -> Reply {
        let mut timing = Timing::new();
        if let Err(err) = self.send(conversation, content).await {
            return timing.end(End::Error(err));
        }
        let mut generation: Option<String> = None;
        // Bounded: a reply that goes silent for this long is an error.
        while let Ok(Some(frame)) = tokio::time::timeout(REPLY_SILENCE, self.next_json()).await {
            let id = frame["generation_id"].as_str();
            match frame["type"].as_str() {
                Some("ack") => generation = id.map(str::to_owned),
                Some("delta") if id == generation.as_deref() => {
                    timing.text(frame["text"].as_str().unwrap_or(""));
                }
                Some("done") if id == generation.as_deref() => return timing.end(End::Done),
                Some("error") if id.is_none() || id == generation.as_deref() => {
                    return timing
                        .end(End::Error(frame["code"].as_str().unwrap_or("error").into()));
                }
                _ => {}
            }
        }
        timing.end(End::Truncated)
    }

    /// Keeps reading (answering pings) until the connection ends; what an
    /// idle client does.
    pub async fn idle(mut self) {
        while let Some(message) = self.socket.next().await {
            if message.is_err() {
                break;
            }
        }
    }

    /// Reads and discards until the connection ends or `within` passes;
    /// the frames it read.
    pub async fn drain(&mut self, within: Duration) -> u64 {
        let mut n = 0;
        let _ = tokio::time::timeout(within, async {
            while let Some(Ok(_)) = self.socket.next().await {
                n += 1;
            }
        })
        .await;
        n
    }
}

/// An idle SSE reader: `GET path` over a raw connection from
/// 127.0.0.`source`, reading (and discarding) until it ends.
pub async fn idle_sse(
    addr: SocketAddr,
    source: u8,
    path: &str,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut stream = connect_from(source, addr)
        .await
        .map_err(|e| e.to_string())?;
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    if &head[9..12] != b"200" {
        return Err(format!("idle SSE: {}", String::from_utf8_lossy(&head)));
    }
    Ok(tokio::spawn(async move {
        let mut buffer = [0u8; 512];
        while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_decoder_joins_split_events_and_names() {
        let mut decoder = SseDecoder::default();
        assert!(
            decoder
                .push(b": open\n\nevent: delta\ndata: {\"a\"")
                .is_empty()
        );
        let events = decoder.push(b":1}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(
            events,
            vec![
                (Some("delta".to_owned()), "{\"a\":1}".to_owned()),
                (None, "[DONE]".to_owned())
            ]
        );
    }
}

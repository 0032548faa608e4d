//! Upstream Server-Sent Events decoding.
//!
//! `sse-stream` splits the byte stream into raw field blocks (any of CR, LF
//! and CRLF as line ends, the first BOM stripped, comments dropped); this
//! module adds the WHATWG *interpretation* on top: a block without `data`
//! dispatches nothing, the event type defaults to `message`, the last event
//! id carries over from block to block (a bare `id` resets it), and the
//! `retry` value is remembered.
//!
//! It also bounds memory: `sse-stream` buffers a whole event before it
//! yields it, so a hostile or broken upstream could grow that buffer without
//! limit. Before a read reaches the parser we scan it for blank lines (the
//! block boundaries) and count the raw bytes of the block being received
//! (its lines with their line ends, comments included); past the cap we fail with
//! [`SseError::EventTooLarge`] before the parser sees the read. The count
//! does not depend on how the body is split into reads: a read larger than
//! the cap that holds many small events is fine, and an oversized event
//! fails however it arrives.
//!
//! **Unterminated final block.** The WHATWG rules discard a final block that
//! is not followed by a blank line, and so do we (`sse-stream` drops it at
//! EOF, together with its `id`/`retry` fields. The spec would not expose
//! that `id` either (the last event ID string is only updated when a block
//! is dispatched), but it would apply that `retry`: irrelevant to us, since
//! we never reconnect to an upstream). Adapters therefore judge a reply
//! complete by its finish reason, not by seeing the terminator (`[DONE]`,
//! `message_stop`): see `docs/providers.md`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sse_stream::SseByteStream;

/// Measures the raw size of the SSE block being received, across reads.
///
/// A block is its field and comment lines with their line ends; it ends at
/// a blank line (a line end right after another), which is not counted.
/// CR, LF and CRLF are line ends; a CRLF split between two reads is one.
#[derive(Debug)]
struct BlockMeter {
    /// Bytes of the current block so far.
    bytes: usize,
    /// The previous byte ended a line (or nothing was read yet).
    at_line_start: bool,
    /// The previous byte was CR, so an LF now completes that line end.
    after_cr: bool,
}

impl Default for BlockMeter {
    fn default() -> Self {
        Self {
            bytes: 0,
            at_line_start: true,
            after_cr: false,
        }
    }
}

impl BlockMeter {
    /// Feeds one read; whether the block being received grew past `limit`.
    fn exceeds(&mut self, chunk: &[u8], limit: usize) -> bool {
        for &byte in chunk {
            let crlf_tail = byte == b'\n' && self.after_cr;
            self.after_cr = byte == b'\r';
            let line_end = byte == b'\n' || byte == b'\r';
            if line_end && self.at_line_start && !crlf_tail {
                // A blank line ends the block; it belongs to no block.
                self.bytes = 0;
                continue;
            }
            if crlf_tail && self.bytes == 0 {
                // The LF of a blank CRLF line.
                continue;
            }
            self.bytes += 1;
            if self.bytes > limit {
                return true;
            }
            self.at_line_start = line_end;
        }
        false
    }
}

/// One dispatched event, as an `EventSource` would deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type; `message` when the block named none.
    pub event: String,
    /// The data lines joined with LF.
    pub data: String,
    /// The last event id in force when the event was dispatched.
    pub last_event_id: String,
}

/// Why decoding stopped. Each is terminal: the decoder ends after it.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// An event grew past the configured cap before it was complete.
    #[error("upstream event exceeds {limit} bytes")]
    EventTooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// A field value was not valid UTF-8.
    #[error("upstream event is not valid UTF-8")]
    InvalidUtf8,
    /// Reading the body failed (reset, read timeout, ...).
    #[error("upstream body failed: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The byte-level failure injected into `sse-stream`'s input, so we can tell
/// our own cap apart from the upstream's errors once it comes back out.
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error("event size cap reached")]
    TooLarge,
    #[error(transparent)]
    Upstream(Box<dyn std::error::Error + Send + Sync>),
}

type Input = Pin<Box<dyn Stream<Item = Result<Bytes, InputError>> + Send>>;

/// A WHATWG-conformant event decoder over an upstream byte stream.
pub struct SseDecoder {
    /// The raw block parser, fed through the size-counting adapter.
    blocks: SseByteStream<Input>,
    /// The cap on one block's size.
    limit: usize,
    /// The connection's last event id buffer.
    last_event_id: String,
    /// The last valid `retry` value seen.
    retry: Option<u64>,
}

impl std::fmt::Debug for SseDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseDecoder")
            .field("limit", &self.limit)
            .field("last_event_id", &self.last_event_id)
            .field("retry", &self.retry)
            .finish()
    }
}

impl SseDecoder {
    /// Decodes `body`, failing any event larger than `max_event_bytes`.
    pub fn new<S, E>(body: S, max_event_bytes: usize) -> Self
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut meter = BlockMeter::default();
        let input: Input = Box::pin(body.map(move |chunk| match chunk {
            Ok(chunk) if meter.exceeds(&chunk, max_event_bytes) => Err(InputError::TooLarge),
            Ok(chunk) => Ok(chunk),
            Err(err) => Err(InputError::Upstream(Box::new(err))),
        }));
        Self {
            blocks: SseByteStream::new(input),
            limit: max_event_bytes,
            last_event_id: String::new(),
            retry: None,
        }
    }

    /// The last event id buffer after the events decoded so far.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection time the upstream asked for, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    fn classify(&self, err: sse_stream::Error) -> SseError {
        match err {
            sse_stream::Error::Body(source) => match source.downcast::<InputError>() {
                Ok(input) => match *input {
                    InputError::TooLarge => SseError::EventTooLarge { limit: self.limit },
                    InputError::Upstream(source) => SseError::Body(source),
                },
                Err(other) => SseError::Body(other),
            },
            sse_stream::Error::Utf8Parse(_) => SseError::InvalidUtf8,
            other => SseError::Body(Box::new(other)),
        }
    }
}

impl Stream for SseDecoder {
    type Item = Result<SseEvent, SseError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let block = match self.blocks.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(self.classify(err)))),
                Poll::Ready(Some(Ok(block))) => block,
            };
            if let Some(id) = block.id {
                self.last_event_id = id;
            }
            if block.retry.is_some() {
                self.retry = block.retry;
            }
            // WHATWG: a block whose data buffer is empty dispatches nothing.
            let Some(data) = block.data else { continue };
            let event = match block.event {
                Some(event) if !event.is_empty() => event,
                _ => "message".to_owned(),
            };
            return Poll::Ready(Some(Ok(SseEvent {
                event,
                data,
                last_event_id: self.last_event_id.clone(),
            })));
        }
    }
}

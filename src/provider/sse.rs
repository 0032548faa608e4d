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
//! limit. We count the bytes fed to the parser since the last block came out
//! and fail with [`SseError::EventTooLarge`] past the cap. The bound is
//! therefore "cap plus one network read".
//!
//! **Unterminated final block.** The WHATWG rules discard a final block that
//! is not followed by a blank line, and so do we (`sse-stream` drops it at
//! EOF, together with its `id`/`retry` fields, which the spec would have
//! applied to the connection: irrelevant to us, since we never reconnect to
//! an upstream with `Last-Event-ID`). Adapters therefore judge a reply
//! complete by its finish reason, not by seeing the terminator (`[DONE]`,
//! `message_stop`): see `docs/providers.md`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sse_stream::SseByteStream;

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
    /// Bytes fed to the parser since it last yielded a block.
    pending: Arc<AtomicUsize>,
    /// The cap on `pending`.
    limit: usize,
    /// The connection's last event id buffer.
    last_event_id: String,
    /// The last valid `retry` value seen.
    retry: Option<u64>,
}

impl std::fmt::Debug for SseDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseDecoder")
            .field("pending", &self.pending.load(Ordering::Relaxed))
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
        let pending = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&pending);
        let input: Input = Box::pin(body.map(move |chunk| match chunk {
            Ok(chunk) => {
                let fed = counter.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len();
                if fed > max_event_bytes {
                    Err(InputError::TooLarge)
                } else {
                    Ok(chunk)
                }
            }
            Err(err) => Err(InputError::Upstream(Box::new(err))),
        }));
        Self {
            blocks: SseByteStream::new(input),
            pending,
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
            self.pending.store(0, Ordering::Relaxed);
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

//! `sse_decoder`: the upstream SSE decoder (`provider::sse::SseDecoder`).
//!
//! Input: `[cap, split, payload...]`. `cap` picks the event size cap from
//! [`CAPS`] (low nibble) and whether the body ends with an upstream error
//! (`0x80`); `split` picks the read boundaries (see
//! [`crate::split_reads`]). The payload is decoded twice: as one read and
//! split into reads.
//!
//! Checks:
//! - no panic, and the decoder ends (the stream is finite);
//! - every dispatched event's `data`, `event` and `last_event_id` fit the
//!   cap (the cap bounds a whole raw block, so each of them is smaller);
//! - an error is terminal: nothing comes after it;
//! - an injected upstream error surfaces as `SseError::Body` unless an
//!   earlier decoding error ended the stream;
//! - splitting does not change the result (differential): one read and
//!   many reads both fail or both succeed; when both succeed they yield the
//!   same events, `last_event_id` and `retry`; when both fail, one's events
//!   are a prefix of the other's (an oversized block is caught per read,
//!   so a single read loses the complete events before it in that read).

use futures_util::StreamExt;
use spillway::provider::sse::{SseDecoder, SseError, SseEvent};

/// Event size caps to pick from: tiny ones reach the cap logic often.
pub const CAPS: [usize; 16] = [
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    13,
    16,
    31,
    64,
    100,
    256,
    1024,
    4096,
    1 << 20,
];

/// What one decoding run produced.
#[derive(Debug)]
struct Run {
    events: Vec<SseEvent>,
    error: Option<SseError>,
    last_event_id: String,
    retry: Option<u64>,
}

fn decode(reads: Vec<bytes::Bytes>, fail_at_end: bool, cap: usize) -> Run {
    futures_executor::block_on(async move {
        let mut decoder = SseDecoder::new(crate::body(reads, fail_at_end), cap);
        let mut events = Vec::new();
        let mut error = None;
        while let Some(item) = decoder.next().await {
            match item {
                Ok(event) => {
                    assert!(
                        event.data.len() <= cap,
                        "event data of {} bytes passed the {cap}-byte cap",
                        event.data.len()
                    );
                    assert!(event.event.len() <= cap, "event type longer than the cap");
                    assert!(
                        event.last_event_id.len() <= cap,
                        "last event id longer than the cap"
                    );
                    assert!(!event.event.is_empty(), "empty event type dispatched");
                    events.push(event);
                }
                Err(err) => {
                    // Display must not panic either.
                    let _ = err.to_string();
                    if let SseError::EventTooLarge { limit } = err {
                        assert_eq!(limit, cap, "EventTooLarge names another cap");
                    }
                    assert!(
                        decoder.next().await.is_none(),
                        "the decoder yielded an item after an error ({err})"
                    );
                    error = Some(err);
                    break;
                }
            }
        }
        Run {
            events,
            error,
            last_event_id: decoder.last_event_id().to_owned(),
            retry: decoder.retry(),
        }
    })
}

fn is_prefix(short: &[SseEvent], long: &[SseEvent]) -> bool {
    short.len() <= long.len() && long[..short.len()] == *short
}

/// Runs the checks on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&[cap_sel, split_sel], payload)) = data.split_first_chunk::<2>() else {
        return;
    };
    let cap = CAPS[usize::from(cap_sel & 0x0f)];
    let fail_at_end = cap_sel & 0x80 != 0;

    let whole_reads = if payload.is_empty() {
        Vec::new()
    } else {
        vec![bytes::Bytes::copy_from_slice(payload)]
    };
    let whole = decode(whole_reads, fail_at_end, cap);
    let split = decode(crate::split_reads(payload, split_sel), fail_at_end, cap);

    crate::trace!(
        "sse_decoder: cap {cap}, {} events, error {:?} (split: {} events, error {:?})",
        whole.events.len(),
        whole.error.as_ref().map(ToString::to_string),
        split.events.len(),
        split.error.as_ref().map(ToString::to_string)
    );
    for run in [&whole, &split] {
        if fail_at_end {
            assert!(
                run.error.is_some(),
                "the upstream error was swallowed: {run:?}"
            );
        }
    }
    let decoding_error =
        |run: &Run| matches!(run.error, Some(ref e) if !matches!(e, SseError::Body(_)));
    assert_eq!(
        decoding_error(&whole),
        decoding_error(&split),
        "one read and split reads disagree on failing:\n whole: {whole:?}\n split: {split:?}"
    );
    if !decoding_error(&whole) {
        // Both decoded the whole payload (possibly then hit the injected
        // upstream error): the split must not matter at all.
        assert_eq!(whole.events, split.events, "split reads changed the events");
        assert_eq!(
            whole.last_event_id, split.last_event_id,
            "split reads changed the last event id"
        );
        assert_eq!(whole.retry, split.retry, "split reads changed retry");
    } else {
        assert!(
            is_prefix(&whole.events, &split.events) || is_prefix(&split.events, &whole.events),
            "events before the error diverge:\n whole: {whole:?}\n split: {split:?}"
        );
    }
}

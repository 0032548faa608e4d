//! `provider_stream`: the provider adapters' stream decoders
//! (`provider::{openai,anthropic,gemini}::decode_stream`: the SSE decoder
//! plus each wire format's chunk parser) and OpenAI's non-streaming
//! `decode_completion`.
//!
//! Input: `[select, split, payload...]`. `select & 0x03` picks the adapter
//! (0 OpenAI, 1 Anthropic, 2 Gemini, 3 OpenAI `decode_completion` on the
//! payload as a JSON body); `(select >> 2) & 0x0f` the event size cap
//! (from the large end of [`crate::sse_decoder::CAPS`], so most inputs get
//! past the SSE layer); `0x40` a tiny Gemini error-body cap; `0x80` an
//! upstream error after the body. `split` picks the read boundaries.
//!
//! Checks:
//! - no panic, and the event stream ends;
//! - an error is terminal: nothing comes after it;
//! - a stream that ends without an error has finished the reply (it
//!   carried at least one `Finish`): a cut-off reply is never reported as
//!   complete, and an injected upstream error is never swallowed unless
//!   the reply was already over;
//! - the read boundaries do not matter (one read vs split reads): both
//!   fail or both succeed; successes yield the same events; failures one a
//!   prefix of the other's events.
//! - `decode_completion`: no panic; an accepted body yields a `Finish`.

use futures_util::StreamExt;
use spillway::provider::{EventStream, ProviderError, ProviderEvent, anthropic, gemini, openai};

#[derive(Debug)]
struct Run {
    events: Vec<ProviderEvent>,
    error: Option<ProviderError>,
}

fn drive(mut stream: EventStream) -> Run {
    futures_executor::block_on(async move {
        let mut events = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => events.push(event),
                Err(err) => {
                    let _ = err.to_string();
                    assert!(
                        stream.next().await.is_none(),
                        "the adapter yielded an item after an error ({err})"
                    );
                    return Run {
                        events,
                        error: Some(err),
                    };
                }
            }
        }
        Run {
            events,
            error: None,
        }
    })
}

fn is_prefix(short: &[ProviderEvent], long: &[ProviderEvent]) -> bool {
    short.len() <= long.len() && long[..short.len()] == *short
}

fn has_finish(events: &[ProviderEvent]) -> bool {
    events.iter().any(|e| matches!(e, ProviderEvent::Finish(_)))
}

/// Runs the checks on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&[select, split_sel], payload)) = data.split_first_chunk::<2>() else {
        return;
    };
    let adapter = select & 0x03;
    if adapter == 3 {
        let decoded = openai::decode_completion(payload);
        crate::trace!("provider_stream: completion: {decoded:?}");
        if let Ok(events) = decoded {
            assert!(
                has_finish(&events),
                "a completion without a Finish: {events:?}"
            );
        }
        return;
    }
    let caps = &crate::sse_decoder::CAPS;
    let cap = caps[caps.len() - 1 - usize::from((select >> 2) & 0x0f)];
    let error_cap = if select & 0x40 != 0 { 8 } else { 4096 };
    let fail_at_end = select & 0x80 != 0;

    let decode = |reads: Vec<bytes::Bytes>| -> EventStream {
        let body = crate::body(reads, fail_at_end);
        match adapter {
            0 => openai::decode_stream(body, cap),
            1 => anthropic::decode_stream(body, cap),
            _ => gemini::decode_stream(body, cap, error_cap),
        }
    };
    let whole_reads = if payload.is_empty() {
        Vec::new()
    } else {
        vec![bytes::Bytes::copy_from_slice(payload)]
    };
    let whole = drive(decode(whole_reads));
    let split = drive(decode(crate::split_reads(payload, split_sel)));

    crate::trace!(
        "provider_stream: adapter {adapter}, cap {cap}: {} events, error {:?} (split: {} events, error {:?})",
        whole.events.len(),
        whole.error.as_ref().map(ToString::to_string),
        split.events.len(),
        split.error.as_ref().map(ToString::to_string)
    );
    for run in [&whole, &split] {
        if run.error.is_none() {
            assert!(
                has_finish(&run.events),
                "a stream ended without error and without a finish reason: {run:?}"
            );
        }
    }
    assert_eq!(
        whole.error.is_some(),
        split.error.is_some(),
        "one read and split reads disagree on failing:\n whole: {whole:?}\n split: {split:?}"
    );
    if whole.error.is_none() {
        assert_eq!(whole.events, split.events, "split reads changed the events");
    } else {
        assert!(
            is_prefix(&whole.events, &split.events) || is_prefix(&split.events, &whole.events),
            "events before the error diverge:\n whole: {whole:?}\n split: {split:?}"
        );
    }
}

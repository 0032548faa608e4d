//! The append-only event log of one generation, and coalescing reads.
//!
//! Every event has a dense offset: its index in the log. The terminal
//! [`Outcome`] sits conceptually at offset `len`, after the last event. A
//! reader takes everything past its cursor in one go, merging consecutive
//! text-like deltas (and consecutive argument fragments of one tool call)
//! into frames of at most `max_frame_bytes`, so a slow reader gets fewer,
//! larger frames instead of a growing queue.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::provider::{ErrorClass, ProviderError, ProviderEvent, ToolCallDelta};

/// How a generation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The model finished and the upstream stream ended cleanly.
    Complete,
    /// The upstream (or the gateway's bounds) failed the reply.
    Failed(ProviderError),
    /// The gateway stopped the reply before it finished.
    Cancelled(CancelReason),
}

/// Why a generation was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Every subscriber left and the grace period ran out.
    Abandoned,
    /// A client asked for it.
    Requested,
    /// The gateway is shutting down.
    Shutdown,
}

/// One coalesced piece of the log, as handed to a transport.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Offset of the first event merged into this frame.
    pub offset: u64,
    /// The cursor after this frame: resuming from here replays what follows.
    pub next: u64,
    /// The (possibly merged) event.
    pub event: ProviderEvent,
}

/// What the log publishes to readers after every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Progress {
    /// Events in the log.
    pub len: u64,
    /// The upstream accepted the request (content may follow).
    pub accepted: bool,
    /// An outcome has been recorded; nothing more will be appended.
    pub ended: bool,
}

/// The log itself: events behind a mutex, progress on a watch channel.
///
/// A std mutex, not a tokio one: every critical section is a push or a
/// copy out, never held across an `.await`.
#[derive(Debug)]
pub(crate) struct Log {
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// Bound on the summed payload bytes of all events.
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    events: Vec<ProviderEvent>,
    /// How many of `events` readers may see: pushed events stay invisible
    /// until published, so a reader takes a whole burst in one read (and
    /// one socket write) instead of racing the relay event by event.
    published: usize,
    /// Summed payload bytes of `events`.
    bytes: usize,
    outcome: Option<Outcome>,
}

impl State {
    fn visible(&self) -> &[ProviderEvent] {
        &self.events[..self.published]
    }
}

/// Memory an event costs beyond its text: the enum slot and an allocation.
const EVENT_OVERHEAD: usize = std::mem::size_of::<ProviderEvent>() + 16;

/// Result of an append.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Appended {
    /// The event is in the log.
    Yes,
    /// The log had already ended; the event was dropped.
    Ended,
    /// The event would have exceeded the reply bound: the log has ended
    /// with `reply_too_large` instead.
    TooLarge,
}

impl Log {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            progress: watch::Sender::new(Progress::default()),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the log half-written
        // (each section is a single push), so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub(crate) fn mark_accepted(&self) {
        self.progress.send_modify(|p| p.accepted = true);
    }

    /// Appends `event` and wakes the readers.
    pub(crate) fn append(&self, event: ProviderEvent) -> Appended {
        let appended = self.push(event);
        self.publish();
        appended
    }

    /// Appends `event` without waking the readers: the relay pushes a
    /// burst of already-decoded events, then publishes once, so a reader
    /// wakes (and writes to its socket) once per burst rather than once
    /// per token.
    pub(crate) fn push(&self, event: ProviderEvent) -> Appended {
        let mut state = self.lock();
        if state.outcome.is_some() {
            return Appended::Ended;
        }
        // The bound counts what an event costs in memory, not only its
        // text: a reply of a million one-byte tokens is not 1 MB.
        let size = payload_bytes(&event) + EVENT_OVERHEAD;
        if state.bytes + size > self.max_bytes {
            let error = ProviderError::new(
                ErrorClass::ReplyTooLarge,
                format!(
                    "the reply exceeded the gateway's limit of {} bytes",
                    self.max_bytes
                ),
            );
            state.outcome = Some(Outcome::Failed(error));
            // Readers see everything before the end, then the end.
            state.published = state.events.len();
            let len = state.published as u64;
            drop(state);
            self.progress.send_modify(|p| {
                p.len = len;
                p.ended = true;
            });
            return Appended::TooLarge;
        }
        state.bytes += size;
        state.events.push(event);
        Appended::Yes
    }

    /// Wakes the readers if events were pushed since the last wake-up.
    pub(crate) fn publish(&self) {
        let len = {
            let mut state = self.lock();
            state.published = state.events.len();
            state.published as u64
        };
        self.progress.send_if_modified(|p| {
            let grew = p.len < len;
            p.len = len;
            grew
        });
    }

    /// Records the outcome unless one is already recorded; returns whether
    /// this call recorded it.
    pub(crate) fn end(&self, outcome: Outcome) -> bool {
        let mut state = self.lock();
        if state.outcome.is_some() {
            return false;
        }
        state.outcome = Some(outcome);
        // Whatever was pushed is part of the reply that ended.
        state.published = state.events.len();
        let len = state.published as u64;
        drop(state);
        self.progress.send_modify(|p| {
            p.len = len;
            p.ended = true;
        });
        true
    }

    pub(crate) fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    /// Events readers can see.
    pub(crate) fn len(&self) -> u64 {
        self.lock().published as u64
    }

    /// Raw events from `cursor` on: at most `max_events`, and no more than
    /// about `max_bytes` of payload (always at least one event when there
    /// is one).
    pub(crate) fn raw(
        &self,
        cursor: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Vec<ProviderEvent> {
        let state = self.lock();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        let Some(pending) = state.visible().get(start..) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for event in pending.iter().take(max_events) {
            let size = payload_bytes(event);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push(event.clone());
        }
        out
    }

    /// Everything past `cursor`, coalesced, up to about `max_frame_bytes`
    /// of payload; `None` when nothing is past the cursor.
    pub(crate) fn read(&self, cursor: u64, max_frame_bytes: usize) -> Option<Vec<Frame>> {
        let state = self.lock();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        let pending = state
            .visible()
            .get(start..)
            .filter(|rest| !rest.is_empty())?;
        let frames = coalesce(pending, cursor, max_frame_bytes);
        let merged: Vec<u64> = frames
            .iter()
            .map(|f| f.next - f.offset)
            .filter(|n| *n > 1)
            .collect();
        if !merged.is_empty() {
            let metrics = crate::metrics::get();
            metrics.coalesced_frames.inc_by(merged.len() as u64);
            metrics.coalesced_events.inc_by(merged.iter().sum());
        }
        Some(frames)
    }
}

/// Merges `events` (which start at offset `first`) into frames. Stops once
/// a read's payload reaches `max_frame_bytes`, so one read stays bounded
/// even when a reader resumes far behind; the reader simply reads again.
pub(crate) fn coalesce(events: &[ProviderEvent], first: u64, max_frame_bytes: usize) -> Vec<Frame> {
    let mut frames: Vec<Frame> = Vec::new();
    let mut budget = max_frame_bytes;
    for (i, event) in events.iter().enumerate() {
        let offset = first + i as u64;
        let size = payload_bytes(event);
        if let Some(last) = frames.last_mut() {
            if size <= budget && merge(&mut last.event, event) {
                last.next = offset + 1;
                budget -= size;
                continue;
            }
            if size > budget {
                break;
            }
        }
        budget = budget.saturating_sub(size);
        frames.push(Frame {
            offset,
            next: offset + 1,
            event: event.clone(),
        });
    }
    frames
}

/// Appends `next` to `into` when they are deltas of one kind; returns
/// whether it did.
fn merge(into: &mut ProviderEvent, next: &ProviderEvent) -> bool {
    match (into, next) {
        (ProviderEvent::Text(a), ProviderEvent::Text(b))
        | (ProviderEvent::Reasoning(a), ProviderEvent::Reasoning(b))
        | (ProviderEvent::Refusal(a), ProviderEvent::Refusal(b)) => {
            a.push_str(b);
            true
        }
        (ProviderEvent::ToolCall(a), ProviderEvent::ToolCall(b)) if continues(a, b) => {
            a.arguments.push_str(&b.arguments);
            true
        }
        _ => false,
    }
}

/// A fragment continues a call when it is the same call and starts nothing.
fn continues(call: &ToolCallDelta, fragment: &ToolCallDelta) -> bool {
    call.index == fragment.index && fragment.id.is_none() && fragment.name.is_none()
}

/// Bytes an event contributes to a frame and to the reply bound.
pub(crate) fn payload_bytes(event: &ProviderEvent) -> usize {
    match event {
        ProviderEvent::Text(text)
        | ProviderEvent::Reasoning(text)
        | ProviderEvent::Refusal(text) => text.len(),
        ProviderEvent::ToolCall(call) => {
            call.arguments.len()
                + call.id.as_ref().map_or(0, String::len)
                + call.name.as_ref().map_or(0, String::len)
        }
        // Small fixed-size events; counted so a flood of them is bounded too.
        ProviderEvent::Usage(_) | ProviderEvent::Finish(_) | ProviderEvent::Restart => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::FinishReason;

    fn text(s: &str) -> ProviderEvent {
        ProviderEvent::Text(s.to_owned())
    }

    #[test]
    fn consecutive_text_deltas_merge_into_one_frame() {
        let events = [text("Hel"), text("lo"), text(" world")];
        let frames = coalesce(&events, 0, 1024);
        assert_eq!(
            frames,
            vec![Frame {
                offset: 0,
                next: 3,
                event: text("Hello world")
            }]
        );
    }

    #[test]
    fn different_kinds_do_not_merge_and_keep_offsets() {
        let events = [
            ProviderEvent::Reasoning("think".into()),
            text("a"),
            text("b"),
            ProviderEvent::Finish(FinishReason::Stop),
        ];
        let frames = coalesce(&events, 10, 1024);
        let offsets: Vec<(u64, u64)> = frames.iter().map(|f| (f.offset, f.next)).collect();
        assert_eq!(offsets, vec![(10, 11), (11, 13), (13, 14)]);
        assert_eq!(frames[1].event, text("ab"));
    }

    #[test]
    fn a_read_stops_at_the_frame_budget() {
        let events = [text("aaaa"), text("bbbb"), text("cccc")];
        let frames = coalesce(&events, 0, 8);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].event, text("aaaabbbb"));
        assert_eq!(frames[0].next, 2, "the third delta waits for the next read");
    }

    #[test]
    fn an_oversized_single_event_still_makes_progress() {
        let events = [text("0123456789"), text("x")];
        let frames = coalesce(&events, 0, 4);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].event, text("0123456789"));
        assert_eq!(frames[0].next, 1);
    }

    #[test]
    fn pushed_events_stay_invisible_until_published_and_wake_readers_once() {
        let log = Log::new(1 << 20);
        let mut progress = log.subscribe();
        progress.mark_unchanged();
        for word in ["a", "b", "c"] {
            assert_eq!(log.push(text(word)), Appended::Yes);
        }
        assert!(
            log.read(0, 1024).is_none(),
            "nothing readable before publish"
        );
        assert_eq!(log.len(), 0);
        assert!(!progress.has_changed().expect("sender alive"));
        log.publish();
        assert!(progress.has_changed().expect("sender alive"));
        assert_eq!(progress.borrow_and_update().len, 3);
        let frames = log.read(0, 1024).expect("the burst");
        assert_eq!(frames.len(), 1, "one read takes the whole burst");
        assert_eq!(frames[0].event, text("abc"));
        // Publishing with nothing new wakes nobody.
        log.publish();
        assert!(!progress.has_changed().expect("sender alive"));
    }

    #[test]
    fn ending_the_log_publishes_what_was_pushed() {
        let log = Log::new(1 << 20);
        log.push(text("x"));
        assert!(log.end(Outcome::Complete));
        assert_eq!(log.len(), 1);
        assert_eq!(
            log.read(0, 1024).expect("the pushed event")[0].event,
            text("x")
        );
        // The reply bound ends the log the same way.
        let log = Log::new(2 * EVENT_OVERHEAD + 4);
        assert_eq!(log.push(text("ab")), Appended::Yes);
        assert_eq!(log.push(text("cdefgh")), Appended::TooLarge);
        assert_eq!(log.len(), 1);
        assert!(log.outcome().is_some());
    }

    #[test]
    fn tool_call_fragments_merge_per_call() {
        let start = |index, id: &str| {
            ProviderEvent::ToolCall(ToolCallDelta {
                index,
                id: Some(id.into()),
                name: Some("f".into()),
                arguments: String::new(),
            })
        };
        let args = |index, a: &str| {
            ProviderEvent::ToolCall(ToolCallDelta {
                index,
                arguments: a.into(),
                ..ToolCallDelta::default()
            })
        };
        let events = [
            start(0, "a"),
            args(0, "{\"x\""),
            args(0, ":1}"),
            start(1, "b"),
            args(1, "{}"),
        ];
        let frames = coalesce(&events, 0, 1024);
        assert_eq!(frames.len(), 2);
        let ProviderEvent::ToolCall(first) = &frames[0].event else {
            panic!("expected a tool call, got {:?}", frames[0].event);
        };
        assert_eq!(first.arguments, "{\"x\":1}");
        assert_eq!(first.id.as_deref(), Some("a"));
        assert_eq!((frames[1].offset, frames[1].next), (3, 5));
    }

    #[test]
    fn appending_past_the_reply_bound_ends_the_log() {
        // Room for 10 bytes of text in two events.
        let log = Log::new(10 + 2 * EVENT_OVERHEAD);
        assert_eq!(log.append(text("12345")), Appended::Yes);
        assert_eq!(log.append(text("123456")), Appended::TooLarge);
        assert_eq!(log.len(), 1);
        match log.outcome() {
            Some(Outcome::Failed(err)) => assert_eq!(err.class, ErrorClass::ReplyTooLarge),
            other => panic!("expected reply_too_large, got {other:?}"),
        }
        assert_eq!(log.append(text("x")), Appended::Ended);
    }

    #[test]
    fn reads_from_any_offset_replay_the_same_text() {
        let log = Log::new(1 << 20);
        let words = ["a", "bb", "ccc", "dddd", "eeeee"];
        for word in words {
            log.append(text(word));
        }
        let whole: String = words.concat();
        for start in 0..words.len() as u64 {
            let mut cursor = start;
            let mut replayed = String::new();
            while let Some(frames) = log.read(cursor, 3) {
                for frame in frames {
                    assert_eq!(frame.offset, cursor, "frames are contiguous");
                    cursor = frame.next;
                    if let ProviderEvent::Text(t) = frame.event {
                        replayed.push_str(&t);
                    }
                }
            }
            let skipped: usize = words[..start as usize].iter().map(|w| w.len()).sum();
            assert_eq!(replayed, whole[skipped..]);
        }
    }
}

//! A connection's queue of room events (messages from other devices,
//! presence, typing, reply announcements, the hello): small and bounded.
//! Answers to the connection's own frames (acks, errors, pongs) are written
//! directly by its loop.
//!
//! When it is full, what can be coalesced is: a newer presence event of a
//! conversation replaces the older one still queued (for the same users),
//! a typing event replaces the queued one of the same user. Anything else
//! that does not fit marks the outbox **overflowed**: the connection closes
//! as a slow consumer (the client reconnects and resyncs from history).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use crate::protocol::ServerFrame;

/// The bounded event queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    /// Queued frames. A std mutex: push and pop only.
    queue: Mutex<VecDeque<ServerFrame>>,
    /// Wakes the connection's writer.
    notify: Notify,
    /// Most frames queued.
    capacity: usize,
    /// Set when a frame could not be queued: the connection must close.
    overflowed: AtomicBool,
    /// Approximate bytes queued (JSON size), for the per-connection figure.
    bytes: AtomicUsize,
}

/// What the writer gets.
#[derive(Debug)]
pub enum Popped {
    /// The next frame.
    Frame(ServerFrame),
    /// The queue overflowed: close as a slow consumer.
    Overflowed,
}

impl Outbox {
    /// An empty outbox of `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            overflowed: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Queues `frame`, coalescing when full; never blocks.
    pub fn push(&self, frame: ServerFrame) {
        let size = frame.to_json().len();
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= self.capacity {
            let replaced = queue
                .iter_mut()
                .rev()
                .find(|queued| supersedes(&frame, queued));
            match replaced {
                Some(slot) => {
                    let old = slot.to_json().len();
                    *slot = frame;
                    self.bytes.fetch_sub(old, Ordering::Relaxed);
                    self.bytes.fetch_add(size, Ordering::Relaxed);
                }
                None => self.overflowed.store(true, Ordering::Relaxed),
            }
        } else {
            queue.push_back(frame);
            self.bytes.fetch_add(size, Ordering::Relaxed);
        }
        drop(queue);
        self.notify.notify_one();
    }

    /// Waits for the next frame (or the overflow).
    pub async fn pop(&self) -> Popped {
        loop {
            let notified = self.notify.notified();
            if self.overflowed.load(Ordering::Relaxed) {
                return Popped::Overflowed;
            }
            if let Some(frame) = self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            {
                let size = frame.to_json().len();
                self.bytes.fetch_sub(
                    size.min(self.bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                return Popped::Frame(frame);
            }
            notified.await;
        }
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Whether `new` makes the queued frame `old` pointless.
fn supersedes(new: &ServerFrame, old: &ServerFrame) -> bool {
    match (new, old) {
        (
            ServerFrame::Presence {
                conversation_id: a,
                users: new_users,
                event: new_event,
                ..
            },
            ServerFrame::Presence {
                conversation_id: b,
                users: old_users,
                event: old_event,
                ..
            },
        ) => {
            a == b
                && (new_users == old_users || (new_event == "snapshot" && old_event == "snapshot"))
        }
        (
            ServerFrame::Typing {
                conversation_id: a,
                user_id: x,
                ..
            },
            ServerFrame::Typing {
                conversation_id: b,
                user_id: y,
                ..
            },
        ) => a == b && x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(event: &str, user: &str) -> ServerFrame {
        ServerFrame::Presence {
            conversation_id: "c".into(),
            event: event.into(),
            users: vec![user.into()],
            devices: 1,
        }
    }

    #[tokio::test]
    async fn a_full_outbox_coalesces_presence_and_overflows_otherwise() {
        let outbox = Outbox::new(2);
        outbox.push(presence("join", "a"));
        outbox.push(ServerFrame::Pong { id: None });
        // Full: the newer presence of the same user replaces the queued one.
        outbox.push(presence("leave", "a"));
        assert_eq!(outbox.len(), 2);
        match outbox.pop().await {
            Popped::Frame(ServerFrame::Presence { event, .. }) => assert_eq!(event, "leave"),
            other => panic!("expected the coalesced presence, got {other:?}"),
        }
        outbox.push(ServerFrame::Pong { id: None });
        // Full again, and nothing to coalesce with: overflow.
        outbox.push(ServerFrame::Pong { id: None });
        assert!(matches!(outbox.pop().await, Popped::Overflowed));
    }
}

//! Generations: in-flight assistant replies, the heart of the gateway.
//!
//! A [`Generation`] owns an append-only log of normalized events (see
//! `log.rs`) and runs as its own task, detached from any connection: the
//! task reads the upstream and appends; connections are [`Subscriber`]s
//! holding a cursor into the log. A subscriber's writer waits for data past
//! its cursor, takes everything available as coalesced [`Frame`]s, writes
//! them, and only then waits again, so a slow client costs O(1) extra
//! memory and never slows the upstream read or another subscriber.
//!
//! When the last subscriber leaves, the generation keeps running for its
//! grace period (so a reload can resume), then cancels the upstream: the
//! provider stream is dropped, which closes its TCP connection and stops
//! billing. A finished generation stays in the [`Registry`] for the resume
//! window, then is dropped.

mod log;
mod registry;
mod reply;

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use log::{CancelReason, Frame, Outcome};
pub use registry::{PersistTo, Registry, RegistryError, StartOptions};
pub use reply::{Reply, ToolCall};

use crate::error::ApiError;
use crate::provider::{ProviderError, ProviderEvent};
use crate::routing::{Ledger, RouteEvent, RouteStream, Served};
use crate::store::persister::Persister;
use crate::store::{MessageRow, MessageStatus, Record};
use crate::usage::{self, Pricing, UsageRecord};
use log::{Appended, Log, Progress};

/// A generation's id: a UUIDv7, so ids sort by creation time.
pub type GenerationId = Uuid;

/// The epoch of every log this process holds: its start time in Unix ms.
/// A resume that names another epoch refers to a log this process never
/// had (it restarted, or the log lives elsewhere): the client must reload
/// from history rather than risk a gap.
pub fn epoch() -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

/// One in-flight (or recently finished) assistant reply.
#[derive(Debug)]
pub struct Generation {
    id: GenerationId,
    /// The epoch of the log: this process's, or for a replica, that of the
    /// instance producing it.
    epoch: u64,
    /// For a replica of a reply produced on another instance: that
    /// instance's node id.
    origin: Option<String>,
    /// Unix seconds at creation (OpenAI's `created`).
    created: u64,
    /// The model name the client asked for.
    model: String,
    /// The target answering now (the last one that accepted).
    served: Mutex<Option<Served>>,
    /// Every upstream attempt, for usage and cost.
    ledger: Arc<Ledger>,
    /// Prices, for the usage record's cost.
    pricing: Arc<Pricing>,
    /// The usage record, once the generation has ended.
    usage: OnceLock<UsageRecord>,
    /// Where the finished reply goes.
    persist: Option<(Persister, PersistTo)>,
    /// Whose reply this is, and in which conversation (even when not
    /// persisted).
    persist_to: Option<PersistTo>,
    /// The event log every subscriber reads.
    log: Log,
    /// Largest coalesced frame handed to a subscriber.
    max_frame_bytes: usize,
    /// Live subscriber count; the driver watches it for abandonment.
    subscribers: watch::Sender<usize>,
    /// How long the generation runs on with no subscriber.
    grace: Duration,
    /// Cancels the upstream (client cancel, shutdown).
    cancel: CancellationToken,
}

impl Generation {
    /// The generation's id.
    pub fn id(&self) -> GenerationId {
        self.id
    }

    /// Unix seconds at creation.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The model name the client asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The epoch of this generation's log.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// For a replica (a reply produced on another instance and followed
    /// here through the cluster), the producing instance's node id.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The conversation owner and conversation it answers, if it is stored.
    pub fn persisted_to(&self) -> Option<&PersistTo> {
        self.persist_to.as_ref()
    }

    /// The reply so far (or whole, once ended), assembled from the log.
    pub fn reply(&self) -> Reply {
        let mut reply = Reply::default();
        let mut cursor = 0;
        while let Some(frames) = self.log.read(cursor, usize::MAX) {
            for frame in &frames {
                reply.apply(frame);
                cursor = frame.next;
            }
        }
        reply
    }

    /// The target answering now, once one has accepted.
    pub fn served(&self) -> Option<Served> {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The upstream model that is answering (what OpenAI's `model` field
    /// reports), or the requested name before any target accepted.
    pub fn answering_model(&self) -> String {
        self.served()
            .map_or_else(|| self.model.clone(), |s| s.model)
    }

    /// What the reply consumed; set once the generation has ended.
    pub fn usage(&self) -> Option<&UsageRecord> {
        self.usage.get()
    }

    /// The outcome, once there is one.
    pub fn outcome(&self) -> Option<Outcome> {
        self.log.outcome()
    }

    /// Events in the log so far.
    pub fn len(&self) -> u64 {
        self.log.len()
    }

    /// Whether the log holds no events yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the generation: the upstream is cancelled and the log ends with
    /// [`Outcome::Cancelled`] (unless it already ended).
    pub fn cancel(&self, reason: CancelReason) {
        if self.log.end(Outcome::Cancelled(reason)) {
            tracing::info!(generation = %self.id, ?reason, "generation cancelled");
        }
        self.cancel.cancel();
    }

    /// A new subscriber reading from `offset` (clamped to the log's length).
    pub fn subscribe(self: &Arc<Self>, offset: u64) -> Subscriber {
        self.subscribers.send_modify(|n| *n += 1);
        Subscriber {
            cursor: offset.min(self.len()),
            progress: self.log.subscribe(),
            generation: Arc::clone(self),
        }
    }

    /// Reads the dispatched reply into the log until it ends, the
    /// generation is cancelled, or every subscriber has been gone for the
    /// grace period; then records its usage.
    async fn drive(self: Arc<Self>, dispatch: RouteStream) {
        let abandoned = abandoned(self.subscribers.subscribe(), self.grace);
        tokio::pin!(abandoned);
        let outcome = tokio::select! {
            // Cancellation and abandonment win over a ready upstream event:
            // once nobody wants the reply, we stop paying for it.
            biased;
            // `cancel()` records its own reason first; if nothing is
            // recorded, the token was cancelled from above: shutdown.
            () = self.cancel.cancelled() => Outcome::Cancelled(CancelReason::Shutdown),
            () = &mut abandoned => Outcome::Cancelled(CancelReason::Abandoned),
            // Dropping this future (when another arm wins) drops the
            // dispatch and with it the upstream connection.
            outcome = self.relay(dispatch) => outcome,
        };
        // Whatever ended the reply, nobody may keep the upstream alive.
        self.cancel.cancel();
        // An explicit `cancel()` may have ended the log first: its reason
        // stands.
        let outcome = self.log.outcome().unwrap_or(outcome);
        let record = self.usage_record(&outcome);
        if let Some((persister, to)) = &self.persist {
            let message = self.assistant_message(to, &record, &outcome);
            // Readers see the end only once the reply is journaled: a
            // client that got `[DONE]` has an acknowledged reply, which a
            // crash cannot lose.
            if let Err(err) = persister.submit(&Record::Message(message)).await {
                tracing::error!(generation = %self.id, %err, "could not persist the reply");
            }
        }
        // The usage is readable by the time anyone sees the end.
        drop(self.usage.set(record.clone()));
        self.log.end(outcome);
        tracing::info!(
            generation = %self.id,
            model = %record.model,
            provider = record.provider.as_deref().unwrap_or("-"),
            upstream_model = record.upstream_model.as_deref().unwrap_or("-"),
            outcome = record.outcome,
            error = record.error.unwrap_or("-"),
            attempts = record.attempts.len(),
            prompt_tokens = record.usage.prompt_tokens,
            completion_tokens = record.usage.completion_tokens,
            estimated = record.estimated,
            cost_usd = record.cost_usd,
            events = self.len(),
            "generation ended"
        );
    }

    /// The assistant message of the ended generation: its whole text (or
    /// what there is of it), how it ended, who answered and what it cost.
    fn assistant_message(
        &self,
        to: &PersistTo,
        record: &UsageRecord,
        outcome: &Outcome,
    ) -> MessageRow {
        let reply = self.reply();
        let status = match outcome {
            Outcome::Complete => MessageStatus::Complete,
            Outcome::Failed(_) => MessageStatus::Failed,
            Outcome::Cancelled(_) => MessageStatus::Aborted,
        };
        MessageRow {
            id: Uuid::now_v7().to_string(),
            conversation_id: to.conversation_id.clone(),
            tenant_id: to.owner.tenant_id.clone(),
            user_id: to.owner.user_id.clone(),
            role: "assistant".into(),
            // PostgreSQL cannot store NUL in text.
            content: reply.text.replace('\0', "\u{FFFD}"),
            status,
            model: record.upstream_model.clone(),
            provider: record.provider.clone(),
            prompt_tokens: i64::try_from(record.usage.prompt_tokens).ok(),
            completion_tokens: i64::try_from(record.usage.completion_tokens).ok(),
            cost_usd: record.cost_usd,
            usage_estimated: record.estimated,
            client_message_id: None,
            generation_id: Some(self.id.to_string()),
            created_at: crate::store::now_ms(),
        }
    }

    /// Appends the dispatched events; returns how the reply ended. On
    /// success the last event is the usage billed over all attempts.
    ///
    /// Events the dispatch has already decoded (an upstream read often
    /// carries hundreds of tokens) are pushed as one burst, up to
    /// [`BURST`], and published with one wake-up.
    async fn relay(&self, mut dispatch: RouteStream) -> Outcome {
        while let Some(mut item) = dispatch.next().await {
            let mut pushed = 0;
            let finished = loop {
                if let Some(outcome) = self.take(item) {
                    self.log.publish();
                    return outcome;
                }
                pushed += 1;
                if pushed == BURST {
                    break false;
                }
                match dispatch.next().now_or_never() {
                    Some(Some(ready)) => item = ready,
                    Some(None) => break true,
                    // Nothing more decoded yet: publish the burst and wait.
                    None => break false,
                }
            };
            self.log.publish();
            if finished {
                break;
            }
        }
        drop(dispatch);
        let (total, _, _) = usage::total(&self.ledger.attempts(), &self.pricing);
        self.log.append(ProviderEvent::Usage(total));
        Outcome::Complete
    }

    /// Pushes one dispatched item into the log (unpublished); the outcome
    /// if it ended the reply.
    fn take(&self, item: Result<RouteEvent, ProviderError>) -> Option<Outcome> {
        let event = match item {
            Ok(RouteEvent::Accepted(served)) => {
                self.set_served(served);
                self.log.mark_accepted();
                return None;
            }
            Ok(RouteEvent::Restart(served)) => {
                self.set_served(served);
                self.log.mark_accepted();
                ProviderEvent::Restart
            }
            Ok(RouteEvent::Event(event)) => event,
            Err(err) => return Some(Outcome::Failed(err)),
        };
        match self.log.push(event) {
            Appended::Yes => None,
            Appended::Ended | Appended::TooLarge => {
                Some(self.log.outcome().unwrap_or(Outcome::Complete))
            }
        }
    }

    fn set_served(&self, served: Served) {
        *self.served.lock().unwrap_or_else(PoisonError::into_inner) = Some(served);
    }

    /// The usage record of the ended generation.
    fn usage_record(&self, outcome: &Outcome) -> UsageRecord {
        let attempts = self.ledger.attempts();
        let (total, estimated, cost_usd) = usage::total(&attempts, &self.pricing);
        let (label, error) = match outcome {
            Outcome::Complete => ("complete", None),
            Outcome::Failed(err) => ("failed", Some(ApiError::from(err).code)),
            Outcome::Cancelled(CancelReason::Abandoned) => ("aborted", None),
            Outcome::Cancelled(_) => ("cancelled", None),
        };
        let served = self.served();
        UsageRecord {
            model: self.model.clone(),
            provider: served.as_ref().map(|s| s.provider.clone()),
            upstream_model: served.map(|s| s.model),
            outcome: label,
            error,
            usage: total,
            estimated,
            cost_usd,
            attempts,
        }
    }
}

/// Resolves once the subscriber count has stayed at zero for `grace`.
async fn abandoned(mut subscribers: watch::Receiver<usize>, grace: Duration) {
    loop {
        if subscribers.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        tokio::select! {
            biased;
            () = tokio::time::sleep(grace) => return,
            back = subscribers.wait_for(|n| *n > 0) => {
                if back.is_err() {
                    return;
                }
            }
        }
    }
}

/// What a subscriber's read returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// Coalesced frames past the cursor; the cursor has moved past them.
    Frames(Vec<Frame>),
    /// The log has ended and the cursor is at its end.
    End(Outcome),
}

/// A reader of one generation's log, with its own cursor. Dropping it
/// unsubscribes; the last one out starts the grace period.
#[derive(Debug)]
pub struct Subscriber {
    generation: Arc<Generation>,
    /// Offset of the next event this subscriber will read.
    cursor: u64,
    /// Wakes the subscriber when the log grows or ends.
    progress: watch::Receiver<Progress>,
}

impl Subscriber {
    /// The generation being read.
    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// Offset of the next event to read.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Waits until the upstream has accepted the request (content may
    /// follow) or the generation ended before that. Before acceptance
    /// nothing has reached the client, so a failure can still become a
    /// plain HTTP error.
    pub async fn accepted(&mut self) -> Result<(), Outcome> {
        let progress = self
            .progress
            .wait_for(|p| p.accepted || p.len > 0 || p.ended)
            .await
            .map(|p| *p)
            .unwrap_or(Progress {
                ended: true,
                ..Progress::default()
            });
        if progress.accepted || progress.len > 0 {
            return Ok(());
        }
        Err(self
            .generation
            .outcome()
            .unwrap_or(Outcome::Cancelled(CancelReason::Shutdown)))
    }

    /// Waits for events past the cursor (or the end) and takes everything
    /// available, coalesced.
    pub async fn read(&mut self) -> Read {
        loop {
            if let Some(frames) = self
                .generation
                .log
                .read(self.cursor, self.generation.max_frame_bytes)
            {
                if let Some(last) = frames.last() {
                    self.cursor = last.next;
                }
                return Read::Frames(frames);
            }
            if let Some(outcome) = self.generation.outcome() {
                // Events appended before the outcome are all read by now:
                // the outcome is recorded after the last append.
                if self.generation.log.read(self.cursor, 1).is_none() {
                    return Read::End(outcome);
                }
                continue;
            }
            let cursor = self.cursor;
            if self
                .progress
                .wait_for(|p| p.len > cursor || p.ended)
                .await
                .is_err()
            {
                // The log's sender lives as long as the generation we hold.
                return Read::End(Outcome::Cancelled(CancelReason::Shutdown));
            }
            // Woken by the first event of a burst: let the relay append the
            // rest before reading, so one frame (one socket write) carries
            // the burst rather than its first event alone. Keep yielding
            // while the log grows, up to a bound; stop after two yields in
            // a row saw no growth. Two, not one: hyper re-polls an SSE body
            // at once after a `Pending`, so its first yield often returns
            // before the relay has run at all (measured: one token per
            // `writev` with one, ~60 with two). A paced reply (one token per
            // wake-up) reads after two quick yields.
            let mut seen = self.progress.borrow().len;
            let mut still = 0; // consecutive yields without growth
            for _ in 0..SPIN {
                tokio::task::yield_now().await;
                let now = self.progress.borrow().len;
                if now - cursor >= BURST as u64 {
                    break;
                }
                if now == seen {
                    still += 1;
                    if still == 2 {
                        break;
                    }
                } else {
                    still = 0;
                }
                seen = now;
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.generation
            .subscribers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Most events the relay pushes before waking the readers: bounds how long
/// the first token of a burst waits for the rest (each push is well under
/// a microsecond).
const BURST: usize = 64;

/// Most yields a woken reader spends letting a burst accumulate.
const SPIN: usize = 16;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Everything needed to build a generation; the registry fills it in.
pub(crate) struct Spec {
    pub model: String,
    pub dispatch: RouteStream,
    pub ledger: Arc<Ledger>,
    pub pricing: Arc<Pricing>,
    pub persist: Option<(Persister, PersistTo)>,
    pub persist_to: Option<PersistTo>,
    pub grace: Duration,
    pub max_frame_bytes: usize,
    pub max_reply_bytes: usize,
    pub cancel: CancellationToken,
}

impl Generation {
    /// Creates the generation and its first subscriber (so it is never
    /// observed without one), and returns the driver future.
    pub(crate) fn create(
        spec: Spec,
    ) -> (
        Arc<Self>,
        Subscriber,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let generation = Arc::new(Self {
            id: Uuid::now_v7(),
            epoch: epoch(),
            origin: None,
            created: unix_now(),
            model: spec.model,
            served: Mutex::new(None),
            ledger: spec.ledger,
            pricing: spec.pricing,
            usage: OnceLock::new(),
            persist: spec.persist,
            persist_to: spec.persist_to,
            log: Log::new(spec.max_reply_bytes),
            max_frame_bytes: spec.max_frame_bytes,
            subscribers: watch::Sender::new(0),
            grace: spec.grace,
            cancel: spec.cancel,
        });
        let subscriber = generation.subscribe(0);
        let driver = Arc::clone(&generation).drive(spec.dispatch);
        (generation, subscriber, driver)
    }
}

/// What a replica is built from: the producing instance's description of
/// the reply.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// The generation's id (the same on every instance).
    pub id: GenerationId,
    /// The producing instance's epoch.
    pub epoch: u64,
    /// The producing instance's node id.
    pub origin: String,
    /// The model name the client asked for.
    pub model: String,
    /// Whose reply it is and which conversation it answers.
    pub persist_to: PersistTo,
    /// Unix seconds at creation.
    pub created: u64,
}

impl Generation {
    /// A replica of a reply produced on another instance: its log is filled
    /// by the cluster's follower ([`Generation::replicate`],
    /// [`Generation::end_replica`]) instead of an upstream, and subscribers
    /// read it exactly like a local one. Bounded like a local log.
    pub fn replica(spec: ReplicaSpec, max_frame_bytes: usize, max_reply_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            id: spec.id,
            epoch: spec.epoch,
            origin: Some(spec.origin),
            created: spec.created,
            model: spec.model,
            served: Mutex::new(None),
            ledger: Arc::new(Ledger::default()),
            pricing: Arc::new(crate::usage::Pricing::default()),
            usage: OnceLock::new(),
            persist: None,
            persist_to: Some(spec.persist_to),
            log: Log::new(max_reply_bytes),
            max_frame_bytes,
            subscribers: watch::Sender::new(0),
            grace: Duration::ZERO,
            cancel: CancellationToken::new(),
        })
    }

    /// Appends an event to a replica's log (the producer accepted long
    /// ago); false when the log has ended.
    pub fn replicate(&self, event: ProviderEvent) -> bool {
        self.log.mark_accepted();
        matches!(self.log.append(event), Appended::Yes)
    }

    /// Ends a replica's log with the producer's outcome.
    pub fn end_replica(&self, outcome: Outcome) {
        self.log.mark_accepted();
        self.log.end(outcome);
    }

    /// Raw events from `cursor` on (at most `max_events`, about `max_bytes`
    /// of payload), for mirroring the log elsewhere.
    pub fn events_from(
        &self,
        cursor: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Vec<ProviderEvent> {
        self.log.raw(cursor, max_events, max_bytes)
    }

    /// Waits until the log holds more than `cursor` events or has ended.
    /// Does not count as a subscriber.
    pub async fn changed_past(&self, cursor: u64) {
        let mut progress = self.log.subscribe();
        // The sender lives as long as `self`.
        drop(progress.wait_for(|p| p.len > cursor || p.ended).await);
    }

    /// Waits until the generation has ended (its usage is then set).
    pub async fn ended(&self) {
        let mut progress = self.log.subscribe();
        drop(progress.wait_for(|p| p.ended).await);
    }

    /// Waits until the log holds at least `len` events or has ended; true
    /// when it holds them.
    pub async fn reached(&self, len: u64) -> bool {
        let mut progress = self.log.subscribe();
        drop(progress.wait_for(|p| p.len >= len || p.ended).await);
        self.len() >= len
    }

    /// Subscribers reading now.
    pub fn subscriber_count(&self) -> usize {
        *self.subscribers.borrow()
    }

    /// Waits until nobody has read the log for `grace`.
    pub async fn unwatched_for(&self, grace: Duration) {
        abandoned(self.subscribers.subscribe(), grace).await;
    }
}

/// An error that ended a generation, if it failed.
pub fn failure(outcome: &Outcome) -> Option<&ProviderError> {
    match outcome {
        Outcome::Failed(err) => Some(err),
        _ => None,
    }
}

//! The write-behind persister: streams never wait on the database, and a
//! record the gateway acknowledged is never lost.
//!
//! ```text
//! submit ─▶ bounded queue ─▶ journal thread ─▶ journal (fsync, group commit) ─▶ ack
//!                                                  │ durable end (watch)
//!                                                  ▼
//!                             writer task: read batch ─▶ Store::write_batch (one tx)
//!                                          retry with backoff while the database fails
//!                                          ─▶ checkpoint ─▶ drop stored segments
//! ```
//!
//! **Why everything is journaled first.** A record is acknowledged only once
//! it is on local disk (fsync'd, many records per fsync). An in-memory queue
//! alone would lose acknowledged records to a SIGKILL or a crash; the
//! journal does not. The journal is therefore the spill: while the database
//! is down or slow, records accumulate there (bounded by disk, reported as
//! `spill_bytes`), never in memory, and never block or drop a stream. The
//! only in-memory queue is the bounded submission queue in front of the
//! journal thread (`store.queue_capacity`); a full queue makes submitters
//! wait for the disk, which is the right backpressure.
//!
//! **Replay.** The writer reads the journal from the checkpoint (everything
//! before it is in the database): at start that replays whatever a crash
//! left; after an outage it simply catches up. Writes are idempotent upserts
//! keyed by id, so a record written twice (a crash between the database
//! commit and the checkpoint) is stored once.
//!
//! **Shutdown** closes the queue, lets the journal thread finish, then gives
//! the writer `store.shutdown_flush_secs` to catch up; what it cannot store
//! stays in the journal for the next start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::journal::{self, Journal, JournalConfig, JournalReader, Position};
use super::{Record, Store, StoreError};
use crate::config::StoreConfig;

/// Most records one fsync covers.
const MAX_GROUP: usize = 1024;

/// Why a record was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PersistError {
    /// The persister is shut down.
    #[error("the persister is shut down")]
    Closed,
    /// The journal could not be written (disk full, I/O error): the record
    /// is not durable and was not acknowledged.
    #[error("journal write failed: {0}")]
    Journal(String),
    /// The record could not be encoded.
    #[error("record encoding failed: {0}")]
    Encode(String),
}

/// Counters for metrics (the `/metrics` endpoint reads them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Records acknowledged (journaled).
    pub journaled: AtomicU64,
    /// Records written to the database (including replays).
    pub stored: AtomicU64,
    /// Records journaled but not yet stored: the queue depth.
    pub pending: AtomicI64,
    /// Journal bytes not yet stored: the spill size.
    pub spill_bytes: AtomicU64,
    /// Failed database batch writes.
    pub write_errors: AtomicU64,
    /// Duration of the last successful batch write, in microseconds.
    pub last_batch_micros: AtomicU64,
    /// Journal records that could not be decoded (skipped).
    pub corrupt_records: AtomicU64,
    /// Bytes of torn tail cut at the last recovery.
    pub torn_bytes: AtomicU64,
    /// Records the database refused for good (a constraint or data error
    /// no retry can fix): logged (ids only) and skipped, so one bad record
    /// cannot block every write after it.
    pub dead_records: AtomicU64,
}

enum Submission {
    /// A record to journal; `ack` hears when it is durable.
    Record {
        payload: Vec<u8>,
        /// The conversation the record belongs to.
        conversation: String,
        ack: Option<oneshot::Sender<Result<(), PersistError>>>,
    },
    /// Stop after what is queued.
    Close,
}

/// The handle the chat path holds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Persister {
    queue: mpsc::Sender<Submission>,
    /// The journal's durable end, advanced after every fsync.
    durable: watch::Receiver<Position>,
    /// How far the database has caught up.
    stored: watch::Receiver<Position>,
    /// Per conversation, where its latest record ends in the journal, until
    /// the database has caught up past it.
    unstored: Arc<Unstored>,
    /// The journal's end at startup: records replayed from it may belong
    /// to any conversation.
    recovered: Position,
    stats: Arc<Stats>,
}

/// Conversations with journaled records the database does not have yet.
/// Bounded by the records in flight: the writer drops an entry once it has
/// stored past it.
type Unstored = Mutex<HashMap<String, Position>>;

fn lock_unstored(unstored: &Unstored) -> std::sync::MutexGuard<'_, HashMap<String, Position>> {
    // Each critical section is one insert, lookup or retain.
    unstored.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Record { payload, .. } => write!(f, "Record({} bytes)", payload.len()),
            Self::Close => f.write_str("Close"),
        }
    }
}

/// The persister's running parts, for shutdown.
#[derive(Debug)]
pub struct Running {
    queue: mpsc::Sender<Submission>,
    journal_thread: Option<std::thread::JoinHandle<()>>,
    writer: tokio::task::JoinHandle<()>,
    /// Tells the writer to stop waiting for more once it has caught up.
    draining: CancellationToken,
}

impl Persister {
    /// Opens the journal (recovering a torn tail), and starts the journal
    /// thread and the database writer, which first replays whatever the
    /// journal holds past its checkpoint.
    pub async fn start(
        store: Arc<dyn Store>,
        config: &StoreConfig,
    ) -> Result<(Self, Running), PersistError> {
        let dir = config.journal_dir();
        let journal_config = JournalConfig {
            dir: dir.clone(),
            segment_bytes: config.journal_segment_bytes,
        };
        let (journal, recovery) =
            tokio::task::spawn_blocking(move || Journal::open(journal_config))
                .await
                .map_err(|err| PersistError::Journal(err.to_string()))?
                .map_err(|err| PersistError::Journal(err.to_string()))?;
        let stats = Arc::new(Stats::default());
        stats
            .torn_bytes
            .store(recovery.torn_bytes, Ordering::Relaxed);
        stats.pending.store(
            i64::try_from(recovery.pending_records).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        if recovery.torn_bytes > 0 {
            tracing::warn!(
                segment = recovery.torn_segment,
                torn_bytes = recovery.torn_bytes,
                "journal had a torn tail (a crash mid-write); kept every whole record"
            );
        }
        if recovery.pending_records > 0 {
            tracing::info!(
                records = recovery.pending_records,
                "replaying journaled records into the database"
            );
        }

        let (queue, intake) = mpsc::channel(config.queue_capacity);
        let (durable_tx, durable) = watch::channel(recovery.end);
        let (stored_tx, stored) = watch::channel(recovery.checkpoint);
        let thread_stats = Arc::clone(&stats);
        let unstored = Arc::new(Unstored::default());
        let thread_unstored = Arc::clone(&unstored);
        let journal_thread = std::thread::Builder::new()
            .name("spillway-journal".into())
            .spawn(move || {
                journal_loop(
                    journal,
                    intake,
                    &durable_tx,
                    &thread_unstored,
                    &thread_stats,
                );
            })
            .map_err(|err| PersistError::Journal(err.to_string()))?;

        let draining = CancellationToken::new();
        let writer = tokio::spawn(write_loop(Writer {
            store,
            dir,
            from: recovery.checkpoint,
            durable: durable.clone(),
            stored: stored_tx,
            unstored: Arc::clone(&unstored),
            stats: Arc::clone(&stats),
            draining: draining.clone(),
            max_rows: config.batch_max_rows,
            max_delay: Duration::from_millis(config.batch_max_delay_ms),
            retry_base: Duration::from_millis(config.retry_base_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
        }));
        let persister = Self {
            queue: queue.clone(),
            durable,
            stored,
            unstored,
            recovered: recovery.end,
            stats,
        };
        let running = Running {
            queue,
            journal_thread: Some(journal_thread),
            writer,
            draining,
        };
        Ok((persister, running))
    }

    /// Submits `record` and waits until it is durable (journaled and
    /// fsync'd): from then on it will reach the database.
    pub async fn submit(&self, record: &Record) -> Result<(), PersistError> {
        let payload = encode(record)?;
        let (ack, acked) = oneshot::channel();
        self.queue
            .send(Submission::Record {
                payload,
                conversation: conversation_of(record).to_owned(),
                ack: Some(ack),
            })
            .await
            .map_err(|_| PersistError::Closed)?;
        acked.await.unwrap_or(Err(PersistError::Closed))
    }

    /// Queues `record` without waiting for it to be durable: for writes
    /// nobody acknowledges (it still waits for queue room, which is the
    /// backpressure of a saturated disk).
    pub async fn enqueue(&self, record: &Record) -> Result<(), PersistError> {
        let payload = encode(record)?;
        self.queue
            .send(Submission::Record {
                payload,
                conversation: conversation_of(record).to_owned(),
                ack: None,
            })
            .await
            .map_err(|_| PersistError::Closed)
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Waits until everything journaled so far is in the database.
    pub async fn flushed(&self) {
        let target = *self.durable.borrow();
        self.stored_past(target).await;
    }

    /// Waits until every record of `conversation` journaled so far (and
    /// whatever the journal held at startup) is in the database: reading
    /// one conversation's history does not wait for everyone else's batch.
    pub async fn flushed_for(&self, conversation: &str) {
        let latest = lock_unstored(&self.unstored).get(conversation).copied();
        let target = latest.map_or(self.recovered, |p| p.max(self.recovered));
        self.stored_past(target).await;
    }

    async fn stored_past(&self, target: Position) {
        let mut stored = self.stored.clone();
        drop(stored.wait_for(|p| *p >= target).await);
    }
}

impl Running {
    /// Stops intake, journals what is queued, and gives the writer up to
    /// `deadline` to store everything; the rest stays in the journal.
    pub async fn shutdown(mut self, deadline: Duration) {
        // The queue is FIFO: Close is handled after everything before it.
        drop(self.queue.send(Submission::Close).await);
        if let Some(thread) = self.journal_thread.take() {
            drop(tokio::task::spawn_blocking(move || thread.join()).await);
        }
        self.draining.cancel();
        match tokio::time::timeout(deadline, &mut self.writer).await {
            Ok(_) => tracing::info!("persister flushed"),
            Err(_) => {
                self.writer.abort();
                tracing::warn!("persister flush deadline reached; the rest stays journaled");
            }
        }
    }
}

/// The conversation `record` belongs to.
fn conversation_of(record: &Record) -> &str {
    match record {
        Record::Conversation(row) => &row.id,
        Record::Message(row) => &row.conversation_id,
    }
}

/// A record as a journal payload, refused (alone) if it could never be
/// journaled, so it cannot fail the group commit of everyone else's.
fn encode(record: &Record) -> Result<Vec<u8>, PersistError> {
    let payload =
        serde_json::to_vec(record).map_err(|err| PersistError::Encode(err.to_string()))?;
    if payload.len() > journal::MAX_RECORD_BYTES {
        return Err(PersistError::Encode(format!(
            "record of {} bytes exceeds the journal's {} byte limit",
            payload.len(),
            journal::MAX_RECORD_BYTES
        )));
    }
    Ok(payload)
}

/// The journal thread: group commits until closed.
fn journal_loop(
    mut journal: Journal,
    mut intake: mpsc::Receiver<Submission>,
    durable: &watch::Sender<Position>,
    unstored: &Unstored,
    stats: &Stats,
) {
    let mut closing = false;
    while !closing {
        let Some(first) = intake.blocking_recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match intake.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut payloads = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        let mut conversations = Vec::with_capacity(batch.len());
        for submission in batch {
            match submission {
                Submission::Record {
                    payload,
                    conversation,
                    ack,
                } => {
                    payloads.push(payload);
                    conversations.push(conversation);
                    acks.push(ack);
                }
                Submission::Close => closing = true,
            }
        }
        if payloads.is_empty() {
            continue;
        }
        let count = payloads.len() as u64;
        let result = journal.append(&payloads).map_err(|err| {
            tracing::error!(%err, "journal write failed; records not acknowledged");
            PersistError::Journal(err.to_string())
        });
        if let Ok(end) = &result {
            stats.journaled.fetch_add(count, Ordering::Relaxed);
            stats
                .pending
                .fetch_add(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed);
            // Before anyone hears the records are durable, so a history
            // read right after the ack waits for them.
            let mut pending = lock_unstored(unstored);
            for conversation in conversations {
                pending.insert(conversation, *end);
            }
            drop(pending);
            durable.send_replace(*end);
        }
        for ack in acks.into_iter().flatten() {
            drop(ack.send(result.clone().map(|_| ())));
        }
    }
}

/// Everything the writer task needs.
struct Writer {
    store: Arc<dyn Store>,
    dir: PathBuf,
    from: Position,
    durable: watch::Receiver<Position>,
    stored: watch::Sender<Position>,
    unstored: Arc<Unstored>,
    stats: Arc<Stats>,
    draining: CancellationToken,
    max_rows: usize,
    max_delay: Duration,
    retry_base: Duration,
    retry_max: Duration,
}

/// The database writer: tails the journal from the checkpoint.
async fn write_loop(mut w: Writer) {
    let dir = w.dir.clone();
    let from = w.from;
    let mut reader =
        match tokio::task::spawn_blocking(move || JournalReader::open(&dir, from)).await {
            Ok(Ok(reader)) => reader,
            Ok(Err(err)) => {
                tracing::error!(%err, "cannot read the journal; records stay on disk");
                return;
            }
            Err(_) => return,
        };
    loop {
        let end = *w.durable.borrow_and_update();
        if reader.position() >= end {
            if w.draining.is_cancelled() {
                return;
            }
            tokio::select! {
                changed = w.durable.changed() => if changed.is_err() { return },
                () = w.draining.cancelled() => {}
            }
            continue;
        }
        // Let a batch fill, unless one is already full or we are draining.
        let pending = w.stats.pending.load(Ordering::Relaxed);
        if !w.draining.is_cancelled() && pending < w.max_rows as i64 && !w.max_delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(w.max_delay) => {}
                () = w.draining.cancelled() => {}
            }
        }
        let end = *w.durable.borrow();
        let max = w.max_rows;
        let read = tokio::task::spawn_blocking(move || {
            let batch = reader.read(end, max);
            (reader, batch)
        })
        .await;
        let (returned, batch) = match read {
            Ok(result) => result,
            Err(_) => return,
        };
        reader = returned;
        let batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(%err, "journal read failed; retrying");
                tokio::time::sleep(w.retry_max).await;
                continue;
            }
        };
        let Some(&(last, _)) = batch.last() else {
            continue;
        };
        let count = batch.len();
        let records: Vec<Record> = batch
            .iter()
            .filter_map(|(_, payload)| match serde_json::from_slice(payload) {
                Ok(record) => Some(record),
                Err(err) => {
                    w.stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%err, "undecodable journal record skipped");
                    None
                }
            })
            .collect();
        store_with_retry(&w, &records).await;
        w.stats
            .stored
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        w.stats
            .pending
            .fetch_sub(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed);
        let dir = w.dir.clone();
        let durable_end = *w.durable.borrow();
        let spill = tokio::task::spawn_blocking(move || {
            if let Err(err) = journal::write_checkpoint(&dir, last) {
                tracing::error!(%err, "checkpoint write failed (records will be rewritten, harmlessly)");
            }
            if let Err(err) = journal::remove_segments_before(&dir, last) {
                tracing::warn!(%err, "could not remove stored journal segments");
            }
            journal::bytes_between(&dir, last, durable_end)
        })
        .await
        .unwrap_or(0);
        w.stats.spill_bytes.store(spill, Ordering::Relaxed);
        lock_unstored(&w.unstored).retain(|_, end| *end > last);
        w.stored.send_replace(last);
    }
}

/// Whether the database refused for good: a data or constraint error that
/// the same write will meet again, as opposed to the database being away.
fn is_permanent(err: &StoreError) -> bool {
    match err {
        StoreError::Database(sqlx::Error::Database(db)) => {
            !matches!(db.kind(), sqlx::error::ErrorKind::Other)
                || db.code().is_some_and(|code| code.starts_with("22"))
        }
        StoreError::Database(sqlx::Error::Encode(_) | sqlx::Error::Decode(_))
        | StoreError::Corrupt(_) => true,
        _ => false,
    }
}

/// Writes one batch, retrying with capped exponential backoff for as long
/// as it takes (shutdown bounds it from outside). A batch refused for good
/// is written record by record, so only the records the database will
/// never take are skipped.
async fn store_with_retry(w: &Writer, records: &[Record]) {
    let mut delay = w.retry_base;
    loop {
        let started = Instant::now();
        match w.store.write_batch(records).await {
            Ok(()) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                w.stats.last_batch_micros.store(micros, Ordering::Relaxed);
                crate::metrics::get()
                    .persister_batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                return;
            }
            Err(err) if is_permanent(&err) => {
                w.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                for record in records {
                    store_one(w, record).await;
                }
                return;
            }
            Err(err) => {
                w.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, retry_in_ms = delay.as_millis() as u64, records = records.len(), "database write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(w.retry_max);
            }
        }
    }
}

/// Writes one record, retrying while the database is away; a record it
/// refuses for good is dropped and counted.
async fn store_one(w: &Writer, record: &Record) {
    let mut delay = w.retry_base;
    loop {
        match w.store.write_batch(std::slice::from_ref(record)).await {
            Ok(()) => return,
            Err(err) if is_permanent(&err) => {
                w.stats.dead_records.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%err, id = record.id(), "the database refused a record for good; skipped");
                return;
            }
            Err(err) => {
                w.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "database write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(w.retry_max);
            }
        }
    }
}

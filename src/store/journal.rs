//! The persister's write-ahead journal: an append-only, checksummed log of
//! opaque payloads on local disk (the persister writes JSON-encoded
//! [`Record`](super::Record)s), so that a record is durable before it is
//! acknowledged, whatever the database is doing.
//!
//! Plain blocking `std::fs` I/O: the persister calls it from its journal
//! thread and from `spawn_blocking`.
//!
//! # Layout
//!
//! One directory holds:
//!
//! - segment files, numbered from 1 and named by their number zero-padded
//!   to 20 digits so they sort (`00000000000000000001.seg`, …). Only the
//!   last (highest-numbered) one is ever appended to; the appender moves to
//!   the next number once the current one holds `segment_bytes` or more;
//! - `checkpoint.json`: the [`Position`] before which every record is in the
//!   database (absent: nothing is).
//!
//! A [`Position`] is a segment number and a byte offset in that segment.
//! Every position this module hands out is a record boundary: the position
//! just after a record (or the start of a segment). `Position::default()`,
//! `(0, 0)`, precedes every record.
//!
//! # Frame format
//!
//! Each record is one frame, back to back with no padding:
//!
//! ```text
//! [u32 LE payload length][u32 LE CRC-32 (IEEE) of the payload][payload]
//! ```
//!
//! Payloads are 1 to [`MAX_RECORD_BYTES`] bytes. The upper bound keeps a
//! garbage length from making a reader allocate gigabytes. The lower bound
//! exists because an empty payload's CRC is 0: a run of zero bytes (what
//! some file systems leave in a file's tail after a crash that extended the
//! file but lost its data) would otherwise read as a stream of valid empty
//! records. A length of 0 or over the limit is therefore damage, like a
//! CRC mismatch.
//!
//! # Durability
//!
//! - [`Journal::append`] writes a whole batch with one `write` and then
//!   fsyncs once (group commit). When it returns `Ok`, every record of the
//!   batch is on disk; the persister acknowledges records only then.
//! - A new segment file is created, and the directory fsynced so that its
//!   entry survives a crash, before the first batch that goes into it. The
//!   previous segment was fsynced by its own last append, so every segment
//!   but the last is complete.
//! - A failed append (I/O error, disk full, failed fsync) is cut back off
//!   the file, so the next batch starts right after the last acknowledged
//!   record and not after a half-written one. Its records were not
//!   acknowledged. If the process dies before that cut reaches the disk,
//!   they may come back at the next start as whole records and be replayed:
//!   harmless, because every record is an idempotent upsert.
//! - The checkpoint is replaced atomically: written to a temporary file,
//!   fsynced, renamed over `checkpoint.json`, then the directory is fsynced.
//!   A crash leaves the old checkpoint or the new one, never a mix.
//!
//! # Recovery
//!
//! [`Journal::open`] repairs the journal before anything is appended:
//!
//! 1. It reads the checkpoint. An unreadable one is an error, not a guess:
//!    deleting it makes the next start replay everything still on disk,
//!    which is safe (idempotent) but may be a lot.
//! 2. Segments before the checkpoint's segment are stored already; they are
//!    not read (the persister deletes them with
//!    [`remove_segments_before`]).
//! 3. Every segment from the checkpoint's on (and always the last one) is
//!    scanned from its start, frame by frame, until its end or the first
//!    damaged frame: a short length header, a payload shorter than its
//!    length says, a length of 0 or over [`MAX_RECORD_BYTES`], or a CRC
//!    mismatch.
//! 4. **Torn tail.** Damage at the end of the last segment is what a crash
//!    in the middle of an append leaves (those records were never
//!    acknowledged: `append` had not returned). The segment is truncated
//!    back to its last whole record (and fsynced), the records before it
//!    are all kept, and [`Recovery::torn_segment`] / [`Recovery::torn_bytes`]
//!    report what was cut.
//! 5. **Damage in an earlier segment** cannot come from a crash (that
//!    segment was complete and fsynced before the next one was created):
//!    it is the disk's doing. Without a resynchronisation marker nothing
//!    after the damaged frame in that segment can be trusted, so that
//!    segment is truncated there too, and reported the same way. The later
//!    segments are kept and replayed: they hold acknowledged records that
//!    are intact, and dropping them would lose them for nothing. When more
//!    than one segment is cut, `torn_segment` names the first and
//!    `torn_bytes` is the total.
//! 6. **Damage before the checkpoint** (in the checkpoint's own segment) is
//!    in records already stored: it is logged, left alone, and the scan
//!    resumes at the checkpoint, which is a record boundary by
//!    construction.
//!
//! Where replay starts ([`Recovery::checkpoint`]) is the stored checkpoint,
//! adjusted so that it names a record boundary the reader can start from:
//!
//! - a checkpoint in a segment that no longer exists (or the default one,
//!   before segment 1) moves to the start of the first segment after it;
//! - a checkpoint in the middle of a record (only a bug could write one)
//!   moves back to that record's start, so it is replayed rather than lost;
//! - **a checkpoint past the end** of the journal (the journal directory
//!   was wiped or restored from an older copy, but not the checkpoint) is
//!   treated as the end: nothing is pending, and the checkpoint file is
//!   rewritten to the end. Otherwise the records appended next would sit
//!   before the stale checkpoint and count as stored after the next
//!   restart.
//!
//! Recovery never panics on garbage: any byte sequence in a segment is
//! either whole records or damage.
//!
//! # Reading
//!
//! [`JournalReader`] tails the journal up to a limit the caller gives (the
//! appender's durable end, [`Journal::end`]), and never reads a byte past
//! it: past the durable end of the live segment an append may be in flight.
//! A segment the appender has moved past is read to its end, then the
//! reader moves to the next segment. Damage the reader meets (which
//! recovery would have cut, so it happened since) is an error: the reader
//! does not skip acknowledged records silently.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The largest payload a record may have. A length field over it is damage.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of a frame before its payload: length and CRC.
const HEADER_BYTES: u64 = 8;

/// The number of the first segment of a new journal.
const FIRST_SEGMENT: u64 = 1;

/// The segment file name's suffix.
const SEGMENT_SUFFIX: &str = ".seg";

/// The checkpoint's file name.
const CHECKPOINT_FILE: &str = "checkpoint.json";

/// Where a new checkpoint is written before it is renamed into place.
const CHECKPOINT_TEMP_FILE: &str = "checkpoint.json.tmp";

/// Where the journal lives and when it rolls over.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// The journal's directory (created if missing). One journal per
    /// directory: nothing stops a second appender, so two processes must
    /// never share it.
    pub dir: PathBuf,
    /// The size at or past which the next batch goes into a new segment, so
    /// stored records can be deleted a whole file at a time. A segment can
    /// exceed it by one batch.
    pub segment_bytes: u64,
}

/// A byte position in the journal: a segment number and an offset in it.
/// Ordered by segment, then offset, so later positions compare greater.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    /// The segment file's number.
    pub segment: u64,
    /// Bytes from the segment's start.
    pub offset: u64,
}

/// Why the bytes at a position are not a whole record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// Fewer bytes remain than a frame header needs.
    #[error("length header cut short")]
    ShortHeader,
    /// Fewer bytes remain than the length header announces.
    #[error("payload cut short")]
    ShortPayload,
    /// The length header is 0 (zero-filled bytes, not a record).
    #[error("zero length")]
    ZeroLength,
    /// The length header is over [`MAX_RECORD_BYTES`].
    #[error("length over the {MAX_RECORD_BYTES}-byte limit")]
    LengthOverLimit,
    /// The payload does not match its CRC.
    #[error("checksum mismatch")]
    ChecksumMismatch,
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file system operation failed.
    #[error("journal I/O on {}: {source}", path.display())]
    Io {
        /// The file or directory it failed on.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The reader met a damaged record below the durable end (recovery
    /// cuts damage at open, so this happened since).
    #[error("corrupt journal record in {} at offset {offset}: {source}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the damaged frame starts.
        offset: u64,
        /// What is wrong with it.
        #[source]
        source: Damage,
    },
    /// A payload to append is over [`MAX_RECORD_BYTES`]; nothing of its
    /// batch was written.
    #[error("journal record of {len} bytes is over the {max}-byte limit")]
    RecordTooLarge {
        /// The payload's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A payload to append is empty (see the frame format); nothing of its
    /// batch was written.
    #[error("journal records cannot be empty")]
    EmptyRecord,
    /// The checkpoint file exists but is not a position.
    #[error(
        "unreadable journal checkpoint {}: {source} (deleting it replays the whole journal, which is safe)",
        path.display()
    )]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The reader was asked to read into a segment that does not exist.
    #[error(
        "journal segment after {after} (up to {until}) is missing from {}",
        dir.display()
    )]
    MissingSegment {
        /// The journal directory.
        dir: PathBuf,
        /// The segment the reader was done with.
        after: u64,
        /// The segment the read limit is in.
        until: u64,
    },
}

/// What [`Journal::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Where replay starts: the stored checkpoint, adjusted to a record
    /// boundary the reader can start from (see the module doc).
    pub checkpoint: Position,
    /// The end of the journal after repair: where the next append goes.
    pub end: Position,
    /// Whole records between `checkpoint` and `end`: what replay will
    /// store.
    pub pending_records: u64,
    /// The first segment that was truncated because it ended in damage (a
    /// torn tail, or a damaged record in an earlier segment).
    pub torn_segment: Option<u64>,
    /// Bytes cut off the damaged segments, in total.
    pub torn_bytes: u64,
}

/// The single appender of a journal directory.
#[derive(Debug)]
pub struct Journal {
    /// The journal's directory, where the next segment is created.
    dir: PathBuf,
    /// The rollover size (see [`JournalConfig::segment_bytes`]).
    segment_bytes: u64,
    /// The last segment, open for writing: the only file ever appended to.
    file: File,
    /// The last segment's path, for error messages.
    path: PathBuf,
    /// The end of the last acknowledged batch: where the next one is
    /// written. Everything before it is fsynced.
    end: Position,
    /// Set when a failed append may have left bytes past `end` and cutting
    /// them failed too: the next append (or rollover) cuts them first, so
    /// no record ever follows garbage.
    tail_dirty: bool,
}

impl Journal {
    /// Opens the journal in `config.dir` (creating the directory and the
    /// first segment if needed) and recovers it: reads the checkpoint,
    /// scans the segments from it, truncates a torn or damaged tail back to
    /// the last whole record, and reports what it found. See the module
    /// doc for the rules.
    pub fn open(config: JournalConfig) -> Result<(Self, Recovery), JournalError> {
        let dir = config.dir;
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            // The new directory's own entry must survive a crash too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let stored = read_checkpoint(&dir)?;
        let mut segments = list_segments(&dir)?;
        let last = match segments.last() {
            Some(&last) => last,
            None => {
                create_segment(&dir, FIRST_SEGMENT)?;
                segments.push(FIRST_SEGMENT);
                FIRST_SEGMENT
            }
        };

        let mut recovery = Recovery::default();
        let mut replay_start = None;
        let mut end = Position {
            segment: last,
            offset: 0,
        };
        for &segment in segments
            .iter()
            .filter(|&&n| n >= stored.segment || n == last)
        {
            let path = segment_path(&dir, segment);
            // The offset in this segment before which records are stored:
            // everything, when the checkpoint is in a later segment (only
            // the last segment is scanned then, to repair its tail).
            let mark = match segment.cmp(&stored.segment) {
                std::cmp::Ordering::Less => u64::MAX,
                std::cmp::Ordering::Equal => stored.offset,
                std::cmp::Ordering::Greater => 0,
            };
            let scan = scan_segment(&path, mark)?;
            replay_start.get_or_insert(Position {
                segment,
                offset: scan.start,
            });
            recovery.pending_records += scan.records;
            if let Some(damage) = scan.damage {
                let cut = scan.len - scan.valid_end;
                truncate(&path, scan.valid_end)?;
                tracing::warn!(
                    segment,
                    offset = scan.valid_end,
                    cut,
                    %damage,
                    last = segment == last,
                    "journal segment ended in a damaged record; truncated to its last whole record"
                );
                recovery.torn_segment.get_or_insert(segment);
                recovery.torn_bytes += cut;
            }
            if segment == last {
                end.offset = scan.valid_end;
            }
        }

        // The last segment is always scanned, so `replay_start` is set; it
        // is `end` when the checkpoint is at or past it.
        let mut checkpoint = replay_start.unwrap_or(end);
        if stored > end {
            tracing::warn!(
                ?stored,
                ?end,
                "journal checkpoint is past the journal's end; treating it as the end"
            );
            write_checkpoint(&dir, end)?;
            checkpoint = end;
        }
        recovery.checkpoint = checkpoint;
        recovery.end = end;

        let path = segment_path(&dir, last);
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        file.seek(SeekFrom::Start(end.offset))
            .map_err(io_at(&path))?;
        let journal = Self {
            dir,
            segment_bytes: config.segment_bytes,
            file,
            path,
            end,
            tail_dirty: false,
        };
        Ok((journal, recovery))
    }

    /// Appends `payloads` as one write and fsyncs once (group commit);
    /// returns the end position after them. Before the batch, rolls over to
    /// a new segment if the current one holds `segment_bytes` or more. An
    /// empty batch is a no-op. On error nothing of the batch counts as
    /// written (see the module doc).
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<Position, JournalError> {
        if payloads.is_empty() {
            return Ok(self.end);
        }
        let mut frames_len = 0;
        for payload in payloads {
            if payload.is_empty() {
                return Err(JournalError::EmptyRecord);
            }
            if payload.len() > MAX_RECORD_BYTES {
                return Err(JournalError::RecordTooLarge {
                    len: payload.len(),
                    max: MAX_RECORD_BYTES,
                });
            }
            frames_len += HEADER_BYTES as usize + payload.len();
        }
        // An empty segment never rolls over, whatever `segment_bytes` is:
        // that would only make empty files.
        if self.end.offset > 0 && self.end.offset >= self.segment_bytes {
            self.roll_over()?;
        }

        let mut frames = Vec::with_capacity(frames_len);
        for payload in payloads {
            let len = u32::try_from(payload.len()).map_err(|_| JournalError::RecordTooLarge {
                len: payload.len(),
                max: MAX_RECORD_BYTES,
            })?;
            frames.extend_from_slice(&len.to_le_bytes());
            frames.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            frames.extend_from_slice(payload);
        }
        if let Err(source) = self.write_at_end(&frames) {
            // Part of the batch may be in the file: cut it now, or before
            // the next write if that fails too.
            self.tail_dirty = self.file.set_len(self.end.offset).is_err();
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.end.offset += frames.len() as u64;
        Ok(self.end)
    }

    /// The end of the last acknowledged batch: every record before it is
    /// durable. The reader's limit.
    pub fn end(&self) -> Position {
        self.end
    }

    /// Writes `frames` at the end and fsyncs.
    fn write_at_end(&mut self, frames: &[u8]) -> io::Result<()> {
        if self.tail_dirty {
            self.file.set_len(self.end.offset)?;
            self.tail_dirty = false;
        }
        self.file.seek(SeekFrom::Start(self.end.offset))?;
        self.file.write_all(frames)?;
        // fdatasync: the data and the file size, which is all a reader needs.
        self.file.sync_data()
    }

    /// Moves to a new, empty segment numbered after the current one.
    fn roll_over(&mut self) -> Result<(), JournalError> {
        if self.tail_dirty {
            // A finished segment must hold whole records only: readers read
            // it to its end.
            self.file
                .set_len(self.end.offset)
                .and_then(|()| self.file.sync_data())
                .map_err(io_at(&self.path))?;
            self.tail_dirty = false;
        }
        let next = self
            .end
            .segment
            .checked_add(1)
            .ok_or_else(|| JournalError::Io {
                path: self.dir.clone(),
                source: io::Error::other("journal segment numbers exhausted"),
            })?;
        self.file = create_segment(&self.dir, next)?;
        self.path = segment_path(&self.dir, next);
        self.end = Position {
            segment: next,
            offset: 0,
        };
        Ok(())
    }
}

/// Reads records from a position up to a limit (the appender's durable
/// end), across segments. Independent of the [`Journal`]: it only reads
/// files, and never past the limit it is given.
#[derive(Debug)]
pub struct JournalReader {
    /// The journal's directory, where the next segment is looked up.
    dir: PathBuf,
    /// Where the next record starts (a record boundary).
    position: Position,
    /// The segment being read, kept open between reads.
    segment: Option<OpenSegment>,
}

/// The segment file a [`JournalReader`] has open.
#[derive(Debug)]
struct OpenSegment {
    /// Its number.
    number: u64,
    /// Its path, for error messages.
    path: PathBuf,
    /// The file. Read directly, not through a `BufReader`: a buffer could
    /// hold bytes past the durable end of the live segment, which an
    /// append may be writing (or a failed one cutting) at that moment.
    file: File,
    /// Where the file's cursor is, when known, to skip needless seeks.
    cursor: Option<u64>,
    /// Its length once the appender has moved past it (it no longer
    /// changes then), so it is asked for once.
    final_len: Option<u64>,
}

impl JournalReader {
    /// A reader of the journal in `dir`, starting at `from` (a record
    /// boundary, such as [`Recovery::checkpoint`] or a position a read
    /// returned).
    pub fn open(dir: &Path, from: Position) -> Result<Self, JournalError> {
        fs::metadata(dir).map_err(io_at(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            position: from,
            segment: None,
        })
    }

    /// Up to `max` whole records from the reader's position that end at or
    /// before `until`, each with the position just after it; advances the
    /// reader past them. At a segment's end (once `until` is in a later
    /// segment) moves on to the next segment.
    ///
    /// A failure after some records were read returns those records; the
    /// reader stays at the failing one, so the next call reports it.
    pub fn read(
        &mut self,
        until: Position,
        max: usize,
    ) -> Result<Vec<(Position, Vec<u8>)>, JournalError> {
        let mut records = Vec::new();
        match self.read_into(until, max, &mut records) {
            Err(err) if records.is_empty() => Err(err),
            _ => Ok(records),
        }
    }

    /// [`Self::read`], appending to `records`.
    fn read_into(
        &mut self,
        until: Position,
        max: usize,
        records: &mut Vec<(Position, Vec<u8>)>,
    ) -> Result<(), JournalError> {
        while records.len() < max && self.position < until {
            let number = self.position.segment;
            if self.segment.as_ref().is_none_or(|s| s.number != number) {
                let path = segment_path(&self.dir, number);
                match File::open(&path) {
                    Ok(file) => {
                        self.segment = Some(OpenSegment {
                            number,
                            path,
                            file,
                            cursor: None,
                            final_len: None,
                        });
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        // Segments before the first one on disk were stored
                        // and removed (and the default position precedes
                        // segment 1): start at the next one.
                        self.position = self.next_segment(number, until)?;
                        continue;
                    }
                    Err(source) => return Err(JournalError::Io { path, source }),
                }
            }
            let Some(segment) = self.segment.as_mut() else {
                continue;
            };

            // Once the appender has moved past this segment it is complete
            // and fsynced: read it to its end. In the live segment, stop at
            // the durable end.
            let finished = number < until.segment;
            let limit = if finished {
                match segment.final_len {
                    Some(len) => len,
                    None => {
                        let len = segment.file.metadata().map_err(io_at(&segment.path))?.len();
                        segment.final_len = Some(len);
                        len
                    }
                }
            } else {
                until.offset
            };
            let offset = self.position.offset;
            if offset >= limit {
                if !finished {
                    break;
                }
                let next = self.next_segment(number, until)?;
                if next.segment != number + 1 {
                    tracing::warn!(
                        after = number,
                        next = next.segment,
                        "journal segments are missing; their records are lost"
                    );
                }
                self.position = next;
                continue;
            }

            if segment.cursor != Some(offset) {
                segment
                    .file
                    .seek(SeekFrom::Start(offset))
                    .map_err(io_at(&segment.path))?;
            }
            // Any early return or break below leaves the cursor unknown.
            segment.cursor = None;
            match read_frame(&mut segment.file, limit - offset).map_err(io_at(&segment.path))? {
                Ok(payload) => {
                    let end = offset + HEADER_BYTES + payload.len() as u64;
                    segment.cursor = Some(end);
                    self.position.offset = end;
                    records.push((self.position, payload));
                }
                // The limit is not at a record boundary: nothing more is
                // durable yet.
                Err(Damage::ShortHeader | Damage::ShortPayload) if !finished => break,
                Err(damage) => {
                    return Err(JournalError::Corrupt {
                        path: segment.path.clone(),
                        offset,
                        source: damage,
                    });
                }
            }
        }
        Ok(())
    }

    /// Where the next record starts: just after the last record read.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The start of the first segment on disk after `after`, if it is not
    /// past `until`.
    fn next_segment(&self, after: u64, until: Position) -> Result<Position, JournalError> {
        list_segments(&self.dir)?
            .into_iter()
            .find(|&n| n > after && n <= until.segment)
            .map(|segment| Position { segment, offset: 0 })
            .ok_or_else(|| JournalError::MissingSegment {
                dir: self.dir.clone(),
                after,
                until: until.segment,
            })
    }
}

/// The checkpoint: everything before it is stored in the database.
/// `Position::default()` when there is none yet.
pub fn read_checkpoint(dir: &Path) -> Result<Position, JournalError> {
    let path = dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|source| JournalError::Checkpoint { path, source }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Position::default()),
        Err(source) => Err(JournalError::Io { path, source }),
    }
}

/// Replaces the checkpoint atomically: temporary file, fsync, rename over
/// the old one, fsync of the directory.
pub fn write_checkpoint(dir: &Path, position: Position) -> Result<(), JournalError> {
    let temp = dir.join(CHECKPOINT_TEMP_FILE);
    let path = dir.join(CHECKPOINT_FILE);
    let json = serde_json::to_vec(&position).map_err(|err| JournalError::Io {
        path: path.clone(),
        source: io::Error::other(err),
    })?;
    let mut file = File::create(&temp).map_err(io_at(&temp))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(io_at(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io_at(&path))?;
    sync_dir(dir)
}

/// Deletes the segment files entirely before `position.segment`, never the
/// last one (the appender's). Returns how many it removed.
pub fn remove_segments_before(dir: &Path, position: Position) -> Result<u64, JournalError> {
    let segments = list_segments(dir)?;
    let Some(&last) = segments.last() else {
        return Ok(0);
    };
    let mut removed = 0;
    for segment in segments
        .into_iter()
        .filter(|&n| n < position.segment && n < last)
    {
        let path = segment_path(dir, segment);
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Io { path, source }),
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Bytes of journal between `from` and `to` (the spill-size metric). Best
/// effort: a segment whose size cannot be read counts as empty.
pub fn bytes_between(dir: &Path, from: Position, to: Position) -> u64 {
    if from >= to {
        return 0;
    }
    if from.segment == to.segment {
        return to.offset - from.offset;
    }
    let size = |segment| fs::metadata(segment_path(dir, segment)).map_or(0, |m| m.len());
    let middle: u64 = list_segments(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|&n| n > from.segment && n < to.segment)
        .map(size)
        .fold(0, u64::saturating_add);
    size(from.segment)
        .saturating_sub(from.offset)
        .saturating_add(middle)
        .saturating_add(to.offset)
}

/// What scanning one segment at open found.
#[derive(Debug)]
struct Scan {
    /// The file's length before any repair.
    len: u64,
    /// The end of the last whole record: where the segment should end.
    valid_end: u64,
    /// The damage that stopped the scan before the file's end, if any.
    damage: Option<Damage>,
    /// The last record boundary at or before the mark: where replay starts
    /// in this segment.
    start: u64,
    /// Whole records that end after `start`.
    records: u64,
}

/// Scans a segment from its start; records ending at or before `mark` are
/// the stored ones.
fn scan_segment(path: &Path, mark: u64) -> Result<Scan, JournalError> {
    let file = File::open(path).map_err(io_at(path))?;
    let len = file.metadata().map_err(io_at(path))?.len();
    // A buffer is fine here: nothing appends while the journal is opened.
    let mut input = BufReader::new(file);
    let mut scan = Scan {
        len,
        valid_end: 0,
        damage: None,
        start: 0,
        records: 0,
    };
    let mut offset = 0;
    while offset < len {
        match read_frame(&mut input, len - offset).map_err(io_at(path))? {
            Ok(payload) => {
                let next = offset + HEADER_BYTES + payload.len() as u64;
                if next <= mark {
                    scan.start = next;
                } else {
                    scan.records += 1;
                }
                offset = next;
            }
            Err(damage) if offset < mark && mark <= len => {
                // In records the database already has: harmless. Resume at
                // the checkpoint, a record boundary by construction.
                tracing::warn!(
                    segment = %path.display(),
                    offset,
                    %damage,
                    checkpoint = mark,
                    "damaged journal record before the checkpoint (already stored); skipped"
                );
                input.seek(SeekFrom::Start(mark)).map_err(io_at(path))?;
                offset = mark;
                scan.start = mark;
            }
            Err(damage) => {
                scan.damage = Some(damage);
                break;
            }
        }
    }
    scan.valid_end = offset;
    Ok(scan)
}

/// Reads the frame at `input`'s cursor, `available` bytes being all there
/// is to read from it (to the file's end or the read limit). Never reads
/// past them, and never allocates more than [`MAX_RECORD_BYTES`].
fn read_frame(input: &mut impl Read, available: u64) -> io::Result<Result<Vec<u8>, Damage>> {
    if available < HEADER_BYTES {
        return Ok(Err(Damage::ShortHeader));
    }
    let mut header = [0; HEADER_BYTES as usize];
    input.read_exact(&mut header)?;
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if len == 0 {
        return Ok(Err(Damage::ZeroLength));
    }
    let Ok(len) = usize::try_from(len) else {
        return Ok(Err(Damage::LengthOverLimit));
    };
    if len > MAX_RECORD_BYTES {
        return Ok(Err(Damage::LengthOverLimit));
    }
    if available - HEADER_BYTES < len as u64 {
        return Ok(Err(Damage::ShortPayload));
    }
    let mut payload = vec![0; len];
    input.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != crc {
        return Ok(Err(Damage::ChecksumMismatch));
    }
    Ok(Ok(payload))
}

/// A segment file's path.
fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
}

/// The numbers of the segment files in `dir`, ascending. Other files are
/// ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let number = name
            .to_str()
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok());
        if let Some(number) = number {
            segments.push(number);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Creates an empty segment file (emptying a leftover of a failed earlier
/// rollover, which never held an acknowledged record) and makes its
/// directory entry durable.
fn create_segment(dir: &Path, segment: u64) -> Result<File, JournalError> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_at(&path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Cuts a segment file to `len` bytes, durably.
fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(io_at(path))
}

/// Fsyncs a directory, so that entries created, renamed or removed in it
/// survive a crash.
fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    // Windows cannot open a directory as a file; its metadata updates are
    // journaled by NTFS.
    if cfg!(unix) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
    }
    Ok(())
}

/// Wraps an `io::Error` with the path it happened on.
fn io_at(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, segment_bytes: u64) -> JournalConfig {
        JournalConfig {
            dir: dir.to_owned(),
            segment_bytes,
        }
    }

    /// A journal that never rolls over in these tests.
    fn one_segment(dir: &Path) -> JournalConfig {
        config(dir, 1 << 30)
    }

    /// A payload of varying length, recognisable by its number.
    fn payload(n: usize) -> Vec<u8> {
        format!("{{\"record\":{n},\"pad\":\"{}\"}}", "x".repeat(n % 23)).into_bytes()
    }

    fn pos(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    /// Everything from `from` up to `until`, in one read.
    fn read_all(dir: &Path, from: Position, until: Position) -> Vec<(Position, Vec<u8>)> {
        let mut reader = JournalReader::open(dir, from).unwrap();
        let records = reader.read(until, usize::MAX).unwrap();
        assert_eq!(reader.position(), until, "a full read ends at the limit");
        records
    }

    fn payloads_of(records: &[(Position, Vec<u8>)]) -> Vec<Vec<u8>> {
        records.iter().map(|(_, payload)| payload.clone()).collect()
    }

    fn segment_len(dir: &Path, segment: u64) -> u64 {
        fs::metadata(segment_path(dir, segment)).unwrap().len()
    }

    fn append_bytes(path: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(bytes).unwrap();
    }

    fn set_len(path: &Path, len: u64) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_len(len).unwrap();
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[usize::try_from(offset).unwrap()] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn records_round_trip_across_segment_rollovers() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut journal, recovery) = Journal::open(config(tmp.path(), 100)).unwrap();
        assert_eq!(recovery.end, pos(1, 0));

        let mut expected = Vec::new();
        let mut batch_ends = Vec::new();
        for batch in 0..20 {
            let payloads: Vec<_> = (0..batch % 4 + 1)
                .map(|i| payload(expected.len() + i))
                .collect();
            let end = journal.append(&payloads).unwrap();
            assert_eq!(end, journal.end());
            expected.extend(payloads);
            batch_ends.push(end);
        }
        let end = journal.end();
        assert!(end.segment >= 5, "rolled over several times: {end:?}");
        assert_eq!(
            list_segments(tmp.path()).unwrap(),
            (1..=end.segment).collect::<Vec<_>>()
        );
        for segment in 1..end.segment {
            assert!(
                segment_len(tmp.path(), segment) >= 100,
                "segment {segment} rolled over before it was full"
            );
        }
        assert_eq!(segment_len(tmp.path(), end.segment), end.offset);

        let records = read_all(tmp.path(), Position::default(), end);
        assert_eq!(payloads_of(&records), expected);
        assert!(records.windows(2).all(|pair| pair[0].0 < pair[1].0));
        for batch_end in &batch_ends {
            assert!(records.iter().any(|(position, _)| position == batch_end));
        }

        // Small reads see the same records, crossing segments on the way.
        let mut reader = JournalReader::open(tmp.path(), Position::default()).unwrap();
        let mut stepped = Vec::new();
        loop {
            let chunk = reader.read(end, 3).unwrap();
            assert!(chunk.len() <= 3);
            if chunk.is_empty() {
                break;
            }
            stepped.extend(chunk);
        }
        assert_eq!(stepped, records);
        assert_eq!(reader.position(), end);
    }

    #[test]
    fn reader_stops_at_until_and_never_reads_past_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(one_segment(tmp.path())).unwrap();
        let ends: Vec<Position> = (0..5)
            .map(|n| journal.append(&[payload(n)]).unwrap())
            .collect();
        // Bytes past the durable end, like an append in flight: never read.
        append_bytes(&segment_path(tmp.path(), 1), &[0xff; 5]);

        let mut reader = JournalReader::open(tmp.path(), Position::default()).unwrap();
        let first = reader.read(ends[2], 100).unwrap();
        assert_eq!(payloads_of(&first), [payload(0), payload(1), payload(2)]);
        assert_eq!(first[2].0, ends[2]);
        assert_eq!(reader.position(), ends[2]);
        assert!(reader.read(ends[2], 100).unwrap().is_empty());

        // A limit inside a record: that record is not whole yet.
        let inside = pos(1, ends[3].offset - 1);
        assert!(reader.read(inside, 100).unwrap().is_empty());
        assert_eq!(reader.position(), ends[2]);

        assert!(reader.read(journal.end(), 0).unwrap().is_empty());
        let rest = reader.read(journal.end(), 100).unwrap();
        assert_eq!(payloads_of(&rest), [payload(3), payload(4)]);
        assert_eq!(reader.position(), journal.end());
    }

    #[test]
    fn reader_stops_at_until_in_an_earlier_segment() {
        let tmp = tempfile::tempdir().unwrap();
        // Every batch after the first goes into a new segment.
        let (mut journal, _) = Journal::open(config(tmp.path(), 1)).unwrap();
        let ends: Vec<Position> = (0..4)
            .map(|n| {
                journal
                    .append(&[payload(2 * n), payload(2 * n + 1)])
                    .unwrap()
            })
            .collect();
        assert_eq!(journal.end().segment, 4);

        let mut reader = JournalReader::open(tmp.path(), Position::default()).unwrap();
        let records = reader.read(ends[1], 100).unwrap();
        assert_eq!(
            payloads_of(&records),
            (0..4).map(payload).collect::<Vec<_>>()
        );
        assert_eq!(reader.position(), ends[1]);
        let records = reader.read(journal.end(), 100).unwrap();
        assert_eq!(
            payloads_of(&records),
            (4..8).map(payload).collect::<Vec<_>>()
        );
    }

    #[test]
    fn reopening_continues_appending_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let first_end = {
            let (mut journal, _) = Journal::open(config(tmp.path(), 64)).unwrap();
            for n in 0..6 {
                journal.append(&[payload(n)]).unwrap();
            }
            journal.end()
        };
        assert!(first_end.segment > 1);

        let (mut journal, recovery) = Journal::open(config(tmp.path(), 64)).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                checkpoint: pos(1, 0),
                end: first_end,
                pending_records: 6,
                torn_segment: None,
                torn_bytes: 0,
            }
        );
        assert_eq!(journal.end(), first_end);
        for n in 6..12 {
            journal.append(&[payload(n)]).unwrap();
        }
        let records = read_all(tmp.path(), Position::default(), journal.end());
        assert_eq!(
            payloads_of(&records),
            (0..12).map(payload).collect::<Vec<_>>()
        );
        assert_eq!(
            list_segments(tmp.path()).unwrap(),
            (1..=journal.end().segment).collect::<Vec<_>>(),
            "segment numbers continue without a gap"
        );
    }

    #[test]
    fn checkpoint_round_trips_and_is_replaced_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(read_checkpoint(dir).unwrap(), Position::default());

        write_checkpoint(dir, pos(2, 40)).unwrap();
        assert_eq!(read_checkpoint(dir).unwrap(), pos(2, 40));

        // A crash while writing the next one leaves a partial temporary
        // file: the checkpoint in place is still whole.
        fs::write(dir.join(CHECKPOINT_TEMP_FILE), b"{\"segment\":9,\"off").unwrap();
        assert_eq!(read_checkpoint(dir).unwrap(), pos(2, 40));

        write_checkpoint(dir, pos(3, 7)).unwrap();
        assert_eq!(read_checkpoint(dir).unwrap(), pos(3, 7));
        assert!(!dir.join(CHECKPOINT_TEMP_FILE).exists());
        let names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [CHECKPOINT_FILE]);
    }

    #[test]
    fn unreadable_checkpoint_is_an_error_not_a_guess() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(CHECKPOINT_FILE), b"\x00garbage").unwrap();
        assert!(matches!(
            read_checkpoint(tmp.path()),
            Err(JournalError::Checkpoint { .. })
        ));
        assert!(matches!(
            Journal::open(one_segment(tmp.path())),
            Err(JournalError::Checkpoint { .. })
        ));
    }

    #[test]
    fn remove_segments_before_deletes_only_older_segments_never_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut journal, _) = Journal::open(config(dir, 1)).unwrap();
        let ends: Vec<Position> = (0..5)
            .map(|n| journal.append(&[payload(n)]).unwrap())
            .collect();
        assert_eq!(list_segments(dir).unwrap(), [1, 2, 3, 4, 5]);

        assert_eq!(remove_segments_before(dir, ends[2]).unwrap(), 2);
        assert_eq!(list_segments(dir).unwrap(), [3, 4, 5]);
        assert_eq!(remove_segments_before(dir, ends[2]).unwrap(), 0);

        // A reader from before the first segment left starts at it.
        let records = read_all(dir, Position::default(), journal.end());
        assert_eq!(
            payloads_of(&records),
            (2..5).map(payload).collect::<Vec<_>>()
        );

        // A checkpoint in a removed segment: replay starts at the next one.
        write_checkpoint(dir, pos(2, 3)).unwrap();
        drop(journal);
        let (mut journal, recovery) = Journal::open(config(dir, 1)).unwrap();
        assert_eq!(recovery.checkpoint, pos(3, 0));
        assert_eq!(recovery.pending_records, 3);

        // Asked to remove everything, it keeps the appender's segment.
        assert_eq!(remove_segments_before(dir, pos(99, 0)).unwrap(), 2);
        assert_eq!(list_segments(dir).unwrap(), [5]);
        let end = journal.append(&[payload(5)]).unwrap();
        assert_eq!(end.segment, 6);
        let records = read_all(dir, ends[4], end);
        assert_eq!(payloads_of(&records), [payload(5)]);
    }

    /// Three whole records in segment 1, then what `damage` does to the
    /// file (given the end of the third record and the fourth's length);
    /// `damage` returns the bytes recovery should cut.
    fn recover_from(damage: impl FnOnce(&Path, u64, u64) -> u64) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = segment_path(dir, 1);
        let whole_end = {
            let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
            let end = journal
                .append(&[payload(0), payload(1), payload(2)])
                .unwrap();
            journal.append(&[payload(3)]).unwrap();
            end
        };
        let fourth_len = segment_len(dir, 1) - whole_end.offset;
        let expected_cut = damage(&path, whole_end.offset, fourth_len);
        assert!(expected_cut > 0);

        let (mut journal, recovery) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                checkpoint: pos(1, 0),
                end: whole_end,
                pending_records: 3,
                torn_segment: Some(1),
                torn_bytes: expected_cut,
            }
        );
        assert_eq!(segment_len(dir, 1), whole_end.offset, "truncated");

        let end = journal.append(&[payload(9)]).unwrap();
        let records = read_all(dir, Position::default(), end);
        assert_eq!(
            payloads_of(&records),
            [payload(0), payload(1), payload(2), payload(9)]
        );
        drop(journal);

        let (_, again) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(again.torn_segment, None, "the repair was durable");
        assert_eq!(again.end, end);
    }

    #[test]
    fn torn_tail_inside_the_length_header_is_cut() {
        recover_from(|path, whole_end, _| {
            set_len(path, whole_end + 2);
            2
        });
    }

    #[test]
    fn torn_tail_inside_the_checksum_is_cut() {
        recover_from(|path, whole_end, _| {
            set_len(path, whole_end + 6);
            6
        });
    }

    #[test]
    fn torn_tail_inside_the_payload_is_cut() {
        recover_from(|path, whole_end, _| {
            set_len(path, whole_end + HEADER_BYTES + 3);
            HEADER_BYTES + 3
        });
    }

    #[test]
    fn flipped_payload_byte_is_a_checksum_mismatch_and_cut() {
        recover_from(|path, whole_end, fourth_len| {
            flip_byte(path, whole_end + HEADER_BYTES + 2);
            fourth_len
        });
    }

    #[test]
    fn garbage_huge_length_is_cut_without_allocating_it() {
        recover_from(|path, whole_end, _| {
            // A 2 GiB length, then far fewer bytes.
            set_len(path, whole_end);
            let mut garbage = vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4];
            garbage.extend_from_slice(&[0xab; 100]);
            append_bytes(path, &garbage);
            garbage.len() as u64
        });
    }

    #[test]
    fn length_just_over_the_limit_is_damage() {
        recover_from(|path, whole_end, _| {
            // A length one over the limit, with that many bytes behind it
            // and a matching checksum: still damage.
            set_len(path, whole_end);
            let len = u32::try_from(MAX_RECORD_BYTES + 1).unwrap();
            let payload = vec![7; MAX_RECORD_BYTES + 1];
            let mut frame = len.to_le_bytes().to_vec();
            frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            frame.extend_from_slice(&payload);
            append_bytes(path, &frame);
            frame.len() as u64
        });
    }

    #[test]
    fn zero_filled_tail_is_not_read_as_empty_records() {
        recover_from(|path, whole_end, _| {
            // A crash after the file grew but before its data was written.
            set_len(path, whole_end);
            set_len(path, whole_end + 4096);
            4096
        });
    }

    #[test]
    fn damage_in_the_middle_of_the_last_segment_cuts_everything_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ends: Vec<Position> = {
            let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
            (0..4)
                .map(|n| journal.append(&[payload(n)]).unwrap())
                .collect()
        };
        flip_byte(&segment_path(dir, 1), ends[1].offset + HEADER_BYTES);

        let (_, recovery) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(recovery.end, ends[1]);
        assert_eq!(recovery.pending_records, 2);
        assert_eq!(recovery.torn_segment, Some(1));
        assert_eq!(recovery.torn_bytes, ends[3].offset - ends[1].offset);
    }

    #[test]
    fn damage_in_an_earlier_segment_truncates_it_and_keeps_later_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Three segments of three records each.
        let ends: Vec<Position> = {
            let (mut journal, _) = Journal::open(config(dir, 1)).unwrap();
            (0..3)
                .map(|b| {
                    journal
                        .append(&[payload(3 * b), payload(3 * b + 1), payload(3 * b + 2)])
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            ends.iter().map(|e| e.segment).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let seg2 = segment_path(dir, 2);
        let seg2_len = segment_len(dir, 2);
        let first_of_seg2 = HEADER_BYTES + payload(3).len() as u64;
        // Damage the second record of segment 2, and tear segment 3's tail.
        flip_byte(&seg2, first_of_seg2 + HEADER_BYTES + 1);
        append_bytes(&segment_path(dir, 3), &[5, 0, 0]);

        let (mut journal, recovery) = Journal::open(config(dir, 1)).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                checkpoint: pos(1, 0),
                end: ends[2],
                pending_records: 3 + 1 + 3,
                torn_segment: Some(2),
                torn_bytes: (seg2_len - first_of_seg2) + 3,
            }
        );
        assert_eq!(segment_len(dir, 2), first_of_seg2);

        let end = journal.append(&[payload(9)]).unwrap();
        let records = read_all(dir, Position::default(), end);
        assert_eq!(
            payloads_of(&records),
            [0, 1, 2, 3, 6, 7, 8, 9].map(payload).to_vec()
        );
    }

    #[test]
    fn damage_before_the_checkpoint_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ends: Vec<Position> = {
            let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
            (0..3)
                .map(|n| journal.append(&[payload(n)]).unwrap())
                .collect()
        };
        flip_byte(&segment_path(dir, 1), HEADER_BYTES + 1);
        write_checkpoint(dir, ends[1]).unwrap();

        let (mut journal, recovery) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                checkpoint: ends[1],
                end: ends[2],
                pending_records: 1,
                torn_segment: None,
                torn_bytes: 0,
            }
        );
        let end = journal.append(&[payload(3)]).unwrap();
        let records = read_all(dir, recovery.checkpoint, end);
        assert_eq!(payloads_of(&records), [payload(2), payload(3)]);
    }

    #[test]
    fn pending_records_are_those_after_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ends: Vec<Position> = {
            let (mut journal, _) = Journal::open(config(dir, 50)).unwrap();
            (0..8)
                .map(|n| journal.append(&[payload(n)]).unwrap())
                .collect()
        };
        assert!(ends[4].segment > 1);
        write_checkpoint(dir, ends[4]).unwrap();

        let (journal, recovery) = Journal::open(config(dir, 50)).unwrap();
        assert_eq!(recovery.checkpoint, ends[4]);
        assert_eq!(recovery.pending_records, 3);
        let records = read_all(dir, recovery.checkpoint, journal.end());
        assert_eq!(
            payloads_of(&records),
            (5..8).map(payload).collect::<Vec<_>>()
        );
    }

    #[test]
    fn checkpoint_inside_a_record_moves_back_to_its_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ends: Vec<Position> = {
            let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
            (0..3)
                .map(|n| journal.append(&[payload(n)]).unwrap())
                .collect()
        };
        write_checkpoint(dir, pos(1, ends[0].offset + 5)).unwrap();

        let (_, recovery) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(recovery.checkpoint, ends[0]);
        assert_eq!(recovery.pending_records, 2);
        assert_eq!(recovery.torn_bytes, 0);
    }

    #[test]
    fn checkpoint_past_the_end_is_treated_as_the_end() {
        for stale in [pos(7, 0), pos(1, 10_000)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let end = {
                let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
                journal
                    .append(&[payload(0), payload(1), payload(2)])
                    .unwrap()
            };
            write_checkpoint(dir, stale).unwrap();

            let (mut journal, recovery) = Journal::open(one_segment(dir)).unwrap();
            assert_eq!(recovery.checkpoint, end, "{stale:?}");
            assert_eq!(recovery.end, end);
            assert_eq!(recovery.pending_records, 0);
            assert_eq!(read_checkpoint(dir).unwrap(), end, "rewritten");

            // What is appended next is pending after a restart, not
            // hidden behind the stale checkpoint.
            let new_end = journal.append(&[payload(3)]).unwrap();
            drop(journal);
            let (_, recovery) = Journal::open(one_segment(dir)).unwrap();
            assert_eq!(recovery.pending_records, 1);
            let records = read_all(dir, recovery.checkpoint, new_end);
            assert_eq!(payloads_of(&records), [payload(3)]);
        }
    }

    #[test]
    fn a_missing_directory_is_created_with_an_empty_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data").join("journal");
        let (journal, recovery) = Journal::open(one_segment(&dir)).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                checkpoint: pos(1, 0),
                end: pos(1, 0),
                ..Recovery::default()
            }
        );
        assert_eq!(journal.end(), pos(1, 0));
        assert_eq!(list_segments(&dir).unwrap(), [1]);
        assert!(read_all(&dir, Position::default(), journal.end()).is_empty());
    }

    #[test]
    fn an_empty_directory_with_other_files_opens_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for name in [
            "notes.txt",
            "12x.seg",
            ".seg",
            "99999999999999999999999.seg",
        ] {
            fs::write(dir.join(name), b"not a segment").unwrap();
        }
        let (mut journal, recovery) = Journal::open(one_segment(dir)).unwrap();
        assert_eq!(recovery.end, pos(1, 0));
        assert_eq!(recovery.torn_segment, None);
        let end = journal.append(&[payload(0)]).unwrap();
        assert_eq!(
            payloads_of(&read_all(dir, Position::default(), end)),
            [payload(0)]
        );
        assert!(dir.join("notes.txt").exists());
    }

    #[test]
    fn append_rejects_empty_and_oversized_records_writing_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(one_segment(tmp.path())).unwrap();
        let end = journal.append(&[payload(0)]).unwrap();

        assert_eq!(journal.append(&[]).unwrap(), end, "empty batch: no-op");
        assert!(matches!(
            journal.append(&[payload(1), Vec::new()]),
            Err(JournalError::EmptyRecord)
        ));
        assert!(matches!(
            journal.append(&[payload(1), vec![1; MAX_RECORD_BYTES + 1]]),
            Err(JournalError::RecordTooLarge { len, .. }) if len == MAX_RECORD_BYTES + 1
        ));
        assert_eq!(journal.end(), end);
        assert_eq!(segment_len(tmp.path(), 1), end.offset);

        // The largest allowed record goes through.
        let big = vec![3; MAX_RECORD_BYTES];
        let end = journal.append(std::slice::from_ref(&big)).unwrap();
        let records = read_all(tmp.path(), Position::default(), end);
        assert_eq!(payloads_of(&records), [payload(0), big]);
    }

    #[test]
    fn reader_reports_damage_below_the_limit_instead_of_skipping() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut journal, _) = Journal::open(config(dir, 1)).unwrap();
        let first = journal.append(&[payload(0), payload(1)]).unwrap();
        journal.append(&[payload(2)]).unwrap();
        assert_eq!(journal.end().segment, 2);

        // In a finished segment.
        flip_byte(&segment_path(dir, 1), first.offset - 1);
        let mut reader = JournalReader::open(dir, Position::default()).unwrap();
        // The record before the damage comes first; the reader stops at it.
        let before = reader.read(journal.end(), 100).unwrap();
        assert_eq!(payloads_of(&before), [payload(0)]);
        let expected_offset = HEADER_BYTES + payload(0).len() as u64;
        assert_eq!(reader.position(), pos(1, expected_offset));
        let err = reader.read(journal.end(), 100).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Corrupt { offset, source: Damage::ChecksumMismatch, .. }
                    if offset == expected_offset
            ),
            "{err:?}"
        );

        // In the live segment.
        flip_byte(&segment_path(dir, 2), HEADER_BYTES);
        let mut reader = JournalReader::open(dir, pos(2, 0)).unwrap();
        assert!(matches!(
            reader.read(journal.end(), 100),
            Err(JournalError::Corrupt { offset: 0, .. })
        ));
        assert_eq!(reader.position(), pos(2, 0));
    }

    #[test]
    fn reader_reports_a_missing_segment_below_the_limit_and_skips_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut journal, _) = Journal::open(config(dir, 1)).unwrap();
        let ends: Vec<Position> = (0..3)
            .map(|n| journal.append(&[payload(n)]).unwrap())
            .collect();
        fs::remove_file(segment_path(dir, 2)).unwrap();

        // The limit is in the missing segment: an error, and the reader
        // does not jump past the limit to segment 3.
        let mut reader = JournalReader::open(dir, pos(1, 0)).unwrap();
        assert_eq!(
            payloads_of(&reader.read(ends[1], 100).unwrap()),
            [payload(0)]
        );
        assert!(matches!(
            reader.read(ends[1], 100),
            Err(JournalError::MissingSegment {
                after: 1,
                until: 2,
                ..
            })
        ));
        assert_eq!(reader.position(), ends[0]);

        // The limit is past the gap: the lost segment is skipped.
        let rest = reader.read(ends[2], 100).unwrap();
        assert_eq!(payloads_of(&rest), [payload(2)]);
    }

    #[test]
    fn bytes_between_counts_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut journal, _) = Journal::open(config(dir, 1)).unwrap();
        let ends: Vec<Position> = (0..4)
            .map(|n| journal.append(&[payload(n)]).unwrap())
            .collect();
        let total: u64 = (1..=4).map(|s| segment_len(dir, s)).sum();

        assert_eq!(
            bytes_between(dir, Position::default(), journal.end()),
            total
        );
        assert_eq!(bytes_between(dir, ends[0], ends[3]), total - ends[0].offset);
        assert_eq!(
            bytes_between(dir, pos(2, 3), ends[3]),
            segment_len(dir, 2) - 3 + segment_len(dir, 3) + ends[3].offset
        );
        assert_eq!(bytes_between(dir, pos(2, 3), pos(2, 10)), 7);
        assert_eq!(bytes_between(dir, ends[3], ends[3]), 0);
        assert_eq!(bytes_between(dir, ends[3], ends[1]), 0);
    }

    #[test]
    fn garbage_segments_never_panic_and_keep_their_whole_records() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for round in 0..300 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let whole = rng.usize(0..4);
            let whole_end = {
                let (mut journal, _) = Journal::open(one_segment(dir)).unwrap();
                for n in 0..whole {
                    journal.append(&[payload(n)]).unwrap();
                }
                journal.end()
            };
            // Random bytes, sometimes behind a plausible small length.
            let mut garbage: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
            if rng.bool() && garbage.len() > 4 {
                garbage[..4].copy_from_slice(&[rng.u8(1..40), 0, 0, 0]);
            }
            append_bytes(&segment_path(dir, 1), &garbage);

            let (mut journal, recovery) = Journal::open(one_segment(dir)).unwrap();
            assert_eq!(recovery.end, whole_end, "round {round}");
            assert_eq!(recovery.pending_records, whole as u64, "round {round}");
            assert_eq!(recovery.torn_bytes, garbage.len() as u64, "round {round}");
            let end = journal.append(&[payload(99)]).unwrap();
            let records = read_all(dir, Position::default(), end);
            assert_eq!(records.len(), whole + 1, "round {round}");
        }
    }

    #[test]
    fn exhausted_segment_numbers_are_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        File::create(segment_path(dir, u64::MAX)).unwrap();
        let (mut journal, recovery) = Journal::open(config(dir, 1)).unwrap();
        assert_eq!(recovery.end, pos(u64::MAX, 0));
        let end = journal.append(&[payload(0)]).unwrap();
        assert!(matches!(
            journal.append(&[payload(1)]),
            Err(JournalError::Io { .. })
        ));
        assert_eq!(journal.end(), end);
        let records = read_all(dir, Position::default(), end);
        assert_eq!(payloads_of(&records), [payload(0)]);
    }
}

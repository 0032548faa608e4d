//! SQLite, the embedded default: one file (by default `data/spillway.db`),
//! no server to run.
//!
//! The file is opened in WAL mode, so readers never wait for the writer and
//! a commit is one append to the log. `synchronous=FULL` syncs the log at
//! every commit: the persister drops journal segments once their records
//! are committed, so a commit must survive an OS crash or power cut, not
//! only a process crash. It costs one fsync per batch (the persister
//! commits many records per transaction). Writers are serialized by SQLite itself (`BEGIN IMMEDIATE`,
//! waiting up to [`BUSY_TIMEOUT`] for the lock).
//!
//! The queries and the [`Store`](super::Store) implementation are shared with PostgreSQL
//! (see `store/sql.rs`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use super::StoreError;
use super::migrations::{self, Migration};
use super::sql::{Dialect, sql_store};
use crate::config::StoreConfig;

/// How long a connection waits for another one's write lock before the
/// statement fails with `SQLITE_BUSY` (and the persister retries the batch).
/// Writes are short transactions, so a wait this long means something is
/// stuck.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for a free pooled connection before erroring.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A SQLite database file.
pub struct SqliteStore {
    /// `store.max_connections` connections to the file: reads run in
    /// parallel, writes take turns.
    pool: Pool<Sqlite>,
}

impl SqliteStore {
    /// Opens (creating the file and its directory if missing) the database
    /// at `url` (`sqlite://path` or `sqlite::memory:`). Does not migrate.
    pub async fn open(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|err| StoreError::Url(err.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            // The schema has no foreign keys (see docs/storage.md); off makes
            // that explicit whatever sqlx's default is.
            .foreign_keys(false);
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| StoreError::Database(sqlx::Error::Io(err)))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl Dialect for SqliteStore {
    const NAME: &'static str = "sqlite";
    const MIGRATIONS: &'static [Migration] = migrations::SQLITE;
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    // Deferred: the snapshot is taken at the first read and kept (WAL).
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    // BEGIN IMMEDIATE already serializes every writer, migrations included.
    const MIGRATION_LOCK: Option<&'static str> = None;
    const WRITE_LOCK: Option<&'static str> = None;
    const DELETE_LOCK: Option<&'static str> = None;
}

sql_store!(SqliteStore, Sqlite);

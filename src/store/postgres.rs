//! PostgreSQL, for several gateway instances sharing one database.
//!
//! Connections come from a pool of `store.max_connections`; acquiring one
//! gives up after [`ACQUIRE_TIMEOUT`], so while the database is down every
//! call fails fast (and the persister keeps its records in the journal)
//! instead of queueing forever. The pool tests a connection before lending
//! it, so after the database comes back the dead connections are replaced.
//!
//! The queries and the [`Store`](super::Store) implementation are shared with SQLite (see
//! `store/sql.rs`); what is PostgreSQL's own is locking: advisory locks
//! serialize migrations across instances and deletions against writes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Postgres};

use super::StoreError;
use super::migrations::{self, Migration};
use super::sql::{Dialect, sql_store};
use crate::config::StoreConfig;

/// How long a caller waits for a connection (a new one while the database
/// is unreachable, or a free pooled one) before the call errors.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL database.
pub struct PostgresStore {
    /// Up to `store.max_connections` connections, opened on demand.
    pool: Pool<Postgres>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`).
    /// Fails when the database cannot be reached. Does not migrate.
    pub async fn open(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        // The error names what is wrong with the URL, never the URL itself
        // (it may hold a password).
        let options = PgConnectOptions::from_str(url)
            .map_err(|err| StoreError::Url(err.to_string()))?
            .application_name("spillway");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

impl fmt::Debug for PostgresStore {
    // By hand: the connect options (and so the password) stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl Dialect for PostgresStore {
    const NAME: &'static str = "postgres";
    const MIGRATIONS: &'static [Migration] = migrations::POSTGRES;
    const BEGIN_WRITE: &'static str = "BEGIN";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    const MIGRATION_LOCK: Option<&'static str> = Some(migrations::POSTGRES_LOCK);
    // Key: the ASCII bytes of `spill-dt` as a big-endian integer. Batches
    // share it; a deletion takes it alone, so no batch is between its
    // tombstone check and its insert while a deletion runs.
    const WRITE_LOCK: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock_shared(8318264426145604724)");
    const DELETE_LOCK: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(8318264426145604724)");
}

sql_store!(PostgresStore, Postgres);

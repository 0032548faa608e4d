//! Embedded schema migrations and the small runner that applies them.
//!
//! Each backend has its own ordered list of SQL scripts under
//! `migrations/<backend>/`, compiled into the binary. The runner records what
//! it applied in `schema_migrations` and applies each pending script in its
//! own transaction, so a failed script leaves no half-built schema behind
//! and the next start retries it. Running it again is a no-op.
//!
//! Two gateway instances may start at once against one database. Each
//! migration transaction therefore starts by taking a lock, and only then
//! looks at `schema_migrations`: on PostgreSQL a transaction-scoped advisory
//! lock ([`POSTGRES_LOCK`]), on SQLite the database's write lock itself
//! (`BEGIN IMMEDIATE`). The second instance waits, then finds the version
//! recorded and skips it.
//!
//! sqlx's `migrate` feature would do this too, but it brings its macros'
//! compile cost; this runner is the few dozen lines we need.

use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Type};

use super::{StoreError, now_ms};

/// One schema change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Applied in ascending order; never reused.
    pub version: i64,
    /// A short name, recorded next to the version.
    pub name: &'static str,
    /// The script: one or more statements.
    pub sql: &'static str,
}

/// The SQLite migrations, oldest first.
pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "keys",
        sql: include_str!("../../migrations/sqlite/0002_keys.sql"),
    },
];

/// The PostgreSQL migrations, oldest first.
pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "keys",
        sql: include_str!("../../migrations/postgres/0002_keys.sql"),
    },
];

/// Taken first in every PostgreSQL migration transaction, so concurrent
/// starts apply each migration once. The key is the ASCII bytes of
/// `spill-mg` read as a big-endian integer (any constant would do, as long as
/// it differs from the store's data lock, `spill-dt`); the lock is released
/// when the transaction ends.
pub const POSTGRES_LOCK: &str = "SELECT pg_advisory_xact_lock(8318264426145607015)";

/// Created inside the first migration transaction (after the lock), so two
/// instances never race to create it.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT NOT NULL PRIMARY KEY, \
     name TEXT NOT NULL, \
     applied_at BIGINT NOT NULL)";

/// Whether a version ($1) was applied.
const IS_APPLIED: &str = "SELECT version FROM schema_migrations WHERE version = $1";

/// Records a version ($1), its name ($2) and when ($3).
const RECORD: &str =
    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)";

/// Applies the `migrations` not yet recorded in `schema_migrations`, in
/// order, each in its own transaction opened with `begin` and, when given,
/// serialized by `lock`. Returns the versions applied by this call (empty
/// when the schema was already current).
///
/// Generic over the database because the runner is the same for both; the
/// bounds say "a connection executes queries that bind integers and text".
pub async fn run<DB>(
    pool: &Pool<DB>,
    migrations: &[Migration],
    begin: &'static str,
    lock: Option<&'static str>,
) -> Result<Vec<i64>, StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    let mut applied = Vec::new();
    for migration in migrations {
        let failed = |source| StoreError::Migration {
            version: migration.version,
            source,
        };
        let mut tx = pool.begin_with(begin).await?;
        if let Some(lock) = lock {
            sqlx::query(lock).execute(&mut *tx).await?;
        }
        sqlx::query(CREATE_TABLE).execute(&mut *tx).await?;
        let done = sqlx::query(IS_APPLIED)
            .bind(migration.version)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if done {
            tx.rollback().await?;
            continue;
        }
        // A script of several statements, sent as one. (Through
        // `Executor::execute`: `RawSql::execute`'s future cannot be
        // proven `Send` inside the store's boxed futures.)
        tx.execute(sqlx::raw_sql(migration.sql))
            .await
            .map_err(failed)?;
        sqlx::query(RECORD)
            .bind(migration.version)
            .bind(migration.name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use sqlx::Row;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

    use super::*;

    #[test]
    fn embedded_migrations_are_ascending_and_match_across_backends() {
        for list in [SQLITE, POSTGRES] {
            assert!(!list.is_empty());
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
        }
        let versions = |list: &[Migration]| list.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE), versions(POSTGRES));
    }

    async fn scratch_pool(dir: &std::path::Path) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(dir.join("scratch.db"))
            .create_if_missing(true);
        SqlitePool::connect_with(options).await.unwrap()
    }

    async fn recorded(pool: &SqlitePool) -> Vec<i64> {
        sqlx::query("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<i64, _>(0))
            .collect()
    }

    #[tokio::test]
    async fn a_failed_migration_rolls_back_and_names_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let pool = scratch_pool(dir.path()).await;
        let list = [
            Migration {
                version: 1,
                name: "one",
                sql: "CREATE TABLE one (id TEXT);",
            },
            Migration {
                version: 2,
                name: "two",
                // The first statement succeeds; the second fails, so the
                // whole script must roll back.
                sql: "CREATE TABLE two (id TEXT); INSERT INTO missing VALUES (1);",
            },
        ];
        let err = run(&pool, &list, "BEGIN IMMEDIATE", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Migration { version: 2, .. }),
            "{err}"
        );
        assert_eq!(recorded(&pool).await, [1]);
        let two = sqlx::query("SELECT name FROM sqlite_master WHERE name = 'two'")
            .fetch_optional(&pool)
            .await
            .unwrap();
        assert!(two.is_none(), "the failed script's table was kept");

        // Fixed, it applies on the next run; version 1 is not re-run (it
        // would fail: `one` exists).
        let fixed = [
            list[0],
            Migration {
                sql: "CREATE TABLE two (id TEXT);",
                ..list[1]
            },
        ];
        assert_eq!(
            run(&pool, &fixed, "BEGIN IMMEDIATE", None).await.unwrap(),
            [2]
        );
        assert_eq!(
            run(&pool, &fixed, "BEGIN IMMEDIATE", None).await.unwrap(),
            Vec::<i64>::new()
        );
        assert_eq!(recorded(&pool).await, [1, 2]);
    }
}

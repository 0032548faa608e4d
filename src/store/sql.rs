//! The SQL both backends run, and the [`Store`](super::Store)
//! implementation written once over it.
//!
//! SQLite and PostgreSQL share one dialect here: `$n` placeholders (SQLite
//! accepts them), `INSERT … ON CONFLICT`, `RETURNING`, `CASE`; not one query
//! differs. What does differ (how a write transaction begins, how writes
//! are serialized against deletions, the migrations) is each store's
//! [`Dialect`]; the rest differs only in sqlx's types (`Pool<Sqlite>` and
//! `Pool<Postgres>`, their rows and transactions), so [`sql_store!`] expands
//! the same method bodies for both rather than making every function
//! generic over `sqlx::Database` with a dozen higher-ranked bounds each
//! (the migration runner, which binds only integers and text, is generic).
//!
//! docs/storage.md has the schema and says which index serves which query.

use std::fmt::Write as _;

use super::migrations::Migration;
use super::{Order, PageRequest};

/// What differs between the backends beyond sqlx's types.
pub(super) trait Dialect {
    /// [`Store::backend`](super::Store::backend).
    const NAME: &'static str;
    /// The embedded migrations.
    const MIGRATIONS: &'static [Migration];
    /// Opens a write transaction. SQLite's `BEGIN IMMEDIATE` takes the
    /// database's write lock up front: a deferred transaction that reads
    /// and then writes fails with `SQLITE_BUSY` (no busy wait) when another
    /// connection wrote in between.
    const BEGIN_WRITE: &'static str;
    /// Opens a read-only transaction that reads one snapshot throughout
    /// (PostgreSQL defaults to a new snapshot per statement).
    const BEGIN_SNAPSHOT: &'static str;
    /// Run first in a migration transaction (PostgreSQL's advisory lock).
    const MIGRATION_LOCK: Option<&'static str>;
    /// Run first in every transaction that writes records, so that a
    /// concurrent deletion cannot slip between a record's tombstone check
    /// and its insert (PostgreSQL: a shared advisory lock; SQLite needs none,
    /// `BEGIN IMMEDIATE` already serializes writers).
    const WRITE_LOCK: Option<&'static str>;
    /// Run first in every deletion: the exclusive side of `WRITE_LOCK`.
    /// Deletions are rare and short; they wait for the batches in flight
    /// and hold new ones back for a few milliseconds.
    const DELETE_LOCK: Option<&'static str>;
}

/// The columns of a [`ConversationRow`](super::ConversationRow), in the
/// order the reader expects.
pub(super) const CONVERSATION_COLUMNS: &str =
    "id, tenant_id, user_id, title, metadata, created_at, updated_at";

/// The columns of a [`MessageRow`](super::MessageRow).
pub(super) const MESSAGE_COLUMNS: &str = "id, conversation_id, tenant_id, user_id, role, content, \
     status, model, provider, prompt_tokens, completion_tokens, cost_usd, usage_estimated, \
     client_message_id, generation_id, created_at";

/// The columns of an [`ApiKeyRow`](super::ApiKeyRow).
pub(super) const API_KEY_COLUMNS: &str =
    "id, tenant_id, name, secret_hash, scopes, tier, created_at, revoked_at";

/// The columns of a [`UsageDay`](super::UsageDay).
pub(super) const USAGE_COLUMNS: &str = "day, tenant_id, user_id, model, provider, messages, \
     prompt_tokens, completion_tokens, cost_usd";

/// Usage summed over users per (day, tenant, provider, model), for the
/// days `$1..=$2`; completed by [`usage_totals_query`]. The sums are cast
/// because PostgreSQL sums `BIGINT`s into `NUMERIC`. The primary key starts
/// with `day`, so the day range is an index range scan.
const USAGE_TOTALS: &str = "SELECT day, tenant_id, provider, model, \
     CAST(SUM(messages) AS BIGINT) AS messages, \
     CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
     CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
     CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd \
     FROM usage_daily WHERE day >= $1 AND day <= $2";

/// The usage totals query: of one tenant (`$3`, then the limit `$4`) or
/// of all (the limit `$3`).
pub(super) fn usage_totals_query(one_tenant: bool) -> String {
    let (filter, limit) = if one_tenant {
        (" AND tenant_id = $3", "$4")
    } else {
        ("", "$3")
    };
    format!(
        "{USAGE_TOTALS}{filter} GROUP BY day, tenant_id, provider, model \
         ORDER BY day, tenant_id, provider, model LIMIT {limit}"
    )
}

pub(super) const PING: &str = "SELECT 1";

/// The tenant row a conversation implies ($1 id, named after itself, $2
/// created_at).
pub(super) const INSERT_TENANT: &str =
    "INSERT INTO tenants (id, name, created_at) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING";

/// The user row a conversation implies ($1 tenant, $2 user, $3 created_at).
/// The records do not say whether the user is a signed-in user or a widget
/// visitor; `user` until the auth layer records it.
pub(super) const INSERT_USER: &str = "INSERT INTO users (tenant_id, id, kind, created_at) \
     VALUES ($1, $2, 'user', $3) ON CONFLICT (tenant_id, id) DO NOTHING";

/// Whether a record may not be written: its conversation ($1) was deleted,
/// or its user ($2, `tenant/user`) was deleted at or after the record's
/// creation ($3). A user who comes back after deleting their data starts
/// afresh; what they had before stays deleted.
pub(super) const TOMBSTONED: &str = "SELECT 1 FROM tombstones \
     WHERE (kind = 'conversation' AND id = $1) \
        OR (kind = 'user' AND id = $2 AND deleted_at >= $3)";

pub(super) const INSERT_CONVERSATION: &str = "INSERT INTO conversations \
     (id, tenant_id, user_id, title, metadata, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING";

/// Inserts a message; no row comes back when its id exists (an update) or
/// its `(conversation_id, client_message_id)` does (a duplicate send). No
/// conflict target, so both unique indexes are covered without a race.
pub(super) const INSERT_MESSAGE: &str = "INSERT INTO messages \
     (id, conversation_id, tenant_id, user_id, role, content, status, model, provider, \
      prompt_tokens, completion_tokens, cost_usd, usage_estimated, client_message_id, \
      generation_id, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT DO NOTHING RETURNING id";

/// Updates what may change on a stored message (a reply's end state). Zero
/// rows: no message has this id in this conversation, so the insert
/// conflicted on the client message id: a duplicate send.
pub(super) const UPDATE_MESSAGE: &str = "UPDATE messages SET \
     status = $5, content = $6, model = $7, provider = $8, prompt_tokens = $9, \
     completion_tokens = $10, cost_usd = $11, usage_estimated = $12 \
     WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3 AND user_id = $4";

/// A new message moves its conversation's `updated_at` forward ($1 id, $2
/// the message's time); never backward, so replays in any order agree.
pub(super) const TOUCH_CONVERSATION: &str =
    "UPDATE conversations SET updated_at = $2 WHERE id = $1 AND updated_at < $2";

/// Counts one assistant message into its day's aggregate.
pub(super) const ADD_USAGE: &str = "INSERT INTO usage_daily \
     (day, tenant_id, user_id, model, provider, messages, prompt_tokens, completion_tokens, \
      cost_usd) \
     VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) \
     ON CONFLICT (day, tenant_id, user_id, model, provider) DO UPDATE SET \
     messages = usage_daily.messages + 1, \
     prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
     completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
     cost_usd = usage_daily.cost_usd + excluded.cost_usd";

/// Whether conversation $1 belongs to tenant $2's user $3.
pub(super) const OWNED_CONVERSATION: &str =
    "SELECT 1 FROM conversations WHERE id = $1 AND tenant_id = $2 AND user_id = $3";

pub(super) const RENAME_CONVERSATION: &str = "UPDATE conversations SET title = $4, \
     updated_at = CASE WHEN updated_at < $5 THEN $5 ELSE updated_at END \
     WHERE id = $1 AND tenant_id = $2 AND user_id = $3";

pub(super) const DELETE_CONVERSATION: &str =
    "DELETE FROM conversations WHERE id = $1 AND tenant_id = $2 AND user_id = $3";

pub(super) const DELETE_CONVERSATION_MESSAGES: &str =
    "DELETE FROM messages WHERE conversation_id = $1";

/// Records a deletion ($1 kind, $2 id, $3 when). Deleting again moves the
/// time forward, never back.
pub(super) const INSERT_TOMBSTONE: &str = "INSERT INTO tombstones (kind, id, deleted_at) \
     VALUES ($1, $2, $3) ON CONFLICT (kind, id) DO UPDATE SET deleted_at = excluded.deleted_at \
     WHERE tombstones.deleted_at < excluded.deleted_at";

/// Tombstones every conversation of a user being deleted ($1 tenant, $2
/// user, $3 when), so their later messages stay out even though the user
/// tombstone only covers what was created before it.
pub(super) const TOMBSTONE_USER_CONVERSATIONS: &str = "INSERT INTO tombstones \
     (kind, id, deleted_at) \
     SELECT 'conversation', id, $3 FROM conversations WHERE tenant_id = $1 AND user_id = $2 \
     ON CONFLICT (kind, id) DO NOTHING";

pub(super) const DELETE_USER_MESSAGES: &str =
    "DELETE FROM messages WHERE tenant_id = $1 AND user_id = $2";

pub(super) const DELETE_USER_CONVERSATIONS: &str =
    "DELETE FROM conversations WHERE tenant_id = $1 AND user_id = $2";

pub(super) const DELETE_USER_USAGE: &str =
    "DELETE FROM usage_daily WHERE tenant_id = $1 AND user_id = $2";

pub(super) const DELETE_USER: &str = "DELETE FROM users WHERE tenant_id = $1 AND id = $2";

/// The id of a user's tombstone.
pub(super) fn user_key(tenant_id: &str, user_id: &str) -> String {
    format!("{tenant_id}/{user_id}")
}

/// Completes `select` (which ends in a `WHERE` over `scope_params`
/// parameters) into one page of `page`: the cursor bound next when there is
/// one, then the limit.
///
/// Four texts per listing (with or without cursor, either direction)
/// instead of one with `($n IS NULL OR id > $n)`: each is a plain range
/// scan of an index that ends in `id`.
pub(super) fn page_query(select: &str, scope_params: usize, page: &PageRequest) -> String {
    let (op, direction) = match page.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let mut sql = select.to_owned();
    let mut next = scope_params + 1;
    if page.after.is_some() {
        // Writing to a String cannot fail.
        let _ = write!(sql, " AND id {op} ${next}");
        next += 1;
    }
    let _ = write!(sql, " ORDER BY id {direction} LIMIT ${next}");
    sql
}

/// Expands `impl Store for $store`, where `$store` has a `pool:
/// sqlx::Pool<$db>` field and implements [`Dialect`].
macro_rules! sql_store {
    ($store:ty, $db:ty) => {
        // A scope of its own, so the expansion brings its imports along.
        const _: () = {
            use futures_util::future::BoxFuture;
            use sqlx::Row as _;

            use $crate::store::migrations;
            use $crate::store::sql::{self, Dialect};
            use $crate::store::{
                ApiKeyRow, ConversationRow, Deleted, MessageRow, MessageStatus, Owner, Page,
                PageRequest, Record, Store, StoreError, UsageDay, UsageQuery, UsageTotal,
                UserExport, now_ms, utc_day,
            };

            impl $store {
                /// Opens a write transaction and takes `lock` in it.
                async fn begin(
                    &self,
                    lock: Option<&'static str>,
                ) -> Result<sqlx::Transaction<'static, $db>, StoreError> {
                    let mut tx = self.pool.begin_with(<Self as Dialect>::BEGIN_WRITE).await?;
                    if let Some(lock) = lock {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    Ok(tx)
                }

                /// Writes one record inside a batch's transaction (see
                /// [`Store::write_batch`] for the rules).
                async fn write_record(
                    tx: &mut <$db as sqlx::Database>::Connection,
                    record: &Record,
                ) -> Result<(), StoreError> {
                    match record {
                        Record::Conversation(row) => {
                            let tombstoned = sqlx::query(sql::TOMBSTONED)
                                .bind(&row.id)
                                .bind(sql::user_key(&row.tenant_id, &row.user_id))
                                .bind(row.created_at)
                                .fetch_optional(&mut *tx)
                                .await?
                                .is_some();
                            if tombstoned {
                                return Ok(());
                            }
                            sqlx::query(sql::INSERT_TENANT)
                                .bind(&row.tenant_id)
                                .bind(row.created_at)
                                .execute(&mut *tx)
                                .await?;
                            sqlx::query(sql::INSERT_USER)
                                .bind(&row.tenant_id)
                                .bind(&row.user_id)
                                .bind(row.created_at)
                                .execute(&mut *tx)
                                .await?;
                            sqlx::query(sql::INSERT_CONVERSATION)
                                .bind(&row.id)
                                .bind(&row.tenant_id)
                                .bind(&row.user_id)
                                .bind(&row.title)
                                .bind(row.metadata.to_string())
                                .bind(row.created_at)
                                .bind(row.updated_at)
                                .execute(&mut *tx)
                                .await?;
                        }
                        Record::Message(row) => {
                            let tombstoned = sqlx::query(sql::TOMBSTONED)
                                .bind(&row.conversation_id)
                                .bind(sql::user_key(&row.tenant_id, &row.user_id))
                                .bind(row.created_at)
                                .fetch_optional(&mut *tx)
                                .await?
                                .is_some();
                            if tombstoned {
                                return Ok(());
                            }
                            let inserted = sqlx::query(sql::INSERT_MESSAGE)
                                .bind(&row.id)
                                .bind(&row.conversation_id)
                                .bind(&row.tenant_id)
                                .bind(&row.user_id)
                                .bind(&row.role)
                                .bind(&row.content)
                                .bind(row.status.as_str())
                                .bind(&row.model)
                                .bind(&row.provider)
                                .bind(row.prompt_tokens)
                                .bind(row.completion_tokens)
                                .bind(row.cost_usd)
                                .bind(row.usage_estimated)
                                .bind(&row.client_message_id)
                                .bind(&row.generation_id)
                                .bind(row.created_at)
                                .fetch_optional(&mut *tx)
                                .await?
                                .is_some();
                            if !inserted {
                                // Stored before: bring its end state up to
                                // date, or skip it if it is a duplicate send.
                                sqlx::query(sql::UPDATE_MESSAGE)
                                    .bind(&row.id)
                                    .bind(&row.conversation_id)
                                    .bind(&row.tenant_id)
                                    .bind(&row.user_id)
                                    .bind(row.status.as_str())
                                    .bind(&row.content)
                                    .bind(&row.model)
                                    .bind(&row.provider)
                                    .bind(row.prompt_tokens)
                                    .bind(row.completion_tokens)
                                    .bind(row.cost_usd)
                                    .bind(row.usage_estimated)
                                    .execute(&mut *tx)
                                    .await?;
                                return Ok(());
                            }
                            sqlx::query(sql::TOUCH_CONVERSATION)
                                .bind(&row.conversation_id)
                                .bind(row.created_at)
                                .execute(&mut *tx)
                                .await?;
                            if let (true, Some(model)) = (row.role == "assistant", &row.model) {
                                sqlx::query(sql::ADD_USAGE)
                                    .bind(utc_day(row.created_at))
                                    .bind(&row.tenant_id)
                                    .bind(&row.user_id)
                                    .bind(model)
                                    .bind(row.provider.as_deref().unwrap_or_default())
                                    .bind(row.prompt_tokens.unwrap_or(0))
                                    .bind(row.completion_tokens.unwrap_or(0))
                                    .bind(row.cost_usd.unwrap_or(0.0))
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                    }
                    Ok(())
                }

                fn conversation_from(
                    row: &<$db as sqlx::Database>::Row,
                ) -> Result<ConversationRow, StoreError> {
                    let id: String = row.try_get("id")?;
                    let metadata: String = row.try_get("metadata")?;
                    let metadata = serde_json::from_str(&metadata).map_err(|err| {
                        StoreError::Corrupt(format!(
                            "conversation {id}: metadata is not JSON: {err}"
                        ))
                    })?;
                    Ok(ConversationRow {
                        tenant_id: row.try_get("tenant_id")?,
                        user_id: row.try_get("user_id")?,
                        title: row.try_get("title")?,
                        metadata,
                        created_at: row.try_get("created_at")?,
                        updated_at: row.try_get("updated_at")?,
                        id,
                    })
                }

                fn message_from(
                    row: &<$db as sqlx::Database>::Row,
                ) -> Result<MessageRow, StoreError> {
                    let id: String = row.try_get("id")?;
                    let status: String = row.try_get("status")?;
                    let status = MessageStatus::parse(&status).ok_or_else(|| {
                        StoreError::Corrupt(format!("message {id}: unknown status {status:?}"))
                    })?;
                    Ok(MessageRow {
                        conversation_id: row.try_get("conversation_id")?,
                        tenant_id: row.try_get("tenant_id")?,
                        user_id: row.try_get("user_id")?,
                        role: row.try_get("role")?,
                        content: row.try_get("content")?,
                        status,
                        model: row.try_get("model")?,
                        provider: row.try_get("provider")?,
                        prompt_tokens: row.try_get("prompt_tokens")?,
                        completion_tokens: row.try_get("completion_tokens")?,
                        cost_usd: row.try_get("cost_usd")?,
                        usage_estimated: row.try_get("usage_estimated")?,
                        client_message_id: row.try_get("client_message_id")?,
                        generation_id: row.try_get("generation_id")?,
                        created_at: row.try_get("created_at")?,
                        id,
                    })
                }

                fn api_key_from(row: &<$db as sqlx::Database>::Row) -> Result<ApiKeyRow, StoreError> {
                    Ok(ApiKeyRow {
                        id: row.try_get("id")?,
                        tenant_id: row.try_get("tenant_id")?,
                        name: row.try_get("name")?,
                        secret_hash: row.try_get("secret_hash")?,
                        scopes: row.try_get("scopes")?,
                        tier: row.try_get("tier")?,
                        created_at: row.try_get("created_at")?,
                        revoked_at: row.try_get("revoked_at")?,
                    })
                }

                fn usage_from(row: &<$db as sqlx::Database>::Row) -> Result<UsageDay, StoreError> {
                    Ok(UsageDay {
                        day: row.try_get("day")?,
                        tenant_id: row.try_get("tenant_id")?,
                        user_id: row.try_get("user_id")?,
                        model: row.try_get("model")?,
                        provider: row.try_get("provider")?,
                        messages: row.try_get("messages")?,
                        prompt_tokens: row.try_get("prompt_tokens")?,
                        completion_tokens: row.try_get("completion_tokens")?,
                        cost_usd: row.try_get("cost_usd")?,
                    })
                }

                /// A page of rows, with the cursor to the next one when this
                /// one is full.
                fn page_from<T>(
                    rows: Vec<<$db as sqlx::Database>::Row>,
                    limit: u32,
                    read: fn(&<$db as sqlx::Database>::Row) -> Result<T, StoreError>,
                    id: fn(&T) -> &str,
                ) -> Result<Page<T>, StoreError> {
                    let items = rows.iter().map(read).collect::<Result<Vec<_>, _>>()?;
                    let full = limit > 0 && items.len() >= limit as usize;
                    let next = if full {
                        items.last().map(|item| id(item).to_owned())
                    } else {
                        None
                    };
                    Ok(Page { items, next })
                }
            }

            impl Store for $store {
                fn backend(&self) -> &'static str {
                    <Self as Dialect>::NAME
                }

                fn migrate(&self) -> BoxFuture<'_, Result<(), StoreError>> {
                    Box::pin(async move {
                        migrations::run(
                            &self.pool,
                            <Self as Dialect>::MIGRATIONS,
                            <Self as Dialect>::BEGIN_WRITE,
                            <Self as Dialect>::MIGRATION_LOCK,
                        )
                        .await?;
                        Ok(())
                    })
                }

                fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
                    Box::pin(async move {
                        sqlx::query(sql::PING).execute(&self.pool).await?;
                        Ok(())
                    })
                }

                fn write_batch<'a>(
                    &'a self,
                    records: &'a [Record],
                ) -> BoxFuture<'a, Result<(), StoreError>> {
                    Box::pin(async move {
                        if records.is_empty() {
                            return Ok(());
                        }
                        let mut tx = self.begin(<Self as Dialect>::WRITE_LOCK).await?;
                        for record in records {
                            Self::write_record(&mut tx, record).await?;
                        }
                        tx.commit().await?;
                        Ok(())
                    })
                }

                fn create_conversation<'a>(
                    &'a self,
                    row: &'a ConversationRow,
                ) -> BoxFuture<'a, Result<(), StoreError>> {
                    Box::pin(async move {
                        let record = Record::Conversation(row.clone());
                        self.write_batch(std::slice::from_ref(&record)).await
                    })
                }

                fn list_conversations<'a>(
                    &'a self,
                    owner: &'a Owner,
                    page: &'a PageRequest,
                ) -> BoxFuture<'a, Result<Page<ConversationRow>, StoreError>> {
                    Box::pin(async move {
                        let select = format!(
                            "SELECT {} FROM conversations WHERE tenant_id = $1 AND user_id = $2",
                            sql::CONVERSATION_COLUMNS
                        );
                        let text = sql::page_query(&select, 2, page);
                        let mut query = sqlx::query(&text)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id);
                        if let Some(after) = &page.after {
                            query = query.bind(after);
                        }
                        let rows = query
                            .bind(i64::from(page.limit))
                            .fetch_all(&self.pool)
                            .await?;
                        Self::page_from(rows, page.limit, Self::conversation_from, |c| &c.id)
                    })
                }

                fn get_conversation<'a>(
                    &'a self,
                    owner: &'a Owner,
                    id: &'a str,
                ) -> BoxFuture<'a, Result<Option<ConversationRow>, StoreError>> {
                    Box::pin(async move {
                        let text = format!(
                            "SELECT {} FROM conversations WHERE id = $1 AND tenant_id = $2 \
                         AND user_id = $3",
                            sql::CONVERSATION_COLUMNS
                        );
                        let row = sqlx::query(&text)
                            .bind(id)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id)
                            .fetch_optional(&self.pool)
                            .await?;
                        row.as_ref().map(Self::conversation_from).transpose()
                    })
                }

                fn list_messages<'a>(
                    &'a self,
                    owner: &'a Owner,
                    conversation_id: &'a str,
                    page: &'a PageRequest,
                ) -> BoxFuture<'a, Result<Option<Page<MessageRow>>, StoreError>> {
                    Box::pin(async move {
                        let owned = sqlx::query(sql::OWNED_CONVERSATION)
                            .bind(conversation_id)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id)
                            .fetch_optional(&self.pool)
                            .await?
                            .is_some();
                        if !owned {
                            return Ok(None);
                        }
                        let select = format!(
                            "SELECT {} FROM messages WHERE conversation_id = $1",
                            sql::MESSAGE_COLUMNS
                        );
                        let text = sql::page_query(&select, 1, page);
                        let mut query = sqlx::query(&text).bind(conversation_id);
                        if let Some(after) = &page.after {
                            query = query.bind(after);
                        }
                        let rows = query
                            .bind(i64::from(page.limit))
                            .fetch_all(&self.pool)
                            .await?;
                        Self::page_from(rows, page.limit, Self::message_from, |m| &m.id).map(Some)
                    })
                }

                fn rename_conversation<'a>(
                    &'a self,
                    owner: &'a Owner,
                    id: &'a str,
                    title: &'a str,
                    now: i64,
                ) -> BoxFuture<'a, Result<bool, StoreError>> {
                    Box::pin(async move {
                        let renamed = sqlx::query(sql::RENAME_CONVERSATION)
                            .bind(id)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id)
                            .bind(title)
                            .bind(now)
                            .execute(&self.pool)
                            .await?
                            .rows_affected();
                        Ok(renamed > 0)
                    })
                }

                fn delete_conversation<'a>(
                    &'a self,
                    owner: &'a Owner,
                    id: &'a str,
                ) -> BoxFuture<'a, Result<Option<Deleted>, StoreError>> {
                    Box::pin(async move {
                        let mut tx = self.begin(<Self as Dialect>::DELETE_LOCK).await?;
                        let conversations = sqlx::query(sql::DELETE_CONVERSATION)
                            .bind(id)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if conversations == 0 {
                            tx.rollback().await?;
                            return Ok(None);
                        }
                        let messages = sqlx::query(sql::DELETE_CONVERSATION_MESSAGES)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        sqlx::query(sql::INSERT_TOMBSTONE)
                            .bind("conversation")
                            .bind(id)
                            .bind(now_ms())
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        Ok(Some(Deleted {
                            conversations,
                            messages,
                            usage_days: 0,
                        }))
                    })
                }

                fn export_user<'a>(
                    &'a self,
                    owner: &'a Owner,
                ) -> BoxFuture<'a, Result<UserExport, StoreError>> {
                    Box::pin(async move {
                        let conversations = format!(
                            "SELECT {} FROM conversations WHERE tenant_id = $1 AND user_id = $2 \
                         ORDER BY id",
                            sql::CONVERSATION_COLUMNS
                        );
                        let messages = format!(
                            "SELECT {} FROM messages WHERE tenant_id = $1 AND user_id = $2 \
                         ORDER BY id",
                            sql::MESSAGE_COLUMNS
                        );
                        let usage = format!(
                            "SELECT {} FROM usage_daily WHERE tenant_id = $1 AND user_id = $2 \
                         ORDER BY day, model, provider",
                            sql::USAGE_COLUMNS
                        );
                        // One snapshot, so a message written meanwhile cannot
                        // appear without its conversation.
                        let mut tx = self
                            .pool
                            .begin_with(<Self as Dialect>::BEGIN_SNAPSHOT)
                            .await?;
                        let mut fetch = async |text: &str| {
                            sqlx::query(text)
                                .bind(&owner.tenant_id)
                                .bind(&owner.user_id)
                                .fetch_all(&mut *tx)
                                .await
                        };
                        let conversations = fetch(&conversations).await?;
                        let messages = fetch(&messages).await?;
                        let usage = fetch(&usage).await?;
                        tx.commit().await?;
                        Ok(UserExport {
                            owner: owner.clone(),
                            conversations: conversations
                                .iter()
                                .map(Self::conversation_from)
                                .collect::<Result<_, _>>()?,
                            messages: messages
                                .iter()
                                .map(Self::message_from)
                                .collect::<Result<_, _>>()?,
                            usage: usage
                                .iter()
                                .map(Self::usage_from)
                                .collect::<Result<_, _>>()?,
                        })
                    })
                }

                fn delete_user<'a>(
                    &'a self,
                    owner: &'a Owner,
                ) -> BoxFuture<'a, Result<Deleted, StoreError>> {
                    Box::pin(async move {
                        let now = now_ms();
                        let mut tx = self.begin(<Self as Dialect>::DELETE_LOCK).await?;
                        sqlx::query(sql::TOMBSTONE_USER_CONVERSATIONS)
                            .bind(&owner.tenant_id)
                            .bind(&owner.user_id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        let mut delete = async |text: &str| {
                            sqlx::query(text)
                                .bind(&owner.tenant_id)
                                .bind(&owner.user_id)
                                .execute(&mut *tx)
                                .await
                                .map(|done| done.rows_affected())
                        };
                        let deleted = Deleted {
                            messages: delete(sql::DELETE_USER_MESSAGES).await?,
                            conversations: delete(sql::DELETE_USER_CONVERSATIONS).await?,
                            usage_days: delete(sql::DELETE_USER_USAGE).await?,
                        };
                        delete(sql::DELETE_USER).await?;
                        sqlx::query(sql::INSERT_TOMBSTONE)
                            .bind("user")
                            .bind(sql::user_key(&owner.tenant_id, &owner.user_id))
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        Ok(deleted)
                    })
                }

                fn usage_days<'a>(
                    &'a self,
                    tenant_id: &'a str,
                ) -> BoxFuture<'a, Result<Vec<UsageDay>, StoreError>> {
                    Box::pin(async move {
                        let text = format!(
                            "SELECT {} FROM usage_daily WHERE tenant_id = $1 \
                         ORDER BY day, user_id, model, provider",
                            sql::USAGE_COLUMNS
                        );
                        let rows = sqlx::query(&text)
                            .bind(tenant_id)
                            .fetch_all(&self.pool)
                            .await?;
                        rows.iter().map(Self::usage_from).collect()
                    })
                }

                fn usage_totals<'a>(
                    &'a self,
                    query: &'a UsageQuery,
                ) -> BoxFuture<'a, Result<Vec<UsageTotal>, StoreError>> {
                    Box::pin(async move {
                        let text = sql::usage_totals_query(query.tenant_id.is_some());
                        let mut select = sqlx::query(&text).bind(&query.from).bind(&query.to);
                        if let Some(tenant_id) = &query.tenant_id {
                            select = select.bind(tenant_id);
                        }
                        let rows = select
                            .bind(i64::from(query.limit))
                            .fetch_all(&self.pool)
                            .await?;
                        rows.iter()
                            .map(|row| {
                                Ok(UsageTotal {
                                    day: row.try_get("day")?,
                                    tenant_id: row.try_get("tenant_id")?,
                                    provider: row.try_get("provider")?,
                                    model: row.try_get("model")?,
                                    messages: row.try_get("messages")?,
                                    prompt_tokens: row.try_get("prompt_tokens")?,
                                    completion_tokens: row.try_get("completion_tokens")?,
                                    cost_usd: row.try_get("cost_usd")?,
                                })
                            })
                            .collect()
                    })
                }

                fn create_api_key<'a>(
                    &'a self,
                    row: &'a ApiKeyRow,
                ) -> BoxFuture<'a, Result<(), StoreError>> {
                    Box::pin(async move {
                        sqlx::query(
                            "INSERT INTO api_keys (id, tenant_id, name, secret_hash, scopes, \
                             tier, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        )
                        .bind(&row.id)
                        .bind(&row.tenant_id)
                        .bind(&row.name)
                        .bind(&row.secret_hash)
                        .bind(&row.scopes)
                        .bind(&row.tier)
                        .bind(row.created_at)
                        .bind(row.revoked_at)
                        .execute(&self.pool)
                        .await?;
                        Ok(())
                    })
                }

                fn get_api_key<'a>(
                    &'a self,
                    id: &'a str,
                ) -> BoxFuture<'a, Result<Option<ApiKeyRow>, StoreError>> {
                    Box::pin(async move {
                        let text = format!("SELECT {} FROM api_keys WHERE id = $1", sql::API_KEY_COLUMNS);
                        let row = sqlx::query(&text).bind(id).fetch_optional(&self.pool).await?;
                        row.as_ref().map(Self::api_key_from).transpose()
                    })
                }

                fn list_api_keys<'a>(
                    &'a self,
                    tenant_id: Option<&'a str>,
                ) -> BoxFuture<'a, Result<Vec<ApiKeyRow>, StoreError>> {
                    Box::pin(async move {
                        let rows = match tenant_id {
                            Some(tenant_id) => {
                                let text = format!(
                                    "SELECT {} FROM api_keys WHERE tenant_id = $1 ORDER BY id",
                                    sql::API_KEY_COLUMNS
                                );
                                sqlx::query(&text).bind(tenant_id).fetch_all(&self.pool).await?
                            }
                            None => {
                                let text = format!(
                                    "SELECT {} FROM api_keys ORDER BY tenant_id, id",
                                    sql::API_KEY_COLUMNS
                                );
                                sqlx::query(&text).fetch_all(&self.pool).await?
                            }
                        };
                        rows.iter().map(Self::api_key_from).collect()
                    })
                }

                fn revoke_api_key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
                    Box::pin(async move {
                        let done = sqlx::query(
                            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                        )
                        .bind(id)
                        .bind(now_ms())
                        .execute(&self.pool)
                        .await?;
                        Ok(done.rows_affected() > 0)
                    })
                }

                fn revoke_token<'a>(
                    &'a self,
                    jti: &'a str,
                    expires_at: i64,
                ) -> BoxFuture<'a, Result<(), StoreError>> {
                    Box::pin(async move {
                        let now = now_ms();
                        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < $1")
                            .bind(now)
                            .execute(&self.pool)
                            .await?;
                        sqlx::query(
                            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
                             VALUES ($1, $2, $3) ON CONFLICT (jti) DO UPDATE SET \
                             expires_at = CASE WHEN excluded.expires_at > revoked_tokens.expires_at \
                             THEN excluded.expires_at ELSE revoked_tokens.expires_at END",
                        )
                        .bind(jti)
                        .bind(expires_at)
                        .bind(now)
                        .execute(&self.pool)
                        .await?;
                        Ok(())
                    })
                }

                fn revoked_tokens(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
                    Box::pin(async move {
                        let rows = sqlx::query("SELECT jti FROM revoked_tokens WHERE expires_at >= $1")
                            .bind(now_ms())
                            .fetch_all(&self.pool)
                            .await?;
                        rows.iter()
                            .map(|row| row.try_get::<String, _>("jti").map_err(StoreError::from))
                            .collect()
                    })
                }
            }
        };
    };
}

pub(super) use sql_store;

#[cfg(test)]
mod tests {
    use super::*;

    fn page(after: Option<&str>, order: Order) -> PageRequest {
        PageRequest {
            after: after.map(str::to_owned),
            limit: 10,
            order,
        }
    }

    #[test]
    fn page_queries_range_over_id_in_the_requested_direction() {
        let select = "SELECT id FROM t WHERE a = $1";
        assert_eq!(
            page_query(select, 1, &page(None, Order::Asc)),
            "SELECT id FROM t WHERE a = $1 ORDER BY id ASC LIMIT $2"
        );
        assert_eq!(
            page_query(select, 1, &page(Some("x"), Order::Asc)),
            "SELECT id FROM t WHERE a = $1 AND id > $2 ORDER BY id ASC LIMIT $3"
        );
        assert_eq!(
            page_query(select, 1, &page(Some("x"), Order::Desc)),
            "SELECT id FROM t WHERE a = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        );
    }
}

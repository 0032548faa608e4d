//! Persistence: conversations, messages and usage, in SQLite (the embedded
//! default) or PostgreSQL, written behind the stream.
//!
//! - [`Store`]: the trait both databases implement ([`sqlite`],
//!   [`postgres`]), with embedded migrations ([`migrations`]);
//! - [`journal`]: the append-only, checksummed journal on local disk that
//!   makes every acknowledged record durable before it is acknowledged;
//! - [`persister`]: the write-behind pipeline: journal first (group commit),
//!   then batches into the database, retried while it is down, replayed at
//!   start.
//!
//! Rows carry ids, never auto-increments: every write is an idempotent
//! upsert keyed by id, so replaying a record that was already stored is
//! harmless. Times are Unix milliseconds (`BIGINT`). Ids are UUIDv7 text,
//! which sorts by creation time: pagination cursors are ids.

pub mod journal;
pub mod migrations;
pub mod persister;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::config::StoreConfig;

/// Who owns data: a user of a tenant. Every query is scoped to one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The tenant (one customer of the gateway).
    pub tenant_id: String,
    /// The user within the tenant (a signed-in user's id, or an anonymous
    /// widget visitor's id).
    pub user_id: String,
}

/// A conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRow {
    /// UUIDv7.
    pub id: String,
    /// The owning tenant.
    pub tenant_id: String,
    /// The owning user.
    pub user_id: String,
    /// A title, when one was set.
    pub title: Option<String>,
    /// Free-form JSON object the client attached.
    pub metadata: serde_json::Value,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of the last change (rename, new message).
    pub updated_at: i64,
}

/// An API key as stored: never its secret, only the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRow {
    /// The public part of the key (`sk_spl_<id>_…`).
    pub id: String,
    /// The tenant the key acts for.
    pub tenant_id: String,
    /// A label for operators.
    pub name: String,
    /// SHA-256 of the secret part, hex.
    pub secret_hash: String,
    /// Space-separated scopes.
    pub scopes: String,
    /// The rate-limit tier.
    pub tier: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms, once revoked.
    pub revoked_at: Option<i64>,
}

/// How a stored message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Whole: a user message, or a reply that finished.
    Complete,
    /// A reply cut short because every client left (or was cancelled).
    Aborted,
    /// A reply that failed.
    Failed,
}

impl MessageStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Aborted => "aborted",
            Self::Failed => "failed",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "complete" => Some(Self::Complete),
            "aborted" => Some(Self::Aborted),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRow {
    /// UUIDv7.
    pub id: String,
    /// The conversation it belongs to.
    pub conversation_id: String,
    /// The owning tenant (denormalized for scoping and deletion).
    pub tenant_id: String,
    /// The owning user (denormalized for scoping and deletion).
    pub user_id: String,
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// How it ended.
    pub status: MessageStatus,
    /// The upstream model that answered (assistant messages).
    pub model: Option<String>,
    /// The provider that answered (assistant messages).
    pub provider: Option<String>,
    /// Billed prompt tokens (assistant messages).
    pub prompt_tokens: Option<i64>,
    /// Billed completion tokens (assistant messages).
    pub completion_tokens: Option<i64>,
    /// Cost in USD, when priced.
    pub cost_usd: Option<f64>,
    /// Whether the tokens are an estimate.
    pub usage_estimated: bool,
    /// The client's id for the message, for idempotent sends.
    pub client_message_id: Option<String>,
    /// The generation that produced it (assistant messages).
    pub generation_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

/// What the persister writes. Each is an idempotent upsert keyed by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// Creates the conversation if it does not exist (never overwrites).
    Conversation(ConversationRow),
    /// Inserts the message, or updates it if its id exists. A message
    /// counts toward the daily usage aggregates once, when first inserted.
    Message(MessageRow),
}

impl Record {
    /// The id the record is keyed by.
    pub fn id(&self) -> &str {
        match self {
            Self::Conversation(row) => &row.id,
            Self::Message(row) => &row.id,
        }
    }
}

/// One day of usage for one (user, model, provider).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageDay {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// The tenant.
    pub tenant_id: String,
    /// The user.
    pub user_id: String,
    /// The upstream model.
    pub model: String,
    /// The provider.
    pub provider: String,
    /// Assistant messages counted.
    pub messages: i64,
    /// Billed prompt tokens.
    pub prompt_tokens: i64,
    /// Billed completion tokens.
    pub completion_tokens: i64,
    /// Cost in USD (unpriced messages add 0).
    pub cost_usd: f64,
}

/// Which usage aggregates an operator asks for: the UTC days `from..=to`
/// (`YYYY-MM-DD`, compared as text, which sorts like the dates), of one
/// tenant or of all, at most `limit` rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// One tenant, or every tenant when `None`.
    pub tenant_id: Option<String>,
    /// The first day, inclusive.
    pub from: String,
    /// The last day, inclusive.
    pub to: String,
    /// Most rows returned (the caller asks one more than it shows to learn
    /// whether the answer was cut).
    pub limit: u32,
}

/// One day of usage for one (tenant, provider, model), summed over the
/// tenant's users: a row of the operators' cost dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTotal {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// The tenant.
    pub tenant_id: String,
    /// The provider (`''` when unknown).
    pub provider: String,
    /// The upstream model.
    pub model: String,
    /// Assistant replies counted (one per answered request).
    pub messages: i64,
    /// Billed prompt tokens.
    pub prompt_tokens: i64,
    /// Billed completion tokens.
    pub completion_tokens: i64,
    /// Cost in USD (unpriced replies add 0).
    pub cost_usd: f64,
}

/// Page direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// A page request: items strictly after `after` in `order`, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// The cursor: the id of the last item of the previous page.
    pub after: Option<String>,
    /// Most items (1..=200, clamped by the HTTP layer).
    pub limit: u32,
    /// Direction.
    pub order: Order,
}

/// One page of results. Cursors are ids (UUIDv7 sorts by creation), so a
/// page is stable under inserts: new rows sort after every old one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor for the next page, when there may be one.
    pub next: Option<String>,
}

/// Everything stored about one user, for export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserExport {
    /// The user.
    pub owner: Owner,
    /// Their conversations, oldest first.
    pub conversations: Vec<ConversationRow>,
    /// Their messages, oldest first.
    pub messages: Vec<MessageRow>,
    /// Their usage aggregates.
    pub usage: Vec<UsageDay>,
}

/// What a deletion removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Deleted {
    /// Conversations removed.
    pub conversations: u64,
    /// Messages removed.
    pub messages: u64,
    /// Usage aggregate rows removed.
    pub usage_days: u64,
}

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or failed the query.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The migration's version.
        version: i64,
        /// What the database said.
        #[source]
        source: sqlx::Error,
    },
    /// The `database_url` is not usable.
    #[error("invalid database_url: {0}")]
    Url(String),
    /// A stored value could not be read back (corrupt row).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// The persistence operations the gateway needs. Every read and every
/// deletion is scoped to an [`Owner`]; a row of another owner is "not
/// found", never "forbidden".
pub trait Store: Send + Sync + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Runs the embedded migrations that have not run yet.
    fn migrate(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Checks the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Writes `records` in one transaction, in order. Idempotent: writing
    /// the same records again changes nothing (and counts no usage twice).
    /// Records of deleted conversations or users are skipped (tombstones),
    /// so a journal replay cannot resurrect deleted data.
    fn write_batch<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Creates a conversation now (the history API's create).
    fn create_conversation<'a>(
        &'a self,
        row: &'a ConversationRow,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The owner's conversations, by id.
    fn list_conversations<'a>(
        &'a self,
        owner: &'a Owner,
        page: &'a PageRequest,
    ) -> BoxFuture<'a, Result<Page<ConversationRow>, StoreError>>;

    /// One of the owner's conversations.
    fn get_conversation<'a>(
        &'a self,
        owner: &'a Owner,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ConversationRow>, StoreError>>;

    /// The messages of one of the owner's conversations, by id; `None` when
    /// the conversation is not the owner's (or does not exist).
    fn list_messages<'a>(
        &'a self,
        owner: &'a Owner,
        conversation_id: &'a str,
        page: &'a PageRequest,
    ) -> BoxFuture<'a, Result<Option<Page<MessageRow>>, StoreError>>;

    /// Renames one of the owner's conversations; false if not found.
    fn rename_conversation<'a>(
        &'a self,
        owner: &'a Owner,
        id: &'a str,
        title: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes one of the owner's conversations and its messages, leaving a
    /// tombstone; `None` if not found.
    fn delete_conversation<'a>(
        &'a self,
        owner: &'a Owner,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Deleted>, StoreError>>;

    /// Everything stored about the owner.
    fn export_user<'a>(&'a self, owner: &'a Owner)
    -> BoxFuture<'a, Result<UserExport, StoreError>>;

    /// Deletes everything stored about the owner (conversations, messages,
    /// usage), leaving a tombstone.
    fn delete_user<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<Deleted, StoreError>>;

    /// Usage aggregates of a tenant, by day.
    fn usage_days<'a>(
        &'a self,
        tenant_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<UsageDay>, StoreError>>;

    /// Usage aggregates across users (and, without a tenant, across
    /// tenants) for the operators' cost dashboard: one row per (day,
    /// tenant, provider, model) within `query`'s days, ordered by day,
    /// tenant, provider, model; at most `query.limit` rows. Read-only.
    fn usage_totals<'a>(
        &'a self,
        query: &'a UsageQuery,
    ) -> BoxFuture<'a, Result<Vec<UsageTotal>, StoreError>>;

    /// Stores a new API key.
    fn create_api_key<'a>(&'a self, row: &'a ApiKeyRow) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The API key `id`, revoked or not.
    fn get_api_key<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyRow>, StoreError>>;

    /// API keys, of one tenant or of all, by id.
    fn list_api_keys<'a>(
        &'a self,
        tenant_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyRow>, StoreError>>;

    /// Revokes API key `id`; false when there is no such key (revoking a
    /// revoked key keeps its first revocation time and answers true).
    fn revoke_api_key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Revokes the JWT with `jti` until `expires_at` (Unix ms).
    fn revoke_token<'a>(
        &'a self,
        jti: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The `jti`s revoked and not yet expired.
    fn revoked_tokens(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
}

/// Opens the store `config.database_url` names (`sqlite://…` or
/// `postgres://…`; default: a SQLite file under `config.data_dir`).
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let url = config.database_url();
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(&url, config).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PostgresStore::open(&url, config).await?))
    } else {
        Err(StoreError::Url(
            "expected sqlite://… or postgres://…".to_owned(),
        ))
    }
}

/// The UTC day (`YYYY-MM-DD`) of a Unix-ms time, for usage aggregates.
pub fn utc_day(unix_ms: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm): no date crate needed.
    let days = unix_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days_are_civil_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(86_400_000 - 1), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_795_305_600_000), "2026-11-22");
        assert_eq!(utc_day(-1), "1969-12-31");
    }
}

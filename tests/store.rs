//! The `Store` contract, written once and run against both real databases:
//! a SQLite file in a temporary directory and a fresh PostgreSQL database
//! per test (see `common/db.rs`). Idempotent batches, message updates,
//! duplicate sends, tombstones, ownership, pagination under concurrent
//! inserts, export, erasure, usage; and a PostgreSQL outage.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::db::{self, TestDatabase};
use serde_json::json;
use spillway::store::{
    ConversationRow, Deleted, MessageRow, MessageStatus, Order, Owner, Page, PageRequest, Record,
    Store, UsageDay, now_ms,
};
use tempfile::TempDir;

/// Runs each listed test once per backend, as `sqlite::<name>` and
/// `postgres::<name>`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    migrations_are_idempotent,
    concurrent_migrations_apply_each_version_once,
    conversations_round_trip_with_metadata,
    write_batch_is_idempotent,
    rewriting_a_message_updates_it_without_counting_usage_again,
    duplicate_client_message_id_is_skipped,
    records_arriving_out_of_order_are_kept,
    tombstone_stops_replay_of_a_deleted_conversation,
    deletion_racing_writes_leaves_no_message_behind,
    deleted_user_stays_deleted_across_replays,
    ownership_scopes_every_read_and_write,
    conversation_pages_have_no_gaps_or_duplicates_under_inserts,
    message_pages_have_no_gaps_or_duplicates_under_inserts,
    rename_sets_title_and_updated_at,
    export_holds_everything_of_the_user_oldest_first,
    usage_days_sum_assistant_replies_per_day_model_and_provider,
);

/// Which database a test runs against.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database: its URL, and what removes it when the test ends.
struct FreshDatabase {
    url: String,
    _dir: Option<TempDir>,
    _postgres: Option<TestDatabase>,
}

impl Backend {
    /// A fresh, empty (unmigrated) database.
    async fn empty(self) -> FreshDatabase {
        match self {
            Self::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                FreshDatabase {
                    url: db::sqlite_url(dir.path()),
                    _dir: Some(dir),
                    _postgres: None,
                }
            }
            Self::Postgres => {
                let (database, url) = db::postgres_database().await;
                FreshDatabase {
                    url,
                    _dir: None,
                    _postgres: Some(database),
                }
            }
        }
    }

    /// A migrated store on a fresh database; keep the guard alive.
    async fn store(self) -> (Arc<dyn Store>, FreshDatabase) {
        let database = self.empty().await;
        let store = db::migrated_store(&database.url).await;
        assert_eq!(store.backend(), self.name());
        (store, database)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The versions recorded in `schema_migrations`, read with a connection of
/// the test's own.
async fn recorded_migrations(url: &str) -> Vec<i64> {
    let sql = "SELECT version FROM schema_migrations ORDER BY version";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap()
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let versions = sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        versions
    }
}

// ---------------------------------------------------------------------------
// Builders

/// 2026-01-01T00:00:00Z: records in tests are dated in the past, so a
/// deletion (stamped "now") comes after them.
const T0: i64 = 1_767_225_600_000;
const DAY: i64 = 86_400_000;

fn owner(tenant: &str, user: &str) -> Owner {
    Owner {
        tenant_id: tenant.to_owned(),
        user_id: user.to_owned(),
    }
}

/// A UUIDv7: later calls sort after earlier ones.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn conversation(owner: &Owner, created_at: i64) -> ConversationRow {
    ConversationRow {
        id: new_id(),
        tenant_id: owner.tenant_id.clone(),
        user_id: owner.user_id.clone(),
        title: None,
        metadata: json!({}),
        created_at,
        updated_at: created_at,
    }
}

fn user_message(conversation: &ConversationRow, text: &str, created_at: i64) -> MessageRow {
    MessageRow {
        id: new_id(),
        conversation_id: conversation.id.clone(),
        tenant_id: conversation.tenant_id.clone(),
        user_id: conversation.user_id.clone(),
        role: "user".to_owned(),
        content: text.to_owned(),
        status: MessageStatus::Complete,
        model: None,
        provider: None,
        prompt_tokens: None,
        completion_tokens: None,
        cost_usd: None,
        usage_estimated: false,
        client_message_id: None,
        generation_id: None,
        created_at,
    }
}

/// An assistant reply from `model` at `provider` with these tokens.
fn reply(
    conversation: &ConversationRow,
    text: &str,
    (model, provider): (&str, &str),
    (prompt, completion, cost): (i64, i64, f64),
    created_at: i64,
) -> MessageRow {
    MessageRow {
        role: "assistant".to_owned(),
        model: Some(model.to_owned()),
        provider: Some(provider.to_owned()),
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        cost_usd: Some(cost),
        generation_id: Some(new_id()),
        ..user_message(conversation, text, created_at)
    }
}

fn page(after: Option<&str>, limit: u32, order: Order) -> PageRequest {
    PageRequest {
        after: after.map(str::to_owned),
        limit,
        order,
    }
}

async fn conversations_of(store: &dyn Store, owner: &Owner) -> Vec<ConversationRow> {
    let page = store
        .list_conversations(owner, &page(None, 200, Order::Asc))
        .await
        .unwrap();
    assert!(page.next.is_none(), "more than one page");
    page.items
}

async fn messages_of(store: &dyn Store, owner: &Owner, conversation_id: &str) -> Vec<MessageRow> {
    let page = store
        .list_messages(owner, conversation_id, &page(None, 200, Order::Asc))
        .await
        .unwrap()
        .expect("the conversation is the owner's");
    assert!(page.next.is_none(), "more than one page");
    page.items
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|item| id(item).to_owned()).collect()
}

fn usage_of(days: &[UsageDay], user: &str) -> Vec<UsageDay> {
    days.iter().filter(|d| d.user_id == user).cloned().collect()
}

// ---------------------------------------------------------------------------
// Migrations

async fn migrations_are_idempotent(backend: Backend) {
    let database = backend.empty().await;
    let store = db::open_store(&database.url).await;
    store.migrate().await.unwrap();
    let once = recorded_migrations(&database.url).await;
    assert_eq!(once, [1, 2], "every embedded migration is recorded");

    // Again on the same store, and from a second one (a restart): nothing
    // to do, nothing fails, nothing is recorded twice.
    store.migrate().await.unwrap();
    let restarted = db::open_store(&database.url).await;
    restarted.migrate().await.unwrap();
    assert_eq!(recorded_migrations(&database.url).await, once);
    restarted.ping().await.unwrap();

    // The schema works after the re-runs.
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    store.create_conversation(&c).await.unwrap();
    assert_eq!(conversations_of(&*restarted, &ada).await, [c]);
}

async fn concurrent_migrations_apply_each_version_once(backend: Backend) {
    // Four instances start at once against one empty database.
    let database = backend.empty().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(db::open_store(&database.url).await);
    }
    let results = futures_util::future::join_all(stores.iter().map(|store| store.migrate())).await;
    for result in results {
        result.expect("every instance's migrate succeeds");
    }
    assert_eq!(recorded_migrations(&database.url).await, [1, 2]);
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    stores[0].create_conversation(&c).await.unwrap();
    assert_eq!(conversations_of(&*stores[3], &ada).await, [c]);
}

// ---------------------------------------------------------------------------
// Writes

async fn conversations_round_trip_with_metadata(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let mut c = conversation(&ada, T0);
    c.title = Some("Trip to Lisbon ✈".to_owned());
    c.metadata = json!({"widget": {"page": "/pricing"}, "tags": ["a", "b"], "n": 1.5});
    store.create_conversation(&c).await.unwrap();
    let untitled = conversation(&ada, T0 + 1);
    store.create_conversation(&untitled).await.unwrap();

    assert_eq!(
        store.get_conversation(&ada, &c.id).await.unwrap().as_ref(),
        Some(&c)
    );
    assert_eq!(conversations_of(&*store, &ada).await, [c.clone(), untitled]);

    // Creating it again (a retried request) neither fails nor overwrites.
    let mut again = c.clone();
    again.title = Some("other".to_owned());
    store.create_conversation(&again).await.unwrap();
    assert_eq!(store.get_conversation(&ada, &c.id).await.unwrap(), Some(c));
}

async fn write_batch_is_idempotent(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    let question = user_message(&c, "hello", T0 + 10);
    let answer = reply(&c, "hi!", ("gpt-4o", "openai"), (12, 3, 0.25), T0 + 20);
    let batch = [
        Record::Conversation(c.clone()),
        Record::Message(question.clone()),
        Record::Message(answer.clone()),
    ];

    store.write_batch(&batch).await.unwrap();
    store.write_batch(&batch).await.unwrap();
    // And once more split in two, as a journal replay after a crash might.
    store.write_batch(&batch[..1]).await.unwrap();
    store.write_batch(&batch[1..]).await.unwrap();

    let stored = conversations_of(&*store, &ada).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].updated_at,
        T0 + 20,
        "moved forward by its messages"
    );
    assert_eq!(messages_of(&*store, &ada, &c.id).await, [question, answer]);
    let usage = store.usage_days("acme").await.unwrap();
    assert_eq!(
        usage,
        [UsageDay {
            day: "2026-01-01".to_owned(),
            tenant_id: "acme".to_owned(),
            user_id: "ada".to_owned(),
            model: "gpt-4o".to_owned(),
            provider: "openai".to_owned(),
            messages: 1,
            prompt_tokens: 12,
            completion_tokens: 3,
            cost_usd: 0.25,
        }],
        "usage counted once"
    );
}

async fn rewriting_a_message_updates_it_without_counting_usage_again(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    let mut answer = reply(&c, "Once upon", ("m", "p"), (10, 2, 0.5), T0 + 1);
    answer.status = MessageStatus::Aborted;
    answer.usage_estimated = true;
    store
        .write_batch(&[
            Record::Conversation(c.clone()),
            Record::Message(answer.clone()),
        ])
        .await
        .unwrap();

    let mut finished = answer.clone();
    finished.status = MessageStatus::Complete;
    finished.content = "Once upon a time".to_owned();
    finished.completion_tokens = Some(5);
    finished.cost_usd = Some(0.75);
    finished.usage_estimated = false;
    store
        .write_batch(&[Record::Message(finished.clone())])
        .await
        .unwrap();

    assert_eq!(messages_of(&*store, &ada, &c.id).await, [finished]);
    let usage = store.usage_days("acme").await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (
            usage[0].messages,
            usage[0].completion_tokens,
            usage[0].cost_usd
        ),
        (1, 2, 0.5),
        "usage is what the first write counted"
    );
}

async fn duplicate_client_message_id_is_skipped(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    let other = conversation(&ada, T0);
    let mut first = user_message(&c, "hello", T0 + 1);
    first.client_message_id = Some("client-1".to_owned());
    // The client sent it again (a retry after a lost ack): a new server id,
    // the same client id.
    let mut resent = user_message(&c, "hello (resent)", T0 + 2);
    resent.client_message_id = Some("client-1".to_owned());
    // The same client id in another conversation is another message.
    let mut elsewhere = user_message(&other, "hello there", T0 + 3);
    elsewhere.client_message_id = Some("client-1".to_owned());
    // Messages without a client id never collide.
    let plain = [user_message(&c, "a", T0 + 4), user_message(&c, "b", T0 + 5)];

    let mut batch = vec![
        Record::Conversation(c.clone()),
        Record::Conversation(other.clone()),
        Record::Message(first.clone()),
        Record::Message(resent),
        Record::Message(elsewhere.clone()),
    ];
    batch.extend(plain.iter().cloned().map(Record::Message));
    store
        .write_batch(&batch)
        .await
        .expect("a duplicate send does not fail the batch");

    let mut expected = vec![first];
    expected.extend(plain);
    assert_eq!(messages_of(&*store, &ada, &c.id).await, expected);
    assert_eq!(messages_of(&*store, &ada, &other.id).await, [elsewhere]);
}

async fn records_arriving_out_of_order_are_kept(backend: Backend) {
    // No foreign keys: a journal replay may deliver a message before its
    // conversation.
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    let question = user_message(&c, "first", T0 + 5);
    store
        .write_batch(&[Record::Message(question.clone())])
        .await
        .unwrap();
    assert!(
        store
            .list_messages(&ada, &c.id, &page(None, 10, Order::Asc))
            .await
            .unwrap()
            .is_none(),
        "no conversation yet"
    );
    store
        .write_batch(&[Record::Conversation(c.clone())])
        .await
        .unwrap();
    assert_eq!(messages_of(&*store, &ada, &c.id).await, [question]);
}

// ---------------------------------------------------------------------------
// Deletion

async fn tombstone_stops_replay_of_a_deleted_conversation(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let doomed = conversation(&ada, T0);
    let kept = conversation(&ada, T0 + 1);
    let batch = vec![
        Record::Conversation(doomed.clone()),
        Record::Message(user_message(&doomed, "q", T0 + 2)),
        Record::Message(reply(&doomed, "a", ("m", "p"), (1, 1, 0.0), T0 + 3)),
        Record::Conversation(kept.clone()),
        Record::Message(user_message(&kept, "q", T0 + 4)),
    ];
    store.write_batch(&batch).await.unwrap();

    let deleted = store.delete_conversation(&ada, &doomed.id).await.unwrap();
    assert_eq!(
        deleted,
        Some(Deleted {
            conversations: 1,
            messages: 2,
            usage_days: 0,
        })
    );
    assert_eq!(
        store.delete_conversation(&ada, &doomed.id).await.unwrap(),
        None
    );

    // The journal replays everything, and a late reply arrives: none of it
    // brings the conversation back; the other conversation is untouched.
    store.write_batch(&batch).await.unwrap();
    store
        .write_batch(&[Record::Message(reply(
            &doomed,
            "late",
            ("m", "p"),
            (1, 1, 0.0),
            now_ms() + DAY,
        ))])
        .await
        .unwrap();
    assert_eq!(
        store.get_conversation(&ada, &doomed.id).await.unwrap(),
        None
    );
    assert_eq!(
        ids(&conversations_of(&*store, &ada).await, |c| &c.id),
        [kept.id.as_str()]
    );
    assert_eq!(messages_of(&*store, &ada, &kept.id).await.len(), 1);
    let export = store.export_user(&ada).await.unwrap();
    assert!(
        export.messages.iter().all(|m| m.conversation_id == kept.id),
        "no message of the deleted conversation is stored"
    );
}

async fn deletion_racing_writes_leaves_no_message_behind(backend: Backend) {
    // A reply lands while its conversation is being deleted: either it is
    // written before (and deleted with it) or skipped after; never stored
    // once the conversation is gone.
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    for _ in 0..40 {
        let c = conversation(&ada, T0);
        store
            .write_batch(&[Record::Conversation(c.clone())])
            .await
            .unwrap();
        let replies: Vec<Record> = (0..3)
            .map(|i| Record::Message(reply(&c, "late", ("m", "p"), (1, 1, 0.0), T0 + i)))
            .collect();
        let writes = futures_util::future::join_all(
            replies
                .iter()
                .map(|record| store.write_batch(std::slice::from_ref(record))),
        );
        let (written, deleted) = tokio::join!(writes, store.delete_conversation(&ada, &c.id));
        assert!(deleted.unwrap().is_some());
        for result in written {
            result.unwrap();
        }
    }
    let export = store.export_user(&ada).await.unwrap();
    assert!(export.conversations.is_empty());
    assert!(
        export.messages.is_empty(),
        "{} messages outlived their conversation",
        export.messages.len()
    );
}

async fn deleted_user_stays_deleted_across_replays(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let bob = owner("acme", "bob");
    let mut batch = Vec::new();
    let mut ada_conversations = Vec::new();
    for (i, who) in [&ada, &ada, &bob].into_iter().enumerate() {
        let at = T0 + i as i64 * DAY;
        let c = conversation(who, at);
        batch.push(Record::Conversation(c.clone()));
        batch.push(Record::Message(user_message(&c, "q", at + 1)));
        batch.push(Record::Message(reply(
            &c,
            "a",
            ("m", "p"),
            (3, 4, 0.1),
            at + 2,
        )));
        if who == &ada {
            ada_conversations.push(c);
        }
    }
    store.write_batch(&batch).await.unwrap();
    let bob_before = store.export_user(&bob).await.unwrap();

    let deleted = store.delete_user(&ada).await.unwrap();
    assert_eq!(
        deleted,
        Deleted {
            conversations: 2,
            messages: 4,
            usage_days: 2,
        }
    );
    let empty = store.export_user(&ada).await.unwrap();
    assert!(empty.conversations.is_empty() && empty.messages.is_empty() && empty.usage.is_empty());
    assert!(usage_of(&store.usage_days("acme").await.unwrap(), "ada").is_empty());

    // A replay of everything ada had: nothing of it comes back (and bob's
    // records, replayed too, change nothing).
    store.write_batch(&batch).await.unwrap();
    let after_replay = store.export_user(&ada).await.unwrap();
    assert!(after_replay.conversations.is_empty(), "{after_replay:?}");
    assert!(after_replay.messages.is_empty() && after_replay.usage.is_empty());
    assert_eq!(store.export_user(&bob).await.unwrap(), bob_before);

    // A message that arrives later in one of her old conversations stays
    // out too.
    let late = user_message(&ada_conversations[0], "late", now_ms() + DAY);
    store.write_batch(&[Record::Message(late)]).await.unwrap();
    assert!(store.export_user(&ada).await.unwrap().messages.is_empty());

    // Coming back afterwards, she starts afresh.
    let later = now_ms() + DAY;
    let fresh = conversation(&ada, later);
    let hello = user_message(&fresh, "hello again", later + 1);
    store
        .write_batch(&[
            Record::Conversation(fresh.clone()),
            Record::Message(hello.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(conversations_of(&*store, &ada).await.len(), 1);
    assert_eq!(messages_of(&*store, &ada, &fresh.id).await, [hello]);
}

// ---------------------------------------------------------------------------
// Ownership

async fn ownership_scopes_every_read_and_write(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    // Another user of the same tenant, and the same user id in another
    // tenant: neither may see or touch ada's conversation.
    let strangers = [owner("acme", "eve"), owner("globex", "ada")];
    let c = conversation(&ada, T0);
    let question = user_message(&c, "secret", T0 + 1);
    store
        .write_batch(&[
            Record::Conversation(c.clone()),
            Record::Message(question.clone()),
        ])
        .await
        .unwrap();

    for eve in &strangers {
        assert_eq!(store.get_conversation(eve, &c.id).await.unwrap(), None);
        assert!(conversations_of(&*store, eve).await.is_empty());
        assert_eq!(
            store
                .list_messages(eve, &c.id, &page(None, 10, Order::Asc))
                .await
                .unwrap(),
            None
        );
        assert!(
            !store
                .rename_conversation(eve, &c.id, "pwned", T0 + 5)
                .await
                .unwrap()
        );
        assert_eq!(store.delete_conversation(eve, &c.id).await.unwrap(), None);
        let export = store.export_user(eve).await.unwrap();
        assert!(export.conversations.is_empty() && export.messages.is_empty());
        // Deleting the stranger deletes nothing of ada's.
        assert_eq!(store.delete_user(eve).await.unwrap(), Deleted::default());
    }

    // Untouched: not renamed, not deleted (updated_at is its message's).
    let untouched = ConversationRow {
        updated_at: T0 + 1,
        ..c.clone()
    };
    assert_eq!(
        store.get_conversation(&ada, &c.id).await.unwrap(),
        Some(untouched)
    );
    assert_eq!(messages_of(&*store, &ada, &c.id).await, [question]);
    assert_eq!(
        store
            .list_messages(&ada, "no-such-conversation", &page(None, 10, Order::Asc))
            .await
            .unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------
// Pagination

/// Pages through everything with `limit` in `order`, calling `between`
/// after each page (to insert rows mid-walk); returns the ids seen, in
/// order, and the number of pages.
async fn walk<T, F>(
    mut fetch: impl AsyncFnMut(PageRequest) -> Page<T>,
    id: fn(&T) -> &str,
    limit: u32,
    order: Order,
    mut between: F,
) -> (Vec<String>, usize)
where
    F: AsyncFnMut(),
{
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut after: Option<String> = None;
    loop {
        let page = fetch(page(after.as_deref(), limit, order)).await;
        pages += 1;
        assert!(page.items.len() <= limit as usize);
        let full = page.items.len() == limit as usize;
        assert_eq!(
            page.next.as_deref(),
            full.then(|| id(page.items.last().unwrap())),
            "next is the last id exactly when the page is full"
        );
        seen.extend(page.items.iter().map(|item| id(item).to_owned()));
        let Some(next) = page.next else { break };
        after = Some(next);
        between().await;
        assert!(pages < 100, "pagination does not end");
    }
    (seen, pages)
}

fn assert_no_duplicates(ids: &[String]) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates in {ids:?}");
}

async fn conversation_pages_have_no_gaps_or_duplicates_under_inserts(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let eve = owner("acme", "eve");
    let mut originals = Vec::new();
    for i in 0..7 {
        let c = conversation(&ada, T0 + i);
        store.create_conversation(&c).await.unwrap();
        originals.push(c.id);
    }

    for order in [Order::Asc, Order::Desc] {
        // Between pages, ada starts a new conversation and so does eve.
        let mut inserted = Vec::new();
        let (seen, pages) = walk(
            async |request| store.list_conversations(&ada, &request).await.unwrap(),
            |c: &ConversationRow| c.id.as_str(),
            3,
            order,
            async || {
                let c = conversation(&ada, now_ms());
                store.create_conversation(&c).await.unwrap();
                store
                    .create_conversation(&conversation(&eve, now_ms()))
                    .await
                    .unwrap();
                inserted.push(c.id);
            },
        )
        .await;
        assert_no_duplicates(&seen);
        match order {
            // New conversations sort after the cursor: the walk reaches
            // them, in order, after every original.
            Order::Asc => {
                let mut expected = originals.clone();
                expected.extend(inserted.iter().cloned());
                assert_eq!(seen, expected);
            }
            // New conversations sort before the cursor: the walk sees each
            // original exactly once, newest first, and none of the new.
            Order::Desc => {
                let expected: Vec<String> = originals.iter().rev().cloned().collect();
                assert_eq!(seen, expected);
                assert!(pages >= 3);
            }
        }
        originals.extend(inserted);
    }
}

async fn message_pages_have_no_gaps_or_duplicates_under_inserts(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    let neighbour = conversation(&ada, T0);
    store
        .write_batch(&[
            Record::Conversation(c.clone()),
            Record::Conversation(neighbour.clone()),
        ])
        .await
        .unwrap();
    let mut originals = Vec::new();
    for i in 0..5 {
        let m = user_message(&c, &format!("m{i}"), T0 + i);
        store
            .write_batch(&[Record::Message(m.clone())])
            .await
            .unwrap();
        originals.push(m.id);
    }

    for order in [Order::Asc, Order::Desc] {
        let mut inserted = Vec::new();
        let (seen, _) = walk(
            async |request| {
                store
                    .list_messages(&ada, &c.id, &request)
                    .await
                    .unwrap()
                    .unwrap()
            },
            |m: &MessageRow| m.id.as_str(),
            2,
            order,
            async || {
                let m = reply(&c, "more", ("m", "p"), (1, 1, 0.0), now_ms());
                let elsewhere = user_message(&neighbour, "noise", now_ms());
                store
                    .write_batch(&[Record::Message(m.clone()), Record::Message(elsewhere)])
                    .await
                    .unwrap();
                inserted.push(m.id);
            },
        )
        .await;
        assert_no_duplicates(&seen);
        let expected: Vec<String> = match order {
            Order::Asc => originals.iter().chain(&inserted).cloned().collect(),
            Order::Desc => originals.iter().rev().cloned().collect(),
        };
        assert_eq!(seen, expected);
        originals.extend(inserted);
    }
}

// ---------------------------------------------------------------------------
// Rename, export, usage

async fn rename_sets_title_and_updated_at(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    store.create_conversation(&c).await.unwrap();

    assert!(
        store
            .rename_conversation(&ada, &c.id, "Plans", T0 + 50)
            .await
            .unwrap()
    );
    let renamed = store.get_conversation(&ada, &c.id).await.unwrap().unwrap();
    assert_eq!(renamed.title.as_deref(), Some("Plans"));
    assert_eq!(renamed.updated_at, T0 + 50);

    // A rename stamped earlier (another instance's clock) keeps the later
    // updated_at but still renames.
    assert!(
        store
            .rename_conversation(&ada, &c.id, "Plans v2", T0 + 10)
            .await
            .unwrap()
    );
    let renamed = store.get_conversation(&ada, &c.id).await.unwrap().unwrap();
    assert_eq!(renamed.title.as_deref(), Some("Plans v2"));
    assert_eq!(renamed.updated_at, T0 + 50);
    assert_eq!(renamed.created_at, T0);

    assert!(
        !store
            .rename_conversation(&ada, "missing", "x", T0)
            .await
            .unwrap()
    );
}

async fn export_holds_everything_of_the_user_oldest_first(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let bob = owner("acme", "bob");
    let first = conversation(&ada, T0);
    let second = conversation(&ada, T0 + DAY);
    let theirs = conversation(&bob, T0);
    let messages = [
        user_message(&first, "q1", T0 + 1),
        reply(&first, "a1", ("m", "p"), (1, 2, 0.01), T0 + 2),
        user_message(&second, "q2", T0 + DAY + 1),
        reply(&second, "a2", ("m", "p"), (3, 4, 0.02), T0 + DAY + 2),
    ];
    // Written newest first, to show the export sorts.
    let mut batch = vec![
        Record::Conversation(second.clone()),
        Record::Conversation(first.clone()),
        Record::Conversation(theirs.clone()),
        Record::Message(user_message(&theirs, "not ada's", T0 + 3)),
    ];
    batch.extend(messages.iter().rev().cloned().map(Record::Message));
    store.write_batch(&batch).await.unwrap();

    let export = store.export_user(&ada).await.unwrap();
    assert_eq!(export.owner, ada);
    let mut second_now = second.clone();
    second_now.updated_at = T0 + DAY + 2;
    let mut first_now = first.clone();
    first_now.updated_at = T0 + 2;
    assert_eq!(export.conversations, [first_now, second_now]);
    assert_eq!(export.messages, messages);
    assert_eq!(
        ids(&export.usage, |u| u.day.as_str()),
        ["2026-01-01", "2026-01-02"]
    );
    assert!(
        export
            .usage
            .iter()
            .all(|u| u.user_id == "ada" && u.messages == 1)
    );
    // It serializes (the HTTP layer sends it as JSON).
    let json = serde_json::to_value(&export).unwrap();
    assert_eq!(json["messages"].as_array().unwrap().len(), 4);
}

async fn usage_days_sum_assistant_replies_per_day_model_and_provider(backend: Backend) {
    let (store, _db) = backend.store().await;
    let ada = owner("acme", "ada");
    let bob = owner("acme", "bob");
    let outsider = owner("globex", "ada");
    let c = conversation(&ada, T0);
    let b = conversation(&bob, T0);
    let o = conversation(&outsider, T0);
    let mut unpriced = reply(&c, "x", ("small", "local"), (5, 5, 0.0), T0 + 6);
    unpriced.cost_usd = None;
    let mut no_model = reply(&c, "x", ("ignored", "ignored"), (100, 100, 1.0), T0 + 7);
    no_model.model = None;
    // A user message that names the model it asks for is still not a reply.
    let asking = MessageRow {
        role: "user".to_owned(),
        ..reply(&c, "q", ("gpt", "openai"), (50, 50, 5.0), T0 + 8)
    };
    let records = vec![
        Record::Conversation(c.clone()),
        Record::Conversation(b.clone()),
        Record::Conversation(o.clone()),
        // Day 1: two gpt replies for ada, one from another provider.
        Record::Message(reply(&c, "x", ("gpt", "openai"), (10, 1, 0.5), T0 + 1)),
        Record::Message(reply(&c, "x", ("gpt", "openai"), (20, 2, 0.25), T0 + 2)),
        Record::Message(reply(&c, "x", ("gpt", "azure"), (1, 1, 0.125), T0 + 3)),
        Record::Message(unpriced),
        // Not counted: user messages, replies without a model.
        Record::Message(user_message(&c, "q", T0 + 4)),
        Record::Message(asking),
        Record::Message(no_model),
        // Day 2 (the last millisecond of it) and day 3 (its first).
        Record::Message(reply(
            &c,
            "x",
            ("gpt", "openai"),
            (7, 7, 1.0),
            T0 + 2 * DAY - 1,
        )),
        Record::Message(reply(&c, "x", ("gpt", "openai"), (8, 8, 2.0), T0 + 2 * DAY)),
        // Another user of the tenant, and another tenant.
        Record::Message(reply(&b, "x", ("gpt", "openai"), (4, 4, 4.0), T0 + 5)),
        Record::Message(reply(&o, "x", ("gpt", "openai"), (9, 9, 9.0), T0 + 5)),
    ];
    store.write_batch(&records).await.unwrap();

    let days = store.usage_days("acme").await.unwrap();
    let row = |day: &str, user: &str, model: &str, provider: &str, counts: (i64, i64, i64, f64)| {
        UsageDay {
            day: day.to_owned(),
            tenant_id: "acme".to_owned(),
            user_id: user.to_owned(),
            model: model.to_owned(),
            provider: provider.to_owned(),
            messages: counts.0,
            prompt_tokens: counts.1,
            completion_tokens: counts.2,
            cost_usd: counts.3,
        }
    };
    assert_eq!(
        days,
        [
            row("2026-01-01", "ada", "gpt", "azure", (1, 1, 1, 0.125)),
            row("2026-01-01", "ada", "gpt", "openai", (2, 30, 3, 0.75)),
            row("2026-01-01", "ada", "small", "local", (1, 5, 5, 0.0)),
            row("2026-01-01", "bob", "gpt", "openai", (1, 4, 4, 4.0)),
            row("2026-01-02", "ada", "gpt", "openai", (1, 7, 7, 1.0)),
            row("2026-01-03", "ada", "gpt", "openai", (1, 8, 8, 2.0)),
        ]
    );
    assert_eq!(store.usage_days("globex").await.unwrap().len(), 1);
    assert!(store.usage_days("nobody").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// PostgreSQL outage

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_writes_fast_and_recovers_after_restart() {
    let server = db::ThrowawayPostgres::start_new().await;
    let store = db::migrated_store(&server.url()).await;
    let ada = owner("acme", "ada");
    let c = conversation(&ada, T0);
    store
        .write_batch(&[Record::Conversation(c.clone())])
        .await
        .unwrap();

    server.stop().await;
    let question = user_message(&c, "while down", T0 + 1);
    let batch = [Record::Message(question.clone())];
    let failed = tokio::time::timeout(Duration::from_secs(30), store.write_batch(&batch))
        .await
        .expect("a write to a stopped database errors instead of hanging");
    assert!(failed.is_err(), "the write cannot have succeeded");
    assert!(store.ping().await.is_err());

    server.start().await;
    // The pool replaces its dead connections by itself.
    store.ping().await.expect("the store works again");
    store.write_batch(&batch).await.unwrap();
    assert_eq!(messages_of(&*store, &ada, &c.id).await, [question]);
}

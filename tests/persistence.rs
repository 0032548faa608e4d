//! Nothing acknowledged is lost: real processes, real databases, real
//! faults. A database that goes away for a while, a gateway killed with
//! SIGKILL right after acknowledging, a journal torn mid-record; and streams
//! that never wait on any of it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::db::ThrowawayPostgres;
use common::*;
use futures_util::FutureExt;
use serde_json::Value;
use spillway::config::{Config, StoreConfig};
use spillway::store::persister::Persister;
use spillway::store::{MessageRow, MessageStatus, Owner, Record, Store};

/// A gateway config over `upstream` with its store at `database_url`
/// (None: SQLite under `data_dir`) and a quick retry.
fn config(upstream: &FakeUpstream, data_dir: &Path, database_url: Option<String>) -> Config {
    let mut config = test_config(&openai_config(upstream));
    config.store.data_dir = data_dir.display().to_string();
    config.store.database_url = database_url;
    config.store.retry_base_ms = 50;
    config.store.retry_max_ms = 200;
    config
}

fn owner(user: &str) -> Owner {
    Owner {
        tenant_id: "default".into(),
        user_id: user.into(),
    }
}

/// Sends one streamed chat request as `user`; returns the text it got.
async fn chat_as(gateway: &TestGateway, user: &str, content: &str) -> String {
    let mut body = chat_body("gpt-test", true);
    body["messages"][0]["content"] = content.into();
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-spillway-user", user)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    assert_eq!(events.last(), Some(&ClientEvent::Done), "{events:?}");
    content_of(&events)
}

/// Every message of `user`, through the store, oldest first.
async fn messages_of(store: &Arc<dyn Store>, user: &str) -> Vec<MessageRow> {
    store.export_user(&owner(user)).await.unwrap().messages
}

/// The (role, content) pairs of `messages`, sorted, for exact comparison.
fn pairs(messages: &[MessageRow]) -> Vec<(String, String)> {
    let mut pairs: Vec<_> = messages
        .iter()
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect();
    pairs.sort();
    pairs
}

fn expected(n: usize) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for i in 0..n {
        pairs.push(("user".to_owned(), format!("question {i}")));
        pairs.push(("assistant".to_owned(), format!("answer {i}")));
    }
    pairs.sort();
    pairs
}

#[tokio::test]
async fn a_database_outage_loses_no_acknowledged_message() {
    let postgres = ThrowawayPostgres::start_new().await;
    let upstream = FakeUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway =
        TestGateway::start_with(config(&upstream, data.path(), Some(postgres.url()))).await;
    let store = Arc::clone(gateway.store());

    for i in 0..3 {
        upstream.push(openai_stream(&[&format!("answer {i}")], Duration::ZERO));
        assert_eq!(
            chat_as(&gateway, "ada", &format!("question {i}")).await,
            format!("answer {i}")
        );
    }
    // The database goes away; chats go on, every one answered in full.
    postgres.stop().await;
    for i in 3..10 {
        upstream.push(openai_stream(&[&format!("answer {i}")], Duration::ZERO));
        assert_eq!(
            chat_as(&gateway, "ada", &format!("question {i}")).await,
            format!("answer {i}")
        );
    }
    let stats = gateway.persister().stats();
    assert!(
        stats.pending.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "held in the journal"
    );
    // It comes back: the writer catches up by itself.
    postgres.start().await;
    tokio::time::timeout(Duration::from_secs(30), gateway.persister().flushed())
        .await
        .expect("the persister caught up");
    let messages = messages_of(&store, "ada").await;
    assert_eq!(pairs(&messages), expected(10), "every message exactly once");
    assert!(messages.iter().all(|m| m.status == MessageStatus::Complete));
}

/// A config file for the gateway binary: SQLite under `data`, the fake
/// upstream, and a writer that waits `batch_delay_ms` before each batch.
fn config_file(upstream: &FakeUpstream, data: &Path, batch_delay_ms: u64) -> std::path::PathBuf {
    let text = format!(
        "{}\n[store]\ndata_dir = \"{}\"\nbatch_max_delay_ms = {batch_delay_ms}\n",
        openai_config(upstream),
        data.display()
    );
    let path = data.join(format!("spillway-{batch_delay_ms}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn sigkill_right_after_acknowledging_loses_nothing() {
    let upstream = FakeUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    // A writer that waits a minute before each batch: when the process is
    // killed, the acknowledged replies exist only in the journal.
    let slow = config_file(&upstream, data.path(), 60_000);
    let mut process = Process::serve(&["--config", slow.to_str().unwrap()], &[]).await;
    for i in 0..5 {
        upstream.push(openai_stream(&[&format!("answer {i}")], Duration::ZERO));
        let mut body = chat_body("gpt-test", true);
        body["messages"][0]["content"] = format!("question {i}").into();
        let response = client()
            .post(process.url("/v1/chat/completions"))
            .header("x-spillway-user", "grace")
            .json(&body)
            .send()
            .await
            .unwrap();
        let raw = response.text().await.unwrap();
        assert!(raw.ends_with("data: [DONE]\n\n"), "acknowledged: {raw}");
    }
    process.child.start_kill().unwrap(); // SIGKILL
    process.child.wait().await.unwrap();

    // Nothing reached the database yet.
    let url = format!("sqlite://{}/spillway.db", data.path().display());
    let store_config = StoreConfig {
        database_url: Some(url.clone()),
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&store_config).await.unwrap();
    assert!(
        messages_of(&store, "grace").await.is_empty(),
        "still only journaled"
    );

    // Restart: the journal replays.
    let quick = config_file(&upstream, data.path(), 5);
    let restarted = Process::serve(&["--config", quick.to_str().unwrap()], &[]).await;
    let mut stored = Vec::new();
    for _ in 0..200 {
        stored = messages_of(&store, "grace").await;
        if stored.len() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pairs(&stored),
        expected(5),
        "every acknowledged message, once"
    );
    assert!(
        restarted
            .log
            .lock()
            .unwrap()
            .contains("replaying journaled records")
    );
}

#[tokio::test]
async fn a_torn_journal_tail_keeps_every_whole_record_and_is_reported() {
    let data = tempfile::tempdir().unwrap();
    let store_config = StoreConfig {
        data_dir: data.path().display().to_string(),
        batch_max_delay_ms: 60_000,
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&store_config).await.unwrap();
    store.migrate().await.unwrap();
    let message = |i: usize| {
        Record::Message(MessageRow {
            id: uuid::Uuid::now_v7().to_string(),
            conversation_id: "01950000-0000-7000-8000-000000000001".into(),
            tenant_id: "default".into(),
            user_id: "turing".into(),
            role: "user".into(),
            content: format!("record {i}"),
            status: MessageStatus::Complete,
            model: None,
            provider: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            usage_estimated: false,
            client_message_id: None,
            generation_id: None,
            created_at: spillway::store::now_ms(),
        })
    };
    {
        // Journal ten records; the writer is parked (one-minute batches).
        let (persister, running) = Persister::start(Arc::clone(&store), &store_config)
            .await
            .unwrap();
        for i in 0..10 {
            persister.submit(&message(i)).await.unwrap();
        }
        // A crash: no flush.
        drop(running);
    }
    // Tear the last record: cut its last 5 bytes, as a crash mid-write would.
    let journal = store_config.journal_dir();
    let mut segments: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let quick = StoreConfig {
        batch_max_delay_ms: 5,
        ..store_config.clone()
    };
    let (persister, running) = Persister::start(Arc::clone(&store), &quick).await.unwrap();
    let torn = persister
        .stats()
        .torn_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(torn > 0, "the torn tail was reported");
    tokio::time::timeout(Duration::from_secs(10), persister.flushed())
        .await
        .unwrap();
    let stored = messages_of(&store, "turing").await;
    let contents: Vec<String> = stored.iter().map(|m| m.content.clone()).collect();
    let whole: Vec<String> = (0..9).map(|i| format!("record {i}")).collect();
    assert_eq!(contents, whole, "every whole record, the torn one dropped");
    // The journal works on: a new record after recovery is stored too.
    persister.submit(&message(10)).await.unwrap();
    persister.flushed().await;
    assert_eq!(messages_of(&store, "turing").await.len(), 10);
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn streams_do_not_wait_on_a_database_that_is_down() {
    let postgres = ThrowawayPostgres::start_new().await;
    let upstream = FakeUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway =
        TestGateway::start_with(config(&upstream, data.path(), Some(postgres.url()))).await;
    postgres.stop().await;

    // The upstream holds after its first token until the test releases it:
    // the client must get that token while the database is down.
    let mut steps = vec![openai_text_chunk("first")];
    steps.push(Step::AwaitRelease);
    steps.push(openai_text_chunk(" second"));
    steps.extend(openai_finish(3, 2));
    upstream.push(Script::sse(steps));
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-spillway-user", "hopper")
        .json(&chat_body("gpt-test", true))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let mut seen = reader.until_content().await;
    assert_eq!(content_of(&seen), "first");
    upstream.release();
    seen.extend(reader.collect().await);
    assert_eq!(content_of(&seen), "first second");
    assert_eq!(seen.last(), Some(&ClientEvent::Done));

    // The history API says plainly that the database is away.
    let response = client()
        .get(gateway.url("/v1/conversations"))
        .header("x-spillway-user", "hopper")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
}

#[tokio::test]
async fn a_record_the_database_refuses_for_good_is_skipped_not_retried_forever() {
    // PostgreSQL refuses NUL in text: a permanent error for that record.
    let (_database, url) = db::postgres_database().await;
    let data = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        database_url: Some(url),
        data_dir: data.path().display().to_string(),
        batch_max_delay_ms: 50,
        retry_base_ms: 20,
        retry_max_ms: 50,
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let (persister, running) = Persister::start(Arc::clone(&store), &config).await.unwrap();
    let message = |content: &str| {
        Record::Message(MessageRow {
            id: uuid::Uuid::now_v7().to_string(),
            conversation_id: "01950000-0000-7000-8000-000000000002".into(),
            tenant_id: "default".into(),
            user_id: "codd".into(),
            role: "user".into(),
            content: content.into(),
            status: MessageStatus::Complete,
            model: None,
            provider: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            usage_estimated: false,
            client_message_id: None,
            generation_id: None,
            created_at: spillway::store::now_ms(),
        })
    };
    persister.submit(&message("before")).await.unwrap();
    persister.submit(&message("poison\u{0}")).await.unwrap();
    persister.submit(&message("after")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), persister.flushed())
        .await
        .expect("the writer moved past the refused record");
    let stored: Vec<String> = messages_of(&store, "codd")
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(stored, vec!["before".to_owned(), "after".to_owned()]);
    let dead = persister
        .stats()
        .dead_records
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dead, 1);
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn one_conversations_history_does_not_wait_for_anothers_unstored_records() {
    let postgres = ThrowawayPostgres::start_new().await;
    let data = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        database_url: Some(postgres.url()),
        data_dir: data.path().display().to_string(),
        batch_max_delay_ms: 5,
        retry_base_ms: 20,
        retry_max_ms: 50,
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let (persister, running) = Persister::start(Arc::clone(&store), &config).await.unwrap();
    let message = |conversation: &str, content: &str| {
        Record::Message(MessageRow {
            id: uuid::Uuid::now_v7().to_string(),
            conversation_id: conversation.into(),
            tenant_id: "default".into(),
            user_id: "liskov".into(),
            role: "user".into(),
            content: content.into(),
            status: MessageStatus::Complete,
            model: None,
            provider: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            usage_estimated: false,
            client_message_id: None,
            generation_id: None,
            created_at: spillway::store::now_ms(),
        })
    };
    let a = "01950000-0000-7000-8000-00000000000a";
    let b = "01950000-0000-7000-8000-00000000000b";
    persister.submit(&message(a, "in a")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), persister.flushed_for(a))
        .await
        .expect("a's record reached the database");
    assert_eq!(pairs(&messages_of(&store, "liskov").await).len(), 1);

    // With the database gone, b's record is durable but cannot be stored.
    postgres.stop().await;
    persister.submit(&message(b, "in b")).await.unwrap();
    assert!(
        persister.flushed_for(a).now_or_never().is_some(),
        "a has nothing unstored: its history read must not wait"
    );
    assert!(
        persister.flushed_for(b).now_or_never().is_none(),
        "b's record is not in the database yet"
    );
    assert!(persister.flushed().now_or_never().is_none());

    // Once the database is back, b's wait ends with its record stored.
    postgres.start().await;
    tokio::time::timeout(Duration::from_secs(30), persister.flushed_for(b))
        .await
        .expect("b's record reached the database");
    let stored: Vec<String> = messages_of(&store, "liskov")
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(stored, vec!["in a".to_owned(), "in b".to_owned()]);
    running.shutdown(Duration::from_secs(5)).await;
}

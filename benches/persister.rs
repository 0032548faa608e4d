//! Persister throughput, to SQLite and to PostgreSQL: how many records per
//! second are acknowledged (journaled, fsync'd) and how many reach the
//! database. A benchmark, not a test: run it with
//!
//! ```sh
//! cargo bench --bench persister            # both databases
//! SPILLWAY_BENCH_RECORDS=50000 cargo bench --bench persister
//! ```
//!
//! PostgreSQL comes from `SPILLWAY_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the bench creates and drops
//! its own database there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a bench binary

use std::sync::Arc;
use tokio::time::Instant as WallClock;

use spillway::config::StoreConfig;
use spillway::store::persister::Persister;
use spillway::store::{MessageRow, MessageStatus, Record, Store};
use sqlx::Connection;

fn record(i: usize) -> Record {
    Record::Message(MessageRow {
        id: uuid::Uuid::now_v7().to_string(),
        conversation_id: format!("01950000-0000-7000-8000-{:012}", i % 100),
        tenant_id: "bench".into(),
        user_id: format!("user-{}", i % 100),
        role: if i.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        }
        .into(),
        content: "A typical chat message of a few sentences, about two hundred bytes long, \
                  which is what a widget sends and what a model answers in one short reply."
            .into(),
        status: MessageStatus::Complete,
        model: Some("gpt-4o".into()),
        provider: Some("openai".into()),
        prompt_tokens: Some(120),
        completion_tokens: Some(45),
        cost_usd: Some(0.00075),
        usage_estimated: false,
        client_message_id: None,
        generation_id: None,
        created_at: spillway::store::now_ms(),
    })
}

async fn run(name: &str, store: Arc<dyn Store>, config: &StoreConfig, records: usize) {
    store.migrate().await.unwrap();
    let (persister, running) = Persister::start(Arc::clone(&store), config).await.unwrap();
    let started = WallClock::now();
    let submitters = 64;
    let mut tasks = Vec::new();
    for s in 0..submitters {
        let persister = persister.clone();
        tasks.push(tokio::spawn(async move {
            for i in (s..records).step_by(submitters) {
                persister.submit(&record(i)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acked = started.elapsed();
    persister.flushed().await;
    let stored = started.elapsed();
    running.shutdown(std::time::Duration::from_secs(30)).await;
    println!(
        "{name:<10} {records} records, {submitters} concurrent submitters: acknowledged (journaled) in {:.2} s = {:.0} rec/s; stored in {:.2} s = {:.0} rec/s",
        acked.as_secs_f64(),
        records as f64 / acked.as_secs_f64(),
        stored.as_secs_f64(),
        records as f64 / stored.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    let records: usize = std::env::var("SPILLWAY_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);

    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        data_dir: dir.path().display().to_string(),
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&config).await.unwrap();
    run("sqlite", store, &config, records).await;

    let base = std::env::var("SPILLWAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let database = format!("spillway_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = match base.rsplit_once('/') {
        Some((prefix, _)) => format!("{prefix}/{database}"),
        None => panic!("unexpected postgres url {base}"),
    };
    let pg_dir = tempfile::tempdir().unwrap();
    let pg_config = StoreConfig {
        database_url: Some(url),
        data_dir: pg_dir.path().display().to_string(),
        ..StoreConfig::default()
    };
    let store = spillway::store::open(&pg_config).await.unwrap();
    run("postgres", Arc::clone(&store), &pg_config, records).await;
    drop(store);
    let _ = sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
}

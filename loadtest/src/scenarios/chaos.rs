//! `chaos`: two instances with Redis and PostgreSQL of the scenario's own,
//! under steady chat load over WebSocket, while a schedule kills and
//! restarts Redis, stops and starts PostgreSQL, SIGKILLs instance B and
//! starts it again, and SIGTERMs (drains) instance A and starts it again.
//!
//! Clients behave as the protocol asks (docs/protocol.md §8): resend an
//! unacknowledged message with the same `client_message_id`, resume an
//! acknowledged reply from the last offset after a disconnect, on either
//! instance. Afterwards the history is read back: every acknowledged
//! message must be stored exactly once, and every reply must have
//! completed (whole: no token missing) or ended with a typed error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};

use super::Ctx;
use crate::clients::{self, Ws};
use crate::procs::{Gateway, GatewayOptions, Postgres, Redis};
use crate::report::{Output, Table};
use crate::upstream::{self, Pace, Upstream};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Chat clients (one user and conversation each).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds of load (the faults are spread over it).
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
}

/// How one acknowledged or attempted message ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Outcome {
    Complete,
    CompleteAfterResume,
    TypedError(String),
    /// `done` with tokens missing, or the stream ended with no terminal
    /// frame and no resume could reach it: a silent truncation.
    Truncated,
    /// Never acknowledged (typed errors, or out of attempts).
    NotAcked(String),
}

#[derive(Debug)]
struct Record {
    conversation: String,
    user: String,
    tag: String,
    acked: bool,
    outcome: Outcome,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let mut redis = Redis::start().await?;
    let postgres = Postgres::start().await?;
    let options = |node: &str| GatewayOptions {
        bin: ctx.gateway_bin.clone(),
        upstream: upstream.base_url(),
        node: node.into(),
        redis: Some(redis.url()),
        database: Some(postgres.url()),
        extra: "[server]\ndrain_batch_interval_ms = 20\n".into(),
        port: None,
    };
    let a = Gateway::start(options("a")).await?;
    let b = Gateway::start(options("b")).await?;
    let addrs = [a.addr, b.addr];
    let base = a.base();

    let end = Instant::now() + Duration::from_secs(args.secs);
    let pace = Pace {
        tokens: 30,
        delay: Duration::from_millis(20),
        bytes: 8,
        ..Pace::default()
    };
    let mut workers = Vec::new();
    for w in 0..args.clients {
        let user = format!("chaos-{w}");
        let conversation = clients::conversation(&ctx.http, &base, &user).await?;
        let progress = Arc::clone(&ctx.progress);
        workers.push(tokio::spawn(worker(
            w,
            user,
            conversation,
            addrs,
            end,
            pace,
            progress,
        )));
    }

    // The fault schedule, spread over the load.
    let at = |f: f64| Duration::from_secs_f64(args.secs as f64 * f);
    let start = Instant::now();
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut log = |what: &str| {
        eprintln!("chaos: {what}");
        events.push((start.elapsed().as_secs_f64(), what.to_owned()));
    };
    let (mut a, mut b) = (a, b);
    sleep_until(start + at(0.10)).await;
    redis.stop().await;
    log("Redis killed");
    sleep_until(start + at(0.20)).await;
    redis.restart().await?;
    log("Redis restarted");
    sleep_until(start + at(0.30)).await;
    postgres.down().await?;
    log("PostgreSQL stopped");
    sleep_until(start + at(0.42)).await;
    postgres.up().await?;
    log("PostgreSQL started");
    sleep_until(start + at(0.52)).await;
    b.kill().await;
    log("instance b SIGKILLed");
    sleep_until(start + at(0.60)).await;
    b = b.restart().await?;
    log("instance b restarted");
    sleep_until(start + at(0.70)).await;
    let drained = a.terminate(Duration::from_secs(30)).await;
    log(if drained {
        "instance a SIGTERMed: drained and exited"
    } else {
        "instance a SIGTERMed: did not exit in 30 s, killed"
    });
    a = a.restart().await?;
    log("instance a restarted");

    let mut records = Vec::new();
    for worker in workers {
        records.extend(worker.await.map_err(|e| e.to_string())?);
    }
    ctx.progress.set("chaos: reading the history back");
    // The persisters catch up (journal → PostgreSQL) before the count.
    sleep(Duration::from_secs(3)).await;
    let stored = stored_counts(ctx, &a.base(), &records).await?;

    let mut tally: HashMap<String, u64> = HashMap::new();
    let (mut lost, mut duplicated, mut unacked_stored) = (0u64, 0u64, 0u64);
    for record in &records {
        let count = stored.get(&record.tag).copied().unwrap_or(0);
        if record.acked {
            match count {
                0 => lost += 1,
                1 => {}
                _ => duplicated += 1,
            }
        } else if count > 0 {
            unacked_stored += 1;
            if count > 1 {
                duplicated += 1;
            }
        }
        let key = match &record.outcome {
            Outcome::Complete => "completed".into(),
            Outcome::CompleteAfterResume => "completed after a resume".into(),
            Outcome::TypedError(code) => format!("typed error `{code}`"),
            Outcome::Truncated => "SILENTLY TRUNCATED".into(),
            Outcome::NotAcked(code) => format!("not acknowledged (`{code}`)"),
        };
        *tally.entry(key).or_default() += 1;
    }
    let truncated = records
        .iter()
        .filter(|r| r.outcome == Outcome::Truncated)
        .count();
    let acked = records.iter().filter(|r| r.acked).count();
    let mut table = Table::new(
        "Replies, as their clients saw them",
        &["outcome", "messages"],
    );
    let mut sorted: Vec<_> = tally.iter().collect();
    sorted.sort();
    for (k, v) in &sorted {
        table.row(vec![(*k).clone(), v.to_string()]);
    }
    let mut check = Table::new(
        "Acknowledged messages in the history",
        &[
            "acknowledged",
            "stored once",
            "lost",
            "duplicated",
            "unacknowledged but stored",
            "silent truncations",
        ],
    );
    check.row(vec![
        acked.to_string(),
        (acked as u64 - lost - duplicated.min(acked as u64 - lost)).to_string(),
        lost.to_string(),
        duplicated.to_string(),
        unacked_stored.to_string(),
        truncated.to_string(),
    ]);
    let mut output = Output::default();
    output.json.insert("scenario".into(), json!("chaos"));
    output.json.insert("messages".into(), json!(records.len()));
    output.json.insert("acknowledged".into(), json!(acked));
    output.json.insert("lost".into(), json!(lost));
    output.json.insert("duplicated".into(), json!(duplicated));
    output
        .json
        .insert("unacknowledged_but_stored".into(), json!(unacked_stored));
    output
        .json
        .insert("silent_truncations".into(), json!(truncated));
    output.json.insert("outcomes".into(), json!(tally));
    output.json.insert("faults".into(), json!(events));
    output.tables.push(check);
    output.tables.push(table);
    output.notes.push(format!(
        "{} clients, replies of {} tokens {} ms apart, {} s of load. Faults at (s): {}.",
        args.clients,
        pace.tokens,
        pace.delay.as_millis(),
        args.secs,
        events
            .iter()
            .map(|(t, w)| format!("{t:.1} {w}"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    drop(b);
    if lost > 0 || duplicated > 0 || truncated > 0 {
        output.broken = Some(format!(
            "{lost} acknowledged messages lost, {duplicated} stored twice, {truncated} replies silently truncated"
        ));
    }
    Ok(output)
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t).await;
}

/// One client: messages back to back until `end`, each driven to an outcome.
async fn worker(
    w: usize,
    user: String,
    conversation: String,
    addrs: [SocketAddr; 2],
    end: Instant,
    pace: Pace,
    progress: Arc<super::Progress>,
) -> Vec<Record> {
    let mut records = Vec::new();
    let mut attempt = w;
    let mut ws: Option<Ws> = None;
    let mut seq = 0;
    while Instant::now() < end {
        seq += 1;
        let tag = format!("seq={w}-{seq}");
        let content = format!("{} {tag}", pace.words());
        let client_id = format!("c-{w}-{seq}");
        let (acked, outcome) = drive(
            &mut ws,
            &mut attempt,
            &user,
            addrs,
            &conversation,
            &content,
            &client_id,
            pace.tokens,
        )
        .await;
        progress
            .replies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !matches!(outcome, Outcome::Complete | Outcome::CompleteAfterResume) {
            progress
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        records.push(Record {
            conversation: conversation.clone(),
            user: user.clone(),
            tag,
            acked,
            outcome,
        });
    }
    records
}

/// Where a reply stands.
#[derive(Debug, Default)]
struct Reply {
    generation: Option<(String, u64)>,
    next: u64,
    tokens: usize,
    resumed: bool,
    rest: String,
}

const ATTEMPTS: usize = 60;

#[allow(clippy::too_many_arguments)]
async fn drive(
    ws: &mut Option<Ws>,
    attempt: &mut usize,
    user: &str,
    addrs: [SocketAddr; 2],
    conversation: &str,
    content: &str,
    client_id: &str,
    expected: u32,
) -> (bool, Outcome) {
    let mut reply = Reply::default();
    let mut last_error = String::from("no attempt");
    for _ in 0..ATTEMPTS {
        if ws.is_none() {
            *attempt += 1;
            match Ws::connect(addrs[*attempt % 2], user, 1 + (*attempt % 8) as u8, None).await {
                Ok(socket) => *ws = Some(socket),
                Err(err) => {
                    last_error = format!("connect: {err}");
                    sleep(Duration::from_millis(250)).await;
                    continue;
                }
            }
        }
        let Some(socket) = ws.as_mut() else { continue };
        let request = match &reply.generation {
            None => {
                json!({ "type": "send", "conversation_id": conversation, "content": content, "client_message_id": client_id })
            }
            Some((id, epoch)) => {
                reply.resumed = true;
                json!({ "type": "resume", "generation_id": id, "epoch": epoch, "offset": reply.next })
            }
        };
        if socket.frame(&request).await.is_err() {
            *ws = None;
            continue;
        }
        loop {
            let frame = match timeout(Duration::from_secs(10), socket.next_json()).await {
                Ok(Some(frame)) => frame,
                _ => {
                    // Disconnected (or silent): reconnect, then resend or resume.
                    *ws = None;
                    break;
                }
            };
            let generation = frame["generation_id"].as_str();
            let ours = reply
                .generation
                .as_ref()
                .is_some_and(|(id, _)| Some(id.as_str()) == generation);
            match frame["type"].as_str() {
                Some("ack")
                    if frame["client_message_id"] == client_id && reply.generation.is_none() =>
                {
                    reply.generation = Some((
                        generation.unwrap_or("").to_owned(),
                        frame["epoch"].as_u64().unwrap_or(0),
                    ));
                }
                // A delta that starts where this client is (a resume never
                // repeats text, but be exact).
                Some("delta") if ours && frame["offset"].as_u64() == Some(reply.next) => {
                    let mut stamps = Vec::new();
                    upstream::stamps(
                        frame["text"].as_str().unwrap_or(""),
                        &mut reply.rest,
                        &mut stamps,
                    );
                    reply.tokens += stamps.len();
                    reply.next = frame["next"].as_u64().unwrap_or(reply.next);
                }
                Some("restart") if ours => {
                    reply.tokens = 0;
                    reply.rest.clear();
                    reply.next = frame["next"].as_u64().unwrap_or(reply.next);
                }
                Some("usage") if ours => reply.next = frame["next"].as_u64().unwrap_or(reply.next),
                Some("done") if ours => {
                    let whole = reply.tokens == expected as usize;
                    return (
                        true,
                        match (whole, reply.resumed) {
                            (true, false) => Outcome::Complete,
                            (true, true) => Outcome::CompleteAfterResume,
                            (false, _) => Outcome::Truncated,
                        },
                    );
                }
                Some("error") if ours => {
                    return (
                        true,
                        Outcome::TypedError(frame["code"].as_str().unwrap_or("?").to_owned()),
                    );
                }
                Some("error")
                    if reply.generation.is_none() && frame["client_message_id"] == client_id =>
                {
                    // Refused before the ack (store or cluster down, …):
                    // retry later with the same id.
                    last_error = frame["code"].as_str().unwrap_or("?").to_owned();
                    sleep(Duration::from_millis(300)).await;
                    break;
                }
                _ => {}
            }
        }
    }
    match reply.generation {
        Some(_) => (true, Outcome::Truncated),
        None => (false, Outcome::NotAcked(last_error)),
    }
}

/// How many times each record's tag appears among its conversation's user
/// messages.
async fn stored_counts(
    ctx: &Ctx,
    base: &str,
    records: &[Record],
) -> Result<HashMap<String, u64>, String> {
    let mut conversations: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.conversation.as_str(), r.user.as_str()))
        .collect();
    conversations.sort_unstable();
    conversations.dedup();
    let mut counts = HashMap::new();
    for (conversation, user) in conversations {
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{base}/v1/conversations/{conversation}/messages?limit=200");
            if let Some(cursor) = &after {
                url.push_str(&format!("&after={cursor}"));
            }
            let page: Value = ctx
                .http
                .get(&url)
                .header("x-spillway-user", user)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let data = page["data"]
                .as_array()
                .ok_or_else(|| format!("history: {page}"))?;
            for message in data.iter().filter(|m| m["role"] == "user") {
                if let Some(tag) = message["content"]
                    .as_str()
                    .and_then(|c| c.split_whitespace().find(|w| w.starts_with("seq=")))
                {
                    *counts.entry(tag.to_owned()).or_default() += 1;
                }
            }
            match page["next_cursor"].as_str() {
                Some(cursor) if !data.is_empty() => after = Some(cursor.to_owned()),
                _ => break,
            }
        }
    }
    Ok(counts)
}

//! `fanout`: two gateway instances sharing a throwaway `redis-server` and
//! one SQLite file. Cross-instance delivery: a user's connection on A sends
//! `typing` frames at an aggregate target rate, the same user's connection
//! on B receives them (per-pair FIFO of send stamps; typing is delivered in
//! order per publisher; what never arrives is lost). Cross-instance
//! resume: a reply produced on A, resumed from offset 0 on a fresh
//! connection to B: time to its first delta and to `done`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Ctx, source};
use crate::clients::{self, Ws};
use crate::procs::{Gateway, GatewayOptions, Redis};
use crate::report::{Output, Table, ms};
use crate::stats::Latency;
use crate::upstream::{Pace, Upstream, now_ns};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Aggregate typing rates, frames/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub rates: Vec<u64>,
    /// Conversations (A/B connection pairs) sharing the rate.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Seconds per rate.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Replies resumed across instances.
    #[arg(long, default_value_t = 200)]
    pub resumes: usize,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let redis = Redis::start().await?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let database = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("shared.db").display()
    );
    let start = |node: &str| {
        Gateway::start(GatewayOptions {
            bin: ctx.gateway_bin.clone(),
            upstream: upstream.base_url(),
            node: node.into(),
            redis: Some(redis.url()),
            database: Some(database.clone()),
            extra: String::new(),
            port: None,
        })
    };
    let a = start("a").await?;
    let b = start("b").await?;
    let mut table = Table::new(
        "Across two instances through Redis (ms)",
        &[
            "measure",
            "n",
            "target / achieved per s",
            "p50",
            "p90",
            "p99",
            "p999",
            "max",
            "lost",
        ],
    );
    let mut rows = Vec::new();
    for &rate in &args.rates {
        ctx.progress.set(format!("fanout: typing A→B at {rate}/s"));
        let (latency, sent, lost, elapsed) = typing(ctx, &a, &b, rate, args).await?;
        let s = latency.summary();
        table.row(vec![
            "typing A→B".into(),
            sent.to_string(),
            format!("{rate} / {:.0}", sent as f64 / elapsed),
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.p999),
            ms(s.max),
            lost.to_string(),
        ]);
        rows.push(json!({ "measure": "typing", "target_rate": rate, "sent": sent, "achieved_rate": sent as f64 / elapsed, "latency": s, "lost": lost }));
    }
    ctx.progress.set("fanout: resume on B of replies made on A");
    let (first, done, failed) = resumes(ctx, &a, &b, args.resumes).await?;
    for (name, latency) in [
        ("resume on B → first delta", &first),
        ("resume on B → done (whole reply)", &done),
    ] {
        let s = latency.summary();
        table.row(vec![
            name.into(),
            s.n.to_string(),
            "—".into(),
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.p999),
            ms(s.max),
            failed.to_string(),
        ]);
        rows.push(json!({ "measure": name, "latency": s, "failed": failed }));
    }
    let mut output = Output::default();
    output.json.insert("scenario".into(), json!("fanout"));
    output.json.insert("rows".into(), json!(rows));
    output.tables.push(table);
    output.notes.push(format!("{} pairs; replies of 48 tokens from the paced upstream, unpaced; Redis {} on loopback, no persistence.", args.pairs, redis.url()));
    Ok(output)
}

async fn subscribed(
    addr: std::net::SocketAddr,
    user: &str,
    conversation: &str,
    i: usize,
) -> Result<Ws, String> {
    let mut ws = Ws::connect(addr, user, source(i), None).await?;
    ws.frame(&json!({ "type": "subscribe", "conversation_id": conversation }))
        .await?;
    loop {
        match ws.next_json().await {
            Some(frame) if frame["type"] == "presence" => return Ok(ws),
            Some(frame) if frame["type"] == "error" => return Err(format!("subscribe: {frame}")),
            Some(_) => {}
            None => return Err("closed while subscribing".into()),
        }
    }
}

async fn typing(
    ctx: &Ctx,
    a: &Gateway,
    b: &Gateway,
    rate: u64,
    args: &Args,
) -> Result<(Latency, u64, u64, f64), String> {
    let latency = Arc::new(Mutex::new(Latency::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut fifos = Vec::new();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    let end = Instant::now() + Duration::from_secs(args.secs);
    let period = Duration::from_nanos(1_000_000_000 * args.pairs as u64 / rate.max(1));
    for i in 0..args.pairs {
        let user = format!("fan-{rate}-{i}");
        let conversation = clients::conversation(&ctx.http, &a.base(), &user).await?;
        let on_a = subscribed(a.addr, &user, &conversation, i).await?;
        let on_b = subscribed(b.addr, &user, &conversation, i + 1).await?;
        let fifo: Arc<Mutex<VecDeque<u64>>> = Arc::default();
        let (mut sink, mut stream_a) = on_a.split();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(_)) = stream_a.next().await {}
        }));
        let (_sink_b, mut stream_b) = on_b.split();
        let (fifo_b, latency_b) = (Arc::clone(&fifo), Arc::clone(&latency));
        readers.push(tokio::spawn(async move {
            let _keep = _sink_b;
            while let Some(Ok(message)) = stream_b.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if frame["type"] == "typing" {
                    let now = now_ns();
                    let stamp = fifo_b
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pop_front();
                    if let Some(stamp) = stamp {
                        latency_b
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .record_us(now.saturating_sub(stamp) / 1000);
                    }
                }
            }
        }));
        let (fifo_a, sent) = (Arc::clone(&fifo), Arc::clone(&sent));
        let offset =
            period / u32::try_from(args.pairs).unwrap_or(1) * u32::try_from(i).unwrap_or(0);
        writers.push(tokio::spawn(async move {
            // Pairs start spread over one period.
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut on = true;
            while Instant::now() < end {
                tick.tick().await;
                let frame =
                    json!({ "type": "typing", "conversation_id": conversation, "typing": on });
                fifo_a
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_back(now_ns());
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                on = !on;
            }
            sink
        }));
        fifos.push(fifo);
    }
    let started = Instant::now();
    let mut sinks = Vec::new();
    for writer in writers {
        sinks.push(writer.await.map_err(|e| e.to_string())?);
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(args.secs as f64)
        .max(0.001);
    tokio::time::sleep(Duration::from_secs(1)).await; // the last frames arrive
    let lost: u64 = fifos
        .iter()
        .map(|f| {
            f.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len() as u64
        })
        .sum();
    for reader in readers {
        reader.abort();
    }
    drop(sinks);
    let latency = latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok((latency, sent.load(Ordering::Relaxed), lost, elapsed))
}

async fn resumes(
    ctx: &Ctx,
    a: &Gateway,
    b: &Gateway,
    n: usize,
) -> Result<(Latency, Latency, u64), String> {
    let user = "fan-resume";
    let conversation = clients::conversation(&ctx.http, &a.base(), user).await?;
    let mut on_a = Ws::connect(a.addr, user, 1, None).await?;
    let words = Pace {
        tokens: 48,
        delay: Duration::ZERO,
        bytes: 8,
        ..Pace::default()
    }
    .words();
    let (mut first, mut done, mut failed) = (Latency::default(), Latency::default(), 0);
    for i in 0..n {
        // Produce a reply on A, to its end.
        on_a.send(&conversation, &words).await?;
        let mut made = None;
        while let Some(frame) = on_a.next_json().await {
            match frame["type"].as_str() {
                Some("ack") => {
                    made = Some((
                        frame["generation_id"].as_str().unwrap_or("").to_owned(),
                        frame["epoch"].as_u64().unwrap_or(0),
                    ))
                }
                Some("done" | "error")
                    if made
                        .as_ref()
                        .is_some_and(|m| frame["generation_id"] == m.0.as_str()) =>
                {
                    break;
                }
                _ => {}
            }
        }
        let Some((generation, epoch)) = made else {
            failed += 1;
            continue;
        };
        let mut on_b = Ws::connect(b.addr, user, source(i + 1), None).await?;
        let start = now_ns();
        on_b.frame(
            &json!({ "type": "resume", "generation_id": generation, "epoch": epoch, "offset": 0 }),
        )
        .await?;
        let mut got_first = false;
        let mut ok = false;
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), on_b.next_json())
            .await
            .ok()
            .flatten()
        {
            if frame["generation_id"] != generation.as_str() {
                continue;
            }
            match frame["type"].as_str() {
                Some("delta") if !got_first => {
                    got_first = true;
                    first.record_us(now_ns().saturating_sub(start) / 1000);
                }
                Some("done") => {
                    done.record_us(now_ns().saturating_sub(start) / 1000);
                    ok = true;
                    break;
                }
                Some("error") => break,
                _ => {}
            }
        }
        if !ok {
            failed += 1;
        }
        ctx.progress.replies.fetch_add(1, Ordering::Relaxed);
    }
    Ok((first, done, failed))
}

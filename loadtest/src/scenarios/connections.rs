//! `connections`: what a connection costs the gateway in memory. N idle
//! WebSockets (after `hello`, answering pings), N idle SSE readers (each
//! following one slow reply), and N WebSockets each streaming its own reply
//! at a steady rate; the gateway's RSS at each step, from several
//! 127.0.0.x source addresses. Steps above this process's open-file limit
//! are capped to it (and reported).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{Ctx, batched, source};
use crate::clients::{self, SseDecoder, Ws};
use crate::procs::{Gateway, open_files_limit};
use crate::report::{Output, Series, Table, line_chart};
use crate::upstream::{Pace, Upstream};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Idle connection counts (cumulative steps).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub idle: Vec<usize>,
    /// Streaming connection counts (cumulative steps).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    pub streaming: Vec<usize>,
    /// Tokens per second on each streaming connection.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Seconds to let the gateway settle before reading its RSS.
    #[arg(long, default_value_t = 2)]
    pub settle_secs: u64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    IdleWs,
    IdleSse,
    Streaming,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::IdleWs => "idle WebSocket",
            Self::IdleSse => "idle SSE",
            Self::Streaming => "WebSocket streaming",
        }
    }
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let limit = open_files_limit() as usize;
    // Room for the process's own files; a streaming connection costs this
    // process two descriptors (its socket and the upstream's).
    let idle_cap = limit.saturating_sub(400);
    let streaming_cap = idle_cap / 2;
    let mut table = Table::new(
        "Gateway memory per connection (RSS growth over the idle gateway, divided by connections)",
        &[
            "kind",
            "connections",
            "gateway RSS MiB",
            "bytes per connection",
        ],
    );
    let mut notes = Vec::new();
    let mut results = Vec::new();
    let mut chart = Vec::new();
    for (kind, steps, cap) in [
        (Kind::IdleWs, &args.idle, idle_cap),
        (Kind::IdleSse, &args.idle, idle_cap),
        (Kind::Streaming, &args.streaming, streaming_cap),
    ] {
        let mut steps: Vec<usize> = steps.iter().map(|&n| n.min(cap)).collect();
        steps.dedup();
        if args.idle.iter().chain(&args.streaming).any(|&n| n > cap) {
            notes.push(format!("{}: steps capped at {cap} by the open-file limit of {limit} (RLIMIT_NOFILE, which this machine does not let even root raise)", kind.name()));
        }
        let gateway = ctx.gateway(&upstream, "").await?;
        let series = measure(ctx, &gateway, kind, &steps, args, &mut table, &mut results)
            .await
            .map_err(|err| format!("{err}\ngateway log:\n{}", gateway.log_tail()))?;
        chart.push(series);
    }
    notes.dedup();
    let mut output = Output::default();
    output.json.insert("scenario".into(), json!("connections"));
    output.json.insert("open_files_limit".into(), json!(limit));
    output.json.insert("steps".into(), Value::Array(results));
    output.tables.push(table);
    output.notes = notes;
    output.notes.push(format!("Streaming: each connection sends one message whose reply streams {} tokens/s; RSS is read once every connection has received text.", args.rate));
    output.charts.push((
        "connections-rss.svg".into(),
        line_chart(
            "Gateway RSS vs connections",
            "connections",
            "RSS (MiB)",
            &chart,
        ),
    ));
    Ok(output)
}

async fn measure(
    ctx: &Ctx,
    gateway: &Gateway,
    kind: Kind,
    steps: &[usize],
    args: &Args,
    table: &mut Table,
    results: &mut Vec<Value>,
) -> Result<Series, String> {
    let base = gateway.base();
    // Warm the gateway (pools, first conversation, first socket) first.
    let warm = clients::conversation(&ctx.http, &base, "warm").await?;
    drop(Ws::connect(gateway.addr, "warm", 1, None).await?);
    let mut follow = None;
    let pace_words = Pace {
        tokens: args.rate * 600,
        delay: Duration::from_micros(1_000_000 / u64::from(args.rate.max(1))),
        bytes: 8,
        ..Pace::default()
    }
    .words();
    if matches!(kind, Kind::IdleSse) {
        // One slow reply (a token a second) that every idle reader follows.
        let slow = Pace {
            tokens: 3600,
            delay: Duration::from_secs(1),
            bytes: 8,
            ..Pace::default()
        };
        follow = Some(start_followed_reply(ctx, &base, &warm, &slow.words()).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let base_rss = gateway.rss_kib();
    let mut series = Series {
        name: kind.name().into(),
        points: vec![(0.0, base_rss as f64 / 1024.0)],
    };
    let mut held: Vec<JoinHandle<()>> = Vec::new();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for &step in steps {
        let have = held.len();
        ctx.progress.set(format!(
            "connections {}: opening {have}→{step}",
            kind.name()
        ));
        let opened = batched(step - have, 200, |j| {
            let i = have + j;
            let (base, follow, words, received) = (
                base.clone(),
                follow.clone(),
                pace_words.clone(),
                std::sync::Arc::clone(&received),
            );
            let addr = gateway.addr;
            let http = ctx.http.clone();
            async move {
                match kind {
                    Kind::IdleWs => {
                        let ws = Ws::connect(addr, &format!("idle-{i}"), source(i), None).await?;
                        Ok::<_, String>(tokio::spawn(ws.idle()))
                    }
                    Kind::IdleSse => {
                        let (generation, epoch) = follow.ok_or("no reply to follow")?;
                        let path = format!(
                            "/v1/generations/{generation}/events?user=warm&from=0&epoch={epoch}"
                        );
                        clients::idle_sse(addr, source(i), &path).await
                    }
                    Kind::Streaming => {
                        let user = format!("stream-{i}");
                        let conversation = clients::conversation(&http, &base, &user).await?;
                        let mut ws = Ws::connect(addr, &user, source(i), None).await?;
                        ws.send(&conversation, &words).await?;
                        Ok(tokio::spawn(async move {
                            let mut counted = false;
                            while let Some(frame) = ws.next_json().await {
                                if !counted && frame["type"] == "delta" {
                                    counted = true;
                                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }))
                    }
                }
            }
        })
        .await;
        for handle in opened {
            held.push(handle?);
        }
        if matches!(kind, Kind::Streaming) {
            // Every stream has text before memory is read.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while received.load(std::sync::atomic::Ordering::Relaxed) < step as u64
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let rss = gateway.rss_kib();
        let per = (rss.saturating_sub(base_rss) * 1024) as f64 / step as f64;
        table.row(vec![
            kind.name().into(),
            step.to_string(),
            format!("{:.1}", rss as f64 / 1024.0),
            format!("{per:.0}"),
        ]);
        results.push(json!({ "kind": kind.name(), "connections": step, "gateway_rss_kib": rss, "base_rss_kib": base_rss, "bytes_per_connection": per,
            "streaming_with_text": received.load(std::sync::atomic::Ordering::Relaxed) }));
        series.points.push((step as f64, rss as f64 / 1024.0));
    }
    for handle in held {
        handle.abort();
    }
    Ok(series)
}

/// Sends a message over native SSE and keeps reading its reply in the
/// background; the reply's (generation id, epoch).
async fn start_followed_reply(
    ctx: &Ctx,
    base: &str,
    conversation: &str,
    words: &str,
) -> Result<(String, u64), String> {
    let url = format!("{base}/v1/conversations/{conversation}/messages");
    let response = ctx
        .http
        .post(url)
        .header("x-spillway-user", "warm")
        .json(&json!({ "content": words, "client_message_id": "followed" }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let mut response = response;
    let mut decoder = SseDecoder::default();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("reply ended before its ack")?;
        for (event, data) in decoder.push(&chunk) {
            if event.as_deref() == Some("ack") {
                let ack: Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
                let id = ack["generation_id"]
                    .as_str()
                    .ok_or("ack without generation")?
                    .to_owned();
                let epoch = ack["epoch"].as_u64().ok_or("ack without epoch")?;
                tokio::spawn(async move { while let Ok(Some(_)) = response.chunk().await {} });
                return Ok((id, epoch));
            }
        }
    }
}

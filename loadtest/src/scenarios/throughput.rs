//! `throughput`: an unpaced upstream, a fixed number of streams looping
//! replies for a bounded time: relayed tokens/s through the gateway against
//! direct-to-upstream in the same run (direct before and after), and the
//! gateway's CPU seconds per million tokens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{Ctx, batched, source};
use crate::clients::{self, End, Transport, Ws};
use crate::report::{Output, Table};
use crate::upstream::{Pace, Upstream};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent streams.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 8)]
    pub secs: u64,
    /// Tokens per reply.
    #[arg(long, default_value_t = 2000)]
    pub tokens: u32,
    /// Bytes per token.
    #[arg(long, default_value_t = 8)]
    pub bytes: usize,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let gateway = ctx.gateway(&upstream, "").await?;
    let pace = Pace {
        tokens: args.tokens,
        delay: Duration::ZERO,
        bytes: args.bytes,
        ..Pace::default()
    };
    let mut table = Table::new(
        &format!(
            "Relayed throughput: {} streams, {}-token replies of {} B tokens, unpaced, {} s per phase",
            args.streams, args.tokens, args.bytes, args.secs
        ),
        &[
            "path",
            "tokens/s",
            "MB/s of text",
            "% of direct",
            "gateway CPU s",
            "gateway CPU s / M tokens",
            "replies",
            "not done",
        ],
    );
    let mut phases = Vec::new();
    let mut direct_rates = Vec::new();
    for transport in [
        Transport::Direct,
        Transport::Openai,
        Transport::Ws,
        Transport::Direct,
    ] {
        ctx.progress.set(format!("throughput {}", transport.name()));
        let cpu_before = gateway.cpu_secs();
        let (tokens, replies, not_done, elapsed) =
            phase(ctx, &gateway, &upstream, transport, args, pace).await?;
        let cpu = gateway.cpu_secs() - cpu_before;
        let rate = tokens as f64 / elapsed;
        if transport == Transport::Direct {
            direct_rates.push(rate);
        }
        phases.push((transport, rate, cpu, tokens, replies, not_done));
    }
    let direct = direct_rates.iter().sum::<f64>() / direct_rates.len().max(1) as f64;
    let mut rows = Vec::new();
    for (transport, rate, cpu, tokens, replies, not_done) in phases {
        let per_million = if transport == Transport::Direct || tokens == 0 {
            None
        } else {
            Some(cpu / tokens as f64 * 1e6)
        };
        table.row(vec![
            transport.name().into(),
            format!("{rate:.0}"),
            format!("{:.1}", rate * args.bytes as f64 / 1e6),
            format!("{:.0}%", rate / direct * 100.0),
            if transport == Transport::Direct {
                "—".into()
            } else {
                format!("{cpu:.2}")
            },
            per_million.map_or_else(|| "—".into(), |v| format!("{v:.2}")),
            replies.to_string(),
            not_done.to_string(),
        ]);
        rows.push(json!({ "path": transport.name(), "tokens_per_sec": rate, "ratio_to_direct": rate / direct,
            "gateway_cpu_secs": cpu, "gateway_cpu_secs_per_million_tokens": per_million,
            "tokens": tokens, "replies": replies, "not_done": not_done }));
    }
    let mut output = Output::default();
    output.json.insert("scenario".into(), json!("throughput"));
    output.json.insert("params".into(), json!({ "streams": args.streams, "secs": args.secs, "tokens": args.tokens, "bytes": args.bytes }));
    output.json.insert("phases".into(), json!(rows));
    output.json.insert(
        "upstream_tokens_written".into(),
        json!(upstream.counters.tokens.load(Ordering::Relaxed)),
    );
    output.tables.push(table);
    output.notes.push("Direct runs first and last; \"% of direct\" is against their mean. Everything (load generator, upstream, gateway) shares the machine's cores, so the gateway's own CPU competes with the load it relays.".into());
    Ok(output)
}

async fn phase(
    ctx: &Ctx,
    gateway: &crate::procs::Gateway,
    upstream: &Upstream,
    transport: Transport,
    args: &Args,
    pace: Pace,
) -> Result<(u64, u64, u64, f64), String> {
    let base = gateway.base();
    let mut sockets = Vec::new();
    let mut conversations = Vec::new();
    if transport == Transport::Ws {
        let users: Vec<String> = (0..args.streams).map(|i| format!("tp-{i}")).collect();
        conversations = batched(args.streams, 32, |i| {
            clients::conversation(&ctx.http, &base, &users[i])
        })
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        for (i, user) in users.iter().enumerate() {
            sockets.push(Ws::connect(gateway.addr, user, source(i), None).await?);
        }
    }
    let url = match transport {
        Transport::Direct => format!("{}/chat/completions", upstream.base_url()),
        _ => format!("{base}/v1/chat/completions"),
    };
    let tokens = Arc::new(AtomicU64::new(0));
    let replies = Arc::new(AtomicU64::new(0));
    let not_done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.secs);
    let content = pace.words();
    let mut tasks = Vec::new();
    let mut sockets = sockets.into_iter();
    for i in 0..args.streams {
        let (http, url, content) = (ctx.http.clone(), url.clone(), content.clone());
        let (tokens, replies, not_done) = (
            Arc::clone(&tokens),
            Arc::clone(&replies),
            Arc::clone(&not_done),
        );
        let mut ws = sockets.next();
        let conversation = conversations.get(i).cloned().unwrap_or_default();
        let progress = Arc::clone(&ctx.progress);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let reply = match ws.as_mut() {
                    Some(ws) => ws.reply(&conversation, &content).await,
                    None => clients::openai(&http, &url, "paced", &content).await,
                };
                progress.reply(&reply);
                tokens.fetch_add(reply.tokens.len() as u64, Ordering::Relaxed);
                replies.fetch_add(1, Ordering::Relaxed);
                if reply.end != End::Done || reply.tokens.len() != pace.tokens as usize {
                    not_done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((
        tokens.load(Ordering::Relaxed),
        replies.load(Ordering::Relaxed),
        not_done.load(Ordering::Relaxed),
        elapsed,
    ))
}

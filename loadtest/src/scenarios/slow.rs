//! `slow-consumers`: normal clients stream replies while a fraction of
//! clients ask for large replies and never read (a 4 KiB receive buffer).
//! The gateway's memory is sampled throughout, and the normal clients'
//! latency compared with a baseline phase without the slow ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{Ctx, batched, source};
use crate::clients::{self, Ws};
use crate::report::{Output, Series, Table, line_chart, ms};
use crate::stats::Tally;
use crate::upstream::{Pace, Upstream};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Normal clients (each loops replies).
    #[arg(long, default_value_t = 80)]
    pub clients: usize,
    /// Clients that never read.
    #[arg(long, default_value_t = 20)]
    pub slow: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let gateway = Arc::new(ctx.gateway(&upstream, "").await?);
    let base = gateway.base();
    let normal_pace = Pace {
        tokens: 50,
        delay: Duration::from_millis(20),
        bytes: 16,
        ..Pace::default()
    };
    // 2 MiB replies, as fast as the upstream can write.
    let big = Pace {
        tokens: 2048,
        delay: Duration::ZERO,
        bytes: 1024,
        ..Pace::default()
    };
    let users: Vec<String> = (0..args.clients).map(|i| format!("normal-{i}")).collect();
    let conversations = batched(args.clients, 32, |i| {
        clients::conversation(&ctx.http, &base, &users[i])
    })
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let mut table = Table::new(
        &format!(
            "{} normal clients (50 tokens 20 ms apart), with and without {} clients that never read 2 MiB replies",
            args.clients, args.slow
        ),
        &[
            "phase",
            "normal replies",
            "TTFT p50",
            "TTFT p99",
            "relay p50",
            "relay p99",
            "relay p999",
            "not done",
            "gateway RSS max MiB",
        ],
    );
    let mut chart = Vec::new();
    let mut phases = Vec::new();
    let mut stuck = Vec::new();
    for with_slow in [false, true] {
        let name = if with_slow {
            "with slow consumers"
        } else {
            "baseline"
        };
        ctx.progress.set(format!("slow-consumers: {name}"));
        if with_slow {
            for i in 0..args.slow {
                let user = format!("slow-{i}");
                let conversation = clients::conversation(&ctx.http, &base, &user).await?;
                let mut ws = Ws::connect(gateway.addr, &user, source(i), Some(4096)).await?;
                ws.send(&conversation, &big.words()).await?;
                stuck.push(ws); // never read again during the phase
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (gateway, stop) = (Arc::clone(&gateway), Arc::clone(&stop));
            tokio::spawn(async move {
                let start = Instant::now();
                let mut points = Vec::new();
                while !stop.load(Ordering::Relaxed) && points.len() < 100_000 {
                    points.push((
                        start.elapsed().as_secs_f64(),
                        gateway.rss_kib() as f64 / 1024.0,
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                points
            })
        };
        let end = Instant::now() + Duration::from_secs(args.secs);
        let tasks = (0..args.clients).map(|i| {
            let (user, conversation) = (users[i].clone(), conversations[i].clone());
            let addr = gateway.addr;
            let progress = Arc::clone(&ctx.progress);
            let words = normal_pace.words();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let Ok(mut ws) = Ws::connect(addr, &user, source(i), None).await else {
                    tally.errors += 1;
                    return tally;
                };
                while Instant::now() < end {
                    let reply = ws.reply(&conversation, &words).await;
                    progress.reply(&reply);
                    tally.add(&reply, normal_pace.tokens);
                }
                tally
            })
        });
        let mut tally = Tally::default();
        for t in futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .flatten()
        {
            tally.merge(&t);
        }
        stop.store(true, Ordering::Relaxed);
        let points = sampler.await.unwrap_or_default();
        let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let (t, r) = (tally.ttft.summary(), tally.relay.summary());
        table.row(vec![
            name.into(),
            tally.replies.to_string(),
            ms(t.p50),
            ms(t.p99),
            ms(r.p50),
            ms(r.p99),
            ms(r.p999),
            (tally.replies - tally.done).to_string(),
            format!("{max:.1}"),
        ]);
        phases.push(json!({ "phase": name, "ttft": t, "relay": r, "replies": tally.replies, "done": tally.done,
            "gateway_rss_max_mib": max, "rss_mib": points }));
        chart.push(Series {
            name: name.into(),
            points,
        });
    }
    // What became of the slow clients: still open (the gateway holds only
    // their cursors) or closed (1013 on the WebSocket past the write timeout).
    let mut frames = Vec::new();
    for ws in &mut stuck {
        frames.push(ws.drain(Duration::from_secs(2)).await);
    }
    let mut output = Output::default();
    output
        .json
        .insert("scenario".into(), json!("slow-consumers"));
    output.json.insert("phases".into(), json!(phases));
    output
        .json
        .insert("slow_frames_read_after".into(), json!(frames));
    output.tables.push(table);
    output.notes.push(format!("Slow clients: {} WebSockets with a 4 KiB receive buffer, each asking for a {} KiB reply and not reading during the phase.", args.slow, big.tokens as usize * big.bytes / 1024));
    output.charts.push((
        "slow-consumers-rss.svg".into(),
        line_chart(
            "Gateway RSS during each phase",
            "seconds",
            "RSS (MiB)",
            &chart,
        ),
    ));
    Ok(output)
}

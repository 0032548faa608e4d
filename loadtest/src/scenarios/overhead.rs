//! `overhead`: the same paced streams directly to the upstream and through
//! the gateway, interleaved wave by wave in one run, at several
//! concurrencies and over each transport. Added TTFT and added relay
//! latency are the differences of the two distributions' percentiles.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Ctx, batched, source};
use crate::clients::{self, Reply, Transport, Ws};
use crate::report::{Output, Series, Table, line_chart, ms};
use crate::stats::Tally;
use crate::upstream::{Pace, Upstream};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent streams per wave.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub levels: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "openai,sse,ws")]
    pub transports: Vec<Transport>,
    /// Tokens per reply.
    #[arg(long, default_value_t = 10)]
    pub tokens: u32,
    /// Upstream inter-token delay.
    #[arg(long, default_value_t = 20)]
    pub delay_ms: u64,
    /// Replies to sample per (level, transport, side): waves repeat until
    /// there are this many (at least `min_waves`).
    #[arg(long, default_value_t = 400)]
    pub samples: usize,
    #[arg(long, default_value_t = 3)]
    pub min_waves: usize,
    /// Upper bound on the whole scenario; later cells are skipped past it.
    #[arg(long, default_value_t = 300)]
    pub max_secs: u64,
}

/// One side's connections for a wave.
enum Side {
    Direct(String),
    Openai(String),
    Sse {
        base: String,
        conversations: Vec<String>,
    },
    Ws {
        conversations: Vec<String>,
        sockets: Vec<Arc<Mutex<Ws>>>,
    },
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<Output, String> {
    let upstream = Upstream::start("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let gateway = ctx.gateway(&upstream, "").await?;
    let pace = Pace {
        tokens: args.tokens,
        delay: Duration::from_millis(args.delay_ms),
        bytes: 16,
        ..Pace::default()
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_secs);
    let mut table = Table::new(
        &format!(
            "Added latency: {} tokens per reply, {} ms apart (ms; gateway minus direct, same run)",
            args.tokens, args.delay_ms
        ),
        &[
            "transport",
            "streams",
            "replies",
            "TTFT p50 direct",
            "TTFT p50 added",
            "TTFT p99 direct",
            "TTFT p99 added",
            "TTFT p999 added",
            "relay p50 added",
            "relay p99 added",
            "gap p99 direct",
            "gap p99 gateway",
            "not done",
        ],
    );
    let mut cells = Vec::new();
    let mut timeline: Vec<Series> = Vec::new();
    let mut skipped = Vec::new();
    for &level in &args.levels {
        for &transport in &args.transports {
            if transport == Transport::Direct {
                continue;
            }
            if Instant::now() > deadline {
                skipped.push(format!("{}@{level}", transport.name()));
                continue;
            }
            let label = format!("overhead {}@{level}", transport.name());
            ctx.progress.set(format!("{label}: connecting"));
            let side = setup(ctx, &gateway, transport, level).await?;
            let direct = Side::Direct(format!("{}/chat/completions", upstream.base_url()));
            let waves = args.min_waves.max(args.samples.div_ceil(level));
            let (mut d_all, mut g_all) = (Tally::default(), Tally::default());
            let mut d_line = Series {
                name: format!("direct {}@{level} p99", transport.name()),
                points: Vec::new(),
            };
            let mut g_line = Series {
                name: format!("gateway {}@{level} p99", transport.name()),
                points: Vec::new(),
            };
            for wave_no in 0..waves {
                if Instant::now() > deadline {
                    break;
                }
                ctx.progress
                    .set(format!("{label}: wave {}/{waves}", wave_no + 1));
                let d = wave(ctx, &direct, level, pace).await;
                let g = wave(ctx, &side, level, pace).await;
                let t = started.elapsed().as_secs_f64();
                d_line.points.push((t, d.ttft.summary().p99));
                g_line.points.push((t, g.ttft.summary().p99));
                d_all.merge(&d);
                g_all.merge(&g);
            }
            let (d, g) = (d_all.ttft.summary(), g_all.ttft.summary());
            let (dr, gr) = (d_all.relay.summary(), g_all.relay.summary());
            let (dg, gg) = (d_all.gap.summary(), g_all.gap.summary());
            let not_done = (d_all.replies - d_all.done) + (g_all.replies - g_all.done);
            table.row(vec![
                transport.name().into(),
                level.to_string(),
                g_all.replies.to_string(),
                ms(d.p50),
                ms(g.p50 - d.p50),
                ms(d.p99),
                ms(g.p99 - d.p99),
                ms(g.p999 - d.p999),
                ms(gr.p50 - dr.p50),
                ms(gr.p99 - dr.p99),
                ms(dg.p99),
                ms(gg.p99),
                not_done.to_string(),
            ]);
            cells.push(json!({
                "transport": transport.name(), "streams": level, "waves": waves,
                "direct": { "ttft": d, "relay": dr, "gap": dg, "replies": d_all.replies, "done": d_all.done, "errors": d_all.errors, "truncated": d_all.truncated },
                "gateway": { "ttft": g, "relay": gr, "gap": gg, "replies": g_all.replies, "done": g_all.done, "errors": g_all.errors, "truncated": g_all.truncated },
                "added_ms": { "ttft_p50": g.p50 - d.p50, "ttft_p99": g.p99 - d.p99, "ttft_p999": g.p999 - d.p999,
                              "relay_p50": gr.p50 - dr.p50, "relay_p99": gr.p99 - dr.p99 },
            }));
            timeline.push(d_line);
            timeline.push(g_line);
            drop(side);
        }
    }
    let mut output = Output::default();
    output.json.insert("scenario".into(), json!("overhead"));
    output.json.insert(
        "pace".into(),
        json!({ "tokens": args.tokens, "delay_ms": args.delay_ms, "bytes": 16 }),
    );
    output.json.insert("cells".into(), json!(cells));
    output.json.insert("skipped".into(), json!(skipped));
    output
        .json
        .insert("gateway_rss_kib".into(), json!(gateway.rss_kib()));
    output.tables.push(table);
    output.notes.push("TTFT: request written → first token read. Relay: the upstream's write of a token → the client's read of it (one clock: the upstream runs in the load generator's process). Gap: between consecutive tokens' reads.".into());
    if !skipped.is_empty() {
        output
            .notes
            .push(format!("skipped past --max-secs: {}", skipped.join(", ")));
    }
    output.charts.push((
        "overhead-ttft-p99.svg".into(),
        line_chart(
            "TTFT p99 per wave, direct vs through the gateway",
            "seconds into the run",
            "TTFT p99 (ms)",
            &timeline,
        ),
    ));
    Ok(output)
}

async fn setup(
    ctx: &Ctx,
    gateway: &crate::procs::Gateway,
    transport: Transport,
    level: usize,
) -> Result<Side, String> {
    let base = gateway.base();
    let users: Vec<String> = (0..level).map(|i| format!("ov{level}-{i}")).collect();
    let conversations = || async {
        let made = batched(level, 64, |i| {
            clients::conversation(&ctx.http, &base, &users[i])
        })
        .await;
        made.into_iter().collect::<Result<Vec<_>, _>>()
    };
    Ok(match transport {
        Transport::Direct => unreachable!("the baseline is not a gateway side"),
        Transport::Openai => Side::Openai(format!("{base}/v1/chat/completions")),
        Transport::Sse => Side::Sse {
            base: base.clone(),
            conversations: conversations().await?,
        },
        Transport::Ws => {
            let conversations = conversations().await?;
            let sockets = batched(level, 64, |i| {
                Ws::connect(gateway.addr, &users[i], source(i), None)
            })
            .await;
            let sockets = sockets
                .into_iter()
                .map(|s| s.map(|ws| Arc::new(Mutex::new(ws))))
                .collect::<Result<Vec<_>, _>>()?;
            Side::Ws {
                conversations,
                sockets,
            }
        }
    })
}

/// `level` replies at once (their starts spread over one token interval).
async fn wave(ctx: &Ctx, side: &Side, level: usize, pace: Pace) -> Tally {
    let content = pace.words();
    let spread = pace.delay / u32::try_from(level.max(1)).unwrap_or(1);
    let tasks = (0..level).map(|i| {
        let content = content.clone();
        let http = ctx.http.clone();
        let progress = Arc::clone(&ctx.progress);
        let job = match side {
            Side::Direct(url) | Side::Openai(url) => Job::Openai(url.clone()),
            Side::Sse {
                base,
                conversations,
            } => Job::Sse(
                base.clone(),
                conversations[i].clone(),
                format!("ov{level}-{i}"),
            ),
            Side::Ws {
                conversations,
                sockets,
            } => Job::Ws(Arc::clone(&sockets[i]), conversations[i].clone()),
        };
        tokio::spawn(async move {
            tokio::time::sleep(spread * u32::try_from(i).unwrap_or(0)).await;
            let reply = job.run(&http, &content).await;
            progress.reply(&reply);
            reply
        })
    });
    let mut tally = Tally::default();
    for reply in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
    {
        tally.add(&reply, pace.tokens);
    }
    tally
}

enum Job {
    Openai(String),
    Sse(String, String, String),
    Ws(Arc<Mutex<Ws>>, String),
}

impl Job {
    async fn run(self, http: &reqwest::Client, content: &str) -> Reply {
        static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        match self {
            Self::Openai(url) => clients::openai(http, &url, "paced", content).await,
            Self::Sse(base, conversation, user) => {
                let id = format!(
                    "ov-{}",
                    SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                clients::native_sse(http, &base, &user, &conversation, &id, content).await
            }
            Self::Ws(socket, conversation) => {
                socket.lock().await.reply(&conversation, content).await
            }
        }
    }
}

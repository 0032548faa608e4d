//! `loadtest`: Spillway's load generator. Every scenario starts its own
//! paced upstream (in this process) and gateway processes, drives bounded
//! load on loopback, prints progress to stderr, and writes JSON, Markdown
//! and SVG results. See `docs/performance.md`.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool

mod clients;
mod procs;
mod report;
mod scenarios;
mod stats;
mod upstream;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use scenarios::{Ctx, chaos, connections, fanout, overhead, slow, throughput};

#[derive(Debug, Parser)]
#[command(
    about = "Measures Spillway: added latency, throughput, memory per connection, slow consumers, fan-out"
)]
struct Cli {
    /// The gateway binary (build it with `cargo build --release`).
    #[arg(long, global = true, default_value = "target/release/spillway")]
    gateway_bin: PathBuf,
    /// Where results go (created).
    #[arg(long, global = true, default_value = "target/loadtest")]
    out: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Added TTFT and relay latency over each transport, at several concurrencies.
    Overhead(overhead::Args),
    /// Relayed tokens/s against direct, and gateway CPU per million tokens.
    Throughput(throughput::Args),
    /// Gateway RSS per idle and per streaming connection.
    Connections(connections::Args),
    /// Clients that never read: the gateway's memory and everyone else's latency.
    SlowConsumers(slow::Args),
    /// Two instances and Redis: cross-instance delivery and resume.
    Fanout(fanout::Args),
    /// Faults under load: every acknowledged message stored once, no silent truncation.
    Chaos(chaos::Args),
    /// The standard suite (every scenario, sized for a few minutes on 2 cores).
    All,
    /// Runs the paced upstream alone (for trying things by hand).
    Upstream {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    upstream::epoch();
    if let Command::Upstream { listen } = &cli.command {
        return match upstream::Upstream::start(listen).await {
            Ok(up) => {
                eprintln!("paced upstream on {}", up.base_url());
                up.wait().await;
                std::process::ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadtest: {err}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if !cli.gateway_bin.exists() {
        eprintln!(
            "loadtest: no gateway binary at {} (cargo build --release, or --gateway-bin)",
            cli.gateway_bin.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    let ctx = Ctx::new(cli.gateway_bin.clone());
    let ticker = ctx.progress.ticker();
    let result = run(&ctx, &cli).await;
    ticker.abort();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadtest: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(ctx: &Ctx, cli: &Cli) -> Result<(), String> {
    let mut summary = format!("# Spillway loadtest\n\n{}\n\n", machine());
    let out = &cli.out;
    match &cli.command {
        Command::Overhead(args) => emit(
            out,
            "overhead",
            overhead::run(ctx, args).await,
            &mut summary,
        )?,
        Command::Throughput(args) => emit(
            out,
            "throughput",
            throughput::run(ctx, args).await,
            &mut summary,
        )?,
        Command::Connections(args) => emit(
            out,
            "connections",
            connections::run(ctx, args).await,
            &mut summary,
        )?,
        Command::SlowConsumers(args) => emit(
            out,
            "slow-consumers",
            slow::run(ctx, args).await,
            &mut summary,
        )?,
        Command::Fanout(args) => emit(out, "fanout", fanout::run(ctx, args).await, &mut summary)?,
        Command::Chaos(args) => emit(out, "chaos", chaos::run(ctx, args).await, &mut summary)?,
        Command::All => {
            let args = parse::<overhead::Args>(&["--samples", "300", "--max-secs", "240"]);
            emit(
                out,
                "overhead",
                overhead::run(ctx, &args).await,
                &mut summary,
            )?;
            let args = parse::<throughput::Args>(&[]);
            emit(
                out,
                "throughput",
                throughput::run(ctx, &args).await,
                &mut summary,
            )?;
            let args = parse::<connections::Args>(&[]);
            emit(
                out,
                "connections",
                connections::run(ctx, &args).await,
                &mut summary,
            )?;
            let args = parse::<slow::Args>(&[]);
            emit(
                out,
                "slow-consumers",
                slow::run(ctx, &args).await,
                &mut summary,
            )?;
            let args = parse::<fanout::Args>(&[]);
            emit(out, "fanout", fanout::run(ctx, &args).await, &mut summary)?;
            let args = parse::<chaos::Args>(&[]);
            emit(out, "chaos", chaos::run(ctx, &args).await, &mut summary)?;
        }
        Command::Upstream { .. } => unreachable!("handled in main"),
    }
    std::fs::write(out.join("summary.md"), summary).map_err(|e| e.to_string())?;
    eprintln!("results in {}", out.display());
    Ok(())
}

/// Writes one scenario's results and prints its Markdown.
fn emit(
    out: &std::path::Path,
    name: &str,
    output: Result<report::Output, String>,
    summary: &mut String,
) -> Result<(), String> {
    let output = output.map_err(|err| format!("{name}: {err}"))?;
    let md = output.write(out, name).map_err(|e| e.to_string())?;
    println!("{md}");
    summary.push_str(&md);
    summary.push('\n');
    match output.broken {
        Some(broken) => Err(format!("{name}: {broken}")),
        None => Ok(()),
    }
}

/// A scenario's arguments from command-line words (its defaults for the rest).
fn parse<T: clap::Args + clap::FromArgMatches>(words: &[&str]) -> T {
    let command = T::augment_args(clap::Command::new("scenario").no_binary_name(true));
    let matches = command.get_matches_from(words);
    T::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

/// The machine, for the record.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {cores} cores, {mem:.1} GiB, Linux {}; load generator, paced upstream and gateway on the same box, loopback only.",
        kernel.trim()
    )
}

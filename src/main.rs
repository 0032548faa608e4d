//! The `spillway` binary: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spillway::config::Config;

/// Spillway, a streaming chat gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. With no config file it serves the built-in `mock`
    /// model on 127.0.0.1:8080.
    Serve {
        /// TOML config file (see spillway.example.toml).
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address; overrides the file and SPILLWAY_LISTEN.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Do not run pending database migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Run the pending database migrations and exit.
    Migrate {
        /// TOML config file (for `[store] database_url`).
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file (and the SPILLWAY_* environment) and exit:
    /// 0 when valid, 1 with a message naming the offending key otherwise.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            no_migrate,
        } => {
            let mut config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(err) => return fail(&err),
            };
            if let Some(listen) = listen {
                config.server.listen = listen.to_string();
            }
            if no_migrate {
                config.store.migrate_on_start = false;
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(err) => return fail(&err),
            };
            match runtime.block_on(spillway::http::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(err.as_ref()),
            }
        }
        Command::Migrate { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(err) => return fail(&err),
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(err) => return fail(&err),
            };
            let migrated = runtime.block_on(async {
                let store = spillway::store::open(&config.store).await?;
                store.migrate().await?;
                Ok::<_, spillway::store::StoreError>(store.backend())
            });
            match migrated {
                Ok(backend) => {
                    eprintln!("migrations applied ({backend})");
                    ExitCode::SUCCESS
                }
                Err(err) => fail(&err),
            }
        }
        Command::CheckConfig { file } => match Config::load(Some(&file)) {
            Ok(config) => {
                for warning in spillway::http::Gateway::check_keys(&config) {
                    eprintln!("warning: {warning}");
                }
                eprintln!(
                    "{}: ok ({} providers, {} models)",
                    file.display(),
                    config.providers.len(),
                    config.models.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
    }
}

fn fail(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::FAILURE
}

//! The `spillway` binary: a thin CLI over the library.
#![allow(clippy::print_stdout)] // a CLI: results (a new key, the key list) go to stdout

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
    /// 0 when valid, 1 with a message naming the offending key otherwise;
    /// `--print` shows the effective configuration, secrets redacted.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
        /// Print the effective configuration (file, environment, defaults)
        /// as TOML, secrets redacted.
        #[arg(long)]
        print: bool,
    },
    /// Manage API keys (server-to-server credentials).
    Keys {
        /// TOML config file (for `[store] database_url`).
        #[arg(long, env = "SPILLWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Revoke a JWT by its `jti` until it expires.
    RevokeToken {
        /// TOML config file (for `[store] database_url`).
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
        /// The token's `jti` claim.
        jti: String,
        /// The token's `exp` (Unix seconds); the entry is kept until then.
        #[arg(long)]
        expires_at: u64,
    },
}

#[derive(Debug, Subcommand)]
enum KeyAction {
    /// Create a key; it is printed once and never stored in clear.
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// A label for operators.
        #[arg(long, default_value = "")]
        name: String,
        /// Scopes (repeatable): `chat`, `admin`.
        #[arg(long = "scope", default_values_t = vec!["chat".to_owned()])]
        scopes: Vec<String>,
        /// Rate-limit tier (default: `auth.default_tier`).
        #[arg(long, default_value = "")]
        tier: String,
    },
    /// List keys (never their secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by its id (the part after `sk_spl_`, before the next `_`).
    Revoke {
        /// The key id.
        id: String,
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
        Command::Keys { config, action } => with_store(config, |store| async move {
            match action {
                KeyAction::Create {
                    tenant,
                    name,
                    scopes,
                    tier,
                } => {
                    let (key, row) = spillway::auth::new_key(&tenant, &name, &scopes, &tier)
                        .map_err(|e| e.to_string())?;
                    store
                        .create_api_key(&row)
                        .await
                        .map_err(|e| e.to_string())?;
                    eprintln!(
                        "created key {} for tenant {} (scopes: {}); it is shown once:",
                        row.id, row.tenant_id, row.scopes
                    );
                    println!("{key}");
                }
                KeyAction::List { tenant } => {
                    let keys = store
                        .list_api_keys(tenant.as_deref())
                        .await
                        .map_err(|e| e.to_string())?;
                    for key in keys {
                        let status = if key.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        };
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            key.id, key.tenant_id, status, key.scopes, key.tier, key.name
                        );
                    }
                }
                KeyAction::Revoke { id } => {
                    if !store.revoke_api_key(&id).await.map_err(|e| e.to_string())? {
                        return Err(format!("no key {id}"));
                    }
                    eprintln!("revoked key {id}");
                }
            }
            Ok(())
        }),
        Command::RevokeToken {
            config,
            jti,
            expires_at,
        } => with_store(config, |store| async move {
            let until = i64::try_from(expires_at.saturating_mul(1000)).unwrap_or(i64::MAX);
            store
                .revoke_token(&jti, until)
                .await
                .map_err(|e| e.to_string())?;
            eprintln!("revoked token {jti}");
            Ok(())
        }),
        Command::CheckConfig { file, print } => match Config::load(Some(&file)) {
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
                if print {
                    print!("{}", config.redacted_toml());
                }
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
    }
}

/// Opens (and migrates) the configured store and runs `work` on it.
fn with_store<F, Fut>(config: Option<PathBuf>, work: F) -> ExitCode
where
    F: FnOnce(std::sync::Arc<dyn spillway::store::Store>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let config = match Config::load(config.as_deref()) {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    let done = runtime.block_on(async {
        let store = spillway::store::open(&config.store)
            .await
            .map_err(|e| e.to_string())?;
        store.migrate().await.map_err(|e| e.to_string())?;
        work(store).await
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
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

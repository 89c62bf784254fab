//! The `keygate` binary: a thin clap front over `keygate-server`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use keygate_server::config::Config;
use keygate_server::issue::{self, CreateKey, Issuer};
use keygate_server::startup::{self, Application};
use std::path::PathBuf;
use std::process::ExitCode;

/// API-key authentication for HTTP APIs: gateway, forward-auth and verify API.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
struct Cli {
    /// Config file (TOML). Without it: defaults and KEYGATE_* environment variables.
    #[arg(long, short, global = true, env = "KEYGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server. On an empty database, prints the root key once on stdout.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage keys directly in the database (no running server needed).
    #[command(subcommand)]
    Keys(Box<KeysCommand>),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; prints the plaintext once, then the record as JSON on stderr.
    Create {
        /// sk, ut or pk.
        #[arg(long)]
        kind: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Tenant id (default: the operator's tenant).
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Owning user (ut keys).
        #[arg(long)]
        user: Option<String>,
        /// default, aidemo or widget.
        #[arg(long)]
        preset: Option<String>,
        /// Scopes, comma separated.
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        /// Allowed origins, comma separated.
        #[arg(long, value_delimiter = ',')]
        origins: Option<Vec<String>>,
        /// Allowed IPs / CIDRs, comma separated.
        #[arg(long, value_delimiter = ',')]
        ips: Option<Vec<String>>,
        /// Lifetime credit budget.
        #[arg(long)]
        budget: Option<u64>,
        /// Lifetime in seconds.
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => startup::open_store(&config)
                .await
                .map(|_| eprintln!("keygate: migrations applied to {}", config.database_url))
                .map_err(|e| e.to_string()),
            Command::Keys(k) => keys(config, *k).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    keygate_server::telemetry::init(&config.log);
    let app = Application::build(config)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(root) = app.root_key() {
        eprintln!(
            "keygate: created tenant \"default\" and its root key. It is printed once, on the next line of stdout; store it now:"
        );
        println!("{root}");
    }
    if let Some(addr) = app.local_addr() {
        eprintln!("keygate: listening on http://{addr}");
    }
    app.run_until_stopped(shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("keygate: shutting down, finishing in-flight requests");
}

async fn keys(config: Config, cmd: KeysCommand) -> Result<(), String> {
    let store = startup::open_store(&config)
        .await
        .map_err(|e| e.to_string())?;
    match cmd {
        KeysCommand::Create {
            kind,
            name,
            tenant,
            user,
            preset,
            scopes,
            origins,
            ips,
            budget,
            ttl_seconds,
        } => {
            if store
                .get_tenant(&tenant)
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Err(format!(
                    "tenant {tenant:?} does not exist (on a new database, run `keygate serve` once: it creates \"default\" and prints its root key)"
                ));
            }
            let (format, hasher) = startup::key_tools(&config).map_err(|e| e.to_string())?;
            let issuer = Issuer {
                config: &config,
                format: &format,
                hasher: &hasher,
            };
            let body = CreateKey {
                kind,
                name,
                user_id: user,
                preset,
                scopes,
                allowed_origins: origins,
                allowed_ips: ips,
                budget,
                ttl_seconds,
                ..CreateKey::default()
            };
            let now = keygate_server::state::now_ms();
            let (plaintext, record) = issue::build_key(&issuer, &*store, &tenant, body, now)
                .await
                .map_err(|e| e.message.to_string())?;
            store.insert_key(&record).await.map_err(|e| e.to_string())?;
            println!("{plaintext}");
            eprintln!(
                "keygate: created {} ({} key {}…) in tenant {}; the key above is shown once",
                record.id, record.kind, record.display, record.tenant_id
            );
            Ok(())
        }
    }
}

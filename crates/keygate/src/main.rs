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
    /// Read and check the audit log directly in the database.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every node's hash chain; prints a JSON report, exits 1 if a chain is broken.
    Verify,
    /// Write audit events to stdout, newest first (progress on stderr).
    Export {
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Only this tenant's events.
        #[arg(long)]
        tenant: Option<String>,
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
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
            Command::Audit(a) => audit(config, a).await,
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
            // The CLI is a node of its own for the audit log: a one-event chain per run.
            let mut event = keygate_core::AuditEvent {
                node: format!("cli_{}", keygate_server::ids::random_base62(8)),
                seq: 1,
                at_ms: now,
                tenant_id: Some(record.tenant_id.clone()),
                actor: "system".into(),
                action: "key.created".into(),
                key_id: Some(record.id.clone()),
                user_id: record.user_id.clone(),
                detail: Some(
                    serde_json::json!({"kind": record.kind.as_str(), "name": record.name, "scopes": record.scopes.to_strings(), "via": "cli"})
                        .to_string(),
                ),
                ..keygate_core::AuditEvent::default()
            };
            event.id = keygate_server::audit::event_id(&event);
            event.seal(keygate_core::audit::GENESIS);
            store
                .append_audit(&[event])
                .await
                .map_err(|e| e.to_string())?;
            println!("{plaintext}");
            eprintln!(
                "keygate: created {} ({} key {}…) in tenant {}; the key above is shown once",
                record.id, record.kind, record.display, record.tenant_id
            );
            Ok(())
        }
    }
}

/// One CSV field, quoted when it holds a comma, quote or line break (RFC 4180). Written by
/// hand: this function is all the CSV keygate needs.
fn csv_field(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

async fn audit(config: Config, cmd: AuditCommand) -> Result<(), String> {
    use std::io::Write;
    let store = startup::open_store(&config)
        .await
        .map_err(|e| e.to_string())?;
    match cmd {
        AuditCommand::Verify => {
            let report = keygate_store::verify_audit(&*store)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
            );
            if let Some((node, b)) = report.broken {
                return Err(format!(
                    "the audit chain of node {node} is broken at seq {}: {:?}",
                    b.seq, b.problem
                ));
            }
            eprintln!(
                "keygate: {} events on {} chains verified",
                report.checked, report.nodes
            );
            Ok(())
        }
        AuditCommand::Export {
            format,
            tenant,
            since,
            until,
        } => {
            let csv = match format.as_str() {
                "jsonl" => false,
                "csv" => true,
                _ => return Err("--format must be jsonl or csv".into()),
            };
            let time = |name: &str, v: Option<String>| {
                v.map(|s| {
                    keygate_server::views::parse_rfc3339(&s)
                        .ok_or_else(|| format!("--{name} must be an RFC 3339 timestamp"))
                })
                .transpose()
            };
            let filter = keygate_store::AuditFilter {
                tenant_id: tenant,
                since_ms: time("since", since)?,
                until_ms: time("until", until)?,
                ..keygate_store::AuditFilter::default()
            };
            let columns = [
                "id",
                "at",
                "node",
                "seq",
                "tenant_id",
                "actor",
                "action",
                "key_id",
                "user_id",
                "kind",
                "code",
                "status",
                "method",
                "path",
                "scope",
                "ip",
                "origin",
                "credits",
                "latency_us",
                "request_id",
                "detail",
                "prev_hash",
                "hash",
            ];
            let out = std::io::stdout();
            let mut out = std::io::BufWriter::new(out.lock());
            let io = |e: std::io::Error| e.to_string();
            if csv {
                writeln!(out, "{}", columns.join(",")).map_err(io)?;
            }
            let mut page = keygate_store::PageRequest {
                cursor: None,
                limit: 500,
            };
            let mut n = 0u64;
            loop {
                let events = store
                    .list_audit(&filter, &page)
                    .await
                    .map_err(|e| e.to_string())?;
                for e in &events {
                    let mut v = serde_json::to_value(e).map_err(|e| e.to_string())?;
                    v["at"] = keygate_server::views::rfc3339(e.at_ms).into();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("at_ms");
                    }
                    if csv {
                        let row: Vec<String> = columns.iter().map(|c| csv_field(&v[*c])).collect();
                        writeln!(out, "{}", row.join(",")).map_err(io)?;
                    } else {
                        writeln!(out, "{v}").map_err(io)?;
                    }
                }
                n += events.len() as u64;
                eprint!("\rkeygate: exported {n} events");
                if events.len() < page.limit as usize {
                    break;
                }
                page.cursor = events.last().map(|e| e.id.clone());
            }
            out.flush().map_err(io)?;
            eprintln!();
            Ok(())
        }
    }
}

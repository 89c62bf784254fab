//! The `keygate` binary: a thin clap front over `keygate-server`.
#![forbid(unsafe_code)]

mod remote;
mod scan;

use clap::{CommandFactory, Parser, Subcommand};
use keygate_api::{
    AuditView, CreateTenant, CreatedTenant, IssuedKey, KeyView, ListView, RotateKey, TenantView,
    VerifyAnswer, VerifyBody,
};
use keygate_engine::config::Config;
use keygate_engine::issue::{self, CreateKey, Issuer};
use keygate_server::startup::{self, Application};
use remote::{body_of, cell, opt, query, read, table, words, Remote};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// API-key authentication for HTTP APIs: gateway, forward-auth and verify API.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
struct Cli {
    /// Config file (TOML). Without it: defaults and KEYGATE_* environment variables.
    #[arg(long, short, global = true, env = "KEYGATE_CONFIG")]
    config: Option<PathBuf>,
    /// A running node (`http://127.0.0.1:8080`): management commands go there over HTTP.
    #[arg(long, global = true, env = "KEYGATE_URL")]
    url: Option<String>,
    /// The key to call the node with (an `sk` key with the scopes the command needs).
    #[arg(long, global = true, env = "KEYGATE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Print the node's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
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
    /// Read and check the audit log (verify and export read the database; tail asks a node).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Tenants of a running node (needs --url and the operator's key).
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Find keys of this deployment's format in files (prefix + checksum) and say whether each
    /// is active, revoked, expired or unknown, without printing them. Exits 1 if a key that
    /// still works is found. Looks keys up in the database, or with --url through the verify
    /// API (cost 0; scope keys:verify).
    Scan {
        /// Files or directories (.git, node_modules and target are skipped).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print a shell completion script: `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum TenantsCommand {
    /// List tenants.
    List,
    /// Show one tenant.
    Show {
        /// `tnt_…` or `default`.
        id: String,
    },
    /// Create a tenant; prints its admin key once.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Plan (free, pro, enterprise or one of the config's).
        #[arg(long)]
        plan: Option<String>,
        /// Starting credits (default: the plan's grant).
        #[arg(long)]
        credits: Option<u64>,
    },
    /// Add credits to a tenant's pool.
    Credits {
        /// Tenant id.
        id: String,
        /// Credits to add.
        #[arg(long)]
        amount: u64,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every node's hash chain; prints a JSON report, exits 1 if a chain is broken.
    Verify,
    /// The newest events from a running node (needs --url); --follow keeps printing new ones.
    Tail {
        /// How many events to show first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Keep polling for new events (every second) until interrupted.
        #[arg(long)]
        follow: bool,
        /// Only this action (`request.decided`, `key.revoked`, …).
        #[arg(long)]
        action: Option<String>,
    },
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
    /// List keys (needs --url).
    List {
        /// sk, ut or pk.
        #[arg(long)]
        kind: Option<String>,
        /// active, grace, revoked or expired.
        #[arg(long)]
        status: Option<String>,
        /// Name contains this text.
        #[arg(long)]
        name: Option<String>,
        /// Another tenant's keys (operator only).
        #[arg(long)]
        tenant: Option<String>,
        /// Page size (1-500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one key (needs --url).
    Show {
        /// `key_…`
        id: String,
    },
    /// Rotate a key: prints the successor once; the old key works for the grace period
    /// (needs --url).
    Rotate {
        /// `key_…`
        id: String,
        /// Grace period of the old key, seconds (default: the node's).
        #[arg(long)]
        grace_seconds: Option<u64>,
    },
    /// Revoke a key now, on every node (needs --url).
    Revoke {
        /// `key_…`
        id: String,
    },
    /// Create a key; prints the plaintext once (to a node with --url, else in the database).
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
    let remote = match cli.url.as_deref().map(|u| Remote::new(u, cli.key.clone())) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            eprintln!("keygate: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => startup::open_store(&config)
                .await
                .map(|_| eprintln!("keygate: migrations applied to {}", config.database_url))
                .map_err(|e| e.to_string()),
            Command::Keys(k) => keys(config, remote, cli.json, *k).await,
            Command::Audit(a) => audit(config, remote, cli.json, a).await,
            Command::Tenants(t) => match remote {
                Some(r) => tenants(&r, cli.json, t).await,
                None => Err("tenants commands talk to a node: give --url and --key".into()),
            },
            Command::Scan { paths } => scan_paths(config, remote, &paths).await,
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "keygate",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
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

fn need(remote: Option<Remote>, what: &str) -> Result<Remote, String> {
    remote.ok_or_else(|| format!("{what} talks to a running node: give --url and --key"))
}

fn print_json(v: &Value) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn key_rows(items: &[KeyView]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.name.clone(),
                k.kind.clone(),
                k.status.clone(),
                format!("{}…", k.start),
                words(&k.scopes),
                opt(&k.last_used_at),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "KIND", "STATUS", "KEY", "SCOPES", "LAST USED"],
        &rows,
    )
}

/// Prints a key's plaintext (the one time it is shown) on stdout, the rest on stderr.
fn print_issued(v: &Value, json_out: bool, what: &str) -> Result<(), String> {
    if json_out {
        return print_json(v);
    }
    let issued: IssuedKey = read(v.clone())?;
    println!("{}", issued.key);
    let k = &issued.record;
    eprintln!(
        "keygate: {what} {} ({} key {}…) in tenant {}; the key above is shown once",
        k.id, k.kind, k.start, k.tenant_id
    );
    Ok(())
}

async fn keys(
    config: Config,
    remote: Option<Remote>,
    json_out: bool,
    cmd: KeysCommand,
) -> Result<(), String> {
    match cmd {
        KeysCommand::List {
            kind,
            status,
            name,
            tenant,
            limit,
        } => {
            let r = need(remote, "keys list")?;
            let q = query(&[
                ("kind", kind),
                ("status", status),
                ("name", name),
                ("tenant_id", tenant),
                ("limit", Some(limit.to_string())),
            ]);
            let v = r.call("GET", &format!("/v1/keys{q}"), None).await?;
            if json_out {
                return print_json(&v);
            }
            let page: ListView<KeyView> = read(v)?;
            print!("{}", key_rows(&page.data));
            if let Some(c) = page.next_cursor {
                eprintln!("keygate: more keys follow (cursor {c})");
            }
            return Ok(());
        }
        KeysCommand::Show { id } => {
            let r = need(remote, "keys show")?;
            let v = r.call("GET", &format!("/v1/keys/{id}"), None).await?;
            if json_out {
                return print_json(&v);
            }
            let mut rows = Vec::new();
            if let Some(o) = v.as_object() {
                for (k, val) in o {
                    rows.push(vec![k.clone(), cell(val)]);
                }
            }
            print!("{}", table(&["FIELD", "VALUE"], &rows));
            return Ok(());
        }
        KeysCommand::Rotate { id, grace_seconds } => {
            let r = need(remote, "keys rotate")?;
            let body = RotateKey { grace_seconds };
            let v = r
                .call("POST", &format!("/v1/keys/{id}/rotate"), body_of(&body)?)
                .await?;
            return print_issued(&v, json_out, "rotated into");
        }
        KeysCommand::Revoke { id } => {
            let r = need(remote, "keys revoke")?;
            let v = r
                .call("POST", &format!("/v1/keys/{id}/revoke"), None)
                .await?;
            if json_out {
                return print_json(&v);
            }
            eprintln!(
                "keygate: revoked {id}; the next request with it gets 401 REVOKED on every node"
            );
            return Ok(());
        }
        KeysCommand::Create { .. } => {}
    }
    if let (
        Some(r),
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
        },
    ) = (&remote, &cmd)
    {
        let body = CreateKey {
            kind: kind.clone(),
            name: name.clone(),
            tenant_id: (tenant != "default").then(|| tenant.clone()),
            user_id: user.clone(),
            preset: preset.clone(),
            scopes: scopes.clone(),
            allowed_origins: origins.clone(),
            allowed_ips: ips.clone(),
            budget: *budget,
            ttl_seconds: *ttl_seconds,
            ..CreateKey::default()
        };
        let v = r.call("POST", "/v1/keys", body_of(&body)?).await?;
        return print_issued(&v, json_out, "created");
    }
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
            let tenant = keygate_core::TenantId::from(tenant);
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
            let now = keygate_engine::clock::now_ms();
            let (plaintext, record) = issue::build_key(&issuer, &*store, &tenant, body, now)
                .await
                .map_err(|e| e.to_string())?;
            store.insert_key(&record).await.map_err(|e| e.to_string())?;
            // The CLI is a node of its own for the audit log: a one-event chain per run.
            let mut event = keygate_core::AuditEvent {
                node: format!("cli_{}", keygate_engine::ids::random_base62(8)),
                seq: 1,
                at_ms: now,
                tenant_id: Some(record.tenant_id.to_string()),
                actor: "system".into(),
                action: "key.created".into(),
                key_id: Some(record.id.to_string()),
                user_id: record.user_id.as_deref().map(str::to_owned),
                detail: Some(
                    serde_json::json!({"kind": record.kind.as_str(), "name": record.name, "scopes": record.scopes.to_strings(), "via": "cli"})
                        .to_string(),
                ),
                ..keygate_core::AuditEvent::default()
            };
            event.id = keygate_engine::audit::event_id(&event);
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
        _ => Err("handled above".into()),
    }
}

async fn tenants(r: &Remote, json_out: bool, cmd: TenantsCommand) -> Result<(), String> {
    let rows = |items: &[TenantView]| {
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.plan.clone(),
                    t.credits
                        .map_or_else(|| "unlimited".into(), |c| c.to_string()),
                    t.created_at.clone(),
                ]
            })
            .collect();
        table(&["ID", "NAME", "PLAN", "CREDITS", "CREATED"], &rows)
    };
    let v = match cmd {
        TenantsCommand::List => r.call("GET", "/v1/tenants?limit=500", None).await?,
        TenantsCommand::Show { id } => r.call("GET", &format!("/v1/tenants/{id}"), None).await?,
        TenantsCommand::Create {
            name,
            plan,
            credits,
        } => {
            let body = CreateTenant {
                name,
                plan,
                credits,
            };
            let v = r.call("POST", "/v1/tenants", body_of(&body)?).await?;
            if json_out {
                return print_json(&v);
            }
            let created: CreatedTenant = read(v)?;
            print!("{}", rows(std::slice::from_ref(&created.tenant)));
            return print_issued(
                &serde_json::to_value(&created.admin_key).map_err(|e| e.to_string())?,
                false,
                "its admin key",
            );
        }
        TenantsCommand::Credits { id, amount } => {
            r.call(
                "POST",
                &format!("/v1/tenants/{id}/credits"),
                Some(json!({ "amount": amount })),
            )
            .await?
        }
    };
    if json_out {
        return print_json(&v);
    }
    // A list, or one tenant.
    let items = match read::<ListView<TenantView>>(v.clone()) {
        Ok(page) => page.data,
        Err(_) => vec![read::<TenantView>(v)?],
    };
    print!("{}", rows(&items));
    Ok(())
}

fn audit_rows(events: &[AuditView]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.action.clone(),
                e.actor.clone(),
                opt(&e.key_id),
                opt(&e.code),
                e.status.map_or_else(|| "-".into(), |s| s.to_string()),
                format!("{} {}", opt(&e.method), opt(&e.path)),
            ]
        })
        .collect();
    table(
        &["AT", "ACTION", "ACTOR", "KEY", "CODE", "STATUS", "REQUEST"],
        &rows,
    )
}

async fn tail(
    r: &Remote,
    json_out: bool,
    limit: u32,
    follow: bool,
    action: Option<String>,
) -> Result<(), String> {
    let v = r
        .call(
            "GET",
            &format!(
                "/v1/audit{}",
                query(&[
                    ("limit", Some(limit.to_string())),
                    ("action", action.clone())
                ])
            ),
            None,
        )
        .await?;
    // Newest first from the API; a tail reads oldest first.
    let mut events = read::<ListView<AuditView>>(v)?.data;
    events.reverse();
    let show = |events: &[AuditView], header: bool| -> Result<(), String> {
        if json_out {
            for e in events {
                println!("{}", serde_json::to_string(e).map_err(|e| e.to_string())?);
            }
        } else if !events.is_empty() {
            let t = audit_rows(events);
            let body = if header {
                t.as_str()
            } else {
                t.split_once('\n').map_or("", |(_, rest)| rest)
            };
            print!("{body}");
        }
        Ok(())
    };
    show(&events, true)?;
    if !follow {
        return Ok(());
    }
    let mut seen: std::collections::HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
    let mut since = events.last().map(|e| e.at.clone());
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let v = r
            .call(
                "GET",
                &format!(
                    "/v1/audit{}",
                    query(&[
                        ("limit", Some("500".into())),
                        ("action", action.clone()),
                        ("since", since.clone())
                    ])
                ),
                None,
            )
            .await?;
        let mut fresh: Vec<AuditView> = read::<ListView<AuditView>>(v)?
            .data
            .into_iter()
            .filter(|e| !seen.contains(&e.id))
            .collect();
        fresh.reverse();
        for e in &fresh {
            seen.insert(e.id.clone());
        }
        if let Some(last) = fresh.last() {
            since = Some(last.at.clone());
        }
        show(&fresh, seen.len() == fresh.len())?;
    }
}

async fn scan_paths(
    config: Config,
    remote: Option<Remote>,
    paths: &[PathBuf],
) -> Result<(), String> {
    let (format, hasher) = startup::key_tools(&config).map_err(|e| e.to_string())?;
    let found = scan::scan(&format, paths, |n| eprint!("\rkeygate: scanned {n} files"))?;
    eprintln!();
    let store = match &remote {
        Some(_) => None,
        None => Some(
            startup::open_store(&config)
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let now = keygate_engine::clock::now_ms();
    let mut working = 0;
    for f in &found {
        let display: String = f.key.chars().take(10).collect();
        let (id, status) = match (&store, &remote) {
            (Some(s), _) => match s
                .get_key_by_hash(&hasher.hash(&f.key))
                .await
                .map_err(|e| e.to_string())?
            {
                None => ("-".to_owned(), "unknown"),
                Some(k) => {
                    let status = match k.status {
                        keygate_core::KeyStatus::Revoked => "revoked",
                        _ if k.expires_at_ms.is_some_and(|e| e <= now) => "expired",
                        keygate_core::KeyStatus::Grace => "grace",
                        _ => "active",
                    };
                    (k.id.into_string(), status)
                }
            },
            (None, Some(r)) => {
                let body = VerifyBody {
                    key: f.key.clone(),
                    scope: None,
                    method: None,
                    path: None,
                    origin: None,
                    ip: None,
                    tenant_id: None,
                    cost: Some(0),
                };
                let v = r.call("POST", "/v1/keys/verify", body_of(&body)?).await?;
                let v: VerifyAnswer = read(v)?;
                let status = match v.code.as_ref() {
                    "UNKNOWN_KEY" | "MALFORMED_KEY" => "unknown",
                    "REVOKED" => "revoked",
                    "EXPIRED" => "expired",
                    _ => "active",
                };
                (opt(&v.key_id), status)
            }
            (None, None) => ("-".to_owned(), "unknown"),
        };
        if matches!(status, "active" | "grace") {
            working += 1;
        }
        println!("{}:{}: {display}… {id} {status}", f.path.display(), f.line);
    }
    if working > 0 {
        return Err(format!(
            "{working} of {} keys found still work: revoke or rotate them",
            found.len()
        ));
    }
    eprintln!("keygate: {} keys found, none of them works", found.len());
    Ok(())
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

async fn audit(
    config: Config,
    remote: Option<Remote>,
    json_out: bool,
    cmd: AuditCommand,
) -> Result<(), String> {
    use std::io::Write;
    if let AuditCommand::Tail {
        limit,
        follow,
        action,
    } = cmd
    {
        let r = need(remote, "audit tail")?;
        return tail(&r, json_out, limit, follow, action).await;
    }
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
                    keygate_engine::clock::parse_rfc3339(&s)
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
                    v["at"] = keygate_engine::clock::rfc3339(e.at_ms).into();
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
        AuditCommand::Tail { .. } => Err("handled above".into()),
    }
}

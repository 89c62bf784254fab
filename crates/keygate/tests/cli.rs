//! The binary as a user runs it: `keygate serve` prints the root key once on a line of its
//! own; `keygate keys create` works on the database directly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

struct Server {
    child: Child,
    addr: String,
    stdout_first_line: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(db: &std::path::Path) -> Server {
    serve_with(db, &[])
}

fn serve_with(db: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(BIN)
        .arg("serve")
        .envs(env.iter().copied())
        .env("KEYGATE_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keygate");
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("keygate: listening on http://") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let (otx, orx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = otx.send(first);
        for _ in lines {}
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server reports its address");
    // stdout's first line arrives before the address when there is one; wait briefly otherwise.
    let stdout_first_line = orx
        .recv_timeout(Duration::from_millis(500))
        .unwrap_or_default();
    Server {
        child,
        addr,
        stdout_first_line,
    }
}

async fn auth(addr: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("http://{addr}/v1/auth"))
        .bearer_auth(key)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn first_start_prints_the_root_key_once_and_the_cli_creates_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    let server = serve(&db);
    let root = server.stdout_first_line.clone();
    assert!(
        root.starts_with("kg_sk_") && root.len() == 44,
        "root key line: {root:?}"
    );
    assert_eq!(auth(&server.addr, &root).await, 200);

    // The CLI writes to the same database while the server runs.
    let out = Command::new(BIN)
        .args([
            "keys", "create", "--kind", "pk", "--name", "cli", "--preset", "aidemo",
        ])
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .output()
        .expect("run keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    assert!(key.starts_with("kg_pk_"), "{key}");
    let status = reqwest::Client::new()
        .get(format!("http://{}/v1/auth", server.addr))
        .bearer_auth(&key)
        .header("origin", "https://claude.ai")
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 200);
    drop(server);

    // Second start on the same database: no new root key.
    let again = serve(&db);
    assert_eq!(again.stdout_first_line, "");
    assert_eq!(auth(&again.addr, &root).await, 200);
}

#[test]
fn bad_cli_input_fails_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    let out = Command::new(BIN)
        .args(["keys", "create", "--kind", "sk", "--name", "x"])
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keygate serve"));
    let out = Command::new(BIN)
        .args(["serve"])
        .env("KEYGATE_KEYS__PREFIX", "Not Valid")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keys.prefix"));
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("root key"));
}

/// Every audit event of the database at `db`, via `keygate audit export` (JSON lines).
fn exported(db: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["audit", "export", "--format", "jsonl"])
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .output()
        .expect("run audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_survives_kill_9_in_the_audit_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    // Nothing is shipped before the kill: every event must come back from the segment.
    let mut server = serve_with(&db, &[("KEYGATE_AUDIT__SHIP_INTERVAL_MS", "600000")]);
    let root = server.stdout_first_line.clone();
    let addr = server.addr.clone();
    // 16 clients hammer forward-auth and note the request id of every answer they get.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (addr, root, stop) = (addr.clone(), root.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client
                    .get(format!("http://{addr}/v1/auth"))
                    .bearer_auth(&root)
                    .send()
                    .await
                {
                    Ok(r) => ids.push(
                        r.headers()["x-request-id"]
                            .to_str()
                            .expect("id")
                            .to_string(),
                    ),
                    Err(_) => break, // the server is gone
                }
            }
            ids
        }));
    }
    // Kill it mid-load, once the segments hold a good number of events (lines: a segment's
    // file is longer than its lines, with zeros written ahead of them).
    let segment_lines = || {
        std::fs::read_dir(dir.path().join("kg.db.audit"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|b| b.iter().filter(|c| **c == b'\n').count())
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while segment_lines() < 600 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.child.kill().expect("kill -9"); // SIGKILL: no flush, no shutdown
    let _ = server.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = std::collections::HashSet::new();
    for t in tasks {
        answered.extend(t.await.expect("task"));
    }
    assert!(
        answered.len() > 200,
        "only {} answers before the kill",
        answered.len()
    );
    // The shipper's first round runs at start (it ships what an earlier run left): it may
    // catch the first few answers. Every other answer must come back from the segments.
    let shipped = exported(&db).len();
    assert!(
        shipped * 10 < answered.len(),
        "{shipped} of {} answers were shipped before the kill: the test must replay segments",
        answered.len()
    );
    eprintln!("{} answers before kill -9", answered.len());

    // The restarted node replays what it had not shipped.
    let again = serve(&db);
    let mut missing = answered.len();
    for _ in 0..100 {
        let logged: std::collections::HashSet<String> = exported(&db)
            .iter()
            .filter_map(|e| e["request_id"].as_str().map(str::to_owned))
            .collect();
        missing = answered.iter().filter(|id| !logged.contains(*id)).count();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        missing, 0,
        "answered requests missing from the audit log after kill -9"
    );
    drop(again);
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .output()
        .expect("run audit verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(report["broken"].is_null(), "{report}");
    assert!(report["checked"].as_u64().expect("checked") >= answered.len() as u64);
}

#[test]
fn audit_export_writes_csv_and_verify_finds_an_edited_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    let url = format!("sqlite://{}", db.display());
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("KEYGATE_DATABASE_URL", &url)
            .output()
            .expect("run")
    };
    // A database with a default tenant: start once, stop gracefully.
    let server = serve(&db);
    drop(server);
    for name in ["a,b", "plain"] {
        let out = run(&["keys", "create", "--kind", "sk", "--name", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let csv = run(&["audit", "export", "--format", "csv"]);
    assert!(csv.status.success());
    let text = String::from_utf8(csv.stdout).expect("utf8");
    let mut lines = text.lines();
    assert!(lines.next().expect("header").starts_with("id,at,node,seq,"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows.iter().all(|r| r.contains(",key.created,")));
    // The name with a comma sits inside a quoted JSON detail field.
    assert!(
        text.contains(r#""{""kind"":""sk"",""name"":""a,b"""#),
        "{text}"
    );
    assert!(run(&["audit", "verify"]).status.success());
    assert!(!run(&["audit", "export", "--format", "xml"])
        .status
        .success());

    // Someone edits a row: verify names it and fails.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
        let blocks: Vec<(String, i64, Vec<u8>)> =
            sqlx::query_as("SELECT node, first_seq, events FROM audit_blocks")
                .fetch_all(&pool)
                .await
                .expect("blocks");
        assert!(!blocks.is_empty());
        for (node, first_seq, stored) in blocks {
            let text = keygate_store::block_text(&stored).expect("block");
            let edited = String::from_utf8(text)
                .expect("utf8")
                .replace(r#""actor":""#, r#""actor":"someone_else_"#);
            sqlx::query("UPDATE audit_blocks SET events = ? WHERE node = ? AND first_seq = ?")
                .bind(keygate_store::stored_block(edited.as_bytes()))
                .bind(node)
                .bind(first_seq)
                .execute(&pool)
                .await
                .expect("edit");
        }
        pool.close().await;
    });
    let out = run(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed"));
}

/// Runs the CLI against a node (`--url`/`--key` through the environment); (exit ok, stdout,
/// stderr).
fn cli(
    url: Option<&str>,
    key: &str,
    db: &std::path::Path,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("KEYGATE_DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("KEYGATE_KEY", key)
        .env_remove("KEYGATE_URL");
    if let Some(u) = url {
        cmd.env("KEYGATE_URL", u);
    }
    let out = cmd.output().expect("run keygate");
    (
        out.status.success(),
        String::from_utf8(out.stdout).expect("utf8"),
        String::from_utf8(out.stderr).expect("utf8"),
    )
}

#[tokio::test]
async fn the_cli_manages_keys_tenants_and_the_audit_log_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    let server = serve(&db);
    let root = server.stdout_first_line.clone();
    let url = format!("http://{}", server.addr);
    let run = |args: &[&str]| cli(Some(&url), &root, &db, args);

    let (ok, out, err) = run(&[
        "keys",
        "create",
        "--kind",
        "sk",
        "--name",
        "ci",
        "--scopes",
        "docs:read",
    ]);
    assert!(ok, "{err}");
    let key = out.trim().to_owned();
    assert!(
        key.starts_with("kg_sk_") && err.contains("shown once"),
        "{out} {err}"
    );
    assert_eq!(auth(&server.addr, &key).await, 200);

    // A human table, and the node's JSON with --json; never the plaintext.
    let (ok, table, _) = run(&["keys", "list", "--name", "ci"]);
    assert!(ok);
    assert!(
        table.starts_with("ID ") && table.contains(" ci ") && table.contains("active"),
        "{table}"
    );
    assert!(!table.contains(&key));
    let (_, json, _) = run(&["keys", "list", "--json", "--kind", "sk", "--name", "ci"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let id = v["data"][0]["id"].as_str().expect("id").to_owned();
    let (ok, shown, _) = run(&["keys", "show", &id]);
    assert!(
        ok && shown.contains("status") && shown.contains("active"),
        "{shown}"
    );

    // Rotate without grace: the old key stops, the successor works; then revoke it.
    let (ok, out, err) = run(&["keys", "rotate", &id, "--grace-seconds", "0"]);
    assert!(ok, "{err}");
    let successor = out.trim().to_owned();
    assert_eq!(auth(&server.addr, &key).await, 401);
    assert_eq!(auth(&server.addr, &successor).await, 200);
    let (_, json, _) = run(&[
        "keys", "list", "--json", "--status", "active", "--name", "ci",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let successor_id = v["data"][0]["id"].as_str().expect("id").to_owned();
    let (ok, _, err) = run(&["keys", "revoke", &successor_id]);
    assert!(ok && err.contains("revoked"), "{err}");
    assert_eq!(auth(&server.addr, &successor).await, 401);

    // Tenants: the admin key is printed once, on the last line.
    let (ok, out, err) = run(&["tenants", "create", "--name", "acme", "--plan", "pro"]);
    assert!(ok, "{err}");
    let admin = out.lines().last().expect("admin key").trim().to_owned();
    assert!(admin.starts_with("kg_sk_"), "{out}");
    // Above it, the new tenant's row (its name and plan, not dashes).
    assert!(out.contains("acme") && out.contains(" pro "), "{out}");
    assert_eq!(auth(&server.addr, &admin).await, 200);
    let (_, list, _) = run(&["tenants", "list"]);
    assert!(
        list.contains("acme") && list.contains("default") && list.contains("unlimited"),
        "{list}"
    );

    // The audit log: the revocation shows up (shipping runs every 200 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, tail, err) = run(&["audit", "tail", "--limit", "100"]);
        assert!(ok, "{err}");
        if tail.contains("key.revoked") && tail.contains("tenant.created") {
            assert!(tail.starts_with("AT "), "{tail}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no key.revoked in:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Errors: a refusal is named; management commands without a node say what is missing.
    let (ok, _, err) = cli(Some(&url), "kg_sk_nope", &db, &["keys", "list"]);
    assert!(!ok && err.contains("401 MALFORMED_KEY"), "{err}");
    let (ok, _, err) = cli(None, &root, &db, &["keys", "list"]);
    assert!(!ok && err.contains("--url"), "{err}");
    let (ok, out, _) = cli(None, &root, &db, &["completions", "bash"]);
    assert!(
        ok && out.contains("_keygate") && out.contains("scan"),
        "completions"
    );
}

#[tokio::test]
async fn scan_finds_keys_and_says_which_still_work_without_printing_them() {
    use keygate_core::{KeyFormat, Kind};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kg.db");
    let server = serve(&db);
    let root = server.stdout_first_line.clone();
    let url = format!("http://{}", server.addr);
    let create = |name: &str| {
        let (ok, out, err) = cli(
            Some(&url),
            &root,
            &db,
            &["keys", "create", "--kind", "sk", "--name", name],
        );
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let active = create("active");
    let revoked = create("revoked");
    let (_, json, _) = cli(
        Some(&url),
        &root,
        &db,
        &["keys", "list", "--json", "--name", "revoked"],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let (ok, _, _) = cli(
        Some(&url),
        &root,
        &db,
        &["keys", "revoke", v["data"][0]["id"].as_str().expect("id")],
    );
    assert!(ok);
    let unknown = KeyFormat::new("kg")
        .expect("format")
        .generate(Kind::Pk, |b| b.fill(42));
    let mut fake = active.clone();
    fake.pop();
    fake.push(if active.ends_with('Z') { 'Y' } else { 'Z' });

    let tree = dir.path().join("repo");
    std::fs::create_dir_all(tree.join("src")).expect("mkdir");
    std::fs::create_dir_all(tree.join("node_modules/x")).expect("mkdir");
    std::fs::write(tree.join(".env"), format!("# keys\nAPI_KEY={active}\n")).expect("write");
    std::fs::write(
        tree.join("src/app.js"),
        format!("const a = '{revoked}';\n\nconst b = \"{unknown}\"; // {fake}\n"),
    )
    .expect("write");
    std::fs::write(tree.join("node_modules/x/i.js"), &active).expect("write");
    let tree_s = tree.display().to_string();

    let check = |ok: bool, out: &str, err: &str| {
        assert!(!ok, "an active key makes scan fail: {out}");
        assert!(err.contains("1 of 3 keys found still work"), "{err}");
        assert!(
            out.contains(".env:2: kg_sk_") && out.contains(" active"),
            "{out}"
        );
        assert!(
            out.contains("app.js:1: kg_sk_") && out.contains(" revoked"),
            "{out}"
        );
        assert!(
            out.contains("app.js:3: kg_pk_") && out.contains(" unknown"),
            "{out}"
        );
        assert!(!out.contains("node_modules"), "{out}");
        for k in [&active, &revoked, &unknown] {
            assert!(
                !out.contains(k.as_str()) && !err.contains(k.as_str()),
                "a key was printed"
            );
        }
    };
    // Through a running node's verify API…
    let (ok, out, err) = cli(Some(&url), &root, &db, &["scan", &tree_s]);
    check(ok, &out, &err);
    assert!(out.contains("key_"), "{out}");
    drop(server);
    // … and offline, in the database.
    let (ok, out, err) = cli(None, &root, &db, &["scan", &tree_s]);
    check(ok, &out, &err);
    // Nothing that works: exit 0.
    std::fs::remove_file(tree.join(".env")).expect("rm");
    let (ok, _, err) = cli(None, &root, &db, &["scan", &tree_s]);
    assert!(ok && err.contains("none of them works"), "{err}");
}

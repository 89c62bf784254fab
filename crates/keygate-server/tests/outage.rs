//! PostgreSQL going away under a running node: a private PostgreSQL (initdb into a temp dir,
//! run as the `postgres` user) is stopped and started again; the shared one is never touched.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{error_code, TestApp};

struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl PrivatePg {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are required")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb not found");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let data = dir.path().join("data");
        run_as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        let pg = PrivatePg { dir, port, bin };
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        run_as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    fn stop(&self) {
        run_as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

fn run_as_postgres(bin: &Path, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("runuser (run the tests as root, as CI does)");
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_keys_keep_working_while_postgresql_is_down_and_writes_wait() {
    let pg = tokio::task::spawn_blocking(PrivatePg::start)
        .await
        .expect("task");
    let app = TestApp::spawn_on(pg.url(), |c| {
        c.cache.unsynced_ttl_seconds = 1;
        c.cache.max_stale_seconds = 60;
        c.database.acquire_timeout_seconds = 1;
    })
    .await;
    let (key, _) = app
        .create_key(json!({"kind": "sk", "name": "known", "scopes": ["ocr:read"]}))
        .await;
    assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
    let before = app.key_count().await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .expect("task");

    // Writes fail cleanly with the JSON 503 …
    let r = app
        .post("/v1/keys", json!({"kind": "sk", "name": "during-outage"}))
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    // … an unknown key cannot be judged …
    let fake = keygate_core::KeyFormat::default().generate(keygate_core::Kind::Sk, |b| b.fill(9));
    let r = app.auth(Some(&fake), &[]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    // … but the known key keeps verifying from the cache, also past the unsynced TTL.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _pg = tokio::task::spawn_blocking(move || {
        pg.pg_ctl_start();
        pg
    })
    .await
    .expect("task");
    // Back: writes work again, nothing of the failed write was kept.
    support::eventually(|| async {
        app.post("/v1/keys", json!({"kind": "sk", "name": "after"}))
            .await
            .status()
            == StatusCode::CREATED
    })
    .await;
    let listed: Value = app
        .get("/v1/keys?limit=500")
        .await
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert!(!names.contains(&"during-outage"));
    assert_eq!(app.key_count().await, before + 1);
    assert_eq!(app.auth(Some(&key), &[]).await.status(), StatusCode::OK);
}

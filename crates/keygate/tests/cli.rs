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
    let mut child = Command::new(BIN)
        .arg("serve")
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

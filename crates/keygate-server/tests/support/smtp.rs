//! A real SMTP server for the email tests: Python's `aiosmtpd` on a free port, keeping each
//! message it receives as JSON (recipients, subject, the decoded text) in a directory that the
//! test reads. keygate talks to it over SMTP through lettre, as it would to any mail server.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = r#"
import asyncio, json, os, sys
from email import message_from_bytes, policy
from aiosmtpd.smtp import SMTP

out = sys.argv[1]
count = 0

class Keep:
    async def handle_DATA(self, server, session, envelope):
        global count
        msg = message_from_bytes(envelope.content, policy=policy.default)
        body = msg.get_body(preferencelist=("plain",))
        count += 1
        doc = {"to": envelope.rcpt_tos, "from": envelope.mail_from, "subject": str(msg["subject"]),
               "text": body.get_content() if body is not None else ""}
        tmp = os.path.join(out, f"{count:06}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.rename(tmp, os.path.join(out, f"{count:06}.json"))
        return "250 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Keep()), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// A running SMTP server; killed on drop.
pub struct Smtp {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Smtp {
    /// Starts it. Needs `python3` with `aiosmtpd` (`scripts/deps.sh` installs it).
    pub async fn start() -> Smtp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is needed for the SMTP server");
        let stdout = child.stdout.take().expect("stdout");
        let port = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read port");
            line.trim().parse::<u16>().unwrap_or_else(|_| {
                panic!("the SMTP server did not start (is aiosmtpd installed? bash scripts/deps.sh): {line:?}")
            })
        })
        .await
        .expect("join");
        Smtp { child, port, dir }
    }

    /// The directory holding each message as JSON (what a browser driver reads).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `[smtp] url` for keygate.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json"))
            .collect()
    }

    /// The messages to `to`.
    pub fn to(&self, to: &str) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|m| {
                m["to"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|t| t == to))
            })
            .collect()
    }

    /// Waits (at most 10 s) for the `n`-th message to `to` (1-based) and returns it.
    pub async fn nth_to(&self, to: &str, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.to(to).into_iter().nth(n - 1) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no message {n} to {to} within 10 s; received: {:?}",
                self.messages()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The first link in a message's text that contains `part`, as the path and query on the
/// server (the host is keygate's issuer, which tests do not serve under that name).
pub fn link_in(message: &Value, part: &str) -> String {
    let text = message["text"].as_str().expect("text");
    let url = text
        .split_whitespace()
        .find(|w| w.contains(part))
        .unwrap_or_else(|| panic!("no link with {part} in {text}"));
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    path.to_owned()
}

/// The `token` of a link.
pub fn token_of(link: &str) -> String {
    link.split_once("token=")
        .map(|(_, t)| t.split('&').next().unwrap_or_default().to_owned())
        .expect("a token in the link")
}

//! A real WSGI upstream (Python's `wsgiref`, the reference server of PEP 3333) for the findings
//! that depend on how such an upstream reads a request: it percent-decodes the path into
//! `PATH_INFO`, and reads header names with `_` and `-` alike (`X_Keygate_User` and
//! `X-Keygate-User` are both `HTTP_X_KEYGATE_USER`). It answers with what it read, as JSON.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass

def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    seen["PATH_INFO"] = environ.get("PATH_INFO", "")
    seen["REQUEST_METHOD"] = environ.get("REQUEST_METHOD", "")
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

/// A running WSGI upstream; killed on drop.
pub struct Wsgi {
    child: Child,
    pub port: u16,
}

impl Wsgi {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Wsgi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the WSGI app on a free port. Needs `python3` (its standard library only).
pub async fn spawn() -> Wsgi {
    let mut child = Command::new("python3")
        .args(["-c", APP])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is needed for the WSGI upstream");
    let stdout = child.stdout.take().expect("stdout");
    let port = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read port");
        line.trim().parse::<u16>().expect("port")
    })
    .await
    .expect("join");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the WSGI upstream did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Wsgi { child, port }
}

//! Forward-auth answers held back until their audit line is written, without polling their
//! connection a second time.
//!
//! Group commit (see [`keygate_audit::AuditLog::append`]) makes an answer wait for the
//! `pwrite(2)` of its round's lines. Waiting inside the handler (the task requeues itself,
//! then flushes) held each request's allocations across the round and polled every connection
//! twice, and it measured slower than holding the answer here (`bench/audit-ab.sh`, both
//! loaded at once on one core; the figures are in CHANGELOG.md). Here the handler answers at once,
//! and the connection's writer ([`Io`]) keeps the bytes hyper writes while the line's group is
//! not written. One flusher task per group runs behind the requests that were ready with it,
//! writes the group, and then sends every answer it held itself. So an answer still never
//! reaches the socket before its line is in the segment.
//!
//! A connection holds at most one answer at a time: a request pipelined behind a held
//! answer first waits until that answer is released ([`settle`]), so one group's outcome
//! decides what the held bytes become. If a group's write fails, its held answer is replaced
//! by `503 UNAVAILABLE` with `connection: close` (fail closed: the decision is never told;
//! bytes of earlier answers already released still go out first), the connection ends, and
//! what an allowed request was charged goes back; a request pipelined behind it is answered
//! `503` before anything of it happens.
//!
//! Only `GET /v1/auth` answers are held (the handler passes its connection to
//! `Engine::settle`, which calls [`Conn::hold`]): a gateway request must not reach its
//! upstream before its line is written, so it waits in the handler as before.

use keygate_audit::AuditLog;
use keygate_engine::engine::{Allowed, Hold, Holder};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bytes one connection may hold; past this its group is written at once (a client that
/// pipelines many requests).
const HOLD_MAX: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What is done with an allowed request whose line could not be written (gives its charge
/// back).
pub type OnRefused = Box<dyn Fn(Allowed) + Send + Sync>;

/// The held answers of a server's connections and the groups they wait for.
pub struct Holds {
    log: Arc<AuditLog>,
    on_refused: OnRefused,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    entries: Vec<Entry>,
    /// Groups up to this one are written (or failed) and their answers released.
    released: u64,
    /// The newest group a flusher was started for.
    scheduled: u64,
}

struct Entry {
    conn: Arc<Conn>,
    group: u64,
    refund: Option<Allowed>,
}

/// One connection's writing side, shared by its [`Io`] and the flushers.
pub struct Conn {
    write: OwnedWriteHalf,
    holds: Arc<Holds>,
    /// Set while `state` holds bytes or waits for a group: the common path checks this and
    /// takes no lock.
    attention: AtomicBool,
    state: Mutex<Held>,
    /// Told whenever the held answer is released (see [`settle`]).
    settled: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    /// The group the held answer waits for (0: none).
    group: u64,
    /// Bytes written by hyper, not sent yet.
    bytes: Vec<u8>,
    /// How many leading bytes of `bytes` belong to answers already released (still sent if
    /// the held answer is refused).
    released: usize,
    /// The connection's task, to wake when a flusher could not send everything.
    waker: Option<Waker>,
    /// The held answers were refused: after `bytes` (the 503), the connection ends.
    close: bool,
}

/// A connection's I/O for hyper (through `hyper_util::rt::TokioIo`).
pub struct Io {
    read: OwnedReadHalf,
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io").finish_non_exhaustive()
    }
}

impl Holds {
    /// Holds for connections of a server that writes to `log`.
    pub fn new(log: Arc<AuditLog>, on_refused: OnRefused) -> Arc<Self> {
        Arc::new(Self {
            log,
            on_refused,
            waiting: Mutex::new(Waiting::default()),
        })
    }

    /// Splits an accepted connection into the I/O for hyper and the writer that answers are
    /// held in (see [`Conn::hold`]).
    pub fn accept(self: &Arc<Self>, stream: TcpStream) -> (Io, Arc<Conn>) {
        let (read, write) = stream.into_split();
        let conn = Arc::new(Conn {
            write,
            holds: Arc::clone(self),
            attention: AtomicBool::new(false),
            state: Mutex::new(Held::default()),
            settled: tokio::sync::Notify::new(),
        });
        (
            Io {
                read,
                conn: Arc::clone(&conn),
            },
            conn,
        )
    }
}

/// Writes `group` once the requests ready with it have added their lines, then sends (or,
/// if the write failed, refuses) every answer held for it or an earlier group.
async fn flush_later(holds: Arc<Holds>, group: u64) {
    keygate_engine::audit::requeue().await;
    if let Err(e) = holds.log.flush(group) {
        tracing::error!("audit log write failed, refusing the requests of its group: {e}");
    }
    let entries: Vec<Entry> = {
        let mut w = lock(&holds.waiting);
        w.released = w.released.max(group);
        w.entries.extract_if(.., |e| e.group <= group).collect()
    };
    let mut last: Option<(u64, bool)> = None;
    for e in entries {
        let ok = match last {
            Some((g, ok)) if g == e.group => ok,
            _ => {
                let ok = holds.log.flush(e.group).is_ok();
                last = Some((e.group, ok));
                ok
            }
        };
        e.conn.release(e.group, ok);
        if let (false, Some(a)) = (ok, e.refund) {
            (holds.on_refused)(a);
        }
    }
}

/// An earlier answer on this connection was refused: the connection is ending.
#[derive(Debug)]
pub struct Refused;

impl Conn {
    /// Holds this connection's next answer until `group` is written. `refund` is what goes
    /// back if the group's write fails.
    pub fn hold(self: &Arc<Self>, group: u64, refund: impl FnOnce() -> Option<Allowed>) -> Hold {
        let (holds, conn) = (&self.holds, self);
        let start = {
            let mut w = lock(&holds.waiting);
            if group <= w.released {
                return Hold::Written;
            }
            {
                let mut s = lock(&conn.state);
                if s.group != 0 || s.close {
                    // Not settled (see `settle`): the caller waits for its group itself.
                    return Hold::NotHere;
                }
                s.group = group;
                conn.attention.store(true, Ordering::Release);
            }
            w.entries.push(Entry {
                conn: Arc::clone(conn),
                group,
                refund: refund(),
            });
            let start = w.scheduled < group;
            w.scheduled = w.scheduled.max(group);
            start
        };
        if start {
            tokio::spawn(flush_later(Arc::clone(holds), group));
        }
        Hold::Held
    }

    /// Whether a request on this connection must [`settle`] before it is dispatched.
    pub fn unsettled(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }
}

/// A connection as the engine sees it: somewhere an answer can be held
/// (`Engine::settle`).
#[derive(Debug, Clone, Copy)]
pub struct OnConn<'a>(pub &'a Arc<Conn>);

impl Holder for OnConn<'_> {
    fn hold(&self, group: u64, refund: &dyn Fn() -> Option<Allowed>) -> Hold {
        self.0.hold(group, refund)
    }
}

/// Waits until `conn` holds no answer, so that a request pipelined behind a held answer is
/// dispatched only once that answer is released (a connection holds one answer at a time,
/// and nothing of the next request happens, charged or not, before the answer's fate is
/// known); `Err` if that answer was refused: the request is not dispatched, and the
/// connection ends.
pub async fn settle(conn: &Conn) -> Result<(), Refused> {
    loop {
        let notified = conn.settled.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let s = lock(&conn.state);
            if s.close {
                return Err(Refused);
            }
            if s.group == 0 {
                return Ok(());
            }
        }
        notified.await;
    }
}

/// The answer to a request pipelined behind a refused one (see [`settle`]).
pub fn refused() -> axum::response::Response {
    let mut res = axum::response::IntoResponse::into_response(crate::error::ApiError::decision(
        keygate_core::Code::Unavailable,
        None,
    ));
    res.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    res
}

impl Held {
    /// The held answer's group is written (`ok`) or failed: the bytes are all to be sent, or
    /// the held answer becomes the refusal (after what was released before it).
    fn settle(&mut self, ok: bool) {
        self.group = 0;
        if !ok {
            let released = self.released;
            self.bytes.truncate(released);
            self.bytes.extend_from_slice(&refusal());
            self.close = true;
        }
        self.released = self.bytes.len();
    }

    /// `n` bytes went out.
    fn sent(&mut self, n: usize) {
        self.bytes.drain(..n);
        self.released = self.released.saturating_sub(n);
    }
}

impl Conn {
    /// `group` is written (`ok`) or failed: sends the answer held for it, or the refusal.
    fn release(&self, group: u64, ok: bool) {
        let mut s = lock(&self.state);
        // Released already (written early by this connection itself).
        if s.group != group {
            return;
        }
        s.settle(ok);
        while !s.bytes.is_empty() {
            match self.write.try_write(&s.bytes) {
                Ok(n) => s.sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The peer is gone; hyper finds out on its next read.
                    s.bytes.clear();
                    s.released = 0;
                    s.close = true;
                }
            }
        }
        if s.bytes.is_empty() && !s.close {
            self.attention.store(false, Ordering::Release);
        } else if let Some(w) = s.waker.take() {
            // The connection's task sends the rest (or ends the connection).
            w.wake();
        }
        drop(s);
        self.settled.notify_waiters();
    }

    /// Sends what `s` holds; then, if the answers were refused, `Err`.
    fn poll_drain(&self, s: &mut Held, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !s.bytes.is_empty() {
            ready!(self.write.as_ref().poll_write_ready(cx))?;
            match self.write.try_write(&s.bytes) {
                Ok(n) => s.sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    s.bytes.clear();
                    s.released = 0;
                    s.close = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        if s.close {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.attention.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }

    /// Writes the group `s` waits for now, instead of waiting for its flusher (whose release
    /// then finds nothing to do; its refund still happens).
    fn write_group_now(&self, s: &mut Held) {
        if s.group != 0 {
            let ok = self.holds.log.flush(s.group).is_ok();
            s.settle(ok);
            self.settled.notify_waiters();
        }
    }

    /// Holds `bufs` if an answer is held; else sends what is held first. `Ready(Some(n))`:
    /// held.
    fn poll_hold(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<Option<usize>>> {
        let mut s = lock(&self.state);
        if s.group != 0 && !s.close {
            let n: usize = bufs.iter().map(|b| b.len()).sum();
            if s.bytes.len() + n <= HOLD_MAX {
                for b in bufs {
                    s.bytes.extend_from_slice(b);
                }
                return Poll::Ready(Ok(Some(n)));
            }
            self.write_group_now(&mut s);
        }
        ready!(self.poll_drain(&mut s, cx))?;
        Poll::Ready(Ok(None))
    }

    fn poll_write_now(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.write.as_ref().poll_write_ready(cx))?;
            match self.write.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

/// The answer that replaces held ones whose line could not be written.
fn refusal() -> Vec<u8> {
    crate::error::ApiError::decision(keygate_core::Code::Unavailable, None).to_http1_closing()
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.attention.load(Ordering::Acquire) {
            let mut s = lock(&this.conn.state);
            if s.group != 0 {
                // Waiting for the next request while the last answer is held: the flusher
                // wakes this task if it cannot send all of it.
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
            } else if ready!(this.conn.poll_drain(&mut s, cx)).is_err() {
                // Refused (or the peer is gone): the connection ends here.
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let conn = &self.conn;
        if conn.attention.load(Ordering::Acquire) {
            if let Some(n) = ready!(conn.poll_hold(cx, &[io::IoSlice::new(buf)]))? {
                return Poll::Ready(Ok(n));
            }
        }
        conn.poll_write_now(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let conn = &self.conn;
        if conn.attention.load(Ordering::Acquire) {
            if let Some(n) = ready!(conn.poll_hold(cx, bufs))? {
                return Poll::Ready(Ok(n));
            }
        }
        loop {
            ready!(conn.write.as_ref().poll_write_ready(cx))?;
            match conn.write.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &self.conn;
        if conn.attention.load(Ordering::Acquire) {
            let mut s = lock(&conn.state);
            // Held bytes are the flusher's to send. After a refusal a flush is not an error:
            // a request hyper has read already is then answered by `refused` (see `settle`),
            // and the next read or write ends the connection.
            if s.group == 0 {
                // `Err` only once the connection is ending (refused, or the peer gone).
                let _ending = ready!(conn.poll_drain(&mut s, cx));
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &self.conn;
        if conn.attention.load(Ordering::Acquire) {
            let mut s = lock(&conn.state);
            conn.write_group_now(&mut s);
            ready!(conn.poll_drain(&mut s, cx))?;
        }
        // The write half shuts down when the last reference to it goes (the flushers may
        // hold one for a moment).
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An audit log in a temporary folder (living as long as the first value), and a
    /// connected pair: the client's end, and the server's end split for holding.
    async fn held_pair() -> (tempfile::TempDir, Arc<AuditLog>, TcpStream, Io, Arc<Conn>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = keygate_store::SqlStore::sqlite(&format!(
            "sqlite://{}",
            dir.path().join("t.db").display()
        ))
        .await
        .expect("sqlite");
        keygate_store::Store::migrate(&store)
            .await
            .expect("migrate");
        let log = AuditLog::open(
            &dir.path().join("audit"),
            "n1",
            &keygate_engine::audit::StoreSink(&store),
            1 << 20,
        )
        .await
        .expect("open");
        let log = Arc::new(log);
        let holds = Holds::new(Arc::clone(&log), Box::new(|_| {}));
        let (client, io, conn) = pair(&holds).await;
        (dir, log, client, io, conn)
    }

    /// A connected pair: the client's end, and the server's end split for holding.
    async fn pair(holds: &Arc<Holds>) -> (TcpStream, Io, Arc<Conn>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (io, conn) = holds.accept(server);
        (client, io, conn)
    }

    /// Everything the server sends until it ends the connection (within a deadline), as text.
    async fn until_closed(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the connection ends")
            .expect("read");
        String::from_utf8(got).expect("utf-8")
    }

    fn line() -> keygate_engine::audit::Line<'static> {
        keygate_engine::audit::Line {
            actor: "key_1",
            action: "request.decided",
            code: Some("VALID"),
            ..keygate_engine::audit::Line::default()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_leaves_only_after_its_line_is_written() {
        let (_dir, log, mut client, mut io, conn) = held_pair().await;
        let group = log.append(line()).expect("append");
        let held = conn.hold(group, || None);
        assert_eq!(held, Hold::Held);
        // hyper's write of the answer returns at once: the bytes are held.
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .expect("write");
        io.flush().await.expect("flush");
        assert_eq!(log.position().1, 0, "the group is not written yet");
        let mut buf = [0u8; 64];
        assert_eq!(
            client.try_read(&mut buf).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "nothing reached the socket before the line"
        );
        // The flusher runs once this task lets it: the line, then the answer.
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the answer arrives")
            .expect("read");
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(log.position().1 > 0, "the line was written");
        // A group written already is not held: the next write goes straight out.
        assert_eq!(conn.hold(group, || None), Hold::Written);
        io.write_all(b"next").await.expect("write");
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the answer arrives")
            .expect("read");
        assert_eq!(&buf[..n], b"next");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_of_a_failed_group_becomes_a_refusal_and_the_connection_ends() {
        let (_dir, log, mut client, mut io, conn) = held_pair().await;
        // An answer held; a second one on the same connection is not held (one at a time:
        // its request waits for the first to be released).
        let group = log.append(line()).expect("append");
        assert_eq!(conn.hold(group, || None), Hold::Held);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("write");
        let second = log.append(line()).expect("append");
        assert_eq!(conn.hold(second, || None), Hold::NotHere);
        drop(conn);
        log.fail_next_write();
        // hyper waits for the next request: the connection ends after the refusal.
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            io.read(&mut buf).await
        });
        let got = until_closed(&mut client).await;
        assert!(
            got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{got}"
        );
        assert_eq!(got.matches("HTTP/1.1").count(), 1, "one answer: {got}");
        assert!(!got.contains("200 OK"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(got.contains("x-keygate-code: UNAVAILABLE\r\n"), "{got}");
        let body = &got[got.find("\r\n\r\n").expect("head") + 4..];
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(v["error"]["code"], "UNAVAILABLE");
        assert!(v["error"]["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("req_")));
        let read = server.await.expect("join").expect("read");
        assert_eq!(read, 0, "hyper sees the end of the connection");
        assert_eq!(
            log.position().1,
            0,
            "no line of the failed group is in the segment"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_forward_auth_answer_gives_its_credits_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::Config {
            listen: "127.0.0.1:0".into(),
            database_url: format!("sqlite://{}", dir.path().join("k.db").display()),
            ..crate::Config::default()
        };
        config.audit.dir = Some(dir.path().join("audit").display().to_string());
        let app = crate::Application::build(config).await.expect("app");
        let base = format!("http://{}", app.local_addr().expect("addr"));
        let root = app.root_key().expect("root key").to_owned();
        let state = app.state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();
        let created: serde_json::Value = http
            .post(format!("{base}/v1/keys"))
            .bearer_auth(&root)
            .json(&serde_json::json!({"kind": "sk", "name": "k", "budget": 10}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("json");
        let (id, key) = (
            created["id"].as_str().expect("id").to_owned(),
            created["key"].as_str().expect("key").to_owned(),
        );
        let auth = || http.get(format!("{base}/v1/auth")).bearer_auth(&key).send();
        assert_eq!(auth().await.expect("auth").status(), 200);
        let spent = || async {
            let v: serde_json::Value = http
                .get(format!("{base}/v1/keys/{id}"))
                .bearer_auth(&root)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            v["budget"]["spent"].as_u64().expect("spent")
        };
        assert_eq!(spent().await, 1);
        state.audit.as_ref().expect("audit on").fail_next_write();
        let r = auth().await.expect("auth");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["connection"], "close");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "UNAVAILABLE");
        // Refunds run on their own task: wait for `spent` to come back, with a deadline.
        let spent_back_to = |n: u64| {
            let spent = &spent;
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let now = spent().await;
                    if now == n {
                        return;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the charge never came back: spent {now}, not {n}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        spent_back_to(1).await;
        // The next answer is given, and charged.
        assert_eq!(auth().await.expect("auth").status(), 200);
        assert_eq!(spent().await, 2);
        // Two requests pipelined on one connection, the first one's group failing: one
        // refusal, then the end of the connection; the second is refused before it is
        // decided, and the first one's charge goes back.
        state.audit.as_ref().expect("audit on").fail_next_write();
        let addr = base.trim_start_matches("http://");
        let mut raw = TcpStream::connect(addr).await.expect("connect");
        let one =
            format!("GET /v1/auth HTTP/1.1\r\nhost: kg\r\nauthorization: Bearer {key}\r\n\r\n");
        raw.write_all(format!("{one}{one}").as_bytes())
            .await
            .expect("write");
        let got = until_closed(&mut raw).await;
        assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
        assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "one answer: {got}");
        spent_back_to(2).await;
        assert_eq!(auth().await.expect("auth").status(), 200);
        assert_eq!(spent().await, 3);
        // The server drains its queues once the last handle on its state is gone.
        drop(state);
        let _ = stop.send(());
        server.await.expect("join").expect("served");
    }
}

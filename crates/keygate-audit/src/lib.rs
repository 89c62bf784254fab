//! keygate's audit log on one node: the line format, the segment log with group commit, and
//! the shipper that hands the lines to a [`Sink`] (the store).
//!
//! It must never let an answer leave before its line is written (callers wait on
//! [`AuditLog::commit`] or hold the answer until [`AuditLog::flush`]), never hash or allocate
//! ids on the hot path, and never depend on HTTP: the server and the store plug in from above
//! (`keygate-server` adapts its `Store` to [`Sink`]).
//!
//! Every decision and every change becomes one line of JSON appended to a local segment file
//! (`<audit.dir>/<n>.jsonl`) **before** the answer leaves: a `pwrite(2)` into the page cache,
//! which survives `kill -9` of the process (not a power cut: the segment is not fsynced per
//! event). Lines are written into zeros that the writer puts ahead of them in bulk, so that a
//! group's write only copies into pages the file already has; readers skip zeros. (After a
//! power cut, where an appended file could only lose its end, pages in the middle may be
//! lost too: the lines after them still ship, and `verify` reports the gap as missing
//! events.) A shipper task reads the segments behind the writer and hands the lines, as
//! written, to the store in batches; the store chains them by hash (per node: `seq` 1, 2, 3,
//! …, each `hash` over the previous one and the line's bytes) and stores them in one
//! transaction with the node's chain head and the per-minute usage roll-up. The shipper reads
//! only the fields it needs from each line (borrowed, not copied), and hands the alert rules
//! a summary of the batch instead of the events. A segment is deleted once every line of it is in the store. On start the shipper
//! begins with whatever segments are left, skipping events at or below the stored head, so a
//! crash between the store's commit and the segment's deletion ships nothing twice.
//!
//! Hashing and ids are the shipper's and the store's work, not the hot path's: a decision
//! only formats one line into a reused buffer and writes it.

#![forbid(unsafe_code)]

use keygate_core::audit::LineHead;
pub use keygate_core::audit::RawEvent;
use keygate_core::AuditEvent;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a line carries: an [`AuditEvent`] without `id`, `prev_hash` and `hash` (the shipper
/// adds them). Borrowed, so recording an event allocates nothing.
#[derive(Debug, Default, Serialize)]
pub struct Line<'a> {
    /// The node (so a renamed node still ships its old lines under their old name).
    pub node: &'a str,
    /// Filled in by [`AuditLog::record`].
    pub seq: i64,
    /// Unix ms.
    pub at_ms: i64,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<&'a str>,
    /// Key id, user id or `system`.
    pub actor: &'a str,
    /// `request.decided`, `key.created`, …
    pub action: &'a str,
    /// Key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<&'a str>,
    /// User.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
    /// Key kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'a str>,
    /// Decision code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'a str>,
    /// HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    /// Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// Path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// Scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'a str>,
    /// Client IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Origin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<&'a str>,
    /// Credits drawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    /// Decision time, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<i64>,
    /// `X-Request-Id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// Details of a change (JSON text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

impl Line<'_> {
    /// Writes the line as `serde_json::to_writer` would, byte for byte (a test holds them
    /// equal), without its per-field machinery: keys are written as they are, numbers by
    /// `itoa`, and a string only goes through `serde_json`'s escaping if it has a byte that
    /// needs one. Formatting the line was a large share of what the audit log cost a decision.
    fn write_json(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        fn text(out: &mut Vec<u8>, key: &str, v: &str) -> std::io::Result<()> {
            out.extend_from_slice(key.as_bytes());
            if keygate_core::audit::json_special(v.as_bytes()).is_some() {
                serde_json::to_writer(&mut *out, v)?;
            } else {
                out.push(b'"');
                out.extend_from_slice(v.as_bytes());
                out.push(b'"');
            }
            Ok(())
        }
        fn number(out: &mut Vec<u8>, key: &str, v: i64) {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        /// An optional field's value.
        enum V<'a> {
            Text(Option<&'a str>),
            Num(Option<i64>),
            Ip(Option<IpAddr>),
        }
        text(out, "{\"node\":", self.node)?;
        number(out, ",\"seq\":", self.seq);
        number(out, ",\"at_ms\":", self.at_ms);
        if let Some(v) = self.tenant_id {
            text(out, ",\"tenant_id\":", v)?;
        }
        text(out, ",\"actor\":", self.actor)?;
        text(out, ",\"action\":", self.action)?;
        // The rest in declaration order, each left out when `None` (as `skip_serializing_if`).
        let rest = [
            (",\"key_id\":", V::Text(self.key_id)),
            (",\"user_id\":", V::Text(self.user_id)),
            (",\"kind\":", V::Text(self.kind)),
            (",\"code\":", V::Text(self.code)),
            (",\"status\":", V::Num(self.status)),
            (",\"method\":", V::Text(self.method)),
            (",\"path\":", V::Text(self.path)),
            (",\"scope\":", V::Text(self.scope)),
            (",\"ip\":", V::Ip(self.ip)),
            (",\"origin\":", V::Text(self.origin)),
            (",\"credits\":", V::Num(self.credits)),
            (",\"latency_us\":", V::Num(self.latency_us)),
            (",\"request_id\":", V::Text(self.request_id)),
            (",\"detail\":", V::Text(self.detail)),
        ];
        for (key, v) in rest {
            match v {
                V::Text(Some(v)) => text(out, key, v)?,
                V::Num(Some(v)) => number(out, key, v),
                V::Ip(Some(IpAddr::V4(ip))) => {
                    // As `Display` writes it, without the formatting machinery.
                    out.extend_from_slice(key.as_bytes());
                    out.push(b'"');
                    for (i, octet) in ip.octets().into_iter().enumerate() {
                        if i > 0 {
                            out.push(b'.');
                        }
                        out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
                    }
                    out.push(b'"');
                }
                V::Ip(Some(ip)) => {
                    out.extend_from_slice(key.as_bytes());
                    write!(out, "\"{ip}\"")?;
                }
                V::Text(None) | V::Num(None) | V::Ip(None) => {}
            }
        }
        out.push(b'}');
        Ok(())
    }
}

struct Writer {
    file: File,
    segment: u64,
    /// Bytes written to the current segment.
    len: u64,
    /// Bytes the current segment holds, written lines and zeros ahead of them (see
    /// [`ZEROS_AHEAD`]).
    allocated: u64,
    /// `seq` of the last line appended.
    seq: i64,
    /// Lines appended and not written yet: one group, written by one `pwrite(2)`.
    pending: Vec<u8>,
    /// Number of the group being filled.
    group: u64,
    /// `seq` before the group's first line (a failed group gives its numbers back).
    group_start: i64,
    /// Recent groups whose write failed.
    failed: std::collections::VecDeque<u64>,
    /// Groups below this one may have failed without being remembered.
    forgotten_below: u64,
    /// Makes the next group write fail before anything is written (a full disk that a
    /// truncate can still recover from), for the tests (of this crate and its callers).
    fail_next: bool,
    /// Makes the next group write stop with an error after this many bytes (a disk that
    /// fills up midway), for the tests.
    #[cfg(test)]
    tear_next: Option<usize>,
}

/// The audit log of one node.
pub struct AuditLog {
    node: String,
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.jsonl"))
}

/// Lets the other tasks in the run queue run once, then this one: it wakes itself and
/// returns `Pending` once, which puts it at the back of the worker's queue. Unlike
/// `tokio::task::yield_now`, which waits until the I/O driver has been polled, this costs no
/// `epoll_wait` and lets no new connection's request in between, and it measured faster
/// than `yield_now` on the forward-auth load test (the figures are in CHANGELOG.md).
pub async fn requeue() {
    let mut done = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut done, true) {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Bytes of zeros written ahead of the segment's last line when it needs more room.
const ZEROS_AHEAD: u64 = 256 << 10;

/// A source of zeros for [`ZEROS_AHEAD`].
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Creates segment `n` for writing at explicit offsets (lines go into zeros written ahead,
/// see [`AuditLog::write_group`]).
fn open_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(segment_path(dir, n))
}

/// Writes `n` zeros at `at`, from the end backwards: if it fails midway while taking back a
/// group, what is left of the range is its front, whole lines first, as a torn append would
/// leave it (never whole lines behind zeros, whose numbers a reader would count while the
/// ones before are gone). Laying room ahead costs the same in either order (measured).
fn zero_range(file: &File, at: u64, n: usize) -> std::io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = ZEROS.len().min(left);
        left -= k;
        file.write_all_at(&ZEROS[..k], at + left as u64)?;
    }
    Ok(())
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Makes NUL characters U+FFFD in a line just written by `serde_json`, which escapes NUL as
/// `\u0000`: the escape of U+FFFD, `\ufffd`, has the same length, so it is swapped in place.
/// (PostgreSQL refuses NUL in text, and a stored event must read back as it was chained.) A
/// line without a backslash, the usual one, is only scanned once.
fn scrub_nul(line: &mut [u8]) {
    // `contains` is the standard library's word-at-a-time search; the loop below is not.
    if !line.contains(&b'\\') {
        return;
    }
    let mut from = 0;
    while let Some(at) = line[from..].iter().position(|b| *b == b'\\') {
        let at = from + at;
        // `at` starts an escape (an escaped backslash is skipped whole below).
        if line[at..].starts_with(b"\\u0000") {
            line[at..at + 6].copy_from_slice(b"\\ufffd");
        }
        from = at + 2;
        if from >= line.len() {
            break;
        }
    }
}

/// The lines in `bytes` up to its last newline, each with the fields the store needs, and
/// how many bytes that was. A line that does not parse (torn by a crash mid-write, which a
/// single small `write` makes unlikely) is logged and skipped.
fn read_lines(bytes: &[u8]) -> (Vec<RawEvent<'_>>, usize) {
    let Some(end) = memchr::memrchr(b'\n', bytes) else {
        return (Vec::new(), 0);
    };
    let mut out = Vec::with_capacity(end / 256);
    let mut from = 0;
    let lines = memchr::memchr_iter(b'\n', &bytes[..=end]).map(|at| {
        let line = &bytes[from..at];
        from = at + 1;
        line
    });
    for line in lines {
        // Zeros are the room written ahead of the lines (a line has no NUL byte: JSON
        // escapes it); after a crash of the machine, not only of the process, pages of zeros
        // may also stand between lines.
        let line = &line[line.iter().position(|b| *b != 0).unwrap_or(line.len())..];
        if line.is_empty() {
            continue;
        }
        // A line the scan reads has no escape, so none of its fields can hold a NUL.
        let read = LineHead::scan(line).map_or_else(
            || {
                serde_json::from_slice::<LineHead<'_>>(line).map(|mut head| {
                    scrub(&mut head);
                    head
                })
            },
            Ok,
        );
        match read {
            Ok(head) => out.push(RawEvent { line, head }),
            Err(e) => tracing::error!("skipping an unreadable audit line: {e}"),
        }
    }
    (out, end + 1)
}

/// NUL characters, which PostgreSQL's TEXT refuses (one would stop every batch after it),
/// become U+FFFD in the fields the store keeps in columns (node, usage and references). The
/// line itself, which is chained and stored as bytes, keeps them.
fn scrub(h: &mut LineHead<'_>) {
    fn fix(f: &mut Cow<'_, str>) {
        if f.contains('\0') {
            *f = Cow::Owned(f.replace('\0', "\u{fffd}"));
        }
    }
    fix(&mut h.node);
    fix(&mut h.action);
    for f in [&mut h.tenant_id, &mut h.key_id, &mut h.user_id, &mut h.code]
        .into_iter()
        .flatten()
    {
        fix(f);
    }
}

/// The node id: the configured one, else the one this audit directory was first started with
/// (so a node keeps its chain across restarts), else a new one, written down.
pub fn node_id(configured: Option<&str>, dir: &Path) -> std::io::Result<String> {
    if let Some(n) = configured {
        return Ok(n.to_owned());
    }
    std::fs::create_dir_all(dir)?;
    let file = dir.join("node_id");
    match std::fs::read_to_string(&file) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let mut failed = None;
            let random = keygate_core::base62::random_string(8, |b| {
                if let Err(e) = getrandom::fill(b) {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(std::io::Error::other(e));
            }
            let id = format!("node_{random}");
            std::fs::write(&file, &id)?;
            Ok(id)
        }
    }
}

impl AuditLog {
    /// Opens the log in `dir` for `node`: numbering continues after the last event of this node
    /// in the store or in segments not shipped yet; writing starts in a new segment.
    pub async fn open(
        dir: &Path,
        node: &str,
        store: &(impl Sink + ?Sized),
        segment_bytes: u64,
    ) -> Result<Self, String> {
        let io = |e: std::io::Error| format!("audit directory {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut seq = store
            .heads()
            .await
            .map_err(|e| format!("reading the audit head: {e}"))?
            .into_iter()
            .find(|h| h.0 == node)
            .map_or(0, |h| h.1);
        let existing = segments(dir).map_err(io)?;
        for n in &existing {
            let bytes = std::fs::read(segment_path(dir, *n)).map_err(io)?;
            let (events, _) = read_lines(&bytes);
            for e in events.iter().filter(|e| e.head.node == node) {
                seq = seq.max(e.head.seq);
            }
        }
        let segment = existing.last().map_or(1, |n| n + 1);
        let file = open_segment(dir, segment).map_err(io)?;
        Ok(Self {
            node: node.to_owned(),
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(4096),
            writer: Mutex::new(Writer {
                file,
                segment,
                len: 0,
                allocated: 0,
                seq,
                pending: Vec::with_capacity(64 << 10),
                group: 1,
                group_start: seq,
                failed: std::collections::VecDeque::new(),
                forgotten_below: 0,
                fail_next: false,
                #[cfg(test)]
                tear_next: None,
            }),
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Appends one event (numbering it) to the current segment and writes it. `Err` when the
    /// line could not be written: the caller must not acknowledge what it cannot account for.
    pub fn record<'a>(&'a self, line: Line<'a>) -> std::io::Result<()> {
        let group = self.append(line)?;
        self.flush(group)
    }

    /// Numbers the line and adds it to the pending group; returns the group, for
    /// [`flush`](Self::flush).
    ///
    /// Group commit: a request appends its line, lets the other ready requests append theirs,
    /// then flushes ([`commit`](Self::commit)); whichever comes back first writes the whole
    /// group with one `pwrite(2)`. Each line is still written before its answer leaves, and
    /// under load one system call serves many requests.
    pub fn append<'a>(&'a self, mut line: Line<'a>) -> std::io::Result<u64> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        line.node = &self.node;
        line.seq = w.seq + 1;
        let start = w.pending.len();
        if let Err(e) = line.write_json(&mut w.pending) {
            w.pending.truncate(start);
            return Err(e);
        }
        scrub_nul(&mut w.pending[start..]);
        w.pending.push(b'\n');
        w.seq += 1;
        Ok(w.group)
    }

    /// Lets the other tasks ready on this worker run once (each appends its line to the same
    /// group), then [`flush`](Self::flush)es `group`: the second half of group commit.
    pub async fn commit(&self, group: u64) -> std::io::Result<()> {
        requeue().await;
        self.flush(group)
    }

    /// Writes the pending group if `group` is not written yet; `Err` if `group`'s write failed.
    pub fn flush(&self, group: u64) -> std::io::Result<()> {
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *guard;
        // Groups before the one being filled are written (or failed).
        if group == w.group {
            let result = self.write_group(w);
            if let Err(e) = result {
                let g = w.group;
                w.failed.push_back(g);
                if w.failed.len() > 64 {
                    if let Some(f) = w.failed.pop_front() {
                        w.forgotten_below = f + 1;
                    }
                }
                // Nothing of the group stayed in the file (and the shipper reads only finished
                // groups): its numbers go back, so the chain has no gap. If the file could not
                // be cut back, its whole lines will ship: their numbers stay taken, the rest
                // go back (and if even reading it fails, all stay taken).
                w.seq = if w.len == u64::MAX {
                    match self.last_whole_seq(w.segment) {
                        Ok(last) => last.max(w.group_start),
                        Err(_) => w.seq,
                    }
                } else {
                    w.group_start
                };
                w.group_start = w.seq;
                w.pending.clear();
                w.group += 1;
                return Err(e);
            }
            w.pending.clear();
            w.group += 1;
            w.group_start = w.seq;
        }
        // A group older than the failures remembered is refused: fail closed.
        if group < w.forgotten_below || w.failed.contains(&group) {
            return Err(std::io::Error::other("the audit segment write failed"));
        }
        Ok(())
    }

    /// The `seq` of this node's last whole line in `segment` (0 if none).
    fn last_whole_seq(&self, segment: u64) -> std::io::Result<i64> {
        let bytes = std::fs::read(segment_path(&self.dir, segment))?;
        let (events, _) = read_lines(&bytes);
        Ok(events
            .iter()
            .filter(|e| e.head.node == self.node)
            .map(|e| e.head.seq)
            .max()
            .unwrap_or(0))
    }

    fn write_group(&self, w: &mut Writer) -> std::io::Result<()> {
        if w.len >= self.segment_bytes {
            let next = w.segment + 1;
            let file = open_segment(&self.dir, next)?;
            // The old segment loses its zeros (a reader skips them anyway, so a failure to
            // cut them off changes nothing).
            if w.len != u64::MAX {
                let _ = w.file.set_len(w.len);
            }
            (w.file, w.segment, w.len, w.allocated) = (file, next, 0, 0);
        }
        if std::mem::take(&mut w.fail_next) {
            return Err(std::io::Error::other("no space left (test)"));
        }
        #[cfg(test)]
        let tear = w.tear_next.take();
        #[cfg(not(test))]
        let tear: Option<usize> = None;
        let Writer {
            file,
            pending,
            len,
            allocated,
            ..
        } = w;
        let end = *len + pending.len() as u64;
        if end > *allocated {
            // Zeros ahead of the writer, in one write of at least [`ZEROS_AHEAD`]: the file
            // system allocates its blocks now, in bulk, so that a group's write only copies
            // into pages the file has. (Appending, every write grew the file: new blocks and an
            // inode update each time, which cost more than the copy.)
            let grow = (end - *allocated).max(ZEROS_AHEAD);
            zero_range(
                file,
                *allocated,
                usize::try_from(grow).unwrap_or(usize::MAX),
            )?;
            *allocated += grow;
        }
        let written = match tear {
            Some(n) => file
                .write_all_at(&pending[..n.min(pending.len())], *len)
                .and(Err(std::io::Error::other("no space left midway (test)"))),
            None => file.write_all_at(pending, *len),
        };
        if let Err(e) = written {
            // Take back whatever part of the group went out, so that no line of it is read
            // (the next group overwrites the rest); if even that fails, the next group opens
            // a new segment.
            if zero_range(file, *len, pending.len()).is_err() {
                *len = u64::MAX;
            }
            return Err(e);
        }
        *len = end;
        Ok(())
    }

    /// Makes the next group write fail before anything is written (tests of the callers).
    #[doc(hidden)]
    pub fn fail_next_write(&self) {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail_next = true;
    }

    /// The segment being written and how many bytes of it hold whole, written groups.
    pub fn position(&self) -> (u64, u64) {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        (w.segment, w.len)
    }
}

/// Bytes read from a segment per batch (about 2,500 events): one transaction in the store.
/// Each statement is a round trip to the database's thread (for SQLite, two context
/// switches), so a batch per 64 KB spent a visible share of a loaded core in switching
/// alone. 4 MB batches took SQLite's thread less time but gained no measurable throughput
/// and made p99 worse: the store's work on a batch runs between requests in pieces that grow
/// with it.
const READ_BYTES: u64 = 1 << 20;

/// Bytes of a batch parsed at a time (about 170 lines): the
/// shipper yields to requests between them, so that is as long as a request waits behind it.
const PARSE_BYTES: usize = 64 << 10;

/// [`read_lines`] in pieces of about [`PARSE_BYTES`], letting other tasks run in between.
async fn read_lines_yielding(bytes: &[u8]) -> (Vec<RawEvent<'_>>, usize) {
    let mut out = Vec::new();
    let mut used = 0;
    while used < bytes.len() {
        let end = (used + PARSE_BYTES).min(bytes.len());
        // Whole lines: up to the last newline of the piece, or of the rest if it has none.
        let cut = match memchr::memrchr(b'\n', &bytes[used..end]) {
            Some(i) => used + i + 1,
            None => bytes.len(),
        };
        let (events, n) = read_lines(&bytes[used..cut]);
        out.extend(events);
        if n == 0 {
            break;
        }
        used += n;
        if used < bytes.len() {
            tokio::task::yield_now().await;
        }
    }
    (out, used)
}

/// Where the shipper is: a segment and an offset in it.
#[derive(Default)]
pub struct Shipper {
    segment: u64,
    offset: u64,
    /// Shown every batch's new events once they are in the store (the alert rules); it
    /// must not block.
    pub observer: Option<Observer>,
}

/// What sees each shipped batch's new events (see [`Shipper::observer`]).
pub type Observer = Box<dyn Fn(&[&RawEvent<'_>]) + Send + Sync>;

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper")
            .field("segment", &self.segment)
            .field("offset", &self.offset)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// Where shipped lines go: the store's audit tables. The store chains each node's lines by
/// hash after its head and keeps them as written.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Every node's chain head `(node, seq, hash)`.
    async fn heads(&self) -> Result<Vec<(String, i64, String)>, String>;
    /// Appends `events` in one transaction, skipping per node those at or below its head (a
    /// replay after a crash); returns each node's head `seq` from before.
    async fn append_lines(&self, events: &[RawEvent<'_>]) -> Result<BTreeMap<String, i64>, String>;
}

/// An event's id (see [`keygate_core::audit::event_id`]).
pub fn event_id(e: &AuditEvent) -> String {
    keygate_core::audit::event_id(e.at_ms, e.seq, &e.node)
}

impl Shipper {
    /// A shipper at the start of the oldest segment (it skips what the store has), showing
    /// each batch's new events to `observer`.
    pub fn new(observer: Option<Observer>) -> Self {
        Self {
            observer,
            ..Self::default()
        }
    }

    /// Ships what the segments hold beyond the last call, in batches of at most `batch` events,
    /// and deletes segments that are wholly in the store. Returns how many events it shipped.
    pub async fn ship(
        &mut self,
        log: &AuditLog,
        store: &(impl Sink + ?Sized),
    ) -> Result<usize, String> {
        let mut shipped = 0;
        let mut limit = READ_BYTES;
        loop {
            // Where the writer is *before* reading: a segment it had already left then can
            // gain no line after our read, so reading it to the end is all of it; of the
            // segment it is in, only the groups it has finished writing are read (a group
            // whose write fails is taken back and must not ship).
            let (writer_at, committed) = log.position();
            let dir = log.dir.clone();
            let all = blocking(move || segments(&dir)).await?;
            let Some(&seg) = all.iter().find(|n| **n >= self.segment) else {
                return Ok(shipped);
            };
            if seg != self.segment {
                (self.segment, self.offset) = (seg, 0);
            }
            let mut want = limit;
            if seg == writer_at {
                let ready = committed.saturating_sub(self.offset);
                if ready == 0 {
                    return Ok(shipped);
                }
                want = want.min(ready);
            }
            let path = segment_path(&log.dir, seg);
            let (p, offset) = (path.clone(), self.offset);
            let bytes = blocking(move || {
                let mut f = File::open(&p)?;
                let left = f.metadata()?.len().saturating_sub(offset);
                f.seek(SeekFrom::Start(offset))?;
                let mut bytes = Vec::with_capacity(usize::try_from(want.min(left)).unwrap_or(0));
                f.take(want).read_to_end(&mut bytes)?;
                Ok(bytes)
            })
            .await?;
            let (events, used) = read_lines_yielding(&bytes).await;
            if !events.is_empty() {
                let before = store.append_lines(&events).await?;
                // A replay (after a restart) reads lines the store had: they are not news.
                let fresh = events
                    .iter()
                    .filter(|e| before.get(&*e.head.node).is_none_or(|h| e.head.seq > *h));
                let fresh: Vec<&RawEvent<'_>> = fresh.collect();
                shipped += fresh.len();
                if let (Some(see), false) = (&self.observer, fresh.is_empty()) {
                    see(&fresh);
                }
            }
            self.offset += used as u64;
            if bytes.len() as u64 == limit && want == limit {
                // More in this segment than one read took. A single line longer than the read
                // doubles the read; otherwise let requests run in between, so shipping a
                // backlog does not stall them.
                if used == 0 {
                    limit = limit.saturating_mul(2);
                } else {
                    limit = READ_BYTES;
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if seg < writer_at {
                let torn = bytes[used..].iter().filter(|b| **b != 0).count();
                if torn > 0 {
                    // A line torn by a crash mid-write (it was never acknowledged). The zeros
                    // after the last line are only room written ahead.
                    tracing::error!(
                        "dropping {torn} bytes of a torn line at the end of audit segment {seg}"
                    );
                }
                let p = path.clone();
                blocking(move || std::fs::remove_file(&p)).await?;
                (self.segment, self.offset) = (seg + 1, 0);
                continue;
            }
            // Caught up with the writer.
            return Ok(shipped);
        }
    }
}

/// File work of the shipper, off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_store::{AuditFilter, PageRequest, SqlStore, Store};
    use std::sync::Arc;
    use std::time::Duration;

    /// The store as the sink, as `keygate-server` plugs it in.
    #[async_trait::async_trait]
    impl Sink for dyn Store {
        async fn heads(&self) -> Result<Vec<(String, i64, String)>, String> {
            self.audit_heads().await.map_err(|e| e.to_string())
        }
        async fn append_lines(
            &self,
            events: &[RawEvent<'_>],
        ) -> Result<BTreeMap<String, i64>, String> {
            self.append_audit_lines(events)
                .await
                .map_err(|e| e.to_string())
        }
    }

    async fn store(dir: &Path) -> Arc<dyn Store> {
        let s = SqlStore::sqlite(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .expect("sqlite");
        s.migrate().await.expect("migrate");
        Arc::new(s)
    }

    /// A fresh SQLite store and node `n1`'s audit log (1 MB segments) in a temporary folder,
    /// which lives as long as the first value.
    async fn opened() -> (tempfile::TempDir, Arc<dyn Store>, AuditLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let log = AuditLog::open(&dir.path().join("audit"), "n1", &*s, 1 << 20)
            .await
            .expect("open");
        (dir, s, log)
    }

    async fn stored(s: &dyn Store) -> Vec<AuditEvent> {
        s.list_audit(
            &AuditFilter::default(),
            &PageRequest {
                cursor: None,
                limit: 500,
            },
        )
        .await
        .expect("list")
    }

    /// Ships what the segments hold and lists the stored events as (seq, path), in order.
    async fn ship_and_list(log: &AuditLog, s: &dyn Store) -> Vec<(i64, String)> {
        Shipper::default().ship(log, s).await.expect("ship");
        let mut got: Vec<(i64, String)> = stored(s)
            .await
            .into_iter()
            .map(|e| (e.seq, e.path.unwrap_or_default()))
            .collect();
        got.sort();
        got
    }

    /// Node `n1`'s log in `adir` (1 MB segments) with `/a` and `/b` recorded.
    async fn log_of_a_and_b(adir: &Path, s: &dyn Store) -> AuditLog {
        let log = AuditLog::open(adir, "n1", s, 1 << 20).await.expect("open");
        log.record(line("/a")).expect("record");
        log.record(line("/b")).expect("record");
        log
    }

    async fn assert_chain_intact(s: &dyn Store) {
        let r = keygate_store::verify_audit(s).await.expect("verify");
        assert!(r.broken.is_none(), "{r:?}");
    }

    fn line<'a>(path: &'a str) -> Line<'a> {
        Line {
            at_ms: 1_800_000_000_000,
            actor: "key_a",
            action: "request.decided",
            path: Some(path),
            ..Line::default()
        }
    }

    #[tokio::test]
    async fn segments_rotate_ship_in_order_and_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let log = AuditLog::open(&dir.path().join("audit"), "n1", &*s, 4096)
            .await
            .expect("open");
        let mut shipper = Shipper::default();
        for i in 0..200 {
            let p = format!("/p/{i}");
            log.record(line(&p)).expect("record");
            if i % 37 == 0 {
                shipper.ship(&log, &*s).await.expect("ship");
            }
        }
        shipper.ship(&log, &*s).await.expect("ship");
        let evs = stored(&*s).await;
        assert_eq!(evs.len(), 200, "every event once");
        let mut seqs: Vec<i64> = evs.iter().map(|e| e.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let left = segments(&dir.path().join("audit")).expect("segments");
        assert_eq!(
            left.len(),
            1,
            "only the segment being written is kept: {left:?}"
        );
        let r = keygate_store::verify_audit(&*s).await.expect("verify");
        assert!(r.broken.is_none() && r.checked == 200, "{r:?}");
    }

    /// Lines go into zeros written ahead of them: a segment holds its lines, then zeros, and
    /// the reader skips zeros wherever they are (after a crash of the machine, pages of zeros
    /// may stand between written lines), so no line is lost to them.
    #[tokio::test]
    async fn zeros_ahead_of_and_between_lines_hide_no_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let adir = dir.path().join("audit");
        {
            let log = log_of_a_and_b(&adir, &*s).await;
            // A page of zeros (a page that was never written back), then the next line.
            let w = log.writer.lock().expect("lock");
            w.file.write_all_at(&[0; 4096], w.len).expect("hole");
            drop(w);
            log.writer.lock().expect("lock").len += 4096;
            log.record(line("/c")).expect("record");
        }
        let bytes = std::fs::read(segment_path(&adir, 1)).expect("segment");
        assert!(
            bytes.len() as u64 >= ZEROS_AHEAD && bytes.ends_with(&[0; 64]),
            "room is written ahead: {} bytes",
            bytes.len()
        );
        // The restarted node numbers on after the last line and ships all three once.
        let log = AuditLog::open(&adir, "n1", &*s, 1 << 20)
            .await
            .expect("reopen");
        log.record(line("/d")).expect("record");
        let got = ship_and_list(&log, &*s).await;
        let want: Vec<(i64, String)> = [(1, "/a"), (2, "/b"), (3, "/c"), (4, "/d")]
            .into_iter()
            .map(|(n, p)| (n, p.to_owned()))
            .collect();
        assert_eq!(got, want);
        assert!(!segment_path(&adir, 1).exists());
    }

    /// A segment that is full is cut back to its lines when writing moves on.
    #[tokio::test]
    async fn a_closed_segment_keeps_no_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let adir = dir.path().join("audit");
        let log = AuditLog::open(&adir, "n1", &*s, 4096).await.expect("open");
        let mut written = 0;
        while segments(&adir).expect("segments").len() < 2 {
            log.record(line("/a")).expect("record");
            written += 1;
        }
        let first = std::fs::read(segment_path(&adir, 1)).expect("segment");
        assert!(!first.contains(&0), "zeros left in a closed segment");
        assert_eq!(first.iter().filter(|b| **b == b'\n').count(), written - 1);
    }

    #[tokio::test]
    async fn a_torn_last_line_of_an_old_segment_is_dropped_and_the_rest_ships() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let adir = dir.path().join("audit");
        drop(log_of_a_and_b(&adir, &*s).await);
        // A crash in the middle of the third line's write, into the zeros after the lines.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(&adir, 1))
            .expect("segment");
        let end = std::fs::read(segment_path(&adir, 1))
            .expect("read")
            .iter()
            .position(|b| *b == 0)
            .expect("zeros after the lines");
        f.write_all_at(
            br#"{"node":"n1","seq":3,"at_ms":1800000000000,"act"#,
            end as u64,
        )
        .expect("torn");
        // The restarted node writes a new segment; the old one is shipped and removed.
        let log = AuditLog::open(&adir, "n1", &*s, 1 << 20)
            .await
            .expect("reopen");
        log.record(line("/c")).expect("record");
        let shipped =
            tokio::time::timeout(Duration::from_secs(5), Shipper::default().ship(&log, &*s))
                .await
                .expect("the shipper does not spin on a torn line")
                .expect("ship");
        assert_eq!(shipped, 3);
        let mut paths: Vec<String> = stored(&*s)
            .await
            .into_iter()
            .filter_map(|e| e.path)
            .collect();
        paths.sort();
        assert_eq!(paths, ["/a", "/b", "/c"]);
        assert!(!segment_path(&adir, 1).exists());
        assert_chain_intact(&*s).await;
    }
    proptest::proptest! {
        /// The line's own writer writes what `serde_json` writes, escapes and all.
        #[test]
        fn a_line_is_written_as_serde_json_writes_it(
            node in "\\PC{0,6}",
            texts in proptest::collection::vec(proptest::option::of("[a-z/\"\\\\\u{0}\u{1f}é😀]{0,10}"), 12),
            numbers in proptest::collection::vec(proptest::option::of(proptest::num::i64::ANY), 4),
            v6 in proptest::bool::ANY,
            ip in proptest::option::of(proptest::num::u128::ANY),
        ) {
            let t = |i: usize| texts[i].as_deref();
            let line = Line {
                node: &node,
                seq: numbers[0].unwrap_or(1),
                at_ms: numbers[1].unwrap_or(-1),
                tenant_id: t(0),
                actor: t(1).unwrap_or(""),
                action: t(2).unwrap_or("request.decided"),
                key_id: t(3),
                user_id: t(4),
                kind: t(5),
                code: t(6),
                status: numbers[2],
                method: t(7),
                path: t(8),
                scope: t(9),
                ip: ip.map(|n| if v6 {
                    IpAddr::V6(std::net::Ipv6Addr::from(n))
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::from(n as u32))
                }),
                origin: t(10),
                credits: numbers[3],
                latency_us: numbers[2].map(|n| n / 3),
                request_id: t(11),
                detail: t(0).map(|_| r#"{"a":"b\"c"}"#),
            };
            let mut ours = Vec::new();
            line.write_json(&mut ours).expect("write");
            proptest::prop_assert_eq!(
                String::from_utf8(ours).expect("utf8"),
                serde_json::to_string(&line).expect("serde")
            );
        }
    }

    /// Lines read again after a restart (the store has them) are neither stored twice nor
    /// shown to the alert rules again.
    #[tokio::test]
    async fn a_replayed_segment_is_not_news_to_the_alert_rules() {
        let (_dir, s, log) = opened().await;
        for _ in 0..3 {
            let mut l = line("/p");
            (l.key_id, l.tenant_id, l.code) = (Some("key_a"), Some("t1"), Some("VALID"));
            log.record(l).expect("record");
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(8);
        let observer = |tx: tokio::sync::mpsc::Sender<usize>| -> Option<Observer> {
            Some(Box::new(move |fresh| {
                let _ = tx.try_send(fresh.len());
            }))
        };
        let mut first = Shipper {
            observer: observer(tx.clone()),
            ..Shipper::default()
        };
        assert_eq!(first.ship(&log, &*s).await.expect("ship"), 3);
        assert_eq!(rx.try_recv().expect("a batch"), 3);
        // A shipper that starts over (as after a restart) reads the same segment again.
        let mut again = Shipper {
            observer: observer(tx),
            ..Shipper::default()
        };
        assert_eq!(again.ship(&log, &*s).await.expect("replay"), 0);
        assert!(
            rx.try_recv().is_err(),
            "the replay was sent to the alert rules"
        );
        assert_eq!(stored(&*s).await.len(), 3);
    }

    /// A NUL becomes U+FFFD in the line (so the event reads back as chained, on PostgreSQL
    /// too); the text `\u0000` typed by someone stays as it is.
    #[tokio::test]
    async fn a_nul_in_a_field_is_written_as_u_fffd_and_the_text_of_its_escape_is_not() {
        let (_dir, s, log) = opened().await;
        for p in ["/a\0b\0", "/typed/\\u0000", "/both/\\\0", "/plain"] {
            log.record(line(p)).expect("record");
        }
        Shipper::default().ship(&log, &*s).await.expect("ship");
        let mut evs = stored(&*s).await;
        evs.sort_by_key(|e| e.seq);
        let paths: Vec<&str> = evs.iter().filter_map(|e| e.path.as_deref()).collect();
        assert_eq!(
            paths,
            [
                "/a\u{fffd}b\u{fffd}",
                "/typed/\\u0000",
                "/both/\\\u{fffd}",
                "/plain"
            ]
        );
        let report = keygate_store::verify_audit(&*s).await.expect("verify");
        assert_eq!((report.checked, report.broken), (4, None));
    }

    /// Requests ready at the same time share one write, and each still gets its own line.
    #[tokio::test]
    async fn concurrent_requests_share_a_write() {
        let (_dir, s, log) = opened().await;
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let p = format!("/p/{i}");
                    let g = log.append(line(&p)).expect("append");
                    log.commit(g).await.expect("commit");
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let groups = log.writer.lock().expect("lock").group - 1;
        assert!(groups < 10, "50 lines took {groups} writes");
        Shipper::default().ship(&log, &*s).await.expect("ship");
        let mut seqs: Vec<i64> = stored(&*s).await.iter().map(|e| e.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    }

    /// A group whose write fails is refused to every request in it, and its numbers are
    /// given back, so the chain has no gap.
    #[tokio::test]
    async fn a_failed_group_is_refused_to_all_its_lines_and_leaves_no_gap() {
        let (_dir, s, log) = opened().await;
        log.record(line("/a")).expect("a");
        let g1 = log.append(line("/b")).expect("b");
        let g2 = log.append(line("/c")).expect("c");
        assert_eq!(g1, g2, "one group");
        log.fail_next_write();
        assert!(log.flush(g1).is_err());
        assert!(log.flush(g2).is_err(), "every line of the group is refused");
        refused_group_left_no_trace(&log, &*s).await;
    }

    /// After `/a` was written and a group of `/b` and `/c` refused: `/d` is written, and only
    /// `/a` and `/d` ship, numbered 1 and 2, with the chain intact.
    async fn refused_group_left_no_trace(log: &AuditLog, s: &dyn Store) {
        log.record(line("/d")).expect("d");
        let got = ship_and_list(log, s).await;
        assert_eq!(got, [(1, "/a".to_owned()), (2, "/d".to_owned())]);
        assert_chain_intact(s).await;
    }

    /// A group whose write stops midway is taken back (zeroed): the next group is written
    /// over it, and no line of the refused group ships, not even the whole ones.
    #[tokio::test]
    async fn a_group_torn_midway_is_taken_back_and_written_over() {
        let (dir, s, log) = opened().await;
        log.record(line("/a")).expect("a");
        let g = log.append(line("/b")).expect("b");
        log.append(line("/c")).expect("c");
        {
            let mut w = log.writer.lock().expect("lock");
            let b_len = w
                .pending
                .iter()
                .position(|b| *b == b'\n')
                .expect("two lines")
                + 1;
            w.tear_next = Some(b_len + 20);
        }
        assert!(log.flush(g).is_err(), "the torn group is refused");
        let seg = std::fs::read(segment_path(&dir.path().join("audit"), 1)).expect("segment");
        assert_eq!(
            seg.iter().filter(|b| **b == b'\n').count(),
            1,
            "only /a is left in the segment"
        );
        refused_group_left_no_trace(&log, &*s).await;
    }

    /// A group larger than the zeros written ahead gets the room it needs in one step.
    #[tokio::test]
    async fn a_group_larger_than_the_room_ahead_is_written_whole() {
        let (_dir, s, log) = opened().await;
        let paths: Vec<String> = (0..1500)
            .map(|i| format!("/{i}/{}", "x".repeat(200)))
            .collect();
        let mut group = 0;
        for p in &paths {
            group = log.append(line(p)).expect("append");
        }
        let bytes = log.writer.lock().expect("lock").pending.len() as u64;
        assert!(bytes > ZEROS_AHEAD, "the group is {bytes} bytes");
        log.flush(group).expect("flush");
        log.record(line("/last")).expect("record");
        assert_eq!(
            Shipper::default().ship(&log, &*s).await.expect("ship"),
            1501
        );
        let r = keygate_store::verify_audit(&*s).await.expect("verify");
        assert!(r.broken.is_none() && r.checked == 1501, "{r:?}");
    }

    /// When even taking the failed group back fails, the segment may keep whole lines of it,
    /// which will ship: their numbers stay taken, the others go back, and writing moves to a
    /// new segment. No answered line reuses a shipped number, and the chain has no gap.
    #[tokio::test]
    async fn a_group_that_cannot_be_taken_back_keeps_the_numbers_of_its_whole_lines() {
        let (dir, s, log) = opened().await;
        log.record(line("/a")).expect("a");
        let g = log.append(line("/b")).expect("b");
        log.append(line("/c")).expect("c");
        // The disk fills up midway through the group: `/b` is written whole, `/c` torn, and
        // the file cannot be truncated.
        let (torn, at) = {
            let w = log.writer.lock().expect("lock");
            let text = String::from_utf8(w.pending.clone()).expect("utf8");
            let b_len = text.find('\n').expect("two lines") + 1;
            (text[..b_len + 20].to_owned(), w.len)
        };
        OpenOptions::new()
            .write(true)
            .open(segment_path(&dir.path().join("audit"), 1))
            .and_then(|f| f.write_all_at(torn.as_bytes(), at))
            .expect("partial write");
        log.writer.lock().expect("lock").file = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        assert!(log.flush(g).is_err());
        log.record(line("/d")).expect("d");
        let got = ship_and_list(&log, &*s).await;
        // `/b` was written whole and ships (its request was refused, but the line is there);
        // `/c` is gone and its number went to `/d`.
        assert_eq!(
            got,
            [
                (1, "/a".to_owned()),
                (2, "/b".to_owned()),
                (3, "/d".to_owned())
            ]
        );
        assert_eq!(
            segments(&dir.path().join("audit")).expect("segments").len(),
            1
        );
        assert_chain_intact(&*s).await;
    }
}

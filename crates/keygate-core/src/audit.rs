//! Audit events and their hash chain.
//!
//! Every node numbers its events `1, 2, 3, …` (`seq`) and chains them: an event's `hash` is
//! SHA-256 over the previous event's hash and the event's canonical encoding. Editing a stored
//! event changes its hash; deleting one leaves a gap in `seq`; putting a forged one in breaks
//! the `prev_hash` link of the one after it. [`verify_chain`] finds the first of these.
//!
//! Two encodings are chained, and a chain may hold both:
//! - **the line as written** (events shipped by this version): the hash is SHA-256 over the
//!   previous hash (32 bytes) and the event's line in the node's segment, byte for byte, so
//!   the shipper chains what it read without parsing it into fields and encoding them again
//!   ([`line_hash`]; the event carries its `line`);
//! - **the fields** (events of earlier versions): a length-prefixed encoding (so no field can
//!   bleed into the next) of every field except `hash`, in declaration order.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_hash` of a node's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit event: a decided request (`request.decided`) or a lifecycle change
/// (`key.created`, `key.rotated`, …). Never holds a plaintext key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditEvent {
    /// `evt_…`, sortable by time.
    pub id: String,
    /// The node that recorded it.
    pub node: String,
    /// Position in the node's chain, from 1.
    pub seq: i64,
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// The tenant it concerns (absent for a request whose key was never found).
    pub tenant_id: Option<String>,
    /// Who acted: a key id, a user id or `system`.
    pub actor: String,
    /// `request.decided`, `key.created`, …
    pub action: String,
    /// The key it concerns.
    pub key_id: Option<String>,
    /// The user it concerns.
    pub user_id: Option<String>,
    /// The key's kind (`sk`, `ut`, `pk`).
    pub kind: Option<String>,
    /// The decision code (`VALID`, `REVOKED`, …).
    pub code: Option<String>,
    /// The HTTP status of the decision.
    pub status: Option<i64>,
    /// Request method.
    pub method: Option<String>,
    /// Request path (without query).
    pub path: Option<String>,
    /// Scope the request needed.
    pub scope: Option<String>,
    /// Client IP.
    pub ip: Option<String>,
    /// `Origin` header.
    pub origin: Option<String>,
    /// Credits drawn.
    pub credits: Option<i64>,
    /// Time to decide, microseconds.
    pub latency_us: Option<i64>,
    /// The request's `X-Request-Id`.
    pub request_id: Option<String>,
    /// Details of a lifecycle change (JSON text).
    pub detail: Option<String>,
    /// Hash of the node's previous event ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of `prev_hash` and this event.
    pub hash: String,
    /// The line this event was chained over, as written to the node's segment (`None` for
    /// events chained over their fields). Not part of the event's JSON.
    #[serde(skip)]
    pub line: Option<String>,
}

/// One line of a node's audit segment, as the shipper hands it to the store: the bytes as
/// written (without the newline) and the fields read from them.
#[derive(Debug, Clone)]
pub struct RawEvent<'a> {
    /// The line.
    pub line: &'a [u8],
    /// Its fields that the store needs.
    pub head: LineHead<'a>,
}

/// One event's line as the shipper reads it: the fields it needs (to chain, index, count
/// usage and judge alerts), borrowed from the line; the rest is skipped unread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LineHead<'a> {
    /// The node.
    #[serde(borrow)]
    pub node: std::borrow::Cow<'a, str>,
    /// Position in the node's chain.
    pub seq: i64,
    /// Unix ms.
    pub at_ms: i64,
    /// Tenant.
    #[serde(borrow)]
    pub tenant_id: Option<std::borrow::Cow<'a, str>>,
    /// `request.decided`, `key.created`, …
    #[serde(borrow)]
    pub action: std::borrow::Cow<'a, str>,
    /// Key.
    #[serde(borrow)]
    pub key_id: Option<std::borrow::Cow<'a, str>>,
    /// User.
    #[serde(borrow)]
    pub user_id: Option<std::borrow::Cow<'a, str>>,
    /// Key kind.
    #[serde(borrow)]
    pub kind: Option<std::borrow::Cow<'a, str>>,
    /// Decision code.
    #[serde(borrow)]
    pub code: Option<std::borrow::Cow<'a, str>>,
    /// Client IP.
    #[serde(borrow)]
    pub ip: Option<std::borrow::Cow<'a, str>>,
    /// Origin.
    #[serde(borrow)]
    pub origin: Option<std::borrow::Cow<'a, str>>,
    /// Credits drawn.
    pub credits: Option<i64>,
}

/// The index of the first byte of `b` that a JSON string cannot hold as it is: `"`, `\\` or
/// a control byte (below 0x20). The audit log asks this of every text it writes and reads;
/// eight bytes are looked at a time (the classic "has a zero byte" bit trick, on each of the
/// three tests), since a byte-at-a-time loop was most of what writing and reading a line
/// cost. Hand-written because `memchr` looks for given bytes, not a range of them.
pub fn json_special(b: &[u8]) -> Option<usize> {
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let hit = marks(c, true);
        if hit != 0 {
            return Some(at + (hit.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
        .map(|i| at + i)
}

/// The high bit of each byte of the 8 bytes `c` that is a control byte, a `\\` or (with
/// `quote`) a `"`: the lowest one set is the first such byte (a borrow can only mark bytes
/// above the byte that caused it, never below it).
#[inline(always)]
fn marks(c: &[u8], quote: bool) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    /// Zero bytes of `x`.
    fn zeros(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGH
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(c);
    let x = u64::from_le_bytes(word);
    // Below 0x20: the same trick with 0x20 in place of 1.
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    let quotes = if quote {
        zeros(x ^ (ONES * u64::from(b'"')))
    } else {
        0
    };
    control | quotes | zeros(x ^ (ONES * u64::from(b'\\')))
}

/// Whether `b` has a backslash or a control byte, eight bytes at a time (see
/// [`json_special`]).
fn has_escape_or_control(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(8);
    let hit = (&mut chunks).fold(0, |hit, c| hit | marks(c, false));
    hit != 0 || chunks.remainder().iter().any(|c| *c == b'\\' || *c < 0x20)
}

/// Where [`LineHead::scan_in_order`] is in a line that has no escape and no control byte,
/// so that every `"` in it opens or closes a string.
struct InOrder<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> InOrder<'a> {
    /// Steps over `key` (with the `,` or `{` before it and the `:` after it). Inlined, so
    /// that each literal is compared as the few words it is.
    #[inline(always)]
    fn key(&mut self, key: &str) -> Option<()> {
        let b = self.text.as_bytes();
        (b.get(self.at..self.at + key.len()) == Some(key.as_bytes())).then(|| self.at += key.len())
    }

    /// A string (which the line's check has shown to hold no escape).
    fn text(&mut self) -> Option<&'a str> {
        let b = self.text.as_bytes();
        if b.get(self.at) != Some(&b'"') {
            return None;
        }
        let start = self.at + 1;
        let end = start + memchr::memchr(b'"', b.get(start..)?)?;
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// A plain integer (see [`plain_integer`]) that fits an `i64`.
    fn integer(&mut self) -> Option<i64> {
        let b = self.text.as_bytes();
        let negative = b.get(self.at) == Some(&b'-');
        let start = self.at + usize::from(negative);
        let mut i = start;
        let mut v: i64 = 0;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            let d = i64::from(c - b'0');
            v = v.checked_mul(10)?;
            v = if negative {
                v.checked_sub(d)?
            } else {
                v.checked_add(d)?
            };
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || (b[start] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        self.at = i;
        Some(v)
    }

    /// The string after `key` if the line has that key next: `Some(None)` if it has not,
    /// `None` if its value is not a string.
    #[inline(always)]
    fn text_if(&mut self, key: &str) -> Option<Option<std::borrow::Cow<'a, str>>> {
        if self.key(key).is_none() {
            return Some(None);
        }
        self.text().map(|t| Some(std::borrow::Cow::Borrowed(t)))
    }

    /// [`InOrder::text_if`] for an integer.
    #[inline(always)]
    fn integer_if(&mut self, key: &str) -> Option<Option<i64>> {
        if self.key(key).is_none() {
            return Some(None);
        }
        self.integer().map(Some)
    }
}

/// A value of a flat JSON object, as [`LineHead::scan`] reads it.
enum Scalar<'a> {
    Str(&'a str),
    Num(i64),
    Null,
}

/// An integer as serde_json reads one into an `i64`: `0`, or digits not starting with `0`
/// with an optional `-` (`str::parse` would also take `+1`, `01` and `-0`).
fn plain_integer(t: &str) -> bool {
    match t.strip_prefix('-') {
        // serde_json reads `-0` as a float, which an integer field refuses.
        Some(digits) => !digits.starts_with('0') && plain_integer(digits),
        None => {
            !t.is_empty()
                && t.bytes().all(|c| c.is_ascii_digit())
                && (t == "0" || !t.starts_with('0'))
        }
    }
}

impl<'a> LineHead<'a> {
    /// Reads a line as the audit log writes it (`serde_json`'s compact output of a flat
    /// object whose strings need no escapes) several times faster than `serde_json` (`cargo
    /// bench -p keygate-core --bench line`; the figures are in docs/performance.md), which on
    /// a loaded node spent a visible share of the core reading lines back. `None` for anything
    /// else (an escape, whitespace, a nested value, a duplicate field, a wrong type): the
    /// caller then reads the line with `serde_json`, so the result never differs from it.
    pub fn scan(line: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(line).ok()?;
        Self::scan_in_order(text).or_else(|| Self::scan_any(text))
    }

    /// The scan's first try: the fields in the order the audit log writes them
    /// (`keygate_server::audit::Line`), each present once or left out. The keys are then
    /// matched as whole literals, one after the other, instead of being read and looked up:
    /// fewer instructions than [`LineHead::scan_any`] (callgrind). `None` for anything else (another order, a `null`, a number
    /// that is not a plain integer), which [`LineHead::scan_any`] then reads.
    fn scan_in_order(text: &'a str) -> Option<Self> {
        use std::borrow::Cow::Borrowed;
        if has_escape_or_control(text.as_bytes()) {
            return None;
        }
        let mut r = InOrder { text, at: 0 };
        let mut head = LineHead::default();
        r.key("{\"node\":")?;
        head.node = Borrowed(r.text()?);
        r.key(",\"seq\":")?;
        head.seq = r.integer()?;
        r.key(",\"at_ms\":")?;
        head.at_ms = r.integer()?;
        head.tenant_id = r.text_if(",\"tenant_id\":")?;
        r.key(",\"actor\":")?;
        r.text()?;
        r.key(",\"action\":")?;
        head.action = Borrowed(r.text()?);
        head.key_id = r.text_if(",\"key_id\":")?;
        head.user_id = r.text_if(",\"user_id\":")?;
        head.kind = r.text_if(",\"kind\":")?;
        head.code = r.text_if(",\"code\":")?;
        r.integer_if(",\"status\":")?;
        for skipped in [",\"method\":", ",\"path\":", ",\"scope\":"] {
            r.text_if(skipped)?;
        }
        head.ip = r.text_if(",\"ip\":")?;
        head.origin = r.text_if(",\"origin\":")?;
        head.credits = r.integer_if(",\"credits\":")?;
        r.integer_if(",\"latency_us\":")?;
        r.text_if(",\"request_id\":")?;
        r.text_if(",\"detail\":")?;
        r.key("}")?;
        (r.at == text.len()).then_some(head)
    }

    /// The scan of a flat object with its fields in any order.
    fn scan_any(text: &'a str) -> Option<Self> {
        let b = text.as_bytes();
        let mut head = LineHead::default();
        let mut seen = 0u32;
        let mut i = 1;
        if b.first() != Some(&b'{') {
            return None;
        }
        if b.get(1) == Some(&b'}') {
            return (b.len() == 2).then_some(head);
        }
        loop {
            // A key: a string without escapes.
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let end = i + 1 + json_special(b.get(i + 1..)?)?;
            if b[end] != b'"' || b.get(end + 1) != Some(&b':') {
                return None;
            }
            let key = &text[i + 1..end];
            i = end + 2;
            let value = if b.get(i) == Some(&b'"') {
                let end = i + 1 + json_special(b.get(i + 1..)?)?;
                if b[end] != b'"' {
                    return None;
                }
                let v = Scalar::Str(&text[i + 1..end]);
                i = end + 1;
                v
            } else {
                let end = i + b.get(i..)?.iter().position(|c| *c == b',' || *c == b'}')?;
                let t = &text[i..end];
                i = end;
                if t == "null" {
                    Scalar::Null
                } else if plain_integer(t) {
                    Scalar::Num(t.parse().ok()?)
                } else {
                    return None;
                }
            };
            head.set(key, value, &mut seen)?;
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => return (i + 1 == b.len()).then_some(head),
                _ => return None,
            }
        }
    }

    /// Sets the field `key` (other keys are skipped, as `serde` skips them); `None` for a
    /// field seen before or a value of the wrong type.
    fn set(&mut self, key: &str, value: Scalar<'a>, seen: &mut u32) -> Option<()> {
        use std::borrow::Cow::Borrowed;
        let bit = match (key, value) {
            ("node", Scalar::Str(s)) => {
                self.node = Borrowed(s);
                0
            }
            ("seq", Scalar::Num(n)) => {
                self.seq = n;
                1
            }
            ("at_ms", Scalar::Num(n)) => {
                self.at_ms = n;
                2
            }
            ("action", Scalar::Str(s)) => {
                self.action = Borrowed(s);
                3
            }
            ("credits", Scalar::Num(n)) => {
                self.credits = Some(n);
                4
            }
            ("credits", Scalar::Null) => {
                self.credits = None;
                4
            }
            (key, value) => {
                let (bit, field) = match key {
                    "tenant_id" => (5, &mut self.tenant_id),
                    "key_id" => (6, &mut self.key_id),
                    "user_id" => (7, &mut self.user_id),
                    "kind" => (8, &mut self.kind),
                    "code" => (9, &mut self.code),
                    "ip" => (10, &mut self.ip),
                    "origin" => (11, &mut self.origin),
                    "node" | "seq" | "at_ms" | "action" | "credits" => return None,
                    _ => return Some(()),
                };
                *field = match value {
                    Scalar::Str(s) => Some(Borrowed(s)),
                    Scalar::Null => None,
                    Scalar::Num(_) => return None,
                };
                bit
            }
        };
        if *seen & (1 << bit) != 0 {
            return None;
        }
        *seen |= 1 << bit;
        Some(())
    }
}

/// An event's id: `evt_`, the time (13 digits of Unix ms), the node's `seq` (12 digits) and
/// the node, so ids sort by time, then by the node's order.
pub fn event_id(at_ms: i64, seq: i64, node: &str) -> String {
    format!("evt_{at_ms:013}{seq:012}_{node}")
}

/// The hash of an event chained over its line: SHA-256 over the previous event's hash and
/// the line (without its newline).
pub fn line_hash(prev: &[u8; 32], line: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(line);
    h.finalize().into()
}

/// A hash as the lowercase hex text events carry.
pub fn hex(hash: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    for b in hash {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// The 32 bytes of a hash's hex text; `None` unless it is 64 hex digits.
pub fn unhex(text: &str) -> Option<[u8; 32]> {
    let t = text.as_bytes();
    if t.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(t[2 * i])? << 4) | digit(t[2 * i + 1])?;
    }
    Some(out)
}

fn put(h: &mut Sha256, v: Option<&[u8]>) {
    match v {
        None => h.update(u32::MAX.to_le_bytes()),
        Some(b) => {
            h.update(u32::try_from(b.len()).unwrap_or(u32::MAX - 1).to_le_bytes());
            h.update(b);
        }
    }
}

impl AuditEvent {
    /// The hash this event must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        if let Some(line) = &self.line {
            // A `prev_hash` that is not a hash links to nothing: no hash can match.
            return unhex(&self.prev_hash)
                .map(|prev| hex(&line_hash(&prev, line.as_bytes())))
                .unwrap_or_default();
        }
        let mut h = Sha256::new();
        fn s(v: &Option<String>) -> Option<&[u8]> {
            v.as_deref().map(str::as_bytes)
        }
        let n = |v: Option<i64>| v.map(|x| x.to_le_bytes());
        put(&mut h, Some(self.prev_hash.as_bytes()));
        put(&mut h, Some(self.id.as_bytes()));
        put(&mut h, Some(self.node.as_bytes()));
        put(&mut h, Some(&self.seq.to_le_bytes()));
        put(&mut h, Some(&self.at_ms.to_le_bytes()));
        put(&mut h, s(&self.tenant_id));
        put(&mut h, Some(self.actor.as_bytes()));
        put(&mut h, Some(self.action.as_bytes()));
        put(&mut h, s(&self.key_id));
        put(&mut h, s(&self.user_id));
        put(&mut h, s(&self.kind));
        put(&mut h, s(&self.code));
        put(&mut h, n(self.status).as_ref().map(|b| &b[..]));
        put(&mut h, s(&self.method));
        put(&mut h, s(&self.path));
        put(&mut h, s(&self.scope));
        put(&mut h, s(&self.ip));
        put(&mut h, s(&self.origin));
        put(&mut h, n(self.credits).as_ref().map(|b| &b[..]));
        put(&mut h, n(self.latency_us).as_ref().map(|b| &b[..]));
        put(&mut h, s(&self.request_id));
        put(&mut h, s(&self.detail));
        hex(&h.finalize().into())
    }

    /// Links this event after `prev_hash` and sets its hash.
    pub fn seal(&mut self, prev_hash: &str) {
        prev_hash.clone_into(&mut self.prev_hash);
        self.hash = self.compute_hash();
    }
}

/// What is wrong at the first broken place of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainProblem {
    /// The event's fields no longer match its hash.
    Changed,
    /// An event is missing (a gap in `seq`, or the chain ends before its recorded head).
    Missing,
    /// The event does not link to the one before it (forged, or re-hashed after a change).
    Inserted,
}

impl ChainProblem {
    /// The name shown by the API (`changed`, `missing`, `inserted`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChainProblem::Changed => "changed",
            ChainProblem::Missing => "missing",
            ChainProblem::Inserted => "inserted",
        }
    }
}

/// The first broken place of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// The `seq` where the chain breaks.
    pub seq: i64,
    /// How.
    pub problem: ChainProblem,
}

/// Walks one node's chain. `start` is the `(seq, hash)` of the event before `events[0]`
/// (`(0, GENESIS)` from the beginning); `events` must be in `seq` order. Returns the `(seq,
/// hash)` of the last event checked, to continue with the next page.
pub fn verify_chain(
    start: (i64, &str),
    events: &[AuditEvent],
) -> Result<(i64, String), ChainBreak> {
    let (mut seq, mut prev) = (start.0, start.1.to_owned());
    for e in events {
        if e.seq > seq + 1 {
            return Err(ChainBreak {
                seq: seq + 1,
                problem: ChainProblem::Missing,
            });
        }
        if e.compute_hash() != e.hash {
            return Err(ChainBreak {
                seq: e.seq,
                problem: ChainProblem::Changed,
            });
        }
        if e.seq != seq + 1 || e.prev_hash != prev {
            return Err(ChainBreak {
                seq: e.seq,
                problem: ChainProblem::Inserted,
            });
        }
        seq = e.seq;
        prev.clone_from(&e.hash);
    }
    Ok((seq, prev))
}

#[cfg(test)]
mod tests {

    #[test]
    fn chain_problem_names_are_the_serialized_ones() {
        for p in [
            ChainProblem::Changed,
            ChainProblem::Missing,
            ChainProblem::Inserted,
        ] {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str());
        }
    }
    use super::*;

    fn chain(n: i64) -> Vec<AuditEvent> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut e = AuditEvent {
                    id: format!("evt_{seq}"),
                    node: "n1".into(),
                    seq,
                    at_ms: 1_700_000_000_000 + seq,
                    actor: "key_x".into(),
                    action: "request.decided".into(),
                    code: Some("VALID".into()),
                    credits: Some(1),
                    ..AuditEvent::default()
                };
                e.seal(&prev);
                prev.clone_from(&e.hash);
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_pages_continue() {
        let c = chain(5);
        let (seq, hash) = verify_chain((0, GENESIS), &c[..2]).expect("first page");
        assert_eq!(seq, 2);
        assert_eq!(verify_chain((seq, &hash), &c[2..]).expect("second").0, 5);
    }

    #[test]
    fn a_changed_field_is_found() {
        let mut c = chain(4);
        c[2].code = Some("REVOKED".into());
        let b = verify_chain((0, GENESIS), &c).expect_err("changed");
        assert_eq!((b.seq, b.problem), (3, ChainProblem::Changed));
    }

    #[test]
    fn a_none_differs_from_an_empty_string() {
        let c = chain(1);
        let mut e = c[0].clone();
        e.path = Some(String::new());
        assert_ne!(e.compute_hash(), c[0].hash);
    }

    #[test]
    fn a_deleted_event_is_a_gap() {
        let mut c = chain(4);
        c.remove(1);
        let b = verify_chain((0, GENESIS), &c).expect_err("gap");
        assert_eq!((b.seq, b.problem), (2, ChainProblem::Missing));
    }

    #[test]
    fn a_rehashed_change_breaks_the_next_link() {
        let mut c = chain(4);
        c[1].credits = Some(0);
        let prev = c[0].hash.clone();
        c[1].seal(&prev);
        let b = verify_chain((0, GENESIS), &c).expect_err("link");
        assert_eq!((b.seq, b.problem), (3, ChainProblem::Inserted));
    }

    /// Events 1–2 chained over their fields (an earlier version), 3–4 over their lines.
    fn mixed_chain() -> Vec<AuditEvent> {
        let mut c = chain(2);
        let mut prev = c[1].hash.clone();
        for seq in 3..=4 {
            let line = format!(
                r#"{{"node":"n1","seq":{seq},"at_ms":17,"actor":"k","action":"request.decided","code":"VALID"}}"#
            );
            let hash = hex(&line_hash(&unhex(&prev).expect("hex"), line.as_bytes()));
            let mut e: AuditEvent = serde_json::from_str(&line).expect("line");
            (e.prev_hash, e.hash, e.line) = (prev.clone(), hash.clone(), Some(line));
            c.push(e);
            prev = hash;
        }
        c
    }

    #[test]
    fn a_chain_may_go_on_over_lines_and_a_changed_line_is_found() {
        let c = mixed_chain();
        assert_eq!(verify_chain((0, GENESIS), &c).expect("intact").0, 4);
        let mut edited = c.clone();
        edited[2].line = edited[2]
            .line
            .as_ref()
            .map(|l| l.replace("VALID", "REVOKED"));
        let b = verify_chain((0, GENESIS), &edited).expect_err("changed");
        assert_eq!((b.seq, b.problem), (3, ChainProblem::Changed));
        let mut unlinked = c;
        unlinked[3].prev_hash = GENESIS.to_owned();
        let b = verify_chain((0, GENESIS), &unlinked).expect_err("not linked");
        assert_eq!((b.seq, b.problem), (4, ChainProblem::Changed));
    }

    #[test]
    fn hashes_go_to_hex_and_back_and_nothing_else_does() {
        let h = line_hash(&[7; 32], b"x");
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex(GENESIS), Some([0; 32]));
        for bad in ["", "00", &"g".repeat(64), &"A".repeat(64), &"0".repeat(65)] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_written_line_scans_as_serde_reads_it() {
        let line = br#"{"node":"n1","seq":7,"at_ms":1700000000000,"tenant_id":"default","actor":"key_a","action":"request.decided","key_id":"key_a","kind":"pk","code":"VALID","status":200,"method":"GET","scope":"ocr:read","ip":"127.0.0.1","origin":"https://claude.ai","credits":1,"latency_us":9,"request_id":"req_1"}"#;
        let scanned = LineHead::scan(line).expect("a plain line scans");
        let read: LineHead<'_> = serde_json::from_slice(line).expect("serde");
        assert_eq!(scanned, read);
        assert_eq!((scanned.seq, scanned.credits), (7, Some(1)));
        assert_eq!(scanned.origin.as_deref(), Some("https://claude.ai"));
    }

    #[test]
    fn what_the_scan_does_not_take_is_left_to_serde() {
        for line in [
            r#"{"node":"a\"b","seq":1}"#,
            r#"{"node":"n","seq":01}"#,
            r#"{"node":"n","seq":+1}"#,
            r#"{"node":"n","seq":-0}"#,
            r#"{"node":"n","seq":-01}"#,
            "{\"no\u{1}de\":\"n\"}",
            r#"{"node":"n","seq":1.5}"#,
            r#"{"node":"n","seq":1,"seq":2}"#,
            r#"{"node":"n","seq":null}"#,
            r#"{"node":"n", "seq":1}"#,
            r#"{"node":"n","detail":{"a":1}}"#,
            r#"{"node":"n","seq":1}x"#,
            r#"{"node":"n","seq":1"#,
            r#"{"node":"n","code":7}"#,
            r#"{"node":"n","seq":99999999999999999999}"#,
            "",
            "{",
        ] {
            assert_eq!(LineHead::scan(line.as_bytes()), None, "{line}");
        }
        assert_eq!(LineHead::scan(b"{}"), Some(LineHead::default()));
        let skipped =
            LineHead::scan(br#"{"seq":3,"other":-12,"x":null,"code":null}"#).expect("scan");
        assert_eq!((skipped.seq, skipped.code), (3, None));
    }

    proptest::proptest! {
        /// Both word-at-a-time searches against a byte-at-a-time loop.
        #[test]
        fn the_word_searches_find_what_a_byte_loop_finds(
            b in proptest::collection::vec(proptest::sample::select(vec![
                b'a', b'"', b'\\', 0u8, 0x1f, 0x20, 0x21, 0x5b, 0x5c, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff,
            ]), 0..40),
            fill in 0usize..24,
        ) {
            // Plain text before the mix, so the special byte falls at every place of a word.
            let mut v = vec![b'x'; fill];
            v.extend_from_slice(&b);
            let naive = v.iter().position(|c| *c == b'"' || *c == b'\\' || *c < 0x20);
            proptest::prop_assert_eq!(json_special(&v), naive);
            let naive = v.iter().any(|c| *c == b'\\' || *c < 0x20);
            proptest::prop_assert_eq!(has_escape_or_control(&v), naive);
        }
    }

    /// The fields of a line in the order the audit log writes them; `true` for a number.
    const WRITTEN: [(&str, bool, bool); 20] = [
        ("node", false, true),
        ("seq", true, true),
        ("at_ms", true, true),
        ("tenant_id", false, false),
        ("actor", false, true),
        ("action", false, true),
        ("key_id", false, false),
        ("user_id", false, false),
        ("kind", false, false),
        ("code", false, false),
        ("status", true, false),
        ("method", false, false),
        ("path", false, false),
        ("scope", false, false),
        ("ip", false, false),
        ("origin", false, false),
        ("credits", true, false),
        ("latency_us", true, false),
        ("request_id", false, false),
        ("detail", false, false),
    ];

    proptest::proptest! {
        /// Lines as the audit log writes them (its field order, optional fields left out,
        /// strings that may need escapes), whole or torn: the in-order scan reads every whole
        /// one whose strings need no escape, exactly as serde does, and takes nothing else.
        #[test]
        fn a_line_in_the_writers_order_scans_in_order_as_serde_reads_it(
            texts in proptest::collection::vec(
                proptest::option::of("[a-z0-9:/._ é\"\\\\\u{1}-]{0,10}"), 20),
            numbers in proptest::collection::vec(proptest::option::of(proptest::num::i64::ANY), 20),
            cut in 0usize..400,
        ) {
            let mut line = String::from("{");
            for (i, (name, number, required)) in WRITTEN.iter().enumerate() {
                let value = if *number {
                    numbers[i].or(required.then_some(0)).map(|n| n.to_string())
                } else {
                    texts[i].clone().or(required.then(String::new)).map(|t| {
                        serde_json::to_string(&t).expect("a string encodes")
                    })
                };
                if let Some(v) = value {
                    if line.len() > 1 {
                        line.push(',');
                    }
                    line.push_str(&format!("\"{name}\":{v}"));
                }
            }
            line.push('}');
            let read: LineHead<'_> = serde_json::from_str(&line).expect("a written line reads");
            let plain = !line.contains('\\');
            proptest::prop_assert_eq!(LineHead::scan_in_order(&line), plain.then(|| read.clone()));
            proptest::prop_assert_eq!(LineHead::scan(line.as_bytes()), plain.then_some(read));
            let torn = &line.as_bytes()[..cut.min(line.len())];
            if torn.len() < line.len() {
                if let Ok(torn) = std::str::from_utf8(torn) {
                    proptest::prop_assert_eq!(LineHead::scan_in_order(torn), None);
                }
            }
        }
    }

    proptest::proptest! {
        /// Lines from an alphabet of JSON's own characters and the fields' names: whatever
        /// the scan takes, serde reads the same.
        #[test]
        fn the_scan_takes_nothing_serde_reads_otherwise(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "{", "}", ",", ":", "\"", "\"node\"", "\"seq\"", "\"code\"", "\"credits\"",
                    "\"x\"", "0", "-", "7", "-0", "12", "null", "\\", "\u{1}", " ", "é",
                ]),
                0..24,
            ),
        ) {
            let line = parts.concat();
            if let Some(scanned) = LineHead::scan(line.as_bytes()) {
                let read: Result<LineHead<'_>, _> = serde_json::from_str(&line);
                proptest::prop_assert_eq!(Some(scanned), read.ok(), "{}", line);
            }
        }
    }

    proptest::proptest! {
        /// Whatever the scan takes, serde reads the same; and a line the audit log writes
        /// (serde's compact output) always reads.
        #[test]
        fn the_scan_agrees_with_serde(
            node in "[a-z0-9\"\\\\é\u{0}]{0,8}",
            seq in proptest::num::i64::ANY,
            key in proptest::option::of("[a-zA-Z0-9_ /\"]{0,12}"),
            origin in proptest::option::of("\\PC{0,12}"),
            credits in proptest::option::of(proptest::num::i64::ANY),
            cut in 0usize..400,
        ) {
            let e = AuditEvent { node, seq, key_id: key, origin, credits, ..AuditEvent::default() };
            let line = serde_json::to_vec(&e).expect("encode");
            let read: LineHead<'_> = serde_json::from_slice(&line).expect("a written line reads");
            if let Some(scanned) = LineHead::scan(&line) {
                proptest::prop_assert_eq!(scanned, read);
            }
            let torn = &line[..cut.min(line.len())];
            if let Some(scanned) = LineHead::scan(torn) {
                let read: LineHead<'_> = serde_json::from_slice(torn).expect("serde reads what the scan took");
                proptest::prop_assert_eq!(scanned, read);
            }
        }
    }
}

//! Audit events, chain heads and usage roll-ups: one implementation for both backends.
//!
//! Events are stored in blocks, one row per node per shipped batch (JSON lines), with a
//! reference row for each tenant, key, user, lifecycle action and refusal code a block
//! mentions. One insert per batch instead of one per event is what keeps shipping cheap next
//! to the requests it records (see docs/performance.md). A listing walks the blocks
//! newest first, through the references when it is filtered, and reads each block whole; the
//! chain check reads a node's blocks in `seq` order.
//!
//! The statements are built with [`sqlx::QueryBuilder`], which writes each backend's own
//! placeholders, so the SQL exists once; `audit_methods!` stamps the methods out for the
//! SQLite and the PostgreSQL pool types.

use crate::sql::Sql;
use crate::{AuditFilter, PageRequest, UsageOf, UsageRow};
use keygate_core::audit::{event_id, hex, line_hash, LineHead};
use keygate_core::AuditEvent;
use std::collections::{BTreeMap, BTreeSet};

pub use keygate_core::audit::RawEvent;

/// Columns of `audit_events`, where earlier versions stored one event per row.
pub(crate) const COLUMNS: &str = "node, seq, id, at, tenant_id, actor, action, key_id, user_id, \
    kind, code, status, method, path, scope, ip, origin, credits, latency_us, request_id, \
    detail, prev_hash, hash";

/// Per-minute usage of a batch: `(key, minute, code) → (tenant, requests, credits)`.
type Usage<'a> = BTreeMap<UsageKey<'a>, UsageSum<'a>>;
/// Key, minute, code.
type UsageKey<'a> = (&'a str, i64, &'a str);
/// Tenant, requests, credits.
type UsageSum<'a> = (&'a str, i64, i64);

/// What the usage roll-up counts of an event.
struct Counted<'a> {
    action: &'a str,
    key: Option<&'a str>,
    tenant: Option<&'a str>,
    code: Option<&'a str>,
    at_ms: i64,
    credits: Option<i64>,
}

/// Counts the decided requests of known keys among `events`.
fn usage_of<'a>(events: impl Iterator<Item = Counted<'a>>) -> Usage<'a> {
    let mut out = Usage::new();
    // Consecutive events of one key, minute and code (one key's traffic, the usual batch) are
    // summed before they go into the map, which then sees one lookup a run.
    let mut run: Option<(UsageKey<'a>, UsageSum<'a>)> = None;
    let add = |out: &mut Usage<'a>, (slot_key, (t, n, credits))| {
        let slot = out.entry(slot_key).or_insert((t, 0, 0));
        slot.1 += n;
        slot.2 = slot.2.saturating_add(credits);
    };
    for e in events {
        if e.action != DECIDED {
            continue;
        }
        let (Some(k), Some(t), Some(c)) = (e.key, e.tenant, e.code) else {
            continue;
        };
        let minute = e.at_ms - e.at_ms.rem_euclid(60_000);
        // Saturating: a sum of credits must never wrap, however large one event claims to be.
        let credits = e.credits.unwrap_or(0).max(0);
        match &mut run {
            Some((key, (_, n, sum))) if *key == (k, minute, c) => {
                *n += 1;
                *sum = sum.saturating_add(credits);
            }
            _ => {
                if let Some(done) = run.replace(((k, minute, c), (t, 1, credits))) {
                    add(&mut out, done);
                }
            }
        }
    }
    if let Some(done) = run {
        add(&mut out, done);
    }
    out
}

impl<'a> Counted<'a> {
    fn of(e: &'a AuditEvent) -> Self {
        Counted {
            action: &e.action,
            key: e.key_id.as_deref(),
            tenant: e.tenant_id.as_deref(),
            code: e.code.as_deref(),
            at_ms: e.at_ms,
            credits: e.credits,
        }
    }

    fn of_line(e: &'a RawEvent<'a>) -> Self {
        let h = &e.head;
        Counted {
            action: &h.action,
            key: h.key_id.as_deref(),
            tenant: h.tenant_id.as_deref(),
            code: h.code.as_deref(),
            at_ms: h.at_ms,
            credits: h.credits,
        }
    }
}

/// Bucket width in ms for `minute`, `hour`, `day`.
pub fn granularity_ms(g: &str) -> Option<i64> {
    match g {
        "minute" => Some(60_000),
        "hour" => Some(3_600_000),
        "day" => Some(86_400_000),
        _ => None,
    }
}

pub(crate) fn page_usage(rows: Vec<(i64, String, i64, i64)>) -> Vec<UsageRow> {
    rows.into_iter()
        .map(|(b, code, r, c)| UsageRow {
            bucket_ms: b,
            code,
            requests: crate::rows::to_u64(r),
            credits: crate::rows::to_u64(c),
        })
        .collect()
}

/// `action` of a decided request, the one action that is not a lifecycle change.
const DECIDED: &str = "request.decided";

/// Events per block of lines: a listing reads a block whole, and building one (hashing and
/// compressing its lines) runs between requests.
const LINE_BLOCK_EVENTS: usize = 512;

/// Blocks fetched per query round.
const BLOCK_PAGE: i64 = 8;

/// One node's shipped batch as it is stored: its events as JSON lines, the range of their
/// `seq` and `id`, and what it mentions (see [`refs_of`]). Events chained over their lines
/// (see [`keygate_core::audit`]) are stored as those lines, with `chain` (see
/// [`CHAIN_TAGGED`]). Without `chain` (blocks of earlier versions, and converted rows) each
/// line is a whole [`AuditEvent`] with its hashes.
pub(crate) struct Block {
    pub(crate) first_seq: i64,
    pub(crate) last_seq: i64,
    pub(crate) min_id: String,
    pub(crate) max_id: String,
    pub(crate) events: Vec<u8>,
    pub(crate) chain: Option<Vec<u8>>,
    pub(crate) refs: Vec<String>,
}

/// The references a block gets for an event, so that a filtered query reads only the blocks
/// that can hold a match: its tenant, key and user, and, where they are not the common case,
/// its lifecycle action and refusal code.
fn refs_of(e: Mentions<'_>, mut add: impl FnMut(&str, &str)) {
    if let Some(k) = e.key {
        add("k:", k);
    }
    if e.action != DECIDED {
        add("a:", e.action);
    }
    if let Some(c) = e.code.filter(|c| *c != "VALID") {
        add("c:", c);
    }
    if let Some(u) = e.user {
        add("u:", u);
    }
    if let Some(t) = e.tenant {
        add("t:", t);
    }
}

/// What an event mentions that a block is referenced by.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mentions<'a> {
    key: Option<&'a str>,
    action: &'a str,
    code: Option<&'a str>,
    user: Option<&'a str>,
    tenant: Option<&'a str>,
}

impl<'a> Mentions<'a> {
    fn of(e: &'a AuditEvent) -> Self {
        Mentions {
            key: e.key_id.as_deref(),
            action: &e.action,
            code: e.code.as_deref(),
            user: e.user_id.as_deref(),
            tenant: e.tenant_id.as_deref(),
        }
    }

    fn of_line(h: &'a LineHead<'a>) -> Self {
        Mentions {
            key: h.key_id.as_deref(),
            action: &h.action,
            code: h.code.as_deref(),
            user: h.user_id.as_deref(),
            tenant: h.tenant_id.as_deref(),
        }
    }
}

/// The distinct references of a block's events. Most events repeat the one before them (one
/// key's traffic): those are skipped without building a reference.
fn block_refs<'a>(events: impl Iterator<Item = Mentions<'a>>) -> Vec<String> {
    let mut refs: BTreeSet<String> = BTreeSet::new();
    let mut buf = String::new();
    let mut prev: Option<Mentions<'a>> = None;
    for m in events {
        if prev.replace(m) == Some(m) {
            continue;
        }
        refs_of(m, |p, v| {
            buf.clear();
            buf.push_str(p);
            // PostgreSQL's TEXT refuses NUL.
            buf.extend(v.chars().map(|c| if c == '\0' { '\u{fffd}' } else { c }));
            if !refs.contains(&buf) {
                refs.insert(buf.clone());
            }
        });
    }
    refs.into_iter().collect()
}

/// The references a block must have to hold an event matching `f`, most selective first.
pub(crate) fn refs_for(f: &AuditFilter) -> Vec<String> {
    let e = AuditEvent {
        key_id: f.key_id.clone(),
        action: f.action.clone().unwrap_or_else(|| DECIDED.to_owned()),
        code: f.code.clone(),
        user_id: f.user_id.clone(),
        tenant_id: f.tenant_id.clone(),
        ..AuditEvent::default()
    };
    let mut out = Vec::new();
    refs_of(Mentions::of(&e), |p, v| {
        out.push(format!("{p}{v}").replace('\0', "\u{fffd}"))
    });
    out
}

/// The block of `events` (one node's, in `seq` order; at least one).
pub(crate) fn block_of(events: &[&AuditEvent]) -> crate::Result<Block> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Err(crate::StoreError::corrupt("an empty audit block"));
    };
    let mut body = Vec::with_capacity(events.len() * 512);
    let (mut min_id, mut max_id) = (first.id.as_str(), first.id.as_str());
    for e in events {
        serde_json::to_writer(&mut body, e)
            .map_err(|err| crate::StoreError::corrupt(format!("encoding an audit event: {err}")))?;
        body.push(b'\n');
        min_id = min_id.min(e.id.as_str());
        max_id = max_id.max(e.id.as_str());
    }
    Ok(Block {
        first_seq: first.seq,
        last_seq: last.seq,
        min_id: min_id.to_owned(),
        max_id: max_id.to_owned(),
        events: stored_block(&body),
        chain: None,
        refs: block_refs(events.iter().map(|e| Mentions::of(e))),
    })
}

/// The first byte of a `chain` written by this version: then come the hash before the
/// block's first event, the hash of its last event (32 bytes each) and the first 4 bytes of
/// each event's hash. Reading a block recomputes its events' hashes from its lines; a tag
/// that differs places a changed event, and the last hash (and the next block's first)
/// hold the chain whole. Earlier versions stored every event's 32 bytes (a `chain` of the
/// hash before the block, then one per event, so always a multiple of 32 long, where this
/// one is always odd): two thirds of what a block took in the database. Those blocks still
/// read.
pub const CHAIN_TAGGED: u8 = 1;

/// Where a [`CHAIN_TAGGED`] chain holds the hash before the block, the hash of its last
/// event, and the tags.
const PREV_AT: usize = 1;
const LAST_AT: usize = PREV_AT + 32;
const TAGS_AT: usize = LAST_AT + 32;

/// Bytes of an event's hash kept in a [`CHAIN_TAGGED`] chain.
const TAG: usize = 4;

/// The block of one node's lines (in `seq` order; at least one), chained after `prev`, and
/// the hash of its last event. The lines are stored as they are: hashing them is the only
/// work per event besides compression.
fn line_block(
    node: &str,
    prev: [u8; 32],
    events: &[&RawEvent<'_>],
) -> crate::Result<(Block, [u8; 32])> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Err(crate::StoreError::corrupt("an empty audit block"));
    };
    let mut body = Vec::with_capacity(events.iter().map(|e| e.line.len() + 1).sum());
    let mut chain = Vec::with_capacity(TAGS_AT + TAG * events.len());
    chain.push(CHAIN_TAGGED);
    chain.extend_from_slice(&prev);
    chain.extend_from_slice(&[0; 32]); // the last event's hash, once it is known
    let mut hash = prev;
    let (mut lo, mut hi) = (
        (first.head.at_ms, first.head.seq),
        (first.head.at_ms, first.head.seq),
    );
    for e in events {
        body.extend_from_slice(e.line);
        body.push(b'\n');
        hash = line_hash(&hash, e.line);
        chain.extend_from_slice(&hash[..TAG]);
        lo = lo.min((e.head.at_ms, e.head.seq));
        hi = hi.max((e.head.at_ms, e.head.seq));
    }
    chain[LAST_AT..TAGS_AT].copy_from_slice(&hash);
    let block = Block {
        first_seq: first.head.seq,
        last_seq: last.head.seq,
        min_id: event_id(lo.0, lo.1, node),
        max_id: event_id(hi.0, hi.1, node),
        events: stored_block(&body),
        chain: Some(chain),
        refs: block_refs(events.iter().map(|e| Mentions::of_line(&e.head))),
    };
    Ok((block, hash))
}

/// The largest block body and event count accepted when reading. Blocks are written with at
/// most 1,000 events (512 shipped lines, or 1,000 converted rows); an edited body
/// that decompresses to more must not make a reader allocate gigabytes (LZ4 expands repeated
/// text up to 255-fold).
const MAX_BLOCK_BYTES: usize = 16 << 20;
const MAX_BLOCK_EVENTS: usize = 20_000;

/// A stored block's JSON lines: the body is LZ4-compressed with its size in front (JSON lines
/// of audit events shrink about sixfold). `None` when it does not decompress.
pub fn block_text(stored: &[u8]) -> Option<Vec<u8>> {
    let size = stored.get(..4)?;
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
    if usize::try_from(size).ok()? > MAX_BLOCK_BYTES {
        return None;
    }
    lz4_flex::decompress_size_prepended(stored).ok()
}

/// A block body as stored, from its JSON lines (for tools and tests that play the attacker).
pub fn stored_block(text: &[u8]) -> Vec<u8> {
    lz4_flex::compress_prepend_size(text)
}

/// The events of a stored block. A line that no longer parses (edited in the database) is an
/// event at that place's `seq` with no hash, which the chain check reports as changed and
/// listings skip; a body that does not decompress, or one with more events than any block is
/// written with, ends with one. A line-chained block's events get
/// their ids and hashes from their place and `chain`, and keep their line for the check.
pub(crate) fn decode_block(
    node: &str,
    (first_seq, last_seq): (i64, i64),
    stored: &[u8],
    chain: Option<&[u8]>,
) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    let mut next = first_seq;
    let unreadable = |seq| AuditEvent {
        node: node.to_owned(),
        seq,
        ..AuditEvent::default()
    };
    let Some(body) = block_text(stored) else {
        out.push(unreadable(next));
        return out;
    };
    let events = usize::try_from(last_seq.saturating_sub(first_seq).saturating_add(1)).unwrap_or(0);
    let mut tagged = chain.and_then(|c| Tagged::of(c, events));
    let hash_at = |i: usize| -> Option<String> {
        let h: &[u8; 32] = chain?.get(32 * i..32 * (i + 1))?.try_into().ok()?;
        Some(hex(h))
    };
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if out.len() >= MAX_BLOCK_EVENTS {
            out.push(unreadable(next));
            break;
        }
        // The hashes of this place: every line, read or not, moves the chain on.
        let i = out.len();
        let (prev_hash, hash) = match &mut tagged {
            Some(t) => t.next(line),
            None => (
                hash_at(i).unwrap_or_default(),
                hash_at(i + 1).unwrap_or_default(),
            ),
        };
        // The whole line must be UTF-8 (serde_json does not check fields it skips): what is
        // kept for the chain check is then exactly the bytes that were hashed.
        let event = std::str::from_utf8(line).ok().and_then(|text| {
            let mut e: AuditEvent = serde_json::from_str(text).ok()?;
            if chain.is_some() {
                e.id = event_id(e.at_ms, e.seq, &e.node);
                e.prev_hash = prev_hash;
                e.hash = hash;
                e.line = Some(text.to_owned());
            }
            Some(e)
        });
        match event {
            Some(e) => {
                next = e.seq.saturating_add(1);
                out.push(e);
            }
            // One event at its place, without a hash; the lines after it still read.
            None => {
                out.push(unreadable(next));
                next = next.saturating_add(1);
            }
        }
    }
    // A block with events outside the range its row gives (a copy of another block, say)
    // stands for one unreadable event at its start: listings do not show those events twice,
    // and the chain check does not take them for the events of that place.
    if out.iter().any(|e| e.seq < first_seq || e.seq > last_seq) {
        return vec![unreadable(first_seq)];
    }
    out
}

/// The hashes of a [`CHAIN_TAGGED`] block's events, recomputed from its lines in order.
struct Tagged<'c> {
    /// The hash before the next line.
    at: [u8; 32],
    /// The stored hash of the last event.
    last: [u8; 32],
    tags: &'c [u8],
    /// Events the block's row says it holds.
    events: usize,
    next: usize,
    /// A tag differed: the lines after it are chained on what the block holds now, not on
    /// what was hashed when it was written, so none of their hashes is known.
    broken: bool,
}

impl<'c> Tagged<'c> {
    fn of(chain: &'c [u8], events: usize) -> Option<Self> {
        if chain.len().is_multiple_of(2) || chain.first() != Some(&CHAIN_TAGGED) {
            return None;
        }
        Some(Tagged {
            at: chain.get(PREV_AT..LAST_AT)?.try_into().ok()?,
            last: chain.get(LAST_AT..TAGS_AT)?.try_into().ok()?,
            tags: chain.get(TAGS_AT..)?,
            events,
            next: 0,
            broken: false,
        })
    }

    /// `(prev_hash, hash)` of the event of the next line. Where the block no longer holds
    /// what was hashed, `hash` is what it stored instead (its tag, or its last hash; empty
    /// if there is none), which the chain check then reports as changed. The last hash is
    /// checked at the line of the last tag, when the row's range has a tag for each event,
    /// not at the body's last line: a block whose last lines were deleted is then reported
    /// as missing them (by `seq`), and one whose tags were cut as changed where they end.
    fn next(&mut self, line: &[u8]) -> (String, String) {
        let prev = self.at;
        let h = line_hash(&prev, line);
        self.at = h;
        let tag = self.tags.get(TAG * self.next..TAG * (self.next + 1));
        self.next += 1;
        let last = self.next == self.events && self.tags.len() == TAG * self.events;
        let tag_holds = !self.broken && tag == Some(&h[..TAG]);
        let hash = if tag_holds && (!last || h == self.last) {
            hex(&h)
        } else {
            self.broken = true;
            match tag {
                Some(_) if tag_holds => hex(&self.last),
                Some(t) => t.iter().map(|b| format!("{b:02x}")).collect(),
                None => String::new(),
            }
        };
        (hex(&prev), hash)
    }
}

/// Whether `e` matches `f` and lies before the cursor (an event id).
fn matches(f: &AuditFilter, cursor: Option<&str>, e: &AuditEvent) -> bool {
    fn eq(want: &Option<String>, have: Option<&str>) -> bool {
        want.as_deref().is_none_or(|w| have == Some(w))
    }
    !e.hash.is_empty()
        && eq(&f.tenant_id, e.tenant_id.as_deref())
        && eq(&f.key_id, e.key_id.as_deref())
        && eq(&f.user_id, e.user_id.as_deref())
        && eq(&f.action, Some(e.action.as_str()))
        && eq(&f.code, e.code.as_deref())
        && f.since_ms.is_none_or(|t| e.at_ms >= t)
        && f.until_ms.is_none_or(|t| e.at_ms < t)
        && cursor.is_none_or(|c| e.id.as_str() < c)
        && f.owner.as_ref().is_none_or(|o| o.owns(e))
}

/// The smallest id of an event at or after `ms` (ids begin with the 13-digit time).
fn id_at(ms: i64) -> String {
    format!("evt_{:013}", ms.max(0))
}

impl crate::SqlStore {
    /// Writes one block and its references. `replay` tolerates a block that is
    /// there already (two nodes converting the same old rows at once): then nothing is
    /// written and the answer is `false`.
    async fn insert_block(
        conn: &mut sqlx::AnyConnection,
        node: &str,
        b: &Block,
        replay: bool,
    ) -> crate::Result<bool> {
        let conflict = if replay {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        let mut q = Sql::new(
            "INSERT INTO audit_blocks (node, first_seq, last_seq, min_id, max_id, events, chain) ",
        );
        q.push_values([()], |mut v, ()| {
            v.push_bind(node)
                .push_bind(b.first_seq)
                .push_bind(b.last_seq)
                .push_bind(b.min_id.as_str())
                .push_bind(b.max_id.as_str())
                .push_bind(b.events.as_slice())
                .push_bind(b.chain.as_deref());
        });
        q.push(conflict);
        if q.build()?.execute(&mut *conn).await?.rows_affected() == 0 {
            return Ok(false);
        }
        for chunk in b.refs.chunks(500) {
            let mut q =
                Sql::new("INSERT INTO audit_block_refs (ref, max_id, node, first_seq, min_id) ");
            q.push_values(chunk.iter(), |mut v, r| {
                v.push_bind(r.as_str())
                    .push_bind(b.max_id.as_str())
                    .push_bind(node)
                    .push_bind(b.first_seq)
                    .push_bind(b.min_id.as_str());
            });
            q.push(conflict);
            q.build()?.execute(&mut *conn).await?;
        }
        Ok(true)
    }

    /// Adds a batch's per-minute usage to the roll-up, in one statement (the keys of
    /// `usage` are distinct, as one upsert statement needs).
    async fn add_usage(conn: &mut sqlx::AnyConnection, usage: Usage<'_>) -> crate::Result<()> {
        let rows: Vec<_> = usage.into_iter().collect();
        for chunk in rows.chunks(500) {
            let mut q = Sql::new(
                "INSERT INTO usage_minutes (key_id, tenant_id, minute, code, requests, credits) ",
            );
            q.push_values(
                chunk,
                |mut b, ((key, minute, code), (tenant, n, credits))| {
                    b.push_bind(*key)
                        .push_bind(*tenant)
                        .push_bind(*minute)
                        .push_bind(*code)
                        .push_bind(*n)
                        .push_bind(*credits);
                },
            );
            q.push(
                " ON CONFLICT (key_id, minute, code) DO UPDATE SET \
                 requests = usage_minutes.requests + excluded.requests, \
                 credits = usage_minutes.credits + excluded.credits",
            );
            q.build()?.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Moves a node's chain head.
    async fn set_head(
        conn: &mut sqlx::AnyConnection,
        node: &str,
        seq: i64,
        hash: &str,
    ) -> crate::Result<()> {
        let mut q = Sql::new("INSERT INTO audit_heads (node, seq, hash) ");
        q.push_values([()], |mut b, ()| {
            b.push_bind(node).push_bind(seq).push_bind(hash);
        });
        q.push(" ON CONFLICT (node) DO UPDATE SET seq = excluded.seq, hash = excluded.hash");
        q.build()?.execute(&mut *conn).await?;
        Ok(())
    }

    /// Moves the rows of `audit_events` (where earlier versions stored one event per
    /// row) into blocks of up to 1,000, each batch in one transaction with its
    /// deletion, so a crash midway loses and repeats nothing. Returns how many moved.
    pub(crate) async fn convert_row_audit(&self) -> crate::Result<u64> {
        let mut moved = 0;
        loop {
            let mut tx = self.begin_write().await?;
            let rows = Sql::new(format!(
                "SELECT {} FROM audit_events ORDER BY node, seq LIMIT 1000",
                COLUMNS
            ))
            .build()?
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(moved);
            }
            let events = rows
                .iter()
                .map(crate::rows::audit_from_row)
                .collect::<crate::Result<Vec<AuditEvent>>>()?;
            let mut by_node: BTreeMap<&str, Vec<&AuditEvent>> = BTreeMap::new();
            for e in &events {
                by_node.entry(e.node.as_str()).or_default().push(e);
            }
            for (node, evs) in by_node {
                let b = block_of(&evs)?;
                // Another node may have moved (some of) these rows first: then delete
                // only what its block holds, and take the rest in the next round.
                let last_seq = if Self::insert_block(&mut tx, node, &b, true).await? {
                    b.last_seq
                } else {
                    Sql::new("SELECT last_seq FROM audit_blocks WHERE node = ")
                        .push_bind(node)
                        .push(" AND first_seq = ")
                        .push_bind(b.first_seq)
                        .build_query_scalar()?
                        .fetch_one(&mut *tx)
                        .await?
                };
                Sql::new("DELETE FROM audit_events WHERE node = ")
                    .push_bind(node)
                    .push(" AND seq >= ")
                    .push_bind(b.first_seq)
                    .push(" AND seq <= ")
                    .push_bind(last_seq)
                    .build()?
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            moved += events.len() as u64;
        }
    }
}

#[async_trait::async_trait]
impl crate::AuditStore for crate::SqlStore {
    async fn append_audit(&self, events: &[AuditEvent]) -> crate::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let mut by_node: BTreeMap<&str, Vec<&AuditEvent>> = BTreeMap::new();
        for e in events {
            by_node.entry(e.node.as_str()).or_default().push(e);
        }
        for (node, evs) in by_node {
            let head: Option<i64> = Sql::new("SELECT seq FROM audit_heads WHERE node = ")
                .push_bind(node)
                .build_query_scalar()?
                .fetch_optional(&mut *tx)
                .await?;
            // Replayed after a crash: what reached the store already is skipped.
            let fresh: Vec<&AuditEvent> = evs
                .into_iter()
                .filter(|e| e.seq > head.unwrap_or(0))
                .collect();
            let Some(last) = fresh.last() else { continue };
            let block = block_of(&fresh)?;
            Self::insert_block(&mut tx, node, &block, false).await?;
            let usage = usage_of(fresh.iter().map(|e| Counted::of(e)));
            Self::add_usage(&mut tx, usage).await?;
            Self::set_head(&mut tx, node, last.seq, &last.hash).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn append_audit_lines(
        &self,
        events: &[RawEvent<'_>],
    ) -> crate::Result<BTreeMap<String, i64>> {
        let mut before = BTreeMap::new();
        if events.is_empty() {
            return Ok(before);
        }
        let mut tx = self.begin_write().await?;
        let mut by_node: BTreeMap<&str, Vec<&RawEvent<'_>>> = BTreeMap::new();
        for e in events {
            by_node.entry(&e.head.node).or_default().push(e);
        }
        for (node, evs) in by_node {
            let head: Option<(i64, String)> =
                Sql::new("SELECT seq, hash FROM audit_heads WHERE node = ")
                    .push_bind(node)
                    .build_query_as()?
                    .fetch_optional(&mut *tx)
                    .await?;
            let (head_seq, head_hash) =
                head.unwrap_or_else(|| (0, keygate_core::audit::GENESIS.to_owned()));
            before.insert(node.to_owned(), head_seq);
            let prev = keygate_core::audit::unhex(&head_hash).ok_or_else(|| {
                crate::StoreError::corrupt(format!("the audit head of {node} is not a hash"))
            })?;
            // Replayed after a crash: what reached the store already is skipped.
            let fresh: Vec<&RawEvent<'_>> =
                evs.into_iter().filter(|e| e.head.seq > head_seq).collect();
            let Some(last) = fresh.last() else { continue };
            let mut hash = prev;
            for part in fresh.chunks(LINE_BLOCK_EVENTS) {
                // Each insert's await lets requests run between blocks.
                let block;
                (block, hash) = line_block(node, hash, part)?;
                Self::insert_block(&mut tx, node, &block, false).await?;
            }
            let usage = usage_of(fresh.iter().map(|e| Counted::of_line(e)));
            Self::add_usage(&mut tx, usage).await?;
            Self::set_head(&mut tx, node, last.head.seq, &hex(&hash)).await?;
        }
        tx.commit().await?;
        Ok(before)
    }

    async fn audit_nodes(&self) -> crate::Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT node FROM audit_blocks ORDER BY node")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn audit_heads(&self) -> crate::Result<Vec<(String, i64, String)>> {
        Ok(
            sqlx::query_as("SELECT node, seq, hash FROM audit_heads ORDER BY node")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn list_audit(
        &self,
        f: &AuditFilter,
        page: &PageRequest,
    ) -> crate::Result<Vec<AuditEvent>> {
        let limit = page.limit as usize;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lo = f.since_ms.map(id_at);
        let hi = match (f.until_ms.map(id_at), page.cursor.clone()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let refs = refs_for(f);
        // Blocks newest first (by their newest event); a block is read whole, and
        // the walk stops once `limit` events are in hand that are all newer than
        // anything the next block holds.
        let mut out: Vec<AuditEvent> = Vec::new();
        let mut below: Option<String> = None;
        loop {
            let mut q = Sql::new(
                "SELECT b.node, b.first_seq, b.last_seq, b.max_id, b.events, b.chain FROM ",
            );
            let t = match refs.split_first() {
                Some((first, rest)) => {
                    q.push(
                        "audit_block_refs r JOIN audit_blocks b \
                         ON b.node = r.node AND b.first_seq = r.first_seq WHERE r.ref = ",
                    )
                    .push_bind(first.as_str());
                    for r in rest {
                        q.push(
                            " AND EXISTS (SELECT 1 FROM audit_block_refs x WHERE \
                             x.node = b.node AND x.first_seq = b.first_seq AND x.ref = ",
                        )
                        .push_bind(r.as_str())
                        .push(")");
                    }
                    "r"
                }
                None => {
                    q.push("audit_blocks b WHERE 1 = 1");
                    "b"
                }
            };
            if let Some(x) = &below {
                q.push(format_args!(" AND {t}.max_id < "))
                    .push_bind(x.as_str());
            }
            if let Some(lo) = &lo {
                q.push(format_args!(" AND {t}.max_id >= "))
                    .push_bind(lo.as_str());
            }
            if let Some(hi) = &hi {
                q.push(format_args!(" AND {t}.min_id < "))
                    .push_bind(hi.as_str());
            }
            q.push(format_args!(" ORDER BY {t}.max_id DESC LIMIT "))
                .push_bind(BLOCK_PAGE);
            let rows: Vec<(String, i64, i64, String, Vec<u8>, Option<Vec<u8>>)> =
                q.build_query_as()?.fetch_all(&self.pool).await?;
            let fetched = rows.len();
            for (node, first_seq, last_seq, max_id, body, chain) in rows {
                if out.len() >= limit && out[limit - 1].id > max_id {
                    return Ok(out);
                }
                out.extend(
                    decode_block(&node, (first_seq, last_seq), &body, chain.as_deref())
                        .into_iter()
                        .filter(|e| matches(f, page.cursor.as_deref(), e)),
                );
                out.sort_unstable_by(|a, b| b.id.cmp(&a.id));
                out.truncate(limit);
                below = Some(max_id);
            }
            if fetched < BLOCK_PAGE as usize {
                return Ok(out);
            }
        }
    }

    async fn audit_chain(
        &self,
        node: &str,
        after_seq: i64,
        limit: u32,
    ) -> crate::Result<Vec<AuditEvent>> {
        let limit = limit as usize;
        let mut out = Vec::new();
        let mut past: Option<i64> = None;
        loop {
            let mut q = Sql::new(
                "SELECT first_seq, last_seq, events, chain FROM audit_blocks WHERE node = ",
            );
            q.push_bind(node)
                .push(" AND last_seq > ")
                .push_bind(after_seq);
            if let Some(p) = past {
                q.push(" AND first_seq > ").push_bind(p);
            }
            q.push(" ORDER BY first_seq LIMIT ").push_bind(BLOCK_PAGE);
            let rows: Vec<(i64, i64, Vec<u8>, Option<Vec<u8>>)> =
                q.build_query_as()?.fetch_all(&self.pool).await?;
            let fetched = rows.len();
            for (first_seq, last_seq, body, chain) in rows {
                out.extend(
                    decode_block(node, (first_seq, last_seq), &body, chain.as_deref())
                        .into_iter()
                        .filter(|e| e.seq > after_seq),
                );
                if out.len() >= limit {
                    out.truncate(limit);
                    return Ok(out);
                }
                past = Some(first_seq);
            }
            if fetched < BLOCK_PAGE as usize {
                return Ok(out);
            }
        }
    }

    async fn usage(
        &self,
        of: &UsageOf,
        bucket_ms: i64,
        since_ms: i64,
        until_ms: i64,
    ) -> crate::Result<Vec<UsageRow>> {
        let (col, id) = match of {
            UsageOf::Key(k) => ("key_id", k.as_str()),
            UsageOf::Tenant(t) => ("tenant_id", t.as_str()),
        };
        let mut q = Sql::new("SELECT (minute / ");
        q.push_bind(bucket_ms)
            .push(") * ")
            .push_bind(bucket_ms)
            .push(format_args!(
                " AS bucket, code, CAST(SUM(requests) AS BIGINT), CAST(SUM(credits) AS BIGINT) \
                 FROM usage_minutes WHERE {col} = "
            ))
            .push_bind(id)
            .push(" AND minute >= ")
            .push_bind(since_ms)
            .push(" AND minute < ")
            .push_bind(until_ms)
            .push(" GROUP BY bucket, code ORDER BY bucket, code");
        let rows: Vec<(i64, String, i64, i64)> = q.build_query_as()?.fetch_all(&self.pool).await?;
        Ok(page_usage(rows))
    }

    async fn prune_usage(&self, before_ms: i64) -> crate::Result<u64> {
        let r = Sql::new("DELETE FROM usage_minutes WHERE minute < ")
            .push_bind(before_ms)
            .build()?
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// The result of checking every node's chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditReport {
    /// Events checked.
    pub checked: u64,
    /// Chains (nodes) checked.
    pub nodes: u64,
    /// The first broken place, with its node; `None` when every chain is intact.
    pub broken: Option<(String, keygate_core::ChainBreak)>,
}

/// Walks every node's chain from its first event to its recorded head (as read when the walk
/// starts: events shipped meanwhile are left for the next run), in pages, and reports the
/// first event that was changed, inserted or is missing. The head moves in the same
/// transaction as the events, so a deleted tail shows as missing against it, a last event
/// re-hashed to hide a change no longer matches the head's hash, and events beyond the head
/// (once the head is read again) or of a node without a head were inserted.
pub async fn verify_audit(store: &dyn crate::Store) -> crate::Result<AuditReport> {
    let mut report = AuditReport {
        checked: 0,
        nodes: 0,
        broken: None,
    };
    let mut known = BTreeSet::new();
    for (node, head_seq, head_hash) in store.audit_heads().await? {
        report.nodes += 1;
        let (mut seq, mut hash) = (0, keygate_core::audit::GENESIS.to_owned());
        while seq < head_seq {
            let mut page = store.audit_chain(&node, seq, 1_000).await?;
            page.retain(|e| e.seq <= head_seq);
            if page.is_empty() {
                break;
            }
            match keygate_core::verify_chain((seq, &hash), &page) {
                Ok((s, h)) => {
                    report.checked += page.len() as u64;
                    (seq, hash) = (s, h);
                }
                Err(b) => {
                    report.broken = Some((node, b));
                    return Ok(report);
                }
            }
        }
        let problem = if seq < head_seq {
            Some((seq + 1, keygate_core::ChainProblem::Missing))
        } else if hash != head_hash {
            Some((head_seq, keygate_core::ChainProblem::Changed))
        } else {
            None
        };
        if let Some((seq, problem)) = problem {
            report.broken = Some((node, keygate_core::ChainBreak { seq, problem }));
            return Ok(report);
        }
        // Anything after the head must have been shipped since it was read: then the head
        // has moved past it (the shipper moves both in one transaction).
        if let Some(after) = store.audit_chain(&node, head_seq, 1).await?.first() {
            if after.seq > head_of(store, &node).await?.unwrap_or(0) {
                report.broken = Some((node, inserted(after.seq)));
                return Ok(report);
            }
        }
        known.insert(node);
    }
    for node in store.audit_nodes().await? {
        // A node that began shipping since the heads were read has a head by now.
        if !known.contains(&node) && head_of(store, &node).await?.is_none() {
            let first = store.audit_chain(&node, 0, 1).await?;
            let seq = first.first().map_or(1, |e| e.seq);
            report.broken = Some((node, inserted(seq)));
            return Ok(report);
        }
    }
    Ok(report)
}

fn inserted(seq: i64) -> keygate_core::ChainBreak {
    keygate_core::ChainBreak {
        seq,
        problem: keygate_core::ChainProblem::Inserted,
    }
}

/// A node's head `seq`, read now.
async fn head_of(store: &dyn crate::Store, node: &str) -> crate::Result<Option<i64>> {
    Ok(store
        .audit_heads()
        .await?
        .into_iter()
        .find(|h| h.0 == node)
        .map(|h| h.1))
}

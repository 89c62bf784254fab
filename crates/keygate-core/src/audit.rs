//! Audit events and their hash chain.
//!
//! Every node numbers its events `1, 2, 3, …` (`seq`) and chains them: an event's `hash` is
//! SHA-256 over the previous event's hash and the event's canonical encoding. Editing a stored
//! event changes its hash; deleting one leaves a gap in `seq`; putting a forged one in breaks
//! the `prev_hash` link of the one after it. [`verify_chain`] finds the first of these.
//!
//! The canonical encoding is length-prefixed (so no field can bleed into the next) and covers
//! every field except `hash` itself, in declaration order.

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
        let digest = h.finalize();
        let mut out = String::with_capacity(64);
        for b in digest {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        out
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
}

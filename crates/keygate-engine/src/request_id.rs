//! The request id: made once per request, carried in a task-local so that error bodies,
//! audit lines and logs of the same request name it. It chooses no branch.

use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

tokio::task_local! {
    static REQUEST_ID: HeaderValue;
}

/// A request id: a per-process random prefix and a counter, so it is unique across nodes and
/// costs no system call.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

static NODE_PREFIX: OnceLock<String> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(1);

impl RequestId {
    /// A fresh id.
    pub fn new() -> Self {
        let prefix = NODE_PREFIX.get_or_init(|| crate::ids::random_base62(8));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Built on the stack and copied once: this runs on every request. The counter is
        // zero-padded to 10 digits so ids sort in issue order within a node.
        let mut buf = [0u8; 4 + 8 + 20];
        buf[..4].copy_from_slice(b"req_");
        let p = &prefix.as_bytes()[..prefix.len().min(8)];
        buf[4..4 + p.len()].copy_from_slice(p);
        let mut digits = itoa::Buffer::new();
        let d = digits.format(n).as_bytes();
        let start = 4 + p.len();
        let pad = 10usize.saturating_sub(d.len());
        buf[start..start + pad].fill(b'0');
        buf[start + pad..start + pad + d.len()].copy_from_slice(d);
        let end = start + pad + d.len();
        // ASCII alphanumerics and `_`: always a valid header value.
        RequestId(
            HeaderValue::from_bytes(&buf[..end]).unwrap_or(HeaderValue::from_static("req_unknown")),
        )
    }

    /// The id of the request being served by this task, if any.
    pub fn current() -> Option<String> {
        REQUEST_ID
            .try_with(|r| r.to_str().unwrap_or_default().to_owned())
            .ok()
    }

    /// Calls `f` with the current request's id, borrowed where it is kept (a clone of the
    /// id's bytes may allocate: a header value made from a `Vec` becomes shared on its first
    /// clone).
    pub fn with_current<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
        let mut f = Some(f);
        let done = REQUEST_ID
            .try_with(|v| f.take().map(|f| f(v.to_str().ok())))
            .ok()
            .flatten();
        match (done, f) {
            (Some(r), _) => r,
            (None, Some(f)) => f(None),
            (None, None) => unreachable!("`f` is taken only by a call that returns its answer"),
        }
    }

    /// The current request's id, or a fresh one when the request runs outside the
    /// request-id middleware (the hot decision path sets its own).
    pub fn current_or_new() -> HeaderValue {
        REQUEST_ID
            .try_with(HeaderValue::clone)
            .unwrap_or_else(|_| RequestId::new().0)
    }

    /// Runs the synchronous `f` with this id as the current one.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        REQUEST_ID.sync_scope(self.0, f)
    }

    /// Runs `f` with this id as the current one.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        REQUEST_ID.scope(self.0, f).await
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

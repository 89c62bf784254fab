//! A real upstream HTTP server for gateway tests: echoes what it received as JSON, counts
//! hits, and has slow, failing and streaming endpoints.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn echo(
    State(hits): State<Arc<AtomicUsize>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    let h: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::from(v.to_str().unwrap_or("?")),
            )
        })
        .collect();
    (
        [
            ("x-upstream", "yes"),
            ("connection", "x-secret-hop"),
            ("x-secret-hop", "1"),
        ],
        axum::Json(serde_json::json!({
            "method": method.as_str(),
            "uri": uri.to_string(),
            "headers": h,
            "body_len": body.len(),
        })),
    )
}

async fn status(State(hits): State<Arc<AtomicUsize>>, Path(code): Path<u16>) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        "status",
    )
}

async fn slow(State(hits): State<Arc<AtomicUsize>>, Path(ms): Path<u64>) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "slow done"
}

/// Streams `n` MiB in 64 KiB chunks.
async fn big(State(hits): State<Arc<AtomicUsize>>, Path(n): Path<usize>) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_stream(chunk, n * 16);
    Body::from_stream(stream)
}

fn futures_stream(
    chunk: Bytes,
    count: usize,
) -> impl futures_core_stream::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_core_stream::iter(chunk, count)
}

mod futures_core_stream {
    //! A tiny hand-rolled stream (the test needs nothing more than "n copies of a chunk").
    use axum::body::Bytes;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use futures_core::Stream;

    pub struct Iter {
        chunk: Bytes,
        left: usize,
    }

    pub fn iter(chunk: Bytes, count: usize) -> Iter {
        Iter { chunk, left: count }
    }

    impl Stream for Iter {
        type Item = Result<Bytes, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(self.chunk.clone())))
        }
    }
}

/// Starts the upstream on a free port.
pub async fn spawn() -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/status/{code}", any(status))
        .route("/slow/{ms}", any(slow))
        .route("/big/{n}", any(big))
        .fallback(any(echo))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Upstream { addr, hits }
}

/// A port on which nothing listens.
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

//! The baseline for load tests: a bare axum server answering `200 ok` on every path, built
//! with the same dependencies and profile as keygate. `bench/forward-auth.sh` compares
//! keygate's `/v1/auth` against it in the same run.

use axum::routing::any;
use axum::Router;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9901".into());
    let app = Router::new().fallback(any(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("baseline listening on http://{addr}");
    axum::serve(listener, app).await
}

//! The health and metrics endpoint: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use scm_runtime::{Metrics, Readiness};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
}

/// Serves until `shutdown` is cancelled. Binds before returning so a bad address fails start-up.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let state = AppState {
        metrics,
        readiness,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    let pending = s.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ok".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("caches not synced: {}\n", pending.join(", ")),
        )
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

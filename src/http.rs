//! The health and metrics endpoint: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use scm_runtime::{Informers, Metrics, Readiness};
use tokio_util::sync::CancellationToken;

/// How long a kind's watch may fail without a single success before `/healthz` fails: long
/// enough to ride out an API server restart or upgrade, short enough that a replica cut off
/// from the cluster is restarted rather than kept as a silent leader.
pub const WATCH_STALL_BOUND: Duration = Duration::from_secs(300);

/// What `/healthz` answers from: a controller that ended, or a watch failing for too long.
#[derive(Clone)]
pub struct Health {
    failed: Arc<Mutex<Option<String>>>,
    informers: Informers,
}

impl Health {
    /// Healthy until [`Health::fail`] or a stalled watch.
    pub fn new(informers: Informers) -> Self {
        Health {
            failed: Arc::new(Mutex::new(None)),
            informers,
        }
    }

    /// Marks the process unhealthy for good, saying why.
    pub fn fail(&self, why: String) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// `None` when healthy, else why not.
    pub fn problem(&self, bound: Duration) -> Option<String> {
        if let Some(why) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(why);
        }
        let stalled = self.informers.stalled(bound);
        (!stalled.is_empty()).then(|| {
            let kinds: Vec<String> = stalled
                .iter()
                .map(|(k, d)| format!("{k} for {}s", d.as_secs()))
                .collect();
            format!("watches failing: {}", kinds.join(", "))
        })
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
    health: Health,
    shutdown: CancellationToken,
}

/// Serves until `shutdown` is cancelled. Binds before returning so a bad address fails start-up.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let state = AppState {
        metrics,
        readiness,
        health,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.problem(WATCH_STALL_BOUND) {
        None => (StatusCode::OK, "ok".to_string()),
        Some(why) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.problem(WATCH_STALL_BOUND).is_some() {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".to_string());
    }
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

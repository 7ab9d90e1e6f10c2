//! The health and metrics endpoints: `/healthz` (with a subpath per check, as
//! kube-controller-manager lists them), `/livez`, `/readyz` and `/metrics`. The same router is
//! served on the secure port (behind delegated authentication, [`crate::serving`]) and, when
//! `--http-address` is set, as plain HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use scm_runtime::{Informers, Metrics, Readiness};
use tokio_util::sync::CancellationToken;

/// How long a kind's watch may fail without a single success before `/healthz` fails: long
/// enough to ride out an API server restart or upgrade, short enough that a replica cut off
/// from the cluster is restarted rather than kept as a silent leader.
pub const WATCH_STALL_BOUND: Duration = Duration::from_secs(300);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    /// A task that ended without a name to blame (a task cancelled under us).
    failed: Mutex<Option<String>>,
    informers: Informers,
    controllers: Mutex<Vec<&'static str>>,
    ended: Mutex<BTreeMap<&'static str, String>>,
    /// Set while the leader elector runs; `None` without leader election.
    elector: Mutex<Option<Arc<AtomicBool>>>,
}

/// What `/healthz` answers from: the named checks `ping`, `informers`, `leaderElection` (with
/// `--leader-elect`) and one per controller.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

impl Health {
    /// Healthy until a check fails.
    pub fn new(informers: Informers) -> Self {
        Health {
            inner: Arc::new(Inner {
                failed: Mutex::new(None),
                informers,
                controllers: Mutex::new(Vec::new()),
                ended: Mutex::new(BTreeMap::new()),
                elector: Mutex::new(None),
            }),
        }
    }

    /// Marks the process unhealthy for good, saying why (a task no controller's check covers).
    pub fn fail(&self, why: String) {
        lock(&self.inner.failed).get_or_insert(why);
    }

    /// Adds a check per controller: healthy while its task runs.
    pub fn add_controllers(&self, names: &[&'static str]) {
        lock(&self.inner.controllers).extend_from_slice(names);
    }

    /// Fails the check of `name` for good: its task ended, saying why.
    pub fn controller_ended(&self, name: &'static str, why: String) {
        lock(&self.inner.ended).entry(name).or_insert(why);
    }

    /// Adds the `leaderElection` check and returns its flag: the elector clears it when it
    /// ends, which (short of shutdown) leaves nobody renewing or acquiring the Lease.
    pub fn add_elector(&self) -> Arc<AtomicBool> {
        let alive = Arc::new(AtomicBool::new(true));
        *lock(&self.inner.elector) = Some(alive.clone());
        alive
    }

    /// Every check in kube-controller-manager's order, with its problem if it fails.
    pub fn checks(&self, bound: Duration) -> Vec<(String, Option<String>)> {
        let mut out = vec![("ping".to_string(), None)];
        let stalled = self.inner.informers.stalled(bound);
        out.push((
            "informers".into(),
            (!stalled.is_empty()).then(|| {
                let kinds: Vec<String> = stalled
                    .iter()
                    .map(|(k, d)| format!("{k} for {}s", d.as_secs()))
                    .collect();
                format!("watches failing: {}", kinds.join(", "))
            }),
        ));
        if let Some(alive) = lock(&self.inner.elector).as_ref() {
            out.push((
                "leaderElection".into(),
                (!alive.load(Ordering::Relaxed))
                    .then(|| "the leader elector has stopped".to_string()),
            ));
        }
        if let Some(why) = lock(&self.inner.failed).clone() {
            out.push(("controller-tasks".into(), Some(why)));
        }
        let ended = lock(&self.inner.ended);
        for name in lock(&self.inner.controllers).iter() {
            out.push((name.to_string(), ended.get(name).cloned()));
        }
        out
    }

    /// `None` when healthy, else the first failing check's problem.
    pub fn problem(&self, bound: Duration) -> Option<String> {
        self.checks(bound)
            .into_iter()
            .find_map(|(name, p)| p.map(|p| format!("{name}: {p}")))
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
    health: Health,
    shutdown: CancellationToken,
}

/// The routes, shared by the secure port and the plain `--http-address`.
pub fn router(
    metrics: Metrics,
    readiness: Readiness,
    health: Health,
    shutdown: CancellationToken,
) -> Router {
    let state = AppState {
        metrics,
        readiness,
        health,
        shutdown,
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/healthz/{check}", get(healthz_check))
        .route("/livez", get(healthz))
        .route("/livez/{check}", get(healthz_check))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Serves `app` as plain HTTP on `addr` until `shutdown` is cancelled. Binds before returning
/// so a bad address fails start-up.
pub async fn serve_plain(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

/// The query's `verbose` flag and `exclude=<check>` entries, as k8s.io/apiserver's healthz.
fn query(uri: &Uri) -> (bool, Vec<String>) {
    let mut verbose = false;
    let mut exclude = Vec::new();
    for part in uri.query().unwrap_or("").split('&') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k {
            "verbose" => verbose = true,
            "exclude" => exclude.push(v.to_string()),
            _ => {}
        }
    }
    (verbose, exclude)
}

/// `ok`, or 500 listing each check; reasons are withheld here (the path is served without
/// authentication) and given by `/healthz/<check>`.
async fn healthz(State(s): State<AppState>, uri: Uri) -> impl IntoResponse {
    let (verbose, exclude) = query(&uri);
    let checks: Vec<_> = s
        .health
        .checks(WATCH_STALL_BOUND)
        .into_iter()
        .filter(|(n, _)| !exclude.contains(n))
        .collect();
    let failed = checks.iter().any(|(_, p)| p.is_some());
    if !failed && !verbose {
        return (StatusCode::OK, "ok".to_string());
    }
    let mut body = String::new();
    for (name, p) in &checks {
        match p {
            None => body.push_str(&format!("[+]{name} ok\n")),
            Some(_) => body.push_str(&format!("[-]{name} failed: reason withheld\n")),
        }
    }
    for name in &exclude {
        body.push_str(&format!("[+]{name} excluded: ok\n"));
    }
    if failed {
        body.push_str("healthz check failed\n");
        (StatusCode::INTERNAL_SERVER_ERROR, body)
    } else {
        body.push_str("healthz check passed\n");
        (StatusCode::OK, body)
    }
}

async fn healthz_check(State(s): State<AppState>, Path(check): Path<String>) -> impl IntoResponse {
    match s
        .health
        .checks(WATCH_STALL_BOUND)
        .into_iter()
        .find(|(n, _)| *n == check)
    {
        None => (StatusCode::NOT_FOUND, format!("no check named {check}\n")),
        Some((_, None)) => (StatusCode::OK, "ok".to_string()),
        Some((_, Some(why))) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal server error: {why}\n"),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = kube::Client::try_from(cfg).expect("client");
        Health::new(Informers::new(client, CancellationToken::new()))
    }

    fn failing(h: &Health) -> Vec<String> {
        h.checks(WATCH_STALL_BOUND)
            .into_iter()
            .filter_map(|(n, p)| p.map(|_| n))
            .collect()
    }

    #[tokio::test]
    async fn checks_are_listed_as_kube_controller_manager_lists_them() {
        let h = health();
        h.add_controllers(&["endpointslice", "endpoints"]);
        let _alive = h.add_elector();
        let names: Vec<String> = h
            .checks(WATCH_STALL_BOUND)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "ping",
                "informers",
                "leaderElection",
                "endpointslice",
                "endpoints"
            ]
        );
        assert!(h.problem(WATCH_STALL_BOUND).is_none());
    }

    #[tokio::test]
    async fn a_stopped_elector_or_controller_fails_its_own_check() {
        let h = health();
        h.add_controllers(&["endpointslice", "endpoints"]);
        let alive = h.add_elector();
        alive.store(false, Ordering::Relaxed);
        assert_eq!(failing(&h), ["leaderElection"]);
        h.controller_ended("endpoints", "controller endpoints failed: boom".into());
        assert_eq!(failing(&h), ["leaderElection", "endpoints"]);
        let p = h.problem(WATCH_STALL_BOUND).unwrap_or_default();
        assert!(p.starts_with("leaderElection:"), "{p}");
    }

    #[test]
    fn healthz_query_verbose_and_exclude() {
        let uri: Uri = "/healthz?verbose&exclude=leaderElection&exclude=x"
            .parse()
            .expect("uri");
        assert_eq!(
            query(&uri),
            (true, vec!["leaderElection".to_string(), "x".to_string()])
        );
        let uri: Uri = "/healthz".parse().expect("uri");
        assert_eq!(query(&uri), (false, vec![]));
    }
}

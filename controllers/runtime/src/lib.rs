//! What every controller of service-controller-manager shares: the context the binary hands
//! each controller, a client-go style work queue, the leader gate that guards writes, Events,
//! metrics, readiness, and the worker loop that ties them together.
//!
//! The shape of a controller crate: a pure core computes a plan from observed state; its shell
//! keeps caches (kube-runtime reflectors) that run on every replica, feeds object keys into a
//! [`WorkQueue`], and calls [`run_workers`] with a reconcile function that applies the plan.
//! Workers only run while this process leads.

pub mod client;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod queue;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

pub use events::EventRecorder;
pub use leader::LeaderGate;
pub use metrics::Metrics;
pub use queue::{Backoff, WorkQueue};

/// A namespaced object's key, `namespace/name` (or `name` for cluster-scoped objects).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// The key of `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a kube object.
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        ObjectKey {
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// One flag per controller saying its caches have synced; `/readyz` is ok once all are set.
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<std::sync::Mutex<Vec<(String, Arc<AtomicBool>)>>>,
}

/// A controller's handle on its own readiness flag.
#[derive(Clone)]
pub struct ReadyHandle {
    flag: Arc<AtomicBool>,
}

impl ReadyHandle {
    /// Marks the controller's caches as synced.
    pub fn mark_ready(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

impl Readiness {
    /// Registers a controller that must become ready.
    pub fn register(&self, name: &str) -> ReadyHandle {
        let flag = Arc::new(AtomicBool::new(false));
        self.flags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), flag.clone()));
        ReadyHandle { flag }
    }

    /// Names of controllers whose caches have not synced yet.
    pub fn pending(&self) -> Vec<String> {
        self.flags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, f)| !f.load(Ordering::SeqCst))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Everything the binary hands a controller when it starts it.
#[derive(Clone)]
pub struct ControllerContext {
    /// Name as in `--controllers` (also the metrics label and queue name).
    pub name: String,
    /// API client (QPS and burst already applied).
    pub client: kube::Client,
    /// Whether this process leads; writes only while it does.
    pub leader: LeaderGate,
    /// Shared metrics registry.
    pub metrics: Metrics,
    /// Events as this controller.
    pub events: EventRecorder,
    /// Cancelled on SIGTERM.
    pub shutdown: CancellationToken,
    /// Set once this controller's caches have synced.
    pub ready: ReadyHandle,
}

/// An error a reconcile can return: it knows its metric label (the variant, never an object).
pub trait ReconcileError: std::fmt::Display {
    /// A short, bounded label for `service_controller_manager_reconcile_errors_total`.
    fn metric_label(&self) -> &'static str;
}

/// What to do with a key after a successful reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Nothing more until the next event about it.
    Done,
    /// Look again after this long (e.g. a grace period).
    After(Duration),
}

/// Worker settings.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    /// Keys reconciled at once (the controller's `--concurrent-*-syncs`).
    pub concurrency: usize,
    /// How long shutdown waits for in-flight reconciles before abandoning them.
    pub drain_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 5,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Runs `reconcile` over keys from `queue`, `config.concurrency` at a time, while this process
/// leads. On losing the lease, in-flight reconciles are dropped at once (their keys are queued
/// again for the next leader term); on shutdown, no new key is taken and in-flight ones get
/// `drain_timeout` to finish. Failures back off per key through the queue.
pub async fn run_workers<K, F, Fut, E>(
    ctx: &ControllerContext,
    queue: WorkQueue<K>,
    config: WorkerConfig,
    reconcile: F,
) where
    K: Clone + Eq + std::hash::Hash + Send + Sync + std::fmt::Display + 'static,
    F: Fn(K) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Requeue, E>> + Send + 'static,
    E: ReconcileError + Send + 'static,
{
    let mut leader = ctx.leader.clone();
    let name = ctx.name.clone();
    let qlabel = metrics::QueueLabel { name: name.clone() };
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            ok = leader.wait_leading() => if !ok { return },
        }
        info!(controller = %name, "leading: starting workers");
        let mut inflight = FuturesUnordered::new();
        let mut inflight_keys = std::collections::HashSet::new();
        let mut lost = false;
        loop {
            ctx.metrics
                .workqueue_depth
                .get_or_create(&qlabel)
                .set(queue.len() as i64);
            let can_take = inflight.len() < config.concurrency.max(1);
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => break,
                _ = leader.wait_lost() => { lost = true; break }
                Some((key, result)) = inflight.next(), if !inflight.is_empty() => {
                    inflight_keys.remove(&key);
                    finish(ctx, &queue, &name, key, result);
                }
                key = queue.get(), if can_take => {
                    let Some(key) = key else { break };
                    ctx.metrics.workqueue_adds.get_or_create(&qlabel).inc();
                    inflight_keys.insert(key.clone());
                    let f = reconcile.clone();
                    let timer = ctx.metrics.measure(&name);
                    let span = tracing::debug_span!("reconcile", controller = %name, key = %key);
                    inflight.push(async move {
                        let r = f(key.clone()).instrument(span).await;
                        drop(timer);
                        (key, r)
                    });
                }
            }
        }
        if lost {
            warn!(controller = %name, abandoned = inflight.len(), "lost leadership: stopping workers");
            drop(inflight);
            // The next leader term (ours or another replica's) must look at these again.
            for key in inflight_keys.drain() {
                queue.done(&key);
                queue.add(key);
            }
            continue;
        }
        // Shutdown: let in-flight reconciles finish for a bounded time, then abandon them.
        let drain = async {
            while let Some((key, result)) = inflight.next().await {
                finish(ctx, &queue, &name, key, result);
            }
        };
        if tokio::time::timeout(config.drain_timeout, drain)
            .await
            .is_err()
        {
            warn!(controller = %name, "shutdown: abandoning in-flight reconciles");
        }
        queue.shut_down();
        return;
    }
}

fn finish<K, E>(
    ctx: &ControllerContext,
    queue: &WorkQueue<K>,
    name: &str,
    key: K,
    result: Result<Requeue, E>,
) where
    K: Clone + Eq + std::hash::Hash + Send + std::fmt::Display + 'static,
    E: ReconcileError,
{
    queue.done(&key);
    match result {
        Ok(Requeue::Done) => queue.forget(&key),
        Ok(Requeue::After(d)) => {
            queue.forget(&key);
            queue.add_after(key, d);
        }
        Err(e) => {
            ctx.metrics.record_error(name, e.metric_label());
            ctx.metrics
                .workqueue_retries
                .get_or_create(&metrics::QueueLabel {
                    name: name.to_string(),
                })
                .inc();
            let delay = queue.add_rate_limited(key.clone());
            warn!(controller = %name, key = %key, error = %e, retry_in = ?delay, "reconcile failed");
        }
    }
    debug!(controller = %name, "reconcile finished");
}

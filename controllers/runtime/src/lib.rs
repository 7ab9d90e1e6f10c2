//! What every controller of service-controller-manager shares: the context the binary hands
//! each controller, the process's informers, a client-go style work queue, the leader gate that
//! guards writes, Events, metrics, readiness, and the worker loop that ties them together.
//!
//! The shape of a controller crate: a pure core computes a plan from observed state; its shell
//! subscribes to the shared [`Informers`] (one watch per resource kind for the whole process,
//! each object trimmed once on arrival) and keeps its own index from the [`Change`]s they fan
//! out (`Apply`, `Delete`, and `Relisted`, a complete new list that replaces the index). Indexes
//! run on every replica; the shell feeds object keys into a [`WorkQueue`] and calls
//! [`run_workers`] with a reconcile function that applies the plan. Workers only run while this
//! process leads.
//!
//! Every [`ControllerContext`] is built by [`ContextBase::context`] from one base per process,
//! so controllers share the client, the leader gate, the metrics registry and the informers.

pub mod client;
pub mod conditions;
pub mod events;
pub mod informer;
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
pub use informer::{Change, Informer, Informers};
pub use leader::LeaderGate;
pub use metrics::Metrics;
pub use queue::{Backoff, Priority, WorkQueue};

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

type NamedFlags = Vec<(String, Arc<AtomicBool>)>;

/// One flag per controller saying its caches have synced; `/readyz` is ok once all are set.
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<std::sync::Mutex<NamedFlags>>,
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
    /// The process's informers: one watch per kind, shared by every controller.
    pub informers: Informers,
    /// Set in a dry run (`--dry-run`, `plan`): `client` sends writes as server-side dry runs
    /// and records them here; cloud providers record the calls they skip here too.
    pub dry_run: Option<client::dry_run::DryRun>,
}

/// What every controller's context is built from: one per process, so every controller shares
/// the client, the leader gate, the metrics registry and the informers. The only place a
/// [`ControllerContext`] is made.
#[derive(Clone)]
pub struct ContextBase {
    /// Rate-limited API client.
    pub client: kube::Client,
    /// Leadership.
    pub leader: LeaderGate,
    /// Shared registry.
    pub metrics: Metrics,
    /// Readiness flags behind /readyz.
    pub readiness: Readiness,
    /// Cancelled on SIGTERM.
    pub shutdown: CancellationToken,
    /// This process's identity (the Event reporting instance), if it has one.
    pub identity: Option<String>,
    /// One watch per kind for the whole process.
    pub informers: Informers,
    /// Set in a dry run: every context's client then records its writes, as this controller.
    pub dry_run: Option<client::dry_run::DryRun>,
}

impl ContextBase {
    /// A base for tests, benchmarks and single-controller runs: the given client and leader
    /// gate, a fresh registry, readiness, shutdown token and informers, and no identity.
    pub fn new(client: kube::Client, leader: LeaderGate) -> Self {
        let shutdown = CancellationToken::new();
        ContextBase {
            informers: Informers::new(client.clone(), shutdown.clone()),
            client,
            leader,
            metrics: Metrics::new(),
            readiness: Readiness::default(),
            shutdown,
            identity: None,
            dry_run: None,
        }
    }

    /// The context of controller `name` (as in `--controllers`), whose Events are reported as
    /// `reporter` (upstream's component name, so `kubectl describe` shows familiar sources).
    pub fn context(&self, name: &str, reporter: &str) -> ControllerContext {
        self.metrics.register_controller(name);
        let client = match &self.dry_run {
            Some(d) => d.client(self.client.clone(), name),
            None => self.client.clone(),
        };
        ControllerContext {
            name: name.to_string(),
            client: client.clone(),
            leader: self.leader.clone(),
            metrics: self.metrics.clone(),
            events: EventRecorder::new(client, reporter, self.identity.clone()),
            shutdown: self.shutdown.clone(),
            ready: self.readiness.register(name),
            informers: self.informers.clone(),
            dry_run: self.dry_run.clone(),
        }
    }
}

/// An error a reconcile can return: it knows its metric label (the variant, never an object).
pub trait ReconcileError: std::fmt::Display {
    /// A short, bounded label for `service_controller_manager_reconcile_errors_total`.
    fn metric_label(&self) -> &'static str;

    /// `Some(delay)` when the failure says nothing about this key (a rate limit shared by
    /// every key said "slow down"): the key comes back after `delay` and its own backoff does
    /// not grow, so a throttled pass that made progress is not punished like a broken object.
    fn retry_without_backoff(&self) -> Option<Duration> {
        None
    }
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
        let mut finished = 0;
        loop {
            ctx.metrics
                .workqueue_depth
                .get_or_create(&qlabel)
                .set(queue.len() as i64);
            if let Some(d) = &ctx.dry_run {
                d.report_activity(&name, queue.len(), inflight.len(), finished);
                finished = 0;
            }
            let can_take = inflight.len() < config.concurrency.max(1);
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => break,
                _ = leader.wait_lost() => { lost = true; break }
                Some((key, result)) = inflight.next(), if !inflight.is_empty() => {
                    inflight_keys.remove(&key);
                    finish(ctx, &queue, &name, key, result);
                    finished += 1;
                }
                next = queue.get_timed(), if can_take => {
                    let Some((key, waited)) = next else { break };
                    ctx.metrics.workqueue_adds.get_or_create(&qlabel).inc();
                    ctx.metrics.observe_queue_duration(&name, waited);
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
                let class = queue.class_in_process(&key);
                queue.done(&key);
                queue.add_with(key, class);
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

/// Waits until `synced()` holds, checking every 20 ms, then marks the controller ready.
/// Returns false if shutdown came first. Controllers call it before [`run_workers`]: acting on
/// a partial view could delete what is merely not listed yet.
pub async fn wait_for_sync(ctx: &ControllerContext, synced: impl Fn() -> bool) -> bool {
    while !synced() {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    ctx.ready.mark_ready();
    info!(controller = %ctx.name, "caches synced");
    true
}

/// Runs `work` after each wake-up of `notify`, `coalesce` after it, until `shutdown`: bursts of
/// events (a relist of thousands of objects) cost one run. `work` is CPU-bound, so on a
/// multi-thread runtime it runs in `block_in_place` to keep other tasks moving.
pub async fn run_coalesced(
    notify: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
    coalesce: Duration,
    work: impl Fn(),
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = notify.notified() => {}
        }
        tokio::time::sleep(coalesce).await;
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(&work);
        } else {
            work();
        }
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
    // A retry keeps the class the key was handed out in; a scheduled look is ordinary.
    let class = queue.class_in_process(&key);
    queue.done(&key);
    if ctx.dry_run.is_some() {
        client::dry_run::finish(ctx, queue, name, key, result);
        return;
    }
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
            let delay = match e.retry_without_backoff() {
                Some(d) => {
                    queue.add_after_with(key.clone(), d, class);
                    d
                }
                None => queue.add_rate_limited_with(key.clone(), class),
            };
            warn!(controller = %name, key = %key, error = %e, retry_in = ?delay, "reconcile failed");
        }
    }
    debug!(controller = %name, "reconcile finished");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug)]
    struct Boom;
    impl std::fmt::Display for Boom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("boom")
        }
    }
    impl ReconcileError for Boom {
        fn metric_label(&self) -> &'static str {
            "boom"
        }
    }

    fn context(leading: bool) -> (ControllerContext, tokio::sync::watch::Sender<bool>) {
        // A client that is never used to connect: the worker loop only needs the context.
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = kube::Client::try_from(cfg).expect("client");
        let (gate, tx) = LeaderGate::fixed(leading);
        (ContextBase::new(client, gate).context("test", "test"), tx)
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Workers whose reconcile answers `outcome(n)` for its n-th call (from 0); returns the
    /// call counter and the workers' task.
    fn spawn_counting<E: ReconcileError + Send + 'static>(
        ctx: &ControllerContext,
        queue: &WorkQueue<String>,
        outcome: fn(usize) -> Result<Requeue, E>,
    ) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let (ctx, queue) = (ctx.clone(), queue.clone());
        let w = tokio::spawn(async move {
            run_workers(&ctx, queue, WorkerConfig::default(), move |_k: String| {
                let c = c.clone();
                async move { outcome(c.fetch_add(1, Ordering::SeqCst)) }
            })
            .await
        });
        (calls, w)
    }

    #[tokio::test]
    async fn followers_do_not_reconcile_and_lost_leadership_abandons_in_flight_work() {
        let (ctx, tx) = context(false);
        let queue = WorkQueue::new(Backoff::default());
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let (s, f) = (started.clone(), finished.clone());
        let worker = tokio::spawn({
            let ctx = ctx.clone();
            let queue = queue.clone();
            async move {
                let cfg = WorkerConfig {
                    concurrency: 2,
                    drain_timeout: Duration::from_millis(100),
                };
                run_workers(&ctx, queue, cfg, move |_k: String| {
                    let (s, f) = (s.clone(), f.clone());
                    async move {
                        s.fetch_add(1, Ordering::SeqCst);
                        // Blocks until abandoned: only losing the lease or shutdown ends it.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        f.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Boom>(Requeue::Done)
                    }
                })
                .await
            }
        });
        queue.add("a".to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(started.load(Ordering::SeqCst), 0, "a follower reconciled");
        tx.send(true).ok();
        eventually("reconcile starts when leading", || {
            started.load(Ordering::SeqCst) == 1
        })
        .await;
        tx.send(false).ok();
        // The abandoned key goes back to the queue for the next term.
        eventually("key requeued", || queue.len() == 1).await;
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        tx.send(true).ok();
        eventually("reconciled again in the next term", || {
            started.load(Ordering::SeqCst) == 2
        })
        .await;
        ctx.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), worker).await;
        assert!(r.is_ok(), "workers did not stop after the drain timeout");
    }

    #[derive(Debug)]
    struct SlowDown;
    impl std::fmt::Display for SlowDown {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("slow down")
        }
    }
    impl ReconcileError for SlowDown {
        fn metric_label(&self) -> &'static str {
            "slow_down"
        }
        fn retry_without_backoff(&self) -> Option<Duration> {
            Some(Duration::from_millis(50))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_slow_down_retries_after_its_delay_without_growing_the_backoff() {
        let (ctx, _tx) = context(true);
        // A base delay far beyond the test's patience: only the error's own delay can bring
        // the key back in time.
        let queue = WorkQueue::new(Backoff {
            base: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
        });
        let (calls, w) = spawn_counting(&ctx, &queue, |_| Err(SlowDown));
        queue.add("k".into());
        eventually("the key came back after each slow-down", || {
            calls.load(Ordering::SeqCst) >= 4
        })
        .await;
        assert_eq!(queue.failures(&"k".to_string()), 0, "backoff did not grow");
        assert!(
            ctx.metrics
                .encode()
                .contains("reconcile_errors_total{controller=\"test\",error=\"slow_down\"}"),
            "slow-downs are still counted as errors"
        );
        ctx.shutdown.cancel();
        let _ = w.await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_and_counted() {
        let (ctx, _tx) = context(true);
        let queue = WorkQueue::new(Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        });
        let (calls, w) = spawn_counting(&ctx, &queue, |n| {
            if n < 2 { Err(Boom) } else { Ok(Requeue::Done) }
        });
        queue.add("k".into());
        eventually("three attempts", || calls.load(Ordering::SeqCst) == 3).await;
        assert_eq!(
            queue.failures(&"k".to_string()),
            0,
            "success forgets failures"
        );
        let text = ctx.metrics.encode();
        assert!(
            text.contains("service_controller_manager_reconcile_errors_total{controller=\"test\",error=\"boom\"} 2"),
            "{text}"
        );
        ctx.shutdown.cancel();
        let _ = w.await;
    }
}

//! The cloud load-balancer service controller: for every `type: LoadBalancer` Service it serves,
//! a [`provider::LoadBalancerProvider`] points a load balancer at the cluster's nodes and the
//! controller publishes `status.loadBalancer`, with the semantics of k8s.io/cloud-provider's
//! service controller.
//!
//! Layout: [`core`] holds the pure decisions (which Services, ensure or delete, finalizer, the
//! stable node set, which node changes matter, status diffs); [`provider`] the contract;
//! [`aws`] and [`local`] the two providers; this module the thin kube shell: reflectors on
//! Services and Nodes (on every replica), a work queue of Service keys with per-Service
//! backoff (5 s to 300 s), and workers (only while leading) that apply the core's decisions.

pub mod aws;
pub mod core;
pub mod local;
pub mod provider;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, ObjectReference, Service};
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use scm_runtime::{
    Backoff, ControllerContext, ObjectKey, ReconcileError, Requeue, WorkQueue, WorkerConfig,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use provider::{LoadBalancerProvider, ProviderError, ProviderKind};

use crate::core::{Action, ClassFilter, NodeFingerprint};

/// How often every Service's hosts are compared with the node set even without node events
/// (upstream's nodeSyncPeriod).
pub const NODE_SYNC_PERIOD: Duration = Duration::from_secs(100);
/// How long node events are collected before one host-update pass (batching).
pub const NODE_SYNC_DEBOUNCE: Duration = Duration::from_millis(500);

/// What the binary passes to [`run`] (from its flags).
#[derive(Clone, Debug)]
pub struct CloudLbConfig {
    /// `--cloud-provider`: `aws` or `local`.
    pub cloud_provider: ProviderKind,
    /// `--cloud-config`: the provider's config file (YAML or JSON); optional for `aws`,
    /// required for `local`.
    pub cloud_config: Option<PathBuf>,
    /// `--cluster-name` (default `kubernetes`): names and ownership tags.
    pub cluster_name: String,
    /// `--concurrent-service-syncs` (default 1, as upstream).
    pub concurrent_service_syncs: usize,
    /// `--load-balancer-class`: the `spec.loadBalancerClass` we implement, if any.
    pub load_balancer_class: Option<String>,
    /// `--default-load-balancer` (default true): also serve Services without a
    /// class.
    pub default_load_balancer: bool,
}

impl Default for CloudLbConfig {
    fn default() -> Self {
        CloudLbConfig {
            cloud_provider: ProviderKind::Local,
            cloud_config: None,
            cluster_name: "kubernetes".into(),
            concurrent_service_syncs: 1,
            load_balancer_class: None,
            default_load_balancer: true,
        }
    }
}

/// Why the controller stopped or a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The provider's configuration is unusable.
    #[error("cloud config: {0}")]
    Config(String),
    /// A provider call failed.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Provider(e) => e.metric_label(),
            Error::Kube(_) => "kube",
        }
    }
}

/// Builds the provider `config` selects.
pub async fn build_provider(
    config: &CloudLbConfig,
) -> Result<Arc<dyn LoadBalancerProvider>, Error> {
    let text = match &config.cloud_config {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    match config.cloud_provider {
        ProviderKind::Aws => {
            let cfg: aws::AwsCloudConfig = match &text {
                Some(t) => serde_yaml::from_str(t).map_err(|e| Error::Config(e.to_string()))?,
                None => aws::AwsCloudConfig::default(),
            };
            Ok(Arc::new(aws::AwsProvider::new(cfg).await))
        }
        ProviderKind::Local => {
            let Some(t) = text else {
                return Err(Error::Config(
                    "--cloud-provider=local needs --cloud-config with pools".into(),
                ));
            };
            let cfg: local::LocalCloudConfig =
                serde_yaml::from_str(&t).map_err(|e| Error::Config(e.to_string()))?;
            Ok(Arc::new(
                local::LocalProvider::new(cfg).map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
    }
}

/// Runs the controller with the provider `config` selects until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: CloudLbConfig) -> Result<(), Error> {
    let provider = build_provider(&config).await?;
    run_with_provider(ctx, config, provider).await
}

/// upstream's `service_controller` metric families.
#[derive(Clone)]
struct LbMetrics {
    sync_total: Counter,
    nodesync_errors: Counter,
    nodesync_latency: Histogram,
    host_update_latency: Histogram,
}

impl LbMetrics {
    fn register(ctx: &ControllerContext) -> Self {
        let m = LbMetrics {
            sync_total: Counter::default(),
            nodesync_errors: Counter::default(),
            nodesync_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            host_update_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
        };
        let mut reg = ctx.metrics.registry();
        reg.register(
            "service_controller_loadbalancer_sync",
            "A metric counting the amount of times any load balancer has been configured, as an effect of service/node changes on the cluster",
            m.sync_total.clone(),
        );
        reg.register(
            "service_controller_nodesync_error",
            "A metric counting the amount of times any load balancer has been configured and errored, as an effect of node changes on the cluster",
            m.nodesync_errors.clone(),
        );
        reg.register(
            "service_controller_nodesync_latency_seconds",
            "A metric measuring the latency for nodesync which updates loadbalancer hosts on cluster node updates.",
            m.nodesync_latency.clone(),
        );
        reg.register(
            "service_controller_update_loadbalancer_host_latency_seconds",
            "A metric measuring the latency for updating each load balancer hosts.",
            m.host_update_latency.clone(),
        );
        m
    }
}

/// What we last did successfully for one Service.
#[derive(Clone)]
struct Synced {
    /// The Service as last handled (to clean up if it vanishes without our finalizer).
    service: Service,
    /// `core::spec_fingerprint` at the last ensure.
    spec: String,
    /// Node set at the last ensure or host update.
    nodes: NodeFingerprint,
    /// The status the provider returned.
    status: LoadBalancerStatus,
}

struct Shell {
    ctx: ControllerContext,
    config: CloudLbConfig,
    filter: ClassFilter,
    provider: Arc<dyn LoadBalancerProvider>,
    services: Store<Service>,
    nodes: Store<Node>,
    synced: std::sync::Mutex<HashMap<ObjectKey, Synced>>,
    /// Spec fingerprints whose last ensure failed permanently: no retry until they change.
    permanent: std::sync::Mutex<HashMap<ObjectKey, String>>,
    /// Whether the provider has been restored in this leadership term.
    restored: tokio::sync::Mutex<bool>,
    lost_leadership: AtomicBool,
    /// The controller's queue, to queue every served Service at the start of a term.
    queue: WorkQueue<ObjectKey>,
    metrics: LbMetrics,
    /// The node-sync pass in progress, for `service_controller_nodesync_latency_seconds`.
    pass: std::sync::Mutex<NodeSyncPass>,
}

/// A node-sync pass: when it was queued and the Services it still waits for. A pass queued
/// while another is unfinished joins it (keeping the earlier start), so a slow pass shows as
/// one long observation rather than disappearing.
#[derive(Default)]
struct NodeSyncPass {
    started: Option<Instant>,
    waiting: std::collections::HashSet<ObjectKey>,
}

impl Shell {
    fn begin_pass(&self, keys: Vec<ObjectKey>) {
        let mut p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        if keys.is_empty() && p.waiting.is_empty() {
            return;
        }
        p.started.get_or_insert_with(Instant::now);
        p.waiting.extend(keys);
    }

    /// Called after every reconcile: the pass (as upstream measures it, across all Services)
    /// ends when the last Service it queued has been reconciled.
    fn reconciled(&self, key: &ObjectKey) {
        let mut p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        if p.waiting.remove(key)
            && p.waiting.is_empty()
            && let Some(start) = p.started.take()
        {
            self.metrics
                .nodesync_latency
                .observe(start.elapsed().as_secs_f64());
        }
    }

    /// Leadership lost: in-flight reconciles were dropped, so the pass will not finish.
    fn abandon_pass(&self) {
        *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = NodeSyncPass::default();
    }
}

/// Event notes are limited to 1024 bytes by the API; longer ones are cut at a char boundary.
fn note(s: String) -> String {
    const MAX: usize = 1024;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn reference(svc: &Service) -> ObjectReference {
    svc.object_ref(&())
}

/// Runs the controller with an already built provider (tests, benchmarks, embedders).
pub async fn run_with_provider(
    ctx: ControllerContext,
    config: CloudLbConfig,
    provider: Arc<dyn LoadBalancerProvider>,
) -> Result<(), Error> {
    let metrics = LbMetrics::register(&ctx);
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (node_store, node_writer) = reflector::store::<Node>();
    let queue: WorkQueue<ObjectKey> = WorkQueue::new(Backoff {
        base: core::MIN_RETRY_DELAY,
        max: core::MAX_RETRY_DELAY,
    });
    let filter = ClassFilter {
        class: config.load_balancer_class.clone(),
        default_implementation: config.default_load_balancer,
    };
    let shell = Arc::new(Shell {
        ctx: ctx.clone(),
        config: config.clone(),
        filter: filter.clone(),
        provider,
        services: svc_store.clone(),
        nodes: node_store.clone(),
        synced: Default::default(),
        permanent: Default::default(),
        restored: tokio::sync::Mutex::new(false),
        lost_leadership: AtomicBool::new(false),
        queue: queue.clone(),
        metrics,
        pass: Default::default(),
    });
    let node_dirty = Arc::new(Notify::new());

    // Services: every change of a Service we may act on queues its key.
    let svc_api: Api<Service> = Api::all(ctx.client.clone());
    let svc_events = reflector::reflector(
        svc_writer,
        watcher::watcher(svc_api, watcher::Config::default()),
    )
    .default_backoff();
    let q = queue.clone();
    let sh = shell.clone();
    let svc_task = async move {
        futures::pin_mut!(svc_events);
        while let Some(ev) = svc_events.next().await {
            match ev {
                Ok(Event::Apply(s)) | Ok(Event::InitApply(s)) => {
                    let key = ObjectKey::of(&s);
                    if core::action(&s, &sh.filter) != Action::Ignore || sh.remembers(&key) {
                        q.add(key);
                    }
                }
                Ok(Event::Delete(s)) => {
                    let key = ObjectKey::of(&s);
                    if sh.remembers(&key) {
                        q.add(key);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "service watch error"),
            }
        }
    };

    // Nodes: only additions, deletions and changes of the exclusion label or providerID
    // trigger a host-update pass, batched over NODE_SYNC_DEBOUNCE.
    let node_api: Api<Node> = Api::all(ctx.client.clone());
    let node_events = reflector::reflector(
        node_writer,
        watcher::watcher(node_api, watcher::Config::default()),
    )
    .default_backoff();
    let dirty = node_dirty.clone();
    let node_task = async move {
        futures::pin_mut!(node_events);
        let mut seen: HashMap<String, Node> = HashMap::new();
        let mut relist: Option<HashMap<String, Node>> = None;
        while let Some(ev) = node_events.next().await {
            match ev {
                Ok(Event::Apply(n)) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let trigger = seen
                        .get(&name)
                        .is_none_or(|old| core::node_update_triggers_sync(old, &n));
                    seen.insert(name, n);
                    if trigger {
                        dirty.notify_one();
                    }
                }
                Ok(Event::Delete(n)) => {
                    seen.remove(n.metadata.name.as_deref().unwrap_or_default());
                    dirty.notify_one();
                }
                Ok(Event::Init) => relist = Some(HashMap::new()),
                Ok(Event::InitApply(n)) => {
                    if let Some(r) = relist.as_mut() {
                        r.insert(n.metadata.name.clone().unwrap_or_default(), n);
                    }
                }
                Ok(Event::InitDone) => {
                    let fresh = relist.take().unwrap_or_default();
                    let changed = fresh.len() != seen.len()
                        || fresh.iter().any(|(k, n)| {
                            seen.get(k)
                                .is_none_or(|o| core::node_update_triggers_sync(o, n))
                        });
                    seen = fresh;
                    if changed {
                        dirty.notify_one();
                    }
                }
                Err(e) => warn!(error = %e, "node watch error"),
            }
        }
    };

    // Host-update passes: queue every served Service once per batch of node events (and every
    // NODE_SYNC_PERIOD); each reconcile compares the node set it last synced and calls
    // update_hosts only where it differs.
    let q = queue.clone();
    let sh = shell.clone();
    let dirty = node_dirty.clone();
    let nodesync_task = async move {
        let mut tick = tokio::time::interval(NODE_SYNC_PERIOD);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = dirty.notified() => {
                    tokio::time::sleep(NODE_SYNC_DEBOUNCE).await;
                }
                _ = tick.tick() => {}
            }
            let keys: Vec<ObjectKey> = sh
                .services
                .state()
                .iter()
                .filter(|s| core::action(s, &sh.filter) == Action::Ensure)
                .map(|s| ObjectKey::of(s.as_ref()))
                .collect();
            debug!(services = keys.len(), "node set pass queued");
            sh.begin_pass(keys.clone());
            for k in keys {
                q.add(k);
            }
        }
    };

    // Leadership loss invalidates what a stateful provider remembers.
    let sh = shell.clone();
    let mut gate = ctx.leader.clone();
    let leader_task = async move {
        loop {
            if !gate.wait_leading().await {
                // The elector is gone; the workers notice on their own. Never end the select.
                futures::future::pending::<()>().await;
            }
            gate.wait_lost().await;
            if gate.is_leader() {
                // wait_lost also returns when the elector goes away while the last word was
                // "leading"; that is no loss, and looping on it would spin.
                futures::future::pending::<()>().await;
            }
            sh.lost_leadership.store(true, Ordering::SeqCst);
            sh.abandon_pass();
        }
    };

    let ready = ctx.ready.clone();
    let svc_ready = svc_store.clone();
    let node_ready = node_store.clone();
    let sh = shell.clone();
    let q = queue.clone();
    let workers = async move {
        let _ = tokio::join!(svc_ready.wait_until_ready(), node_ready.wait_until_ready());
        ready.mark_ready();
        info!(controller = %sh.ctx.name, provider = sh.provider.provider_name(), "caches synced");
        let worker_cfg = WorkerConfig {
            concurrency: sh.config.concurrent_service_syncs.max(1),
            drain_timeout: Duration::from_secs(5),
        };
        let sh2 = sh.clone();
        scm_runtime::run_workers(&sh.ctx, q, worker_cfg, move |key: ObjectKey| {
            let sh = sh2.clone();
            async move {
                let r = sh.reconcile(key.clone()).await;
                sh.reconciled(&key);
                r
            }
        })
        .await;
    };

    tokio::select! {
        _ = ctx.shutdown.cancelled() => {}
        _ = svc_task => {}
        _ = node_task => {}
        _ = nodesync_task => {}
        _ = leader_task => {}
        _ = workers => {}
    }
    queue.shut_down();
    Ok(())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Shell {
    fn remembers(&self, key: &ObjectKey) -> bool {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    fn api(&self, ns: &str) -> Api<Service> {
        Api::namespaced(self.ctx.client.clone(), ns)
    }

    /// Once per leadership term, before any other provider call: let the provider rebuild,
    /// and, as a freshly started upstream controller does, look at every served Service again
    /// (another replica may have changed the cloud meanwhile, so what we remember is stale).
    async fn ensure_restored(&self) -> Result<(), Error> {
        let mut done = self.restored.lock().await;
        if self.lost_leadership.swap(false, Ordering::SeqCst) {
            *done = false;
            self.synced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            for s in self.services.state() {
                if core::action(&s, &self.filter) != Action::Ignore {
                    self.queue.add(ObjectKey::of(s.as_ref()));
                }
            }
        }
        if !*done {
            let served: Vec<Service> = self
                .services
                .state()
                .iter()
                .filter(|s| core::action(s, &self.filter) != Action::Ignore)
                .map(|s| s.as_ref().clone())
                .collect();
            self.provider
                .restore(&self.config.cluster_name, &served)
                .await?;
            info!(services = served.len(), "provider state restored");
            *done = true;
        }
        Ok(())
    }

    async fn reconcile(&self, key: ObjectKey) -> Result<Requeue, Error> {
        self.ensure_restored().await?;
        let cluster = self.config.cluster_name.clone();
        let Some(svc) = self
            .services
            .get(&reflector::ObjectRef::new(&key.name).within(&key.namespace))
        else {
            // Gone. With our finalizer that only happens after we cleaned up; without it
            // (removed by hand) clean up from what we last saw, as upstream's cache does.
            let last = self
                .synced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            if let Some(last) = last {
                info!(service = %key, "service vanished: deleting its load balancer");
                self.provider
                    .ensure_deleted(&cluster, &last.service)
                    .await?;
            }
            self.permanent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Ok(Requeue::Done);
        };
        let svc = svc.as_ref().clone();
        let mut action = core::action(&svc, &self.filter);
        if action == Action::Ensure && self.provider.implemented_elsewhere(&svc) {
            debug!(service = %key, "implemented by another controller");
            action = if core::with_finalizer(&svc).is_none() {
                // Ours before the switch: release what we made and our finalizer.
                Action::Cleanup
            } else {
                Action::Ignore
            };
        }
        match action {
            Action::Ignore => {
                self.synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                Ok(Requeue::Done)
            }
            Action::Ensure => self.ensure(&key, svc).await,
            Action::Cleanup => self.cleanup(&key, svc).await,
        }
    }

    fn stable_nodes(&self) -> Vec<Node> {
        let all = self.nodes.state();
        core::stable_nodes(all.iter().map(|n| n.as_ref()))
    }

    async fn ensure(&self, key: &ObjectKey, svc: Service) -> Result<Requeue, Error> {
        let cluster = &self.config.cluster_name;
        let spec = core::spec_fingerprint(&svc);
        if self
            .permanent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            == Some(&spec)
        {
            debug!(service = %key, "waiting for the Service to change after a permanent error");
            return Ok(Requeue::Done);
        }
        let nodes = self.stable_nodes();
        let nodes_fp = core::fingerprint(&nodes);
        let last = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        let r = reference(&svc);
        if let Some(last) = &last
            && last.spec == spec
        {
            if core::status_differs(&svc, &last.status) {
                // Usually our own status write has not reached the cache yet (the conditional
                // write then conflicts, re-reads and finds it in place); otherwise someone
                // changed the status and ours is put back. No cloud call either way.
                let fresh = self.write_status(svc.clone(), &last.status).await?;
                if let Some(s) = self
                    .synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(key)
                {
                    s.service = fresh;
                }
            }
            if last.nodes == nodes_fp {
                return Ok(Requeue::Done);
            }
            // Only the node set changed: update hosts, as upstream's node sync does.
            return self.update_hosts(key, &svc, &nodes, nodes_fp).await;
        }

        self.ctx
            .events
            .normal(
                &r,
                "EnsuringLoadBalancer",
                "Ensure",
                "Ensuring load balancer".into(),
            )
            .await;
        // The finalizer goes on before the first cloud call, so deletion always waits for us.
        let svc = self.add_finalizer(svc).await?;
        // After a conflict the write went to a newer copy: remember what we actually ensured.
        let spec = core::spec_fingerprint(&svc);
        if nodes.is_empty() {
            self.ctx
                .events
                .warning(
                    &r,
                    "UnAvailableLoadBalancer",
                    "Ensure",
                    "There are no available nodes for LoadBalancer".into(),
                )
                .await;
        }
        self.metrics.sync_total.inc();
        let status = match self.provider.ensure(cluster, &svc, &nodes).await {
            Ok(s) => s,
            Err(e) => {
                self.ctx
                    .events
                    .warning(
                        &r,
                        "SyncLoadBalancerFailed",
                        "Ensure",
                        note(format!(
                            "Error syncing load balancer: failed to ensure load balancer: {e}"
                        )),
                    )
                    .await;
                if e.is_permanent() {
                    warn!(service = %key, error = %e, "permanent error: not retrying until the Service changes");
                    self.permanent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), spec);
                    return Ok(Requeue::Done);
                }
                return Err(e.into());
            }
        };
        self.permanent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.ctx
            .events
            .normal(
                &r,
                "EnsuredLoadBalancer",
                "Ensure",
                "Ensured load balancer".into(),
            )
            .await;
        let svc = self.write_status(svc, &status).await?;
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Synced {
                    service: svc,
                    spec,
                    nodes: nodes_fp,
                    status,
                },
            );
        Ok(Requeue::Done)
    }

    async fn update_hosts(
        &self,
        key: &ObjectKey,
        svc: &Service,
        nodes: &[Node],
        fp: NodeFingerprint,
    ) -> Result<Requeue, Error> {
        let r = reference(svc);
        let start = Instant::now();
        self.metrics.sync_total.inc();
        let res = self
            .provider
            .update_hosts(&self.config.cluster_name, svc, nodes)
            .await;
        let secs = start.elapsed().as_secs_f64();
        self.metrics.host_update_latency.observe(secs);
        match res {
            Ok(()) => {
                if nodes.is_empty() {
                    self.ctx
                        .events
                        .warning(
                            &r,
                            "UnAvailableLoadBalancer",
                            "Update",
                            "There are no available nodes for LoadBalancer".into(),
                        )
                        .await;
                } else {
                    self.ctx
                        .events
                        .normal(
                            &r,
                            "UpdatedLoadBalancer",
                            "Update",
                            "Updated load balancer with new hosts".into(),
                        )
                        .await;
                }
                if let Some(s) = self
                    .synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(key)
                {
                    s.nodes = fp;
                }
                Ok(Requeue::Done)
            }
            Err(e) => {
                self.metrics.nodesync_errors.inc();
                let names: Vec<&str> = nodes
                    .iter()
                    .take(20)
                    .filter_map(|n| n.metadata.name.as_deref())
                    .collect();
                self.ctx
                    .events
                    .warning(
                        &r,
                        "UpdateLoadBalancerFailed",
                        "Update",
                        note(format!(
                            "Error updating load balancer with new hosts {names:?} [node names limited, total number of nodes: {}], error: {e}",
                            nodes.len()
                        )),
                    )
                    .await;
                Err(e.into())
            }
        }
    }

    async fn cleanup(&self, key: &ObjectKey, svc: Service) -> Result<Requeue, Error> {
        let cluster = &self.config.cluster_name;
        let r = reference(&svc);
        let exists = match self.provider.get(cluster, &svc).await {
            Ok(s) => s.is_some(),
            Err(e) => {
                self.ctx
                    .events
                    .warning(
                        &r,
                        "SyncLoadBalancerFailed",
                        "Delete",
                        note(format!(
                            "Error syncing load balancer: failed to check if load balancer exists before cleanup: {e}"
                        )),
                    )
                    .await;
                return Err(e.into());
            }
        };
        if exists {
            self.ctx
                .events
                .normal(
                    &r,
                    "DeletingLoadBalancer",
                    "Delete",
                    "Deleting load balancer".into(),
                )
                .await;
            if let Err(e) = self.provider.ensure_deleted(cluster, &svc).await {
                self.ctx
                    .events
                    .warning(
                        &r,
                        "DeleteLoadBalancerFailed",
                        "Delete",
                        note(format!("Error deleting load balancer: {e}")),
                    )
                    .await;
                return Err(e.into());
            }
        } else {
            // Still release anything half-made (and the local pool's reservation).
            self.provider.ensure_deleted(cluster, &svc).await?;
        }
        let svc = match self.write_status(svc, &LoadBalancerStatus::default()).await {
            Ok(s) => s,
            Err(Error::Kube(e)) if is_not_found(&e) => return Ok(Requeue::Done),
            Err(e) => return Err(e),
        };
        self.remove_finalizer(svc).await?;
        self.ctx
            .events
            .normal(
                &r,
                "DeletedLoadBalancer",
                "Delete",
                "Deleted load balancer".into(),
            )
            .await;
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.permanent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        Ok(Requeue::Done)
    }

    /// A merge patch conditional on the copy's resourceVersion, to the Service or (with
    /// `status`) its status subresource. `build` computes the patch from the current copy, or
    /// `None` when nothing needs writing; on a conflict the Service is read again and the patch
    /// recomputed from the newer copy (what we write depends only on the fields `build` reads).
    async fn patch_recomputing(
        &self,
        mut svc: Service,
        what: &str,
        status: bool,
        build: impl Fn(&Service) -> Option<serde_json::Value>,
    ) -> Result<Service, Error> {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let api = self.api(&ns);
        for _ in 0..3 {
            let Some(mut patch) = build(&svc) else {
                return Ok(svc);
            };
            patch["metadata"]["resourceVersion"] = serde_json::json!(svc.metadata.resource_version);
            let pp = PatchParams::default();
            let res = if status {
                api.patch_status(&name, &pp, &Patch::Merge(&patch)).await
            } else {
                api.patch(&name, &pp, &Patch::Merge(&patch)).await
            };
            match res {
                Ok(s) => return Ok(s),
                Err(e) if is_conflict(&e) => {
                    debug!(service = %ns, name, "{what} conflict: re-reading");
                    svc = api.get(&name).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Provider(ProviderError::retryable(format!(
            "{what} write kept conflicting"
        ))))
    }

    /// Applies `edit` to the finalizer list (the finalizer list is all this write depends on).
    async fn patch_finalizers(
        &self,
        svc: Service,
        edit: fn(&Service) -> Option<Vec<String>>,
    ) -> Result<Service, Error> {
        self.patch_recomputing(svc, "finalizer", false, |s| {
            edit(s).map(|f| serde_json::json!({"metadata": {"finalizers": f}}))
        })
        .await
    }

    async fn add_finalizer(&self, svc: Service) -> Result<Service, Error> {
        self.patch_finalizers(svc, core::with_finalizer).await
    }

    async fn remove_finalizer(&self, svc: Service) -> Result<(), Error> {
        match self.patch_finalizers(svc, core::without_finalizer).await {
            Ok(_) => Ok(()),
            Err(Error::Kube(e)) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes `status.loadBalancer` through the status subresource if it differs (the status
    /// is ours alone to decide, so a conflict only means re-reading).
    async fn write_status(
        &self,
        svc: Service,
        status: &LoadBalancerStatus,
    ) -> Result<Service, Error> {
        self.patch_recomputing(svc, "status", true, |s| {
            if !core::status_differs(s, status) {
                return None;
            }
            let ingress = match status.ingress.as_ref() {
                Some(i) if !i.is_empty() => {
                    serde_json::to_value(i).unwrap_or(serde_json::Value::Null)
                }
                _ => serde_json::Value::Null,
            };
            Some(serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}}))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_temp(name: &str, body: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cloud-lb-{}-{name}", std::process::id()));
        std::fs::write(&p, body).expect("temp file");
        p
    }

    #[tokio::test]
    async fn build_provider_reads_the_cloud_config() {
        let ok = write_temp("ok.yaml", "pools: [10.0.0.0/29]\nipMode: Proxy\n");
        let json = write_temp("ok.json", r#"{"pools": ["fd00::/120"]}"#);
        let bad = write_temp("bad.yaml", "pools: [not-a-cidr]\n");
        let unknown = write_temp("unknown.yaml", "pools: [10.0.0.0/29]\nmystery: 1\n");
        let cfg = |p: Option<PathBuf>| CloudLbConfig {
            cloud_provider: ProviderKind::Local,
            cloud_config: p,
            ..CloudLbConfig::default()
        };
        let p = build_provider(&cfg(Some(ok.clone()))).await.expect("valid");
        assert_eq!(p.provider_name(), "local");
        assert!(build_provider(&cfg(Some(json.clone()))).await.is_ok());
        for (what, path) in [
            ("missing", None),
            ("bad", Some(bad.clone())),
            ("unknown key", Some(unknown.clone())),
            (
                "absent file",
                Some(PathBuf::from("/nonexistent/cloud.yaml")),
            ),
        ] {
            assert!(
                matches!(build_provider(&cfg(path)).await, Err(Error::Config(_))),
                "{what}"
            );
        }
        for f in [ok, json, bad, unknown] {
            let _ = std::fs::remove_file(f);
        }
    }

    #[test]
    fn provider_kind_parses_flag_values() {
        assert_eq!("aws".parse::<ProviderKind>(), Ok(ProviderKind::Aws));
        assert_eq!("local".parse::<ProviderKind>(), Ok(ProviderKind::Local));
        assert!("gce".parse::<ProviderKind>().is_err());
    }

    #[test]
    fn notes_fit_the_api_limit() {
        assert_eq!(super::note("short".into()), "short");
        let long = "é".repeat(900);
        let n = super::note(long);
        assert!(n.len() <= 1024 && n.ends_with("..."));
    }
}

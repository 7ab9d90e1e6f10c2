//! The kube shell of `nodeport-alloc`: a Service cache on every replica, a debounced rebuild
//! of the mirrored state after every change, capacity metrics, and workers (leader only) that
//! report findings once and write assignments with a resourceVersion precondition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Resource;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use scm_allocator::PortSpan;
use scm_runtime::{
    Backoff, ControllerContext, Informer, ObjectKey, ReconcileError, Requeue, WorkQueue,
    WorkerConfig,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::core::{self, Finding, Mirror, Plan};

/// Configuration of the `nodeport-alloc` controller.
#[derive(Clone, Debug)]
pub struct NodePortAllocConfig {
    /// `--service-node-port-range` (default 30000-32767).
    pub service_node_port_range: PortSpan,
    /// `--concurrent-nodeport-syncs`: Services reconciled at once (default 5).
    pub concurrent_syncs: usize,
}

impl Default for NodePortAllocConfig {
    fn default() -> Self {
        NodePortAllocConfig {
            service_node_port_range: PortSpan {
                base: 30000,
                size: 2768,
            },
            concurrent_syncs: 5,
        }
    }
}

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kube API: {0}")]
    Kube(#[from] kube::Error),
    /// Precondition failures kept happening.
    #[error("conflict writing {0} after retries")]
    Conflict(String),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

/// Metric families, named as kube-apiserver's (`pkg/registry/core/service/portallocator`).
#[derive(Clone, Default)]
struct AllocMetrics {
    allocated: Gauge,
    available: Gauge,
    allocations: Family<ScopeLabel, Counter>,
    errors: Family<ScopeLabel, Counter>,
    repair: Family<TypeLabel, Counter>,
}

impl AllocMetrics {
    fn register(ctx: &ControllerContext) -> Self {
        let m = AllocMetrics::default();
        let mut reg = ctx.metrics.registry();
        reg.register(
            "kube_apiserver_nodeport_allocator_allocated_ports",
            "Gauge measuring the number of allocated NodePorts for Services",
            m.allocated.clone(),
        );
        reg.register(
            "kube_apiserver_nodeport_allocator_available_ports",
            "Gauge measuring the number of available NodePorts for Services",
            m.available.clone(),
        );
        reg.register(
            "kube_apiserver_nodeport_allocator_allocation",
            "Number of NodePort allocations",
            m.allocations.clone(),
        );
        reg.register(
            "kube_apiserver_nodeport_allocator_allocation_errors",
            "Number of errors trying to allocate NodePort",
            m.errors.clone(),
        );
        reg.register(
            "apiserver_nodeport_repair_port_errors",
            "Number of errors detected on ports by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown",
            m.repair.clone(),
        );
        m
    }

    fn scope(f: &Family<ScopeLabel, Counter>, scope: &str, n: u64) {
        f.get_or_create(&ScopeLabel {
            scope: scope.into(),
        })
        .inc_by(n);
    }
}

struct Shared {
    span: PortSpan,
    services: Informer<Service>,
    mirror: Mutex<Option<Mirror>>,
    pending: Mutex<BTreeMap<ObjectKey, Vec<i32>>>,
    metrics: AllocMetrics,
    queue: WorkQueue<ObjectKey>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn rebuild(&self) {
        // After a relist the store is already the new list: deleted Services are gone here.
        let state = self.services.list();
        let services: Vec<&Service> = state.iter().map(|s| s.as_ref()).collect();
        let pending = {
            let mut p = lock(&self.pending);
            p.retain(|key, ports| {
                let Some(svc) = self.services.get(key) else {
                    return false;
                };
                let have: BTreeSet<i32> = core::collect_node_ports(&svc).into_iter().collect();
                !ports.iter().all(|p| have.contains(p))
            });
            p.clone()
        };
        let next = Mirror::build(self.span, &services, &pending);
        let mut guard = lock(&self.mirror);
        let mut changed: BTreeSet<ObjectKey> = next.needs_assign.clone();
        match guard.as_ref() {
            Some(prev) => {
                for (k, f) in &next.findings {
                    if prev.findings.get(k) != Some(f) {
                        changed.insert(k.clone());
                    }
                }
                for k in prev.findings.keys() {
                    if !next.findings.contains_key(k) {
                        changed.insert(k.clone());
                    }
                }
            }
            None => changed.extend(next.findings.keys().cloned()),
        }
        let (used, free) = next.capacity();
        self.metrics.allocated.set(used as i64);
        self.metrics.available.set(free as i64);
        debug!(
            services = services.len(),
            findings = next.findings.len(),
            queued = changed.len(),
            "nodeport mirror rebuilt"
        );
        *guard = Some(next);
        drop(guard);
        for k in changed {
            self.queue.add(k);
        }
    }
}

/// Runs `nodeport-alloc` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: NodePortAllocConfig) -> Result<(), Error> {
    let notify = Arc::new(Notify::new());
    let services = ctx.informers.services();
    let n = notify.clone();
    // Every change (a relist included) only wakes the coalesced rebuild, which reads the store.
    services.subscribe(move |_| n.notify_one());
    let shared = Arc::new(Shared {
        span: config.service_node_port_range,
        services: services.clone(),
        mirror: Mutex::new(None),
        pending: Mutex::new(BTreeMap::new()),
        metrics: AllocMetrics::register(&ctx),
        queue: WorkQueue::new(Backoff::default()),
    });
    if !scm_runtime::wait_for_sync(&ctx, || services.is_synced()).await {
        return Ok(());
    }
    shared.rebuild();
    let rebuild = {
        let shared = shared.clone();
        // Coalesce bursts (a relist of thousands of Services) into one rebuild.
        scm_runtime::run_coalesced(
            notify,
            ctx.shutdown.clone(),
            Duration::from_millis(50),
            move || shared.rebuild(),
        )
    };
    let cfg = WorkerConfig {
        concurrency: config.concurrent_syncs.max(1),
        ..Default::default()
    };
    let rctx = ctx.clone();
    let rshared = shared.clone();
    let workers = scm_runtime::run_workers(&ctx, shared.queue.clone(), cfg, move |key| {
        let ctx = rctx.clone();
        let shared = rshared.clone();
        async move { reconcile(&ctx, &shared, key).await }
    });
    tokio::join!(rebuild, workers);
    shared.queue.shut_down();
    Ok(())
}

/// Reasons the mirror reports (cleared when the finding goes away). Assign-path reasons
/// (PortRangeFull, NodePortAllocationFailed) are cleared when an assignment succeeds.
const FINDING_REASONS: [&str; 2] = ["PortAlreadyAllocated", "PortOutOfRange"];

async fn report(
    ctx: &ControllerContext,
    shared: &Shared,
    key: &ObjectKey,
    oref: &ObjectReference,
    findings: &[Finding],
) {
    let reasons: BTreeSet<&str> = findings.iter().map(|f| f.reason()).collect();
    for r in FINDING_REASONS {
        if !reasons.contains(r) {
            ctx.events.clear(oref, Some(r));
        }
    }
    for f in findings {
        if ctx
            .events
            .warn_once(oref, f.reason(), f.action(), f.message())
            .await
        {
            shared
                .metrics
                .repair
                .get_or_create(&TypeLabel {
                    r#type: f.metric_type().into(),
                })
                .inc();
            warn!(service = %key, reason = f.reason(), message = %f.message(), "nodeport repair finding");
        }
    }
}

async fn reconcile(
    ctx: &ControllerContext,
    shared: &Shared,
    key: ObjectKey,
) -> Result<Requeue, Error> {
    let Some(svc) = shared.services.get(&key) else {
        return Ok(Requeue::Done);
    };
    let oref = svc.object_ref(&());
    let (findings, needs) = {
        let g = lock(&shared.mirror);
        let Some(m) = g.as_ref() else {
            return Ok(Requeue::Done);
        };
        (
            m.findings.get(&key).cloned().unwrap_or_default(),
            m.needs_assign.contains(&key),
        )
    };
    report(ctx, shared, &key, &oref, &findings).await;
    let in_flight = lock(&shared.pending).contains_key(&key);
    if needs && !in_flight {
        assign(ctx, shared, &key, svc).await?;
    }
    Ok(Requeue::Done)
}

fn release(shared: &Shared, key: &ObjectKey, ports: &[i32]) {
    lock(&shared.pending).remove(key);
    if let Some(m) = lock(&shared.mirror).as_mut() {
        for p in ports {
            m.release(*p, key);
        }
    }
}

async fn assign(
    ctx: &ControllerContext,
    shared: &Shared,
    key: &ObjectKey,
    mut svc: Arc<Service>,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    for _attempt in 0..5 {
        let (plan, fresh) = {
            let mut g = lock(&shared.mirror);
            let Some(m) = g.as_mut() else { return Ok(()) };
            let plan = core::plan(m, &svc, &mut rand::rng());
            let fresh = core::new_ports(&svc, &plan);
            (plan, fresh)
        };
        // Requested ports this write honours: upstream counts those as "static" allocations.
        let requested = match &plan {
            Plan::Assign { .. } => core::collect_node_ports(&svc).len() as u64,
            _ => 0,
        };
        if !fresh.is_empty() {
            lock(&shared.pending).insert(key.clone(), fresh.clone());
        }
        let mut updated = (*svc).clone();
        match &plan {
            Plan::Nothing => return Ok(()),
            Plan::Reject(message) => {
                let oref = svc.object_ref(&());
                if ctx
                    .events
                    .warn_once(
                        &oref,
                        "NodePortAllocationFailed",
                        "PortAllocation",
                        message.clone(),
                    )
                    .await
                {
                    AllocMetrics::scope(&shared.metrics.errors, "static", 1);
                }
                return Ok(());
            }
            Plan::Full(f) => {
                let oref = svc.object_ref(&());
                if ctx
                    .events
                    .warn_once(&oref, f.reason(), f.action(), f.message())
                    .await
                {
                    AllocMetrics::scope(&shared.metrics.errors, "dynamic", 1);
                }
                return Ok(());
            }
            Plan::Clear => {
                if let Some(spec) = updated.spec.as_mut() {
                    for p in spec.ports.iter_mut().flatten() {
                        p.node_port = None;
                    }
                    spec.health_check_node_port = None;
                }
            }
            Plan::Assign {
                node_ports,
                health_check_node_port,
            } => {
                if let Some(spec) = updated.spec.as_mut() {
                    for (p, np) in spec.ports.iter_mut().flatten().zip(node_ports) {
                        p.node_port = (*np != 0).then_some(*np);
                    }
                    if health_check_node_port.is_some() {
                        spec.health_check_node_port = *health_check_node_port;
                    }
                }
            }
        }
        // The body carries the cached metadata.resourceVersion: a stale write gets 409.
        match api
            .replace(&key.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                AllocMetrics::scope(&shared.metrics.allocations, "dynamic", fresh.len() as u64);
                if requested > 0 {
                    AllocMetrics::scope(&shared.metrics.allocations, "static", requested);
                }
                let oref = svc.object_ref(&());
                ctx.events.clear(&oref, Some("PortRangeFull"));
                ctx.events.clear(&oref, Some("NodePortAllocationFailed"));
                info!(service = %key, plan = ?plan, "node ports assigned");
                return Ok(());
            }
            Err(e) => {
                release(shared, key, &fresh);
                match e {
                    kube::Error::Api(ref s) if s.code == 409 => {
                        debug!(service = %key, "conflict; re-reading and re-planning");
                        match api.get_opt(&key.name).await? {
                            Some(s) => svc = Arc::new(s),
                            None => return Ok(()),
                        }
                    }
                    kube::Error::Api(ref s) if s.code == 404 => return Ok(()),
                    other => return Err(other.into()),
                }
            }
        }
    }
    Err(Error::Conflict(key.to_string()))
}

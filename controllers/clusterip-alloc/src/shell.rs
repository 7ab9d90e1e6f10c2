//! The kube shell of `clusterip-alloc`: caches of Services (and ServiceCIDRs when no flag range
//! is given) on every replica, a debounced rebuild of the mirrored state after every change,
//! capacity metrics, and workers (leader only) that report findings once and write
//! assignments with a resourceVersion precondition.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::Resource;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use scm_runtime::{
    Backoff, ControllerContext, Informer, ObjectKey, ReconcileError, Requeue, WorkQueue,
    WorkerConfig,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::core::{self, Finding, Mirror, Plan, RangeConfig};

/// Configuration of the `clusterip-alloc` controller.
#[derive(Clone, Debug)]
pub struct ClusterIpAllocConfig {
    /// `--service-cluster-ip-range`: one CIDR or two of different families; empty means
    /// "follow the cluster's ServiceCIDR objects".
    pub service_cluster_ip_range: Vec<IpNet>,
    /// `--concurrent-clusterip-syncs`: Services reconciled at once (default 5).
    pub concurrent_syncs: usize,
}

impl Default for ClusterIpAllocConfig {
    fn default() -> Self {
        ClusterIpAllocConfig {
            service_cluster_ip_range: Vec::new(),
            concurrent_syncs: 5,
        }
    }
}

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The flag's ranges are invalid.
    #[error(transparent)]
    Config(#[from] core::ConfigError),
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
            Error::Config(_) => "config",
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CidrLabel {
    cidr: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CidrScopeLabel {
    cidr: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

/// Metric families, named as kube-apiserver's (`pkg/registry/core/service/ipallocator`).
#[derive(Clone, Default)]
struct AllocMetrics {
    allocated: Family<CidrLabel, Gauge>,
    available: Family<CidrLabel, Gauge>,
    allocations: Family<CidrScopeLabel, Counter>,
    errors: Family<CidrScopeLabel, Counter>,
    repair: Family<TypeLabel, Counter>,
}

impl AllocMetrics {
    fn register(ctx: &ControllerContext) -> Self {
        let m = AllocMetrics::default();
        let mut reg = ctx.metrics.registry();
        reg.register(
            "kube_apiserver_clusterip_allocator_allocated_ips",
            "Gauge measuring the number of allocated IPs for Services",
            m.allocated.clone(),
        );
        reg.register(
            "kube_apiserver_clusterip_allocator_available_ips",
            "Gauge measuring the number of available IPs for Services",
            m.available.clone(),
        );
        reg.register(
            "kube_apiserver_clusterip_allocator_allocation",
            "Number of Cluster IPs allocations",
            m.allocations.clone(),
        );
        reg.register(
            "kube_apiserver_clusterip_allocator_allocation_errors",
            "Number of errors trying to allocate Cluster IPs",
            m.errors.clone(),
        );
        reg.register(
            "apiserver_clusterip_repair_ip_errors",
            "Number of errors detected on clusterips by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown, invalid",
            m.repair.clone(),
        );
        m
    }

    fn count(&self, f: &Family<CidrScopeLabel, Counter>, cidr: Option<IpNet>, scope: &str) {
        let cidr = cidr.map(|c| c.to_string()).unwrap_or_default();
        f.get_or_create(&CidrScopeLabel {
            cidr,
            scope: scope.into(),
        })
        .inc();
    }
}

struct Shared {
    flag: Option<RangeConfig>,
    services: Informer<Service>,
    cidrs: Option<Informer<ServiceCIDR>>,
    mirror: Mutex<Option<Mirror>>,
    /// Assignments written (or being written) but not yet seen in the cache.
    pending: Mutex<BTreeMap<ObjectKey, Vec<IpAddr>>>,
    metrics: AllocMetrics,
    queue: WorkQueue<ObjectKey>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn range_config(&self) -> RangeConfig {
        match (&self.flag, &self.cidrs) {
            (Some(f), _) => f.clone(),
            (None, Some(informer)) => {
                let objs: Vec<ServiceCIDR> =
                    informer.list().iter().map(|o| (**o).clone()).collect();
                RangeConfig::from_service_cidrs(&objs)
            }
            (None, None) => RangeConfig::from_service_cidrs(&[]),
        }
    }

    /// Rebuilds the mirror from the caches, updates gauges, and queues every Service whose
    /// findings changed or that needs an assignment.
    fn rebuild(&self) {
        let config = self.range_config();
        // The informer's store: after a relist it is already the new list, so Services deleted
        // while the watch was down are gone from the rebuilt mirror too.
        let state = self.services.list();
        let services: Vec<&Service> = state.iter().map(|s| s.as_ref()).collect();
        let pending = {
            let mut p = lock(&self.pending);
            // Drop pending assignments the cache now shows (or whose Service is gone).
            p.retain(|key, ips| {
                let Some(svc) = self.services.get(key) else {
                    return false;
                };
                let have: BTreeSet<String> = core::claimed_ips(&svc).into_iter().collect();
                !ips.iter().all(|ip| have.contains(&ip.to_string()))
            });
            p.clone()
        };
        let next = Mirror::build(&config, &services, &pending);
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
                // CIDRs that went away stop being reported.
                for (cidr, _, _) in prev.capacity() {
                    if !next.capacity().iter().any(|(c, _, _)| *c == cidr) {
                        let l = CidrLabel {
                            cidr: cidr.to_string(),
                        };
                        self.metrics.allocated.remove(&l);
                        self.metrics.available.remove(&l);
                    }
                }
            }
            None => changed.extend(next.findings.keys().cloned()),
        }
        for (cidr, used, free) in next.capacity() {
            let l = CidrLabel {
                cidr: cidr.to_string(),
            };
            self.metrics
                .allocated
                .get_or_create(&l)
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            self.metrics
                .available
                .get_or_create(&l)
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        debug!(
            services = services.len(),
            findings = next.findings.len(),
            queued = changed.len(),
            "clusterip mirror rebuilt"
        );
        *guard = Some(next);
        drop(guard);
        for k in changed {
            self.queue.add(k);
        }
    }
}

/// Runs `clusterip-alloc` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: ClusterIpAllocConfig) -> Result<(), Error> {
    let flag = if config.service_cluster_ip_range.is_empty() {
        None
    } else {
        Some(RangeConfig::from_flag(&config.service_cluster_ip_range)?)
    };
    let notify = Arc::new(Notify::new());
    let services = ctx.informers.services();
    let cidrs = flag.is_none().then(|| ctx.informers.service_cidrs());
    // Every change (a relist included) only wakes the coalesced rebuild, which reads the stores.
    let n = notify.clone();
    services.subscribe(move |_| n.notify_one());
    if let Some(c) = &cidrs {
        let n = notify.clone();
        c.subscribe(move |_| n.notify_one());
    }
    let shared = Arc::new(Shared {
        flag,
        services: services.clone(),
        cidrs: cidrs.clone(),
        mirror: Mutex::new(None),
        pending: Mutex::new(BTreeMap::new()),
        metrics: AllocMetrics::register(&ctx),
        queue: WorkQueue::new(Backoff::default()),
    });
    let synced = || services.is_synced() && cidrs.as_ref().is_none_or(|c| c.is_synced());
    if !scm_runtime::wait_for_sync(&ctx, synced).await {
        return Ok(());
    }
    shared.rebuild();
    let rebuild = {
        let shared = shared.clone();
        // Coalesce bursts (a relist of thousands of Services) into one rebuild.
        scm_runtime::run_coalesced(
            notify.clone(),
            ctx.shutdown.clone(),
            Duration::from_millis(50),
            move || shared.rebuild(),
        )
    };
    let worker_cfg = WorkerConfig {
        concurrency: config.concurrent_syncs.max(1),
        ..Default::default()
    };
    let rctx = ctx.clone();
    let rshared = shared.clone();
    let workers = scm_runtime::run_workers(&ctx, shared.queue.clone(), worker_cfg, move |key| {
        let ctx = rctx.clone();
        let shared = rshared.clone();
        async move { reconcile(&ctx, &shared, key).await }
    });
    tokio::join!(rebuild, workers);
    shared.queue.shut_down();
    Ok(())
}

/// Reasons the mirror reports (cleared when the finding goes away). Assign-path reasons
/// (ServiceCIDRFull, ClusterIPAllocationFailed) are cleared when an assignment succeeds.
const FINDING_REASONS: [&str; 3] = [
    "ClusterIPNotValid",
    "ClusterIPOutOfRange",
    "ClusterIPAlreadyAllocated",
];

fn find_service(shared: &Shared, key: &ObjectKey) -> Option<Arc<Service>> {
    shared.services.get(key)
}

async fn reconcile(
    ctx: &ControllerContext,
    shared: &Shared,
    key: ObjectKey,
) -> Result<Requeue, Error> {
    let Some(svc) = find_service(shared, &key) else {
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
    report(ctx, shared, &oref, &findings).await;
    // A written assignment not yet in the cache: nothing to do until the cache shows it.
    let in_flight = lock(&shared.pending).contains_key(&key);
    if needs && !in_flight {
        assign(ctx, shared, &key, svc).await?;
    }
    Ok(Requeue::Done)
}

/// Publishes each standing finding once, and forgets those that are gone.
async fn report(
    ctx: &ControllerContext,
    shared: &Shared,
    oref: &k8s_openapi::api::core::v1::ObjectReference,
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
            warn!(service = %ObjectKey::of_ref(oref), reason = f.reason(), message = %f.message(), "clusterip repair finding");
        }
    }
}

trait OfRef {
    fn of_ref(r: &k8s_openapi::api::core::v1::ObjectReference) -> ObjectKey;
}

impl OfRef for ObjectKey {
    fn of_ref(r: &k8s_openapi::api::core::v1::ObjectReference) -> ObjectKey {
        ObjectKey::new(
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
        )
    }
}

fn cidr_of(m: &Mirror, ip: IpAddr) -> Option<IpNet> {
    m.ranges
        .iter()
        .find(|r| r.alloc.has(ip))
        .map(|r| r.spec.cidr)
}

/// Applies the assign plan, re-planning from a fresh read on a 409.
async fn assign(
    ctx: &ControllerContext,
    shared: &Shared,
    key: &ObjectKey,
    mut svc: Arc<Service>,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    for _attempt in 0..5 {
        let (plan, fresh, cidrs, requested) = {
            let mut g = lock(&shared.mirror);
            let Some(m) = g.as_mut() else { return Ok(()) };
            let plan = core::plan(m, &svc, &mut rand::rng());
            let fresh = core::new_ips(&svc, &plan);
            let cidrs: Vec<Option<IpNet>> = fresh.iter().map(|ip| cidr_of(m, *ip)).collect();
            // Requested addresses this write honours (a Service that lacked its family
            // fields): upstream counts those as "static" allocations.
            let requested: Vec<Option<IpNet>> = match &plan {
                Plan::Assign { cluster_ips, .. } => cluster_ips
                    .iter()
                    .filter_map(|c| c.parse::<IpAddr>().ok())
                    .filter(|ip| !fresh.contains(ip))
                    .map(|ip| cidr_of(m, ip))
                    .collect(),
                _ => vec![],
            };
            (plan, fresh, cidrs, requested)
        };
        if !fresh.is_empty() {
            lock(&shared.pending).insert(key.clone(), fresh.clone());
        }
        let mut updated = (*svc).clone();
        match &plan {
            Plan::Nothing => return Ok(()),
            Plan::Reject(r) => {
                let oref = svc.object_ref(&());
                let new_problem = ctx
                    .events
                    .warn_once(&oref, r.reason(), "ClusterIPAllocation", r.message.clone())
                    .await;
                // Counted once per problem, like the Event, not on every resync.
                if new_problem {
                    let (cidr, scope) = match &r.full {
                        Some(Finding::Full { cidrs, .. }) => (cidrs.clone(), "dynamic"),
                        _ => (String::new(), "static"),
                    };
                    shared
                        .metrics
                        .errors
                        .get_or_create(&CidrScopeLabel {
                            cidr,
                            scope: scope.into(),
                        })
                        .inc();
                }
                return Ok(());
            }
            Plan::Clear => {
                if let Some(spec) = updated.spec.as_mut() {
                    spec.cluster_ip = None;
                    spec.cluster_ips = None;
                    spec.ip_families = None;
                    spec.ip_family_policy = None;
                }
            }
            Plan::Assign {
                cluster_ips,
                ip_families,
                ip_family_policy,
            } => {
                if let Some(spec) = updated.spec.as_mut() {
                    spec.cluster_ip = cluster_ips.first().cloned();
                    spec.cluster_ips = Some(cluster_ips.clone());
                    spec.ip_families = Some(ip_families.clone());
                    spec.ip_family_policy = Some(ip_family_policy.clone());
                }
            }
        }
        // `replace` sends metadata.resourceVersion from the cache: the write is refused with
        // 409 if anyone changed the Service since we read it.
        match api
            .replace(&key.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                for c in cidrs {
                    shared
                        .metrics
                        .count(&shared.metrics.allocations, c, "dynamic");
                }
                for c in requested {
                    shared
                        .metrics
                        .count(&shared.metrics.allocations, c, "static");
                }
                let oref = svc.object_ref(&());
                ctx.events.clear(&oref, Some("ServiceCIDRFull"));
                ctx.events.clear(&oref, Some("ClusterIPAllocationFailed"));
                info!(service = %key, plan = ?plan, "clusterip assigned");
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

fn release(shared: &Shared, key: &ObjectKey, ips: &[IpAddr]) {
    lock(&shared.pending).remove(key);
    if let Some(m) = lock(&shared.mirror).as_mut() {
        for ip in ips {
            m.release(*ip, key);
        }
    }
}

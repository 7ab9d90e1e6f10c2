//! The one kube shell of the Service allocators (`clusterip-alloc`, `nodeport-alloc`). A core
//! implements [`Allocator`] (what it allocates, how a Service's holdings are read, how an
//! assignment is written, its reasons and metric names); the shell does the rest on every
//! replica: it subscribes to the process's Service informer (and whatever else the core reads),
//! rebuilds the [`Mirror`] after each burst of changes (a relist included: the informer's store
//! is already the new list, so deleted Services drop out), keeps the capacity gauges, and runs
//! workers (leader only) that report findings once and, only when assigning is on (`--assign`),
//! write assignments with a resourceVersion precondition, re-reading and re-planning on 409.
//! With assigning off (the default) nothing but Events (and, for an allocator with a
//! [`Allocator::CONDITION`], that condition in the Service's status) is ever written: a stock
//! API server allocates by itself, and `services` update would let us rewrite any Service.
//!
//! The condition is `False` while a finding about the Service is due (the same rule as its
//! Event, so a finding that settles away never shows), with the first due finding's reason and
//! every due finding's message, and removed (our field manager applies an empty set) once none
//! is; a healthy Service never gets one. It is written by a [`conditions::Writer`], off the
//! reconcile's path, and only while leading.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Resource;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Metric;
use scm_runtime::conditions;
use scm_runtime::{
    Backoff, ControllerContext, Informer, ObjectKey, ReconcileError, Requeue, WorkQueue,
    WorkerConfig,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::mirror::{Mirror, Pending, Pool, Report};

mod condition;
mod settle;
#[cfg(test)]
mod test_finding;
pub use condition::wanted_condition;
pub use settle::{FirstSeen, due_at};

/// The ledger of allocator `A`, keyed by Service.
pub type MirrorOf<A> = Mirror<<A as Allocator>::Pool, ObjectKey, <A as Allocator>::Finding>;

/// What allocator `A` hands out.
pub type ValueOf<A> = <<A as Allocator>::Pool as Pool>::Value;

/// The metric families of an allocator `A`.
pub type MetricsOf<A> = AllocMetrics<<A as Allocator>::Gauge, <A as Allocator>::Label>;

/// Errors of a reconcile.
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

/// The `type` label of the repair-errors counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Upstream's error type (`duplicate`, `outOfRange`, ...).
    pub r#type: String,
}

/// An allocator's metric families, named as kube-apiserver's: capacity gauges `G`, allocation
/// and allocation-error counters labelled `L`, and the repair loop's error counter.
#[derive(Clone)]
pub struct AllocMetrics<G, L> {
    /// Allocated values.
    pub allocated: G,
    /// Free values.
    pub available: G,
    /// Allocations written.
    pub allocations: Family<L, Counter>,
    /// Assignments refused.
    pub errors: Family<L, Counter>,
    /// Findings, by type.
    pub repair: Family<TypeLabel, Counter>,
}

impl<G: Default, L: Clone + Hash + Eq> Default for AllocMetrics<G, L> {
    fn default() -> Self {
        AllocMetrics {
            allocated: G::default(),
            available: G::default(),
            allocations: Family::default(),
            errors: Family::default(),
            repair: Family::default(),
        }
    }
}

impl<G, L> AllocMetrics<G, L>
where
    G: Metric + Clone + Default,
    L: EncodeLabelSet + Clone + Hash + Eq + Debug + Send + Sync + 'static,
{
    /// Registers the families under upstream's names for `names`.
    pub fn register(ctx: &ControllerContext, names: &MetricNames) -> Self {
        let m = Self::default();
        let mut reg = ctx.metrics.registry();
        let MetricNames {
            kind,
            unit,
            nouns: (values, value),
            repair_help,
        } = names;
        let allocator = format!("kube_apiserver_{kind}_allocator");
        let gauge =
            |what: &str| format!("Gauge measuring the number of {what} {values} for Services");
        reg.register(
            format!("{allocator}_allocated_{unit}s"),
            gauge("allocated"),
            m.allocated.clone(),
        );
        reg.register(
            format!("{allocator}_available_{unit}s"),
            gauge("available"),
            m.available.clone(),
        );
        reg.register(
            format!("{allocator}_allocation"),
            format!("Number of {value} allocations"),
            m.allocations.clone(),
        );
        reg.register(
            format!("{allocator}_allocation_errors"),
            format!("Number of errors trying to allocate {value}"),
            m.errors.clone(),
        );
        reg.register(
            format!("apiserver_{kind}_repair_{unit}_errors"),
            *repair_help,
            m.repair.clone(),
        );
        m
    }
}

/// The parts of kube-apiserver's allocator metric names and help texts that differ between
/// its ClusterIP and NodePort allocators (`kube_apiserver_{kind}_allocator_allocated_{unit}s`,
/// `apiserver_{kind}_repair_{unit}_errors`, ...).
pub struct MetricNames {
    /// `clusterip`, `nodeport` (also the allocator's name in logs).
    pub kind: &'static str,
    /// `ip`, `port`.
    pub unit: &'static str,
    /// How the help texts name the values: in the gauges', and in the counters'.
    pub nouns: (&'static str, &'static str),
    /// Help of the repair-errors counter.
    pub repair_help: &'static str,
}

/// What a core decided for one Service that needs an assignment.
#[derive(Debug)]
pub enum Step<V, L> {
    /// Nothing to write.
    Nothing,
    /// The Service cannot have its values: a Warning Event (and `count` in the allocation
    /// errors), once per problem.
    Refuse {
        /// Event reason.
        reason: &'static str,
        /// Event action.
        action: &'static str,
        /// Event note.
        message: String,
        /// The error counter's label.
        count: L,
    },
    /// Replace the Service with `service` (the cached one with the core's fields set).
    Write {
        /// The Service to write; it carries the read's resourceVersion.
        service: Box<Service>,
        /// Values newly taken from the pool (released again if the write fails).
        fresh: Vec<V>,
        /// Allocation counters to add to once written.
        count: Vec<(L, u64)>,
        /// The plan, for the log.
        plan: String,
    },
}

/// What differs between the ClusterIP and the NodePort allocator.
pub trait Allocator: Send + Sync + Sized + 'static {
    /// The bitmap(s) behind the ledger.
    type Pool: Pool<Value: Send + Sync + 'static> + Send + Sync + 'static;
    /// A repair finding.
    type Finding: Report + Clone + PartialEq + Send + Sync + 'static;
    /// The capacity gauges' type.
    type Gauge: Metric + Clone + Default;
    /// Labels of the allocation and allocation-error counters.
    type Label: EncodeLabelSet + Clone + Hash + Eq + Debug + Send + Sync + 'static;

    /// Reasons of findings; each is cleared when its finding goes away.
    const FINDING_REASONS: &'static [&'static str];
    /// Reasons of refused assignments; cleared once an assignment is written.
    const REFUSAL_REASONS: &'static [&'static str];
    /// Metric names, as kube-apiserver's.
    const METRICS: MetricNames;
    /// The condition type this allocator keeps on a Service while a finding about it stands
    /// (`False`, reason = the finding's Event reason); `None`: findings are only Events.
    const CONDITION: Option<&'static str>;

    /// Subscribes `notify` to every informer besides Services the mirror is built from.
    fn watch(&self, _notify: &Arc<Notify>) {}

    /// Whether those informers have listed.
    fn synced(&self) -> bool {
        true
    }

    /// Builds the ledger from all Services, claiming `pending` first.
    fn build(
        &self,
        services: &[&Service],
        pending: &Pending<ObjectKey, ValueOf<Self>>,
    ) -> MirrorOf<Self>;

    /// The values a Service holds as stored (to see when a pending write shows).
    fn holdings(&self, svc: &Service) -> Vec<ValueOf<Self>>;

    /// Sets the capacity gauges from `next` (and drops what `prev` had that `next` lacks).
    fn publish(
        &self,
        metrics: &MetricsOf<Self>,
        prev: Option<&MirrorOf<Self>>,
        next: &MirrorOf<Self>,
    );

    /// Plans one Service's assignment, taking values from `mirror`.
    fn step(&self, mirror: &mut MirrorOf<Self>, svc: &Service) -> Step<ValueOf<Self>, Self::Label>;

    /// The object a finding filed under a key that is not a Service's is about (an
    /// IPAddress), to put the Event on; `None` once it is gone.
    fn subject(&self, _key: &ObjectKey) -> Option<ObjectReference> {
        None
    }
}

/// A Service's age and key: contested values belong to the oldest Service.
pub fn seniority(svc: &Service) -> (Option<k8s_openapi::jiff::Timestamp>, ObjectKey) {
    (
        svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ObjectKey::of(svc),
    )
}

/// Service `type`, defaulted to ClusterIP as the API server defaults it.
pub fn service_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shell's state: the core, the Service informer, the mirror and the work queue.
pub struct Shell<A: Allocator> {
    core: A,
    services: Informer<Service>,
    mirror: Mutex<Option<MirrorOf<A>>>,
    /// Assignments written (or being written) but not yet seen in the informer.
    pending: Mutex<Pending<ObjectKey, ValueOf<A>>>,
    metrics: MetricsOf<A>,
    queue: WorkQueue<ObjectKey>,
    /// When each standing finding that waits was first seen.
    first_seen: FirstSeen,
    /// `--assign`: write assignments where the API server left them undone.
    assign: bool,
    /// Writes [`Allocator::CONDITION`], started by the first reconcile that wants it.
    conditions: OnceLock<conditions::Writer>,
}

impl<A: Allocator> Shell<A> {
    /// A shell over `services` (tests feed a detached informer; [`run`] the process's);
    /// `assign` as `--assign`.
    pub fn new(core: A, services: Informer<Service>, metrics: MetricsOf<A>, assign: bool) -> Self {
        Shell {
            assign,
            core,
            services,
            mirror: Mutex::new(None),
            pending: Mutex::new(Pending::new()),
            metrics,
            queue: WorkQueue::new(Backoff::default()),
            first_seen: FirstSeen::default(),
            conditions: OnceLock::new(),
        }
    }

    /// The metric families.
    pub fn metrics(&self) -> &MetricsOf<A> {
        &self.metrics
    }

    /// Reads the current mirror (`None` before the first rebuild).
    pub fn with_mirror<R>(&self, f: impl FnOnce(Option<&MirrorOf<A>>) -> R) -> R {
        f(lock(&self.mirror).as_ref())
    }

    /// Rebuilds the mirror from the stores, updates the gauges, and queues every Service whose
    /// findings changed or that needs an assignment.
    pub fn rebuild(&self) {
        // The informer's store: after a relist it is already the new list, so Services deleted
        // while the watch was down are gone from the rebuilt mirror too.
        let state = self.services.list();
        let services: Vec<&Service> = state.iter().map(|s| s.as_ref()).collect();
        let pending = {
            let mut p = lock(&self.pending);
            // Drop pending assignments the store now shows (or whose Service is gone).
            p.retain(|key, values| {
                let Some(svc) = self.services.get(key) else {
                    return false;
                };
                let have = self.core.holdings(&svc);
                !values.iter().all(|v| have.contains(v))
            });
            p.clone()
        };
        let next = self.core.build(&services, &pending);
        let mut guard = lock(&self.mirror);
        let mut changed: BTreeSet<ObjectKey> = if self.assign {
            next.needs_assign.clone()
        } else {
            BTreeSet::new()
        };
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
        changed.extend(condition::stale::<A>(&services, &next));
        self.core.publish(&self.metrics, guard.as_ref(), &next);
        self.first_seen.note(&next.findings, SystemTime::now());
        debug!(
            kind = A::METRICS.kind,
            services = services.len(),
            findings = next.findings.len(),
            queued = changed.len(),
            "mirror rebuilt"
        );
        *guard = Some(next);
        drop(guard);
        for k in changed {
            self.queue.add(k);
        }
    }

    /// Frees what a failed write had taken.
    fn release(&self, key: &ObjectKey, values: &[ValueOf<A>]) {
        lock(&self.pending).remove(key);
        if let Some(m) = lock(&self.mirror).as_mut() {
            for v in values {
                m.release(*v, key);
            }
        }
    }
}

/// Runs allocator `core` until `ctx.shutdown` is cancelled, `concurrency` Services at a time;
/// `assign` as `--assign` (off: the Services are never written).
pub async fn run<A: Allocator>(ctx: ControllerContext, core: A, concurrency: usize, assign: bool) {
    let notify = Arc::new(Notify::new());
    let services = ctx.informers.services();
    let n = notify.clone();
    // Every change (a relist included) only wakes the coalesced rebuild, which reads the stores.
    services.subscribe(move |_| n.notify_one());
    core.watch(&notify);
    let metrics = AllocMetrics::register(&ctx, &A::METRICS);
    let shell = Arc::new(Shell::new(core, services, metrics, assign));
    let synced = || shell.services.is_synced() && shell.core.synced();
    if !scm_runtime::wait_for_sync(&ctx, synced).await {
        return;
    }
    shell.rebuild();
    let rebuild = {
        let shell = shell.clone();
        // Coalesce bursts (a relist of thousands of Services) into one rebuild.
        scm_runtime::run_coalesced(
            notify,
            ctx.shutdown.clone(),
            Duration::from_millis(50),
            move || shell.rebuild(),
        )
    };
    let cfg = WorkerConfig {
        concurrency: concurrency.max(1),
        ..Default::default()
    };
    let (rctx, rshell) = (ctx.clone(), shell.clone());
    let workers = scm_runtime::run_workers(&ctx, shell.queue.clone(), cfg, move |key| {
        let (ctx, shell) = (rctx.clone(), rshell.clone());
        async move { reconcile(&ctx, &shell, key).await }
    });
    tokio::join!(rebuild, workers);
    shell.queue.shut_down();
}

async fn reconcile<A: Allocator>(
    ctx: &ControllerContext,
    shell: &Shell<A>,
    key: ObjectKey,
) -> Result<Requeue, Error> {
    let findings_of = |key: &ObjectKey| {
        lock(&shell.mirror)
            .as_ref()
            .and_then(|m| m.findings.get(key).cloned())
            .unwrap_or_default()
    };
    let Some(svc) = shell.services.get(&key) else {
        // A finding about another object (an IPAddress), while it exists.
        return Ok(match shell.core.subject(&key) {
            Some(oref) => report(ctx, shell, &key, &oref, &findings_of(&key)).await,
            None => Requeue::Done,
        });
    };
    let oref = svc.object_ref(&());
    let (findings, needs) = {
        let g = lock(&shell.mirror);
        let Some(m) = g.as_ref() else {
            return Ok(Requeue::Done);
        };
        (
            m.findings.get(&key).cloned().unwrap_or_default(),
            m.needs_assign.contains(&key),
        )
    };
    let again = report(ctx, shell, &key, &oref, &findings).await;
    condition::want(ctx, shell, &key, &svc, &findings);
    // A written assignment not yet in the store: nothing to do until the store shows it.
    let in_flight = lock(&shell.pending).contains_key(&key);
    if needs && !in_flight && shell.assign {
        assign(ctx, shell, &key, svc).await?;
    }
    Ok(again)
}

/// Publishes each standing finding once it is due, and forgets those that are gone; asks to
/// come back when the next one waiting falls due.
async fn report<A: Allocator>(
    ctx: &ControllerContext,
    shell: &Shell<A>,
    key: &ObjectKey,
    oref: &ObjectReference,
    findings: &[A::Finding],
) -> Requeue {
    let reasons: BTreeSet<&str> = findings.iter().map(|f| f.reason()).collect();
    for r in A::FINDING_REASONS {
        if !reasons.contains(r) {
            ctx.events.clear(oref, Some(r));
        }
    }
    let now = SystemTime::now();
    let mut wait: Option<Duration> = None;
    for f in findings {
        if let Ok(left) = shell.first_seen.due(key, f).duration_since(now)
            && !left.is_zero()
        {
            wait = Some(wait.map_or(left, |w| w.min(left)));
            continue;
        }
        if ctx
            .events
            .warn_once(oref, f.reason(), f.action(), f.message())
            .await
        {
            shell
                .metrics
                .repair
                .get_or_create(&TypeLabel {
                    r#type: f.metric_type().into(),
                })
                .inc();
            let object = oref.kind.as_deref().unwrap_or("Service");
            warn!(%object, key = %key, kind = A::METRICS.kind, reason = f.reason(), message = %f.message(), "repair finding");
        }
    }
    wait.map_or(Requeue::Done, Requeue::After)
}

/// Applies the core's step, re-planning from a fresh read on a 409.
async fn assign<A: Allocator>(
    ctx: &ControllerContext,
    shell: &Shell<A>,
    key: &ObjectKey,
    mut svc: Arc<Service>,
) -> Result<(), Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    for _attempt in 0..5 {
        let step = {
            let mut g = lock(&shell.mirror);
            let Some(m) = g.as_mut() else { return Ok(()) };
            shell.core.step(m, &svc)
        };
        let oref = svc.object_ref(&());
        let (updated, fresh, count, plan) = match step {
            Step::Nothing => return Ok(()),
            Step::Refuse {
                reason,
                action,
                message,
                count,
            } => {
                // Counted once per problem, like the Event, not on every resync.
                if ctx.events.warn_once(&oref, reason, action, message).await {
                    shell.metrics.errors.get_or_create(&count).inc();
                }
                return Ok(());
            }
            Step::Write {
                service,
                fresh,
                count,
                plan,
            } => (service, fresh, count, plan),
        };
        if !fresh.is_empty() {
            lock(&shell.pending).insert(key.clone(), fresh.clone());
        }
        // `replace` sends metadata.resourceVersion as read: the write is refused with 409 if
        // anyone changed the Service since.
        match api
            .replace(&key.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                for (label, n) in &count {
                    shell.metrics.allocations.get_or_create(label).inc_by(*n);
                }
                for r in A::REFUSAL_REASONS {
                    ctx.events.clear(&oref, Some(r));
                }
                info!(service = %key, kind = A::METRICS.kind, plan = %plan, "assigned");
                return Ok(());
            }
            Err(e) => {
                shell.release(key, &fresh);
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

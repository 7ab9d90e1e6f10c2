//! The local pools' shell: `LoadBalancerIPPool` objects through the process's informer hub (one
//! watch per kind), the Services and Namespaces the pure core needs (what others publish and
//! pin, selectors), and a loop that keeps each pool's status (leader only, optimistic
//! concurrency), the pool gauges (every replica) and the Warnings about addresses outside every
//! pool in step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, ListParams, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use scm_runtime::informer::Change;
use scm_runtime::informer::key_of;
use scm_runtime::informer::trim;
use scm_runtime::{ControllerContext, Informer, ObjectKey};
use tracing::{debug, error, info, warn};

use super::crd::LoadBalancerIPPool;
use super::plan::{self, Book, PoolDef};
use super::share;
use super::{Inner, published, requested, status};
use crate::CloudLbConfig;
use crate::core::{ClassFilter, wants_load_balancer};

/// What the provider sees of the cluster once started.
pub(crate) struct World {
    services: Informer<Service>,
    namespaces: Informer<Namespace>,
    filter: ClassFilter,
    /// The pool objects are listed (or the CRD is absent and the file's pools are all).
    pools_ready: AtomicBool,
}

impl World {
    /// Addresses that others publish (another implementation's status, `spec.externalIPs`) or
    /// pin (another Service's `loadBalancerIP` or annotation), leaving out Service `except`
    /// and the pins of our Services that share under `key` (they may hold it together).
    /// Our own Services' statuses are what the book holds, so they are not "others".
    pub fn blocked(&self, except: Option<&str>, key: Option<&str>) -> BTreeMap<IpAddr, String> {
        let mut out = BTreeMap::new();
        for s in self.services.list() {
            let uid = s.metadata.uid.as_deref().unwrap_or("");
            if except == Some(uid) {
                continue;
            }
            let sharer = key.is_some()
                && wants_load_balancer(&s, &self.filter)
                && share::of(&s).is_some_and(|t| Some(t.key.as_str()) == key);
            for (ip, why) in blocks(&s, &self.filter) {
                if sharer && why == Block::Requested {
                    continue;
                }
                out.entry(ip)
                    .or_insert_with(|| format!("{} ({})", super::svc_name(&s), why.as_str()));
            }
        }
        out
    }

    /// A namespace's labels (`None` while it is not known).
    pub fn namespace_labels(&self, ns: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectKey::new("", ns))
            .map(|n| n.metadata.labels.clone().unwrap_or_default())
    }

    fn ready(&self) -> bool {
        self.pools_ready.load(Ordering::SeqCst)
            && self.services.is_synced()
            && self.namespaces.is_synced()
    }

    /// Waits until the pools, Services and Namespaces are listed.
    pub async fn wait_ready(&self) {
        let mut logged = false;
        while !self.ready() {
            if !logged {
                info!(
                    "local pools: waiting for the pool objects, Services and Namespaces to be listed"
                );
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Why a Service keeps others from an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    ExternalIp,
    Published,
    Requested,
}

impl Block {
    fn as_str(self) -> &'static str {
        match self {
            Block::ExternalIp => "spec.externalIPs",
            Block::Published => "published by another implementation",
            Block::Requested => "requested",
        }
    }
}

/// The addresses one Service keeps from everyone else, in precedence order.
fn blocks(s: &Service, filter: &ClassFilter) -> Vec<(IpAddr, Block)> {
    let mut out = vec![];
    let spec = s.spec.as_ref();
    for ip in spec
        .and_then(|sp| sp.external_ips.as_ref())
        .into_iter()
        .flatten()
    {
        if let Ok(ip) = ip.parse() {
            out.push((ip, Block::ExternalIp));
        }
    }
    if !wants_load_balancer(s, filter) && s.metadata.deletion_timestamp.is_none() {
        out.extend(published(s).into_iter().map(|ip| (ip, Block::Published)));
    }
    if spec.and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer") {
        out.extend(
            requested(s)
                .unwrap_or_default()
                .into_iter()
                .map(|ip| (ip, Block::Requested)),
        );
    }
    out
}

/// Follows what each Service blocks and wakes the Services waiting for capacity as soon as a
/// blocked address is let go (a foreign holder's status cleared, its externalIPs or pin
/// dropped, the Service deleted): a pin held by anyone is retried then, not after its backoff.
fn follow_blocks(inner: Arc<Inner>, filter: ClassFilter) -> impl FnMut(&Change<Service>) + Send {
    let mut seen: HashMap<String, Vec<IpAddr>> = HashMap::new();
    move |change| {
        let ips = |s: &Service| -> Vec<IpAddr> {
            blocks(s, &filter).into_iter().map(|(ip, _)| ip).collect()
        };
        let freed = match change {
            Change::Apply(s) => {
                let now = ips(s.as_ref());
                let before = seen.insert(super::key(s), now.clone()).unwrap_or_default();
                before.iter().any(|ip| !now.contains(ip))
            }
            Change::Delete(s) => seen.remove(&super::key(s)).is_some_and(|b| !b.is_empty()),
            Change::Relisted(list) => {
                let before: HashSet<IpAddr> = seen.values().flatten().copied().collect();
                seen = list
                    .iter()
                    .map(|s| (super::key(s), ips(s.as_ref())))
                    .collect();
                let now: HashSet<IpAddr> = seen.values().flatten().copied().collect();
                before.iter().any(|ip| !now.contains(ip))
            }
        };
        if freed {
            debug!("a blocked address was let go: retrying the Services waiting for capacity");
            inner.capacity.notify_one();
        }
        inner.changed.notify_one();
    }
}

/// Labels of the pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
    family: String,
    state: String,
}

/// Starts watching (called once by the controller, on every replica).
pub(crate) fn start(inner: Arc<Inner>, ctx: &ControllerContext, config: &CloudLbConfig) {
    let world = World {
        services: ctx.informers.services(),
        namespaces: ctx
            .informers
            .kind::<Namespace, Namespace>(trim::meta, key_of),
        filter: ClassFilter {
            class: config.load_balancer_class.clone(),
            default_implementation: config.default_load_balancer,
        },
        pools_ready: AtomicBool::new(false),
    };
    if inner.world.set(world).is_err() {
        return;
    }
    if !inner.lock().file.is_empty() {
        warn!(
            "--cloud-config pools are deprecated and will be removed in the next release: define LoadBalancerIPPool objects instead (service-controller-manager crd | kubectl apply -f -)"
        );
    }
    let gauge: Family<PoolLabel, Gauge> = Family::default();
    ctx.metrics.registry().register(
        "service_controller_local_pool_addresses",
        "Addresses of each local pool by family and state (allocated, available)",
        gauge.clone(),
    );
    let services = ctx.informers.services();
    let filter = ClassFilter {
        class: config.load_balancer_class.clone(),
        default_implementation: config.default_load_balancer,
    };
    services.subscribe(follow_blocks(inner.clone(), filter));
    tokio::spawn(probe(inner.clone(), ctx.clone()));
    tokio::spawn(status_loop(inner, ctx.clone(), gauge));
}

/// Starts the pool informer once the CRD is served. Without the CRD the file's pools are all
/// there is (said once); without either, it says so and looks again.
async fn probe(inner: Arc<Inner>, ctx: ControllerContext) {
    let api = Api::<LoadBalancerIPPool>::all(ctx.client.clone());
    let mut said = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !inner.lock().file.is_empty() {
                    warn!(
                        "the LoadBalancerIPPool CRD is not installed: serving the --cloud-config pools only"
                    );
                    if let Some(w) = inner.world.get() {
                        w.pools_ready.store(true, Ordering::SeqCst);
                    }
                    return;
                }
                if !said {
                    error!(
                        "the LoadBalancerIPPool CRD is not installed and --cloud-config has no pools: no addresses to give (install it: service-controller-manager crd | kubectl apply -f -)"
                    );
                    said = true;
                }
            }
            Err(e) => warn!(error = %e, "listing LoadBalancerIPPools failed; retrying"),
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    let pools: Informer<LoadBalancerIPPool> = ctx.informers.kind(trim::meta, key_of);
    let (i2, p2) = (inner.clone(), pools.clone());
    pools.subscribe(move |_| {
        let mut list = p2.list();
        // Older pools win overlaps: order by creation, then name.
        list.sort_by(|a, b| {
            (a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.metadata.name.as_deref())
                .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.metadata.name.as_deref()))
        });
        let defs: Vec<PoolDef> = list
            .iter()
            .map(|p| PoolDef {
                name: p.metadata.name.clone().unwrap_or_default(),
                cidrs: p.spec.cidrs.clone(),
                service_selector: p.spec.service_selector.clone(),
                namespace_selector: p.spec.namespace_selector.clone(),
                avoid_buggy_ips: p.spec.avoid_buggy_ips,
                disabled: p.spec.disabled,
            })
            .collect();
        {
            let mut st = i2.lock();
            if st.objects != defs {
                // Only a pool change can make room without a release: wake who waits.
                i2.capacity.notify_one();
            }
            st.objects = defs;
            st.recompile();
            for p in st.pools.iter().filter(|p| !p.serves()) {
                debug!(pool = %p.def.name, invalid = ?p.invalid, overlaps = ?p.overlaps, disabled = p.def.disabled, "pool serves no new addresses");
            }
        }
        if p2.is_synced()
            && let Some(w) = i2.world.get()
        {
            w.pools_ready.store(true, Ordering::SeqCst);
        }
        i2.changed.notify_one();
    });
    status_writer(inner, ctx, pools).await;
}

/// Waits for the pool informer, then keeps the objects' status in step (leader only).
async fn status_writer(
    inner: Arc<Inner>,
    ctx: ControllerContext,
    pools: Informer<LoadBalancerIPPool>,
) {
    let api = Api::<LoadBalancerIPPool>::all(ctx.client.clone());
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = inner.changed_status.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        if !ctx.leader.is_leader() || !pools.is_synced() {
            continue;
        }
        for obj in pools.list() {
            if let Err(e) = write_status(&inner, &api, &obj).await {
                warn!(pool = obj.metadata.name.as_deref().unwrap_or(""), error = %e, "pool status not written; retrying on the next change");
            }
        }
    }
}

/// The book the counts describe: the leader's own once it has one, else what our Services
/// publish (a follower, or before the first restore).
fn view(inner: &Inner) -> Book {
    let st = inner.lock();
    if !st.book.held.is_empty() {
        return st.book.clone();
    }
    let Some(w) = inner.world.get() else {
        return st.book.clone();
    };
    let mut b = Book::default();
    for s in w
        .services
        .list()
        .iter()
        .filter(|s| wants_load_balancer(s, &w.filter))
    {
        let (uid, who) = (super::key(s), super::svc_name(s));
        for ip in published(s) {
            let origin = st
                .pools
                .iter()
                .find(|p| p.covers(ip))
                .map(|p| p.def.name.clone());
            // Counts are per address: sharers count once.
            b.take_shared(ip, &uid, &who, origin, share::of(s));
        }
    }
    b
}

/// One object's status, written if it differs: a PUT of the status subresource carrying the
/// resourceVersion we computed from, re-read and recomputed on 409.
async fn write_status(
    inner: &Inner,
    api: &Api<LoadBalancerIPPool>,
    seen: &LoadBalancerIPPool,
) -> Result<(), kube::Error> {
    let name = seen.metadata.name.clone().unwrap_or_default();
    let mut obj = seen.clone();
    for _ in 0..3 {
        let desired = desired_for(inner, &obj);
        let Some(desired) = desired else {
            return Ok(());
        };
        if obj.status.as_ref() == Some(&desired) {
            return Ok(());
        }
        let mut body = obj.clone();
        body.status = Some(desired);
        match api
            .replace_status(&name, &PostParams::default(), &body)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(pool = %name, "pool status conflict: re-reading");
                obj = api.get(&name).await?;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn desired_for(
    inner: &Inner,
    obj: &LoadBalancerIPPool,
) -> Option<super::crd::LoadBalancerIPPoolStatus> {
    let name = obj.metadata.name.as_deref()?;
    let book = view(inner);
    let w = inner.world.get()?;
    let blocked = w.blocked(None, None);
    let st = inner.lock();
    let pool = st.pools.iter().find(|p| p.def.name == name)?;
    // Only report on the spec we compiled (the informer may be a step behind a 409's re-read).
    if pool.def.cidrs != obj.spec.cidrs || pool.def.disabled != obj.spec.disabled {
        return None;
    }
    let report = plan::pool_report(pool, &book, &blocked);
    let selective = pool.def.service_selector.is_some() || pool.def.namespace_selector.is_some();
    let matches_nothing = selective
        && !w.services.list().iter().any(|s| {
            wants_load_balancer(s, &w.filter)
                && pool.admits(
                    &s.metadata.labels.clone().unwrap_or_default(),
                    w.namespace_labels(s.metadata.namespace.as_deref().unwrap_or(""))
                        .as_ref(),
                )
        });
    Some(status::desired(
        pool,
        &report,
        matches_nothing,
        obj.status.as_ref(),
        obj.metadata.generation,
        Timestamp::now(),
    ))
}

/// Keeps the gauges (every replica) and the Warnings about addresses in no pool (leader) in
/// step with every change, and every 30 s.
async fn status_loop(inner: Arc<Inner>, ctx: ControllerContext, gauge: Family<PoolLabel, Gauge>) {
    loop {
        if inner.world.get().is_some_and(World::ready) {
            let book = view(&inner);
            let blocked = inner
                .world
                .get()
                .map(|w| w.blocked(None, None))
                .unwrap_or_default();
            let clashes = share::conflicts(&book);
            let (reports, uncovered) = {
                let st = inner.lock();
                let reports: Vec<(String, plan::PoolReport)> = st
                    .pools
                    .iter()
                    .map(|p| (p.def.name.clone(), plan::pool_report(p, &book, &blocked)))
                    .collect();
                (reports, plan::uncovered(&st.pools, &book))
            };
            gauge.clear();
            for (pool, r) in &reports {
                for (family, state, v) in [
                    ("IPv4", "allocated", r.allocated.0),
                    ("IPv4", "available", r.available.0),
                    ("IPv6", "allocated", r.allocated.1),
                    ("IPv6", "available", r.available.1),
                ] {
                    gauge
                        .get_or_create(&PoolLabel {
                            pool: pool.clone(),
                            family: family.into(),
                            state: state.into(),
                        })
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
            }
            if ctx.leader.is_leader() {
                warn_uncovered(&inner, &ctx, &uncovered).await;
                warn_clashes(&inner, &ctx, &clashes).await;
            }
            inner.changed_status.notify_one();
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = inner.changed.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// A Warning on each Service holding an address that no pool covers any more (once per
/// Service and address): it keeps the address; the operator should know.
async fn warn_uncovered(
    inner: &Inner,
    ctx: &ControllerContext,
    uncovered: &[(IpAddr, plan::Holder)],
) {
    let Some(w) = inner.world.get() else { return };
    for (ip, h) in uncovered {
        let Some((ns, name)) = h.who.split_once('/') else {
            continue;
        };
        let Some(svc) = w.services.get(&ObjectKey::new(ns, name)) else {
            continue;
        };
        let pool = h.origin.as_deref().unwrap_or("a pool");
        ctx.events
            .warn_once(
                &svc.object_ref(&()),
                "AddressOutsidePools",
                "KeepAddress",
                format!("load balancer address {ip} is no longer in any LoadBalancerIPPool ({pool} shrank or was deleted); the Service keeps it until it asks for another"),
            )
            .await;
    }
}

/// A Warning on each Service that holds a shared address on terms that clash with an earlier
/// sharer's (it changed its ports, policy or key after it joined; once per Service, address
/// and reason): it keeps the address, since addresses never move; its owner should fix it.
async fn warn_clashes(
    inner: &Inner,
    ctx: &ControllerContext,
    clashes: &[(IpAddr, plan::Holder, String)],
) {
    let Some(w) = inner.world.get() else { return };
    for (ip, h, why) in clashes {
        let Some((ns, name)) = h.who.split_once('/') else {
            continue;
        };
        let Some(svc) = w.services.get(&ObjectKey::new(ns, name)) else {
            continue;
        };
        ctx.events
            .warn_once(
                &svc.object_ref(&()),
                "SharedAddressConflict",
                "KeepAddress",
                format!("load balancer address {ip} is shared, but {why}; the Service keeps it: fix its ports or {} annotation, or ask for another address", share::ALLOW_SHARED_IP_ANNOTATION),
            )
            .await;
    }
}

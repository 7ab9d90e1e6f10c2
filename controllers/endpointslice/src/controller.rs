//! The EndpointSlice controller's kube shell: trimmed caches of Services, Pods, Nodes and our
//! EndpointSlices on every replica, Service keys in a work queue, and a reconcile that feeds
//! the pure core (`slices::plan`) and applies its plan while this process leads.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::watcher;
use tracing::{debug, warn};

use scm_runtime::{
    Backoff, ControllerContext, ObjectKey, Requeue, WorkQueue, WorkerConfig, run_workers,
};

use crate::Error;
use crate::cache::{self, Change, PodServiceIndex};
use crate::common::*;
use crate::metrics::{ChangedLabels, ControllerLabel, SliceMetrics};
use crate::slices::{self, SliceInput};
use crate::topology::{self, NodeTopology, ZoneRatios};

/// Settings of the `endpointslice` controller (flags of the binary).
#[derive(Clone, Debug)]
pub struct EndpointSliceConfig {
    /// `--max-endpoints-per-slice` (default 100, at most 1000).
    pub max_endpoints_per_slice: usize,
    /// `--concurrent-service-endpoint-syncs` (default 5).
    pub concurrent_syncs: usize,
    /// `--endpointslice-updates-batch-period` (default 0: no batching).
    pub batch_period: Duration,
    /// `--endpointslice-takeover`: adopt slices managed by kube-controller-manager.
    pub takeover: bool,
    /// `--service-label-selector`: only Services matching it are served (None: all).
    pub service_label_selector: Option<String>,
}

impl Default for EndpointSliceConfig {
    fn default() -> Self {
        EndpointSliceConfig {
            max_endpoints_per_slice: slices::DEFAULT_MAX_ENDPOINTS_PER_SLICE,
            concurrent_syncs: 5,
            batch_period: Duration::ZERO,
            takeover: false,
            service_label_selector: None,
        }
    }
}

impl EndpointSliceConfig {
    /// Checks ranges the way kube-controller-manager validates its flags.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_endpoints_per_slice < 1
            || self.max_endpoints_per_slice > slices::MAX_MAX_ENDPOINTS_PER_SLICE
        {
            return Err(Error::Config(format!(
                "--max-endpoints-per-slice must be between 1 and {}, got {}",
                slices::MAX_MAX_ENDPOINTS_PER_SLICE,
                self.max_endpoints_per_slice
            )));
        }
        if self.concurrent_syncs < 1 {
            return Err(Error::Config(
                "--concurrent-service-endpoint-syncs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Upstream's EndpointSliceTracker: the generation of every slice we wrote, or "deletion
/// expected", per Service. A cache showing an older generation (or a slice we deleted) is
/// stale: we wait for it to catch up instead of acting on it.
#[derive(Default)]
pub struct SliceTracker {
    by_service: Mutex<HashMap<ObjectKey, HashMap<String, i64>>>,
}

const DELETION_EXPECTED: i64 = -1;

fn svc_key_of_slice(s: &EndpointSlice) -> Option<ObjectKey> {
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    if name.is_empty() {
        return None;
    }
    Some(ObjectKey::new(
        s.metadata.namespace.clone().unwrap_or_default(),
        name.clone(),
    ))
}

fn uid(s: &EndpointSlice) -> String {
    s.metadata.uid.clone().unwrap_or_default()
}

fn generation(s: &EndpointSlice) -> i64 {
    s.metadata.generation.unwrap_or(0)
}

impl SliceTracker {
    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectKey, HashMap<String, i64>>> {
        self.by_service.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a slice as written by us at its generation.
    pub fn update(&self, key: &ObjectKey, s: &EndpointSlice) {
        self.lock()
            .entry(key.clone())
            .or_default()
            .insert(uid(s), generation(s));
    }

    /// Records that we deleted a slice.
    pub fn expect_deletion(&self, key: &ObjectKey, s: &EndpointSlice) {
        self.lock()
            .entry(key.clone())
            .or_default()
            .insert(uid(s), DELETION_EXPECTED);
    }

    /// Whether a slice event is news to us (not merely the echo of our own write).
    pub fn should_sync(&self, key: &ObjectKey, s: &EndpointSlice) -> bool {
        match self.lock().get(key).and_then(|m| m.get(&uid(s))) {
            None => true,
            Some(g) => generation(s) > *g,
        }
    }

    /// Handles a deletion event; true if it was one we expected.
    pub fn handle_deletion(&self, key: &ObjectKey, s: &EndpointSlice) -> bool {
        let mut g = self.lock();
        match g.get_mut(key).and_then(|m| m.remove(&uid(s))) {
            Some(DELETION_EXPECTED) => true,
            Some(_) => false,
            None => false,
        }
    }

    /// Whether `slices` (what the cache shows) is older than what we wrote.
    pub fn stale(&self, key: &ObjectKey, slices: &[impl Borrow<EndpointSlice>]) -> bool {
        let g = self.lock();
        let Some(m) = g.get(key) else { return false };
        let mut seen = HashSet::new();
        for s in slices {
            let s = s.borrow();
            seen.insert(uid(s));
            if let Some(want) = m.get(&uid(s))
                && (*want == DELETION_EXPECTED || *want > generation(s))
            {
                return true;
            }
        }
        m.iter()
            .any(|(u, g)| *g != DELETION_EXPECTED && !seen.contains(u))
    }

    /// Forgets a Service.
    pub fn delete_service(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }
}

#[derive(Default)]
struct State {
    idx: PodServiceIndex,
    nodes: HashMap<String, NodeTopology>,
    zone_ratios: ZoneRatios,
    slices: HashMap<ObjectKey, BTreeMap<String, Arc<EndpointSlice>>>,
    // (namespace, slice name) -> the Service it was filed under, to notice relabelling.
    slice_owner: HashMap<(String, String), ObjectKey>,
    hints_populated: HashSet<ObjectKey>,
    synced: HashSet<&'static str>,
}

struct Shared {
    ctx: ControllerContext,
    cfg: EndpointSliceConfig,
    state: Mutex<State>,
    tracker: SliceTracker,
    queue: WorkQueue<ObjectKey>,
    metrics: SliceMetrics,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, key: ObjectKey) {
        if self.cfg.batch_period.is_zero() {
            self.queue.add(key);
        } else {
            self.queue.add_after(key, self.cfg.batch_period);
        }
    }

    fn managed(&self, s: &EndpointSlice) -> bool {
        let m = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .map(String::as_str);
        m == Some(CONTROLLER_NAME) || (self.cfg.takeover && m == Some(UPSTREAM_CONTROLLER_NAME))
    }
}

fn node_topology(n: &Node) -> NodeTopology {
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let status = n.status.clone().unwrap_or_default();
    NodeTopology {
        zone: labels.get(LABEL_ZONE).cloned(),
        ready: status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .is_some_and(|c| c.status == "True"),
        excluded: labels.contains_key("node-role.kubernetes.io/control-plane")
            || labels.contains_key("node-role.kubernetes.io/master"),
        cpu_millis: status
            .allocatable
            .as_ref()
            .and_then(|a| a.get("cpu"))
            .map(|q| topology::cpu_millis(&q.0))
            .unwrap_or(0),
    }
}

fn service_ref(svc: &Service) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: svc.metadata.name.clone(),
        namespace: svc.metadata.namespace.clone(),
        uid: svc.metadata.uid.clone(),
        ..Default::default()
    }
}

/// Runs the EndpointSlice controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: EndpointSliceConfig) -> Result<(), Error> {
    config.validate()?;
    let metrics = SliceMetrics::register(&ctx.metrics, "endpoint_slice_controller", &ctx.name);
    let shared = Arc::new(Shared {
        queue: WorkQueue::new(Backoff {
            // Upstream starts at 1 s; a stale cache clears in milliseconds, so we retry sooner.
            base: Duration::from_millis(50),
            max: Duration::from_secs(1000),
        }),
        ctx: ctx.clone(),
        cfg: config.clone(),
        state: Mutex::new(State::default()),
        tracker: SliceTracker::default(),
        metrics,
    });
    let client = ctx.client.clone();
    let mut svc_cfg = watcher::Config::default();
    if let Some(sel) = &config.service_label_selector {
        svc_cfg = svc_cfg.labels(sel);
    }
    let slice_sel = if config.takeover {
        format!("{LABEL_MANAGED_BY} in ({CONTROLLER_NAME},{UPSTREAM_CONTROLLER_NAME})")
    } else {
        format!("{LABEL_MANAGED_BY}={CONTROLLER_NAME}")
    };
    let s1 = shared.clone();
    let svc_task = cache::watch(
        Api::<Service>::all(client.clone()),
        svc_cfg,
        ctx.shutdown.clone(),
        cache::trim_service,
        move |c| on_service(&s1, c),
    );
    let s2 = shared.clone();
    let pod_task = cache::watch(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        ctx.shutdown.clone(),
        PodRecord::from_pod,
        move |c| on_pod(&s2, c),
    );
    let s3 = shared.clone();
    let node_task = cache::watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        ctx.shutdown.clone(),
        cache::trim_meta,
        move |c| on_node(&s3, c),
    );
    let s4 = shared.clone();
    let slice_task = cache::watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&slice_sel),
        ctx.shutdown.clone(),
        cache::trim_slice,
        move |c| on_slice(&s4, c),
    );
    let s5 = shared.clone();
    let workers = async move {
        // Wait for every cache before reconciling anything: acting on a partial view could
        // delete endpoints that are merely not listed yet.
        if !scm_runtime::wait_for_sync(&s5.ctx, || s5.state().synced.len() == 4).await {
            return;
        }
        let s6 = s5.clone();
        run_workers(
            &s5.ctx,
            s5.queue.clone(),
            WorkerConfig {
                concurrency: s5.cfg.concurrent_syncs,
                ..Default::default()
            },
            move |key| {
                let s = s6.clone();
                async move { reconcile(s, key).await }
            },
        )
        .await;
    };
    tokio::join!(svc_task, pod_task, node_task, slice_task, workers);
    Ok(())
}

fn on_service(s: &Shared, c: Change<Service>) {
    let mut st = s.state();
    match c {
        Change::Apply(svc) => {
            let svc = Arc::new(cache::trim_service(svc));
            let key = ObjectKey::of(svc.as_ref());
            let old = st.idx.put_service(svc.clone());
            if old.is_none_or(|o| o != svc) {
                drop(st);
                s.queue.add(key);
            }
        }
        Change::Delete(svc) => {
            let key = ObjectKey::of(&svc);
            st.idx.remove_service(&key);
            drop(st);
            s.queue.add(key);
        }
        Change::Relisted(list) => {
            let mut keys: HashSet<ObjectKey> = st.idx.services.keys().cloned().collect();
            let old: Vec<ObjectKey> = keys.iter().cloned().collect();
            for k in old {
                st.idx.remove_service(&k);
            }
            for svc in list {
                let svc = Arc::new(cache::trim_service(svc));
                keys.insert(ObjectKey::of(svc.as_ref()));
                st.idx.put_service(svc);
            }
            // Slices whose Service we have never seen get a look too (deleted while down).
            keys.extend(st.slices.keys().cloned());
            st.synced.insert("services");
            drop(st);
            for k in keys {
                s.queue.add(k);
            }
        }
    }
}

fn on_pod(s: &Shared, c: Change<PodRecord>) {
    let mut st = s.state();
    let keys = match c {
        Change::Apply(p) => {
            let (p, old) = st.idx.put_pod(p);
            if old.as_deref().is_some_and(|o| *o == *p) {
                return;
            }
            st.idx.services_for_pod_change(old.as_deref(), Some(&p))
        }
        Change::Delete(p) => {
            let old = st.idx.remove_pod(&p.key());
            st.idx.services_for_pod_change(old.as_deref(), Some(&p))
        }
        Change::Relisted(list) => {
            let fresh: HashSet<ObjectKey> = list.iter().map(PodRecord::key).collect();
            let old: Vec<ObjectKey> = st.idx.pods.keys().cloned().collect();
            let mut affected = HashSet::new();
            for k in old {
                if !fresh.contains(&k)
                    && let Some(o) = st.idx.remove_pod(&k)
                {
                    affected.extend(st.idx.services_for_pod_change(Some(&o), None));
                }
            }
            drop(fresh);
            for p in list {
                let (p, old) = st.idx.put_pod(p);
                if old.as_deref().is_none_or(|o| *o != *p) {
                    affected.extend(st.idx.services_for_pod_change(old.as_deref(), Some(&p)));
                }
            }
            st.synced.insert("pods");
            affected.into_iter().collect()
        }
    };
    drop(st);
    for k in keys {
        s.enqueue(k);
    }
}

fn on_node(s: &Shared, c: Change<Node>) {
    let mut st = s.state();
    match c {
        Change::Apply(n) => {
            let name = n.metadata.name.clone().unwrap_or_default();
            st.nodes.insert(name, node_topology(&n));
        }
        Change::Delete(n) => {
            st.nodes.remove(n.metadata.name.as_deref().unwrap_or(""));
        }
        Change::Relisted(list) => {
            st.nodes = list
                .iter()
                .map(|n| {
                    (
                        n.metadata.name.clone().unwrap_or_default(),
                        node_topology(n),
                    )
                })
                .collect();
            st.synced.insert("nodes");
        }
    }
    let ratios = ZoneRatios::from_nodes(st.nodes.values());
    if ratios != st.zone_ratios {
        st.zone_ratios = ratios;
        // Upstream requeues overloaded Services; we requeue every Service using Auto hints,
        // a superset that costs no writes when nothing changes.
        let keys: Vec<ObjectKey> = st.hints_populated.iter().cloned().collect();
        drop(st);
        for k in keys {
            s.queue.add(k);
        }
    }
}

fn on_slice(s: &Shared, c: Change<EndpointSlice>) {
    let mut st = s.state();
    let mut requeue = Vec::new();
    match c {
        Change::Apply(sl) => {
            let Some(key) = svc_key_of_slice(&sl) else {
                return;
            };
            let name = sl.metadata.name.clone().unwrap_or_default();
            // A slice whose service-name label changed must leave its old Service's set.
            let at = (key.namespace.clone(), name.clone());
            if let Some(prev) = st.slice_owner.insert(at, key.clone())
                && prev != key
            {
                if let Some(m) = st.slices.get_mut(&prev) {
                    m.remove(&name);
                }
                requeue.push(prev);
            }
            let news = s.managed(&sl) && s.tracker.should_sync(&key, &sl);
            st.slices
                .entry(key.clone())
                .or_default()
                .insert(name, Arc::new(sl));
            if news {
                requeue.push(key);
            }
        }
        Change::Delete(sl) => {
            let Some(key) = svc_key_of_slice(&sl) else {
                return;
            };
            let name = sl.metadata.name.clone().unwrap_or_default();
            st.slice_owner
                .remove(&(key.namespace.clone(), name.clone()));
            if let Some(m) = st.slices.get_mut(&key) {
                m.remove(&name);
                if m.is_empty() {
                    st.slices.remove(&key);
                }
            }
            if !s.tracker.handle_deletion(&key, &sl) {
                requeue.push(key);
            }
        }
        Change::Relisted(list) => {
            let before: HashSet<ObjectKey> = st.slices.keys().cloned().collect();
            st.slices.clear();
            st.slice_owner.clear();
            for sl in list {
                if let Some(key) = svc_key_of_slice(&sl) {
                    let name = sl.metadata.name.clone().unwrap_or_default();
                    st.slice_owner
                        .insert((key.namespace.clone(), name.clone()), key.clone());
                    st.slices.entry(key).or_default().insert(name, Arc::new(sl));
                }
            }
            if st.synced.insert("slices") {
                // First list: the Service relist queues what needs a look.
            } else {
                requeue.extend(before);
                requeue.extend(st.slices.keys().cloned());
            }
        }
    }
    drop(st);
    for k in requeue {
        s.queue.add(k);
    }
}

/// What a reconcile copies out of the caches (so no lock is held across awaits).
struct Snapshot {
    svc: Option<Arc<Service>>,
    pods: Vec<Arc<PodRecord>>,
    nodes: HashMap<String, Option<String>>,
    // Shared with the cache: the core borrows them, so a large Service's slices are not
    // copied for every reconcile.
    existing: Vec<Arc<EndpointSlice>>,
    zone_ratios: ZoneRatios,
    hints_populated: bool,
}

fn snapshot(s: &Shared, key: &ObjectKey) -> Snapshot {
    let st = s.state();
    let svc = st.idx.services.get(key).cloned();
    let pods = svc
        .as_ref()
        .and_then(|svc| svc.spec.as_ref().and_then(|sp| sp.selector.clone()))
        .map(|sel| st.idx.pods_for(&key.namespace, &sel))
        .unwrap_or_default();
    let nodes = pods
        .iter()
        .filter_map(|p| p.node_name.as_deref())
        .filter_map(|n| st.nodes.get(n).map(|t| (n.to_string(), t.zone.clone())))
        .collect();
    let existing = st
        .slices
        .get(key)
        .map(|m| {
            m.values()
                .filter(|sl| s.managed(sl) && sl.metadata.deletion_timestamp.is_none())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Snapshot {
        svc,
        pods,
        nodes,
        existing,
        zone_ratios: st.zone_ratios.clone(),
        hints_populated: st.hints_populated.contains(key),
    }
}

async fn reconcile(s: Arc<Shared>, key: ObjectKey) -> Result<Requeue, Error> {
    let snap = snapshot(&s, &key);
    let Some(svc) = snap.svc else {
        return cleanup_absent(&s, &key, snap.existing).await;
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") || spec.selector.is_none() {
        // As upstream: a Service without selector (or ExternalName) is not ours to fill.
        return Ok(Requeue::Done);
    }
    if s.tracker.stale(&key, &snap.existing) {
        s.metrics.sync("stale");
        return Err(Error::StaleCache(key.to_string()));
    }
    let plan = {
        let node_zone = |n: &str| snap.nodes.get(n).cloned();
        let input = SliceInput {
            service: &svc,
            pods: snap.pods.iter().map(|p| p.as_ref()).collect(),
            node_zone: &node_zone,
            existing: snap.existing.iter().map(|s| s.as_ref()).collect(),
            max_endpoints_per_slice: s.cfg.max_endpoints_per_slice,
            controller_name: CONTROLLER_NAME,
            zone_ratios: &snap.zone_ratios,
            hints_populated: snap.hints_populated,
        };
        slices::plan(&input)
    };
    {
        let mut st = s.state();
        if plan.hints_populated {
            st.hints_populated.insert(key.clone());
        } else {
            st.hints_populated.remove(&key);
        }
    }
    let sref = service_ref(&svc);
    for ev in &plan.events {
        if ev.warning {
            s.ctx
                .events
                .warning(&sref, &ev.reason, "UpdateHints", ev.message.clone())
                .await;
        } else {
            s.ctx
                .events
                .normal(&sref, &ev.reason, "UpdateHints", ev.message.clone())
                .await;
        }
    }
    let writes = plan.writes();
    let result = apply(&s, &key, &svc, &plan).await;
    let m = &s.metrics;
    m.added.get_or_create(&vec![]).observe(plan.added as f64);
    m.removed
        .get_or_create(&vec![])
        .observe(plan.removed as f64);
    let td = spec
        .traffic_distribution
        .clone()
        .filter(|t| topology::valid_traffic_distribution(Some(t)))
        .filter(|_| !topology::hints_annotation_enabled(&labels_of(&svc.metadata.annotations)));
    m.set_service(
        &key,
        plan.desired_endpoints,
        plan.num_slices,
        plan.desired_slices,
        td.clone(),
    );
    m.changed_per_sync
        .get_or_create(&ChangedLabels {
            topology: if topology::hints_annotation_enabled(&labels_of(&svc.metadata.annotations)) {
                "Auto".into()
            } else {
                "Disabled".into()
            },
            traffic_distribution: td.unwrap_or_default(),
        })
        .observe(writes as f64);
    m.writes_per_reconcile
        .get_or_create(&ControllerLabel {
            controller: s.ctx.name.clone(),
        })
        .observe(writes as f64);
    if let Err(e) = result {
        m.sync("error");
        s.ctx
            .events
            .warning(
                &sref,
                "FailedToUpdateEndpointSlices",
                "UpdateEndpointSlices",
                format!("Error updating Endpoint Slices for Service {key}: {e}"),
            )
            .await;
        return Err(e);
    }
    if !plan.missing_nodes.is_empty() {
        m.sync("error");
        return Err(Error::NodeNotFound(format!(
            "{key}: pods {:?}",
            plan.missing_nodes
        )));
    }
    m.sync("success");
    if writes > 0 {
        debug!(service = %key, creates = plan.create.len(), updates = plan.update.len(), deletes = plan.delete.len(), "applied EndpointSlice plan");
    }
    Ok(Requeue::Done)
}

/// Puts a written slice into our cache at once (if the watch has not shown a newer one), so
/// the next reconcile need not wait for the watch to echo our own write.
fn write_through(s: &Shared, key: &ObjectKey, sl: EndpointSlice) {
    // Trimmed as the watch trims: when the watch's echo arrived first, this copy (with the
    // managedFields of every endpoint) would otherwise stay cached.
    let sl = cache::trim_slice(sl);
    let mut st = s.state();
    let name = sl.metadata.name.clone().unwrap_or_default();
    st.slice_owner
        .insert((key.namespace.clone(), name.clone()), key.clone());
    let m = st.slices.entry(key.clone()).or_default();
    let newer_cached = m
        .get(&name)
        .is_some_and(|c| c.metadata.uid == sl.metadata.uid && generation(c) > generation(&sl));
    if !newer_cached {
        m.insert(name, Arc::new(sl));
    }
}

fn forget_cached(s: &Shared, key: &ObjectKey, name: &str) {
    let mut st = s.state();
    st.slice_owner
        .remove(&(key.namespace.clone(), name.to_string()));
    if let Some(m) = st.slices.get_mut(key) {
        m.remove(name);
    }
}

async fn apply(
    s: &Shared,
    key: &ObjectKey,
    svc: &Service,
    plan: &slices::SlicePlan,
) -> Result<(), Error> {
    let api: Api<EndpointSlice> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
    // Creates first, then updates, then deletes: ready endpoints never dip mid-plan.
    if svc.metadata.deletion_timestamp.is_none() {
        for c in &plan.create {
            match api.create(&PostParams::default(), c).await {
                Ok(created) => {
                    s.tracker.update(key, &created);
                    s.metrics.change("create");
                    write_through(s, key, created);
                }
                Err(kube::Error::Api(ae))
                    if ae.code == 403 && ae.message.contains("being terminated") =>
                {
                    return Ok(());
                }
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    for u in &plan.update {
        let name = u.metadata.name.clone().unwrap_or_default();
        // replace carries the resourceVersion read: a concurrent change is a 409 and the
        // key is retried against fresh state.
        let updated = api
            .replace(&name, &PostParams::default(), u)
            .await
            .map_err(Error::Kube)?;
        s.tracker.update(key, &updated);
        s.metrics.change("update");
        write_through(s, key, updated);
    }
    for d in &plan.delete {
        let name = d.metadata.name.clone().unwrap_or_default();
        let dp = DeleteParams::default().preconditions(Preconditions {
            uid: d.metadata.uid.clone(),
            resource_version: None,
        });
        match api.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        s.tracker.expect_deletion(key, d);
        s.metrics.change("delete");
        forget_cached(s, key, &name);
    }
    Ok(())
}

/// A Service absent from our cache: deleted, or outside our scope. Only when the API server
/// confirms it is gone do we delete the slices we made for it (there may be no garbage
/// collector running, and a Service merely out of scope keeps its slices).
async fn cleanup_absent(
    s: &Shared,
    key: &ObjectKey,
    ours: Vec<Arc<EndpointSlice>>,
) -> Result<Requeue, Error> {
    s.metrics.delete_service(key);
    if ours.is_empty() {
        s.tracker.delete_service(key);
        return Ok(Requeue::Done);
    }
    let svcs: Api<Service> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
    if let Some(live) = svcs.get_opt(&key.name).await.map_err(Error::Kube)? {
        let owned_by_live = ours.iter().all(|sl| {
            sl.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(&o.uid) == live.metadata.uid.as_ref())
        });
        if owned_by_live {
            return Ok(Requeue::Done);
        }
    }
    let api: Api<EndpointSlice> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
    for sl in &ours {
        if sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .map(String::as_str)
            != Some(CONTROLLER_NAME)
        {
            continue; // adopted-but-not-yet-relabelled slices stay with their owner
        }
        let name = sl.metadata.name.clone().unwrap_or_default();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 => {}
            Err(e) => {
                warn!(service = %key, slice = %name, error = %e, "could not delete slice of deleted Service");
                return Err(Error::Kube(e));
            }
        }
        s.metrics.change("delete");
        forget_cached(s, key, &name);
    }
    s.tracker.delete_service(key);
    Ok(Requeue::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(uid: &str, generation: i64) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                generation: Some(generation),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn tracker_detects_stale_views_and_echoes() {
        let t = SliceTracker::default();
        let k = ObjectKey::new("ns", "svc");
        t.update(&k, &slice("a", 2));
        assert!(
            !t.should_sync(&k, &slice("a", 2)),
            "our own write is no news"
        );
        assert!(t.should_sync(&k, &slice("a", 3)), "someone else's edit is");
        assert!(t.stale(&k, &[slice("a", 1)]), "older than our write");
        let none: &[EndpointSlice] = &[];
        assert!(t.stale(&k, none), "our slice missing from the view");
        assert!(!t.stale(&k, &[slice("a", 2)]));
        t.expect_deletion(&k, &slice("a", 2));
        assert!(t.stale(&k, &[slice("a", 2)]), "deleted slice still shown");
        assert!(!t.stale(&k, none));
        assert!(t.handle_deletion(&k, &slice("a", 2)));
        t.update(&k, &slice("b", 1));
        assert!(
            !t.handle_deletion(&k, &slice("b", 1)),
            "unexpected deletion"
        );
    }

    #[test]
    fn config_validation() {
        assert!(EndpointSliceConfig::default().validate().is_ok());
        let bad = EndpointSliceConfig {
            max_endpoints_per_slice: 1001,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}

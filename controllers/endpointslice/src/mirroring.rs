//! The EndpointSlice mirroring controller's kube shell (`--controllers` name
//! `endpointslice-mirroring`): caches Endpoints, Services and the slices we mirrored, and keeps
//! the slices equal to `mirror_core::plan` for every selector-less Service's Endpoints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;

use scm_runtime::{
    Backoff, ControllerContext, ObjectKey, Requeue, WorkQueue, WorkerConfig, run_workers,
};

use crate::Error;
use crate::cache::{self, Change};
use crate::common::*;
use crate::controller::SliceTracker;
use crate::metrics::{ControllerLabel, SliceMetrics};
use crate::mirror_core;

/// Settings of the `endpointslice-mirroring` controller.
#[derive(Clone, Debug)]
pub struct MirroringConfig {
    /// `--mirroring-concurrent-service-endpoint-syncs` (default 5).
    pub concurrent_syncs: usize,
    /// `--mirroring-max-endpoints-per-subset` (default 1000, at most 1000).
    pub max_endpoints_per_subset: usize,
    /// `--mirroring-endpointslice-updates-batch-period` (default 0).
    pub batch_period: Duration,
    /// `--service-label-selector`: only Services matching it are served (None: all).
    pub service_label_selector: Option<String>,
}

impl Default for MirroringConfig {
    fn default() -> Self {
        MirroringConfig {
            concurrent_syncs: 5,
            max_endpoints_per_subset: mirror_core::DEFAULT_MAX_ENDPOINTS_PER_SUBSET,
            batch_period: Duration::ZERO,
            service_label_selector: None,
        }
    }
}

impl MirroringConfig {
    /// Checks ranges as kube-controller-manager does.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=1000).contains(&self.max_endpoints_per_subset) {
            return Err(Error::Config(format!(
                "--mirroring-max-endpoints-per-subset must be between 1 and 1000, got {}",
                self.max_endpoints_per_subset
            )));
        }
        if self.concurrent_syncs < 1 {
            return Err(Error::Config(
                "--mirroring-concurrent-service-endpoint-syncs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
struct State {
    endpoints: HashMap<ObjectKey, Arc<Endpoints>>,
    services: HashMap<ObjectKey, Arc<Service>>,
    slices: HashMap<ObjectKey, BTreeMap<String, Arc<EndpointSlice>>>,
    synced: HashSet<&'static str>,
}

struct Shared {
    ctx: ControllerContext,
    cfg: MirroringConfig,
    state: Mutex<State>,
    tracker: SliceTracker,
    queue: WorkQueue<ObjectKey>,
    metrics: SliceMetrics,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn enqueue(&self, k: ObjectKey) {
        if self.cfg.batch_period.is_zero() {
            self.queue.add(k);
        } else {
            self.queue.add_after(k, self.cfg.batch_period);
        }
    }
}

fn slice_key(s: &EndpointSlice) -> Option<ObjectKey> {
    let n = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(
        s.metadata.namespace.clone().unwrap_or_default(),
        n.clone(),
    ))
}

fn trim_endpoints(mut e: Endpoints) -> Endpoints {
    e.metadata.managed_fields = None;
    e
}

/// Runs the mirroring controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: MirroringConfig) -> Result<(), Error> {
    config.validate()?;
    let metrics = SliceMetrics::register(
        &ctx.metrics,
        "endpoint_slice_mirroring_controller",
        &ctx.name,
    );
    let shared = Arc::new(Shared {
        queue: WorkQueue::new(Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(1000),
        }),
        ctx: ctx.clone(),
        cfg: config.clone(),
        state: Mutex::new(State::default()),
        tracker: SliceTracker::default(),
        metrics,
    });
    let c = ctx.client.clone();
    let mut svc_cfg = watcher::Config::default();
    if let Some(sel) = &config.service_label_selector {
        svc_cfg = svc_cfg.labels(sel);
    }
    let s1 = shared.clone();
    let t1 = cache::watch(
        Api::<Endpoints>::all(c.clone()),
        watcher::Config::default(),
        ctx.shutdown.clone(),
        cache::trim_meta,
        move |ch| {
            let mut st = s1.state();
            let keys: Vec<ObjectKey> = match ch {
                Change::Apply(e) => {
                    let e = Arc::new(trim_endpoints(e));
                    let k = ObjectKey::of(e.as_ref());
                    if st
                        .endpoints
                        .insert(k.clone(), e.clone())
                        .is_some_and(|o| o == e)
                    {
                        vec![]
                    } else {
                        vec![k]
                    }
                }
                Change::Delete(e) => {
                    let k = ObjectKey::of(&e);
                    st.endpoints.remove(&k);
                    vec![k]
                }
                Change::Relisted(list) => {
                    let mut keys: Vec<ObjectKey> = st.endpoints.keys().cloned().collect();
                    st.endpoints = list
                        .into_iter()
                        .map(|e| (ObjectKey::of(&e), Arc::new(trim_endpoints(e))))
                        .collect();
                    keys.extend(st.endpoints.keys().cloned());
                    st.synced.insert("endpoints");
                    keys
                }
            };
            drop(st);
            keys.into_iter().for_each(|k| s1.enqueue(k));
        },
    );
    let s2 = shared.clone();
    let t2 = cache::watch(
        Api::<Service>::all(c.clone()),
        svc_cfg,
        ctx.shutdown.clone(),
        cache::trim_service,
        move |ch| {
            let mut st = s2.state();
            let keys: Vec<ObjectKey> = match ch {
                Change::Apply(s) => {
                    let s = Arc::new(cache::trim_service(s));
                    let k = ObjectKey::of(s.as_ref());
                    st.services.insert(k.clone(), s);
                    vec![k]
                }
                Change::Delete(s) => {
                    let k = ObjectKey::of(&s);
                    st.services.remove(&k);
                    vec![k]
                }
                Change::Relisted(list) => {
                    let mut keys: Vec<ObjectKey> = st.services.keys().cloned().collect();
                    st.services = list
                        .into_iter()
                        .map(|s| (ObjectKey::of(&s), Arc::new(cache::trim_service(s))))
                        .collect();
                    keys.extend(st.services.keys().cloned());
                    st.synced.insert("services");
                    keys
                }
            };
            drop(st);
            keys.into_iter().for_each(|k| s2.queue.add(k));
        },
    );
    let s3 = shared.clone();
    let t3 = cache::watch(
        Api::<EndpointSlice>::all(c.clone()),
        watcher::Config::default()
            .labels(&format!("{LABEL_MANAGED_BY}={MIRRORING_CONTROLLER_NAME}")),
        ctx.shutdown.clone(),
        cache::trim_meta,
        move |ch| {
            let mut st = s3.state();
            let keys: Vec<ObjectKey> = match ch {
                Change::Apply(sl) => {
                    let Some(k) = slice_key(&sl) else { return };
                    let news = s3.tracker.should_sync(&k, &sl);
                    st.slices
                        .entry(k.clone())
                        .or_default()
                        .insert(sl.metadata.name.clone().unwrap_or_default(), Arc::new(sl));
                    if news { vec![k] } else { vec![] }
                }
                Change::Delete(sl) => {
                    let Some(k) = slice_key(&sl) else { return };
                    if let Some(m) = st.slices.get_mut(&k) {
                        m.remove(sl.metadata.name.as_deref().unwrap_or(""));
                    }
                    if s3.tracker.handle_deletion(&k, &sl) {
                        vec![]
                    } else {
                        vec![k]
                    }
                }
                Change::Relisted(list) => {
                    let mut keys: Vec<ObjectKey> = st.slices.keys().cloned().collect();
                    st.slices.clear();
                    for sl in list {
                        if let Some(k) = slice_key(&sl) {
                            st.slices
                                .entry(k)
                                .or_default()
                                .insert(sl.metadata.name.clone().unwrap_or_default(), Arc::new(sl));
                        }
                    }
                    keys.extend(st.slices.keys().cloned());
                    st.synced.insert("slices");
                    keys
                }
            };
            drop(st);
            keys.into_iter().for_each(|k| s3.queue.add(k));
        },
    );
    let s4 = shared.clone();
    let workers = async move {
        if !scm_runtime::wait_for_sync(&s4.ctx, || s4.state().synced.len() == 3).await {
            return;
        }
        let s5 = s4.clone();
        run_workers(
            &s4.ctx,
            s4.queue.clone(),
            WorkerConfig {
                concurrency: s4.cfg.concurrent_syncs,
                ..Default::default()
            },
            move |k| {
                let s = s5.clone();
                async move { reconcile(s, k).await }
            },
        )
        .await;
    };
    tokio::join!(t1, t2, t3, workers);
    Ok(())
}

async fn reconcile(s: Arc<Shared>, key: ObjectKey) -> Result<Requeue, Error> {
    let (ep, svc, existing, svc_known) = {
        let st = s.state();
        let existing: Vec<EndpointSlice> = st
            .slices
            .get(&key)
            .map(|m| {
                m.values()
                    .filter(|s| s.metadata.deletion_timestamp.is_none())
                    .map(|s| s.as_ref().clone())
                    .collect()
            })
            .unwrap_or_default();
        (
            st.endpoints.get(&key).cloned(),
            st.services.get(&key).cloned(),
            existing,
            st.services.contains_key(&key),
        )
    };
    let mirror = match (&ep, &svc) {
        (Some(ep), Some(svc)) => {
            mirror_core::should_mirror(ep) && svc.spec.as_ref().is_none_or(|s| s.selector.is_none())
        }
        _ => false,
    };
    let api: Api<EndpointSlice> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
    if !mirror {
        if existing.is_empty() {
            s.tracker.delete_service(&key);
            return Ok(Requeue::Done);
        }
        if !svc_known && ep.is_some() {
            // Out of our scope rather than deleted? Leave the slices if the Service exists.
            let svcs: Api<Service> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
            if let Some(live) = svcs.get_opt(&key.name).await?
                && live.spec.as_ref().is_none_or(|s| s.selector.is_none())
            {
                return Ok(Requeue::Done);
            }
        }
        for sl in &existing {
            let name = sl.metadata.name.clone().unwrap_or_default();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            s.tracker.expect_deletion(&key, sl);
            s.metrics.change("delete");
        }
        s.tracker.delete_service(&key);
        return Ok(Requeue::Done);
    }
    let Some(ep) = ep else {
        return Ok(Requeue::Done);
    };
    if s.tracker.stale(&key, &existing) {
        s.metrics.sync("stale");
        return Err(Error::StaleCache(key.to_string()));
    }
    let plan = mirror_core::plan(
        &ep,
        &existing,
        s.cfg.max_endpoints_per_subset,
        MIRRORING_CONTROLLER_NAME,
    );
    let eref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Endpoints".into()),
        name: ep.metadata.name.clone(),
        namespace: ep.metadata.namespace.clone(),
        uid: ep.metadata.uid.clone(),
        ..Default::default()
    };
    if plan.invalid_addresses > 0 {
        s.ctx
            .events
            .warning(
                &eref,
                "InvalidIPAddress",
                "Mirror",
                format!(
                    "Skipped {} invalid IP addresses when mirroring to EndpointSlices",
                    plan.invalid_addresses
                ),
            )
            .await;
    }
    if plan.skipped_addresses > plan.invalid_addresses {
        s.ctx.events.warning(&eref, "TooManyAddressesToMirror", "Mirror",
            format!("A max of {} addresses can be mirrored to EndpointSlices per Endpoints subset. {} addresses were skipped",
                s.cfg.max_endpoints_per_subset, plan.skipped_addresses)).await;
    }
    if ep.metadata.deletion_timestamp.is_none() {
        for c in &plan.create {
            let created = api.create(&PostParams::default(), c).await?;
            s.tracker.update(&key, &created);
            s.metrics.change("create");
        }
    }
    for u in &plan.update {
        let name = u.metadata.name.clone().unwrap_or_default();
        let updated = api.replace(&name, &PostParams::default(), u).await?;
        s.tracker.update(&key, &updated);
        s.metrics.change("update");
    }
    for d in &plan.delete {
        let name = d.metadata.name.clone().unwrap_or_default();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        s.tracker.expect_deletion(&key, d);
        s.metrics.change("delete");
    }
    s.metrics
        .added
        .get_or_create(&vec![])
        .observe(plan.added as f64);
    s.metrics
        .removed
        .get_or_create(&vec![])
        .observe(plan.removed as f64);
    s.metrics
        .writes_per_reconcile
        .get_or_create(&ControllerLabel {
            controller: s.ctx.name.clone(),
        })
        .observe(plan.writes() as f64);
    s.metrics.sync("success");
    Ok(Requeue::Done)
}

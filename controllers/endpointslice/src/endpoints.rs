//! The legacy Endpoints controller's kube shell (`--controllers` name `endpoints`): keeps one
//! `Endpoints` object per selector Service equal to `endpoints_core::plan`, so that
//! `kubectl get endpoints` shows what users expect.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;

use scm_runtime::{
    Backoff, ControllerContext, ObjectKey, Requeue, WorkQueue, WorkerConfig, run_workers,
};

use crate::Error;
use crate::cache::{self, Change, PodServiceIndex};
use crate::common::PodRecord;
use crate::endpoints_core::{self, EndpointsPlan};

/// Settings of the `endpoints` controller.
#[derive(Clone, Debug)]
pub struct EndpointsConfig {
    /// `--concurrent-endpoint-syncs` (default 5).
    pub concurrent_syncs: usize,
    /// Batch period for pod changes (upstream: `--endpoint-updates-batch-period`, default 0).
    pub batch_period: Duration,
    /// `--service-label-selector`: only Services matching it are served (None: all).
    pub service_label_selector: Option<String>,
}

impl Default for EndpointsConfig {
    fn default() -> Self {
        EndpointsConfig {
            concurrent_syncs: 5,
            batch_period: Duration::ZERO,
            service_label_selector: None,
        }
    }
}

#[derive(Default)]
struct State {
    idx: PodServiceIndex,
    endpoints: HashMap<ObjectKey, Arc<Endpoints>>,
    synced: HashSet<&'static str>,
}

struct Shared {
    ctx: ControllerContext,
    cfg: EndpointsConfig,
    state: Mutex<State>,
    queue: WorkQueue<ObjectKey>,
    // resourceVersions we replaced: a cache still showing one of them is stale.
    stale_rvs: Mutex<HashMap<ObjectKey, String>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn trim_endpoints(mut e: Endpoints) -> Endpoints {
    e.metadata.managed_fields = None;
    e
}

/// Runs the legacy Endpoints controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: EndpointsConfig) -> Result<(), Error> {
    if config.concurrent_syncs < 1 {
        return Err(Error::Config(
            "--concurrent-endpoint-syncs must be at least 1".into(),
        ));
    }
    let shared = Arc::new(Shared {
        queue: WorkQueue::new(Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(1000),
        }),
        ctx: ctx.clone(),
        cfg: config.clone(),
        state: Mutex::new(State::default()),
        stale_rvs: Mutex::new(HashMap::new()),
    });
    let c = ctx.client.clone();
    let mut svc_cfg = watcher::Config::default();
    if let Some(sel) = &config.service_label_selector {
        svc_cfg = svc_cfg.labels(sel);
    }
    let s1 = shared.clone();
    let t1 = cache::watch(
        Api::<Service>::all(c.clone()),
        svc_cfg,
        ctx.shutdown.clone(),
        cache::trim_service,
        move |ch| {
            let mut st = s1.state();
            let keys: Vec<ObjectKey> = match ch {
                Change::Apply(s) => {
                    let s = Arc::new(cache::trim_service(s));
                    let k = ObjectKey::of(s.as_ref());
                    st.idx.put_service(s);
                    vec![k]
                }
                Change::Delete(s) => {
                    let k = ObjectKey::of(&s);
                    st.idx.remove_service(&k);
                    vec![k]
                }
                Change::Relisted(list) => {
                    let old: Vec<ObjectKey> = st.idx.services.keys().cloned().collect();
                    for k in &old {
                        st.idx.remove_service(k);
                    }
                    let mut keys = old;
                    for s in list {
                        let s = Arc::new(cache::trim_service(s));
                        keys.push(ObjectKey::of(s.as_ref()));
                        st.idx.put_service(s);
                    }
                    st.synced.insert("services");
                    keys
                }
            };
            drop(st);
            keys.into_iter().for_each(|k| s1.queue.add(k));
        },
    );
    let s2 = shared.clone();
    let t2 = cache::watch(
        Api::<Pod>::all(c.clone()),
        watcher::Config::default(),
        ctx.shutdown.clone(),
        PodRecord::from_pod,
        move |ch| {
            let mut st = s2.state();
            let keys = match ch {
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
                    let old: Vec<ObjectKey> = st.idx.pods.keys().cloned().collect();
                    for k in &old {
                        st.idx.remove_pod(k);
                    }
                    for p in list {
                        st.idx.put_pod(p);
                    }
                    st.synced.insert("pods");
                    st.idx.services.keys().cloned().collect()
                }
            };
            drop(st);
            for k in keys {
                if s2.cfg.batch_period.is_zero() {
                    s2.queue.add(k);
                } else {
                    s2.queue.add_after(k, s2.cfg.batch_period);
                }
            }
        },
    );
    let s3 = shared.clone();
    let t3 = cache::watch(
        Api::<Endpoints>::all(c.clone()),
        watcher::Config::default(),
        ctx.shutdown.clone(),
        cache::trim_meta,
        move |ch| {
            let mut st = s3.state();
            match ch {
                Change::Apply(e) => {
                    let e = Arc::new(trim_endpoints(e));
                    let k = ObjectKey::of(e.as_ref());
                    let changed = st.endpoints.insert(k.clone(), e.clone()).is_none_or(|o| {
                        o.subsets != e.subsets || o.metadata.labels != e.metadata.labels
                    });
                    let ours = st.idx.services.contains_key(&k);
                    drop(st);
                    if changed && ours {
                        s3.queue.add(k);
                    }
                }
                Change::Delete(e) => {
                    let k = ObjectKey::of(&e);
                    st.endpoints.remove(&k);
                    let ours = st.idx.services.contains_key(&k);
                    drop(st);
                    if ours {
                        s3.queue.add(k);
                    }
                }
                Change::Relisted(list) => {
                    st.endpoints = list
                        .into_iter()
                        .map(|e| (ObjectKey::of(&e), Arc::new(trim_endpoints(e))))
                        .collect();
                    st.synced.insert("endpoints");
                    // As upstream's checkLeftoverEndpoints: every Endpoints object (except
                    // leader-election records) gets a look, so those of deleted Services go.
                    let keys: Vec<ObjectKey> = st
                        .endpoints
                        .iter()
                        .filter(|(_, e)| {
                            !e.metadata.annotations.as_ref().is_some_and(|a| {
                                a.contains_key(crate::mirror_core::LEADER_ANNOTATION)
                            })
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    drop(st);
                    keys.into_iter().for_each(|k| s3.queue.add(k));
                }
            }
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
    let (svc, pods, current) = {
        let st = s.state();
        let svc = st.idx.services.get(&key).cloned();
        let pods = svc
            .as_ref()
            .and_then(|svc| svc.spec.as_ref().and_then(|sp| sp.selector.clone()))
            .map(|sel| st.idx.pods_for(&key.namespace, &sel))
            .unwrap_or_default();
        (svc, pods, st.endpoints.get(&key).cloned())
    };
    let api: Api<Endpoints> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
    let Some(svc) = svc else {
        // As upstream: the Service is gone, so is its Endpoints object. A Service merely out
        // of our scope keeps it.
        let svcs: Api<Service> = Api::namespaced(s.ctx.client.clone(), &key.namespace);
        if current.is_some() && svcs.get_opt(&key.name).await?.is_none() {
            match api.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Requeue::Done);
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") || spec.selector.is_none() {
        return Ok(Requeue::Done);
    }
    if let (Some(cur), Some(stale)) = (
        &current,
        s.stale_rvs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key),
    ) && cur.metadata.resource_version.as_ref() == Some(stale)
    {
        return Err(Error::StaleCache(key.to_string()));
    }
    let pod_refs: Vec<&PodRecord> = pods.iter().map(|p| p.as_ref()).collect();
    match endpoints_core::plan(&svc, &pod_refs, current.as_deref()) {
        EndpointsPlan::Unchanged => {}
        EndpointsPlan::Create(e) => match api.create(&PostParams::default(), &e).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae))
                if ae.code == 403 && ae.message.contains("being terminated") => {}
            Err(e) => return Err(e.into()),
        },
        EndpointsPlan::Update(e) => {
            let old_rv = e.metadata.resource_version.clone();
            let updated = api.replace(&key.name, &PostParams::default(), &e).await?;
            if let Some(rv) = old_rv
                && updated.metadata.resource_version.as_ref() != Some(&rv)
            {
                s.stale_rvs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), rv);
            }
        }
    }
    Ok(Requeue::Done)
}

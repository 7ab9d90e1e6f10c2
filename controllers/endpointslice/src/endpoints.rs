//! The legacy Endpoints controller's kube shell (`--controllers` name `endpoints`): keeps one
//! `Endpoints` object per selector Service equal to `endpoints_core::plan`, so that
//! `kubectl get endpoints` shows what users expect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Service};
use kube::api::{Api, DeleteParams, PostParams};
use tracing::warn;

use scm_runtime::informer::Change;
use scm_runtime::{ControllerContext, ObjectKey, Requeue};

use crate::Error;
use crate::cache::PodServiceIndex;
use crate::common::PodRecord;
use crate::endpoints_core::{self, EndpointsPlan};
use crate::shell::{self, ShellBase, ShellConfig};
use crate::slices::trigger_time::{self, TriggerTimes};

/// Settings of the `endpoints` controller: `--concurrent-endpoint-syncs`, the batch period
/// for pod changes (upstream: `--endpoint-updates-batch-period`) and `--service-label-selector`.
pub type EndpointsConfig = ShellConfig;

#[derive(Default)]
struct State {
    idx: PodServiceIndex,
    endpoints: HashMap<ObjectKey, Arc<Endpoints>>,
    trigger_times: TriggerTimes,
}

struct Shared {
    base: ShellBase,
    state: Mutex<State>,
    // resourceVersions we replaced: a cache still showing one of them is stale.
    stale_rvs: Mutex<HashMap<ObjectKey, String>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the legacy Endpoints controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: EndpointsConfig) -> Result<(), Error> {
    shell::check_workers("concurrent-endpoint-syncs", config.concurrent_syncs)?;
    let base = ShellBase::new(ctx.clone(), &config, 3)?;
    let shared = Arc::new(Shared {
        base,
        state: Mutex::new(State::default()),
        stale_rvs: Mutex::new(HashMap::new()),
    });
    let inf = &ctx.informers;
    let s = shared.clone();
    inf.services().subscribe(move |ch| {
        let keys = s.base.fold_services(&mut s.state().idx, ch);
        s.base.add_all(keys);
    });
    let s = shared.clone();
    shell::pods(inf).subscribe(move |ch| {
        let keys = s.base.fold_pods(&mut s.state().idx, ch);
        s.base.add_all_batched_with(keys);
    });
    let s = shared.clone();
    inf.endpoints().subscribe(move |ch| on_endpoints(&s, ch));
    shared.base.serve(shared.clone(), reconcile).await;
    Ok(())
}

fn on_endpoints(s: &Shared, ch: &Change<Endpoints>) {
    let mut st = s.state();
    let keys: Vec<ObjectKey> = match ch {
        Change::Apply(e) => {
            let k = ObjectKey::of(e.as_ref());
            let changed = st
                .endpoints
                .insert(k.clone(), e.clone())
                .is_none_or(|o| o.subsets != e.subsets || o.metadata.labels != e.metadata.labels);
            let ours = st.idx.services.contains_key(&k);
            if changed && ours { vec![k] } else { vec![] }
        }
        Change::Delete(e) => {
            let k = ObjectKey::of(e.as_ref());
            st.endpoints.remove(&k);
            let ours = st.idx.services.contains_key(&k);
            if ours { vec![k] } else { vec![] }
        }
        Change::Relisted(list) => {
            st.endpoints = list
                .iter()
                .map(|e| (ObjectKey::of(e.as_ref()), e.clone()))
                .collect();
            // As upstream's checkLeftoverEndpoints: every Endpoints object (except
            // leader-election records) gets a look, so those of deleted Services go.
            st.endpoints
                .iter()
                .filter(|(_, e)| {
                    !e.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(crate::mirror_core::LEADER_ANNOTATION))
                })
                .map(|(k, _)| k.clone())
                .collect()
        }
    };
    drop(st);
    s.base.synced_on_relist("endpoints", ch);
    s.base.add_all(keys);
}

/// Whether the cached Endpoints is still the version our last update replaced (our write has
/// not come back yet). Once the cache has moved past it, the entry is dropped, so the map holds
/// only writes still in flight.
fn stale_cache(
    rvs: &Mutex<HashMap<ObjectKey, String>>,
    key: &ObjectKey,
    current: Option<&Endpoints>,
) -> bool {
    let mut rvs = rvs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(stale) = rvs.get(key) else {
        return false;
    };
    if current.is_some_and(|c| c.metadata.resource_version.as_ref() == Some(stale)) {
        return true;
    }
    rvs.remove(key);
    false
}

async fn reconcile(s: Arc<Shared>, key: ObjectKey) -> Result<Requeue, Error> {
    let (svc, pods, current, seen) = {
        let st = s.state();
        let svc = st.idx.services.get(&key).cloned();
        let pods = svc
            .as_ref()
            .and_then(|svc| svc.spec.as_ref().and_then(|sp| sp.selector.clone()))
            .map(|sel| st.idx.pods_for(&key.namespace, &sel))
            .unwrap_or_default();
        let seen = st.trigger_times.seen(&key);
        (svc, pods, st.endpoints.get(&key).cloned(), seen)
    };
    let api: Api<Endpoints> = Api::namespaced(s.base.ctx.client.clone(), &key.namespace);
    let Some(svc) = svc else {
        s.stale_rvs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        s.state().trigger_times.forget(&key);
        // As upstream: the Service is gone, so is its Endpoints object. A Service merely out
        // of our scope keeps it.
        let svcs: Api<Service> = Api::namespaced(s.base.ctx.client.clone(), &key.namespace);
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
    if stale_cache(&s.stale_rvs, &key, current.as_deref()) {
        return Err(Error::StaleCache(key.to_string()));
    }
    let pod_refs: Vec<&PodRecord> = pods.iter().map(|p| p.as_ref()).collect();
    // Computed even when nothing is written, so the tracker follows every change; recorded
    // only once the write (if any) went through, so a retry carries the same trigger time.
    let (trigger, seen) = trigger_time::trigger_time(seen.as_deref(), &svc, &pod_refs);
    match endpoints_core::plan(&svc, &pod_refs, current.as_deref(), trigger) {
        EndpointsPlan::Unchanged => {}
        EndpointsPlan::Create(e) => match api.create(&PostParams::default(), &e).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae))
                if ae.code == 403 && ae.message.contains("being terminated") => {}
            Err(err) => {
                let note = format!(
                    "Failed to create endpoint for service {}/{}: {}",
                    key.namespace,
                    key.name,
                    reason(&err)
                );
                failed(&s, &e, "FailedToCreateEndpoint", note).await;
                return Err(err.into());
            }
        },
        EndpointsPlan::Update(e) => {
            let old_rv = e.metadata.resource_version.clone();
            let updated = match api.replace(&key.name, &PostParams::default(), &e).await {
                Ok(u) => u,
                Err(err) => {
                    let note = format!(
                        "Failed to update endpoint {}/{}: {}",
                        key.namespace,
                        key.name,
                        reason(&err)
                    );
                    failed(&s, &e, "FailedToUpdateEndpoint", note).await;
                    return Err(err.into());
                }
            };
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
    s.state().trigger_times.record(&key, seen);
    Ok(Requeue::Done)
}

/// What failed, as client-go's error reads: the API server's message, else the error.
fn reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(ae) => ae.message.clone(),
        e => e.to_string(),
    }
}

/// Upstream's Warning Event on the Endpoints object a write failed for (logged too, with its
/// key); the error itself goes back to the queue for a retry.
async fn failed(s: &Shared, e: &Endpoints, reason: &str, note: String) {
    let key = ObjectKey::of(e);
    warn!(endpoints = %key, reason, "{note}");
    let obj = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Endpoints".into()),
        name: e.metadata.name.clone(),
        namespace: e.metadata.namespace.clone(),
        uid: e.metadata.uid.clone(),
        ..Default::default()
    };
    s.base
        .ctx
        .events
        .warning(&obj, reason, "UpdateEndpoints", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn at(rv: &str) -> Endpoints {
        Endpoints {
            metadata: ObjectMeta {
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_stale_version_is_forgotten_once_the_cache_moves_past_it() {
        // Entries were never removed: one per Service ever updated, deleted ones included.
        let rvs = Mutex::new(HashMap::new());
        let k = ObjectKey::new("n", "a");
        rvs.lock().expect("lock").insert(k.clone(), "5".to_string());
        assert!(stale_cache(&rvs, &k, Some(&at("5"))));
        assert!(!stale_cache(&rvs, &k, Some(&at("6"))));
        assert!(rvs.lock().expect("lock").is_empty());
        assert!(
            !stale_cache(&rvs, &k, Some(&at("5"))),
            "nothing left to wait for"
        );
    }
}

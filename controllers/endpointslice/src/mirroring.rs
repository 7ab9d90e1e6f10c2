//! The EndpointSlice mirroring controller's kube shell (`--controllers` name
//! `endpointslice-mirroring`): indexes Endpoints, Services and the slices we mirrored (from the
//! process's shared informers), and keeps
//! the slices equal to `mirror_core::plan` for every selector-less Service's Endpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;

use scm_runtime::informer::Change;
use scm_runtime::{ControllerContext, ObjectKey, Requeue};

use crate::Error;
use crate::common::*;
use crate::metrics::{ControllerLabel, SliceMetrics};
use crate::mirror_core;
use crate::shell::{ShellBase, apply_service_change};
use crate::slice_store::Slices;
use crate::writer::SliceWrites;

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
}

struct Shared {
    base: ShellBase,
    cfg: MirroringConfig,
    state: Mutex<State>,
    slices: Slices,
    metrics: SliceMetrics,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the mirroring controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: MirroringConfig) -> Result<(), Error> {
    config.validate()?;
    let base = ShellBase::new(
        ctx.clone(),
        config.service_label_selector.as_deref(),
        config.batch_period,
        3,
    )?;
    let metrics = SliceMetrics::register(
        &ctx.metrics,
        "endpoint_slice_mirroring_controller",
        &ctx.name,
    );
    let shared = Arc::new(Shared {
        base,
        cfg: config.clone(),
        state: Mutex::new(State::default()),
        slices: Slices::new(vec![MIRRORING_CONTROLLER_NAME]),
        metrics,
    });
    let inf = &ctx.informers;
    let s = shared.clone();
    inf.endpoints().subscribe(move |ch| {
        let mut st = s.state();
        let keys: Vec<ObjectKey> = match ch {
            Change::Apply(e) => {
                let k = ObjectKey::of(e.as_ref());
                if st
                    .endpoints
                    .insert(k.clone(), e.clone())
                    .is_some_and(|o| o == *e)
                {
                    vec![]
                } else {
                    vec![k]
                }
            }
            Change::Delete(e) => {
                let k = ObjectKey::of(e.as_ref());
                st.endpoints.remove(&k);
                vec![k]
            }
            Change::Relisted(list) => {
                let mut keys: Vec<ObjectKey> = st.endpoints.keys().cloned().collect();
                st.endpoints = list
                    .iter()
                    .map(|e| (ObjectKey::of(e.as_ref()), e.clone()))
                    .collect();
                keys.extend(st.endpoints.keys().cloned());
                s.base.mark_synced("endpoints");
                keys
            }
        };
        drop(st);
        keys.into_iter().for_each(|k| s.base.add_batched(k));
    });
    let s = shared.clone();
    inf.services().subscribe(move |ch| {
        let keys = apply_service_change(&s.base.services, &mut s.state().services, ch);
        if matches!(ch, Change::Relisted(_)) {
            s.base.mark_synced("services");
        }
        keys.into_iter().for_each(|k| s.base.add(k));
    });
    let s = shared.clone();
    inf.endpoint_slices().subscribe(move |ch| {
        let keys = s.slices.apply_change(ch);
        if matches!(ch, Change::Relisted(_)) {
            s.base.mark_synced("slices");
        }
        keys.into_iter().for_each(|k| s.base.add(k));
    });
    let s = shared.clone();
    shared
        .base
        .work(config.concurrent_syncs, move |k| {
            let s = s.clone();
            async move { reconcile(s, k).await }
        })
        .await;
    Ok(())
}

async fn reconcile(s: Arc<Shared>, key: ObjectKey) -> Result<Requeue, Error> {
    let (ep, svc, existing, svc_known) = {
        let st = s.state();
        let existing: Vec<EndpointSlice> = s
            .slices
            .current(&key)
            .iter()
            .map(|s| s.as_ref().clone())
            .collect();
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
    if !mirror {
        if existing.is_empty() {
            s.slices.tracker.delete_service(&key);
            return Ok(Requeue::Done);
        }
        if !svc_known && ep.is_some() {
            // Out of our scope rather than deleted? Leave the slices if the Service exists.
            let svcs: Api<Service> = Api::namespaced(s.base.ctx.client.clone(), &key.namespace);
            if let Some(live) = svcs.get_opt(&key.name).await?
                && live.spec.as_ref().is_none_or(|s| s.selector.is_none())
            {
                return Ok(Requeue::Done);
            }
        }
        let w = SliceWrites {
            delete: &existing,
            ..Default::default()
        };
        s.slices
            .write(&s.base.ctx.client, &key, w, false, &s.metrics)
            .await?;
        s.slices.tracker.delete_service(&key);
        return Ok(Requeue::Done);
    }
    let Some(ep) = ep else {
        return Ok(Requeue::Done);
    };
    if s.slices.tracker.stale(&key, &existing) {
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
        s.base
            .ctx
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
        s.base.ctx.events.warning(&eref, "TooManyAddressesToMirror", "Mirror",
            format!("A max of {} addresses can be mirrored to EndpointSlices per Endpoints subset. {} addresses were skipped",
                s.cfg.max_endpoints_per_subset, plan.skipped_addresses)).await;
    }
    let w = SliceWrites {
        create: &plan.create,
        update: &plan.update,
        delete: &plan.delete,
    };
    let creates = ep.metadata.deletion_timestamp.is_none();
    s.slices
        .write(&s.base.ctx.client, &key, w, creates, &s.metrics)
        .await?;
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
            controller: s.base.ctx.name.clone(),
        })
        .observe(plan.writes() as f64);
    s.metrics.sync("success");
    Ok(Requeue::Done)
}

//! The EndpointSlice mirroring controller's kube shell (`--controllers` name
//! `endpointslice-mirroring`): indexes Endpoints, Services and the slices we mirrored (from the
//! process's shared informers), and keeps
//! the slices equal to `mirror_core::plan` for every selector-less Service's Endpoints.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;

use scm_runtime::informer::Change;
use scm_runtime::{ControllerContext, ObjectKey, Requeue};

use crate::Error;
use crate::common::*;
use crate::metrics::ControllerLabel;
use crate::mirror_core;
use crate::shell::{self, ShellConfig, SliceShell};
use crate::writer::SliceWrites;

/// Settings of the `endpointslice-mirroring` controller.
#[derive(Clone, Debug)]
pub struct MirroringConfig {
    /// `--mirroring-max-endpoints-per-subset` (default 1000, at most 1000).
    pub max_endpoints_per_subset: usize,
    /// `--mirroring-concurrent-service-endpoint-syncs`,
    /// `--mirroring-endpointslice-updates-batch-period` and `--service-label-selector`.
    pub shell: ShellConfig,
}

impl Default for MirroringConfig {
    fn default() -> Self {
        MirroringConfig {
            max_endpoints_per_subset: mirror_core::DEFAULT_MAX_ENDPOINTS_PER_SUBSET,
            shell: ShellConfig::default(),
        }
    }
}

impl MirroringConfig {
    /// Checks ranges as kube-controller-manager does.
    pub fn validate(&self) -> Result<(), Error> {
        shell::check_range(
            "mirroring-max-endpoints-per-subset",
            self.max_endpoints_per_subset,
            1,
            1000,
        )?;
        shell::check_workers(
            "mirroring-concurrent-service-endpoint-syncs",
            self.shell.concurrent_syncs,
        )
    }
}

#[derive(Default)]
struct State {
    endpoints: HashMap<ObjectKey, Arc<Endpoints>>,
    services: HashMap<ObjectKey, Arc<Service>>,
}

type Shared = SliceShell<MirroringConfig, State>;

/// Runs the mirroring controller until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: MirroringConfig) -> Result<(), Error> {
    config.validate()?;
    let shared: Arc<Shared> = SliceShell::new(
        &ctx,
        &config.shell,
        3,
        config.clone(),
        vec![MIRRORING_CONTROLLER_NAME],
        "endpoint_slice_mirroring_controller",
    )?;
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
                keys
            }
        };
        drop(st);
        s.base.synced_on_relist("endpoints", ch);
        s.base.add_all_batched(keys);
    });
    let s = shared.clone();
    inf.services().subscribe(move |ch| {
        let keys = s.base.fold_services(&mut s.state().services, ch);
        s.base.add_all(keys);
    });
    let s = shared.clone();
    crate::slice_record::endpoint_slices(inf)
        .subscribe(move |ch| s.base.add_all(s.base.fold_slices(&s.slices, ch)));
    shared.base.serve(shared.clone(), reconcile).await;
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
    let before: Vec<&EndpointSlice> = existing.iter().collect();
    let w = SliceWrites {
        create: &plan.create,
        update: &plan.update,
        delete: &plan.delete,
        before: Some(&before),
        ..Default::default()
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

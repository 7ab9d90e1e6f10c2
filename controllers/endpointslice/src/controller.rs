//! The EndpointSlice controller's kube shell: its indexes of Services, Pods, Nodes and our
//! EndpointSlices, fed by the process's shared informers on every replica, Service keys in a
//! work queue, and a reconcile (`sync`) that feeds the pure core (`slices::plan`) and applies
//! its plan while this process leads.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};

use scm_runtime::ObjectKey;
use scm_runtime::informer::Change;

use crate::Error;
use crate::cache::PodServiceIndex;
use crate::common::*;
use crate::metrics::SliceMetrics;
use crate::shell::{self, ShellBase, apply_service_change};
use crate::slice_store::Slices;
use crate::slices;
use crate::topology::{self, NodeTopology, ZoneRatios};

mod sync;

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

#[derive(Default)]
struct State {
    idx: PodServiceIndex,
    nodes: HashMap<String, NodeTopology>,
    zone_ratios: ZoneRatios,
    hints_populated: HashSet<ObjectKey>,
}

struct Shared {
    base: ShellBase,
    cfg: EndpointSliceConfig,
    state: Mutex<State>,
    slices: Slices,
    metrics: SliceMetrics,
}

impl Shared {
    // Lock order: `state`, then the slice cache; never the other way round.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
pub async fn run(
    ctx: scm_runtime::ControllerContext,
    config: EndpointSliceConfig,
) -> Result<(), Error> {
    config.validate()?;
    let base = ShellBase::new(
        ctx.clone(),
        config.service_label_selector.as_deref(),
        config.batch_period,
        4,
    )?;
    let metrics = SliceMetrics::register(&ctx.metrics, "endpoint_slice_controller", &ctx.name);
    let mut managers = vec![CONTROLLER_NAME];
    if config.takeover {
        managers.push(UPSTREAM_CONTROLLER_NAME);
    }
    let shared = Arc::new(Shared {
        base,
        cfg: config.clone(),
        state: Mutex::new(State::default()),
        slices: Slices::new(managers),
        metrics,
    });
    let inf = &ctx.informers;
    let s = shared.clone();
    inf.services().subscribe(move |c| on_service(&s, c));
    let s = shared.clone();
    shell::pods(inf).subscribe(move |c| {
        let keys = s.state().idx.apply_pod_change(c);
        if matches!(c, Change::Relisted(_)) {
            s.base.mark_synced("pods");
        }
        keys.into_iter().for_each(|k| s.base.add_batched(k));
    });
    let s = shared.clone();
    inf.nodes().subscribe(move |c| on_node(&s, c));
    let s = shared.clone();
    inf.endpoint_slices().subscribe(move |c| {
        let keys = s.slices.apply_change(c);
        if matches!(c, Change::Relisted(_)) {
            s.base.mark_synced("slices");
        }
        keys.into_iter().for_each(|k| s.base.add(k));
    });
    let s = shared.clone();
    shared
        .base
        .work(config.concurrent_syncs, move |key| {
            let s = s.clone();
            async move { sync::reconcile(s, key).await }
        })
        .await;
    Ok(())
}

fn on_service(s: &Shared, c: &Change<Service>) {
    let mut st = s.state();
    let mut keys = apply_service_change(&s.base.services, &mut st.idx, c);
    if matches!(c, Change::Relisted(_)) {
        // Slices whose Service we have never seen get a look too (deleted while down).
        keys.extend(s.slices.cache().services().cloned());
        s.base.mark_synced("services");
    }
    drop(st);
    keys.into_iter().for_each(|k| s.base.add(k));
}

fn on_node(s: &Shared, c: &Change<Node>) {
    let mut st = s.state();
    match c {
        Change::Apply(n) => {
            let name = n.metadata.name.clone().unwrap_or_default();
            st.nodes.insert(name, node_topology(n));
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
            s.base.mark_synced("nodes");
        }
    }
    let ratios = ZoneRatios::from_nodes(st.nodes.values());
    if ratios != st.zone_ratios {
        st.zone_ratios = ratios;
        // Upstream requeues overloaded Services; we requeue every Service using Auto hints,
        // a superset that costs no writes when nothing changes.
        let keys: Vec<ObjectKey> = st.hints_populated.iter().cloned().collect();
        drop(st);
        keys.into_iter().for_each(|k| s.base.add(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

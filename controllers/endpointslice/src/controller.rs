//! The EndpointSlice controller's kube shell: its indexes of Services, Pods, Nodes and our
//! EndpointSlices, fed by the process's shared informers on every replica, Service keys in a
//! work queue, and a reconcile (`sync`) that feeds the pure core (`slices::plan`) and applies
//! its plan while this process leads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};

use scm_runtime::informer::Change;
use scm_runtime::{ObjectKey, Priority};

use crate::Error;
use crate::cache::PodServiceIndex;
use crate::common::*;
use crate::shell::{self, ShellConfig, SliceShell};
use crate::slices;
use crate::slices::trigger_time::TriggerTimes;
use crate::topology::{self, NodeTopology, ZoneRatios};

mod sync;

/// Settings of the `endpointslice` controller (flags of the binary).
#[derive(Clone, Debug)]
pub struct EndpointSliceConfig {
    /// `--max-endpoints-per-slice` (default 100, at most 1000).
    pub max_endpoints_per_slice: usize,
    /// `--endpointslice-takeover`: adopt slices managed by kube-controller-manager.
    pub takeover: bool,
    /// `--concurrent-service-endpoint-syncs`, `--endpointslice-updates-batch-period` and
    /// `--service-label-selector`.
    pub shell: ShellConfig,
}

impl Default for EndpointSliceConfig {
    fn default() -> Self {
        EndpointSliceConfig {
            max_endpoints_per_slice: slices::DEFAULT_MAX_ENDPOINTS_PER_SLICE,
            takeover: false,
            shell: ShellConfig::default(),
        }
    }
}

impl EndpointSliceConfig {
    /// Checks ranges the way kube-controller-manager validates its flags.
    pub fn validate(&self) -> Result<(), Error> {
        shell::check_range(
            "max-endpoints-per-slice",
            self.max_endpoints_per_slice,
            1,
            slices::MAX_MAX_ENDPOINTS_PER_SLICE,
        )?;
        shell::check_workers(
            "concurrent-service-endpoint-syncs",
            self.shell.concurrent_syncs,
        )
    }
}

#[derive(Default)]
struct State {
    idx: PodServiceIndex,
    nodes: HashMap<String, NodeTopology>,
    zone_ratios: ZoneRatios,
    hints_populated: HashSet<ObjectKey>,
    trigger_times: TriggerTimes,
    /// Writes `EndpointsReady` off the reconcile's path (started by the first sync).
    conditions: std::sync::OnceLock<scm_runtime::conditions::Writer>,
}

type Shared = SliceShell<EndpointSliceConfig, State>;

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
    let mut managers = vec![CONTROLLER_NAME];
    if config.takeover {
        managers.push(UPSTREAM_CONTROLLER_NAME);
    }
    let shared: Arc<Shared> = SliceShell::new(
        &ctx,
        &config.shell,
        4,
        config.clone(),
        managers,
        "endpoint_slice_controller",
    )?;
    let inf = &ctx.informers;
    let s = shared.clone();
    inf.services().subscribe(move |c| on_service(&s, c));
    let s = shared.clone();
    shell::pods(inf).subscribe(move |c| {
        let keys = s.base.fold_pods(&mut s.state().idx, c);
        s.base.add_all_batched_with(first_slices_first(&s, keys));
    });
    let s = shared.clone();
    inf.nodes().subscribe(move |c| on_node(&s, c));
    let s = shared.clone();
    crate::slice_record::endpoint_slices(inf)
        .subscribe(move |c| s.base.add_all(s.base.fold_slices(&s.slices, c)));
    shared.base.serve(shared.clone(), sync::reconcile).await;
    Ok(())
}

fn on_service(s: &Shared, c: &Change<Service>) {
    let mut st = s.state();
    let mut keys = s.base.fold_services(&mut st.idx, c);
    if matches!(c, Change::Relisted(_)) {
        // Slices whose Service we have never seen get a look too (deleted while down).
        keys.extend(s.slices.cache().services().cloned());
    }
    drop(st);
    let keys = keys.into_iter().map(|k| (k, Priority::Ordinary)).collect();
    s.base.add_all_with(first_slices_first(s, keys));
}

/// Makes a Service with no slices of ours yet urgent: until its first slice it has no endpoints
/// at all, which matters more than a resync of a Service that has them.
fn first_slices_first(s: &Shared, keys: Vec<(ObjectKey, Priority)>) -> Vec<(ObjectKey, Priority)> {
    let cache = s.slices.cache();
    keys.into_iter()
        .map(|(k, p)| {
            let p = if cache.of(&k).next().is_none() {
                Priority::Urgent
            } else {
                p
            };
            (k, p)
        })
        .collect()
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

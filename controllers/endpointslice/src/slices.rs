//! The EndpointSlice reconciler's pure core: from a Service, its selected pods, the nodes'
//! zones and the slices we already manage for it, compute the minimal plan of creates,
//! updates and deletes that upstream's reconciler (k8s.io/endpointslice) would make.
//!
//! Where upstream iterates Go maps (random order) we iterate sorted maps, so a plan is
//! deterministic; the resulting set of endpoints per slice layout is the same kind upstream
//! produces (same packing rules), though which endpoint lands in which slice may differ.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::common::*;
use crate::topology::{self, PlannedEvent, SliceSets, ZoneRatios};

/// Default `--max-endpoints-per-slice`.
pub const DEFAULT_MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// Upper bound of `--max-endpoints-per-slice` (the API's limit on endpoints per slice).
pub const MAX_MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// What a node lookup gives: `None` if the node is unknown, else its zone label (if any).
pub type NodeZone = Option<Option<String>>;

/// Everything one reconcile of one Service reads.
pub struct SliceInput<'a, P = Pod> {
    /// The Service (must have a selector and not be ExternalName).
    pub service: &'a Service,
    /// Pods matching its selector, in its namespace.
    pub pods: Vec<&'a P>,
    /// Node lookup by name.
    pub node_zone: &'a dyn Fn(&str) -> NodeZone,
    /// Slices currently managed for this Service (ours, plus adopted ones under takeover),
    /// without those already being deleted.
    pub existing: Vec<&'a EndpointSlice>,
    /// Max endpoints per slice.
    pub max_endpoints_per_slice: usize,
    /// Our managed-by value.
    pub controller_name: &'a str,
    /// Per-zone CPU shares (for `topology-mode: Auto`).
    pub zone_ratios: &'a ZoneRatios,
    /// Whether Auto hints are currently recorded as populated for this Service.
    pub hints_populated: bool,
    /// This sync's trigger time ([`trigger_time::trigger_time`]), in seconds since the Unix
    /// epoch: every slice created or updated carries it, or loses the annotation when None.
    pub trigger_time: Option<i64>,
}

/// The writes one reconcile wants, plus what it learned.
#[derive(Debug, Default)]
pub struct SlicePlan {
    /// Slices to create (generateName set, no name).
    pub create: Vec<EndpointSlice>,
    /// Slices to replace (carry the resourceVersion they were read at).
    pub update: Vec<EndpointSlice>,
    /// Slices to delete.
    pub delete: Vec<EndpointSlice>,
    /// Endpoints added this sync.
    pub added: usize,
    /// Endpoints removed this sync.
    pub removed: usize,
    /// Pods skipped because their node is unknown (upstream retries the Service later).
    pub missing_nodes: Vec<String>,
    /// Events for the Service.
    pub events: Vec<PlannedEvent>,
    /// Whether Auto hints are populated after this sync.
    pub hints_populated: bool,
    /// Desired endpoints (for `endpoints_desired`).
    pub desired_endpoints: usize,
    /// Slices that will exist after the plan (for `num_endpoint_slices`).
    pub num_slices: usize,
    /// Slices needed with perfect packing (for `desired_endpoint_slices`).
    pub desired_slices: usize,
    /// The Service's `EndpointsReady` condition after this sync ([`condition`]).
    pub condition: Option<scm_runtime::conditions::Desired>,
}

impl SlicePlan {
    /// Number of API writes this plan makes.
    pub fn writes(&self) -> usize {
        self.create.len() + self.update.len() + self.delete.len()
    }
}

/// The address types a Service's slices use (upstream's `getAddressTypesForService`).
pub fn address_types_for_service(svc: &Service) -> BTreeSet<AddressType> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut out: BTreeSet<AddressType> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(AddressType::IPv4),
            "IPv6" => Some(AddressType::IPv6),
            _ => None,
        })
        .collect();
    if !out.is_empty() {
        return out;
    }
    let cip = spec.cluster_ip.unwrap_or_default();
    if !cip.is_empty() && cip != "None" {
        let v6 = parse_ip_sloppy(&cip).is_some_and(|ip| ip.is_ipv6());
        out.insert(if v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        });
        return out;
    }
    out.insert(AddressType::IPv4);
    out.insert(AddressType::IPv6);
    out
}

fn svc_name(svc: &Service) -> String {
    svc.metadata.name.clone().unwrap_or_default()
}

fn eps(s: &EndpointSlice) -> &[Endpoint] {
    s.endpoints.as_deref().unwrap_or(&[])
}

/// Upstream's `setEndpointSliceLabels`: the Service's labels (minus reserved keys), headless
/// marker, service-name and managed-by. The flag says whether the non-reserved labels differ
/// from the Service's (the only label change upstream treats as a reason to update).
pub fn slice_labels(
    existing: &BTreeMap<String, String>,
    svc: &Service,
    controller_name: &str,
) -> (BTreeMap<String, String>, bool) {
    let reserved =
        |k: &str| k == LABEL_SERVICE_NAME || k == LABEL_MANAGED_BY || k == LABEL_HEADLESS;
    let ep_labels: BTreeMap<&String, &String> =
        existing.iter().filter(|(k, _)| !reserved(k)).collect();
    let mut svc_labels: BTreeMap<String, String> = labels_of(&svc.metadata.labels)
        .into_iter()
        .filter(|(k, _)| !reserved(k))
        .collect();
    let changed = ep_labels.len() != svc_labels.len()
        || ep_labels
            .iter()
            .any(|(k, v)| svc_labels.get(*k) != Some(*v));
    if !service_ip_set(svc) {
        svc_labels.insert(LABEL_HEADLESS.into(), String::new());
    }
    svc_labels.insert(LABEL_SERVICE_NAME.into(), svc_name(svc));
    svc_labels.insert(LABEL_MANAGED_BY.into(), controller_name.into());
    (svc_labels, changed)
}

/// Upstream's `getEndpointPorts`: each Service port resolved against the pod; unresolvable
/// ports are left out (so pods with different containers end up in different slices).
pub fn endpoint_ports<P: PodView + ?Sized>(svc: &Service, pod: &P) -> Vec<EndpointPort> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut out = Vec::new();
    for sp in spec.ports.iter().flatten() {
        let Some(port) = find_port(pod, sp) else {
            continue;
        };
        out.push(EndpointPort {
            name: Some(sp.name.clone().unwrap_or_default()),
            port: Some(port),
            protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
            app_protocol: sp.app_protocol.clone(),
        });
    }
    sort_ports(&mut out);
    out
}

/// Upstream's `podToEndpoint` for one address type.
pub fn pod_to_endpoint<P: PodView + ?Sized>(
    pod: &P,
    zone: Option<&str>,
    svc: &Service,
    at: AddressType,
) -> Endpoint {
    let serving = pod_ready(pod);
    let terminating = pod_terminating(pod);
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let is_ready = publish || (serving && !terminating);
    let node = pod.node_name().filter(|n| !n.is_empty()).map(String::from);
    Endpoint {
        addresses: pod_ips_of(pod, at),
        conditions: Some(EndpointConditions {
            ready: Some(is_ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.namespace().map(String::from),
            name: pod.name().map(String::from),
            uid: pod.uid().map(String::from),
            ..Default::default()
        }),
        node_name: node,
        zone: zone.filter(|z| !z.is_empty()).map(String::from),
        hostname: if should_set_hostname(pod, svc) {
            pod.hostname().map(String::from)
        } else {
            None
        },
        ..Default::default()
    }
}

fn owned_by(slice: &EndpointSlice, svc: &Service) -> bool {
    let uid = svc.metadata.uid.as_deref().unwrap_or("");
    slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.kind == "Service" && o.api_version == "v1")
}

fn new_slice(
    svc: &Service,
    ports: &[EndpointPort],
    at: AddressType,
    controller: &str,
) -> EndpointSlice {
    let (labels, _) = slice_labels(&BTreeMap::new(), svc, controller);
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(slice_prefix(&svc_name(svc))),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![controller_ref(
                "Service",
                &svc_name(svc),
                svc.metadata.uid.as_deref().unwrap_or(""),
            )]),
            ..Default::default()
        },
        address_type: at.as_str().into(),
        endpoints: Some(vec![]),
        ports: Some(ports.to_vec()),
    }
}

/// Upstream's placeholder comparison: namespace, labels, address type, ports and endpoints
/// (nil and empty lists alike); names, owner references and annotations are ignored.
fn equals_placeholder(s: &EndpointSlice, p: &EndpointSlice) -> bool {
    s.metadata.namespace == p.metadata.namespace
        && labels_of(&s.metadata.labels) == labels_of(&p.metadata.labels)
        && s.address_type == p.address_type
        && s.ports.as_deref().unwrap_or(&[]) == p.ports.as_deref().unwrap_or(&[])
        && eps(s).is_empty()
        && eps(p).is_empty()
}

struct AddressTypeOutcome {
    create: Vec<EndpointSlice>,
    update: Vec<EndpointSlice>,
    delete: Vec<EndpointSlice>,
    added: usize,
    removed: usize,
    desired_endpoints: usize,
    desired_slices: usize,
}

fn reconcile_by_address_type<P: PodView>(
    input: &SliceInput<'_, P>,
    existing: Vec<&EndpointSlice>,
    at: AddressType,
    missing_nodes: &mut BTreeSet<String>,
    events: &mut Vec<PlannedEvent>,
    populated: &mut bool,
) -> AddressTypeOutcome {
    let svc = input.service;
    let max = input
        .max_endpoints_per_slice
        .clamp(1, MAX_MAX_ENDPOINTS_PER_SLICE);
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut to_delete: Vec<EndpointSlice> = Vec::new();
    let mut existing_by_pm: BTreeMap<Vec<PortKey>, Vec<&EndpointSlice>> = BTreeMap::new();
    for &s in &existing {
        if owned_by(s, svc) {
            existing_by_pm
                .entry(port_map_key(s.ports.as_deref().unwrap_or(&[])))
                .or_default()
                .push(s);
        } else {
            to_delete.push(s.clone());
        }
    }
    let mut desired_ports: BTreeMap<Vec<PortKey>, Vec<EndpointPort>> = BTreeMap::new();
    let mut desired_eps: BTreeMap<Vec<PortKey>, BTreeMap<EndpointKey, Endpoint>> = BTreeMap::new();
    for pod in &input.pods {
        if !pod_in_endpoints(pod, true) {
            continue;
        }
        let ports = endpoint_ports(svc, pod);
        let pk = port_map_key(&ports);
        desired_eps.entry(pk.clone()).or_default();
        desired_ports.entry(pk.clone()).or_insert(ports);
        let node_name = pod.node_name().unwrap_or_default().to_string();
        let zone = match (input.node_zone)(&node_name) {
            Some(z) => z,
            None => {
                if !publish {
                    missing_nodes.insert(pod.name().unwrap_or_default().to_string());
                    continue;
                }
                None
            }
        };
        let ep = pod_to_endpoint(pod, zone.as_deref(), svc, at);
        if !ep.addresses.is_empty()
            && let Some(set) = desired_eps.get_mut(&pk)
        {
            set.insert(endpoint_key(&ep), ep);
        }
    }
    let mut create = Vec::new();
    let mut update = Vec::new();
    let mut added = 0;
    let mut removed = 0;
    let mut desired_endpoints = 0;
    let mut desired_slices = 0;
    let desired_keys: BTreeSet<Vec<PortKey>> = desired_eps.keys().cloned().collect();
    for (pk, set) in desired_eps {
        desired_endpoints += set.len();
        desired_slices += set.len().div_ceil(max);
        let ports = desired_ports.get(&pk).cloned().unwrap_or_default();
        let ex = existing_by_pm.get(&pk).map(Vec::as_slice).unwrap_or(&[]);
        let r = reconcile_by_port_mapping(svc, ex, set, &ports, at, max, input.controller_name);
        added += r.added;
        removed += r.removed;
        create.extend(r.create);
        update.extend(r.update);
        to_delete.extend(r.delete);
    }
    for (pk, slices) in &existing_by_pm {
        if !desired_keys.contains(pk) {
            to_delete.extend(slices.iter().map(|&s| s.clone()));
        }
    }
    if existing.len() == to_delete.len() && create.is_empty() {
        let placeholder = new_slice(svc, &[], at, input.controller_name);
        if to_delete.len() == 1 && equals_placeholder(&to_delete[0], &placeholder) {
            to_delete.clear();
        } else {
            create.push(placeholder);
        }
        desired_slices = desired_slices.max(1);
    }
    // Hints.
    let deleted: BTreeSet<String> = to_delete
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let updated: BTreeSet<String> = update
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let annotations = labels_of(&svc.metadata.annotations);
    let auto = topology::hints_annotation_enabled(&annotations);
    let td = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref());
    let can_use_td = topology::valid_traffic_distribution(td) && !auto;
    // Without hints to add, an unchanged slice matters only if it carries hints to remove:
    // copy just those (a large Service's slices are otherwise copied on every sync).
    let only_hinted = !auto && !can_use_td;
    let unchanged: Vec<EndpointSlice> = existing
        .iter()
        .filter(|s| {
            let n = s.metadata.name.clone().unwrap_or_default();
            !deleted.contains(&n) && !updated.contains(&n)
        })
        .filter(|s| !only_hinted || eps(s).iter().any(|e| e.hints.is_some()))
        .map(|&s| s.clone())
        .collect();
    let mut sets = SliceSets {
        create,
        update,
        unchanged,
    };
    if auto {
        events.extend(topology::add_auto_hints(
            input.zone_ratios,
            at.as_str(),
            &mut sets,
            populated,
        ));
    } else {
        if *populated {
            events.push(PlannedEvent {
                warning: true,
                reason: "TopologyAwareHintsDisabled".into(),
                message: format!(
                    "{}, addressType: {}",
                    topology::messages::TOPOLOGY_AWARE_HINTS_DISABLED,
                    at.as_str()
                ),
            });
        }
        *populated = false;
        if !can_use_td {
            topology::remove_hints(&mut sets);
        }
    }
    if can_use_td {
        topology::reconcile_traffic_distribution(td, &mut sets);
    }
    let SliceSets {
        mut create,
        mut update,
        ..
    } = sets;
    // finalize: recycle a slice we would delete as the name of one we would create, turning
    // a delete plus a create into one update.
    let mut i = 0;
    while i < to_delete.len() && !create.is_empty() {
        if to_delete[i].address_type == at.as_str() && owned_by(&to_delete[i], svc) {
            let old = to_delete.remove(i);
            if let Some(mut c) = create.pop() {
                c.metadata.name = old.metadata.name.clone();
                c.metadata.generate_name = None;
                c.metadata.resource_version = old.metadata.resource_version.clone();
                c.metadata.uid = old.metadata.uid.clone();
                c.metadata.annotations = old.metadata.annotations.clone();
                update.push(c);
            }
        } else {
            i += 1;
        }
    }
    AddressTypeOutcome {
        create,
        update,
        delete: to_delete,
        added,
        removed,
        desired_endpoints,
        desired_slices,
    }
}

/// Whether writing `new` over `old` would change anything we own: labels, owner references,
/// address type, ports (as a set) and endpoints (as upstream's equality plus hints).
pub fn slice_semantically_equal(old: &EndpointSlice, new: &EndpointSlice) -> bool {
    if labels_of(&old.metadata.labels) != labels_of(&new.metadata.labels)
        || old.metadata.owner_references.clone().unwrap_or_default()
            != new.metadata.owner_references.clone().unwrap_or_default()
        || old.address_type != new.address_type
        || port_map_key(old.ports.as_deref().unwrap_or(&[]))
            != port_map_key(new.ports.as_deref().unwrap_or(&[]))
    {
        return false;
    }
    let (a, b) = (eps(old), eps(new));
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|(x, y)| {
            endpoint_key(x) == endpoint_key(y)
                && endpoints_equal_beyond_hash(x, y)
                && x.hints == y.hints
        })
}

/// Computes the plan for one Service.
pub fn plan<P: PodView>(input: &SliceInput<'_, P>) -> SlicePlan {
    let svc = input.service;
    let types = address_types_for_service(svc);
    let mut out = SlicePlan::default();
    let mut by_type: BTreeMap<AddressType, Vec<&EndpointSlice>> = BTreeMap::new();
    for &s in &input.existing {
        match AddressType::parse(&s.address_type).filter(|t| types.contains(t)) {
            Some(t) => by_type.entry(t).or_default().push(s),
            None => out.delete.push(s.clone()),
        }
    }
    let mut populated = input.hints_populated;
    let mut missing = BTreeSet::new();
    for at in &types {
        let ex = by_type.remove(at).unwrap_or_default();
        let r = reconcile_by_address_type(
            input,
            ex,
            *at,
            &mut missing,
            &mut out.events,
            &mut populated,
        );
        out.create.extend(r.create);
        out.update.extend(r.update);
        out.delete.extend(r.delete);
        out.added += r.added;
        out.removed += r.removed;
        out.desired_endpoints += r.desired_endpoints;
        out.desired_slices += r.desired_slices;
    }
    // Semantic no-op detection: drop updates that would not change the stored slice.
    let before: BTreeMap<String, &EndpointSlice> = input
        .existing
        .iter()
        .filter_map(|&s| s.metadata.name.clone().map(|n| (n, s)))
        .collect();
    out.update.retain(|u| {
        let n = u.metadata.name.clone().unwrap_or_default();
        before
            .get(&n)
            .is_none_or(|old| !slice_semantically_equal(old, u))
    });
    // As upstream's finalize: only what is written carries the trigger time, so the
    // annotation alone never makes a write.
    for s in out.create.iter_mut().chain(out.update.iter_mut()) {
        trigger_time::annotate(&mut s.metadata.annotations, input.trigger_time);
    }
    out.missing_nodes = missing.into_iter().collect();
    out.hints_populated = populated;
    out.num_slices = (input.existing.len() + out.create.len()).saturating_sub(out.delete.len());
    out.condition = Some(condition::endpoints_ready(svc, &input.pods));
    out
}

pub mod condition;
mod port_mapping;
pub mod trigger_time;
use port_mapping::reconcile_by_port_mapping;

#[cfg(test)]
mod tests;

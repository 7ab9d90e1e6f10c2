//! Topology hints: the `spec.trafficDistribution` heuristics (PreferClose, PreferSameZone,
//! PreferSameNode) and the older `service.kubernetes.io/topology-mode: Auto` allocation that
//! spreads endpoints over zones in proportion to their allocatable CPU. Pure; the shell keeps
//! the per-zone CPU ratios up to date from Nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointHints, EndpointSlice, ForNode, ForZone};

/// Upstream's overload threshold: a zone may receive up to 20% fewer endpoints than its share.
const OVERLOAD_THRESHOLD: f64 = 0.2;

/// Event messages, as upstream words them.
pub mod messages {
    /// Some ready endpoint has no zone.
    pub const NO_ZONE_SPECIFIED: &str = "One or more endpoints do not have a zone specified";
    /// Nothing could be allocated.
    pub const NO_ALLOCATED_HINTS_FOR_ZONES: &str = "No hints allocated for zones";
    /// Hints were switched on.
    pub const TOPOLOGY_AWARE_HINTS_ENABLED: &str = "Topology Aware Hints has been enabled";
    /// Hints were switched off.
    pub const TOPOLOGY_AWARE_HINTS_DISABLED: &str = "Topology Aware Hints has been disabled";
    /// A node lacks zone or CPU.
    pub const INSUFFICIENT_NODE_INFO: &str =
        "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes";
    /// Only one zone has ready nodes.
    pub const NODES_READY_IN_ONE_ZONE_ONLY: &str = "Nodes only ready in one zone";
    /// Fewer endpoints than zones.
    pub const INSUFFICIENT_NUMBER_OF_ENDPOINTS: &str = "Insufficient number of endpoints";
    /// The minimums do not fit.
    pub const MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD: &str = "Unable to allocate minimum required endpoints to each zone without exceeding overload threshold";
}

/// An Event the reconcile wants published on the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// True for Warning, false for Normal.
    pub warning: bool,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

fn hints_disabled_event(msg: String) -> PlannedEvent {
    PlannedEvent {
        warning: true,
        reason: "TopologyAwareHintsDisabled".into(),
        message: msg,
    }
}

/// What the topology-mode allocator needs to know about one Node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeTopology {
    /// `topology.kubernetes.io/zone`, if set.
    pub zone: Option<String>,
    /// Node Ready condition is True.
    pub ready: bool,
    /// Has a control-plane/master role label (excluded, as upstream).
    pub excluded: bool,
    /// Allocatable CPU in millicores.
    pub cpu_millis: i64,
}

/// Share of allocatable CPU per zone, or `None` when node information is insufficient.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneRatios(pub Option<BTreeMap<String, f64>>);

impl ZoneRatios {
    /// Upstream's `SetNodes`: ready, non-control-plane nodes; any such node without zone or CPU
    /// makes the information insufficient; fewer than two zones is insufficient too.
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a NodeTopology>) -> Self {
        let mut by_zone: BTreeMap<String, i64> = BTreeMap::new();
        let mut total: i64 = 0;
        for n in nodes {
            if n.excluded || !n.ready {
                continue;
            }
            let zone = n.zone.as_deref().unwrap_or("");
            if zone.is_empty() || n.cpu_millis == 0 {
                return ZoneRatios(None);
            }
            total += n.cpu_millis;
            *by_zone.entry(zone.to_string()).or_default() += n.cpu_millis;
        }
        if total == 0 || by_zone.len() < 2 {
            return ZoneRatios(None);
        }
        ZoneRatios(Some(
            by_zone
                .into_iter()
                .map(|(z, c)| (z, c as f64 / total as f64))
                .collect(),
        ))
    }
}

/// Parses a CPU quantity ("2", "500m", "1.5") to millicores; unparsable gives 0.
pub fn cpu_millis(q: &str) -> i64 {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<f64>().map(|v| v.ceil() as i64).unwrap_or(0);
    }
    let (num, mult) = if let Some(n) = q.strip_suffix('k') {
        (n, 1000.0)
    } else {
        (q, 1.0)
    };
    num.parse::<f64>()
        .map(|v| (v * mult * 1000.0).ceil() as i64)
        .unwrap_or(0)
}

/// Whether `spec.trafficDistribution` is one we honour (all three are GA-gated on in 1.37).
pub fn valid_traffic_distribution(td: Option<&str>) -> bool {
    matches!(
        td,
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    )
}

/// Whether the topology-mode (or deprecated topology-aware-hints) annotation asks for Auto.
pub fn hints_annotation_enabled(annotations: &BTreeMap<String, String>) -> bool {
    let v = annotations
        .get("service.kubernetes.io/topology-aware-hints")
        .or_else(|| annotations.get("service.kubernetes.io/topology-mode"));
    matches!(v.map(String::as_str), Some("Auto" | "auto"))
}

fn ready(ep: &Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready) == Some(true)
}

fn eps(s: &EndpointSlice) -> &[Endpoint] {
    s.endpoints.as_deref().unwrap_or(&[])
}

fn eps_mut(s: &mut EndpointSlice) -> &mut Vec<Endpoint> {
    s.endpoints.get_or_insert_with(Vec::new)
}

/// The slices of one Service and address type at the hints stage.
#[derive(Debug, Default)]
pub struct SliceSets {
    /// To create.
    pub create: Vec<EndpointSlice>,
    /// To update.
    pub update: Vec<EndpointSlice>,
    /// Existing slices left as they are so far.
    pub unchanged: Vec<EndpointSlice>,
}

/// Upstream's `RemoveHintsFromSlices`: strip hints from slices being written, and move
/// unchanged slices that carry hints into the update list.
pub fn remove_hints(sets: &mut SliceSets) {
    for s in sets.create.iter_mut().chain(sets.update.iter_mut()) {
        for ep in eps_mut(s) {
            ep.hints = None;
        }
    }
    let unchanged = std::mem::take(&mut sets.unchanged);
    for mut s in unchanged {
        if eps(&s).iter().any(|e| e.hints.is_some()) {
            for ep in eps_mut(&mut s) {
                ep.hints = None;
            }
            sets.update.push(s);
        } else {
            sets.unchanged.push(s);
        }
    }
}

/// Upstream's trafficdist `ReconcileHints`: every ready endpoint hinted for its own zone (and
/// its own node for PreferSameNode); unchanged slices whose hints disagree become updates.
pub fn reconcile_traffic_distribution(td: Option<&str>, sets: &mut SliceSets) {
    let close = valid_traffic_distribution(td);
    let node_hints = td == Some("PreferSameNode");
    let needs_update = |s: &EndpointSlice| -> bool {
        if !close {
            return eps(s).iter().any(|e| e.hints.is_some());
        }
        eps(s).iter().filter(|e| ready(e)).any(|e| {
            let h = e.hints.as_ref();
            let zones = h.and_then(|h| h.for_zones.as_deref()).unwrap_or(&[]);
            let nodes = h.and_then(|h| h.for_nodes.as_deref()).unwrap_or(&[]);
            let zone_bad = match &e.zone {
                Some(z) => h.is_none() || zones.len() != 1 || &zones[0].name != z,
                None => !zones.is_empty(),
            };
            let node_bad = match (&e.node_name, node_hints) {
                (Some(n), true) => h.is_none() || nodes.len() != 1 || &nodes[0].name != n,
                _ => !nodes.is_empty(),
            };
            zone_bad || node_bad
        })
    };
    let update = |s: &mut EndpointSlice| {
        for e in eps_mut(s) {
            if !close {
                e.hints = None;
                continue;
            }
            if !ready(e) {
                continue;
            }
            let for_zones = e.zone.as_ref().map(|z| vec![ForZone { name: z.clone() }]);
            let for_nodes = match (&e.node_name, node_hints) {
                (Some(n), true) => Some(vec![ForNode { name: n.clone() }]),
                _ => None,
            };
            e.hints = if for_zones.is_some() || for_nodes.is_some() {
                Some(EndpointHints {
                    for_zones,
                    for_nodes,
                })
            } else {
                None
            };
        }
    };
    let unchanged = std::mem::take(&mut sets.unchanged);
    for s in unchanged {
        if needs_update(&s) {
            sets.update.push(s);
        } else {
            sets.unchanged.push(s);
        }
    }
    for s in sets.create.iter_mut().chain(sets.update.iter_mut()) {
        update(s);
    }
}

#[derive(Clone, Copy, Debug)]
struct Allocation {
    minimum: i64,
    maximum: i64,
    desired: f64,
}

fn allocations(ratios: &ZoneRatios, n: i64) -> Result<BTreeMap<String, Allocation>, String> {
    use messages::*;
    let Some(ratios) = &ratios.0 else {
        return Err(INSUFFICIENT_NODE_INFO.into());
    };
    if ratios.len() < 2 {
        return Err(NODES_READY_IN_ONE_ZONE_ONLY.into());
    }
    if ratios.len() as i64 > n {
        return Err(format!(
            "{INSUFFICIENT_NUMBER_OF_ENDPOINTS} ({n} endpoints, {} zones)",
            ratios.len()
        ));
    }
    let mut remaining = n;
    let mut min_total = 0;
    let mut out = BTreeMap::new();
    for (zone, ratio) in ratios {
        let desired = ratio * n as f64;
        let minimum = (desired * (1.0 / (1.0 + OVERLOAD_THRESHOLD))).ceil() as i64;
        out.insert(
            zone.clone(),
            Allocation {
                minimum,
                maximum: 0,
                desired: desired.max(minimum as f64),
            },
        );
        min_total += minimum;
        remaining -= minimum;
        if remaining < 0 {
            return Err(format!(
                "{MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD} ({n} endpoints, {} zones)",
                ratios.len()
            ));
        }
    }
    for a in out.values_mut() {
        a.maximum = a.minimum + n - min_total;
    }
    Ok(out)
}

fn with_address_type(msg: &str, at: &str) -> String {
    format!("{msg}, addressType: {at}")
}

/// Hints for a slice that can stay as it is, or `None` when it must be rewritten.
fn hints_by_zone(
    s: &EndpointSlice,
    allocated: &BTreeMap<String, i64>,
    allocs: &BTreeMap<String, Allocation>,
) -> Option<BTreeMap<String, i64>> {
    let mut by_zone: BTreeMap<String, i64> = BTreeMap::new();
    for e in eps(s).iter().filter(|e| ready(e)) {
        let zones = e.hints.as_ref().and_then(|h| h.for_zones.as_deref())?;
        if zones.is_empty() {
            return None;
        }
        for z in zones {
            if !allocs.contains_key(&z.name) {
                return None;
            }
            *by_zone.entry(z.name.clone()).or_default() += 1;
        }
    }
    for (zone, n) in &by_zone {
        let already = allocated.get(zone).copied().unwrap_or(0);
        match allocs.get(zone) {
            Some(a) if n + already <= a.maximum => {}
            _ => return None,
        }
    }
    Some(by_zone)
}

fn most(m: &BTreeMap<String, f64>) -> Option<(String, f64)> {
    let mut best: Option<(String, f64)> = None;
    for (z, n) in m {
        if *n > best.as_ref().map(|b| b.1).unwrap_or(0.0) {
            best = Some((z.clone(), *n));
        }
    }
    best
}

fn giving_and_receiving(
    allocs: &BTreeMap<String, Allocation>,
    allocated: &BTreeMap<String, i64>,
) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut giving_d: BTreeMap<String, f64> = BTreeMap::new();
    let mut receiving_d: BTreeMap<String, f64> = BTreeMap::new();
    for (zone, a) in allocs {
        let have = allocated.get(zone).copied().unwrap_or(0) as f64;
        if have > a.desired {
            giving_d.insert(zone.clone(), have - a.desired);
        } else if have < a.desired {
            receiving_d.insert(zone.clone(), a.desired - have);
        }
    }
    let mut giving = BTreeMap::new();
    let mut receiving = BTreeMap::new();
    while let (Some((gz, ng)), Some((rz, nr))) = (most(&giving_d), most(&receiving_d)) {
        if (ng < 1.0 && nr < 1.0) || ng < 0.5 || nr < 0.5 {
            break;
        }
        *giving.entry(gz.clone()).or_insert(0) += 1;
        *giving_d.entry(gz).or_insert(0.0) -= 1.0;
        *receiving.entry(rz.clone()).or_insert(0) += 1;
        *receiving_d.entry(rz).or_insert(0.0) -= 1.0;
    }
    (giving, receiving)
}

/// Upstream's `AddHints` for `topology-mode: Auto`. `populated` is whether hints are currently
/// recorded as populated for this Service; it is updated. Returns Events to publish.
pub fn add_auto_hints(
    ratios: &ZoneRatios,
    address_type: &str,
    sets: &mut SliceSets,
    populated: &mut bool,
) -> Vec<PlannedEvent> {
    let total: i64 = sets
        .create
        .iter()
        .chain(sets.update.iter())
        .chain(sets.unchanged.iter())
        .map(|s| eps(s).iter().filter(|e| ready(e)).count() as i64)
        .sum();
    let mut events = Vec::new();
    let allocs = match allocations(ratios, total) {
        Ok(a) => a,
        Err(msg) => {
            events.push(hints_disabled_event(with_address_type(&msg, address_type)));
            *populated = false;
            remove_hints(sets);
            return events;
        }
    };
    // Unchanged slices keep their hints if those still fit; otherwise they are rewritten.
    let mut allocated: BTreeMap<String, i64> = BTreeMap::new();
    let unchanged = std::mem::take(&mut sets.unchanged);
    for s in unchanged {
        match hints_by_zone(&s, &allocated, &allocs) {
            None => sets.update.push(s),
            Some(h) => {
                for (z, n) in h {
                    *allocated.entry(z).or_default() += n;
                }
                sets.unchanged.push(s);
            }
        }
    }
    for s in sets.create.iter_mut().chain(sets.update.iter_mut()) {
        for e in eps_mut(s) {
            // Upstream leaves a not-ready endpoint's hints as they were (its loop clears a
            // copy); we match it so both controllers write the same slices.
            if !ready(e) {
                continue;
            }
            let Some(zone) = e.zone.clone().filter(|z| !z.is_empty()) else {
                events.push(hints_disabled_event(with_address_type(
                    messages::NO_ZONE_SPECIFIED,
                    address_type,
                )));
                *populated = false;
                remove_hints(sets);
                return events;
            };
            *allocated.entry(zone.clone()).or_default() += 1;
            e.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone { name: zone }]),
                for_nodes: None,
            });
        }
    }
    let (mut giving, mut receiving) = giving_and_receiving(&allocs, &allocated);
    'outer: for s in sets.create.iter_mut().chain(sets.update.iter_mut()) {
        for e in eps_mut(s) {
            if !ready(e) {
                continue;
            }
            if giving.is_empty() || receiving.is_empty() {
                break 'outer;
            }
            let Some(gz) = e.zone.clone().filter(|z| !z.is_empty()) else {
                continue;
            };
            if giving.get(&gz).copied().unwrap_or(0) > 0 {
                let rz = receiving
                    .iter()
                    .find(|(_, n)| **n > 0)
                    .map(|(z, _)| z.clone());
                if let Some(rz) = rz {
                    e.hints = Some(EndpointHints {
                        for_zones: Some(vec![ForZone { name: rz.clone() }]),
                        for_nodes: None,
                    });
                    dec_or_remove(&mut giving, &gz);
                    dec_or_remove(&mut receiving, &rz);
                    *allocated.entry(rz).or_default() += 1;
                    *allocated.entry(gz).or_default() -= 1;
                }
            }
        }
    }
    if allocated.is_empty() {
        events.push(hints_disabled_event(with_address_type(
            messages::NO_ALLOCATED_HINTS_FOR_ZONES,
            address_type,
        )));
        *populated = false;
        remove_hints(sets);
        return events;
    }
    if !*populated {
        events.push(PlannedEvent {
            warning: false,
            reason: "TopologyAwareHintsEnabled".into(),
            message: with_address_type(messages::TOPOLOGY_AWARE_HINTS_ENABLED, address_type),
        });
    }
    *populated = true;
    events
}

fn dec_or_remove(m: &mut BTreeMap<String, i64>, k: &str) {
    if let Some(v) = m.get_mut(k) {
        if *v <= 1 {
            m.remove(k);
        } else {
            *v -= 1;
        }
    }
}

#[cfg(test)]
mod tests;

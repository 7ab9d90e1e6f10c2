//! Upstream's `reconcileByPortMapping`: one address family and one port set, the existing
//! slices updated, filled or recycled and new ones created for what is left.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use super::*;

/// Upstream's `getSliceToFill`: the unchanged slice that `n` more endpoints fill most closely.
fn slice_to_fill<'a>(
    candidates: impl Iterator<Item = &'a EndpointSlice>,
    n: usize,
    max: usize,
) -> Option<String> {
    let mut closest = max;
    let mut best = None;
    for s in candidates {
        let total = n + eps(s).len();
        if total <= max {
            let diff = max - total;
            if diff < closest {
                closest = diff;
                best = s.metadata.name.clone();
                if diff == 0 {
                    break;
                }
            }
        }
    }
    best
}

pub(super) struct PortMappingResult {
    pub(super) create: Vec<EndpointSlice>,
    pub(super) update: Vec<EndpointSlice>,
    pub(super) delete: Vec<EndpointSlice>,
    pub(super) added: usize,
    pub(super) removed: usize,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn reconcile_by_port_mapping(
    svc: &Service,
    existing: &[&EndpointSlice],
    mut desired: BTreeMap<EndpointKey, Endpoint>,
    ports: &[EndpointPort],
    at: AddressType,
    max: usize,
    controller: &str,
) -> PortMappingResult {
    // Unchanged slices are borrowed: a large Service's slices are copied only when written.
    let mut by_name: BTreeMap<String, Cow<'_, EndpointSlice>> = BTreeMap::new();
    let mut unchanged: BTreeSet<String> = BTreeSet::new();
    let mut to_update: BTreeSet<String> = BTreeSet::new();
    let mut to_delete: BTreeSet<String> = BTreeSet::new();
    let mut removed = 0;
    for &s in existing {
        let name = s.metadata.name.clone().unwrap_or_default();
        let mut new_eps = Vec::new();
        let mut ep_updated = false;
        for e in eps(s) {
            let k = endpoint_key(e);
            if let Some(got) = desired.remove(&k) {
                if !endpoints_equal_beyond_hash(&got, e) {
                    ep_updated = true;
                }
                new_eps.push(got);
            }
        }
        let (labels, mut labels_changed) =
            slice_labels(&labels_of(&s.metadata.labels), svc, controller);
        // A slice adopted from another controller must be relabelled as ours.
        labels_changed |= s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .map(String::as_str)
            != Some(controller);
        if ep_updated || eps(s).len() != new_eps.len() {
            removed += eps(s).len().saturating_sub(new_eps.len());
            if new_eps.is_empty() {
                to_delete.insert(name.clone());
                by_name.insert(name, Cow::Borrowed(s));
            } else {
                // Not `s.clone()`: its endpoints would be copied only to be replaced.
                let mut u = EndpointSlice {
                    metadata: s.metadata.clone(),
                    address_type: s.address_type.clone(),
                    endpoints: Some(new_eps),
                    ports: s.ports.clone(),
                };
                u.metadata.labels = Some(labels);
                to_update.insert(name.clone());
                by_name.insert(name, Cow::Owned(u));
            }
        } else if labels_changed {
            let mut u = s.clone();
            u.metadata.labels = Some(labels);
            to_update.insert(name.clone());
            by_name.insert(name, Cow::Owned(u));
        } else {
            unchanged.insert(name.clone());
            by_name.insert(name, Cow::Borrowed(s));
        }
    }
    let added = desired.len();
    // First fill the slices we are rewriting anyway, fullest first.
    if !desired.is_empty() && !to_update.is_empty() {
        let mut names: Vec<String> = to_update.iter().cloned().collect();
        names.sort_by_key(|n| std::cmp::Reverse(by_name.get(n).map(|s| eps(s).len()).unwrap_or(0)));
        for n in names {
            if let Some(s) = by_name.get_mut(&n) {
                let list = s.to_mut().endpoints.get_or_insert_with(Vec::new);
                while list.len() < max {
                    let Some((_, e)) = desired.pop_first() else {
                        break;
                    };
                    list.push(e);
                }
            }
        }
    }
    let mut create = Vec::new();
    while !desired.is_empty() {
        let mut fill_name = None;
        if desired.len() < max && !unchanged.is_empty() {
            fill_name = slice_to_fill(
                unchanged
                    .iter()
                    .filter_map(|n| by_name.get(n).map(|s| s.as_ref())),
                desired.len(),
                max,
            );
        }
        let mut slice = match &fill_name {
            Some(n) => by_name
                .get(n)
                .map(|s| s.as_ref().clone())
                .unwrap_or_else(|| new_slice(svc, ports, at, controller)),
            None => new_slice(svc, ports, at, controller),
        };
        {
            let list = slice.endpoints.get_or_insert_with(Vec::new);
            while list.len() < max {
                let Some((_, e)) = desired.pop_first() else {
                    break;
                };
                list.push(e);
            }
        }
        match fill_name {
            Some(n) => {
                unchanged.remove(&n);
                to_update.insert(n.clone());
                by_name.insert(n, Cow::Owned(slice));
            }
            None => create.push(slice),
        }
    }
    PortMappingResult {
        create,
        update: to_update
            .iter()
            .filter_map(|n| by_name.remove(n).map(Cow::into_owned))
            .collect(),
        delete: to_delete
            .iter()
            .filter_map(|n| by_name.remove(n).map(Cow::into_owned))
            .collect(),
        added,
        removed,
    }
}

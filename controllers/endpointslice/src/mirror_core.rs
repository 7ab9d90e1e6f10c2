//! The EndpointSlice mirroring controller's pure core: a hand-made Endpoints object of a
//! selector-less Service becomes EndpointSlices, as kube-controller-manager's mirroring
//! controller does: one slice per address type and port set, at most `max_per_subset`
//! addresses mirrored per subset, invalid IPs skipped, the Endpoints' labels and annotations
//! carried over.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, Endpoints};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::common::*;

/// Default `--mirroring-max-endpoints-per-subset`.
pub const DEFAULT_MAX_ENDPOINTS_PER_SUBSET: usize = 1000;

/// Annotation a leader-election Endpoints carries (never mirrored).
pub const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Upstream's `shouldMirror`: not labelled skip-mirror=true, not a leader-election record.
pub fn should_mirror(ep: &Endpoints) -> bool {
    let labels = labels_of(&ep.metadata.labels);
    let ann = labels_of(&ep.metadata.annotations);
    labels.get(LABEL_SKIP_MIRROR).map(String::as_str) != Some("true")
        && !ann.contains_key(LEADER_ANNOTATION)
}

/// The plan for one Endpoints object.
#[derive(Debug, Default)]
pub struct MirrorPlan {
    /// Slices to create.
    pub create: Vec<EndpointSlice>,
    /// Slices to replace.
    pub update: Vec<EndpointSlice>,
    /// Slices to delete.
    pub delete: Vec<EndpointSlice>,
    /// Addresses that were not valid IPs.
    pub invalid_addresses: usize,
    /// Addresses skipped in total (invalid plus over the per-subset cap).
    pub skipped_addresses: usize,
    /// Endpoints added.
    pub added: usize,
    /// Endpoints updated.
    pub updated: usize,
    /// Endpoints removed.
    pub removed: usize,
}

impl MirrorPlan {
    /// Number of API writes.
    pub fn writes(&self) -> usize {
        self.create.len() + self.update.len() + self.delete.len()
    }
}

fn to_slice_ports(ports: &[k8s_openapi::api::core::v1::EndpointPort]) -> Vec<EndpointPort> {
    let mut out: Vec<EndpointPort> = ports
        .iter()
        .map(|p| EndpointPort {
            name: Some(p.name.clone().unwrap_or_default()),
            port: Some(p.port),
            protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    sort_ports(&mut out);
    out
}

fn address_to_endpoint(a: &EndpointAddress, ready: bool) -> Option<(Endpoint, AddressType)> {
    let ip = parse_ip_sloppy(&a.ip)?;
    let at = if ip.is_ipv4() {
        AddressType::IPv4
    } else {
        AddressType::IPv6
    };
    Some((
        Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..Default::default()
            }),
            target_ref: a.target_ref.clone(),
            node_name: a.node_name.clone(),
            hostname: a.hostname.clone().filter(|h| !h.is_empty()),
            ..Default::default()
        },
        at,
    ))
}

/// Upstream's `RepackSubsets` up to ordering: addresses grouped by identical port sets, an
/// address ready in one subset and not-ready in another for the same port counted ready
/// only if it is ready everywhere it appears for that port (upstream keeps the not-ready
/// verdict once seen).
pub fn repack_subsets(subsets: &[EndpointSubset]) -> Vec<EndpointSubset> {
    type AddrKey = (String, String);
    let key_of = |a: &EndpointAddress| -> AddrKey {
        (
            a.ip.clone(),
            a.target_ref
                .as_ref()
                .and_then(|r| r.uid.clone())
                .unwrap_or_default(),
        )
    };
    let mut all: BTreeMap<AddrKey, EndpointAddress> = BTreeMap::new();
    // port (sentinel None for "no ports") -> address -> ready
    let mut by_port: BTreeMap<Option<PortKey>, BTreeMap<AddrKey, bool>> = BTreeMap::new();
    let mut port_objs: BTreeMap<PortKey, k8s_openapi::api::core::v1::EndpointPort> =
        BTreeMap::new();
    for s in subsets {
        let ports: Vec<Option<PortKey>> = match s.ports.as_deref() {
            None | Some([]) => vec![None],
            Some(ps) => ps
                .iter()
                .map(|p| {
                    let k = (
                        p.name.clone().unwrap_or_default(),
                        p.port,
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        p.app_protocol.clone(),
                    );
                    port_objs.insert(k.clone(), p.clone());
                    Some(k)
                })
                .collect(),
        };
        for port in ports {
            for (list, ready) in [(&s.addresses, true), (&s.not_ready_addresses, false)] {
                for a in list.iter().flatten() {
                    let k = key_of(a);
                    all.entry(k.clone()).or_insert_with(|| a.clone());
                    let m = by_port.entry(port.clone()).or_default();
                    match m.get(&k) {
                        Some(false) => {}
                        _ => {
                            m.insert(k, ready);
                        }
                    }
                }
            }
        }
    }
    // Group ports that share exactly the same address set.
    let mut groups: BTreeMap<Vec<(AddrKey, bool)>, Vec<Option<PortKey>>> = BTreeMap::new();
    for (port, addrs) in by_port {
        groups
            .entry(addrs.into_iter().collect())
            .or_default()
            .push(port);
    }
    let mut out = Vec::new();
    for (addrs, ports) in groups {
        let mut ready = Vec::new();
        let mut not_ready = Vec::new();
        for (k, r) in addrs {
            if let Some(a) = all.get(&k) {
                if r {
                    ready.push(a.clone());
                } else {
                    not_ready.push(a.clone());
                }
            }
        }
        let ports: Vec<_> = ports
            .into_iter()
            .flatten()
            .filter_map(|k| port_objs.get(&k).cloned())
            .collect();
        out.push(EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: (!ports.is_empty()).then_some(ports),
        });
    }
    out
}

fn cleaned_annotations(ep: &Endpoints) -> BTreeMap<String, String> {
    let mut a = labels_of(&ep.metadata.annotations);
    a.remove(TRIGGER_TIME);
    a.remove(LAST_APPLIED);
    a
}

fn new_mirror_slice(
    ep: &Endpoints,
    ports: &[EndpointPort],
    at: AddressType,
    name: Option<String>,
    controller: &str,
) -> EndpointSlice {
    let ep_name = ep.metadata.name.clone().unwrap_or_default();
    let mut labels = labels_of(&ep.metadata.labels);
    labels.insert(LABEL_SERVICE_NAME.into(), ep_name.clone());
    labels.insert(LABEL_MANAGED_BY.into(), controller.into());
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: name.is_none().then(|| slice_prefix(&ep_name)),
            name,
            namespace: ep.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(cleaned_annotations(ep)),
            owner_references: Some(vec![controller_ref(
                "Endpoints",
                &ep_name,
                ep.metadata.uid.as_deref().unwrap_or(""),
            )]),
            ..Default::default()
        },
        address_type: at.as_str().into(),
        endpoints: Some(vec![]),
        ports: Some(ports.to_vec()),
    }
}

/// Computes the mirroring plan for `ep` given the slices we mirrored for it before.
pub fn plan(
    ep: &Endpoints,
    existing: &[EndpointSlice],
    max_per_subset: usize,
    controller: &str,
) -> MirrorPlan {
    let mut out = MirrorPlan::default();
    type Key = (AddressType, Vec<PortKey>);
    let mut desired: BTreeMap<Key, BTreeMap<EndpointKey, Endpoint>> = BTreeMap::new();
    let mut ports_by_key: BTreeMap<Key, Vec<EndpointPort>> = BTreeMap::new();
    for subset in repack_subsets(ep.subsets.as_deref().unwrap_or(&[])) {
        let ports = to_slice_ports(subset.ports.as_deref().unwrap_or(&[]));
        let pk = port_map_key(&ports);
        for at in [AddressType::IPv4, AddressType::IPv6] {
            desired.entry((at, pk.clone())).or_default();
            ports_by_key.insert((at, pk.clone()), ports.clone());
        }
        let total = subset.addresses.as_ref().map_or(0, Vec::len)
            + subset.not_ready_addresses.as_ref().map_or(0, Vec::len);
        let mut added = 0;
        for (list, ready) in [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ] {
            for a in list.iter().flatten() {
                if added >= max_per_subset {
                    break;
                }
                match address_to_endpoint(a, ready) {
                    Some((e, at)) => {
                        if let Some(set) = desired.get_mut(&(at, pk.clone())) {
                            set.insert(endpoint_key(&e), e);
                        }
                        added += 1;
                    }
                    None => out.invalid_addresses += 1,
                }
            }
        }
        out.skipped_addresses += total - added;
    }
    let mut existing_by_key: BTreeMap<Key, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in existing {
        let at = AddressType::parse(&s.address_type).unwrap_or(AddressType::IPv4);
        existing_by_key
            .entry((at, port_map_key(s.ports.as_deref().unwrap_or(&[]))))
            .or_default()
            .push(s);
    }
    let ep_uid = ep.metadata.uid.clone().unwrap_or_default();
    let ep_name = ep.metadata.name.clone().unwrap_or_default();
    let ep_labels = labels_of(&ep.metadata.labels);
    let ep_ann = cleaned_annotations(ep);
    for (key, mut set) in std::mem::take(&mut desired).into_iter().collect::<Vec<_>>() {
        let ex = existing_by_key.remove(&key).unwrap_or_default();
        if set.is_empty() {
            for s in ex {
                out.removed += s.endpoints.as_ref().map_or(0, Vec::len);
                out.delete.push(s.clone());
            }
            continue;
        }
        let mut name = None;
        if let Some(first) = ex.first() {
            out.delete.extend(ex[1..].iter().map(|s| (*s).clone()));
            let (mut added, mut updated, mut removed, mut matches) = (0, 0, 0, 0);
            for e in first.endpoints.iter().flatten() {
                match set.get(&endpoint_key(e)) {
                    None => removed += 1,
                    Some(got) => {
                        matches += 1;
                        if !endpoints_equal_beyond_hash(got, e) {
                            updated += 1;
                        }
                    }
                }
            }
            added += set.len() - matches;
            out.added += added;
            out.updated += updated;
            out.removed += removed;
            let mut cmp_labels = labels_of(&first.metadata.labels);
            cmp_labels.remove(LABEL_MANAGED_BY);
            cmp_labels.remove(LABEL_SERVICE_NAME);
            let rebuild = first
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Endpoints" && o.name == ep_name && o.uid != ep_uid);
            let managed_ok = first
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED_BY))
                .map(String::as_str)
                == Some(controller);
            if added == 0
                && updated == 0
                && removed == 0
                && ep_labels == cmp_labels
                && ep_ann == labels_of(&first.metadata.annotations)
                && !rebuild
                && managed_ok
            {
                continue;
            }
            name = first.metadata.name.clone();
        } else {
            out.added += set.len();
        }
        let ports = ports_by_key.get(&key).cloned().unwrap_or_default();
        let mut slice = new_mirror_slice(ep, &ports, key.0, name.clone(), controller);
        if let Some(first) = ex.first() {
            slice.metadata.resource_version = first.metadata.resource_version.clone();
            slice.metadata.uid = first.metadata.uid.clone();
        }
        let list = slice.endpoints.get_or_insert_with(Vec::new);
        while list.len() < max_per_subset {
            let Some((_, e)) = set.pop_first() else { break };
            list.push(e);
        }
        if name.is_some() {
            out.update.push(slice);
        } else {
            out.create.push(slice);
        }
    }
    for (_, ex) in existing_by_key {
        out.delete.extend(ex.into_iter().cloned());
    }
    // Recycle: a delete plus a create of the same address type becomes one update.
    let mut i = 0;
    while i < out.delete.len() {
        let at = out.delete[i].address_type.clone();
        if let Some(pos) = out.create.iter().position(|c| c.address_type == at) {
            let old = out.delete.remove(i);
            let mut c = out.create.remove(pos);
            c.metadata.name = old.metadata.name.clone();
            c.metadata.generate_name = None;
            c.metadata.resource_version = old.metadata.resource_version.clone();
            c.metadata.uid = old.metadata.uid.clone();
            out.update.push(c);
        } else {
            i += 1;
        }
    }
    let _ = BTreeSet::<()>::new();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::EndpointPort as CorePort;

    fn endpoints(addrs: &[&str], not_ready: &[&str]) -> Endpoints {
        let mk = |ips: &[&str]| {
            Some(
                ips.iter()
                    .map(|ip| EndpointAddress {
                        ip: ip.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        Endpoints {
            metadata: ObjectMeta {
                name: Some("ext".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                labels: Some(
                    [("team".to_string(), "a".to_string())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            subsets: Some(vec![EndpointSubset {
                addresses: mk(addrs),
                not_ready_addresses: mk(not_ready),
                ports: Some(vec![CorePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
        }
    }

    fn apply(existing: &mut Vec<EndpointSlice>, p: MirrorPlan) {
        let del: BTreeSet<_> = p
            .delete
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        existing.retain(|s| !del.contains(s.metadata.name.as_deref().unwrap_or("")));
        for u in p.update {
            if let Some(s) = existing
                .iter_mut()
                .find(|s| s.metadata.name == u.metadata.name)
            {
                *s = u;
            }
        }
        for (i, mut c) in p.create.into_iter().enumerate() {
            c.metadata.name = Some(format!("gen-{}-{i}", existing.len()));
            existing.push(c);
        }
    }

    #[test]
    fn mirrors_per_family_with_labels_and_is_stable() {
        let ep = endpoints(&["10.0.0.1", "fd00::1", "bogus"], &["10.0.0.2"]);
        let p = plan(&ep, &[], 1000, MIRRORING_CONTROLLER_NAME);
        assert_eq!(p.create.len(), 2);
        assert_eq!(p.invalid_addresses, 1);
        let v4 = p
            .create
            .iter()
            .find(|s| s.address_type == "IPv4")
            .cloned()
            .unwrap_or_default();
        let l = labels_of(&v4.metadata.labels);
        assert_eq!(l.get(LABEL_SERVICE_NAME).map(String::as_str), Some("ext"));
        assert_eq!(l.get("team").map(String::as_str), Some("a"));
        let eps = v4.endpoints.unwrap_or_default();
        assert_eq!(eps.len(), 2);
        assert!(
            eps.iter()
                .any(|e| e.addresses == vec!["10.0.0.2".to_string()]
                    && e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
        );
        let mut existing = Vec::new();
        apply(&mut existing, p);
        let again = plan(&ep, &existing, 1000, MIRRORING_CONTROLLER_NAME);
        assert_eq!(again.writes(), 0, "{again:?}");
    }

    #[test]
    fn caps_addresses_per_subset() {
        let ips: Vec<String> = (0..1200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let ep = endpoints(&refs, &[]);
        let p = plan(&ep, &[], 1000, MIRRORING_CONTROLLER_NAME);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].endpoints.as_ref().map_or(0, Vec::len), 1000);
        assert_eq!(p.skipped_addresses, 200);
        assert_eq!(p.invalid_addresses, 0);
    }

    #[test]
    fn skip_rules() {
        let mut ep = endpoints(&["10.0.0.1"], &[]);
        assert!(should_mirror(&ep));
        ep.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(LABEL_SKIP_MIRROR.into(), "true".into());
        assert!(!should_mirror(&ep));
        let mut ep2 = endpoints(&["10.0.0.1"], &[]);
        ep2.metadata.annotations = Some(
            [(LEADER_ANNOTATION.to_string(), "{}".to_string())]
                .into_iter()
                .collect(),
        );
        assert!(!should_mirror(&ep2));
    }

    #[test]
    fn emptied_endpoints_delete_slices() {
        let ep = endpoints(&["10.0.0.1"], &[]);
        let mut existing = Vec::new();
        apply(
            &mut existing,
            plan(&ep, &[], 1000, MIRRORING_CONTROLLER_NAME),
        );
        let empty = Endpoints {
            subsets: None,
            ..ep
        };
        let p = plan(&empty, &existing, 1000, MIRRORING_CONTROLLER_NAME);
        assert_eq!(p.delete.len(), 1);
        assert!(p.create.is_empty() && p.update.is_empty());
    }

    #[test]
    fn repack_merges_same_address_sets() {
        let a = |ip: &str| EndpointAddress {
            ip: ip.into(),
            ..Default::default()
        };
        let port = |n: i32| CorePort {
            port: n,
            ..Default::default()
        };
        let subsets = vec![
            EndpointSubset {
                addresses: Some(vec![a("1.1.1.1")]),
                ports: Some(vec![port(80)]),
                ..Default::default()
            },
            EndpointSubset {
                addresses: Some(vec![a("1.1.1.1")]),
                ports: Some(vec![port(443)]),
                ..Default::default()
            },
        ];
        let r = repack_subsets(&subsets);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ports.as_ref().map_or(0, Vec::len), 2);
    }
}

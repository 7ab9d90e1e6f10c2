//! EndpointSlices as the process keeps them between syncs. k8s-openapi's `Endpoint` costs
//! about 460 bytes per endpoint (its `ObjectReference` alone is seven optional strings), and at
//! the scalability envelope the slices' endpoints were the largest thing we held. A record keeps
//! each endpoint the way our controller writes it (one address, a Pod in the slice's own
//! namespace) in a fraction of that, and any other endpoint as it came. A sync reads the slices
//! of one Service back as `EndpointSlice`s ([`SliceRecord::to_slice`]), equal to what arrived:
//! an endpoint is only kept compact when expanding it gives back the very same value.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::EndpointPort;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use scm_runtime::informer::{Informer, Informers, trim};

use crate::pod::Interner;

/// Node and zone names, shared between endpoints (a Node's name appears once per endpoint on
/// it).
static NAMES: LazyLock<Interner<str>> = LazyLock::new(Default::default);

/// One EndpointSlice, its endpoints compacted (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRecord {
    /// `metadata`, trimmed as the informer trims every object.
    pub metadata: ObjectMeta,
    /// `addressType`.
    pub address_type: String,
    /// `ports`.
    pub ports: Option<Vec<EndpointPort>>,
    endpoints: Option<Box<[Ep]>>,
}

#[derive(Clone, Debug, PartialEq)]
enum Ep {
    Compact(Compact),
    Full(Box<Endpoint>),
}

/// An endpoint with one address whose target, if any, is a Pod in the slice's namespace.
#[derive(Clone, Debug, PartialEq)]
struct Compact {
    address: IpAddr,
    conditions: Option<EndpointConditions>,
    node: Option<Arc<str>>,
    zone: Option<Arc<str>>,
    hostname: Option<Box<str>>,
    hints: Option<Box<EndpointHints>>,
    pod: Option<PodRef>,
}

/// `targetRef` of kind Pod: its name, and its uid as 16 bytes instead of 36 characters.
#[derive(Clone, Debug, PartialEq)]
struct PodRef {
    name: Box<str>,
    uid: Option<[u8; 16]>,
}

/// Anything readable as slice metadata: the tracker and cache read only that, from records
/// (the informer's) and from `EndpointSlice`s (our writes' responses) alike.
pub trait SliceMeta {
    /// The slice's metadata.
    fn meta(&self) -> &ObjectMeta;
}

impl SliceMeta for EndpointSlice {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl SliceMeta for SliceRecord {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl<T: SliceMeta> SliceMeta for Arc<T> {
    fn meta(&self) -> &ObjectMeta {
        (**self).meta()
    }
}

impl<T: SliceMeta> SliceMeta for &T {
    fn meta(&self) -> &ObjectMeta {
        (**self).meta()
    }
}

impl SliceRecord {
    /// The record of a slice, trimmed as [`trim::endpoint_slice`] trims it.
    pub fn from_slice(s: EndpointSlice) -> Self {
        let s = trim::endpoint_slice(s);
        let ns = s.metadata.namespace.as_deref().unwrap_or_default();
        let endpoints = s.endpoints.map(|eps| {
            eps.into_iter()
                .map(|e| match Compact::of(&e, ns) {
                    Some(c) if c.expand(ns) == e => Ep::Compact(c),
                    _ => Ep::Full(Box::new(e)),
                })
                .collect()
        });
        SliceRecord {
            metadata: s.metadata,
            address_type: s.address_type,
            ports: s.ports,
            endpoints,
        }
    }

    /// The slice as the API server returned it (less what the informer trims).
    pub fn to_slice(&self) -> EndpointSlice {
        let ns = self.metadata.namespace.as_deref().unwrap_or_default();
        EndpointSlice {
            metadata: self.metadata.clone(),
            address_type: self.address_type.clone(),
            ports: self.ports.clone(),
            endpoints: self.endpoints.as_ref().map(|eps| {
                eps.iter()
                    .map(|e| match e {
                        Ep::Compact(c) => c.expand(ns),
                        Ep::Full(e) => (**e).clone(),
                    })
                    .collect()
            }),
        }
    }

    /// How many endpoints the slice holds.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.as_ref().map_or(0, |e| e.len())
    }

    /// How many endpoints are kept as they came (not compacted); for tests and the footprint
    /// benchmark.
    pub fn full_count(&self) -> usize {
        self.endpoints.as_ref().map_or(0, |eps| {
            eps.iter().filter(|e| matches!(e, Ep::Full(_))).count()
        })
    }

    /// The informer's key function.
    pub fn key_ref(&self) -> (&str, &str) {
        (
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

impl Compact {
    /// The compact form of `e`, if it has the shape our controller writes; the caller checks
    /// that it expands back to `e`.
    fn of(e: &Endpoint, ns: &str) -> Option<Compact> {
        let [address] = e.addresses.as_slice() else {
            return None;
        };
        if e.deprecated_topology.is_some() {
            return None;
        }
        let pod = match &e.target_ref {
            None => None,
            Some(r) => {
                let pod_here = r.kind.as_deref() == Some("Pod")
                    && r.namespace.as_deref() == Some(ns)
                    && r.api_version.is_none()
                    && r.field_path.is_none()
                    && r.resource_version.is_none();
                if !pod_here {
                    return None;
                }
                Some(PodRef {
                    name: r.name.as_deref()?.into(),
                    uid: match &r.uid {
                        None => None,
                        Some(u) => Some(parse_uid(u)?),
                    },
                })
            }
        };
        Some(Compact {
            address: address.parse().ok()?,
            conditions: e.conditions.clone(),
            node: e.node_name.as_deref().map(|n| NAMES.intern(n)),
            zone: e.zone.as_deref().map(|z| NAMES.intern(z)),
            hostname: e.hostname.as_deref().map(Into::into),
            hints: e.hints.clone().map(Box::new),
            pod,
        })
    }

    fn expand(&self, ns: &str) -> Endpoint {
        Endpoint {
            addresses: vec![self.address.to_string()],
            conditions: self.conditions.clone(),
            deprecated_topology: None,
            hints: self.hints.as_deref().cloned(),
            hostname: self.hostname.as_deref().map(Into::into),
            node_name: self.node.as_deref().map(Into::into),
            target_ref: self.pod.as_ref().map(|p| ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(ns.into()),
                name: Some(p.name.to_string()),
                uid: p.uid.as_ref().map(format_uid),
                ..Default::default()
            }),
            zone: self.zone.as_deref().map(Into::into),
        }
    }
}

/// A UUID in its 36-character form, as 16 bytes (None for anything else).
fn parse_uid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut hex = b.iter().filter(|&&c| c != b'-');
    let mut out = [0u8; 16];
    for o in &mut out {
        let hi = (*hex.next()? as char).to_digit(16)?;
        let lo = (*hex.next()? as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The lower-case 36-character form of a UUID.
fn format_uid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// The process's EndpointSlice informer, as records. The EndpointSlice and mirroring
/// controllers both ask through here, so they ask with the same functions and share one watch.
pub fn endpoint_slices(informers: &Informers) -> Informer<SliceRecord> {
    informers.kind::<EndpointSlice, SliceRecord>(SliceRecord::from_slice, SliceRecord::key_ref)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::ForZone;
    use std::collections::BTreeMap;

    fn ours(i: usize) -> Endpoint {
        Endpoint {
            addresses: vec![format!("10.1.{}.{}", i / 256, i % 256)],
            conditions: Some(EndpointConditions {
                ready: Some(i.is_multiple_of(2)),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(format!("node-{}", i % 3)),
            zone: Some("zone-a".into()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("ns".into()),
                name: Some(format!("web-{i}")),
                uid: Some(format!("{i:08x}-0000-4000-8000-00000000abcd")),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("web-abc".into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                port: Some(80),
                ..Default::default()
            }]),
        }
    }

    #[test]
    fn our_endpoints_are_compacted_and_read_back_unchanged() {
        let s = slice((0..50).map(ours).collect());
        let r = SliceRecord::from_slice(s.clone());
        assert_eq!(r.endpoint_count(), 50);
        assert_eq!(r.full_count(), 0, "every endpoint has our shape");
        assert_eq!(r.to_slice(), s);
    }

    #[test]
    fn other_shapes_are_kept_as_they_came() {
        let mut odd = Vec::new();
        // Two addresses; a foreign namespace; a Service target; upper-case uid; non-canonical
        // IPv6; deprecated topology; a resourceVersion in the reference.
        let mut e = ours(1);
        e.addresses.push("10.9.9.9".into());
        odd.push(e);
        let mut e = ours(2);
        e.target_ref.as_mut().unwrap().namespace = Some("other".into());
        odd.push(e);
        let mut e = ours(3);
        e.target_ref.as_mut().unwrap().kind = Some("Service".into());
        odd.push(e);
        let mut e = ours(4);
        e.target_ref.as_mut().unwrap().uid = Some("0000000A-0000-4000-8000-00000000ABCD".into());
        odd.push(e);
        let mut e = ours(5);
        e.addresses = vec!["fd00:0:0:0::1".into()];
        odd.push(e);
        let mut e = ours(6);
        e.deprecated_topology = Some(BTreeMap::from([("a".into(), "b".into())]));
        odd.push(e);
        let mut e = ours(7);
        e.target_ref.as_mut().unwrap().resource_version = Some("12".into());
        odd.push(e);
        let n = odd.len();
        // Compactable ones beside them, with hints, a hostname, no target, no conditions.
        let mut e = ours(8);
        e.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone {
                name: "zone-a".into(),
            }]),
            ..Default::default()
        });
        e.hostname = Some("web-8".into());
        odd.push(e);
        let mut e = ours(9);
        e.target_ref = None;
        e.conditions = None;
        e.addresses = vec!["fd00::9".into()];
        odd.push(e);
        let s = slice(odd);
        let r = SliceRecord::from_slice(s.clone());
        assert_eq!(r.full_count(), n);
        assert_eq!(r.to_slice(), s);
    }

    #[test]
    fn slices_without_endpoints_keep_none_apart_from_empty() {
        let mut s = slice(vec![]);
        assert_eq!(SliceRecord::from_slice(s.clone()).to_slice(), s);
        s.endpoints = None;
        assert_eq!(SliceRecord::from_slice(s.clone()).to_slice(), s);
    }

    #[test]
    fn uids_round_trip_and_malformed_ones_are_refused() {
        let u = "0123abcd-4567-89ef-0123-456789abcdef";
        assert_eq!(format_uid(&parse_uid(u).unwrap()), u);
        assert_eq!(parse_uid("0123abcd-4567-89ef-0123-456789abcdeg"), None);
        assert_eq!(parse_uid("0123abcd045670089ef-0123-456789abcdef"), None);
        assert_eq!(parse_uid("short"), None);
    }
}

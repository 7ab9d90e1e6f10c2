//! IPAddress objects (`networking.k8s.io/v1`), the API server's ClusterIP state since
//! MultiCIDRServiceAllocator (GA in 1.33, the only allocator from 1.34): what upstream's IPAddress
//! repair loop (`repairip.go`) finds wrong between them and the Services, and how many each CIDR
//! holds. Pure: the objects and the Services in; findings (with the time each falls due) and counts out.
//!
//! Upstream checks two directions, and so do we:
//! - per Service ClusterIP (in range and otherwise valid): no IPAddress of that name
//!   (`ClusterIPNotAllocated`, "is not allocated"), or one whose parentRef is not a Service or
//!   names a Service that does not exist (`ClusterIPNotAllocated`, "has a wrong reference"); one
//!   naming another Service that holds the address is `ClusterIPAlreadyAllocated`, which the
//!   ledger reports (the IPAddress's Service is claimed first, so the other one is the duplicate);
//! - per IPAddress of the API server's allocator (label `ipaddress.kubernetes.io/managed-by:
//!   ipallocator.k8s.io`; others belong to other controllers and are left alone, as upstream
//!   leaves them): a parentRef that is not a Service (`IPAddressNotAllocated`), a Service that
//!   does not exist once the IPAddress is older than 60 s (`IPAddressNotAllocated`, "appears to
//!   have leaked"), or a Service that does not hold the address (`IPAddressWrongReference`; not
//!   before 60 s for an ExternalName Service, nor within 5 s of creation for an IPAddress newer
//!   than its Service, the windows in which upstream's create and update paths are still at
//!   work).
//!
//! Upstream repairs each of these (creates, deletes or recreates the IPAddress); we only report:
//! the API server's repair loop owns IPAddress objects.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{IPAddress, ParentReference};
use scm_allocator::IpFamily;
use scm_runtime::ObjectKey;

use super::{Finding, Ranges, service_type};

/// The label naming the controller that owns an IPAddress.
pub const LABEL_MANAGED_BY: &str = "ipaddress.kubernetes.io/managed-by";
/// The label with an IPAddress's family (`IPv4`, `IPv6`).
pub const LABEL_IP_FAMILY: &str = "ipaddress.kubernetes.io/ip-family";
/// kube-apiserver's ClusterIP allocator, as named in [`LABEL_MANAGED_BY`].
pub const ALLOCATOR: &str = "ipallocator.k8s.io";

/// Upstream's waiting times (`repairip.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grace {
    /// An IPAddress whose Service does not exist (or is ExternalName) is not reported before it
    /// is this old: kube-apiserver's request timeout, during which a create may still be under
    /// way. Upstream: 60 s.
    pub leaked: Duration,
    /// An IPAddress newer than its Service (an update being reverted) is not reported before it
    /// is this old. Upstream: 5 s.
    pub young: Duration,
}

impl Default for Grace {
    fn default() -> Self {
        Grace {
            leaked: Duration::from_secs(60),
            young: Duration::from_secs(5),
        }
    }
}

/// The IPAddress objects as observed. Time-dependent findings carry the time they fall due
/// (`not_before`), so building needs no clock.
pub struct IpAddresses<'a> {
    /// Every IPAddress object.
    pub objects: &'a [&'a IPAddress],
    /// Upstream's waiting times.
    pub grace: Grace,
    /// Both the IPAddress and the Service watch are current. While either is failing, the
    /// last-known IPAddresses still decide ownership and capacity, but no finding compares the
    /// two (a Service created during an IPAddress watch outage would look unallocated).
    pub current: bool,
}

/// Whether the API server's allocator owns this IPAddress.
pub fn managed(ip: &IPAddress) -> bool {
    label(ip, LABEL_MANAGED_BY) == Some(ALLOCATOR)
}

fn label<'a>(ip: &'a IPAddress, key: &str) -> Option<&'a str> {
    ip.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn parent(ip: &IPAddress) -> Option<&ParentReference> {
    Some(&ip.spec.parent_ref)
}

fn refers_to_services(r: &ParentReference) -> bool {
    r.group.as_deref().unwrap_or("").is_empty() && r.resource == "services"
}

fn parent_key(r: &ParentReference) -> ObjectKey {
    ObjectKey::new(r.namespace.as_deref().unwrap_or(""), r.name.as_str())
}

/// A Service's (namespace, name) without copying them: the index is rebuilt with the mirror.
type Named<'a> = (&'a str, &'a str);

fn named(r: &ParentReference) -> Named<'_> {
    (r.namespace.as_deref().unwrap_or(""), r.name.as_str())
}

fn name_of(s: &Service) -> Named<'_> {
    (
        s.metadata.namespace.as_deref().unwrap_or(""),
        s.metadata.name.as_deref().unwrap_or(""),
    )
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> SystemTime {
    meta.creation_timestamp
        .as_ref()
        .map(|t| SystemTime::from(t.0))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Go's `%v` of a `*ParentReference`, as upstream's message prints it.
fn go_ref(r: Option<&ParentReference>) -> String {
    match r {
        None => "<nil>".into(),
        Some(r) => format!(
            "&{{{} {} {} {}}}",
            r.group.as_deref().unwrap_or(""),
            r.resource,
            r.namespace.as_deref().unwrap_or(""),
            r.name
        ),
    }
}

/// The key IPAddress findings are filed under: cluster-scoped, so no namespace (a Service key
/// always has one).
pub fn key_of(ip: &IPAddress) -> ObjectKey {
    ObjectKey::new("", ip.metadata.name.as_deref().unwrap_or(""))
}

/// Whether a Service lists `name` among its ClusterIPs (upstream compares the strings).
fn holds(svc: &Service, name: &str) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ips.as_ref())
        .is_some_and(|ips| ips.iter().any(|c| c == name))
}

/// The IPAddresses by address, and the Services by key, for the checks.
pub struct Index<'a> {
    by_ip: HashMap<IpAddr, &'a IPAddress>,
    services: HashMap<Named<'a>, &'a Service>,
}

impl<'a> Index<'a> {
    /// Indexes `ips` (by the address their name spells) and `services`.
    pub fn new(ips: &IpAddresses<'a>, services: &[&'a Service]) -> Self {
        Index {
            by_ip: ips
                .objects
                .iter()
                .filter_map(|o| Some((o.metadata.name.as_deref()?.parse().ok()?, *o)))
                .collect(),
            services: services.iter().map(|s| (name_of(s), *s)).collect(),
        }
    }

    /// The Service each IPAddress of the allocator names, where that Service exists and holds
    /// the address: the API server's word on who holds it, claimed before any Service.
    pub fn owners(&self) -> Vec<(IpAddr, ObjectKey)> {
        let mut v: Vec<(IpAddr, ObjectKey)> = self
            .by_ip
            .iter()
            .filter(|(_, o)| managed(o))
            .filter_map(|(ip, o)| {
                let r = parent(o).filter(|r| refers_to_services(r))?;
                let svc = self.services.get(&named(r))?;
                holds(svc, o.metadata.name.as_deref()?).then_some((*ip, parent_key(r)))
            })
            .collect();
        v.sort();
        v
    }

    /// What upstream's Service loop says about `svc`'s valid, in-range ClusterIP `ip`.
    pub fn check_service(&self, svc: &Service, ip: IpAddr) -> Option<Finding> {
        let Some(obj) = self.by_ip.get(&ip) else {
            return Some(Finding::NotAllocated { ip });
        };
        let r = parent(obj)?;
        let wrong = || {
            Some(Finding::BadReference {
                ip,
                service: ObjectKey::of(svc),
            })
        };
        if !refers_to_services(r) {
            return wrong();
        }
        let other = named(r);
        if other != name_of(svc) && !self.services.contains_key(&other) {
            return wrong();
        }
        // Named another existing Service: a duplicate (the ledger's finding) or nothing here.
        None
    }

    /// What upstream's IPAddress loop says about one IPAddress of the allocator.
    pub fn check_ip(&self, obj: &IPAddress, grace: Grace) -> Option<Finding> {
        if !managed(obj) {
            return None;
        }
        let name = obj.metadata.name.clone().unwrap_or_default();
        let r = parent(obj).filter(|r| refers_to_services(r));
        let Some(r) = r else {
            return Some(Finding::IpNotAService {
                name,
                parent: go_ref(parent(obj)),
            });
        };
        let born = created(&obj.metadata);
        let service = parent_key(r);
        let Some(svc) = self.services.get(&named(r)) else {
            return Some(Finding::IpLeaked {
                name,
                service,
                not_before: born + grace.leaked,
            });
        };
        if holds(svc, &name) {
            return None;
        }
        let mut not_before = born;
        if service_type(svc) == "ExternalName" {
            not_before = not_before.max(born + grace.leaked);
        }
        if born > created(&svc.metadata) {
            not_before = not_before.max(born + grace.young);
        }
        Some(Finding::IpWrongReference {
            name,
            service,
            not_before,
        })
    }
}

/// Per range of `ranges` (in its order), the IPAddresses of the allocator of that range's
/// family whose address it contains, as kube-apiserver's gauges count them (a CIDR inside
/// another counts its addresses in both).
pub fn count(ranges: &Ranges, ips: &IpAddresses<'_>) -> Vec<usize> {
    ranges
        .ranges
        .iter()
        .map(|r| {
            let fam = r.alloc.family();
            ips.objects
                .iter()
                .filter(|o| managed(o) && label(o, LABEL_IP_FAMILY) == Some(fam.as_k8s()))
                .filter_map(|o| o.metadata.name.as_deref()?.parse::<IpAddr>().ok())
                .filter(|ip| IpFamily::of(ip) == fam && r.spec.cidr.contains(ip))
                .count()
        })
        .collect()
}

/// Whether the API server keeps its allocations as IPAddress objects: at least one of them is
/// its allocator's (a v1.37 API server always has one, `default/kubernetes`'s). Otherwise the
/// ledger built from Services is the only state (an API server that does not allocate).
pub fn active(ips: &IpAddresses<'_>) -> bool {
    ips.objects.iter().any(|o| managed(o))
}

#[cfg(test)]
#[path = "ipaddr_tests.rs"]
mod tests;

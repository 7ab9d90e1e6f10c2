//! Facts shared by the three controllers: well-known labels, how a pod is judged (ready,
//! terminal, its IPs per family), how a Service port resolves against a pod, and the canonical
//! key of an endpoint and of a port set.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};

pub use crate::pod::{NamedPort, PodRecord, PodView};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `kubernetes.io/service-name`: the Service a slice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `endpointslice.kubernetes.io/managed-by`: which controller owns a slice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// `service.kubernetes.io/headless`: set (empty value) on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// `endpointslice.kubernetes.io/skip-mirror`: "true" stops mirroring of an Endpoints object.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// `topology.kubernetes.io/zone` on Nodes.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Our managed-by value for EndpointSlices. Distinct from upstream's so that both controllers
/// can run side by side (each ignores the other's slices) and takeover is an explicit act.
pub const CONTROLLER_NAME: &str = "endpointslice.service-controller-manager.k8s.io";
/// kube-controller-manager's managed-by value; slices carrying it are foreign unless taken over.
pub const UPSTREAM_CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
/// Our managed-by value for mirrored slices.
pub const MIRRORING_CONTROLLER_NAME: &str =
    "endpointslicemirroring.service-controller-manager.k8s.io";
/// kube-controller-manager's mirroring controller's managed-by value.
pub const UPSTREAM_MIRRORING_CONTROLLER_NAME: &str = "endpointslicemirroring-controller.k8s.io";

/// The two EndpointSlice address types we produce (FQDN is never generated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressType {
    /// `IPv4`.
    IPv4,
    /// `IPv6`.
    IPv6,
}

impl AddressType {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
        }
    }

    /// Parses the API spelling (FQDN and unknown values give `None`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(AddressType::IPv4),
            "IPv6" => Some(AddressType::IPv6),
            _ => None,
        }
    }

    /// Whether `ip` belongs to this family.
    pub fn matches(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (AddressType::IPv4, IpAddr::V4(_)) | (AddressType::IPv6, IpAddr::V6(_))
        )
    }
}

/// Parses an IP leniently, as Go's `ParseIPSloppy` (leading zeros in IPv4 octets accepted),
/// and gives its canonical text.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // Legacy IPv4 with leading zeros ("010.001.002.003") is read as decimal, as Go does.
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        octets[i] = p.parse().ok()?;
    }
    Some(IpAddr::from(octets))
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready<P: PodView + ?Sized>(pod: &P) -> bool {
    pod.ready()
}

/// Whether the pod has finished for good (Succeeded or Failed).
pub fn pod_terminal<P: PodView + ?Sized>(pod: &P) -> bool {
    pod.terminal()
}

/// Whether the pod is being deleted.
pub fn pod_terminating<P: PodView + ?Sized>(pod: &P) -> bool {
    pod.deleting()
}

/// Upstream's `ShouldPodBeInEndpoints`: not terminal, has an IP, and (unless terminating pods
/// are wanted) not being deleted.
pub fn pod_in_endpoints<P: PodView + ?Sized>(pod: &P, include_terminating: bool) -> bool {
    if pod_terminal(pod) {
        return false;
    }
    let has_ip = pod.pod_ip().is_some_and(|s| !s.is_empty()) || pod.pod_ips().next().is_some();
    if !has_ip {
        return false;
    }
    include_terminating || !pod_terminating(pod)
}

/// The pod's IPs (from `status.podIPs`) of one family, canonicalised.
pub fn pod_ips_of<P: PodView + ?Sized>(pod: &P, family: AddressType) -> Vec<String> {
    pod.pod_ips()
        .filter_map(parse_ip_sloppy)
        .filter(|ip| family.matches(ip))
        .map(|ip| ip.to_string())
        .collect()
}

/// Whether the Service has a cluster IP (not headless).
pub fn service_ip_set(svc: &Service) -> bool {
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .unwrap_or("");
    !ip.is_empty() && ip != "None"
}

/// Whether the Service is headless (`clusterIP: None`).
pub fn service_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Upstream's `ShouldSetHostname`: the pod names itself under this Service's subdomain.
/// (Upstream sets it whether or not the Service is headless; so do we.)
pub fn should_set_hostname<P: PodView + ?Sized>(pod: &P, svc: &Service) -> bool {
    let hostname = pod.hostname().unwrap_or("");
    let subdomain = pod.subdomain().unwrap_or("");
    !hostname.is_empty()
        && svc.metadata.name.as_deref() == Some(subdomain)
        && svc.metadata.namespace.as_deref() == pod.namespace()
}

fn protocol_of(p: Option<&String>) -> &str {
    p.map(String::as_str).unwrap_or("TCP")
}

/// Resolves a Service port's targetPort against a pod, as upstream's `FindPort`: a number is
/// taken as is; a name is looked up in the containers' ports with the same protocol, then in
/// restartable (sidecar) init containers. `None` when a name matches nothing.
pub fn find_port<P: PodView + ?Sized>(pod: &P, sp: &ServicePort) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            // The API server turns a numeric string into an int; be as lenient for safety.
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            pod.named_port(name, protocol_of(sp.protocol.as_ref()))
        }
    }
}

/// Canonical key of an endpoint port (None name/protocol read as the API defaults them).
pub type PortKey = (String, i32, String, Option<String>);

/// The key of one port.
pub fn port_key(p: &EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port.unwrap_or(0),
        protocol_of(p.protocol.as_ref()).to_string(),
        p.app_protocol.clone(),
    )
}

/// Sorts ports into our canonical order (upstream sorts by a hash; only the set matters).
pub fn sort_ports(ports: &mut [EndpointPort]) {
    ports.sort_by_key(port_key);
}

/// The key of a port set: what decides which slices an endpoint may share.
pub fn port_map_key(ports: &[EndpointPort]) -> Vec<PortKey> {
    let mut k: Vec<PortKey> = ports.iter().map(port_key).collect();
    k.sort();
    k
}

/// The identity of an endpoint, as upstream's endpoint hash: addresses, hostname and the
/// target's namespace/name. Two endpoints with the same key are "the same endpoint", possibly
/// in a different state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    addresses: Vec<String>,
    hostname: String,
    namespace: String,
    name: String,
}

/// The key of an endpoint.
pub fn endpoint_key(ep: &Endpoint) -> EndpointKey {
    let mut addresses = ep.addresses.clone();
    addresses.sort();
    let (namespace, name) = ep
        .target_ref
        .as_ref()
        .map(|r| {
            (
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    EndpointKey {
        addresses,
        hostname: ep.hostname.clone().unwrap_or_default(),
        namespace,
        name,
    }
}

/// Upstream's `EndpointsEqualBeyondHash`: node, zone, conditions and target (ignoring its
/// resourceVersion). Hints are deliberately not compared here; they are reconciled separately.
pub fn endpoints_equal_beyond_hash(a: &Endpoint, b: &Endpoint) -> bool {
    let ca = a.conditions.clone().unwrap_or_default();
    let cb = b.conditions.clone().unwrap_or_default();
    let strip = |r: &Option<k8s_openapi::api::core::v1::ObjectReference>| {
        r.clone().map(|mut r| {
            r.resource_version = None;
            r
        })
    };
    a.node_name == b.node_name
        && a.zone == b.zone
        && ca.ready == cb.ready
        && ca.serving == cb.serving
        && ca.terminating == cb.terminating
        && strip(&a.target_ref) == strip(&b.target_ref)
}

/// The controller owner reference a Service (or Endpoints) gives the slices made for it.
pub fn controller_ref(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Upstream's slice name prefix: `<service>-` (the name itself if that would be invalid).
pub fn slice_prefix(name: &str) -> String {
    // A DNS subdomain is at most 253 characters; generateName leaves room for the suffix.
    if name.len() < 253 {
        format!("{name}-")
    } else {
        name.to_string()
    }
}

/// A label map from an optional one.
pub fn labels_of(l: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    l.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};

    fn pod_with_ports(ports: Vec<ContainerPort>, sidecar: Vec<ContainerPort>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "a".into(),
                    ports: Some(ports),
                    ..Default::default()
                }],
                init_containers: Some(vec![Container {
                    name: "side".into(),
                    restart_policy: Some("Always".into()),
                    ports: Some(sidecar),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn cp(name: &str, port: i32, proto: &str) -> ContainerPort {
        ContainerPort {
            name: Some(name.into()),
            container_port: port,
            protocol: Some(proto.into()),
            ..Default::default()
        }
    }

    #[test]
    fn named_port_needs_matching_protocol_and_falls_back_to_sidecars() {
        let pod = pod_with_ports(vec![cp("http", 8080, "UDP")], vec![cp("http", 9090, "TCP")]);
        let sp = ServicePort {
            port: 80,
            target_port: Some(IntOrString::String("http".into())),
            protocol: Some("TCP".into()),
            ..Default::default()
        };
        assert_eq!(find_port(&pod, &sp), Some(9090));
        let udp = ServicePort {
            protocol: Some("UDP".into()),
            ..sp.clone()
        };
        assert_eq!(find_port(&pod, &udp), Some(8080));
        let missing = ServicePort {
            target_port: Some(IntOrString::String("nope".into())),
            ..sp
        };
        assert_eq!(find_port(&pod, &missing), None);
    }

    #[test]
    fn sloppy_ipv4_with_leading_zeros_is_canonicalised() {
        assert_eq!(
            parse_ip_sloppy("010.001.002.003").map(|i| i.to_string()),
            Some("10.1.2.3".into())
        );
        assert_eq!(
            parse_ip_sloppy("::1").map(|i| i.to_string()),
            Some("::1".into())
        );
        assert!(parse_ip_sloppy("not-an-ip").is_none());
    }
}

//! The desired NLB for a Service, computed purely from the Service, its nodes and the cluster
//! name: names, tags, listeners, target groups, health checks, attributes. Invalid annotations
//! become [`ProviderError::Permanent`] before any API call.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service};
use sha2::{Digest, Sha256};

use crate::core::parse_go_bool;
use crate::provider::ProviderError;

/// Annotation prefix shared by cloud-provider-aws and the AWS Load Balancer Controller.
pub const ANN: &str = "service.beta.kubernetes.io/aws-load-balancer-";
/// Tag proving which cluster owns a resource (cloud-provider-aws's key; value `owned`).
pub fn cluster_tag_key(cluster: &str) -> String {
    format!("kubernetes.io/cluster/{cluster}")
}
/// Tag naming the owning Service as `namespace/name` (cloud-provider-aws's key).
pub const SERVICE_TAG: &str = "kubernetes.io/service-name";
/// ELBv2's limit on load balancer and target group names.
pub const MAX_NAME: usize = 32;

/// Load balancer scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Public addresses.
    InternetFacing,
    /// Private addresses only.
    Internal,
}

impl Scheme {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::InternetFacing => "internet-facing",
            Scheme::Internal => "internal",
        }
    }
}

/// A target group's health check, as ELBv2 stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// TCP, HTTP or HTTPS.
    pub protocol: String,
    /// `traffic-port` or a port number.
    pub port: String,
    /// Path for HTTP(S) checks.
    pub path: Option<String>,
    /// Seconds between checks.
    pub interval: i32,
    /// Seconds before a check fails.
    pub timeout: i32,
    /// Successes before healthy.
    pub healthy: i32,
    /// Failures before unhealthy.
    pub unhealthy: i32,
}

/// One target group (one per Service port, or per TCP+UDP pair on one port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTargetGroup {
    /// Deterministic name (includes the node port, so a changed NodePort means a new group).
    pub name: String,
    /// TCP, UDP or TCP_UDP.
    pub protocol: String,
    /// The NodePort targets are registered on.
    pub node_port: i32,
    /// Health check settings.
    pub health: HealthCheck,
    /// Target group attributes from the annotation (only these keys are managed).
    pub attributes: BTreeMap<String, String>,
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredListener {
    /// Front-end port.
    pub port: i32,
    /// TCP, UDP or TCP_UDP.
    pub protocol: String,
    /// Name of the target group it forwards to.
    pub target_group: String,
}

/// Everything the provider wants to exist for one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredLb {
    /// Load balancer name.
    pub name: String,
    /// Scheme.
    pub scheme: Scheme,
    /// Subnet IDs or `Name` tags from the annotation or the cloud config; empty means
    /// discover them in the VPC (only used at creation: we do not manage SetSubnets).
    pub subnets: Vec<String>,
    /// `ipv4` or `dualstack`.
    pub ip_address_type: String,
    /// Load balancer attributes we manage (only keys present here are compared).
    pub lb_attributes: BTreeMap<String, String>,
    /// Tags on every resource (ownership tags plus additional resource tags).
    pub tags: BTreeMap<String, String>,
    /// Listeners, sorted by port.
    pub listeners: Vec<DesiredListener>,
    /// Target groups, sorted by name.
    pub target_groups: Vec<DesiredTargetGroup>,
    /// Client ranges allowed in: `spec.loadBalancerSourceRanges`, else the
    /// `service.beta.kubernetes.io/load-balancer-source-ranges` annotation, else everything.
    pub source_ranges: BTreeSet<ipnet::IpNet>,
}

/// Defaults the provider applies when the Service does not say.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    /// Subnets when the Service has no subnets annotation.
    pub subnets: Vec<String>,
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        // A separator that cannot occur in Kubernetes names keeps ("ab","c") and ("a","bc")
        // apart.
        h.update([0u8]);
    }
    hex::encode(h.finalize())[..10].to_string()
}

fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(max)
        .collect()
}

fn meta(svc: &Service) -> (&str, &str, &str) {
    (
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or(""),
        svc.metadata.uid.as_deref().unwrap_or(""),
    )
}

/// The load balancer's name: `k8s-<ns>-<name>-<hash>`, at most 32 characters, deterministic
/// for (cluster, namespace, name, uid). cloud-provider-aws uses `a` + the UID; we add a
/// readable prefix and the cluster so two clusters sharing an account never collide.
pub fn load_balancer_name(cluster: &str, svc: &Service) -> String {
    let (ns, name, uid) = meta(svc);
    format!(
        "k8s-{}-{}-{}",
        sanitize(ns, 8),
        sanitize(name, 8),
        short_hash(&["lb", cluster, ns, name, uid])
    )
}

/// A target group's name; the hash covers the port, protocol and node port (as
/// cloud-provider-aws does), so a NodePort change creates a new group instead of re-registering
/// ports in place.
pub fn target_group_name(
    cluster: &str,
    svc: &Service,
    port: i32,
    protocol: &str,
    node_port: i32,
) -> String {
    let (ns, name, uid) = meta(svc);
    format!(
        "k8s-{}-{}-{}",
        sanitize(ns, 8),
        sanitize(name, 8),
        short_hash(&[
            "tg",
            cluster,
            ns,
            name,
            uid,
            &port.to_string(),
            protocol,
            &node_port.to_string()
        ])
    )
}

/// Every target group name `svc` may have used, whatever its annotations say (for cleanup):
/// each port's own protocol and the merged `TCP_UDP` form.
pub fn target_group_names(cluster: &str, svc: &Service) -> Vec<String> {
    let mut out = BTreeSet::new();
    for p in svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        let np = p.node_port.unwrap_or(0);
        if np == 0 {
            continue;
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        out.insert(target_group_name(cluster, svc, p.port, proto, np));
        out.insert(target_group_name(cluster, svc, p.port, "TCP_UDP", np));
    }
    out.into_iter().collect()
}

/// The instance ID in an AWS `spec.providerID` (`aws:///us-east-1a/i-0abc...`), if any.
pub fn instance_id(node: &Node) -> Option<String> {
    let pid = node.spec.as_ref()?.provider_id.as_deref()?;
    let rest = pid.strip_prefix("aws://")?;
    let last = rest.rsplit('/').next()?;
    (last.starts_with("i-") && last.len() > 2).then(|| last.to_string())
}

/// Instance IDs of `nodes`, sorted and deduplicated; nodes without an AWS providerID are
/// skipped (they cannot be targets).
pub fn instance_ids(nodes: &[Node]) -> BTreeSet<String> {
    nodes.iter().filter_map(instance_id).collect()
}

fn ann<'a>(svc: &'a Service, suffix: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(&format!("{ANN}{suffix}"))
        .map(|s| s.trim())
}

fn bad(suffix: &str, value: &str, why: &str) -> ProviderError {
    ProviderError::permanent(format!(
        "annotation {ANN}{suffix}={value:?} is invalid: {why}"
    ))
}

fn int_ann(svc: &Service, suffix: &str, lo: i32, hi: i32) -> Result<Option<i32>, ProviderError> {
    match ann(svc, suffix) {
        None => Ok(None),
        Some(v) => match v.parse::<i32>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(bad(
                suffix,
                v,
                &format!("expected an integer from {lo} to {hi}"),
            )),
        },
    }
}

/// Parses `k1=v1,k2=v2,k3` (a missing `=` means an empty value, as cloud-provider-aws reads
/// additional resource tags).
fn key_values(
    suffix: &str,
    v: &str,
    allow_empty_value: bool,
) -> Result<BTreeMap<String, String>, ProviderError> {
    let mut out = BTreeMap::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = match item.split_once('=') {
            Some((k, val)) => (k.trim(), val.trim()),
            None if allow_empty_value => (item, ""),
            None => return Err(bad(suffix, v, &format!("{item:?} is not key=value"))),
        };
        if k.is_empty() {
            return Err(bad(suffix, v, "empty key"));
        }
        out.insert(k.to_string(), val.to_string());
    }
    Ok(out)
}

fn scheme(svc: &Service) -> Result<Scheme, ProviderError> {
    if let Some(v) = ann(svc, "scheme") {
        return match v {
            "internal" => Ok(Scheme::Internal),
            "internet-facing" => Ok(Scheme::InternetFacing),
            _ => Err(bad("scheme", v, "expected internal or internet-facing")),
        };
    }
    // cloud-provider-aws: any value other than "false" (including a CIDR such as 0.0.0.0/0)
    // asks for an internal load balancer.
    match ann(svc, "internal") {
        Some("false") | None => Ok(Scheme::InternetFacing),
        Some(_) => Ok(Scheme::Internal),
    }
}

fn health_check(svc: &Service) -> Result<HealthCheck, ProviderError> {
    let spec = svc.spec.as_ref();
    let local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    // cloud-provider-aws's NLB defaults: TCP on the traffic port every 30 s (timeout 10,
    // thresholds 3); for externalTrafficPolicy Local an HTTP check of kube-proxy's
    // /healthz on healthCheckNodePort every 10 s (timeout 6, thresholds 2), so nodes
    // without local endpoints drop out.
    let mut hc = if local {
        let port = spec.and_then(|s| s.health_check_node_port).unwrap_or(0);
        if port == 0 {
            return Err(ProviderError::retryable(
                "externalTrafficPolicy is Local but healthCheckNodePort is not allocated yet",
            ));
        }
        HealthCheck {
            protocol: "HTTP".into(),
            port: port.to_string(),
            path: Some("/healthz".into()),
            interval: 10,
            timeout: 6,
            healthy: 2,
            unhealthy: 2,
        }
    } else {
        HealthCheck {
            protocol: "TCP".into(),
            port: "traffic-port".into(),
            path: None,
            interval: 30,
            timeout: 10,
            healthy: 3,
            unhealthy: 3,
        }
    };
    if let Some(v) = ann(svc, "healthcheck-protocol") {
        hc.protocol = match v.to_ascii_uppercase().as_str() {
            p @ ("TCP" | "HTTP" | "HTTPS") => p.to_string(),
            _ => {
                return Err(bad(
                    "healthcheck-protocol",
                    v,
                    "expected TCP, HTTP or HTTPS",
                ));
            }
        };
        if hc.protocol == "TCP" {
            hc.path = None;
        } else if hc.path.is_none() {
            hc.path = Some("/".into());
        }
    }
    if let Some(v) = ann(svc, "healthcheck-port") {
        hc.port = match v {
            "traffic-port" => v.to_string(),
            _ => match v.parse::<u16>() {
                Ok(p) if p > 0 => p.to_string(),
                _ => {
                    return Err(bad(
                        "healthcheck-port",
                        v,
                        "expected traffic-port or 1-65535",
                    ));
                }
            },
        };
    }
    if let Some(v) = ann(svc, "healthcheck-path") {
        if !v.starts_with('/') {
            return Err(bad("healthcheck-path", v, "must start with /"));
        }
        if hc.protocol == "TCP" {
            return Err(bad(
                "healthcheck-path",
                v,
                "a path needs healthcheck-protocol HTTP or HTTPS",
            ));
        }
        hc.path = Some(v.to_string());
    }
    if let Some(n) = int_ann(svc, "healthcheck-interval", 5, 300)? {
        hc.interval = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-timeout", 2, 120)? {
        hc.timeout = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-healthy-threshold", 2, 10)? {
        hc.healthy = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-unhealthy-threshold", 2, 10)? {
        hc.unhealthy = n;
    }
    if hc.timeout >= hc.interval {
        return Err(ProviderError::permanent(format!(
            "health check timeout {}s must be shorter than its interval {}s",
            hc.timeout, hc.interval
        )));
    }
    Ok(hc)
}

/// True for `aws-load-balancer-type: external`: the AWS Load Balancer Controller's Services,
/// which cloud-provider-aws also leaves alone (ImplementedElsewhere).
pub fn is_external(svc: &Service) -> bool {
    ann(svc, "type") == Some("external")
}

/// The key of the generic source-ranges annotation, read when the spec field is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Client ranges as k8s.io/cloud-provider reads them: the spec field, else the annotation,
/// else 0.0.0.0/0; host bits are dropped (`10.0.0.1/8` means 10.0.0.0/8). Where we differ: a
/// dual-stack load balancer also gets ::/0 by default, since upstream's IPv4-only default
/// would shut its IPv6 clients out.
fn source_ranges(
    svc: &Service,
    ip_address_type: &str,
) -> Result<BTreeSet<ipnet::IpNet>, ProviderError> {
    let field: Vec<&str> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten()
        .map(|r| r.trim())
        .collect();
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let (origin, items): (&str, Vec<&str>) = if !field.is_empty() {
        ("spec.loadBalancerSourceRanges", field)
    } else if let Some(v) = annotation {
        (
            SOURCE_RANGES_ANNOTATION,
            v.split(',').map(str::trim).collect(),
        )
    } else if ip_address_type == "dualstack" {
        ("default", vec!["0.0.0.0/0", "::/0"])
    } else {
        ("default", vec!["0.0.0.0/0"])
    };
    let mut out = BTreeSet::new();
    for r in items {
        match r.parse::<ipnet::IpNet>() {
            Ok(n) => {
                out.insert(n.trunc());
            }
            Err(_) => {
                return Err(ProviderError::permanent(format!(
                    "{origin}: {r:?} is not a CIDR (for example 10.0.0.0/24)"
                )));
            }
        }
    }
    Ok(out)
}

/// Computes the desired load balancer for `svc`, or why the Service is invalid.
pub fn desired(
    cluster: &str,
    svc: &Service,
    defaults: &Defaults,
) -> Result<DesiredLb, ProviderError> {
    let (ns, name, _) = meta(svc);
    if let Some(v) = ann(svc, "type") {
        // cloud-provider-aws reads "nlb"; we only build NLBs, so a Service without the
        // annotation gets one too (cloud-provider-aws would make a Classic ELB, which ELBv2
        // cannot). "external" is the AWS Load Balancer Controller's (see is_external).
        if v != "nlb" {
            return Err(bad(
                "type",
                v,
                "only nlb is supported (external belongs to the AWS Load Balancer Controller)",
            ));
        }
    }
    if let Some(v) = ann(svc, "nlb-target-type")
        && v != "instance"
    {
        return Err(bad(
            "nlb-target-type",
            v,
            "only instance targets (node ports) are supported",
        ));
    }
    let scheme = scheme(svc)?;
    let subnets = match ann(svc, "subnets") {
        Some(v) => {
            let list: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if list.is_empty() {
                return Err(bad("subnets", v, "empty list"));
            }
            list
        }
        None => defaults.subnets.clone(),
    };
    let ip_address_type = match ann(svc, "ip-address-type") {
        None => "ipv4".to_string(),
        Some(v @ ("ipv4" | "dualstack")) => v.to_string(),
        Some(v) => return Err(bad("ip-address-type", v, "expected ipv4 or dualstack")),
    };
    let mut lb_attributes = BTreeMap::new();
    if let Some(v) = ann(svc, "cross-zone-load-balancing-enabled") {
        match parse_go_bool(v) {
            Some(b) => {
                lb_attributes.insert("load_balancing.cross_zone.enabled".into(), b.to_string());
            }
            None => {
                return Err(bad(
                    "cross-zone-load-balancing-enabled",
                    v,
                    "expected true or false",
                ));
            }
        }
    }
    let mut tags = BTreeMap::new();
    if let Some(v) = ann(svc, "additional-resource-tags") {
        let extra = key_values("additional-resource-tags", v, true)?;
        for k in extra.keys() {
            if k.starts_with("kubernetes.io/cluster/") || k == SERVICE_TAG || k.starts_with("aws:")
            {
                return Err(bad(
                    "additional-resource-tags",
                    v,
                    &format!("tag key {k:?} is reserved"),
                ));
            }
        }
        tags.extend(extra);
    }
    tags.insert(cluster_tag_key(cluster), "owned".into());
    tags.insert(SERVICE_TAG.into(), format!("{ns}/{name}"));
    let tg_attributes = match ann(svc, "target-group-attributes") {
        Some(v) => key_values("target-group-attributes", v, false)?,
        None => BTreeMap::new(),
    };
    let health = health_check(svc)?;
    let source_ranges = source_ranges(svc, &ip_address_type)?;

    // Group ports by front-end port: TCP and UDP on the same port become one TCP_UDP listener
    // (NLB cannot have two listeners on one port), which needs one node port for both.
    let mut by_port: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
    for p in svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        if proto != "TCP" && proto != "UDP" {
            return Err(ProviderError::permanent(format!(
                "port {}: protocol {proto} is not supported by a network load balancer",
                p.port
            )));
        }
        let np = p.node_port.unwrap_or(0);
        if np == 0 {
            if svc
                .spec
                .as_ref()
                .and_then(|s| s.allocate_load_balancer_node_ports)
                == Some(false)
            {
                return Err(ProviderError::permanent(
                    "allocateLoadBalancerNodePorts is false: instance targets need node ports",
                ));
            }
            return Err(ProviderError::retryable(format!(
                "port {}: node port not allocated yet",
                p.port
            )));
        }
        by_port.entry(p.port).or_default().push((proto, np));
    }
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    for (port, entries) in by_port {
        let (protocol, node_port) = match entries.as_slice() {
            [(proto, np)] => (proto.clone(), *np),
            [(a, na), (b, nb)] if a != b => {
                if na != nb {
                    return Err(ProviderError::permanent(format!(
                        "port {port}: TCP and UDP share one listener (TCP_UDP) and need the same nodePort, got {na} and {nb}"
                    )));
                }
                ("TCP_UDP".to_string(), *na)
            }
            _ => {
                return Err(ProviderError::permanent(format!(
                    "port {port} is listed more than once with the same protocol"
                )));
            }
        };
        let tg = target_group_name(cluster, svc, port, &protocol, node_port);
        listeners.push(DesiredListener {
            port,
            protocol: protocol.clone(),
            target_group: tg.clone(),
        });
        target_groups.push(DesiredTargetGroup {
            name: tg,
            protocol,
            node_port,
            health: health.clone(),
            attributes: tg_attributes.clone(),
        });
    }
    if listeners.is_empty() {
        return Err(ProviderError::permanent("the Service has no ports"));
    }
    target_groups.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DesiredLb {
        name: load_balancer_name(cluster, svc),
        scheme,
        subnets,
        ip_address_type,
        lb_attributes,
        tags,
        listeners,
        target_groups,
        source_ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

    fn svc(ann: &[(&str, &str)], ports: &[(i32, &str, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("0f1c-uid".into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (format!("{ANN}{k}"), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, proto, np)| ServicePort {
                            port: *p,
                            protocol: Some(proto.to_string()),
                            node_port: Some(*np),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn defaults() -> Defaults {
        Defaults {
            subnets: vec!["subnet-1".into()],
        }
    }

    #[test]
    fn names_fit_and_are_deterministic() {
        let s = svc(&[], &[(80, "TCP", 30080)]);
        let a = load_balancer_name("c1", &s);
        assert_eq!(a, load_balancer_name("c1", &s));
        assert_ne!(a, load_balancer_name("c2", &s));
        assert!(a.len() <= MAX_NAME, "{a}");
        let t1 = target_group_name("c1", &s, 80, "TCP", 30080);
        let t2 = target_group_name("c1", &s, 80, "TCP", 30081);
        assert_ne!(t1, t2, "a node port change must give a new target group");
        assert!(!a.starts_with("internal-"));
    }

    proptest! {
        #[test]
        fn names_always_valid(ns in "[a-z0-9-]{1,63}", name in "[a-z0-9-]{1,63}", cluster in "\\PC{0,40}") {
            let mut s = svc(&[], &[(80, "TCP", 30080)]);
            s.metadata.namespace = Some(ns);
            s.metadata.name = Some(name);
            for n in [load_balancer_name(&cluster, &s), target_group_name(&cluster, &s, 65535, "TCP_UDP", 32767)] {
                prop_assert!(n.len() <= MAX_NAME);
                prop_assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
                prop_assert!(!n.starts_with('-') && !n.ends_with('-'));
            }
        }
    }

    #[test]
    fn tcp_udp_on_one_port_merges() {
        let s = svc(
            &[],
            &[(53, "TCP", 30053), (53, "UDP", 30053), (80, "TCP", 30080)],
        );
        let d = desired("c", &s, &defaults()).expect("valid");
        let protos: Vec<_> = d
            .listeners
            .iter()
            .map(|l| (l.port, l.protocol.as_str()))
            .collect();
        assert_eq!(protos, vec![(53, "TCP_UDP"), (80, "TCP")]);
        assert_eq!(d.target_groups.len(), 2);
        let bad = svc(&[], &[(53, "TCP", 30053), (53, "UDP", 30054)]);
        assert!(desired("c", &bad, &defaults()).is_err_and(|e| e.is_permanent()));
    }

    #[test]
    fn health_checks_follow_traffic_policy() {
        let s = svc(&[], &[(80, "TCP", 30080)]);
        let d = desired("c", &s, &defaults()).expect("valid");
        assert_eq!(d.target_groups[0].health.protocol, "TCP");
        assert_eq!(d.target_groups[0].health.port, "traffic-port");
        let mut l = s.clone();
        if let Some(spec) = l.spec.as_mut() {
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(31999);
        }
        let d = desired("c", &l, &defaults()).expect("valid");
        let hc = &d.target_groups[0].health;
        assert_eq!(
            (hc.protocol.as_str(), hc.port.as_str(), hc.path.as_deref()),
            ("HTTP", "31999", Some("/healthz"))
        );
    }

    #[test]
    fn annotations_parse() {
        let s = svc(
            &[
                ("scheme", "internal"),
                ("subnets", "subnet-a, subnet-b"),
                ("healthcheck-protocol", "http"),
                ("healthcheck-path", "/ready"),
                ("healthcheck-interval", "15"),
                ("healthcheck-timeout", "5"),
                ("healthcheck-healthy-threshold", "4"),
                ("cross-zone-load-balancing-enabled", "true"),
                ("additional-resource-tags", "team=a, cost-center=42,flag"),
                (
                    "target-group-attributes",
                    "deregistration_delay.timeout_seconds=10",
                ),
            ],
            &[(80, "TCP", 30080)],
        );
        let d = desired("c", &s, &defaults()).expect("valid");
        assert_eq!(d.scheme, Scheme::Internal);
        assert_eq!(d.subnets, vec!["subnet-a", "subnet-b"]);
        let hc = &d.target_groups[0].health;
        assert_eq!(
            (
                hc.protocol.as_str(),
                hc.path.as_deref(),
                hc.interval,
                hc.timeout,
                hc.healthy
            ),
            ("HTTP", Some("/ready"), 15, 5, 4)
        );
        assert_eq!(
            d.lb_attributes
                .get("load_balancing.cross_zone.enabled")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(d.tags.get("team").map(String::as_str), Some("a"));
        assert_eq!(d.tags.get("flag").map(String::as_str), Some(""));
        assert_eq!(
            d.tags.get("kubernetes.io/cluster/c").map(String::as_str),
            Some("owned")
        );
        assert_eq!(
            d.tags.get(SERVICE_TAG).map(String::as_str),
            Some("default/web")
        );
        assert_eq!(
            d.target_groups[0]
                .attributes
                .get("deregistration_delay.timeout_seconds")
                .map(String::as_str),
            Some("10")
        );
    }

    #[test]
    fn internal_annotation_reads_like_cloud_provider_aws() {
        for (v, want) in [
            ("true", Scheme::Internal),
            ("0.0.0.0/0", Scheme::Internal),
            ("false", Scheme::InternetFacing),
        ] {
            let s = svc(&[("internal", v)], &[(80, "TCP", 30080)]);
            assert_eq!(
                desired("c", &s, &defaults()).expect("valid").scheme,
                want,
                "{v}"
            );
        }
    }

    #[test]
    fn bad_annotations_are_permanent() {
        for (k, v) in [
            ("type", "clb"),
            ("scheme", "public"),
            ("nlb-target-type", "ip"),
            ("subnets", " , "),
            ("healthcheck-protocol", "UDP"),
            ("healthcheck-port", "70000"),
            ("healthcheck-interval", "3"),
            ("healthcheck-timeout", "abc"),
            ("healthcheck-path", "/x"),
            ("cross-zone-load-balancing-enabled", "maybe"),
            ("additional-resource-tags", "kubernetes.io/cluster/x=owned"),
            ("target-group-attributes", "novalue"),
            ("ip-address-type", "ipv6"),
        ] {
            let s = svc(&[(k, v)], &[(80, "TCP", 30080)]);
            let r = desired("c", &s, &defaults());
            assert!(
                r.as_ref().is_err_and(|e| e.is_permanent()),
                "{k}={v}: {r:?}"
            );
        }
        let mut ranges = svc(&[], &[(80, "TCP", 30080)]);
        if let Some(s) = ranges.spec.as_mut() {
            s.load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into(), "nope".into()]);
        }
        assert!(desired("c", &ranges, &defaults()).is_err_and(|e| e.is_permanent()));
        let mut ranges = svc(&[], &[(80, "TCP", 30080)]);
        ranges.metadata.annotations = Some(
            [(
                SOURCE_RANGES_ANNOTATION.to_string(),
                "10.0.0.0/8,x".to_string(),
            )]
            .into(),
        );
        assert!(desired("c", &ranges, &defaults()).is_err_and(|e| e.is_permanent()));
        let sctp = svc(&[], &[(80, "SCTP", 30080)]);
        assert!(desired("c", &sctp, &defaults()).is_err_and(|e| e.is_permanent()));
    }

    #[test]
    fn subnets_by_name_or_discovered() {
        let named = svc(&[("subnets", "subnet-a, public-1")], &[(80, "TCP", 30080)]);
        assert_eq!(
            desired("c", &named, &defaults()).expect("valid").subnets,
            vec!["subnet-a", "public-1"]
        );
        // Neither annotation nor cloud config: discovered in the VPC at creation.
        let plain = svc(&[], &[(80, "TCP", 30080)]);
        assert!(
            desired("c", &plain, &Defaults::default())
                .expect("valid")
                .subnets
                .is_empty()
        );
    }

    #[test]
    fn source_ranges_field_then_annotation_then_default() {
        let nets = |v: &[&str]| -> BTreeSet<ipnet::IpNet> {
            v.iter().map(|s| s.parse().expect("CIDR")).collect()
        };
        let mut s = svc(&[], &[(80, "TCP", 30080)]);
        assert_eq!(
            desired("c", &s, &defaults()).expect("valid").source_ranges,
            nets(&["0.0.0.0/0"])
        );
        let mut dual = svc(&[("ip-address-type", "dualstack")], &[(80, "TCP", 30080)]);
        assert_eq!(
            desired("c", &dual, &defaults())
                .expect("valid")
                .source_ranges,
            nets(&["0.0.0.0/0", "::/0"])
        );
        s.metadata.annotations = Some(
            [(
                SOURCE_RANGES_ANNOTATION.to_string(),
                " 10.1.2.3/16, 192.0.2.0/24 ".to_string(),
            )]
            .into(),
        );
        assert_eq!(
            desired("c", &s, &defaults()).expect("valid").source_ranges,
            nets(&["10.1.0.0/16", "192.0.2.0/24"])
        );
        if let Some(sp) = s.spec.as_mut() {
            sp.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
        }
        assert_eq!(
            desired("c", &s, &defaults()).expect("valid").source_ranges,
            nets(&["203.0.113.0/24"])
        );
        if let Some(sp) = dual.spec.as_mut() {
            sp.load_balancer_source_ranges = Some(vec!["2001:db8::/32".into()]);
        }
        assert_eq!(
            desired("c", &dual, &defaults())
                .expect("valid")
                .source_ranges,
            nets(&["2001:db8::/32"])
        );
    }

    #[test]
    fn external_type_is_someone_elses() {
        let s = svc(&[("type", "external")], &[(80, "TCP", 30080)]);
        assert!(is_external(&s));
        assert!(!is_external(&svc(
            &[("type", "nlb")],
            &[(80, "TCP", 30080)]
        )));
        assert!(!is_external(&svc(&[], &[(80, "TCP", 30080)])));
    }

    #[test]
    fn unallocated_node_port_is_retryable() {
        let s = svc(&[], &[(80, "TCP", 0)]);
        assert!(matches!(
            desired("c", &s, &defaults()),
            Err(ProviderError::Retryable { .. })
        ));
    }

    #[test]
    fn instance_ids_from_provider_id() {
        let n = |pid: &str| Node {
            spec: Some(NodeSpec {
                provider_id: Some(pid.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            instance_id(&n("aws:///us-east-1a/i-0abc")),
            Some("i-0abc".into())
        );
        assert_eq!(instance_id(&n("aws:///i-0abc")), Some("i-0abc".into()));
        assert_eq!(instance_id(&n("gce://p/z/vm")), None);
        assert_eq!(instance_id(&n("aws:///us-east-1a/")), None);
        assert_eq!(instance_id(&Node::default()), None);
    }
}

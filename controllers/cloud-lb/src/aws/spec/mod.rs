//! The desired NLB for a Service, computed purely from the Service, its nodes and the cluster
//! name: names, tags, listeners, target groups, health checks, attributes. Invalid annotations
//! become [`ProviderError::Permanent`] before any API call.

mod annotations;
mod names;
mod placement;
pub mod tenant;
mod tls;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;

use crate::core::parse_go_bool;
use crate::provider::ProviderError;
pub use annotations::{SOURCE_RANGES_ANNOTATION, is_external};
use annotations::{ann, bad, health_check, key_values, scheme, source_ranges};
use names::meta;
pub use names::{
    instance_id, instance_ids, load_balancer_name, name_prefix, target_group_name,
    target_group_names,
};
pub use placement::{is_target, subnet_mappings, target_nodes};
pub use tls::Tls;

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
    /// TCP, UDP, TCP_UDP or TLS.
    pub protocol: String,
    /// Name of the target group it forwards to.
    pub target_group: String,
    /// Certificate and policy of a TLS listener.
    pub tls: Option<Tls>,
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
    /// Whether `subnets` came from the Service's annotation (a namespace user's word, so each
    /// must prove to be in the cluster's VPC) rather than the operator's cloud config.
    pub subnets_from_service: bool,
    /// Elastic IP allocations paired in order with the subnets at creation (internet-facing).
    pub eip_allocations: Vec<String>,
    /// Private IPv4 addresses paired in order with the subnets at creation (internal).
    pub private_ipv4_addresses: Vec<String>,
    /// Labels a node must carry to be a target (`target-node-labels`; empty: every node).
    pub target_node_labels: BTreeMap<String, String>,
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
    let eip_allocations = placement::eip_allocations(svc, scheme)?;
    let private_ipv4_addresses = placement::private_ipv4_addresses(svc, scheme)?;
    let target_node_labels = placement::target_node_labels(svc)?;
    let subnets_from_service = ann(svc, "subnets").is_some();
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
    let tls = tls::tls(svc)?;

    // Group ports by front-end port: TCP and UDP on the same port become one TCP_UDP listener
    // (NLB cannot have two listeners on one port), which needs one node port for both.
    let mut by_port: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
    let mut tls_ports: BTreeSet<i32> = BTreeSet::new();
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
            ))
            .with_code(crate::core::condition::AWAITING_NODE_PORT));
        }
        if proto == "TCP"
            && tls
                .as_ref()
                .is_some_and(|(_, ports)| ports.covers(p.port, p.name.as_deref()))
        {
            tls_ports.insert(p.port);
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
        let listener_tls = match (&tls, tls_ports.contains(&port)) {
            (Some((t, _)), true) if protocol == "TCP" => Some(t.clone()),
            (Some(_), true) => {
                return Err(ProviderError::permanent(format!(
                    "port {port}: TLS (annotation {ANN}ssl-ports) cannot share a listener with UDP on the same port"
                )));
            }
            _ => None,
        };
        listeners.push(DesiredListener {
            port,
            // The load balancer terminates TLS; targets stay TCP (the group keeps its name).
            protocol: if listener_tls.is_some() {
                "TLS".to_string()
            } else {
                protocol.clone()
            },
            target_group: tg.clone(),
            tls: listener_tls,
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
        subnets_from_service,
        eip_allocations,
        private_ipv4_addresses,
        target_node_labels,
        ip_address_type,
        lb_attributes,
        tags,
        listeners,
        target_groups,
        source_ranges,
    })
}

#[cfg(test)]
pub(crate) mod tests;

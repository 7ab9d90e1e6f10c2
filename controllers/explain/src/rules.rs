//! From the observed objects to kube-proxy's view of each service port ([`ProxyPort`]) and to
//! its rules, per IP family, for every node; nodes whose rules are identical are grouped.

use std::net::IpAddr;

use endpointslice::common::{AddressType, LABEL_SERVICE_NAME, LABEL_ZONE, parse_ip_sloppy};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use serde::Serialize;

use crate::Observed;
use crate::proxy::{self, NodeView, ProxyEndpoint, ProxyPort, Rules};

/// Services with this label are left to another proxy; kube-proxy ignores them.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// kube-proxy's rules for one IP family on a group of nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleSet {
    /// `IPv4` (iptables) or `IPv6` (ip6tables).
    pub family: String,
    /// Whether every node has these rules (then `nodes` lists them all, possibly none).
    pub every_node: bool,
    /// The nodes with these rules.
    pub nodes: Vec<String>,
    /// `filter` table rules, as `iptables-save` prints them, grouped by chain.
    pub filter: Vec<String>,
    /// `nat` table rules, likewise.
    pub nat: Vec<String>,
}

/// The family of an address.
pub fn family_of(ip: &str) -> Option<AddressType> {
    match parse_ip_sloppy(ip)? {
        IpAddr::V4(_) => Some(AddressType::IPv4),
        IpAddr::V6(_) => Some(AddressType::IPv6),
    }
}

fn port_name(sp: &ServicePort) -> &str {
    sp.name.as_deref().unwrap_or("")
}

fn port_protocol(sp: &ServicePort) -> &str {
    sp.protocol.as_deref().unwrap_or("TCP")
}

/// The endpoints kube-proxy reads for service port `sp` in `family`: from every slice of the
/// Service with that address type and a port of the same name and protocol, keyed `ip:port`
/// (a terminating duplicate loses to a running one), sorted by that key as text.
pub fn proxy_endpoints(o: &Observed, sp: &ServicePort, family: AddressType) -> Vec<ProxyEndpoint> {
    let name = o.service.metadata.name.as_deref().unwrap_or("");
    let mut out: Vec<ProxyEndpoint> = vec![];
    for slice in &o.slices {
        let labelled = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(String::as_str);
        if labelled != Some(name) || slice.address_type != family.as_str() {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name(sp)
                && p.protocol.as_deref().unwrap_or("TCP") == port_protocol(sp)
        }) else {
            continue;
        };
        let Some(num) = port.port.filter(|n| *n != 0) else {
            continue;
        };
        for e in slice.endpoints.iter().flatten() {
            let Some(ip) = e.addresses.first().and_then(|a| parse_ip_sloppy(a)) else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            let ep = ProxyEndpoint {
                ip: ip.to_string(),
                port: num,
                ready: c.ready.unwrap_or(true),
                serving: c.serving.unwrap_or(true),
                terminating: c.terminating.unwrap_or(false),
                node: e.node_name.clone(),
                zone_hints: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            };
            match out.iter_mut().find(|x| x.key() == ep.key()) {
                Some(existing) if !ep.terminating => *existing = ep,
                Some(_) => {}
                None => out.push(ep),
            }
        }
    }
    out.sort_by_key(|e| e.key());
    out
}

/// A Node's addresses.
pub fn node_ips(n: &Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| parse_ip_sloppy(&a.address))
        .collect()
}

fn in_family(ip: &str, family: AddressType) -> bool {
    family_of(ip) == Some(family)
}

/// kube-proxy's view of every port of `svc` in `family`, with its cluster IP of that family.
pub fn proxy_ports(o: &Observed, family: AddressType, cluster_ip: &str) -> Vec<ProxyPort> {
    let svc: &Service = &o.service;
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    // Whatever the type, as kube-proxy: only VIP-mode ingress IPs of this family.
    let lb_vips: Vec<String> = crate::chain::ingress(svc)
        .into_iter()
        .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
        .filter_map(|i| i.ip)
        .filter_map(|ip| parse_ip_sloppy(&ip))
        .map(|ip| ip.to_string())
        .filter(|ip| in_family(ip, family))
        .collect();
    let mut source_ranges: Vec<IpNet> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<IpNet>().ok())
        .filter(|n| match n {
            IpNet::V4(_) => family == AddressType::IPv4,
            IpNet::V6(_) => family == AddressType::IPv6,
        })
        .map(|n| n.trunc())
        .collect();
    // A zero-length prefix allows everything, as no ranges at all do.
    if source_ranges.iter().any(|n| n.prefix_len() == 0) {
        source_ranges.clear();
    }
    let external_ips: Vec<String> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| parse_ip_sloppy(ip))
        .map(|ip| ip.to_string())
        .filter(|ip| in_family(ip, family))
        .collect();
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    spec.ports
        .iter()
        .flatten()
        .map(|sp| ProxyPort {
            name: proxy::service_port_name(ns, name, port_name(sp)),
            protocol: port_protocol(sp).to_ascii_lowercase(),
            cluster_ip: cluster_ip.to_string(),
            port: sp.port,
            node_port: sp.node_port.unwrap_or(0),
            health_check_node_port: if etp_local {
                spec.health_check_node_port.unwrap_or(0)
            } else {
                0
            },
            external_ips: external_ips.clone(),
            lb_vips: lb_vips.clone(),
            source_ranges: source_ranges.clone(),
            etp_local,
            itp_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity_seconds: crate::chain::affinity_seconds(svc),
            endpoints: proxy_endpoints(o, sp, family),
            ipv6: family == AddressType::IPv6,
        })
        .collect()
}

/// Whether kube-proxy handles this Service at all: it has a cluster IP and is not left to
/// another proxy.
pub fn proxied(svc: &Service) -> bool {
    endpointslice::common::service_ip_set(svc)
        && !svc
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
}

/// Whether kube-proxy's rules for these ports can differ between nodes: Local traffic
/// policies (which endpoints are local), topology hints (which node or zone), and source
/// ranges (whether the node's own address is in one).
fn node_dependent(ports: &[ProxyPort]) -> bool {
    ports.iter().any(|p| {
        p.itp_local
            || p.etp_local
            || (!p.source_ranges.is_empty() && !p.lb_vips.is_empty())
            || p.endpoints
                .iter()
                .any(|e| !e.zone_hints.is_empty() || !e.node_hints.is_empty())
    })
}

fn rules_on(ports: &[ProxyPort], node: Option<&NodeView>) -> Rules {
    let mut all = Rules::default();
    for p in ports {
        let r = proxy::port_rules(p, node);
        all.filter.extend(r.filter);
        all.nat.extend(r.nat);
    }
    proxy::group_by_chain(&mut all.filter);
    proxy::group_by_chain(&mut all.nat);
    all
}

/// kube-proxy's rules for the Service, per family (in `spec.clusterIPs` order), on every node
/// (grouped where identical); empty when kube-proxy ignores the Service.
pub fn rule_sets(o: &Observed) -> Vec<RuleSet> {
    let svc = &o.service;
    if !proxied(svc) {
        return vec![];
    }
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ips = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    let mut nodes: Vec<NodeView> = o
        .nodes
        .iter()
        .map(|n| NodeView {
            name: n.metadata.name.clone().unwrap_or_default(),
            ips: node_ips(n),
            zone: n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ZONE))
                .cloned(),
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = vec![];
    for ip in ips {
        let Some(family) = family_of(&ip) else {
            continue;
        };
        let ports = proxy_ports(o, family, &ip);
        let mut groups: Vec<(Rules, Vec<String>)> = vec![];
        if nodes.is_empty() || !node_dependent(&ports) {
            // The same on every node: computed once (a large cluster has thousands of nodes).
            let names = nodes.iter().map(|n| n.name.clone()).collect();
            groups.push((rules_on(&ports, None), names));
        } else {
            for n in &nodes {
                let r = rules_on(&ports, Some(n));
                match groups.iter_mut().find(|(g, _)| *g == r) {
                    Some((_, names)) => names.push(n.name.clone()),
                    None => groups.push((r, vec![n.name.clone()])),
                }
            }
        }
        let every = groups.len() == 1;
        for (r, names) in groups {
            out.push(RuleSet {
                family: family.as_str().to_string(),
                every_node: every,
                nodes: names,
                filter: r.filter,
                nat: r.nat,
            });
        }
    }
    out
}

//! The rules kube-proxy's iptables mode (v1.37) writes for one service port on one node, as
//! `iptables-save` prints them: which chains exist (`KUBE-SVC`, `KUBE-SVL`, `KUBE-EXT`,
//! `KUBE-FW`, `KUBE-SEP`), the jumps from `KUBE-SERVICES` and `KUBE-NODEPORTS`, the probability
//! of each endpoint jump, session affinity (`recent`) and the REJECT/DROP filter rules of a
//! port without (local) endpoints. Rules that depend on kube-proxy's own flags rather than on
//! API objects (the cluster-CIDR masquerade rule, localhost NodePorts) are left out; see
//! [`OMITTED`].

mod line;
pub mod names;

use std::net::IpAddr;

use ipnet::IpNet;

use line::{Line, full_mask, host, reject, src_host};
use names::probability_saved;
pub use names::{PortChains, endpoint_chain, join_host_port, service_port_name};

/// What the rules leave out, because it depends on kube-proxy's flags, not on API objects.
pub const OMITTED: &str = "not shown: kube-proxy's masquerade rules that depend on its own flags \
(`! -s <cluster CIDR> ... -j KUBE-MARK-MASQ` first in KUBE-SVC and the pod-traffic rule of \
KUBE-EXT with --cluster-cidr/--detect-local-mode; every rule in KUBE-SVC with \
--masquerade-all), the 127.0.0.0/8 NodePort rule (nfacct), and comments, which kube-proxy \
drops when the cluster has over 1000 endpoints";

/// One endpoint of one service port and family, as kube-proxy reads it from EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEndpoint {
    /// The address (canonical text).
    pub ip: String,
    /// The endpoint port of this service port.
    pub port: i32,
    /// `conditions.ready` (absent reads as true).
    pub ready: bool,
    /// `conditions.serving` (absent reads as true).
    pub serving: bool,
    /// `conditions.terminating` (absent reads as false).
    pub terminating: bool,
    /// `nodeName`.
    pub node: Option<String>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

impl ProxyEndpoint {
    /// `ip:port`: kube-proxy's key of the endpoint, the hash input of its chain and the DNAT.
    pub fn key(&self) -> String {
        join_host_port(&self.ip, self.port)
    }
}

/// One service port of one IP family, with everything kube-proxy reads for it.
#[derive(Clone, Debug, Default)]
pub struct ProxyPort {
    /// kube-proxy's service port name (`ns/name[:port]`).
    pub name: String,
    /// Protocol, lower case (`tcp`, `udp`, `sctp`).
    pub protocol: String,
    /// The cluster IP of this family.
    pub cluster_ip: String,
    /// `spec.ports[].port`.
    pub port: i32,
    /// `spec.ports[].nodePort` (0: none).
    pub node_port: i32,
    /// `spec.healthCheckNodePort` (0: none).
    pub health_check_node_port: i32,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<String>,
    /// Load-balancer ingress IPs of this family whose `ipMode` is VIP (or unset): kube-proxy
    /// captures only those.
    pub lb_vips: Vec<String>,
    /// `spec.loadBalancerSourceRanges` of this family.
    pub source_ranges: Vec<IpNet>,
    /// `externalTrafficPolicy: Local`.
    pub etp_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub itp_local: bool,
    /// `sessionAffinity: ClientIP` with its timeout in seconds.
    pub affinity_seconds: Option<i32>,
    /// Endpoints sorted by `ip:port` as text and without duplicates, as kube-proxy keeps them.
    pub endpoints: Vec<ProxyEndpoint>,
    /// Whether this is the IPv6 (ip6tables) side.
    pub ipv6: bool,
}

/// The endpoints kube-proxy routes to under Cluster policy: the ready ones, or when none is
/// ready, those still serving while terminating (a best effort not to drop connections).
pub fn cluster_endpoints(eps: &[ProxyEndpoint]) -> Vec<&ProxyEndpoint> {
    cluster_endpoints_on(eps, None).0
}

/// Topology-aware routing as kube-proxy decides it on one node: same node when every ready
/// endpoint has a node hint and one names this node, else same zone when every ready
/// endpoint has a zone hint and one names the node's zone, else none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every ready endpoint.
    None,
    /// Endpoints hinted for this node (`trafficDistribution: PreferSameNode`).
    SameNode,
    /// Endpoints hinted for this node's zone (`PreferSameZone`, `PreferClose`, topology mode Auto).
    SameZone,
}

/// kube-proxy's topology mode for `eps` on `node`.
pub fn topology(eps: &[ProxyEndpoint], node: Option<&NodeView>) -> Topology {
    let Some(node) = node else {
        return Topology::None;
    };
    let ready: Vec<&ProxyEndpoint> = eps.iter().filter(|e| e.ready).collect();
    let zone = node.zone.as_deref().unwrap_or("");
    if !ready.is_empty()
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Topology::SameNode;
    }
    if !ready.is_empty()
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.iter().any(|z| z == zone))
    {
        return Topology::SameZone;
    }
    Topology::None
}

/// [`cluster_endpoints`] on `node`, topology taken into account (the terminating fallback
/// ignores it), with the topology mode used.
pub fn cluster_endpoints_on<'a>(
    eps: &'a [ProxyEndpoint],
    node: Option<&NodeView>,
) -> (Vec<&'a ProxyEndpoint>, Topology) {
    let mode = topology(eps, node);
    let zone = node.and_then(|n| n.zone.as_deref()).unwrap_or("");
    let name = node.map(|n| n.name.as_str()).unwrap_or("");
    let ready: Vec<&ProxyEndpoint> = eps
        .iter()
        .filter(|e| e.ready)
        .filter(|e| match mode {
            Topology::None => true,
            Topology::SameNode => e.node_hints.iter().any(|n| n == name),
            Topology::SameZone => e.zone_hints.iter().any(|z| z == zone),
        })
        .collect();
    if !ready.is_empty() {
        return (ready, mode);
    }
    (
        eps.iter().filter(|e| e.serving && e.terminating).collect(),
        mode,
    )
}

/// The endpoints on `node` kube-proxy routes to under Local policy (ready ones first, else
/// serving terminating ones), and whether it fell back to terminating ones.
pub fn local_endpoints<'a>(
    eps: &'a [ProxyEndpoint],
    node: Option<&str>,
) -> (Vec<&'a ProxyEndpoint>, bool) {
    let on_node = |e: &&ProxyEndpoint| node.is_some() && e.node.as_deref() == node;
    let ready: Vec<&ProxyEndpoint> = eps.iter().filter(on_node).filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return (ready, false);
    }
    let term: Vec<&ProxyEndpoint> = eps
        .iter()
        .filter(on_node)
        .filter(|e| !e.ready && e.serving && e.terminating)
        .collect();
    let fell_back = !term.is_empty();
    (term, fell_back)
}

/// The rules of one table, each a full `-A CHAIN ...` line as `iptables-save` prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// The `filter` table.
    pub filter: Vec<String>,
    /// The `nat` table.
    pub nat: Vec<String>,
}

/// The node a rule set is computed for: its name and addresses.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// Node name (matches endpoints' `nodeName`).
    pub name: String,
    /// Its addresses (for `loadBalancerSourceRanges` that contain the node itself).
    pub ips: Vec<IpAddr>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// The rules kube-proxy writes for `p` on `node` (None: a node running none of the endpoints).
pub fn port_rules(p: &ProxyPort, node: Option<&NodeView>) -> Rules {
    let mut r = Rules::default();
    let proto = p.protocol.as_str();
    let spn = p.name.as_str();
    let chains = PortChains::new(spn, proto);
    let v6 = p.ipv6;
    let externally = p.node_port != 0 || !p.lb_vips.is_empty() || !p.external_ips.is_empty();
    let etp_local = p.etp_local && externally;
    // As kube-proxy: external traffic needs the cluster chain even under Local policy, for
    // traffic from the node itself and from pods ("short-circuiting").
    let uses_cluster = !p.itp_local || externally;
    let uses_local = p.itp_local || (externally && etp_local);

    let cluster_eps = if uses_cluster {
        cluster_endpoints_on(&p.endpoints, node).0
    } else {
        vec![]
    };
    let node_name = node.map(|n| n.name.as_str());
    let (local_eps, _) = if uses_local {
        local_endpoints(&p.endpoints, node_name)
    } else {
        (vec![], false)
    };
    let has_any = !cluster_eps.is_empty()
        || (uses_local
            && p.endpoints
                .iter()
                .any(|e| e.ready || (e.serving && e.terminating)));
    let internal_chain = if p.itp_local {
        &chains.local
    } else {
        &chains.cluster
    };
    let has_internal = has_any && (!p.itp_local || !local_eps.is_empty());
    let external_policy_chain = if etp_local {
        &chains.local
    } else {
        &chains.cluster
    };
    let has_external = has_any && (!etp_local || !local_eps.is_empty());
    let uses_fw = has_any && !p.lb_vips.is_empty() && !p.source_ranges.is_empty();
    let lb_chain = if uses_fw {
        &chains.firewall
    } else {
        &chains.external
    };
    let (int_target, int_comment, ext_target, ext_comment) = if !has_any {
        let c = format!("{spn} has no endpoints");
        (reject(v6), c.clone(), reject(v6), c)
    } else {
        let c = format!("{spn} has no local endpoints");
        ("DROP", c.clone(), "DROP", c)
    };

    // The cluster IP.
    let cip = Line::new("KUBE-SERVICES")
        .dst(host(&p.cluster_ip, v6))
        .proto(proto);
    if has_internal {
        r.nat.push(
            cip.comment(&format!("{spn} cluster IP"))
                .dport(proto, p.port)
                .to(internal_chain),
        );
    } else {
        r.filter.push(
            cip.comment(&int_comment)
                .dport(proto, p.port)
                .to(int_target),
        );
    }
    // External IPs, then load-balancer IPs.
    for eip in &p.external_ips {
        if has_any {
            r.nat.push(
                Line::new("KUBE-SERVICES")
                    .dst(host(eip, v6))
                    .proto(proto)
                    .comment(&format!("{spn} external IP"))
                    .dport(proto, p.port)
                    .to(&chains.external),
            );
        }
        if !has_external {
            r.filter.push(
                Line::new("KUBE-EXTERNAL-SERVICES")
                    .dst(host(eip, v6))
                    .proto(proto)
                    .comment(&ext_comment)
                    .dport(proto, p.port)
                    .to(ext_target),
            );
        }
    }
    for vip in &p.lb_vips {
        if has_any {
            r.nat.push(
                Line::new("KUBE-SERVICES")
                    .dst(host(vip, v6))
                    .proto(proto)
                    .comment(&format!("{spn} loadbalancer IP"))
                    .dport(proto, p.port)
                    .to(lb_chain),
            );
        }
        if uses_fw {
            r.filter.push(
                Line::new("KUBE-PROXY-FIREWALL")
                    .dst(host(vip, v6))
                    .proto(proto)
                    .comment(&format!(
                        "{spn} traffic not accepted by {}",
                        chains.firewall
                    ))
                    .dport(proto, p.port)
                    .to("DROP"),
            );
        }
    }
    if !has_external {
        for vip in &p.lb_vips {
            r.filter.push(
                Line::new("KUBE-EXTERNAL-SERVICES")
                    .dst(host(vip, v6))
                    .proto(proto)
                    .comment(&ext_comment)
                    .dport(proto, p.port)
                    .to(ext_target),
            );
        }
    }
    // The node port, and the health-check node port (the same rule for every port).
    if p.node_port != 0 {
        if has_any {
            r.nat.push(
                Line::new("KUBE-NODEPORTS")
                    .proto(proto)
                    .comment(spn)
                    .dport(proto, p.node_port)
                    .to(&chains.external),
            );
        }
        if !has_external {
            r.filter.push(
                Line::new("KUBE-EXTERNAL-SERVICES")
                    .proto(proto)
                    .comment(&ext_comment)
                    .m("-m addrtype --dst-type LOCAL".into())
                    .dport(proto, p.node_port)
                    .to(ext_target),
            );
        }
    }
    if p.health_check_node_port != 0 {
        r.filter.push(
            Line::new("KUBE-NODEPORTS")
                .proto("tcp")
                .comment(&format!("{spn} health check node port"))
                .dport("tcp", p.health_check_node_port)
                .to("ACCEPT"),
        );
    }

    // KUBE-EXT: masquerade (Cluster policy) or keep the client's address (Local policy).
    if has_any && externally {
        let ext = chains.external.as_str();
        if !etp_local {
            r.nat.push(
                Line::new(ext)
                    .comment(&format!(
                        "masquerade traffic for {spn} external destinations"
                    ))
                    .to("KUBE-MARK-MASQ"),
            );
        } else {
            r.nat.push(
                Line::new(ext)
                    .comment(&format!(
                        "masquerade LOCAL traffic for {spn} external destinations"
                    ))
                    .m("-m addrtype --src-type LOCAL".into())
                    .to("KUBE-MARK-MASQ"),
            );
            r.nat.push(
                Line::new(ext)
                    .comment(&format!(
                        "route LOCAL traffic for {spn} external destinations"
                    ))
                    .m("-m addrtype --src-type LOCAL".into())
                    .to(&chains.cluster),
            );
        }
        if has_external {
            r.nat.push(Line::new(ext).to(external_policy_chain));
        }
    }
    // KUBE-FW: loadBalancerSourceRanges.
    if uses_fw {
        let fw = chains.firewall.as_str();
        let comment = format!("{spn} loadbalancer IP");
        let mut from_node = false;
        for cidr in &p.source_ranges {
            r.nat.push(
                Line::new(fw)
                    .src(format!("-s {cidr}"))
                    .comment(&comment)
                    .to(&chains.external),
            );
            from_node |= node.is_some_and(|n| n.ips.iter().any(|ip| cidr.contains(ip)));
        }
        if from_node {
            for vip in &p.lb_vips {
                r.nat.push(
                    Line::new(fw)
                        .src(src_host(vip, v6))
                        .comment(&comment)
                        .to(&chains.external),
                );
            }
        }
        r.nat.push(
            Line::new(fw)
                .comment(&format!(
                    "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"
                ))
                .to(""),
        );
    }
    // KUBE-SVC and KUBE-SVL: affinity first, then one jump per endpoint.
    if uses_cluster && !cluster_eps.is_empty() {
        service_to_endpoints(&mut r.nat, p, &chains.cluster, &cluster_eps);
    }
    if uses_local && !local_eps.is_empty() {
        service_to_endpoints(&mut r.nat, p, &chains.local, &local_eps);
    }
    // KUBE-SEP: one per endpoint reachable from this node.
    let mut reachable: Vec<&ProxyEndpoint> = cluster_eps.clone();
    for e in &local_eps {
        if !reachable.iter().any(|c| c.key() == e.key()) {
            reachable.push(e);
        }
    }
    reachable.sort_by_key(|e| e.key());
    for e in reachable {
        let sep = endpoint_chain(spn, proto, &e.key());
        r.nat.push(
            Line::new(&sep)
                .src(src_host(&e.ip, v6))
                .comment(spn)
                .to("KUBE-MARK-MASQ"),
        );
        let mut dnat = Line::new(&sep).proto(proto).comment(spn);
        if p.affinity_seconds.is_some() {
            dnat = dnat.m(format!(
                "-m recent --set --name {sep} --mask {} --rsource",
                full_mask(v6)
            ));
        }
        r.nat.push(
            dnat.m(format!("-m {proto}"))
                .to(&format!("DNAT --to-destination {}", e.key())),
        );
    }
    r
}

fn service_to_endpoints(nat: &mut Vec<String>, p: &ProxyPort, chain: &str, eps: &[&ProxyEndpoint]) {
    let spn = p.name.as_str();
    if let Some(secs) = p.affinity_seconds {
        for e in eps {
            let sep = endpoint_chain(spn, &p.protocol, &e.key());
            nat.push(
                Line::new(chain)
                    .comment(&format!("{spn} -> {}", e.key()))
                    .m(format!(
                        "-m recent --rcheck --seconds {secs} --reap --name {sep} --mask {} --rsource",
                        full_mask(p.ipv6)
                    ))
                    .to(&sep),
            );
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let sep = endpoint_chain(spn, &p.protocol, &e.key());
        let mut line = Line::new(chain).comment(&format!("{spn} -> {}", e.key()));
        if i + 1 < n {
            line = line.m(format!(
                "-m statistic --mode random --probability {}",
                probability_saved(n - i)
            ));
        }
        nat.push(line.to(&sep));
    }
}

/// The chain a rule line appends to.
pub fn rule_chain(line: &str) -> &str {
    line.strip_prefix("-A ")
        .and_then(|s| s.split(' ').next())
        .unwrap_or("")
}

/// Orders rule lines as `iptables-save` groups them: by chain (chains by name), keeping each
/// chain's rules in the order they were written.
pub fn group_by_chain(lines: &mut [String]) {
    lines.sort_by(|a, b| rule_chain(a).cmp(rule_chain(b)));
}

#[cfg(test)]
mod tests;

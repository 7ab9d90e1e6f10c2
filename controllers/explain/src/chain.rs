//! The chain of each port (load balancer -> every eligible node's NodePort -> ClusterIP ->
//! endpoints), each endpoint's state and why, the selected pods' problems, and the problems
//! of the Service as a whole.

mod problems;

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use cloud_lb::core::targets::{EndpointNodes, cordoned, targets};
use cloud_lb::core::{EXCLUDE_LB_LABEL, TO_BE_DELETED_TAINT, in_stable_set, node_included};
use endpointslice::common::{AddressType, PodView, find_port, parse_ip_sloppy};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::Observed;
use crate::dns::DnsEndpoint;
use crate::proxy::{cluster_endpoints, join_host_port};
use crate::rules::{family_of, proxy_endpoints};

/// One entry of `status.loadBalancer.ingress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ingress {
    /// IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `VIP` or `Proxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<String>,
}

/// One port's chain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PortChain {
    /// Port name (may be empty).
    pub name: String,
    /// Protocol.
    pub protocol: String,
    /// `port`.
    pub port: i32,
    /// `targetPort` (a number or a container port name).
    pub target_port: String,
    /// `nodePort`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
    /// The load balancer's addresses with this port (`<pending>` while it has none).
    pub load_balancer: Vec<String>,
    /// Every node with this port's NodePort on it.
    pub nodes: Vec<NodeHop>,
    /// `<clusterIP>:<port>` of each family.
    pub cluster_ips: Vec<String>,
    /// The endpoints of this port.
    pub endpoints: Vec<EndpointState>,
    /// The whole chain on one line.
    pub summary: String,
}

/// A node's NodePort in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeHop {
    /// Node name.
    pub node: String,
    /// `<node-ip>:<nodePort>` (InternalIP, else ExternalIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Whether the load balancer sends traffic to it (LoadBalancer Services only).
    pub load_balancer_target: bool,
    /// Why it is not a target or does not pass traffic on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One endpoint of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointState {
    /// `<ip>:<port>`.
    pub address: String,
    /// The pod it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The node it runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// Whether kube-proxy sends Service traffic to it.
    pub routed: bool,
    /// Why it is not ready, or what else is wrong with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// A pod the selector matches (or a slice names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodState {
    /// Name.
    pub name: String,
    /// `status.podIP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// `spec.nodeName`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `status.phase`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Its Ready condition.
    pub ready: bool,
    /// What keeps it out of some port's endpoints, or not ready.
    pub why: Vec<String>,
}

/// Something wrong with the Service, with a stable reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `SelectorMatchesNothing`, `NoReadyPods`, `NamedPortNotFound`, `PodsWithoutIP`,
    /// `NodeNotFound`, `NoEndpoints`, `LoadBalancerPending`, `NoEligibleNodes`.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// What [`analyse`] finds.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    /// Per port.
    pub ports: Vec<PortChain>,
    /// Per pod.
    pub pods: Vec<PodState>,
    /// Problems.
    pub problems: Vec<Problem>,
    /// Caveats.
    pub notes: Vec<String>,
}

/// `status.loadBalancer.ingress`.
pub fn ingress(svc: &Service) -> Vec<Ingress> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|i| Ingress {
            ip: i.ip.clone().filter(|s| !s.is_empty()),
            hostname: i.hostname.clone().filter(|s| !s.is_empty()),
            ip_mode: i.ip_mode.clone(),
        })
        .collect()
}

/// `ClientIP` affinity's timeout (the API's default, 10800 s, when unset).
pub fn affinity_seconds(svc: &Service) -> Option<i32> {
    let spec = svc.spec.as_ref()?;
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(10800)
    })
}

/// The ready endpoints of every slice, for DNS.
pub fn dns_endpoints(o: &Observed) -> Vec<DnsEndpoint> {
    let mut out = vec![];
    for s in &o.slices {
        let ports: Vec<(String, String, i32)> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    p.port?,
                ))
            })
            .collect();
        for e in s.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                let Some(ip) = parse_ip_sloppy(a) else {
                    continue;
                };
                out.push(DnsEndpoint {
                    ip: ip.to_string(),
                    hostname: e.hostname.clone(),
                    ports: ports.clone(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.ip.cmp(&b.ip));
    out
}

fn target_port(sp: &ServicePort) -> String {
    match &sp.target_port {
        None => sp.port.to_string(),
        Some(IntOrString::Int(n)) => n.to_string(),
        Some(IntOrString::String(s)) => s.clone(),
    }
}

fn node_address(n: &Node, family: Option<AddressType>) -> Option<String> {
    let addrs = n.status.as_ref()?.addresses.as_ref()?;
    for kind in ["InternalIP", "ExternalIP"] {
        if let Some(a) = addrs
            .iter()
            .filter(|a| a.type_ == kind)
            .find(|a| family.is_none() || family_of(&a.address) == family)
        {
            return Some(a.address.clone());
        }
    }
    None
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The nodes the load balancer points at, as cloud-lb decides them: the stable node set, and
/// with endpoint-aware targets (`Observed::endpoint_aware_targets`, the manager's flag) only
/// nodes with a ready local endpoint for `Local` and no cordoned node for any policy.
fn lb_targets(o: &Observed) -> BTreeSet<String> {
    let mut stable: Vec<Arc<Node>> = o
        .nodes
        .iter()
        .filter(|n| in_stable_set(n))
        .cloned()
        .map(Arc::new)
        .collect();
    stable.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut eps = EndpointNodes::default();
    for e in o.slices.iter().flat_map(|s| s.endpoints.iter().flatten()) {
        eps.add(e);
    }
    targets(&o.service, &stable, Some(&eps), o.endpoint_aware_targets)
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

/// Why a node is not one of the load balancer's targets.
fn not_a_target(n: &Node) -> String {
    if in_stable_set(n) {
        // Only endpoint-aware targets leave a node of the stable set out.
        if cordoned(n) {
            "not a load-balancer target: cordoned (endpoint-aware targets)".into()
        } else {
            "not a load-balancer target: no ready local endpoint (endpoint-aware targets)".into()
        }
    } else if n.metadata.deletion_timestamp.is_some() {
        "not a load-balancer target: being deleted".into()
    } else if !node_included(n) {
        format!("not a load-balancer target: labelled {EXCLUDE_LB_LABEL}")
    } else {
        format!("not a load-balancer target: tainted {TO_BE_DELETED_TAINT}")
    }
}

fn pod_ready_detail(p: &Pod) -> String {
    let cond = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let mut s = "pod not Ready".to_string();
    if let Some(c) = cond {
        let extra: Vec<&str> = [c.reason.as_deref(), c.message.as_deref()]
            .into_iter()
            .flatten()
            .filter(|x| !x.is_empty())
            .collect();
        if !extra.is_empty() {
            s.push_str(&format!(" ({})", extra.join(": ")));
        }
    } else {
        s.push_str(" (no Ready condition yet)");
    }
    s
}

fn selects(selector: &BTreeMap<String, String>, p: &Pod) -> bool {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn list(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Analyses every port of the Service.
pub fn analyse(o: &Observed) -> Analysis {
    let svc = &o.service;
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    let mut a = Analysis::default();
    if type_ == "ExternalName" {
        return a;
    }
    let selector = spec.selector.clone().unwrap_or_default();
    let pods_by_name: BTreeMap<&str, &Pod> = o
        .pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
        .collect();
    let node_names: BTreeSet<&str> = o
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let mut nodes: Vec<&Node> = o.nodes.iter().collect();
    nodes.sort_by(|x, y| x.metadata.name.cmp(&y.metadata.name));
    let is_lb = type_ == "LoadBalancer";
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    let families: Vec<AddressType> = if cluster_ips.is_empty() {
        vec![AddressType::IPv4, AddressType::IPv6]
    } else {
        cluster_ips.iter().filter_map(|ip| family_of(ip)).collect()
    };
    let primary = families.first().copied();
    let ing = ingress(svc);
    let lb_targets = if is_lb {
        lb_targets(o)
    } else {
        BTreeSet::new()
    };
    let selected: Vec<&Pod> = o.pods.iter().filter(|p| selects(&selector, p)).collect();
    let mut pod_why: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut named_missing, mut no_ip, mut missing_nodes) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut any_ready = false;

    for sp in spec.ports.iter().flatten() {
        let mut pc = PortChain {
            name: sp.name.clone().unwrap_or_default(),
            protocol: sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port: sp.port,
            target_port: target_port(sp),
            node_port: sp.node_port.filter(|n| *n != 0),
            cluster_ips: cluster_ips
                .iter()
                .map(|ip| join_host_port(ip, sp.port))
                .collect(),
            ..Default::default()
        };
        if is_lb {
            pc.load_balancer = ing
                .iter()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .map(|h| join_host_port(&h, sp.port))
                .collect();
            if pc.load_balancer.is_empty() {
                pc.load_balancer.push(format!("<pending>:{}", sp.port));
            }
        }
        // Endpoints, per family, with kube-proxy's choice of which get traffic.
        let mut ready_here: BTreeSet<String> = BTreeSet::new();
        for fam in &families {
            let eps = proxy_endpoints(o, sp, *fam);
            let routed: BTreeSet<String> =
                cluster_endpoints(&eps).iter().map(|e| e.key()).collect();
            for e in &eps {
                let pod = slice_pod(o, &e.ip);
                let mut why = None;
                if let Some(node) = e.node.as_deref().filter(|n| !node_names.contains(n)) {
                    missing_nodes.insert(node.to_string());
                    why = Some(format!("node {node} not found"));
                }
                if !e.ready {
                    why = Some(match pod.as_deref().and_then(|n| pods_by_name.get(n)) {
                        Some(p) if p.metadata.deletion_timestamp.is_some() => {
                            "pod is terminating".to_string()
                        }
                        Some(p) => pod_ready_detail(p),
                        None => match &pod {
                            Some(n) => format!("pod {n} not found"),
                            None => "not ready".to_string(),
                        },
                    });
                } else if let Some(n) = &e.node {
                    ready_here.insert(n.clone());
                }
                any_ready |= e.ready;
                pc.endpoints.push(EndpointState {
                    address: e.key(),
                    pod,
                    node: e.node.clone(),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    routed: routed.contains(&e.key()),
                    why,
                });
            }
        }
        // Selected pods missing from this port's endpoints, and why.
        for p in &selected {
            let name = p.metadata.name.clone().unwrap_or_default();
            if pc.endpoints.iter().any(|e| e.pod.as_deref() == Some(&name)) {
                continue;
            }
            let why = if p.terminal() {
                format!(
                    "finished (phase {})",
                    p.status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_default()
                )
            } else if p.pod_ip().is_none_or(str::is_empty) && p.pod_ips().next().is_none() {
                no_ip.insert(name.clone());
                "no IP yet (not scheduled or not started)".to_string()
            } else if let Some(n) = p
                .node_name()
                .filter(|n| !n.is_empty() && !node_names.contains(n))
            {
                missing_nodes.insert(n.to_string());
                format!("its node {n} does not exist (the EndpointSlice controller leaves it out)")
            } else if find_port(*p, sp).is_none() {
                named_missing.insert((target_port(sp), pc.protocol.clone(), name.clone()));
                format!(
                    "named port {} ({}) not found in its containers",
                    target_port(sp),
                    pc.protocol
                )
            } else if p.deleting() {
                "terminating".to_string()
            } else {
                "not in an EndpointSlice yet".to_string()
            };
            pod_why
                .entry(name)
                .or_default()
                .insert(format!("port {}: {why}", port_label(&pc)));
        }
        // Nodes carrying the NodePort.
        if let Some(np) = pc.node_port {
            for n in &nodes {
                let name = n.metadata.name.clone().unwrap_or_default();
                let target = is_lb && lb_targets.contains(&name);
                let mut note = if is_lb && !target {
                    Some(not_a_target(n))
                } else if !node_ready(n) {
                    Some("node not Ready".to_string())
                } else {
                    None
                };
                if etp_local && note.is_none() && !ready_here.contains(&name) {
                    note = Some(match spec.health_check_node_port {
                        Some(hc) if is_lb => format!(
                            "no local ready endpoint: external traffic is dropped here, and the load balancer's health check on :{hc} fails"
                        ),
                        _ => "no local ready endpoint: external traffic is dropped here".into(),
                    });
                }
                pc.nodes.push(NodeHop {
                    address: node_address(n, primary).map(|ip| join_host_port(&ip, np)),
                    node: name,
                    load_balancer_target: target,
                    note,
                });
            }
        }
        pc.summary = summary(&pc, is_lb);
        a.ports.push(pc);
    }

    for p in &o.pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut why: Vec<String> = pod_why
            .remove(&name)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if !p.ready() && !p.terminal() {
            why.insert(0, pod_ready_detail(p));
        }
        a.pods.push(PodState {
            ip: p.pod_ip().map(str::to_string),
            node: p.node_name().map(str::to_string),
            phase: p.status.as_ref().and_then(|s| s.phase.clone()),
            ready: p.ready(),
            why,
            name,
        });
    }
    a.pods.sort_by(|x, y| x.name.cmp(&y.name));

    let (problems, notes) = problems::problems(
        o,
        problems::Findings {
            selector: &selector,
            selected: selected.len(),
            pods: a.pods.len(),
            any_ready,
            named_missing,
            no_ip,
            missing_nodes,
            is_lb,
            ingress: &ing,
        },
    );
    a.problems = problems;
    a.notes = notes;
    a
}

/// The pod a slice names for `ip` (its targetRef).
fn slice_pod(o: &Observed, ip: &str) -> Option<String> {
    o.slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .find(|e| {
            e.addresses
                .first()
                .and_then(|a| parse_ip_sloppy(a))
                .is_some_and(|a| a.to_string() == ip)
        })
        .and_then(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| r.name.clone())
}

fn port_label(pc: &PortChain) -> String {
    if pc.name.is_empty() {
        format!("{}/{}", pc.port, pc.protocol)
    } else {
        pc.name.clone()
    }
}

/// `<lb>:<port> -> <node-ip>:<nodePort> (each eligible node) -> <clusterIP>:<port> -> <pod-ip>:<targetPort>`.
fn summary(pc: &PortChain, is_lb: bool) -> String {
    let mut parts: Vec<String> = vec![];
    if is_lb {
        parts.push(pc.load_balancer.join(", "));
    }
    if pc.node_port.is_some() {
        let hops: Vec<&NodeHop> = pc
            .nodes
            .iter()
            .filter(|h| !is_lb || h.load_balancer_target)
            .collect();
        let addrs: Vec<String> = hops
            .iter()
            .map(|h| h.address.clone().unwrap_or_else(|| format!("{}:?", h.node)))
            .collect();
        parts.push(if addrs.is_empty() {
            "(no eligible node)".into()
        } else {
            format!("{} (each eligible node)", addrs.join(", "))
        });
    }
    parts.push(if pc.cluster_ips.is_empty() {
        "(headless: DNS names the endpoints)".into()
    } else {
        pc.cluster_ips.join(", ")
    });
    let ready: Vec<&str> = pc
        .endpoints
        .iter()
        .filter(|e| e.routed)
        .map(|e| e.address.as_str())
        .collect();
    parts.push(if ready.is_empty() {
        "(no ready endpoint)".into()
    } else {
        ready.join(", ")
    });
    parts.join(" -> ")
}

//! Explains one Service from what the API server holds, read-only: the chain
//! load balancer -> every eligible node's NodePort -> ClusterIP -> pod for each port, with each
//! endpoint's state and why; the kube-proxy (iptables mode) rules that chain implies, named
//! as kube-proxy names them; its DNS records as CoreDNS serves them; the environment variables
//! a pod started after it gets; and its last Events.
//!
//! [`explain`] is a pure function of the observed objects ([`Observed`]) to an
//! [`Explanation`] (serde-serialisable; `-o json` prints it), [`render::text`] prints it for
//! people, and [`fetch::observe`] gathers the objects with GET and LIST calls only.

pub mod chain;
pub mod dns;
pub mod env;
pub mod fetch;
pub mod proxy;
pub mod render;
pub mod rules;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

pub use dns::DnsRecord;
pub use env::EnvVar;

/// The cluster domain CoreDNS serves when nothing else is said (kubelet's `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// How many of the Service's most recent Events are shown.
pub const MAX_EVENTS: usize = 10;

/// Everything [`explain`] reads: the Service and the objects around it.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The Service.
    pub service: Service,
    /// Its EndpointSlices (`kubernetes.io/service-name` = its name), whoever manages them.
    pub slices: Vec<EndpointSlice>,
    /// The pods its selector matches and those its slices point at.
    pub pods: Vec<Pod>,
    /// Every Node.
    pub nodes: Vec<Node>,
    /// Events about the Service (`core/v1`).
    pub events: Vec<Event>,
    /// The cluster's DNS domain (e.g. `cluster.local`).
    pub cluster_domain: String,
    /// Whether the manager runs with `--endpoint-aware-load-balancer-targets` (explain cannot
    /// read a running manager's flags: its own flag of that name says so).
    pub endpoint_aware_targets: bool,
}

/// What `explain` says about a Service.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Explanation {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.type` (`ClusterIP` when unset).
    #[serde(rename = "type")]
    pub type_: String,
    /// `spec.clusterIPs` (`None` for a headless Service).
    pub cluster_ips: Vec<String>,
    /// `spec.externalName`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    /// `spec.selector` (absent: endpoints are managed by hand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.externalTrafficPolicy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    /// `spec.internalTrafficPolicy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// `ClientIP` session affinity's timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_seconds: Option<i32>,
    /// `spec.loadBalancerClass`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    /// `status.loadBalancer.ingress`.
    pub load_balancer: Vec<chain::Ingress>,
    /// The chain of each port.
    pub ports: Vec<chain::PortChain>,
    /// The selected pods (and those the slices name), with what keeps each out of service.
    pub pods: Vec<chain::PodState>,
    /// What is wrong, most important first; empty when nothing is.
    pub problems: Vec<chain::Problem>,
    /// kube-proxy's rules per IP family and group of nodes with identical rules.
    pub iptables: Vec<rules::RuleSet>,
    /// DNS records.
    pub dns: Vec<DnsRecord>,
    /// Environment variables of pods started after the Service (same namespace).
    pub env: Vec<EnvVar>,
    /// `status.conditions` (ours: `EndpointsReady`, `LoadBalancerReady`, `ClusterIPValid`; and
    /// any other writer's), in the Service's order.
    pub conditions: Vec<ConditionLine>,
    /// The last Events about the Service, oldest first.
    pub events: Vec<EventLine>,
    /// Caveats: what the explanation cannot see or leaves out.
    pub notes: Vec<String>,
}

/// One of the Service's conditions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConditionLine {
    /// `type`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// When the status last flipped (RFC 3339).
    pub last_transition_time: String,
}

/// The Service's `status.conditions`, as they are.
pub fn conditions(svc: &Service) -> Vec<ConditionLine> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .map(|c| ConditionLine {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: c.last_transition_time.0.to_string(),
        })
        .collect()
}

/// One Event, as `kubectl describe` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventLine {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// How many times it happened.
    pub count: i32,
    /// When it last happened (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The component that reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn spec_str(o: &Option<String>) -> Option<String> {
    o.clone().filter(|s| !s.is_empty())
}

/// Explains `o.service` from the observed objects. Pure: no I/O, no clock.
pub fn explain(o: &Observed) -> Explanation {
    let svc = &o.service;
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = spec_str(&spec.type_).unwrap_or_else(|| "ClusterIP".into());
    let domain = if o.cluster_domain.is_empty() {
        DEFAULT_CLUSTER_DOMAIN
    } else {
        o.cluster_domain.as_str()
    };
    let mut cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec_str(&spec.cluster_ip));
    }
    let analysis = chain::analyse(o);
    let mut notes = analysis.notes.clone();
    let iptables = rules::rule_sets(o);
    if iptables.is_empty() {
        if type_ == "ExternalName" {
            notes.push("ExternalName: kube-proxy writes no rules; DNS answers with a CNAME".into());
        } else if !endpointslice::common::service_ip_set(svc) {
            notes.push("headless: kube-proxy writes no rules; DNS answers with the ready endpoints' addresses".into());
        }
    } else {
        notes.push(proxy::OMITTED.to_string());
    }
    Explanation {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        type_,
        cluster_ips,
        external_name: spec_str(&spec.external_name),
        selector: spec.selector.clone().filter(|s| !s.is_empty()),
        external_traffic_policy: spec_str(&spec.external_traffic_policy),
        internal_traffic_policy: spec_str(&spec.internal_traffic_policy),
        session_affinity_seconds: chain::affinity_seconds(svc),
        load_balancer_class: spec_str(&spec.load_balancer_class),
        load_balancer: chain::ingress(svc),
        ports: analysis.ports,
        pods: analysis.pods,
        problems: analysis.problems,
        iptables,
        dns: dns::records(svc, domain, &chain::dns_endpoints(o)),
        env: env::service_env(svc),
        conditions: conditions(svc),
        events: events(svc, &o.events),
        notes,
    }
}

/// Parses the `explain` argument `<namespace>/<name>`: both parts DNS labels (lower-case
/// letters, digits and `-`, at most 63 characters).
pub fn parse_service_ref(s: &str) -> Result<(String, String), String> {
    let label = |x: &str| {
        !x.is_empty()
            && x.len() <= 63
            && x.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !x.starts_with('-')
            && !x.ends_with('-')
    };
    match s.split_once('/') {
        Some((ns, name)) if label(ns) && label(name) => Ok((ns.to_string(), name.to_string())),
        _ => Err(format!("'{s}' is not <namespace>/<service>")),
    }
}

/// When an Event last happened: its series, its last timestamp, its event time, its first
/// timestamp, or its creation.
fn event_time(e: &Event) -> Option<String> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0.to_string())
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0.to_string()))
        .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0.to_string()))
        .or_else(|| {
            e.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        })
}

/// The last [`MAX_EVENTS`] Events about this Service (not an earlier one of the same name),
/// oldest first.
pub fn events(svc: &Service, evs: &[Event]) -> Vec<EventLine> {
    let uid = svc.metadata.uid.as_deref();
    let name = svc.metadata.name.as_deref();
    let mut lines: Vec<(Option<String>, EventLine)> = evs
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == name)
        .filter(|e| match (e.involved_object.uid.as_deref(), uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .map(|e| {
            let t = event_time(e);
            let source = e
                .reporting_component
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| e.source.as_ref().and_then(|s| s.component.clone()));
            let count = e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1);
            let line = EventLine {
                type_: e.type_.clone().unwrap_or_else(|| "Normal".into()),
                reason: e.reason.clone().unwrap_or_default(),
                message: e.message.clone().unwrap_or_default(),
                count,
                last_seen: t.clone(),
                source,
            };
            (t, line)
        })
        .collect();
    // RFC 3339 in UTC sorts as text; events without any time go first.
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let skip = lines.len().saturating_sub(MAX_EVENTS);
    lines.into_iter().skip(skip).map(|(_, l)| l).collect()
}

#[cfg(test)]
mod tests;

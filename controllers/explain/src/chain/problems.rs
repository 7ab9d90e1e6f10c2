//! The problems of a Service as a whole, from what the per-port analysis found.

use std::collections::{BTreeMap, BTreeSet};

use cloud_lb::core::in_stable_set;

use super::{Ingress, Problem, list};
use crate::{Observed, rules};

/// What the per-port analysis found.
pub(super) struct Findings<'a> {
    /// `spec.selector`.
    pub selector: &'a BTreeMap<String, String>,
    /// How many pods the selector matches.
    pub selected: usize,
    /// How many pods were observed (selected or named by slices).
    pub pods: usize,
    /// Whether any endpoint of any port is ready.
    pub any_ready: bool,
    /// (targetPort, protocol, pod) of named ports a pod lacks.
    pub named_missing: BTreeSet<(String, String, String)>,
    /// Selected pods without an IP.
    pub no_ip: BTreeSet<String>,
    /// Nodes endpoints name that do not exist.
    pub missing_nodes: BTreeSet<String>,
    /// Whether the Service is of type LoadBalancer.
    pub is_lb: bool,
    /// `status.loadBalancer.ingress`.
    pub ingress: &'a [Ingress],
}

/// The problems, most important first, and caveats for the notes.
pub(super) fn problems(o: &Observed, f: Findings) -> (Vec<Problem>, Vec<String>) {
    let svc = &o.service;
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let mut out: Vec<Problem> = vec![];
    let mut notes: Vec<String> = vec![];
    let sel_text = f
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut problem = |reason: &str, message: String| {
        out.push(Problem {
            reason: reason.into(),
            message,
        })
    };
    if !f.selector.is_empty() && f.selected == 0 {
        problem(
            "SelectorMatchesNothing",
            format!("the selector {sel_text} matches no pod in namespace {ns}"),
        );
    } else if f.selector.is_empty() && o.slices.is_empty() {
        problem(
            "NoEndpoints",
            "no selector and no EndpointSlices: this Service's endpoints are managed by hand (an Endpoints object of the same name is mirrored into slices)".into(),
        );
    } else if !f.any_ready {
        problem(
            "NoReadyPods",
            format!(
                "{} pod(s) selected, none of them a ready endpoint",
                f.selected.max(f.pods)
            ),
        );
    }
    if !f.named_missing.is_empty() {
        let mut by_port: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (port, proto, pod) in f.named_missing {
            by_port.entry((port, proto)).or_default().insert(pod);
        }
        for ((port, proto), pods) in by_port {
            problem(
                "NamedPortNotFound",
                format!(
                    "targetPort {port} ({proto}) is not a container port of {}",
                    list(&pods)
                ),
            );
        }
    }
    if !f.no_ip.is_empty() {
        problem("PodsWithoutIP", format!("no IP yet: {}", list(&f.no_ip)));
    }
    if !f.missing_nodes.is_empty() {
        problem(
            "NodeNotFound",
            format!(
                "pods or endpoints on nodes that do not exist: {}",
                list(&f.missing_nodes)
            ),
        );
    }
    if f.is_lb {
        if f.ingress.is_empty() {
            let last_warning = crate::events(svc, &o.events)
                .into_iter()
                .filter(|e| e.type_ == "Warning")
                .map(|e| e.message)
                .next_back();
            problem(
                "LoadBalancerPending",
                match last_warning {
                    Some(m) => format!("no load-balancer address yet; last Warning: {m}"),
                    None => {
                        "no load-balancer address yet (is a controller serving its class?)".into()
                    }
                },
            );
        }
        if !o.nodes.iter().any(in_stable_set) {
            problem(
                "NoEligibleNodes",
                "no node can be a load-balancer target".into(),
            );
        }
        if f.ingress
            .iter()
            .any(|i| i.ip_mode.as_deref() == Some("Proxy"))
        {
            notes.push("ipMode Proxy: kube-proxy does not capture the load-balancer IP; traffic arrives through the load balancer at the NodePorts".into());
        }
    }
    let hinted = o
        .slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .any(|e| e.hints.is_some());
    if hinted {
        notes.push("topology hints: kube-proxy on each node routes to the endpoints hinted for that node or its zone when every ready endpoint has such a hint (see the rule sets per node)".into());
    }
    if !rules::proxied(svc) && endpointslice::common::service_ip_set(svc) {
        notes.push(format!(
            "labelled {}: kube-proxy leaves this Service to another proxy",
            rules::LABEL_SERVICE_PROXY_NAME
        ));
    }
    (out, notes)
}

//! Which nodes a Service's load balancer points at, with endpoint-aware targets and graceful
//! drain (`--endpoint-aware-load-balancer-targets`); a pure function of the Service, the stable
//! node set and where its endpoints are.
//!
//! Upstream (k8s.io/cloud-provider v1.37, and cloud-provider-aws with it) registers the whole
//! stable node set for every Service, whatever its `externalTrafficPolicy`, and leaves it to
//! the health check on `healthCheckNodePort` to keep traffic off nodes without a local
//! endpoint; a cordoned node stays a target until it is deleted or tainted
//! `ToBeDeletedByClusterAutoscaler`. That is what we do without the flag. With it:
//!
//! * `externalTrafficPolicy: Local`: only nodes holding a ready, non-terminating endpoint of
//!   the Service are targets, so a node is deregistered (and the load balancer drains its
//!   connections) as soon as its last local endpoint starts terminating, while the pod still
//!   serves, instead of after the health check has failed its threshold.
//! * every policy: cordoned nodes (`spec.unschedulable`, as `kubectl drain` leaves them) are
//!   not targets, before their pods are evicted and the node goes.
//!
//! Neither filter ever empties the set on its own: where no node is left, the next looser
//! rule decides (Local: nodes with ready endpoints even if cordoned, then nodes with serving
//! terminating endpoints, which kube-proxy still sends local traffic to, then the stable set as
//! upstream), so a Service with no ready endpoint anywhere keeps upstream's targets.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::Endpoint;

/// Where one Service's endpoints are, by node name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointNodes {
    /// Nodes holding an endpoint that is ready and not terminating.
    pub ready: BTreeSet<String>,
    /// Nodes holding an endpoint that is serving (ready, or terminating but still serving).
    pub serving: BTreeSet<String>,
}

impl EndpointNodes {
    /// Adds one endpoint (one without `nodeName` counts nowhere). Unset conditions read as
    /// the EndpointSlice API defines them: `ready` and `serving` unknown mean ready and serving,
    /// `terminating` unknown means not terminating.
    pub fn add(&mut self, e: &Endpoint) {
        let Some(node) = e.node_name.as_deref() else {
            return;
        };
        let c = e.conditions.as_ref();
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let ready = c.and_then(|c| c.ready).unwrap_or(true) && !terminating;
        // `serving` is unset by older writers; it then follows `ready`.
        let serving = c
            .and_then(|c| c.serving)
            .unwrap_or_else(|| c.and_then(|c| c.ready).unwrap_or(true));
        if ready {
            self.ready.insert(node.to_string());
        }
        if ready || serving {
            self.serving.insert(node.to_string());
        }
    }

    /// The union of several slices' nodes.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a EndpointNodes>) -> EndpointNodes {
        let mut out = EndpointNodes::default();
        for p in parts {
            out.ready.extend(p.ready.iter().cloned());
            out.serving.extend(p.serving.iter().cloned());
        }
        out
    }
}

/// Whether the Service asks for node-local external traffic.
pub fn local_traffic(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        == Some("Local")
}

/// Whether the node is cordoned (`kubectl cordon` and `kubectl drain` set it first).
pub fn cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// The Service's targets from `stable` (upstream's stable node set, sorted by name), with
/// endpoint-aware targets and drain when `endpoint_aware`; `endpoints` is where the Service's
/// endpoints are (`None`: none known). Keeps `stable`'s order.
pub fn targets(
    svc: &Service,
    stable: &[Arc<Node>],
    endpoints: Option<&EndpointNodes>,
    endpoint_aware: bool,
) -> Vec<Arc<Node>> {
    if !endpoint_aware {
        return stable.to_vec();
    }
    let pick = |keep: &dyn Fn(&Node) -> bool| -> Vec<Arc<Node>> {
        stable.iter().filter(|n| keep(n)).cloned().collect()
    };
    let first_non_empty = |tiers: &[&dyn Fn(&Node) -> bool]| {
        tiers
            .iter()
            .map(|keep| pick(*keep))
            .find(|v| !v.is_empty())
            .unwrap_or_else(|| stable.to_vec())
    };
    if !local_traffic(svc) {
        return first_non_empty(&[&|n| !cordoned(n)]);
    }
    let none = EndpointNodes::default();
    let eps = endpoints.unwrap_or(&none);
    let on = |set: &BTreeSet<String>, n: &Node| {
        n.metadata
            .name
            .as_deref()
            .is_some_and(|name| set.contains(name))
    };
    first_non_empty(&[
        &|n| !cordoned(n) && on(&eps.ready, n),
        &|n| on(&eps.ready, n),
        &|n| on(&eps.serving, n),
    ])
}

/// Whether a node update changes what [`targets`] decides with endpoint-aware targets on:
/// cordoned or uncordoned, or the cluster autoscaler's taint put on or taken off (upstream
/// picks the taint up only at its next periodic pass; we deregister before the node goes).
pub fn drain_changed(old: &Node, new: &Node) -> bool {
    cordoned(old) != cordoned(new) || super::node_untainted(old) != super::node_untainted(new)
}

#[cfg(test)]
mod tests;

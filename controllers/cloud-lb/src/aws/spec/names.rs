//! Deterministic names of what the provider makes for a Service, and the instance IDs its
//! nodes' provider IDs name.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service};
use sha2::{Digest, Sha256};

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

pub(super) fn meta(svc: &Service) -> (&str, &str, &str) {
    (
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or(""),
        svc.metadata.uid.as_deref().unwrap_or(""),
    )
}

/// The load balancer's name: `k8s-<ns>-<name>-<hash>`, at most 32 characters, deterministic
/// for (cluster, namespace, name, uid). cloud-provider-aws uses `a` + the UID; we add a
/// readable prefix and the cluster so two clusters sharing an account never collide.
///
/// A Service adopting a load balancer (`service-controller-manager.io/adopt-load-balancer`)
/// has that one's name instead, so every lookup finds the adopted one.
pub fn load_balancer_name(cluster: &str, svc: &Service) -> String {
    if let Ok(Some(adopted)) = crate::aws::adopt::adopted_name(svc) {
        return adopted;
    }
    let (ns, name, uid) = meta(svc);
    format!(
        "k8s-{}-{}-{}",
        sanitize(ns, 8),
        sanitize(name, 8),
        short_hash(&["lb", cluster, ns, name, uid])
    )
}

/// The readable start shared by the names of every load balancer and target group made for
/// the Service `namespace/name` (`k8s-<ns>-<name>-`): the inventory sweep takes as possibly
/// ours only what starts so for the Service its tags name.
pub fn name_prefix(namespace: &str, name: &str) -> String {
    format!("k8s-{}-{}-", sanitize(namespace, 8), sanitize(name, 8))
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

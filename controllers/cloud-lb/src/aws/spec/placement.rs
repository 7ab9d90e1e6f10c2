//! Where the load balancer sits and what it targets, as cloud-provider-aws reads it:
//! `aws-load-balancer-eip-allocations` (Elastic IPs) and
//! `aws-load-balancer-private-ipv4-addresses`, each a comma-separated list paired in order with
//! the load balancer's subnets at creation (the counts must match; like the subnets, they are
//! not changed on an existing load balancer), and `aws-load-balancer-target-node-labels`
//! (`k1=v1,k2`: only nodes carrying every label, with that value when one is given, are
//! targets).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service};

use super::Scheme;
use super::annotations::{ann, bad, key_values};
use crate::provider::ProviderError;

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The Elastic IP allocation IDs for an internet-facing load balancer, one per subnet.
pub(super) fn eip_allocations(svc: &Service, scheme: Scheme) -> Result<Vec<String>, ProviderError> {
    let Some(v) = ann(svc, "eip-allocations") else {
        return Ok(vec![]);
    };
    let ids = list(v);
    if ids.is_empty() || ids.iter().any(|i| !i.starts_with("eipalloc-")) {
        return Err(bad(
            "eip-allocations",
            v,
            "expected comma-separated eipalloc-… IDs, one per subnet",
        ));
    }
    if scheme == Scheme::Internal {
        return Err(bad(
            "eip-allocations",
            v,
            "Elastic IPs need an internet-facing load balancer",
        ));
    }
    Ok(ids)
}

/// The private IPv4 addresses of an internal load balancer, one per subnet.
pub(super) fn private_ipv4_addresses(
    svc: &Service,
    scheme: Scheme,
) -> Result<Vec<String>, ProviderError> {
    let Some(v) = ann(svc, "private-ipv4-addresses") else {
        return Ok(vec![]);
    };
    let ips = list(v);
    if ips.is_empty() || ips.iter().any(|i| i.parse::<Ipv4Addr>().is_err()) {
        return Err(bad(
            "private-ipv4-addresses",
            v,
            "expected comma-separated IPv4 addresses, one per subnet",
        ));
    }
    if scheme == Scheme::InternetFacing {
        return Err(bad(
            "private-ipv4-addresses",
            v,
            "fixed private addresses need an internal load balancer",
        ));
    }
    Ok(ips)
}

/// The labels a node must carry to be a target (empty: every node).
pub(super) fn target_node_labels(svc: &Service) -> Result<BTreeMap<String, String>, ProviderError> {
    match ann(svc, "target-node-labels") {
        Some(v) => key_values("target-node-labels", v, true),
        None => Ok(BTreeMap::new()),
    }
}

/// Whether `node` carries every one of `labels` (a label given without a value only needs the
/// key), as cloud-provider-aws filters target nodes.
pub fn is_target(node: &Node, labels: &BTreeMap<String, String>) -> bool {
    let have = node.metadata.labels.as_ref();
    labels.iter().all(|(k, v)| {
        have.and_then(|l| l.get(k))
            .is_some_and(|got| v.is_empty() || got == v)
    })
}

/// The nodes of `nodes` that are the Service's targets under its `target-node-labels`.
pub fn target_nodes(svc: &Service, nodes: &[Node]) -> Result<Vec<Node>, ProviderError> {
    let labels = target_node_labels(svc)?;
    Ok(nodes
        .iter()
        .filter(|n| is_target(n, &labels))
        .cloned()
        .collect())
}

/// One subnet of a new load balancer with its Elastic IP allocation and private address.
pub type SubnetAddress = (String, Option<String>, Option<String>);

/// The (subnet, allocation, private address) triples a new load balancer is created with: the
/// lists are paired in order with the subnets and must match their number.
pub fn subnet_mappings(
    subnets: &[String],
    eips: &[String],
    private: &[String],
) -> Result<Vec<SubnetAddress>, ProviderError> {
    for (what, list) in [
        ("eip-allocations", eips),
        ("private-ipv4-addresses", private),
    ] {
        if !list.is_empty() && list.len() != subnets.len() {
            return Err(ProviderError::permanent(format!(
                "annotation {}{what} lists {} values for {} subnets ({}); give one per subnet, in the subnets' order",
                super::ANN,
                list.len(),
                subnets.len(),
                subnets.join(", ")
            )));
        }
    }
    Ok(subnets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), eips.get(i).cloned(), private.get(i).cloned()))
        .collect())
}

#[cfg(test)]
mod tests;

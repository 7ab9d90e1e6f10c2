//! Tenant safety: what a namespace user may ask of the resources every Service shares (the
//! nodes' security groups, the cluster's VPC), decided purely from the Service and what was
//! described. A refusal is a [`ProviderError::Permanent`] with one of the `REFUSED_*` codes (the
//! controller turns it into a Warning Event, a log line with the Service's key and the
//! `service_controller_loadbalancer_refusals_total{reason}` metric), made before the call it
//! guards.
//!
//! Also here: which `service.beta.kubernetes.io/aws-load-balancer-*` annotations we do not
//! implement (a Warning instead of silence), and the scrubbing of messages that could name
//! another Service's resources.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

use super::ANN;
use crate::aws::discovery::Subnet;
use crate::provider::ProviderError;

/// Code of the refusal of a health-check port that is not one of the Service's own node ports.
pub const REFUSED_HEALTH_CHECK_PORT: &str = "HealthCheckPortNotOwned";
/// Code of the refusal of a subnet outside the cluster's VPC (or not found at all).
pub const REFUSED_SUBNET: &str = "SubnetOutsideClusterVpc";
/// Code of the refusal of a Service whose security-group rules would exceed the per-Service cap.
pub const REFUSED_RULE_CAP: &str = "SecurityGroupRuleCapExceeded";

/// Ingress rules one Service may hold on the nodes' security groups unless the cloud config says
/// otherwise (`maxRulesPerService`): a third of EC2's default quota of 60 inbound rules per
/// group, so no single Service can fill a group every Service shares. A Service with one port
/// open to everything needs 2 (client + MTU); each extra source range adds one per port plus
/// its MTU rule.
pub const DEFAULT_MAX_RULES_PER_SERVICE: usize = 20;

/// The annotation suffixes (after [`ANN`]) this provider implements.
pub const SUPPORTED: &[&str] = &[
    "type",
    "nlb-target-type",
    "scheme",
    "internal",
    "subnets",
    "ip-address-type",
    "healthcheck-protocol",
    "healthcheck-port",
    "healthcheck-path",
    "healthcheck-interval",
    "healthcheck-timeout",
    "healthcheck-healthy-threshold",
    "healthcheck-unhealthy-threshold",
    "cross-zone-load-balancing-enabled",
    "additional-resource-tags",
    "target-group-attributes",
    "ssl-cert",
    "ssl-ports",
    "ssl-negotiation-policy",
    "eip-allocations",
    "private-ipv4-addresses",
    "target-node-labels",
];

/// The Service's `aws-load-balancer-*` annotations this provider does not implement (full keys,
/// sorted): each would otherwise be silently ignored.
pub fn unsupported_annotations(svc: &Service) -> BTreeSet<String> {
    svc.metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(k, _)| {
            let suffix = k.strip_prefix(ANN)?;
            (!SUPPORTED.contains(&suffix)).then(|| k.clone())
        })
        .collect()
}

/// The ports a Service may point health checks at: its own node ports and its
/// `healthCheckNodePort`. Any other port on the nodes is someone else's (another Service's node
/// port, the kubelet, SSH), and a health rule opening it to the load balancer's subnets would
/// be a hole every node's group carries.
pub fn own_node_ports(svc: &Service) -> BTreeSet<i32> {
    let spec = svc.spec.as_ref();
    let mut out: BTreeSet<i32> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.node_port)
        .filter(|p| *p > 0)
        .collect();
    if let Some(p) = spec
        .and_then(|s| s.health_check_node_port)
        .filter(|p| *p > 0)
    {
        out.insert(p);
    }
    out
}

/// Refuses a `healthcheck-port` annotation naming a port other than `traffic-port` or one of
/// the Service's own node ports.
pub fn check_health_port(svc: &Service, port: &str) -> Result<(), ProviderError> {
    if port == "traffic-port" {
        return Ok(());
    }
    let own = own_node_ports(svc);
    if port.parse::<i32>().is_ok_and(|p| own.contains(&p)) {
        return Ok(());
    }
    let list: Vec<String> = own.iter().map(i32::to_string).collect();
    Err(ProviderError::permanent(format!(
        "annotation {ANN}healthcheck-port={port:?} is refused: health checks may only use traffic-port or one of this Service's own node ports ({}), since the nodes' shared security groups are opened to the load balancer for that port",
        if list.is_empty() { "none allocated".to_string() } else { list.join(", ") }
    ))
    .with_code(REFUSED_HEALTH_CHECK_PORT))
}

/// The subnet IDs for the `subnets` annotation's entries (IDs or `Name` tags), each of which
/// must be a subnet of `vpc` (the cluster's): `found` is what EC2 described for them (by ID,
/// and by name within any VPC). An unknown or foreign subnet is refused by name; an ambiguous
/// name must be given as an ID.
pub fn subnets_in_vpc(
    requested: &[String],
    found: &[Subnet],
    vpc: &str,
) -> Result<Vec<String>, ProviderError> {
    let refuse = |why: String| {
        Err(
            ProviderError::permanent(format!("annotation {ANN}subnets: {why}"))
                .with_code(REFUSED_SUBNET),
        )
    };
    let mut out = Vec::new();
    for r in requested {
        let matches: Vec<&Subnet> = if r.starts_with("subnet-") {
            found.iter().filter(|s| &s.id == r).collect()
        } else {
            found
                .iter()
                .filter(|s| s.tags.get("Name") == Some(r))
                .collect()
        };
        let in_vpc: Vec<&&Subnet> = matches
            .iter()
            .filter(|s| s.vpc.as_deref() == Some(vpc))
            .collect();
        match (in_vpc.as_slice(), matches.is_empty()) {
            ([one], _) => out.push(one.id.clone()),
            ([], true) if r.starts_with("subnet-") => {
                return refuse(format!("subnet {r} not found"));
            }
            ([], true) => return refuse(format!("no subnet named {r:?} in VPC {vpc}")),
            ([], false) => {
                return refuse(format!(
                    "{r} is not in the cluster's VPC {vpc}; only its subnets may be used"
                ));
            }
            _ => {
                return refuse(format!(
                    "several subnets are named {r:?} in VPC {vpc}; use IDs"
                ));
            }
        }
    }
    Ok(out)
}

/// Refuses `needed` ingress rules for one Service when they exceed `cap`.
pub fn check_rule_cap(needed: usize, cap: usize) -> Result<(), ProviderError> {
    if needed <= cap {
        return Ok(());
    }
    Err(ProviderError::permanent(format!(
        "this Service needs {needed} ingress rules on the nodes' security groups, more than the {cap} one Service may use (maxRulesPerService in --cloud-config); the groups are shared by every Service, so use fewer source ranges or ports"
    ))
    .with_code(REFUSED_RULE_CAP))
}

/// `message` with every name of ours that does not start with `own_prefix` (the Service's
/// `k8s-<ns>-<name>-`) replaced, so that an Event never names another Service's load balancer
/// or target group (their names carry its namespace and name), whatever an API error echoes.
pub fn scrub_foreign_names(message: &str, own_prefix: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("k8s-") {
        // Only a name's start counts (not "...k8s-" inside a longer word).
        let boundary = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '-');
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        if boundary && looks_like_ours(name) && !name.starts_with(own_prefix) {
            out.push_str("<another Service's resource>");
        } else {
            out.push_str(name);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// `k8s-<ns>-<name>-<10 hex>`, the shape of every name we give.
fn looks_like_ours(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    matches!(parts.as_slice(), ["k8s", _, _, hash] if hash.len() == 10 && hash.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The same error with its message scrubbed by [`scrub_foreign_names`].
pub fn scrub_error(e: ProviderError, own_prefix: &str) -> ProviderError {
    match e {
        ProviderError::Retryable {
            message,
            code,
            source,
        } => ProviderError::Retryable {
            message: scrub_foreign_names(&message, own_prefix),
            code,
            source,
        },
        ProviderError::Permanent {
            message,
            code,
            source,
        } => ProviderError::Permanent {
            message: scrub_foreign_names(&message, own_prefix),
            code,
            source,
        },
        ProviderError::Throttled {
            message,
            code,
            retry_after,
            source,
        } => ProviderError::Throttled {
            message: scrub_foreign_names(&message, own_prefix),
            code,
            retry_after,
            source,
        },
    }
}

#[cfg(test)]
mod tests;

//! The assign path: what kube-apiserver's create path would store for a Service that lacks
//! its ClusterIP fields, or why it would refuse it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use rand::Rng;
use scm_allocator::{IpError, IpFamily};
use scm_runtime::ObjectKey;

use super::{Finding, Mirror, claimed_ips, needs_assignment, service_type};
use scm_allocator::Report;

/// What to write to a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Nothing,
    /// Set these fields (the whole ClusterIP-related set, as kube-apiserver would store it).
    Assign {
        /// `spec.clusterIPs` (and `spec.clusterIP` = first).
        cluster_ips: Vec<String>,
        /// `spec.ipFamilies`.
        ip_families: Vec<String>,
        /// `spec.ipFamilyPolicy`.
        ip_family_policy: String,
    },
    /// An ExternalName Service still carrying ClusterIP fields: drop them (what upstream's
    /// strategy does on a type change to ExternalName).
    Clear,
    /// The Service cannot be served as it is.
    Reject(Rejection),
}

/// Why a Service cannot get its ClusterIPs; worded as kube-apiserver's validation errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `Service "name" is invalid: field: Invalid value: ...: detail`, or the internal error.
    pub message: String,
    /// The range is full (an Event `ServiceCIDRFull` rather than an invalid Service).
    pub full: Option<Finding>,
}

impl Rejection {
    /// Event reason: ServiceCIDRFull, or ours for an invalid Service (upstream returns these
    /// to the client instead of recording them).
    pub fn reason(&self) -> &'static str {
        match &self.full {
            Some(f) => f.reason(),
            None => "ClusterIPAllocationFailed",
        }
    }
}

fn invalid(name: &str, errs: &[(String, String, String)]) -> Rejection {
    let parts: Vec<String> = errs
        .iter()
        .map(|(path, value, detail)| format!("{path}: Invalid value: {value}: {detail}"))
        .collect();
    let body = if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    };
    Rejection {
        message: format!("Service \"{name}\" is invalid: {body}"),
        full: None,
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

fn quoted_list(v: &[String]) -> String {
    format!(
        "[]string{{{}}}",
        v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")
    )
}

/// Decides the ClusterIP fields for a Service that needs them, following kube-apiserver's
/// create path (`initIPFamilyFields` then `allocClusterIPs`), and allocates in `mirror`.
pub fn plan<R: Rng + ?Sized>(mirror: &mut Mirror, svc: &Service, rng: &mut R) -> Plan {
    if !needs_assignment(svc) {
        return Plan::Nothing;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Plan::Nothing;
    };
    if service_type(svc) == "ExternalName" {
        return Plan::Clear;
    }
    let key = ObjectKey::of(svc);
    let name = svc.metadata.name.clone().unwrap_or_default();
    let configured = mirror.pool.families();
    let mut cluster_ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            spec.cluster_ip
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| vec![s])
        })
        .unwrap_or_default();
    let selectorless = spec.selector.as_ref().is_none_or(|s| s.is_empty());
    let headless = cluster_ips.first().is_some_and(|s| s == "None");
    let policy = match spec.ip_family_policy.clone() {
        Some(p) => p,
        None if headless && selectorless => "RequireDualStack".into(),
        None => "SingleStack".into(),
    };
    let mut families: Vec<IpFamily> = Vec::new();
    let mut errs: Vec<(String, String, String)> = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match IpFamily::from_k8s(f) {
            Some(fam) => families.push(fam),
            None => errs.push((
                format!("spec.ipFamilies[{i}]"),
                quoted(f),
                "must be 'IPv4' or 'IPv6'".into(),
            )),
        }
    }
    if policy == "SingleStack" {
        if cluster_ips.len() == 2 {
            errs.push((
                "spec.ipFamilyPolicy".into(),
                quoted(&policy),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified".into(),
            ));
        }
        if families.len() == 2 {
            errs.push((
                "spec.ipFamilyPolicy".into(),
                quoted(&policy),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified".into(),
            ));
        }
    }
    for (i, raw) in cluster_ips.iter().enumerate() {
        if raw == "None" {
            break;
        }
        let Ok(ip) = raw.parse::<IpAddr>() else {
            errs.push((
                format!("spec.clusterIPs[{i}]"),
                quoted(raw),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".into(),
            ));
            continue;
        };
        let fam = IpFamily::of(&ip);
        if i >= families.len() {
            if configured.contains(&fam) {
                families.push(fam);
            } else {
                errs.push((
                    format!("spec.clusterIPs[{i}]"),
                    quoted_list(&cluster_ips),
                    format!("{fam} is not configured on this cluster"),
                ));
            }
        }
    }
    if !errs.is_empty() {
        return Plan::Reject(invalid(&name, &errs));
    }
    if headless && selectorless {
        // Upstream's headless-selectorless special case: any families are allowed, even ones the cluster
        // lacks, and non-SingleStack policies get the other family appended.
        if families.is_empty() {
            families.extend(mirror.pool.default_family);
        }
        if families.len() == 1 && policy != "SingleStack" {
            families.push(match families[0] {
                IpFamily::V4 => IpFamily::V6,
                IpFamily::V6 => IpFamily::V4,
            });
        }
        return Plan::Assign {
            cluster_ips: vec!["None".into()],
            ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
            ip_family_policy: policy,
        };
    }
    if policy == "RequireDualStack" && configured.len() < 2 {
        errs.push((
            "spec.ipFamilyPolicy".into(),
            quoted(&policy),
            "this cluster is not configured for dual-stack services".into(),
        ));
    }
    for (i, fam) in families.iter().enumerate() {
        if !configured.contains(fam) {
            errs.push((
                format!("spec.ipFamilies[{i}]"),
                quoted(fam.as_k8s()),
                "not configured on this cluster".into(),
            ));
        }
    }
    if !errs.is_empty() {
        return Plan::Reject(invalid(&name, &errs));
    }
    if families.is_empty() {
        match mirror.pool.default_family {
            Some(f) => families.push(f),
            None => {
                return Plan::Reject(Rejection {
                    message: format!(
                        "Internal error occurred: failed to allocate a serviceIP for Service \"{name}\": no Service CIDR is configured"
                    ),
                    full: None,
                });
            }
        }
    }
    if policy != "SingleStack" && families.len() == 1 && configured.len() == 2 {
        let other = match families[0] {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        };
        families.push(other);
    }
    if headless {
        return Plan::Assign {
            cluster_ips,
            ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
            ip_family_policy: policy,
        };
    }
    // Requested addresses: the mirror claimed each for its oldest requester; anyone else is
    // refused as kube-apiserver refuses the create.
    for raw in &cluster_ips {
        let Ok(ip) = raw.parse::<IpAddr>() else {
            continue;
        };
        let problem = match mirror.owners.get(&ip) {
            Some(holder) if *holder == key => None,
            Some(_) => Some(IpError::Allocated.to_string()),
            None => Some(
                IpError::NotInRange {
                    ip,
                    range: mirror
                        .pool
                        .ranges
                        .iter()
                        .find(|r| r.alloc.family() == IpFamily::of(&ip))
                        .map(|r| r.spec.cidr)
                        .unwrap_or_else(|| IpNet::from(ip)),
                }
                .to_string(),
            ),
        };
        if let Some(p) = problem {
            return Plan::Reject(invalid(
                &name,
                &[(
                    "spec.clusterIPs".into(),
                    quoted_list(&cluster_ips),
                    format!("failed to allocate IP {raw}: {p}"),
                )],
            ));
        }
    }
    // Allocate what is missing, in ipFamilies order.
    let mut allocated = Vec::new();
    for (i, fam) in families.iter().enumerate() {
        if i < cluster_ips.len() {
            continue;
        }
        // An address already held for this Service (the default/kubernetes reservation, or
        // an earlier attempt whose write is not observed yet) is reused, not leaked.
        let held = mirror
            .owners
            .iter()
            .filter(|(ip, k)| **k == key && IpFamily::of(ip) == *fam)
            .map(|(ip, _)| *ip)
            .filter(|ip| {
                !cluster_ips
                    .iter()
                    .any(|c| c.parse::<IpAddr>().ok() == Some(*ip))
            })
            .min();
        if let Some(ip) = held {
            cluster_ips.push(ip.to_string());
            continue;
        }
        match mirror.take(&key, |p| p.allocate_next(*fam, rng)) {
            Ok(ip) => {
                allocated.push(ip);
                cluster_ips.push(ip.to_string());
            }
            Err(full) => {
                for ip in allocated {
                    mirror.release(ip, &key);
                }
                return Plan::Reject(Rejection {
                    message: format!(
                        "Internal error occurred: failed to allocate a serviceIP for Service \"{name}\": range is full"
                    ),
                    full: Some(full),
                });
            }
        }
    }
    Plan::Assign {
        cluster_ips,
        ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
        ip_family_policy: policy,
    }
}

/// Writes an Assign or Clear plan into the Service (the whole ClusterIP-related set, as
/// kube-apiserver would store it).
pub fn apply(plan: &Plan, svc: &mut Service) {
    let Some(spec) = svc.spec.as_mut() else {
        return;
    };
    match plan {
        Plan::Clear => {
            spec.cluster_ip = None;
            spec.cluster_ips = None;
            spec.ip_families = None;
            spec.ip_family_policy = None;
        }
        Plan::Assign {
            cluster_ips,
            ip_families,
            ip_family_policy,
        } => {
            spec.cluster_ip = cluster_ips.first().cloned();
            spec.cluster_ips = Some(cluster_ips.clone());
            spec.ip_families = Some(ip_families.clone());
            spec.ip_family_policy = Some(ip_family_policy.clone());
        }
        Plan::Nothing | Plan::Reject(_) => {}
    }
}

/// The addresses an Assign plan newly allocated (those not already on the Service).
pub fn new_ips(svc: &Service, plan: &Plan) -> Vec<IpAddr> {
    let Plan::Assign { cluster_ips, .. } = plan else {
        return vec![];
    };
    let had: BTreeSet<String> = claimed_ips(svc).into_iter().collect();
    cluster_ips
        .iter()
        .filter(|s| !had.contains(*s))
        .filter_map(|s| s.parse().ok())
        .collect()
}

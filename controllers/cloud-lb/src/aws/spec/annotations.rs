//! Reading the Service's `service.beta.kubernetes.io/aws-load-balancer-*` annotations (and the
//! generic source-ranges one): each invalid value is a [`ProviderError::Permanent`] naming it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;

use super::{ANN, HealthCheck, Scheme};
use crate::provider::ProviderError;

pub(super) fn ann<'a>(svc: &'a Service, suffix: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(&format!("{ANN}{suffix}"))
        .map(|s| s.trim())
}

pub(super) fn bad(suffix: &str, value: &str, why: &str) -> ProviderError {
    ProviderError::permanent(format!(
        "annotation {ANN}{suffix}={value:?} is invalid: {why}"
    ))
}

fn int_ann(svc: &Service, suffix: &str, lo: i32, hi: i32) -> Result<Option<i32>, ProviderError> {
    match ann(svc, suffix) {
        None => Ok(None),
        Some(v) => match v.parse::<i32>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(bad(
                suffix,
                v,
                &format!("expected an integer from {lo} to {hi}"),
            )),
        },
    }
}

/// Parses `k1=v1,k2=v2,k3` (a missing `=` means an empty value, as cloud-provider-aws reads
/// additional resource tags).
pub(super) fn key_values(
    suffix: &str,
    v: &str,
    allow_empty_value: bool,
) -> Result<BTreeMap<String, String>, ProviderError> {
    let mut out = BTreeMap::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = match item.split_once('=') {
            Some((k, val)) => (k.trim(), val.trim()),
            None if allow_empty_value => (item, ""),
            None => return Err(bad(suffix, v, &format!("{item:?} is not key=value"))),
        };
        if k.is_empty() {
            return Err(bad(suffix, v, "empty key"));
        }
        out.insert(k.to_string(), val.to_string());
    }
    Ok(out)
}

pub(super) fn scheme(svc: &Service) -> Result<Scheme, ProviderError> {
    if let Some(v) = ann(svc, "scheme") {
        return match v {
            "internal" => Ok(Scheme::Internal),
            "internet-facing" => Ok(Scheme::InternetFacing),
            _ => Err(bad("scheme", v, "expected internal or internet-facing")),
        };
    }
    // cloud-provider-aws: any value other than "false" (including a CIDR such as 0.0.0.0/0)
    // asks for an internal load balancer.
    match ann(svc, "internal") {
        Some("false") | None => Ok(Scheme::InternetFacing),
        Some(_) => Ok(Scheme::Internal),
    }
}

pub(super) fn health_check(svc: &Service) -> Result<HealthCheck, ProviderError> {
    let spec = svc.spec.as_ref();
    let local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    // cloud-provider-aws's NLB defaults: TCP on the traffic port every 30 s (timeout 10,
    // thresholds 3); for externalTrafficPolicy Local an HTTP check of kube-proxy's
    // /healthz on healthCheckNodePort every 10 s (timeout 6, thresholds 2), so nodes
    // without local endpoints drop out.
    let mut hc = if local {
        let port = spec.and_then(|s| s.health_check_node_port).unwrap_or(0);
        if port == 0 {
            return Err(ProviderError::retryable(
                "externalTrafficPolicy is Local but healthCheckNodePort is not allocated yet",
            )
            .with_code(crate::core::condition::AWAITING_NODE_PORT));
        }
        HealthCheck {
            protocol: "HTTP".into(),
            port: port.to_string(),
            path: Some("/healthz".into()),
            interval: 10,
            timeout: 6,
            healthy: 2,
            unhealthy: 2,
        }
    } else {
        HealthCheck {
            protocol: "TCP".into(),
            port: "traffic-port".into(),
            path: None,
            interval: 30,
            timeout: 10,
            healthy: 3,
            unhealthy: 3,
        }
    };
    if let Some(v) = ann(svc, "healthcheck-protocol") {
        hc.protocol = match v.to_ascii_uppercase().as_str() {
            p @ ("TCP" | "HTTP" | "HTTPS") => p.to_string(),
            _ => {
                return Err(bad(
                    "healthcheck-protocol",
                    v,
                    "expected TCP, HTTP or HTTPS",
                ));
            }
        };
        if hc.protocol == "TCP" {
            hc.path = None;
        } else if hc.path.is_none() {
            hc.path = Some("/".into());
        }
    }
    if let Some(v) = ann(svc, "healthcheck-port") {
        hc.port = match v {
            "traffic-port" => v.to_string(),
            _ => match v.parse::<u16>() {
                Ok(p) if p > 0 => p.to_string(),
                _ => {
                    return Err(bad(
                        "healthcheck-port",
                        v,
                        "expected traffic-port or 1-65535",
                    ));
                }
            },
        };
        super::tenant::check_health_port(svc, &hc.port)?;
    }
    if let Some(v) = ann(svc, "healthcheck-path") {
        if !v.starts_with('/') {
            return Err(bad("healthcheck-path", v, "must start with /"));
        }
        if hc.protocol == "TCP" {
            return Err(bad(
                "healthcheck-path",
                v,
                "a path needs healthcheck-protocol HTTP or HTTPS",
            ));
        }
        hc.path = Some(v.to_string());
    }
    if let Some(n) = int_ann(svc, "healthcheck-interval", 5, 300)? {
        hc.interval = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-timeout", 2, 120)? {
        hc.timeout = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-healthy-threshold", 2, 10)? {
        hc.healthy = n;
    }
    if let Some(n) = int_ann(svc, "healthcheck-unhealthy-threshold", 2, 10)? {
        hc.unhealthy = n;
    }
    if hc.timeout >= hc.interval {
        return Err(ProviderError::permanent(format!(
            "health check timeout {}s must be shorter than its interval {}s",
            hc.timeout, hc.interval
        )));
    }
    Ok(hc)
}

/// True for `aws-load-balancer-type: external`: the AWS Load Balancer Controller's Services,
/// which cloud-provider-aws also leaves alone (ImplementedElsewhere).
pub fn is_external(svc: &Service) -> bool {
    ann(svc, "type") == Some("external")
}

/// The key of the generic source-ranges annotation, read when the spec field is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Client ranges as k8s.io/cloud-provider reads them: the spec field, else the annotation,
/// else 0.0.0.0/0; host bits are dropped (`10.0.0.1/8` means 10.0.0.0/8). Where we differ: a
/// dual-stack load balancer also gets ::/0 by default, since upstream's IPv4-only default
/// would shut its IPv6 clients out.
pub(super) fn source_ranges(
    svc: &Service,
    ip_address_type: &str,
) -> Result<BTreeSet<ipnet::IpNet>, ProviderError> {
    let field: Vec<&str> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten()
        .map(|r| r.trim())
        .collect();
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let (origin, items): (&str, Vec<&str>) = if !field.is_empty() {
        ("spec.loadBalancerSourceRanges", field)
    } else if let Some(v) = annotation {
        (
            SOURCE_RANGES_ANNOTATION,
            v.split(',').map(str::trim).collect(),
        )
    } else if ip_address_type == "dualstack" {
        ("default", vec!["0.0.0.0/0", "::/0"])
    } else {
        ("default", vec!["0.0.0.0/0"])
    };
    let mut out = BTreeSet::new();
    for r in items {
        match r.parse::<ipnet::IpNet>() {
            Ok(n) => {
                out.insert(n.trunc());
            }
            Err(_) => {
                return Err(ProviderError::permanent(format!(
                    "{origin}: {r:?} is not a CIDR (for example 10.0.0.0/24)"
                )));
            }
        }
    }
    Ok(out)
}

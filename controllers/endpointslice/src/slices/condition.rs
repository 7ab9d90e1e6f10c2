//! The Service's `EndpointsReady` condition (pure): whether every port of the Service has at
//! least one ready endpoint, and if not, the first reason why, in the order an operator fixes
//! them (nothing selected, no addresses, nothing ready, a named port missing). Messages carry
//! no counts, so scaling a healthy Service never rewrites its condition.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use scm_runtime::conditions::Desired;

use crate::common::*;
use crate::pod::PodView;

/// The condition type this controller owns.
pub const ENDPOINTS_READY: &str = "EndpointsReady";
/// Every condition type the `endpointslice` controller owns (for removal).
pub const OWNED: &[&str] = &[ENDPOINTS_READY];

/// `EndpointsReady` for a Service with a selector, from the pods that selector matches.
pub fn endpoints_ready<P: PodView + ?Sized>(svc: &Service, pods: &[&P]) -> Desired {
    let spec = svc.spec.clone().unwrap_or_default();
    let selector = spec
        .selector
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    if pods.is_empty() {
        return Desired::failed(
            ENDPOINTS_READY,
            "SelectorMatchesNothing",
            format!("the selector {selector} matches no pod in namespace {ns}"),
        );
    }
    let live: Vec<&P> = pods.iter().copied().filter(|p| !pod_terminal(*p)).collect();
    if live.is_empty() {
        return Desired::failed(
            ENDPOINTS_READY,
            "NoReadyPods",
            format!("every pod the selector {selector} matches has finished (Succeeded or Failed)"),
        );
    }
    let with_ip: Vec<&P> = live
        .into_iter()
        .filter(|p| pod_in_endpoints(*p, true))
        .collect();
    if with_ip.is_empty() {
        return Desired::failed(
            ENDPOINTS_READY,
            "PodsWithoutIP",
            format!(
                "no pod the selector {selector} matches has an IP yet (not scheduled or not started)"
            ),
        );
    }
    let publish = spec.publish_not_ready_addresses.unwrap_or(false);
    let ready: Vec<&P> = with_ip
        .into_iter()
        .filter(|p| publish || (pod_ready(*p) && !pod_terminating(*p)))
        .collect();
    if ready.is_empty() {
        return Desired::failed(
            ENDPOINTS_READY,
            "NoReadyPods",
            format!("pods match the selector {selector}, but none is Ready"),
        );
    }
    let missing: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .filter(|sp| matches!(&sp.target_port, Some(IntOrString::String(n)) if n.parse::<i32>().is_err()))
        .filter(|sp| ready.iter().all(|p| find_port(*p, sp).is_none()))
        .map(|sp| {
            let target = match &sp.target_port {
                Some(IntOrString::String(n)) => n.clone(),
                _ => String::new(),
            };
            format!(
                "{target} ({})",
                sp.protocol.as_deref().unwrap_or("TCP")
            )
        })
        .collect();
    if !missing.is_empty() {
        return Desired::failed(
            ENDPOINTS_READY,
            "NamedPortNotFound",
            format!(
                "targetPort {} is not a container port of any ready pod: that port has no endpoints",
                missing.join(", ")
            ),
        );
    }
    Desired::ok(
        ENDPOINTS_READY,
        "EndpointsReady",
        "every port has at least one ready endpoint",
    )
}

#[cfg(test)]
mod tests;

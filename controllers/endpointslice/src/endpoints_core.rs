//! The legacy Endpoints controller's pure core: one `Endpoints` object per selector Service,
//! ready pods in `addresses`, not-ready ones in `notReadyAddresses`, at most 1000 addresses
//! with the `endpoints.kubernetes.io/over-capacity: truncated` annotation past that, as
//! kube-controller-manager's endpoints controller still maintains it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::common::*;
use crate::mirror_core::repack_subsets;
use crate::slices::trigger_time::annotate;

/// Addresses an Endpoints object may hold before it is truncated.
pub const MAX_CAPACITY: usize = 1000;
/// `endpoints.kubernetes.io/over-capacity`.
pub const OVER_CAPACITY_ANNOTATION: &str = "endpoints.kubernetes.io/over-capacity";
/// `endpoints.kubernetes.io/managed-by`.
pub const ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
/// Its value, upstream's (v1.33+): there is one Endpoints object per Service whoever writes it,
/// so a value of our own would only make kube-controller-manager and us rewrite each other's,
/// and the mirroring controllers recognise managed Endpoints by this exact value.
pub const ENDPOINTS_CONTROLLER_NAME: &str = "endpoint-controller";

/// What to write for one Service's Endpoints.
#[derive(Debug, PartialEq)]
pub enum EndpointsPlan {
    /// Already right.
    Unchanged,
    /// Create this object.
    Create(Endpoints),
    /// Replace with this object (carries the resourceVersion read).
    Update(Endpoints),
}

fn address_for<P: PodView>(svc: &Service, pod: &P) -> Option<EndpointAddress> {
    let spec = svc.spec.clone().unwrap_or_default();
    let want_v6 = if let Some(f) = spec.ip_families.as_ref().and_then(|f| f.first()) {
        f == "IPv6"
    } else if let Some(cip) = spec
        .cluster_ip
        .as_deref()
        .filter(|c| !c.is_empty() && *c != "None")
    {
        parse_ip_sloppy(cip).is_some_and(|ip| ip.is_ipv6())
    } else {
        pod.pod_ip()
            .and_then(parse_ip_sloppy)
            .is_some_and(|ip| ip.is_ipv6())
    };
    let ip = pod
        .pod_ips()
        .filter_map(parse_ip_sloppy)
        .find(|ip| ip.is_ipv6() == want_v6)?;
    Some(EndpointAddress {
        ip: ip.to_string(),
        node_name: Some(pod.node_name().unwrap_or_default().to_string()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.namespace().map(String::from),
            name: pod.name().map(String::from),
            uid: pod.uid().map(String::from),
            ..Default::default()
        }),
        hostname: if should_set_hostname(pod, svc) {
            pod.hostname().map(String::from)
        } else {
            None
        },
    })
}

/// The subsets upstream computes for a Service's pods (repacked, in our canonical order).
pub fn desired_subsets<P: PodView>(svc: &Service, pods: &[&P]) -> Vec<EndpointSubset> {
    let spec = svc.spec.clone().unwrap_or_default();
    let publish = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut subsets = Vec::new();
    for pod in pods {
        if !pod_in_endpoints(pod, publish) {
            continue;
        }
        let Some(addr) = address_for(svc, pod) else {
            continue;
        };
        let ready = publish || pod_ready(pod);
        let mk = |ports: Option<Vec<EndpointPort>>| EndpointSubset {
            addresses: ready.then(|| vec![addr.clone()]),
            not_ready_addresses: (!ready).then(|| vec![addr.clone()]),
            ports,
        };
        let ports = spec.ports.clone().unwrap_or_default();
        if ports.is_empty() {
            if service_headless(svc) {
                subsets.push(mk(None));
            }
        } else {
            for sp in &ports {
                let Some(n) = find_port(pod, sp) else {
                    continue;
                };
                subsets.push(mk(Some(vec![EndpointPort {
                    name: sp.name.clone().filter(|n| !n.is_empty()),
                    port: n,
                    protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    app_protocol: sp.app_protocol.clone(),
                }])));
            }
        }
    }
    canonical(repack_subsets(&subsets))
}

/// Sorts addresses by (IP, UID) and ports by key so two equal subset lists compare equal.
fn canonical(mut subsets: Vec<EndpointSubset>) -> Vec<EndpointSubset> {
    let addr_key = |a: &EndpointAddress| {
        (
            a.ip.clone(),
            a.target_ref
                .as_ref()
                .and_then(|r| r.uid.clone())
                .unwrap_or_default(),
        )
    };
    for s in &mut subsets {
        for l in [&mut s.addresses, &mut s.not_ready_addresses] {
            if let Some(v) = l.as_mut() {
                v.sort_by_key(addr_key);
            }
            if l.as_ref().is_some_and(Vec::is_empty) {
                *l = None;
            }
        }
        if let Some(p) = s.ports.as_mut() {
            p.sort_by_key(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.port,
                    p.protocol.clone(),
                )
            });
        }
    }
    subsets.sort_by_key(|s| {
        let first = s
            .addresses
            .iter()
            .chain(s.not_ready_addresses.iter())
            .flatten()
            .map(addr_key)
            .min();
        (
            first,
            s.ports
                .as_ref()
                .map(|p| p.iter().map(|p| p.port).collect::<Vec<_>>()),
        )
    });
    subsets
}

fn strip_rv(subsets: &[EndpointSubset]) -> Vec<EndpointSubset> {
    let mut s = subsets.to_vec();
    for sub in &mut s {
        for l in [&mut sub.addresses, &mut sub.not_ready_addresses] {
            for a in l.iter_mut().flatten() {
                if let Some(r) = a.target_ref.as_mut() {
                    r.resource_version = None;
                }
                if a.hostname.as_deref() == Some("") {
                    a.hostname = None;
                }
            }
        }
    }
    s
}

/// Upstream's `truncateEndpoints`: keep ready addresses first; cut each subset in proportion.
/// Returns whether anything was cut.
pub fn truncate(subsets: &mut [EndpointSubset]) -> bool {
    let total_ready: usize = subsets
        .iter()
        .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
        .sum();
    let total_not_ready: usize = subsets
        .iter()
        .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
        .sum();
    if total_ready + total_not_ready <= MAX_CAPACITY {
        return false;
    }
    let truncate_ready = total_ready > MAX_CAPACITY;
    let (max, num_total) = if truncate_ready {
        (MAX_CAPACITY, total_ready)
    } else {
        (MAX_CAPACITY - total_ready, total_not_ready)
    };
    let mut can_add = max;
    for s in subsets.iter_mut() {
        let n = if truncate_ready {
            s.addresses.as_ref().map_or(0, Vec::len)
        } else {
            s.not_ready_addresses.as_ref().map_or(0, Vec::len)
        };
        let to_add = ((n as f64 / num_total as f64) * max as f64).ceil() as usize;
        let to_add = to_add.min(can_add);
        if truncate_ready {
            if let Some(a) = s.addresses.as_mut() {
                a.truncate(to_add);
                can_add -= a.len();
            }
            s.not_ready_addresses = None;
        } else if let Some(a) = s.not_ready_addresses.as_mut() {
            a.truncate(to_add);
            can_add -= a.len();
        }
    }
    true
}

/// Computes the Endpoints write for `svc`, given the current object (if any). What is written
/// carries `trigger_time` (seconds since the Unix epoch; see `slices::trigger_time`) or loses
/// the annotation; it never makes a write by itself.
pub fn plan<P: PodView>(
    svc: &Service,
    pods: &[&P],
    current: Option<&Endpoints>,
    trigger_time: Option<i64>,
) -> EndpointsPlan {
    let mut subsets = desired_subsets(svc, pods);
    let truncated = truncate(&mut subsets);
    let svc_labels = labels_of(&svc.metadata.labels);
    let mut labels = svc_labels.clone();
    if service_ip_set(svc) {
        labels.remove(LABEL_HEADLESS);
    } else {
        labels.insert(LABEL_HEADLESS.into(), String::new());
    }
    labels.insert(
        ENDPOINTS_MANAGED_BY.into(),
        ENDPOINTS_CONTROLLER_NAME.into(),
    );
    if let Some(cur) = current {
        let cur_subsets = cur.subsets.clone().unwrap_or_default();
        let same_subsets = strip_rv(&canonical(repack_subsets(&cur_subsets))) == strip_rv(&subsets);
        let cur_labels = labels_of(&cur.metadata.labels);
        let cur_ann = labels_of(&cur.metadata.annotations);
        let cap_ok = cur_ann.get(OVER_CAPACITY_ANNOTATION).map(String::as_str)
            == truncated.then_some("truncated");
        if same_subsets && cur_labels == labels && cap_ok {
            return EndpointsPlan::Unchanged;
        }
        let mut ann = Some(cur_ann);
        annotate(&mut ann, trigger_time);
        let mut ann: BTreeMap<String, String> = ann.unwrap_or_default();
        if truncated {
            ann.insert(OVER_CAPACITY_ANNOTATION.into(), "truncated".into());
        } else {
            ann.remove(OVER_CAPACITY_ANNOTATION);
        }
        let mut next = cur.clone();
        next.metadata.labels = Some(labels);
        next.metadata.annotations = Some(ann);
        next.subsets = Some(subsets);
        return EndpointsPlan::Update(next);
    }
    let mut ann = None;
    annotate(&mut ann, trigger_time);
    let mut ann: BTreeMap<String, String> = ann.unwrap_or_default();
    if truncated {
        ann.insert(
            OVER_CAPACITY_ANNOTATION.to_string(),
            "truncated".to_string(),
        );
    }
    EndpointsPlan::Create(Endpoints {
        metadata: ObjectMeta {
            name: svc.metadata.name.clone(),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(ann),
            ..Default::default()
        },
        subsets: Some(subsets),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Pod, PodCondition, PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec,
    };

    fn svc(publish: bool) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                labels: Some(
                    [("app".to_string(), "web".to_string())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                ip_families: Some(vec!["IPv4".into()]),
                selector: Some(
                    [("app".to_string(), "web".to_string())]
                        .into_iter()
                        .collect(),
                ),
                publish_not_ready_addresses: Some(publish),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(i: usize, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("p{i}")),
                namespace: Some("ns".into()),
                uid: Some(format!("uid{i}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)),
                pod_ips: Some(vec![PodIP {
                    ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn ready_and_not_ready_split_and_stable() {
        let pods = [pod(1, true), pod(2, false)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let EndpointsPlan::Create(ep) = plan(&svc(false), &refs, None, None) else {
            panic!("expected create");
        };
        let subsets = ep.subsets.clone().unwrap_or_default();
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0].addresses.as_ref().map_or(0, Vec::len), 1);
        assert_eq!(
            subsets[0].not_ready_addresses.as_ref().map_or(0, Vec::len),
            1
        );
        assert_eq!(
            plan(&svc(false), &refs, Some(&ep), None),
            EndpointsPlan::Unchanged
        );
        // publishNotReadyAddresses puts both in addresses.
        let EndpointsPlan::Update(ep2) = plan(&svc(true), &refs, Some(&ep), None) else {
            panic!("expected update");
        };
        let s2 = ep2.subsets.unwrap_or_default();
        assert_eq!(s2[0].addresses.as_ref().map_or(0, Vec::len), 2);
    }

    #[test]
    fn over_capacity_truncates_and_annotates() {
        let pods: Vec<Pod> = (0..1100).map(|i| pod(i, i % 2 == 0)).collect();
        let refs: Vec<&Pod> = pods.iter().collect();
        let EndpointsPlan::Create(ep) = plan(&svc(false), &refs, None, None) else {
            panic!("expected create");
        };
        let subsets = ep.subsets.clone().unwrap_or_default();
        let ready: usize = subsets
            .iter()
            .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
            .sum();
        let nr: usize = subsets
            .iter()
            .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
            .sum();
        assert_eq!(ready, 550);
        assert_eq!(ready + nr, 1000);
        assert_eq!(
            labels_of(&ep.metadata.annotations)
                .get(OVER_CAPACITY_ANNOTATION)
                .map(String::as_str),
            Some("truncated")
        );
        assert_eq!(
            plan(&svc(false), &refs, Some(&ep), None),
            EndpointsPlan::Unchanged
        );
    }

    #[test]
    fn labelled_as_upstream_so_kube_controller_manager_agrees() {
        let pods = [pod(1, true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let EndpointsPlan::Create(ep) = plan(&svc(false), &refs, None, None) else {
            panic!("expected create");
        };
        let labels = labels_of(&ep.metadata.labels);
        assert_eq!(
            labels
                .get("endpoints.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("endpoint-controller")
        );
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        // An object an older version of us labelled with a value of its own is relabelled.
        let mut old = ep.clone();
        old.metadata.labels.as_mut().map(|l| {
            l.insert(
                ENDPOINTS_MANAGED_BY.into(),
                "endpoint-controller.service-controller-manager.k8s.io".into(),
            )
        });
        let EndpointsPlan::Update(fixed) = plan(&svc(false), &refs, Some(&old), None) else {
            panic!("expected update");
        };
        assert_eq!(fixed.metadata.labels, ep.metadata.labels);
    }

    #[test]
    fn what_is_written_carries_the_trigger_time_which_never_writes_alone() {
        const ANN: &str = "endpoints.kubernetes.io/last-change-trigger-time";
        let t0 = 1_780_000_000;
        let pods = [pod(1, true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let EndpointsPlan::Create(ep) = plan(&svc(false), &refs, None, Some(t0)) else {
            panic!("expected create");
        };
        let ann = |e: &Endpoints| labels_of(&e.metadata.annotations).get(ANN).cloned();
        assert_eq!(ann(&ep).as_deref(), Some("2026-05-28T20:26:40Z"));
        assert_eq!(
            plan(&svc(false), &refs, Some(&ep), Some(t0 + 9)),
            EndpointsPlan::Unchanged
        );
        let flipped = [pod(1, false)];
        let refs: Vec<&Pod> = flipped.iter().collect();
        let EndpointsPlan::Update(up) = plan(&svc(false), &refs, Some(&ep), Some(t0 + 9)) else {
            panic!("expected update");
        };
        assert_eq!(ann(&up).as_deref(), Some("2026-05-28T20:26:49Z"));
        let EndpointsPlan::Update(up) = plan(&svc(false), &refs, Some(&ep), None) else {
            panic!("expected update");
        };
        assert_eq!(ann(&up), None, "no trigger time: the old one is cleared");
    }
}

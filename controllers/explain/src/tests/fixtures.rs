//! Fixtures: a Service, pods, nodes, slices and Events as the API would hold them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Event, Node, NodeAddress, NodeCondition, NodeStatus, ObjectReference,
    Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::Explanation;
use crate::Observed;

pub(super) const NS: &str = "shop";

pub(super) fn svc(name: &str, type_: &str, target: IntOrString) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            cluster_ip: Some("10.96.0.20".into()),
            cluster_ips: Some(vec!["10.96.0.20".into()]),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(target),
                node_port: (type_ != "ClusterIP").then_some(30080),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

pub(super) fn pod(name: &str, app: &str, ip: Option<&str>, ready: bool, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some([("app".to_string(), app.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("web".into()),
                    container_port: 8080,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ip.map(Into::into),
            pod_ips: ip.map(|i| vec![PodIP { ip: i.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: (!ready).then(|| "ContainersNotReady".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub(super) fn node(name: &str, ip: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A slice of `svc` with port `http` -> 8080 and endpoints (ip, pod, node, ready).
pub(super) fn slice(svc: &str, eps: &[(&str, &str, &str, bool)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc}-abc")),
            namespace: Some(NS.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                svc.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            eps.iter()
                .map(|(ip, pod, node, ready)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*ready),
                        terminating: Some(false),
                    }),
                    node_name: Some(node.to_string()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.to_string()),
                        namespace: Some(NS.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

pub(super) fn observed(
    service: Service,
    slices: Vec<EndpointSlice>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
) -> Observed {
    Observed {
        service,
        slices,
        pods,
        nodes,
        events: vec![],
        cluster_domain: "cluster.local".into(),
        endpoint_aware_targets: false,
    }
}

pub(super) fn reasons(x: &Explanation) -> Vec<&str> {
    x.problems.iter().map(|p| p.reason.as_str()).collect()
}

pub(super) fn event(name: &str, uid: &str, type_: &str, reason: &str, msg: &str, at: i64) -> Event {
    Event {
        involved_object: ObjectReference {
            kind: Some("Service".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        message: Some(msg.into()),
        last_timestamp: Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + at).expect("time"),
        )),
        count: Some(1),
        ..Default::default()
    }
}

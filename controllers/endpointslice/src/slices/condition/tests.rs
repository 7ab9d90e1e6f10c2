use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::*;

fn svc(target: IntOrString) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                target_port: Some(target),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod(ip: Option<&str>, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ip.map(String::from),
            pod_ips: ip.map(|i| vec![k8s_openapi::api::core::v1::PodIP { ip: i.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn reason(s: &Service, pods: &[Pod]) -> (bool, &'static str) {
    let refs: Vec<&Pod> = pods.iter().collect();
    let d = endpoints_ready(s, &refs);
    (d.ok, d.reason)
}

#[test]
fn each_reason_in_the_order_an_operator_fixes_them() {
    let named = svc(IntOrString::String("http".into()));
    assert_eq!(reason(&named, &[]), (false, "SelectorMatchesNothing"));
    assert_eq!(
        reason(&named, &[pod(None, false)]),
        (false, "PodsWithoutIP")
    );
    assert_eq!(
        reason(&named, &[pod(Some("10.0.0.1"), false), pod(None, false)]),
        (false, "NoReadyPods")
    );
    assert_eq!(
        reason(&named, &[pod(Some("10.0.0.1"), true)]),
        (true, "EndpointsReady")
    );
    let missing = svc(IntOrString::String("metrics".into()));
    assert_eq!(
        reason(&missing, &[pod(Some("10.0.0.1"), true)]),
        (false, "NamedPortNotFound")
    );
    let numeric = svc(IntOrString::Int(8080));
    assert_eq!(
        reason(&numeric, &[pod(Some("10.0.0.1"), true)]),
        (true, "EndpointsReady")
    );
}

#[test]
fn finished_and_deleting_pods_are_not_ready_endpoints() {
    let s = svc(IntOrString::Int(8080));
    let mut done = pod(Some("10.0.0.1"), true);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert_eq!(reason(&s, &[done]), (false, "NoReadyPods"));
    let mut going = pod(Some("10.0.0.2"), true);
    going.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(reason(&s, &[going.clone()]), (false, "NoReadyPods"));
    // publishNotReadyAddresses makes every pod with an address a ready endpoint.
    let mut publish = s.clone();
    publish.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    assert_eq!(
        reason(&publish, &[pod(Some("10.0.0.3"), false)]),
        (true, "EndpointsReady")
    );
}

#[test]
fn scaling_a_healthy_service_keeps_the_same_condition() {
    let s = svc(IntOrString::Int(8080));
    let one = [pod(Some("10.0.0.1"), true)];
    let three = [
        pod(Some("10.0.0.1"), true),
        pod(Some("10.0.0.2"), true),
        pod(Some("10.0.0.3"), false),
    ];
    let a = endpoints_ready(&s, &one.iter().collect::<Vec<_>>());
    let b = endpoints_ready(&s, &three.iter().collect::<Vec<_>>());
    assert_eq!(a, b, "no count in the message: no write on scaling");
}

//! The desired load balancer from Services: names, annotations, health checks, ranges.

use super::*;
use k8s_openapi::api::core::v1::{Node, NodeSpec, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

/// A LoadBalancer Service `default/web` with these annotations (suffixes of [`ANN`]) and
/// (port, protocol, nodePort) ports; the ELBv2 plan tests build theirs with it too.
pub(crate) fn svc(ann: &[(&str, &str)], ports: &[(i32, &str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("0f1c-uid".into()),
            annotations: Some(
                ann.iter()
                    .map(|(k, v)| (format!("{ANN}{k}"), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(p, proto, np)| ServicePort {
                        port: *p,
                        protocol: Some(proto.to_string()),
                        node_port: Some(*np),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

fn defaults() -> Defaults {
    Defaults {
        subnets: vec!["subnet-1".into()],
    }
}

#[test]
fn names_fit_and_are_deterministic() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let a = load_balancer_name("c1", &s);
    assert_eq!(a, load_balancer_name("c1", &s));
    assert_ne!(a, load_balancer_name("c2", &s));
    assert!(a.len() <= MAX_NAME, "{a}");
    let t1 = target_group_name("c1", &s, 80, "TCP", 30080);
    let t2 = target_group_name("c1", &s, 80, "TCP", 30081);
    assert_ne!(t1, t2, "a node port change must give a new target group");
    assert!(!a.starts_with("internal-"));
}

proptest! {
    #[test]
    fn names_always_valid(ns in "[a-z0-9-]{1,63}", name in "[a-z0-9-]{1,63}", cluster in "\\PC{0,40}") {
        let mut s = svc(&[], &[(80, "TCP", 30080)]);
        s.metadata.namespace = Some(ns);
        s.metadata.name = Some(name);
        for n in [load_balancer_name(&cluster, &s), target_group_name(&cluster, &s, 65535, "TCP_UDP", 32767)] {
            prop_assert!(n.len() <= MAX_NAME);
            prop_assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            prop_assert!(!n.starts_with('-') && !n.ends_with('-'));
        }
    }
}

#[test]
fn tcp_udp_on_one_port_merges() {
    let s = svc(
        &[],
        &[(53, "TCP", 30053), (53, "UDP", 30053), (80, "TCP", 30080)],
    );
    let d = desired("c", &s, &defaults()).expect("valid");
    let protos: Vec<_> = d
        .listeners
        .iter()
        .map(|l| (l.port, l.protocol.as_str()))
        .collect();
    assert_eq!(protos, vec![(53, "TCP_UDP"), (80, "TCP")]);
    assert_eq!(d.target_groups.len(), 2);
    let bad = svc(&[], &[(53, "TCP", 30053), (53, "UDP", 30054)]);
    assert!(desired("c", &bad, &defaults()).is_err_and(|e| e.is_permanent()));
}

#[test]
fn health_checks_follow_traffic_policy() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired("c", &s, &defaults()).expect("valid");
    assert_eq!(d.target_groups[0].health.protocol, "TCP");
    assert_eq!(d.target_groups[0].health.port, "traffic-port");
    let mut l = s.clone();
    if let Some(spec) = l.spec.as_mut() {
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(31999);
    }
    let d = desired("c", &l, &defaults()).expect("valid");
    let hc = &d.target_groups[0].health;
    assert_eq!(
        (hc.protocol.as_str(), hc.port.as_str(), hc.path.as_deref()),
        ("HTTP", "31999", Some("/healthz"))
    );
}

#[test]
fn annotations_parse() {
    let s = svc(
        &[
            ("scheme", "internal"),
            ("subnets", "subnet-a, subnet-b"),
            ("healthcheck-protocol", "http"),
            ("healthcheck-path", "/ready"),
            ("healthcheck-interval", "15"),
            ("healthcheck-timeout", "5"),
            ("healthcheck-healthy-threshold", "4"),
            ("cross-zone-load-balancing-enabled", "true"),
            ("additional-resource-tags", "team=a, cost-center=42,flag"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=10",
            ),
        ],
        &[(80, "TCP", 30080)],
    );
    let d = desired("c", &s, &defaults()).expect("valid");
    assert_eq!(d.scheme, Scheme::Internal);
    assert_eq!(d.subnets, vec!["subnet-a", "subnet-b"]);
    let hc = &d.target_groups[0].health;
    assert_eq!(
        (
            hc.protocol.as_str(),
            hc.path.as_deref(),
            hc.interval,
            hc.timeout,
            hc.healthy
        ),
        ("HTTP", Some("/ready"), 15, 5, 4)
    );
    assert_eq!(
        d.lb_attributes
            .get("load_balancing.cross_zone.enabled")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(d.tags.get("team").map(String::as_str), Some("a"));
    assert_eq!(d.tags.get("flag").map(String::as_str), Some(""));
    assert_eq!(
        d.tags.get("kubernetes.io/cluster/c").map(String::as_str),
        Some("owned")
    );
    assert_eq!(
        d.tags.get(SERVICE_TAG).map(String::as_str),
        Some("default/web")
    );
    assert_eq!(
        d.target_groups[0]
            .attributes
            .get("deregistration_delay.timeout_seconds")
            .map(String::as_str),
        Some("10")
    );
}

#[test]
fn internal_annotation_reads_like_cloud_provider_aws() {
    for (v, want) in [
        ("true", Scheme::Internal),
        ("0.0.0.0/0", Scheme::Internal),
        ("false", Scheme::InternetFacing),
    ] {
        let s = svc(&[("internal", v)], &[(80, "TCP", 30080)]);
        assert_eq!(
            desired("c", &s, &defaults()).expect("valid").scheme,
            want,
            "{v}"
        );
    }
}

#[test]
fn bad_annotations_are_permanent() {
    for (k, v) in [
        ("type", "clb"),
        ("scheme", "public"),
        ("nlb-target-type", "ip"),
        ("subnets", " , "),
        ("healthcheck-protocol", "UDP"),
        ("healthcheck-port", "70000"),
        ("healthcheck-interval", "3"),
        ("healthcheck-timeout", "abc"),
        ("healthcheck-path", "/x"),
        ("cross-zone-load-balancing-enabled", "maybe"),
        ("additional-resource-tags", "kubernetes.io/cluster/x=owned"),
        ("target-group-attributes", "novalue"),
        ("ip-address-type", "ipv6"),
    ] {
        let s = svc(&[(k, v)], &[(80, "TCP", 30080)]);
        let r = desired("c", &s, &defaults());
        assert!(
            r.as_ref().is_err_and(|e| e.is_permanent()),
            "{k}={v}: {r:?}"
        );
    }
    let mut ranges = svc(&[], &[(80, "TCP", 30080)]);
    if let Some(s) = ranges.spec.as_mut() {
        s.load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into(), "nope".into()]);
    }
    assert!(desired("c", &ranges, &defaults()).is_err_and(|e| e.is_permanent()));
    let mut ranges = svc(&[], &[(80, "TCP", 30080)]);
    ranges.metadata.annotations = Some(
        [(
            SOURCE_RANGES_ANNOTATION.to_string(),
            "10.0.0.0/8,x".to_string(),
        )]
        .into(),
    );
    assert!(desired("c", &ranges, &defaults()).is_err_and(|e| e.is_permanent()));
    let sctp = svc(&[], &[(80, "SCTP", 30080)]);
    assert!(desired("c", &sctp, &defaults()).is_err_and(|e| e.is_permanent()));
}

#[test]
fn subnets_by_name_or_discovered() {
    let named = svc(&[("subnets", "subnet-a, public-1")], &[(80, "TCP", 30080)]);
    assert_eq!(
        desired("c", &named, &defaults()).expect("valid").subnets,
        vec!["subnet-a", "public-1"]
    );
    // Neither annotation nor cloud config: discovered in the VPC at creation.
    let plain = svc(&[], &[(80, "TCP", 30080)]);
    assert!(
        desired("c", &plain, &Defaults::default())
            .expect("valid")
            .subnets
            .is_empty()
    );
}

#[test]
fn source_ranges_field_then_annotation_then_default() {
    let nets = |v: &[&str]| -> BTreeSet<ipnet::IpNet> {
        v.iter().map(|s| s.parse().expect("CIDR")).collect()
    };
    let mut s = svc(&[], &[(80, "TCP", 30080)]);
    assert_eq!(
        desired("c", &s, &defaults()).expect("valid").source_ranges,
        nets(&["0.0.0.0/0"])
    );
    let mut dual = svc(&[("ip-address-type", "dualstack")], &[(80, "TCP", 30080)]);
    assert_eq!(
        desired("c", &dual, &defaults())
            .expect("valid")
            .source_ranges,
        nets(&["0.0.0.0/0", "::/0"])
    );
    s.metadata.annotations = Some(
        [(
            SOURCE_RANGES_ANNOTATION.to_string(),
            " 10.1.2.3/16, 192.0.2.0/24 ".to_string(),
        )]
        .into(),
    );
    assert_eq!(
        desired("c", &s, &defaults()).expect("valid").source_ranges,
        nets(&["10.1.0.0/16", "192.0.2.0/24"])
    );
    if let Some(sp) = s.spec.as_mut() {
        sp.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
    }
    assert_eq!(
        desired("c", &s, &defaults()).expect("valid").source_ranges,
        nets(&["203.0.113.0/24"])
    );
    if let Some(sp) = dual.spec.as_mut() {
        sp.load_balancer_source_ranges = Some(vec!["2001:db8::/32".into()]);
    }
    assert_eq!(
        desired("c", &dual, &defaults())
            .expect("valid")
            .source_ranges,
        nets(&["2001:db8::/32"])
    );
}

#[test]
fn external_type_is_someone_elses() {
    let s = svc(&[("type", "external")], &[(80, "TCP", 30080)]);
    assert!(is_external(&s));
    assert!(!is_external(&svc(
        &[("type", "nlb")],
        &[(80, "TCP", 30080)]
    )));
    assert!(!is_external(&svc(&[], &[(80, "TCP", 30080)])));
}

#[test]
fn unallocated_node_port_is_retryable() {
    let s = svc(&[], &[(80, "TCP", 0)]);
    assert!(matches!(
        desired("c", &s, &defaults()),
        Err(ProviderError::Retryable { .. })
    ));
}

#[test]
fn instance_ids_from_provider_id() {
    let n = |pid: &str| Node {
        spec: Some(NodeSpec {
            provider_id: Some(pid.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        instance_id(&n("aws:///us-east-1a/i-0abc")),
        Some("i-0abc".into())
    );
    assert_eq!(instance_id(&n("aws:///i-0abc")), Some("i-0abc".into()));
    assert_eq!(instance_id(&n("gce://p/z/vm")), None);
    assert_eq!(instance_id(&n("aws:///us-east-1a/")), None);
    assert_eq!(instance_id(&Node::default()), None);
}

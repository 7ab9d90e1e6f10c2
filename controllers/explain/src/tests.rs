use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Event, Node, NodeAddress, NodeCondition, NodeStatus, ObjectReference,
    Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::proxy::{PortChains, endpoint_chain};

const NS: &str = "shop";

fn svc(name: &str, type_: &str, target: IntOrString) -> Service {
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

fn pod(name: &str, app: &str, ip: Option<&str>, ready: bool, node: &str) -> Pod {
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

fn node(name: &str, ip: &str, labels: &[(&str, &str)]) -> Node {
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
fn slice(svc: &str, eps: &[(&str, &str, &str, bool)]) -> EndpointSlice {
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

fn observed(
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
    }
}

fn reasons(x: &Explanation) -> Vec<&str> {
    x.problems.iter().map(|p| p.reason.as_str()).collect()
}

#[test]
fn cluster_ip_chain_with_a_ready_a_not_ready_and_a_named_port_miss() {
    let mut odd = pod("web-2", "web", Some("10.244.1.7"), true, "n1");
    odd.spec.as_mut().expect("spec").containers[0].ports = None;
    let o = observed(
        svc("web", "ClusterIP", IntOrString::String("web".into())),
        vec![slice(
            "web",
            &[
                ("10.244.1.5", "web-0", "n1", true),
                ("10.244.1.6", "web-1", "n1", false),
            ],
        )],
        vec![
            pod("web-0", "web", Some("10.244.1.5"), true, "n1"),
            pod("web-1", "web", Some("10.244.1.6"), false, "n1"),
            odd,
        ],
        vec![node("n1", "10.0.0.1", &[])],
    );
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["NamedPortNotFound"]);
    assert!(
        x.problems[0].message.contains("targetPort web (TCP)"),
        "{:?}",
        x.problems
    );
    let p = &x.ports[0];
    assert_eq!(p.target_port, "web");
    assert_eq!(p.summary, "10.96.0.20:80 -> 10.244.1.5:8080");
    assert!(p.nodes.is_empty() && p.load_balancer.is_empty());
    assert_eq!(p.endpoints.len(), 2);
    assert!(p.endpoints[0].ready && p.endpoints[0].routed && p.endpoints[0].why.is_none());
    assert_eq!(p.endpoints[1].pod.as_deref(), Some("web-1"));
    assert!(!p.endpoints[1].routed);
    assert_eq!(
        p.endpoints[1].why.as_deref(),
        Some("pod not Ready (ContainersNotReady)")
    );
    let web2 = x.pods.iter().find(|p| p.name == "web-2").expect("web-2");
    assert_eq!(
        web2.why,
        vec!["port http: named port web (TCP) not found in its containers"]
    );
    // One rule set for every node: a single endpoint, so no probability.
    assert_eq!(x.iptables.len(), 1);
    assert!(x.iptables[0].every_node);
    let c = PortChains::new("shop/web:http", "TCP");
    let sep = endpoint_chain("shop/web:http", "TCP", "10.244.1.5:8080");
    assert!(x.iptables[0].nat.contains(&format!(
        "-A {} -m comment --comment \"shop/web:http -> 10.244.1.5:8080\" -j {sep}",
        c.cluster
    )));
    assert!(!x.iptables[0].nat.iter().any(|l| l.contains("probability")));
    assert_eq!(x.dns[0].value, "10.96.0.20");
    assert_eq!(x.env[0].name, "WEB_SERVICE_HOST");
}

#[test]
fn a_selector_matching_nothing_rejects_and_says_so() {
    let o = observed(
        svc("ghost", "ClusterIP", IntOrString::Int(8080)),
        vec![],
        vec![],
        vec![node("n1", "10.0.0.1", &[])],
    );
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["SelectorMatchesNothing"]);
    assert!(x.problems[0].message.contains("app=ghost"));
    assert_eq!(x.ports[0].summary, "10.96.0.20:80 -> (no ready endpoint)");
    assert!(x.iptables[0].nat.is_empty());
    assert!(x.iptables[0].filter[0].ends_with("-j REJECT --reject-with icmp-port-unreachable"));
    assert!(x.iptables[0].filter[0].contains("\"shop/ghost:http has no endpoints\""));
}

#[test]
fn pods_without_ip_and_none_ready() {
    let o = observed(
        svc("new", "ClusterIP", IntOrString::Int(8080)),
        vec![],
        vec![pod("new-0", "new", None, false, "n1")],
        vec![],
    );
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["NoReadyPods", "PodsWithoutIP"]);
    assert!(x.problems[1].message.contains("new-0"));
    // No nodes at all: the rules are still shown, for any node.
    assert_eq!(x.iptables.len(), 1);
    assert!(x.iptables[0].nodes.is_empty());
}

#[test]
fn load_balancer_with_local_policy_explains_each_node() {
    let mut s = svc("lb", "LoadBalancer", IntOrString::Int(8080));
    let spec = s.spec.as_mut().expect("spec");
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32100);
    s.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some("192.168.0.150".into()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    let o = observed(
        s,
        vec![slice(
            "lb",
            &[
                ("10.244.1.5", "lb-0", "n1", true),
                ("10.244.9.9", "lb-9", "gone", true),
            ],
        )],
        vec![pod("lb-0", "lb", Some("10.244.1.5"), true, "n1")],
        vec![
            node("n1", "10.0.0.1", &[]),
            node("n2", "10.0.0.2", &[]),
            node(
                "n3",
                "10.0.0.3",
                &[(
                    "node.kubernetes.io/exclude-from-external-load-balancers",
                    "true",
                )],
            ),
        ],
    );
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["NodeNotFound"]);
    let p = &x.ports[0];
    assert_eq!(p.load_balancer, vec!["192.168.0.150:80"]);
    assert_eq!(
        p.summary,
        "192.168.0.150:80 -> 10.0.0.1:30080, 10.0.0.2:30080 (each eligible node) -> 10.96.0.20:80 -> 10.244.1.5:8080, 10.244.9.9:8080"
    );
    assert_eq!(p.nodes.len(), 3);
    assert!(p.nodes[0].load_balancer_target && p.nodes[0].note.is_none());
    assert!(
        p.nodes[1]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("health check on :32100 fails"))
    );
    assert!(!p.nodes[2].load_balancer_target);
    assert!(
        p.nodes[2]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("exclude-from-external-load-balancers"))
    );
    assert_eq!(p.endpoints[1].why.as_deref(), Some("node gone not found"));
    // n1 has a local endpoint, n2 and n3 do not: two rule sets.
    assert_eq!(x.iptables.len(), 2);
    assert!(!x.iptables[0].every_node);
    assert_eq!(x.iptables[0].nodes, vec!["n1"]);
    assert_eq!(x.iptables[1].nodes, vec!["n2", "n3"]);
    let c = PortChains::new("shop/lb:http", "TCP");
    assert!(
        x.iptables[0]
            .nat
            .contains(&format!("-A {} -j {}", c.external, c.local))
    );
    assert!(
        x.iptables[1]
            .filter
            .iter()
            .any(|l| l.contains("has no local endpoints") && l.ends_with("-j DROP"))
    );
    // The cluster chain splits 1/2 between the two ready endpoints, as iptables-save shows.
    assert!(
        x.iptables[0]
            .nat
            .iter()
            .any(|l| l.contains("--probability 0.50000000000"))
    );
    let text = render::text(&x);
    assert!(
        text.contains("  load balancer: 192.168.0.150 (ipMode VIP)\n"),
        "{text}"
    );
    assert!(text.contains("# iptables-save, on node n1\n"));
    assert!(text.contains("# iptables-save, on nodes n2, n3\n"));
}

#[test]
fn a_pending_load_balancer_quotes_the_last_warning() {
    let mut o = observed(
        svc("pend", "LoadBalancer", IntOrString::Int(8080)),
        vec![slice("pend", &[("10.244.1.5", "pend-0", "n1", true)])],
        vec![pod("pend-0", "pend", Some("10.244.1.5"), true, "n1")],
        vec![node("n1", "10.0.0.1", &[])],
    );
    o.events = vec![event(
        "pend",
        "uid-pend",
        "Warning",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
        100,
    )];
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["LoadBalancerPending"]);
    assert!(x.problems[0].message.contains("no free IPv4 address"));
    assert!(
        x.ports[0]
            .summary
            .starts_with("<pending>:80 -> 10.0.0.1:30080")
    );
}

#[test]
fn headless_and_external_name() {
    let mut h = svc("db", "ClusterIP", IntOrString::Int(8080));
    let spec = h.spec.as_mut().expect("spec");
    spec.cluster_ip = Some("None".into());
    spec.cluster_ips = Some(vec!["None".into()]);
    let mut sl = slice("db", &[("10.244.1.5", "db-0", "n1", true)]);
    if let Some(e) = sl.endpoints.as_mut() {
        e[0].hostname = Some("db-0".into());
    }
    let x = explain(&observed(
        h,
        vec![sl],
        vec![pod("db-0", "db", Some("10.244.1.5"), true, "n1")],
        vec![],
    ));
    assert!(x.iptables.is_empty() && x.env.is_empty());
    assert!(x.notes.iter().any(|n| n.starts_with("headless")));
    assert_eq!(
        x.ports[0].summary,
        "(headless: DNS names the endpoints) -> 10.244.1.5:8080"
    );
    let names: Vec<&str> = x.dns.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"db-0.db.shop.svc.cluster.local"));
    assert!(
        x.dns
            .iter()
            .any(|r| r.type_ == "SRV" && r.value == "0 100 8080 db-0.db.shop.svc.cluster.local")
    );

    let mut e = svc("ext", "ExternalName", IntOrString::Int(80));
    let spec = e.spec.as_mut().expect("spec");
    spec.external_name = Some("db.example.com".into());
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    spec.selector = None;
    let x = explain(&observed(e, vec![], vec![], vec![]));
    assert!(
        x.ports.is_empty() && x.problems.is_empty() && x.iptables.is_empty() && x.env.is_empty()
    );
    assert_eq!(x.dns.len(), 1);
    assert_eq!(
        (x.dns[0].type_.as_str(), x.dns[0].value.as_str()),
        ("CNAME", "db.example.com")
    );
}

fn event(name: &str, uid: &str, type_: &str, reason: &str, msg: &str, at: i64) -> Event {
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

#[test]
fn events_are_the_last_ten_of_this_service_oldest_first() {
    let s = svc("web", "ClusterIP", IntOrString::Int(8080));
    let mut evs: Vec<Event> = (0..12)
        .rev()
        .map(|i| event("web", "uid-web", "Normal", &format!("R{i}"), "m", i))
        .collect();
    evs.push(event(
        "web",
        "uid-older-web",
        "Warning",
        "Old",
        "of a deleted namesake",
        50,
    ));
    let lines = events(&s, &evs);
    assert_eq!(lines.len(), MAX_EVENTS);
    assert_eq!(lines[0].reason, "R2");
    assert_eq!(lines[9].reason, "R11");
    assert!(
        lines[9]
            .last_seen
            .as_deref()
            .is_some_and(|t| t.starts_with("2023-11-14T22:13:"))
    );
}

#[test]
fn the_json_form_is_the_explanation_with_snake_case_fields() {
    let o = observed(
        svc("web", "NodePort", IntOrString::Int(8080)),
        vec![],
        vec![],
        vec![node("n1", "10.0.0.1", &[])],
    );
    let v = serde_json::to_value(explain(&o)).expect("json");
    assert_eq!(v["type"], "NodePort");
    assert_eq!(v["ports"][0]["node_port"], 30080);
    assert_eq!(v["ports"][0]["nodes"][0]["address"], "10.0.0.1:30080");
    assert_eq!(v["dns"][0]["type"], "A");
    assert_eq!(v["problems"][0]["reason"], "SelectorMatchesNothing");
    let text = render::text(&explain(&o));
    assert!(text.contains("Service shop/web (NodePort)"));
    assert!(
        text.contains("10.96.0.20:80 -> (no ready endpoint)")
            || text.contains("(each eligible node)")
    );
}

#[test]
fn service_references_are_namespace_slash_name() {
    assert_eq!(
        parse_service_ref("kube-system/kube-dns"),
        Ok(("kube-system".to_string(), "kube-dns".to_string()))
    );
    for bad in [
        "web", "/web", "ns/", "ns/a/b", "NS/web", "ns/-web", "ns/web_1", "",
    ] {
        assert!(parse_service_ref(bad).is_err(), "{bad}");
    }
}

#[test]
fn dual_stack_gets_one_rule_set_per_family() {
    let mut s = svc("ds", "ClusterIP", IntOrString::Int(8080));
    let spec = s.spec.as_mut().expect("spec");
    spec.cluster_ips = Some(vec!["10.96.0.20".into(), "fd00::20".into()]);
    let v4 = slice("ds", &[("10.244.1.5", "ds-0", "n1", true)]);
    let mut v6 = slice("ds", &[("fd00:10::5", "ds-0", "n1", true)]);
    v6.address_type = "IPv6".into();
    v6.metadata.name = Some("ds-v6".into());
    let x = explain(&observed(
        s,
        vec![v4, v6],
        vec![],
        vec![node("n1", "10.0.0.1", &[])],
    ));
    let fams: Vec<&str> = x.iptables.iter().map(|r| r.family.as_str()).collect();
    assert_eq!(fams, vec!["IPv4", "IPv6"]);
    assert!(
        x.iptables[1]
            .nat
            .iter()
            .any(|l| l.starts_with("-A KUBE-SERVICES -d fd00::20/128 -p tcp"))
    );
    assert!(
        x.iptables[1]
            .nat
            .iter()
            .any(|l| l.ends_with("--to-destination [fd00:10::5]:8080"))
    );
    assert!(!x.iptables[0].nat.iter().any(|l| l.contains("fd00")));
    let types: Vec<&str> = x.dns.iter().map(|r| r.type_.as_str()).collect();
    assert_eq!(types, vec!["A", "AAAA", "SRV"]);
    assert_eq!(
        x.ports[0].cluster_ips,
        vec!["10.96.0.20:80", "[fd00::20]:80"]
    );
    assert_eq!(x.ports[0].endpoints.len(), 2);
}

#[test]
fn a_pod_on_a_missing_node_is_explained() {
    let o = observed(
        svc("orph", "ClusterIP", IntOrString::Int(8080)),
        vec![slice("orph", &[("10.244.1.5", "orph-0", "n1", true)])],
        vec![
            pod("orph-0", "orph", Some("10.244.1.5"), true, "n1"),
            pod("orph-1", "orph", Some("10.244.9.5"), true, "ghost"),
        ],
        vec![node("n1", "10.0.0.1", &[])],
    );
    let x = explain(&o);
    assert_eq!(reasons(&x), vec!["NodeNotFound"]);
    assert!(x.problems[0].message.ends_with("ghost"), "{:?}", x.problems);
    let p = x.pods.iter().find(|p| p.name == "orph-1").expect("orph-1");
    assert_eq!(
        p.why,
        vec![
            "port http: its node ghost does not exist (the EndpointSlice controller leaves it out)"
        ]
    );
}

#[test]
fn node_independent_rules_equal_the_per_node_computation() {
    // Cluster policy: computed once for every node; the same as what each node would get.
    let o = observed(
        svc("same", "NodePort", IntOrString::Int(8080)),
        vec![slice(
            "same",
            &[
                ("10.244.1.5", "same-0", "n1", true),
                ("10.244.2.5", "same-1", "n2", true),
            ],
        )],
        vec![],
        vec![node("n1", "10.0.0.1", &[]), node("n2", "10.0.0.2", &[])],
    );
    let x = explain(&o);
    assert_eq!(x.iptables.len(), 1);
    assert!(x.iptables[0].every_node);
    assert_eq!(x.iptables[0].nodes, vec!["n1", "n2"]);
    let ports = rules::proxy_ports(&o, endpointslice::common::AddressType::IPv4, "10.96.0.20");
    for n in &o.nodes {
        let view = proxy::NodeView {
            name: n.metadata.name.clone().unwrap_or_default(),
            ips: rules::node_ips(n),
            zone: None,
        };
        let mut nat: Vec<String> = ports
            .iter()
            .flat_map(|p| proxy::port_rules(p, Some(&view)).nat)
            .collect();
        proxy::group_by_chain(&mut nat);
        assert_eq!(nat, x.iptables[0].nat);
    }
}

#[test]
fn the_text_shows_at_most_ten_rule_sets() {
    let mut s = svc("many", "LoadBalancer", IntOrString::Int(8080));
    if let Some(spec) = s.spec.as_mut() {
        spec.external_traffic_policy = Some("Local".into());
    }
    // Twelve nodes, each with its own local endpoint: twelve different rule sets.
    let names: Vec<String> = (0..12).map(|i| format!("n{i:02}")).collect();
    let ips: Vec<String> = (0..12).map(|i| format!("10.244.{i}.5")).collect();
    let pods: Vec<String> = (0..12).map(|i| format!("many-{i}")).collect();
    let eps: Vec<(&str, &str, &str, bool)> = (0..12)
        .map(|i| (ips[i].as_str(), pods[i].as_str(), names[i].as_str(), true))
        .collect();
    let nodes = names.iter().map(|n| node(n, "10.0.0.1", &[])).collect();
    let x = explain(&observed(s, vec![slice("many", &eps)], vec![], nodes));
    assert_eq!(x.iptables.len(), 12);
    let text = render::text(&x);
    assert_eq!(text.matches("# iptables-save, on node ").count(), 10);
    assert!(text.contains("# ... 2 more sets of nodes with other rules (-o json has them all)"));
}

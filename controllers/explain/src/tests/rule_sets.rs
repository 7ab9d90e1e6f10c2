//! Rule sets across families and nodes, and how many the text shows.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::fixtures::*;
use crate::{explain, proxy, render, rules};
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

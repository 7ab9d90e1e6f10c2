mod fixtures;
mod rule_sets;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::proxy::{PortChains, endpoint_chain};
use fixtures::*;

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

    // With the manager's --endpoint-aware-load-balancer-targets (explain's flag of the same
    // name), n2, without a ready local endpoint, is no target; n1 still is.
    let mut o = o;
    o.endpoint_aware_targets = true;
    let x = explain(&o);
    let p = &x.ports[0];
    assert!(p.nodes[0].load_balancer_target);
    assert!(!p.nodes[1].load_balancer_target);
    assert_eq!(
        p.nodes[1].note.as_deref(),
        Some("not a load-balancer target: no ready local endpoint (endpoint-aware targets)")
    );
    assert!(
        p.summary
            .starts_with("192.168.0.150:80 -> 10.0.0.1:30080 (each eligible node) -> "),
        "{}",
        p.summary
    );
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

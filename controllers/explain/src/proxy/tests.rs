use super::*;

fn ep(ip: &str, node: &str, ready: bool) -> ProxyEndpoint {
    ProxyEndpoint {
        ip: ip.into(),
        port: 8080,
        ready,
        serving: ready,
        terminating: false,
        node: Some(node.into()),
        zone_hints: vec![],
        node_hints: vec![],
    }
}

fn port(name: &str) -> ProxyPort {
    ProxyPort {
        name: name.into(),
        protocol: "tcp".into(),
        cluster_ip: "10.96.0.10".into(),
        port: 80,
        ..Default::default()
    }
}

fn node(name: &str, ip: &str) -> NodeView {
    NodeView {
        name: name.into(),
        ips: vec![ip.parse().expect("ip")],
        zone: None,
    }
}

#[test]
fn cluster_ip_with_three_endpoints_splits_one_third_one_half_rest() {
    let mut p = port("ns/web:http");
    p.endpoints = vec![
        ep("10.244.1.2", "a", true),
        ep("10.244.1.3", "a", true),
        ep("10.244.2.2", "b", true),
        ep("10.244.2.9", "b", false),
    ];
    let r = port_rules(&p, None);
    let c = PortChains::new("ns/web:http", "tcp");
    assert!(r.filter.is_empty(), "{:?}", r.filter);
    let sep = |ip: &str| endpoint_chain("ns/web:http", "tcp", &format!("{ip}:8080"));
    let want = [
        format!(
            "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j {}",
            c.cluster
        ),
        format!(
            "-A {} -m comment --comment \"ns/web:http -> 10.244.1.2:8080\" -m statistic --mode random --probability 0.33333333349 -j {}",
            c.cluster,
            sep("10.244.1.2")
        ),
        format!(
            "-A {} -m comment --comment \"ns/web:http -> 10.244.1.3:8080\" -m statistic --mode random --probability 0.50000000000 -j {}",
            c.cluster,
            sep("10.244.1.3")
        ),
        format!(
            "-A {} -m comment --comment \"ns/web:http -> 10.244.2.2:8080\" -j {}",
            c.cluster,
            sep("10.244.2.2")
        ),
        format!(
            "-A {} -s 10.244.1.2/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ",
            sep("10.244.1.2")
        ),
        format!(
            "-A {} -p tcp -m comment --comment \"ns/web:http\" -m tcp -j DNAT --to-destination 10.244.1.2:8080",
            sep("10.244.1.2")
        ),
    ];
    assert_eq!(r.nat[..6], want[..]);
    // Three SEP chains of two rules each; the not-ready endpoint has none.
    assert_eq!(r.nat.len(), 4 + 6);
    assert!(!r.nat.iter().any(|l| l.contains("10.244.2.9")));
}

#[test]
fn no_endpoints_rejects_in_the_filter_table() {
    let mut p = port("ns/empty");
    p.node_port = 30080;
    p.endpoints = vec![ep("10.244.1.2", "a", false)];
    let r = port_rules(&p, None);
    assert!(r.nat.is_empty(), "{:?}", r.nat);
    assert_eq!(
        r.filter,
        vec![
            "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/empty has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable".to_string(),
            "-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment \"ns/empty has no endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT --reject-with icmp-port-unreachable".to_string(),
        ]
    );
}

#[test]
fn terminating_but_serving_endpoints_are_a_fallback() {
    let mut p = port("ns/t");
    let mut e = ep("10.244.1.2", "a", false);
    e.serving = true;
    e.terminating = true;
    p.endpoints = vec![e];
    let r = port_rules(&p, None);
    assert!(r.filter.is_empty());
    assert!(
        r.nat
            .iter()
            .any(|l| l.contains("DNAT --to-destination 10.244.1.2:8080"))
    );
}

#[test]
fn node_port_with_cluster_policy_masquerades_in_kube_ext() {
    let mut p = port("ns/np");
    p.node_port = 31000;
    p.endpoints = vec![ep("10.244.1.2", "a", true)];
    let c = PortChains::new("ns/np", "tcp");
    let r = port_rules(&p, None);
    assert!(r.nat.contains(&format!(
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"ns/np\" -m tcp --dport 31000 -j {}",
        c.external
    )));
    assert!(r.nat.contains(&format!(
        "-A {} -m comment --comment \"masquerade traffic for ns/np external destinations\" -j KUBE-MARK-MASQ",
        c.external
    )));
    assert!(
        r.nat
            .contains(&format!("-A {} -j {}", c.external, c.cluster))
    );
}

#[test]
fn local_policy_differs_between_nodes_with_and_without_endpoints() {
    let mut p = port("ns/lb:web");
    p.node_port = 31001;
    p.health_check_node_port = 32001;
    p.lb_vips = vec!["192.168.0.10".into()];
    p.etp_local = true;
    p.endpoints = vec![ep("10.244.1.2", "a", true), ep("10.244.2.2", "b", true)];
    let c = PortChains::new("ns/lb:web", "tcp");
    let on_a = port_rules(&p, Some(&node("a", "10.0.0.1")));
    let on_c = port_rules(&p, Some(&node("c", "10.0.0.3")));
    // Both nodes: the LB IP goes to KUBE-EXT, the health-check port is open, local traffic
    // is masqueraded and routed to the cluster chain.
    for r in [&on_a, &on_c] {
        assert!(r.nat.contains(&format!(
            "-A KUBE-SERVICES -d 192.168.0.10/32 -p tcp -m comment --comment \"ns/lb:web loadbalancer IP\" -m tcp --dport 80 -j {}",
            c.external
        )));
        assert!(r.filter.contains(
            &"-A KUBE-NODEPORTS -p tcp -m comment --comment \"ns/lb:web health check node port\" -m tcp --dport 32001 -j ACCEPT".to_string()
        ));
        assert!(r.nat.contains(&format!(
            "-A {} -m comment --comment \"route LOCAL traffic for ns/lb:web external destinations\" -m addrtype --src-type LOCAL -j {}",
            c.external, c.cluster
        )));
    }
    // Node a runs an endpoint: KUBE-EXT ends in KUBE-SVL with that endpoint only.
    assert!(
        on_a.nat
            .contains(&format!("-A {} -j {}", c.external, c.local))
    );
    let svl: Vec<&String> = on_a
        .nat
        .iter()
        .filter(|l| rule_chain(l) == c.local)
        .collect();
    assert_eq!(svl.len(), 1);
    assert!(svl[0].ends_with(&endpoint_chain("ns/lb:web", "tcp", "10.244.1.2:8080")));
    // Node c does not: external traffic is dropped there.
    assert!(!on_c.nat.iter().any(|l| l.contains(&c.local)));
    assert!(on_c.filter.contains(
        &"-A KUBE-EXTERNAL-SERVICES -d 192.168.0.10/32 -p tcp -m comment --comment \"ns/lb:web has no local endpoints\" -m tcp --dport 80 -j DROP".to_string()
    ));
    assert!(on_c.filter.contains(
        &"-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment \"ns/lb:web has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 31001 -j DROP".to_string()
    ));
    assert_ne!(on_a, on_c);
}

#[test]
fn client_ip_affinity_uses_the_recent_module() {
    let mut p = port("ns/sticky");
    p.affinity_seconds = Some(10800);
    p.endpoints = vec![ep("10.244.1.2", "a", true)];
    let c = PortChains::new("ns/sticky", "tcp");
    let sep = endpoint_chain("ns/sticky", "tcp", "10.244.1.2:8080");
    let r = port_rules(&p, None);
    assert!(r.nat.contains(&format!(
        "-A {} -m comment --comment \"ns/sticky -> 10.244.1.2:8080\" -m recent --rcheck --seconds 10800 --reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}",
        c.cluster
    )));
    assert!(r.nat.contains(&format!(
        "-A {sep} -p tcp -m comment --comment \"ns/sticky\" -m recent --set --name {sep} --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.2:8080"
    )));
}

#[test]
fn source_ranges_go_through_kube_fw() {
    let mut p = port("ns/fw");
    p.lb_vips = vec!["192.168.0.11".into()];
    p.node_port = 31002;
    p.source_ranges = vec!["10.0.0.0/8".parse().expect("cidr")];
    p.endpoints = vec![ep("10.244.1.2", "a", true)];
    let c = PortChains::new("ns/fw", "tcp");
    // The node's own address is in the range: its traffic from the VIP is let through too.
    let r = port_rules(&p, Some(&node("a", "10.0.0.1")));
    let fw: Vec<&String> = r
        .nat
        .iter()
        .filter(|l| rule_chain(l) == c.firewall)
        .collect();
    assert_eq!(
        fw,
        vec![
            &format!(
                "-A {} -s 10.0.0.0/8 -m comment --comment \"ns/fw loadbalancer IP\" -j {}",
                c.firewall, c.external
            ),
            &format!(
                "-A {} -s 192.168.0.11/32 -m comment --comment \"ns/fw loadbalancer IP\" -j {}",
                c.firewall, c.external
            ),
            &format!(
                "-A {} -m comment --comment \"other traffic to ns/fw will be dropped by KUBE-PROXY-FIREWALL\"",
                c.firewall
            ),
        ]
    );
    assert!(r.filter.contains(&format!(
        "-A KUBE-PROXY-FIREWALL -d 192.168.0.11/32 -p tcp -m comment --comment \"ns/fw traffic not accepted by {}\" -m tcp --dport 80 -j DROP",
        c.firewall
    )));
}

#[test]
fn ipv6_uses_128_masks_and_bracketed_endpoints() {
    let mut p = port("ns/v6");
    p.ipv6 = true;
    p.cluster_ip = "fd00::a".into();
    p.endpoints = vec![ProxyEndpoint {
        ip: "fd00:10::2".into(),
        ..ep("x", "a", true)
    }];
    let r = port_rules(&p, None);
    assert!(r.nat[0].contains("-d fd00::a/128"));
    assert!(
        r.nat
            .iter()
            .any(|l| l.ends_with("--to-destination [fd00:10::2]:8080"))
    );
    assert!(r.nat.iter().any(|l| l.contains("-s fd00:10::2/128")));
}

#[test]
fn grouping_keeps_rule_order_within_a_chain() {
    let mut lines = vec![
        "-A KUBE-SVC-B one".to_string(),
        "-A KUBE-SERVICES x".to_string(),
        "-A KUBE-SVC-B two".to_string(),
        "-A KUBE-EXT-B y".to_string(),
    ];
    group_by_chain(&mut lines);
    assert_eq!(
        lines,
        vec![
            "-A KUBE-EXT-B y",
            "-A KUBE-SERVICES x",
            "-A KUBE-SVC-B one",
            "-A KUBE-SVC-B two"
        ]
    );
}

#[test]
fn zone_hints_narrow_the_cluster_chain_on_nodes_of_that_zone() {
    let mut p = port("ns/tz");
    let hinted = |ip: &str, node: &str, zone: &str| ProxyEndpoint {
        zone_hints: vec![zone.into()],
        ..ep(ip, node, true)
    };
    p.endpoints = vec![
        hinted("10.244.1.2", "a", "z1"),
        hinted("10.244.1.3", "a", "z1"),
        hinted("10.244.2.2", "b", "z2"),
    ];
    let c = PortChains::new("ns/tz", "tcp");
    let in_zone = |zone: Option<&str>| NodeView {
        zone: zone.map(Into::into),
        ..node("x", "10.0.0.9")
    };
    let svc_rules = |r: &Rules| -> Vec<String> {
        r.nat
            .iter()
            .filter(|l| rule_chain(l) == c.cluster)
            .cloned()
            .collect()
    };
    // In z1: the two z1 endpoints, half each; no KUBE-SEP chain for the z2 one.
    let z1 = port_rules(&p, Some(&in_zone(Some("z1"))));
    let rules = svc_rules(&z1);
    assert_eq!(rules.len(), 2);
    assert!(rules[0].contains("10.244.1.2:8080") && rules[0].contains("0.50000000000"));
    assert!(!z1.nat.iter().any(|l| l.contains("10.244.2.2")));
    // In z2: only its own endpoint. A node without a zone label: all three, by thirds.
    assert_eq!(
        svc_rules(&port_rules(&p, Some(&in_zone(Some("z2"))))).len(),
        1
    );
    let none = svc_rules(&port_rules(&p, Some(&in_zone(None))));
    assert_eq!(none.len(), 3);
    assert!(none[0].contains("0.33333333349"));
    // One endpoint without a hint: topology is ignored everywhere.
    p.endpoints[2].zone_hints.clear();
    assert_eq!(
        svc_rules(&port_rules(&p, Some(&in_zone(Some("z1"))))).len(),
        3
    );
}

#[test]
fn node_hints_prefer_the_same_node() {
    let mut p = port("ns/tn");
    let hinted = |ip: &str, node: &str| ProxyEndpoint {
        node_hints: vec![node.into()],
        ..ep(ip, node, true)
    };
    p.endpoints = vec![hinted("10.244.1.2", "a"), hinted("10.244.2.2", "b")];
    let on_a = port_rules(&p, Some(&node("a", "10.0.0.1")));
    assert!(!on_a.nat.iter().any(|l| l.contains("10.244.2.2")));
    // A node no endpoint is hinted for uses them all.
    let on_c = port_rules(&p, Some(&node("c", "10.0.0.3")));
    assert!(on_c.nat.iter().any(|l| l.contains("10.244.2.2")));
    assert!(on_c.nat.iter().any(|l| l.contains("0.50000000000")));
}

#[test]
fn internal_local_policy_drops_cluster_ip_traffic_on_nodes_without_endpoints() {
    let mut p = port("ns/itp");
    p.itp_local = true;
    p.endpoints = vec![ep("10.244.1.2", "a", true)];
    let c = PortChains::new("ns/itp", "tcp");
    let on_a = port_rules(&p, Some(&node("a", "10.0.0.1")));
    assert!(
        on_a.nat[0].ends_with(&format!("-j {}", c.local)),
        "{:?}",
        on_a.nat
    );
    assert!(!on_a.nat.iter().any(|l| l.contains(&c.cluster)));
    let on_b = port_rules(&p, Some(&node("b", "10.0.0.2")));
    assert!(on_b.nat.is_empty(), "{:?}", on_b.nat);
    assert_eq!(
        on_b.filter,
        vec!["-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/itp has no local endpoints\" -m tcp --dport 80 -j DROP".to_string()]
    );
    // Externally reachable too: the cluster chain exists everywhere for the node's own traffic.
    p.node_port = 31005;
    let on_b = port_rules(&p, Some(&node("b", "10.0.0.2")));
    assert!(
        on_b.nat
            .iter()
            .any(|l| l.starts_with(&format!("-A {} ", c.cluster)))
    );
}

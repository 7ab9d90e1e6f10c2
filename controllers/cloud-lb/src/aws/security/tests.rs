//! Security-group plans: rules granted, revoked and spared.

use super::*;
use proptest::prelude::*;

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn traffic(cidrs: &[&str]) -> Traffic {
    Traffic {
        lb_name: "lb-a".into(),
        client_ports: [("tcp".to_string(), 30080)].into(),
        health_ports: [30080].into(),
        client_cidrs: cidrs.iter().map(|c| net(c)).collect(),
        health_cidrs: [net("10.0.1.0/24")].into(),
    }
}

fn rule(proto: &str, port: i32, cidr: &str, desc: &str) -> Rule {
    Rule {
        protocol: proto.into(),
        from: port,
        to: port,
        cidr: net(cidr),
        description: desc.into(),
    }
}

fn apply(groups: &mut [Group], changes: &[GroupChange]) {
    for c in changes {
        let g = groups
            .iter_mut()
            .find(|g| g.id == c.group)
            .expect("planned group exists");
        for r in &c.revoke {
            assert!(
                g.rules.remove(r),
                "revoked a rule that was not there: {r:?}"
            );
        }
        for r in &c.grant {
            assert!(g.rules.insert(r.clone()));
        }
    }
}

#[test]
fn everything_open_needs_no_health_rule_and_one_mtu_rule() {
    let groups = vec![Group {
        id: "sg-nodes".into(),
        rules: BTreeSet::new(),
    }];
    let p = plan(
        &groups,
        &["sg-nodes".to_string()].into(),
        "lb-a",
        Some(&traffic(&["0.0.0.0/0"])),
    );
    assert_eq!(
        p,
        vec![GroupChange {
            group: "sg-nodes".into(),
            grant: vec![
                rule(
                    "tcp",
                    30080,
                    "0.0.0.0/0",
                    "kubernetes.io/rule/nlb/client=lb-a"
                ),
                Rule {
                    protocol: "icmp".into(),
                    from: 3,
                    to: 4,
                    cidr: net("0.0.0.0/0"),
                    description: MTU_RULE.into()
                },
            ],
            revoke: vec![],
        }]
    );
}

#[test]
fn source_ranges_get_client_and_health_rules_and_converge() {
    let mut groups = vec![
        Group {
            id: "sg-nodes".into(),
            rules: [rule("tcp", 22, "192.0.2.0/24", "ssh")].into(),
        },
        Group {
            id: "sg-other".into(),
            rules: [rule(
                "tcp",
                30080,
                "0.0.0.0/0",
                "kubernetes.io/rule/nlb/client=lb-a",
            )]
            .into(),
        },
    ];
    let nodes: BTreeSet<String> = ["sg-nodes".to_string()].into();
    let t = traffic(&["203.0.113.0/24", "2001:db8::/32"]);
    let p = plan(&groups, &nodes, "lb-a", Some(&t));
    apply(&mut groups, &p);
    let on_nodes: BTreeSet<(String, String, String)> = groups[0]
        .rules
        .iter()
        .map(|r| {
            (
                r.protocol.clone(),
                r.cidr.to_string(),
                r.description.clone(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("tcp", "192.0.2.0/24", "ssh"),
        (
            "tcp",
            "203.0.113.0/24",
            "kubernetes.io/rule/nlb/client=lb-a",
        ),
        ("tcp", "2001:db8::/32", "kubernetes.io/rule/nlb/client=lb-a"),
        ("tcp", "10.0.1.0/24", "kubernetes.io/rule/nlb/health=lb-a"),
        ("icmp", "203.0.113.0/24", MTU_RULE),
        ("icmpv6", "2001:db8::/32", MTU_RULE),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(on_nodes, want);
    // Our rule on a group no node uses any more is revoked; nothing else is.
    assert!(groups[1].rules.is_empty());
    assert!(plan(&groups, &nodes, "lb-a", Some(&t)).is_empty());
}

#[test]
fn deletion_revokes_only_ours_and_keeps_mtu_rules_other_lbs_need() {
    let mut groups = vec![Group {
        id: "sg-nodes".into(),
        rules: [
            rule(
                "tcp",
                30080,
                "10.0.0.0/8",
                "kubernetes.io/rule/nlb/client=lb-a",
            ),
            rule(
                "tcp",
                30090,
                "10.0.0.0/8",
                "kubernetes.io/rule/nlb/client=lb-b",
            ),
            rule(
                "tcp",
                30080,
                "10.9.0.0/16",
                "kubernetes.io/rule/nlb/health=lb-a",
            ),
            rule("tcp", 22, "10.0.0.0/8", "ssh"),
            mtu_rule(net("10.0.0.0/8")),
            mtu_rule(net("172.16.0.0/12")),
        ]
        .into(),
    }];
    let p = plan(&groups, &BTreeSet::new(), "lb-a", None);
    apply(&mut groups, &p);
    let left: BTreeSet<&str> = groups[0]
        .rules
        .iter()
        .map(|r| r.description.as_str())
        .collect();
    assert_eq!(
        left,
        [
            "kubernetes.io/rule/nlb/mtu",
            "kubernetes.io/rule/nlb/client=lb-b",
            "ssh"
        ]
        .into()
    );
    assert_eq!(
        groups[0]
            .rules
            .iter()
            .find(|r| r.protocol == "icmp")
            .map(|r| r.cidr),
        Some(net("10.0.0.0/8"))
    );
}

#[test]
fn a_rule_a_person_added_satisfies_ours() {
    let groups = vec![Group {
        id: "sg-nodes".into(),
        rules: [
            rule("tcp", 30080, "0.0.0.0/0", "opened by hand"),
            Rule {
                description: "mine".into(),
                ..mtu_rule(net("0.0.0.0/0"))
            },
        ]
        .into(),
    }];
    let p = plan(
        &groups,
        &["sg-nodes".to_string()].into(),
        "lb-a",
        Some(&traffic(&["0.0.0.0/0"])),
    );
    assert_eq!(p, vec![]);
}

#[test]
fn udp_and_local_health_ports() {
    let t = Traffic {
        lb_name: "lb-u".into(),
        client_ports: [("udp".to_string(), 30053), ("tcp".to_string(), 30053)].into(),
        health_ports: [31000].into(),
        client_cidrs: [everything_v4()].into(),
        health_cidrs: [net("10.0.1.0/24"), net("10.0.2.0/24")].into(),
    };
    let w = wanted_rules(&t);
    let health: Vec<(i32, String)> = w
        .iter()
        .filter(|r| r.description.starts_with(HEALTH_RULE))
        .map(|r| (r.from, r.cidr.to_string()))
        .collect();
    assert_eq!(
        health,
        vec![(31000, "10.0.1.0/24".into()), (31000, "10.0.2.0/24".into())]
    );
    let protos: BTreeSet<&str> = w
        .iter()
        .filter(|r| r.description.starts_with(CLIENT_RULE))
        .map(|r| r.protocol.as_str())
        .collect();
    assert_eq!(protos, ["tcp", "udp"].into());
}

#[test]
fn instance_group_follows_cloud_provider_aws() {
    let tagged: BTreeSet<String> = ["sg-k8s".to_string()].into();
    let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        instance_group("i-1", &g(&["sg-a", "sg-k8s"]), &tagged),
        Ok(Some("sg-k8s".into()))
    );
    assert_eq!(
        instance_group("i-1", &g(&["sg-a"]), &tagged),
        Ok(Some("sg-a".into()))
    );
    assert_eq!(instance_group("i-1", &[], &tagged), Ok(None));
    assert!(instance_group("i-1", &g(&["sg-a", "sg-b"]), &tagged).is_err());
    let both: BTreeSet<String> = ["sg-a".to_string(), "sg-b".to_string()].into();
    assert!(instance_group("i-1", &g(&["sg-a", "sg-b"]), &both).is_err());
}

#[test]
fn cluster_tags_new_and_legacy() {
    let t =
        |k: &str, v: &str| -> BTreeMap<String, String> { [(k.to_string(), v.to_string())].into() };
    assert!(has_cluster_tag(
        &t("kubernetes.io/cluster/c1", "shared"),
        "c1"
    ));
    assert!(has_cluster_tag(&t("KubernetesCluster", "c1"), "c1"));
    assert!(!has_cluster_tag(&t("KubernetesCluster", "c2"), "c1"));
    assert!(!has_cluster_tag(
        &t("kubernetes.io/cluster/c2", "owned"),
        "c1"
    ));
}

fn arb_group(id: &'static str) -> impl Strategy<Value = Group> {
    let desc = prop_oneof![
        Just("kubernetes.io/rule/nlb/client=lb-a".to_string()),
        Just("kubernetes.io/rule/nlb/health=lb-a".to_string()),
        Just("kubernetes.io/rule/nlb/client=lb-b".to_string()),
        Just(MTU_RULE.to_string()),
        Just("by hand".to_string()),
    ];
    let r = (
        prop_oneof![Just("tcp"), Just("udp"), Just("icmp")],
        0..3i32,
        0..3u8,
        desc,
    )
        .prop_map(|(p, port, c, d)| Rule {
            protocol: p.into(),
            from: 30080 + port,
            to: 30080 + port,
            cidr: net(&format!("10.{c}.0.0/16")),
            description: d,
        });
    proptest::collection::btree_set(r, 0..8).prop_map(move |rules| Group {
        id: id.into(),
        rules,
    })
}

proptest! {
    /// From any state: applying the plan converges (a second plan is empty), never touches
    /// a rule described by someone else, and leaves every wanted rule's identity present
    /// on the nodes' group.
    #[test]
    fn plans_converge_and_spare_foreign_rules(
        a in arb_group("sg-a"),
        b in arb_group("sg-b"),
        ranges in proptest::collection::btree_set(0..3u8, 1..3),
        delete in any::<bool>(),
    ) {
        let mut groups = vec![a, b];
        let before = groups.clone();
        let t = Traffic {
            lb_name: "lb-a".into(),
            client_ports: [("tcp".to_string(), 30080)].into(),
            health_ports: [30081].into(),
            client_cidrs: ranges.iter().map(|c| net(&format!("10.{c}.0.0/16"))).collect(),
            health_cidrs: [net("10.2.0.0/16")].into(),
        };
        let nodes: BTreeSet<String> = ["sg-a".to_string()].into();
        let traffic = (!delete).then_some(&t);
        let p = plan(&groups, &nodes, "lb-a", traffic);
        apply(&mut groups, &p);
        prop_assert!(plan(&groups, &nodes, "lb-a", traffic).is_empty());
        for (old, new) in before.iter().zip(&groups) {
            for r in &old.rules {
                let foreign = r.description == "by hand" || r.description.ends_with("lb-b");
                if foreign {
                    prop_assert!(new.rules.contains(r));
                }
            }
        }
        if let Some(t) = traffic {
            for w in wanted_rules(t) {
                prop_assert!(groups[0].rules.iter().any(|h| h.identity() == w.identity()));
            }
        } else {
            for g in &groups {
                prop_assert!(!g.rules.iter().any(|r| r.description.ends_with("=lb-a")));
            }
        }
    }
}

#[test]
fn grants_come_before_revokes_except_to_make_room_for_the_same_rule() {
    // Issue 12 defect 6: a range change revoked first, so hitting the rule quota left the load
    // balancer with neither range.
    let old = rule(
        "tcp",
        30080,
        "203.0.113.0/24",
        "kubernetes.io/rule/nlb/client=lb-a",
    );
    let new = rule(
        "tcp",
        30080,
        "198.51.100.0/24",
        "kubernetes.io/rule/nlb/client=lb-a",
    );
    let bent = rule(
        "tcp",
        30080,
        "198.51.101.0/24",
        "kubernetes.io/rule/nlb/mtu",
    );
    let fixed = rule(
        "tcp",
        30080,
        "198.51.101.0/24",
        "kubernetes.io/rule/nlb/client=lb-a",
    );
    let c = GroupChange {
        group: "sg-1".into(),
        grant: vec![new.clone(), fixed.clone()],
        revoke: vec![old.clone(), bent.clone()],
    };
    let (first, grant, last) = c.steps();
    assert_eq!(
        first,
        vec![bent],
        "a clashing rule must go before its replacement"
    );
    assert_eq!(grant, vec![new, fixed]);
    assert_eq!(last, vec![old]);
}

#[test]
fn groups_that_gain_rules_change_before_groups_that_only_lose_them() {
    let t = traffic(&["0.0.0.0/0"]);
    let before = plan(&[], &BTreeSet::new(), "lb-a", Some(&t));
    assert!(before.is_empty());
    // Group "a" holds the rules but is no longer a node group; "b" is the nodes' group now.
    let mut groups = vec![
        Group {
            id: "a".into(),
            rules: BTreeSet::new(),
        },
        Group {
            id: "b".into(),
            rules: BTreeSet::new(),
        },
    ];
    let first = plan(&groups, &["a".to_string()].into(), "lb-a", Some(&t));
    apply(&mut groups, &first);
    let moved = plan(&groups, &["b".to_string()].into(), "lb-a", Some(&t));
    let order: Vec<&str> = moved.iter().map(|c| c.group.as_str()).collect();
    assert_eq!(order, vec!["b", "a"], "{moved:?}");
}

#[test]
fn rules_needed_counts_client_health_and_mtu_rules() {
    // One port open to everything: the client rule covers the health check; one MTU rule.
    assert_eq!(rules_needed(&traffic(&["0.0.0.0/0"])), 2);
    // Two ranges: two client rules, the health rule from the one subnet, two MTU rules.
    assert_eq!(rules_needed(&traffic(&["10.0.0.0/8", "192.168.0.0/16"])), 5);
    let mut t = traffic(&["10.0.0.0/8"]);
    t.client_ports.clear();
    t.health_ports.clear();
    assert_eq!(rules_needed(&t), 0);
}

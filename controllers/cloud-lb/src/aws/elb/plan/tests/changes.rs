//! Creating, changing and converged load balancers: the calls each change needs.

use std::collections::{BTreeMap, BTreeSet};

use super::super::{attribute_changes, plan, plan_hosts};
use super::*;
use crate::aws::elb::{ElbCall, LbRef, ObservedTg, TgRef};
use crate::aws::spec::Scheme;

#[test]
fn nothing_exists_creates_everything_in_order() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let tg = tg_name(&s, 80, "TCP", 30080);
    let p = plan(&d, &nothing(&d), &nodes(&["i-a", "i-b"])).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::CreateLoadBalancer {
                name: d.name.clone(),
                scheme: Scheme::InternetFacing,
                ip_address_type: "ipv4".into(),
                subnets: vec!["subnet-1".into()],
                eip_allocations: vec![],
                private_ipv4_addresses: vec![],
                tags: d.tags.clone(),
            },
            ElbCall::CreateTargetGroup {
                name: tg.clone(),
                protocol: "TCP".into(),
                port: 30080,
                health: d.target_groups[0].health.clone(),
                tags: d.tags.clone(),
                vpc_of: LbRef::Created,
            },
            ElbCall::RegisterTargets {
                tg: TgRef::Created(tg.clone()),
                targets: targets(&["i-a", "i-b"], 30080),
            },
            ElbCall::CreateListener {
                lb: LbRef::Created,
                port: 80,
                protocol: "TCP".into(),
                tg: TgRef::Created(tg.clone()),
                tls: None,
            },
        ]
    );
    assert_eq!(p.lb, Some(LbRef::Created));
    assert_eq!(p.target_groups, vec![(TgRef::Created(tg), 30080)]);
}

#[test]
fn a_create_sets_annotated_attributes_without_describing_them() {
    let s = svc(
        &[
            ("cross-zone-load-balancing-enabled", "true"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=10",
            ),
        ],
        &[(80, "TCP", 30080)],
    );
    let d = desired(&s);
    let tg = tg_name(&s, 80, "TCP", 30080);
    let p = plan(&d, &nothing(&d), &nodes(&["i-a"])).expect("plan");
    assert_eq!(
        p.operations(),
        vec![
            "CreateLoadBalancer",
            "ModifyLoadBalancerAttributes",
            "CreateTargetGroup",
            "ModifyTargetGroupAttributes",
            "RegisterTargets",
            "CreateListener"
        ]
    );
    assert_eq!(
        p.calls[1],
        ElbCall::ModifyLoadBalancerAttributes {
            lb: LbRef::Created,
            attributes: [(
                "load_balancing.cross_zone.enabled".to_string(),
                "true".to_string()
            )]
            .into(),
        }
    );
    assert_eq!(
        p.calls[3],
        ElbCall::ModifyTargetGroupAttributes {
            tg: TgRef::Created(tg),
            attributes: [(
                "deregistration_delay.timeout_seconds".to_string(),
                "10".to_string()
            )]
            .into(),
        }
    );
}

#[test]
fn a_create_without_resolved_subnets_plans_nothing() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let mut obs = nothing(&d);
    obs.subnets = None;
    assert!(plan(&d, &obs, &nodes(&["i-a"])).is_err());
}

#[test]
fn everything_matching_plans_no_call() {
    let s = svc(
        &[
            ("cross-zone-load-balancing-enabled", "true"),
            ("additional-resource-tags", "team=a"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=10",
            ),
        ],
        &[(53, "TCP", 30053), (53, "UDP", 30053), (80, "TCP", 30080)],
    );
    let d = desired(&s);
    let instances = nodes(&["i-a", "i-b", "i-c"]);
    let p = plan(&d, &converged(&d, &instances), &instances).expect("plan");
    assert_eq!(p.calls, vec![]);
    assert_eq!(p.lb, Some(LbRef::Existing(LB_ARN.into())));
    let mut want: Vec<(TgRef, i32)> = d
        .target_groups
        .iter()
        .map(|t| (TgRef::Existing(tg_arn(&t.name)), t.node_port))
        .collect();
    want.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    let mut got = p.target_groups.clone();
    got.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(got, want);
    // A host update of a converged load balancer is quiet too.
    let hosts = plan_hosts(&converged(&d, &instances), &instances).expect("plan");
    assert_eq!(hosts.calls, vec![]);
}

#[test]
fn a_port_added_gets_its_group_targets_and_listener() {
    let before = svc(&[], &[(80, "TCP", 30080)]);
    let after = svc(&[], &[(80, "TCP", 30080), (443, "TCP", 30443)]);
    let instances = nodes(&["i-a"]);
    let obs = converged(&desired(&before), &instances);
    let d = desired(&after);
    let tg = tg_name(&after, 443, "TCP", 30443);
    let p = plan(&d, &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::CreateTargetGroup {
                name: tg.clone(),
                protocol: "TCP".into(),
                port: 30443,
                health: d.target_groups[0].health.clone(),
                tags: d.tags.clone(),
                vpc_of: LbRef::Existing(LB_ARN.into()),
            },
            ElbCall::RegisterTargets {
                tg: TgRef::Created(tg.clone()),
                targets: targets(&["i-a"], 30443),
            },
            ElbCall::CreateListener {
                lb: LbRef::Existing(LB_ARN.into()),
                port: 443,
                protocol: "TCP".into(),
                tg: TgRef::Created(tg),
                tls: None,
            },
        ]
    );
}

#[test]
fn a_port_removed_loses_its_listener_then_its_group() {
    let before = svc(&[], &[(80, "TCP", 30080), (443, "TCP", 30443)]);
    let after = svc(&[], &[(80, "TCP", 30080)]);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&desired(&before), &instances);
    // A group with another owner attached elsewhere is never ours to delete.
    obs.target_groups.push(ObservedTg {
        arn: "arn:tg/someone-elses".into(),
        name: "someone-elses".into(),
        port: Some(31000),
        health: desired(&after).target_groups[0].health.clone(),
        tags: BTreeMap::new(),
        owned: false,
        attributes: BTreeMap::new(),
        targets: BTreeSet::new(),
    });
    let p = plan(&desired(&after), &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::DeleteListener {
                arn: listener_arn(443)
            },
            ElbCall::DeleteTargetGroup {
                arn: tg_arn(&tg_name(&before, 443, "TCP", 30443))
            },
        ]
    );
}

#[test]
fn a_protocol_change_replaces_the_group_new_first_then_listener_then_old() {
    let before = svc(&[], &[(80, "TCP", 30080)]);
    let after = svc(&[], &[(80, "UDP", 30080)]);
    let instances = nodes(&["i-a", "i-b"]);
    let obs = converged(&desired(&before), &instances);
    let d = desired(&after);
    let new = tg_name(&after, 80, "UDP", 30080);
    let old = tg_name(&before, 80, "TCP", 30080);
    let p = plan(&d, &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::CreateTargetGroup {
                name: new.clone(),
                protocol: "UDP".into(),
                port: 30080,
                health: d.target_groups[0].health.clone(),
                tags: d.tags.clone(),
                vpc_of: LbRef::Existing(LB_ARN.into()),
            },
            ElbCall::RegisterTargets {
                tg: TgRef::Created(new.clone()),
                targets: targets(&["i-a", "i-b"], 30080),
            },
            // moto cannot ModifyListener to UDP: a protocol change is delete then create.
            ElbCall::DeleteListener {
                arn: listener_arn(80)
            },
            ElbCall::CreateListener {
                lb: LbRef::Existing(LB_ARN.into()),
                port: 80,
                protocol: "UDP".into(),
                tg: TgRef::Created(new),
                tls: None,
            },
            ElbCall::DeleteTargetGroup { arn: tg_arn(&old) },
        ]
    );
}

#[test]
fn a_node_port_change_switches_the_listener_to_a_new_group() {
    let before = svc(&[], &[(80, "TCP", 30080)]);
    let after = svc(&[], &[(80, "TCP", 30081)]);
    let instances = nodes(&["i-a"]);
    let obs = converged(&desired(&before), &instances);
    let new = tg_name(&after, 80, "TCP", 30081);
    let p = plan(&desired(&after), &obs, &instances).expect("plan");
    assert_eq!(
        p.operations(),
        vec![
            "CreateTargetGroup",
            "RegisterTargets",
            "ModifyListener",
            "DeleteTargetGroup"
        ]
    );
    assert_eq!(
        p.calls[2],
        ElbCall::ModifyListener {
            arn: listener_arn(80),
            tg: TgRef::Created(new),
            tls: None,
        }
    );
}

#[test]
fn nodes_added_and_removed_only_register_and_deregister() {
    let s = svc(&[], &[(80, "TCP", 30080), (443, "TCP", 30443)]);
    let d = desired(&s);
    let obs = converged(&d, &nodes(&["i-a", "i-b"]));
    let now = nodes(&["i-a", "i-c"]);
    let mut want = vec![];
    for t in &d.target_groups {
        let tg = TgRef::Existing(tg_arn(&t.name));
        want.push(ElbCall::DeregisterTargets {
            tg: tg.clone(),
            targets: targets(&["i-b"], t.node_port),
        });
        want.push(ElbCall::RegisterTargets {
            tg,
            targets: targets(&["i-c"], t.node_port),
        });
    }
    assert_eq!(plan(&d, &obs, &now).expect("plan").calls, want);
    assert_eq!(plan_hosts(&obs, &now).expect("plan").calls, want);
    // Only added: a registration alone.
    let more = nodes(&["i-a", "i-b", "i-d"]);
    assert_eq!(
        plan(&d, &obs, &more).expect("plan").operations(),
        vec!["RegisterTargets", "RegisterTargets"]
    );
}

#[test]
fn drifted_attributes_health_and_tags_are_corrected_and_nothing_else() {
    let s = svc(
        &[
            ("cross-zone-load-balancing-enabled", "true"),
            ("additional-resource-tags", "team=a"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=10,preserve_client_ip.enabled=true",
            ),
        ],
        &[(80, "TCP", 30080)],
    );
    let d = desired(&s);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&d, &instances);
    let lb = &mut obs.lbs[0];
    lb.attributes
        .insert("load_balancing.cross_zone.enabled".into(), "false".into());
    lb.tags.remove("team");
    let tg = &mut obs.target_groups[0];
    tg.attributes
        .insert("deregistration_delay.timeout_seconds".into(), "300".into());
    tg.health.interval = 10;
    tg.tags.insert("team".into(), "b".into());
    let arn = tg.arn.clone();
    let p = plan(&d, &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::ModifyLoadBalancerAttributes {
                lb: LbRef::Existing(LB_ARN.into()),
                attributes: [(
                    "load_balancing.cross_zone.enabled".to_string(),
                    "true".to_string()
                )]
                .into(),
            },
            ElbCall::AddTags {
                arn: LB_ARN.into(),
                tags: [("team".to_string(), "a".to_string())].into(),
            },
            ElbCall::ModifyTargetGroup {
                arn: arn.clone(),
                health: d.target_groups[0].health.clone(),
            },
            ElbCall::AddTags {
                arn: arn.clone(),
                tags: [("team".to_string(), "a".to_string())].into(),
            },
            ElbCall::ModifyTargetGroupAttributes {
                tg: TgRef::Existing(arn),
                attributes: [(
                    "deregistration_delay.timeout_seconds".to_string(),
                    "10".to_string()
                )]
                .into(),
            },
        ]
    );
}

#[test]
fn attribute_changes_sends_only_missing_or_different_values() {
    let want: BTreeMap<String, String> = [
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "2".to_string()),
        ("c".to_string(), "3".to_string()),
    ]
    .into();
    let have: BTreeMap<String, String> = [("a", "1"), ("b", "x"), ("z", "9")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let got = attribute_changes(&have, &want);
    let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got, vec![("b", "2"), ("c", "3")]);
}

#[test]
fn targets_go_in_batches_of_at_most_100_deregistrations_first() {
    use super::super::{MAX_TARGETS_PER_CALL, target_changes};
    let ids = |r: std::ops::Range<usize>| -> BTreeSet<String> {
        r.map(|i| format!("i-{i:04}")).collect()
    };
    let tg = TgRef::Existing("arn:tg/x".into());
    /// (targets now, nodes wanted, expected (operation, batch size) sequence)
    type Case = (
        BTreeSet<String>,
        BTreeSet<String>,
        Vec<(&'static str, usize)>,
    );
    let cases: Vec<Case> = vec![
        (ids(0..0), ids(0..100), vec![("RegisterTargets", 100)]),
        (
            ids(0..0),
            ids(0..250),
            vec![
                ("RegisterTargets", 100),
                ("RegisterTargets", 100),
                ("RegisterTargets", 50),
            ],
        ),
        (
            ids(0..250),
            ids(130..331),
            vec![
                ("DeregisterTargets", 100),
                ("DeregisterTargets", 30),
                ("RegisterTargets", 81),
            ],
        ),
        (ids(0..250), ids(0..250), vec![]),
    ];
    for (have, want, expect) in cases {
        let have: BTreeSet<(String, i32)> = have.into_iter().map(|i| (i, 30080)).collect();
        let calls = target_changes(&tg, 30080, &have, &want);
        let got: Vec<(&str, usize)> = calls
            .iter()
            .map(|c| match c {
                ElbCall::RegisterTargets { targets, .. }
                | ElbCall::DeregisterTargets { targets, .. } => (c.operation(), targets.len()),
                other => panic!("unexpected call {other:?}"),
            })
            .collect();
        assert_eq!(got, expect);
        assert!(got.iter().all(|(_, n)| *n <= MAX_TARGETS_PER_CALL));
        // Together the batches make exactly the wanted set.
        let mut after = have.clone();
        for c in &calls {
            match c {
                ElbCall::DeregisterTargets { targets, .. } => {
                    after.retain(|t| !targets.contains(t));
                }
                ElbCall::RegisterTargets { targets, .. } => after.extend(targets.iter().cloned()),
                _ => {}
            }
        }
        let wanted: BTreeSet<(String, i32)> = want.into_iter().map(|i| (i, 30080)).collect();
        assert_eq!(after, wanted);
    }
}

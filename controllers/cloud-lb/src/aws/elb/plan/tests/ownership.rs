//! What is ours: foreign resources, duplicates, orphans, deletion and host updates.

use std::collections::{BTreeMap, BTreeSet};

use super::super::{plan, plan_delete, plan_hosts};
use super::*;
use crate::aws::elb::{ElbCall, LbRef, TgRef};
use crate::aws::spec::Scheme;

#[test]
fn a_foreign_load_balancer_with_our_name_is_an_error_and_no_call() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&d, &instances);
    obs.lbs[0].owned = false;
    obs.lbs[0].tags = [("owner".to_string(), "someone-else".to_string())].into();
    for r in [
        plan(&d, &obs, &instances),
        plan_delete(&obs),
        plan_hosts(&obs, &instances),
    ] {
        let e = r.expect_err("must refuse");
        assert!(!e.is_permanent(), "{e}");
        assert!(e.to_string().contains("not tagged as owned"), "{e}");
        assert!(e.to_string().contains(&d.name), "{e}");
    }
}

#[test]
fn a_foreign_target_group_with_a_wanted_name_is_an_error_and_no_call() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let instances = nodes(&["i-a"]);
    // Our load balancer is not even there yet: the refusal comes before any create.
    let mut obs = nothing(&d);
    let mut foreign = converged(&d, &instances).target_groups.remove(0);
    foreign.owned = false;
    foreign.tags = BTreeMap::new();
    obs.target_groups.push(foreign.clone());
    let e = plan(&d, &obs, &instances).expect_err("must refuse");
    assert!(e.to_string().contains("not owned by this Service"), "{e}");
    // Deletion leaves it alone: nothing of ours to delete.
    let p = plan_delete(&obs).expect("plan");
    assert_eq!(p.calls, vec![]);
    // A host update does not register on it.
    let mut hosts = converged(&d, &instances);
    hosts.target_groups = vec![foreign];
    assert_eq!(
        plan_hosts(&hosts, &nodes(&["i-z"])).expect("plan").calls,
        vec![]
    );
}

#[test]
fn a_scheme_change_replaces_the_load_balancer_and_keeps_the_groups() {
    let before = svc(&[], &[(80, "TCP", 30080)]);
    let after = svc(&[("scheme", "internal")], &[(80, "TCP", 30080)]);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&desired(&before), &instances);
    obs.subnets = Some(vec!["subnet-1".into()]);
    let d = desired(&after);
    let tg = tg_arn(&d.target_groups[0].name);
    let p = plan(&d, &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::DeleteLoadBalancer { arn: LB_ARN.into() },
            ElbCall::CreateLoadBalancer {
                name: d.name.clone(),
                scheme: Scheme::Internal,
                ip_address_type: "ipv4".into(),
                subnets: vec!["subnet-1".into()],
                eip_allocations: vec![],
                private_ipv4_addresses: vec![],
                tags: d.tags.clone(),
            },
            ElbCall::CreateListener {
                lb: LbRef::Created,
                port: 80,
                protocol: "TCP".into(),
                tg: TgRef::Existing(tg),
                tls: None,
            },
        ]
    );
}

#[test]
fn owned_duplicates_are_deleted_and_the_oldest_kept() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&d, &instances);
    let mut dup = obs.lbs[0].clone();
    dup.lb.arn = "arn:lb/web-duplicate".into();
    dup.listeners.clear();
    obs.lbs.push(dup);
    // An older foreign one with our name does not stop us using ours.
    let mut foreign = obs.lbs[0].clone();
    foreign.lb.arn = "arn:lb/foreign".into();
    foreign.owned = false;
    obs.lbs.insert(0, foreign);
    let p = plan(&d, &obs, &instances).expect("plan");
    assert_eq!(
        p.calls,
        vec![ElbCall::DeleteLoadBalancer {
            arn: "arn:lb/web-duplicate".into()
        }]
    );
    assert_eq!(p.lb, Some(LbRef::Existing(LB_ARN.into())));
    assert_eq!(
        plan_delete(&obs).expect("plan").operations(),
        vec![
            "DeleteLoadBalancer",
            "DeleteLoadBalancer",
            "DeleteTargetGroup"
        ]
    );
}

#[test]
fn remembered_orphans_are_deleted_last_unless_wanted_again() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let instances = nodes(&["i-a"]);
    let mut obs = converged(&d, &instances);
    let wanted = tg_arn(&d.target_groups[0].name);
    obs.orphans = ["arn:tg/orphan".to_string(), wanted].into();
    assert_eq!(
        plan(&d, &obs, &instances).expect("plan").calls,
        vec![ElbCall::DeleteTargetGroup {
            arn: "arn:tg/orphan".into()
        }]
    );
}

#[test]
fn deletion_removes_our_load_balancer_then_every_group_of_ours() {
    let s = svc(&[], &[(80, "TCP", 30080), (443, "TCP", 30443)]);
    let d = desired(&s);
    let mut obs = converged(&d, &nodes(&["i-a"]));
    obs.orphans = ["arn:tg/orphan".to_string()].into();
    let mut want = vec![ElbCall::DeleteLoadBalancer { arn: LB_ARN.into() }];
    let mut groups: BTreeSet<String> = d.target_groups.iter().map(|t| tg_arn(&t.name)).collect();
    groups.insert("arn:tg/orphan".into());
    want.extend(
        groups
            .into_iter()
            .map(|arn| ElbCall::DeleteTargetGroup { arn }),
    );
    let p = plan_delete(&obs).expect("plan");
    assert_eq!(p.calls, want);
    assert_eq!(p.lb, None);
    // Nothing there: nothing to do.
    assert_eq!(plan_delete(&nothing(&d)).expect("plan").calls, vec![]);
}

#[test]
fn host_update_without_a_load_balancer_plans_nothing() {
    let s = svc(&[], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let mut obs = converged(&d, &nodes(&["i-a"]));
    obs.lbs.clear();
    let p = plan_hosts(&obs, &nodes(&["i-b"])).expect("plan");
    assert_eq!(p.calls, vec![]);
    assert_eq!(p.lb, None);
}

//! Adoption's pure decisions.

use super::*;
use crate::aws::elb::{LbObs, LbRef, ObservedLb, ObservedListener, ObservedTg, TgRef};
use crate::aws::spec::HealthCheck;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn svc(adopt: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some("web".into()),
            annotations: adopt.map(|a| [(ADOPT_ANNOTATION.to_string(), a.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn health() -> HealthCheck {
    HealthCheck {
        protocol: "TCP".into(),
        port: "traffic-port".into(),
        path: None,
        interval: 30,
        timeout: 10,
        healthy: 3,
        unhealthy: 3,
    }
}

fn tags(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_annotation_names_a_network_load_balancer() {
    assert_eq!(adopted_name(&svc(None)).ok(), Some(None));
    let by_name = adopted_name(&svc(Some(" legacy-nlb "))).ok().flatten();
    assert_eq!(by_name.as_deref(), Some("legacy-nlb"));
    let arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/net/legacy-nlb/50dc6c495c0c9188";
    assert_eq!(
        adopted_name(&svc(Some(arn))).ok().flatten().as_deref(),
        Some("legacy-nlb")
    );
    for bad in [
        "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc",
        "",
        "has_underscore",
        "-leading",
        "internal-reserved",
        "a-name-that-is-longer-than-thirty-two",
    ] {
        let e = adopted_name(&svc(Some(bad))).expect_err(bad);
        assert!(
            e.is_permanent() && e.has_code(ADOPTION_REFUSED),
            "{bad}: {e}"
        );
    }
}

#[test]
fn verdicts() {
    let s = svc(Some("old"));
    let nlb = |t: &BTreeMap<String, String>| {
        verdict(
            "old",
            Some("network"),
            Some("internet-facing"),
            Scheme::InternetFacing,
            t,
            "c1",
            &s,
        )
    };
    // Untagged (another controller's, or made by hand): tag it as ours.
    let want_tags = tags(&[
        ("kubernetes.io/cluster/c1", "owned"),
        ("kubernetes.io/service-name", "ns/web"),
    ]);
    assert_eq!(
        nlb(&tags(&[("team", "x")])).ok(),
        Some(Verdict::Tag(want_tags.clone()))
    );
    assert_eq!(nlb(&want_tags).ok(), Some(Verdict::Ours));
    // Shared with our cluster but no Service yet: tag.
    let shared = tags(&[("kubernetes.io/cluster/c1", "shared")]);
    assert!(matches!(nlb(&shared), Ok(Verdict::Tag(_))));
    let refusals = [
        tags(&[("kubernetes.io/cluster/c2", "owned")]),
        tags(&[("elbv2.k8s.aws/cluster", "c2")]),
        tags(&[
            ("kubernetes.io/cluster/c1", "owned"),
            ("kubernetes.io/service-name", "other-ns/secret"),
        ]),
    ];
    for t in refusals {
        let e = nlb(&t).expect_err("refused");
        assert!(e.is_permanent() && e.has_code(ADOPTION_REFUSED), "{t:?}");
        assert!(
            !e.to_string().contains("other-ns"),
            "names no other Service: {e}"
        );
    }
    let alb = verdict(
        "old",
        Some("application"),
        None,
        Scheme::InternetFacing,
        &tags(&[]),
        "c1",
        &s,
    );
    assert!(alb.is_err_and(|e| e.to_string().contains("not a network load balancer")));
    let scheme = verdict(
        "old",
        Some("network"),
        Some("internal"),
        Scheme::InternetFacing,
        &tags(&[]),
        "c1",
        &s,
    );
    assert!(scheme.is_err_and(|e| e.is_permanent()));
}

fn plan(calls: Vec<ElbCall>) -> ElbPlan {
    ElbPlan {
        calls,
        lb: Some(LbRef::Existing("lb".into())),
        target_groups: vec![],
    }
}

#[test]
fn listener_changes_wait_for_healthy_targets() {
    let create = ElbCall::CreateTargetGroup {
        name: "ours".into(),
        protocol: "TCP".into(),
        port: 30080,
        health: health(),
        tags: BTreeMap::new(),
        vpc_of: LbRef::Existing("lb".into()),
    };
    let register = ElbCall::RegisterTargets {
        tg: TgRef::Created("ours".into()),
        targets: [("i-1".to_string(), 30080)].into(),
    };
    let switch = ElbCall::ModifyListener {
        arn: "l80".into(),
        tg: TgRef::Created("ours".into()),
        tls: None,
    };
    let drop_old = ElbCall::DeleteListener { arn: "l81".into() };
    let p = plan(vec![create.clone(), register.clone(), drop_old, switch]);
    assert!(switches(&p));
    let held = hold_switch(&p);
    assert_eq!(held.calls, vec![create, register]);
    assert!(!switches(&held));
    assert!(!switches(&plan(vec![])));

    assert!(!ready_to_switch(&[]), "no group of ours yet");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(!ready_to_switch(&[s(&["initial", "unused"])]));
    assert!(!ready_to_switch(&[s(&["healthy"]), s(&["unhealthy"])]));
    assert!(ready_to_switch(&[
        s(&["healthy", "unused"]),
        s(&["healthy"])
    ]));
}

fn tg(arn: &str, owned: bool) -> ObservedTg {
    ObservedTg {
        arn: arn.into(),
        name: arn.into(),
        port: Some(30080),
        health: health(),
        tags: BTreeMap::new(),
        owned,
        attributes: BTreeMap::new(),
        targets: BTreeSet::new(),
    }
}

#[test]
fn leftovers_are_the_old_owners_groups_only() {
    let listener = |port: i32, tg: &str| ObservedListener {
        arn: format!("l{port}"),
        port,
        protocol: "TCP".into(),
        target_group: Some(tg.into()),
        ..Default::default()
    };
    let obs = Observed {
        lbs: vec![ObservedLb {
            lb: LbObs {
                arn: "lb".into(),
                ..Default::default()
            },
            owned: true,
            listeners: vec![listener(80, "old-80"), listener(443, "ours-443")],
            ..Default::default()
        }],
        target_groups: vec![
            tg("ours-443", true),
            tg("ours-80", true),
            tg("old-spare", false),
        ],
        ..Default::default()
    };
    let got: Vec<String> = leftovers(&obs).into_iter().collect();
    assert_eq!(got, vec!["old-80".to_string(), "old-spare".to_string()]);
}

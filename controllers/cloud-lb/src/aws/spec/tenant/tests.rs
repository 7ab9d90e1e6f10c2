//! Table tests of the tenant-safety decisions.

use super::*;
use crate::aws::spec::tests::svc;
use crate::aws::spec::{Defaults, desired};

fn subnet(id: &str, vpc: &str, name: Option<&str>) -> Subnet {
    Subnet {
        id: id.into(),
        zone: "us-east-1a".into(),
        tags: name
            .map(|n| [("Name".to_string(), n.to_string())].into())
            .unwrap_or_default(),
        vpc: Some(vpc.into()),
    }
}

#[test]
fn health_check_port_must_be_the_services_own() {
    let mut local = svc(&[], &[(80, "TCP", 30080), (443, "TCP", 30443)]);
    if let Some(s) = local.spec.as_mut() {
        s.health_check_node_port = Some(31999);
    }
    // (annotation value, allowed)
    for (port, ok) in [
        ("traffic-port", true),
        ("30080", true),
        ("30443", true),
        ("31999", true),
        ("22", false),
        ("10250", false),
        ("30081", false),
        ("0", false),
    ] {
        let r = check_health_port(&local, port);
        assert_eq!(r.is_ok(), ok, "{port}: {r:?}");
        if let Err(e) = r {
            assert!(e.is_permanent());
            assert_eq!(e.code(), Some(REFUSED_HEALTH_CHECK_PORT));
            assert!(e.to_string().contains("30080, 30443, 31999"), "{e}");
        }
    }
}

#[test]
fn a_foreign_health_check_port_is_refused_before_any_call() {
    let defaults = Defaults {
        subnets: vec!["subnet-1".into()],
    };
    let bad = svc(&[("healthcheck-port", "22")], &[(80, "TCP", 30080)]);
    let e = desired("c", &bad, &defaults).expect_err("port 22 is not the Service's");
    assert_eq!(e.code(), Some(REFUSED_HEALTH_CHECK_PORT));
    let own = svc(&[("healthcheck-port", "30080")], &[(80, "TCP", 30080)]);
    let d = desired("c", &own, &defaults).expect("its own node port");
    assert_eq!(d.target_groups[0].health.port, "30080");
}

#[test]
fn named_subnets_must_be_in_the_cluster_vpc() {
    let found = vec![
        subnet("subnet-a", "vpc-1", Some("public-a")),
        subnet("subnet-b", "vpc-1", None),
        subnet("subnet-x", "vpc-2", Some("public-x")),
        subnet("subnet-y", "vpc-2", Some("public-a")),
        subnet("subnet-d1", "vpc-1", Some("dup")),
        subnet("subnet-d2", "vpc-1", Some("dup")),
    ];
    let req = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    /// (requested, Ok(ids) or a fragment of the refusal)
    type Case = (Vec<String>, Result<Vec<&'static str>, &'static str>);
    let cases: Vec<Case> = vec![
        (
            req(&["subnet-a", "subnet-b"]),
            Ok(vec!["subnet-a", "subnet-b"]),
        ),
        // A name also used in another VPC resolves to the cluster's one.
        (req(&["public-a"]), Ok(vec!["subnet-a"])),
        (
            req(&["subnet-a", "subnet-x"]),
            Err("subnet-x is not in the cluster's VPC vpc-1"),
        ),
        (
            req(&["public-x"]),
            Err("public-x is not in the cluster's VPC"),
        ),
        (req(&["subnet-zzz"]), Err("subnet subnet-zzz not found")),
        (req(&["nowhere"]), Err("no subnet named \"nowhere\"")),
        (req(&["dup"]), Err("several subnets are named \"dup\"")),
    ];
    for (r, want) in cases {
        let got = subnets_in_vpc(&r, &found, "vpc-1");
        match want {
            Ok(ids) => assert_eq!(got.expect("allowed"), req(&ids), "{r:?}"),
            Err(frag) => {
                let e = got.expect_err("refused");
                assert!(e.is_permanent() && e.code() == Some(REFUSED_SUBNET));
                assert!(e.to_string().contains(frag), "{r:?}: {e}");
            }
        }
    }
}

#[test]
fn rule_cap() {
    assert!(check_rule_cap(20, 20).is_ok());
    let e = check_rule_cap(21, 20).expect_err("over the cap");
    assert_eq!(e.code(), Some(REFUSED_RULE_CAP));
    assert!(e.to_string().contains("21") && e.to_string().contains("20"));
}

#[test]
fn unsupported_annotations_are_listed() {
    let s = svc(
        &[
            ("healthcheck-port", "traffic-port"),
            ("proxy-protocol", "*"),
            ("access-log-enabled", "true"),
            ("subnets", "subnet-a"),
        ],
        &[(80, "TCP", 30080)],
    );
    assert_eq!(
        unsupported_annotations(&s).into_iter().collect::<Vec<_>>(),
        vec![
            format!("{ANN}access-log-enabled"),
            format!("{ANN}proxy-protocol"),
        ]
    );
    assert!(unsupported_annotations(&svc(&[("type", "nlb")], &[(80, "TCP", 30080)])).is_empty());
}

#[test]
fn other_services_names_are_scrubbed() {
    let own = "k8s-team-web-";
    for (msg, want) in [
        (
            "DuplicateTargetGroupName: k8s-team-web-0123456789 exists",
            "DuplicateTargetGroupName: k8s-team-web-0123456789 exists",
        ),
        (
            "rule kubernetes.io/rule/nlb/client=k8s-other-db-abcdef0123 conflicts",
            "rule kubernetes.io/rule/nlb/client=<another Service's resource> conflicts",
        ),
        ("k8s-other-db-abcdef0123", "<another Service's resource>"),
        // Not one of our names: left alone.
        (
            "k8s-not-a-name and xk8s-a-b-0123456789",
            "k8s-not-a-name and xk8s-a-b-0123456789",
        ),
    ] {
        assert_eq!(scrub_foreign_names(msg, own), want);
    }
    let e = scrub_error(
        ProviderError::retryable("in use by k8s-other-db-abcdef0123").with_code("ResourceInUse"),
        own,
    );
    assert_eq!(e.to_string(), "in use by <another Service's resource>");
    assert_eq!(e.code(), Some("ResourceInUse"));
}

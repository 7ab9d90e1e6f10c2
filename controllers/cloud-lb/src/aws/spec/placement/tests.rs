//! Table tests: fixed addresses per subnet and target nodes by label.

use super::*;
use crate::aws::spec::tests::svc;
use crate::aws::spec::{Defaults, desired};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn defaults() -> Defaults {
    Defaults {
        subnets: vec!["subnet-1".into()],
    }
}

#[test]
fn addresses_are_checked_against_the_scheme() {
    let ok = [
        vec![("eip-allocations", "eipalloc-1, eipalloc-2")],
        vec![
            ("internal", "true"),
            ("private-ipv4-addresses", "10.0.1.10,10.0.2.10"),
        ],
        vec![
            ("scheme", "internal"),
            ("private-ipv4-addresses", "10.0.1.10"),
        ],
    ];
    for ann in ok {
        let d = desired("c", &svc(&ann, &[(80, "TCP", 30080)]), &defaults());
        assert!(d.is_ok(), "{ann:?}: {d:?}");
    }
    let d = desired(
        "c",
        &svc(
            &[("eip-allocations", "eipalloc-1, eipalloc-2")],
            &[(80, "TCP", 30080)],
        ),
        &defaults(),
    )
    .expect("valid");
    assert_eq!(d.eip_allocations, vec!["eipalloc-1", "eipalloc-2"]);
    let bad = [
        vec![("eip-allocations", "1.2.3.4")],
        vec![("eip-allocations", " , ")],
        vec![("internal", "true"), ("eip-allocations", "eipalloc-1")],
        vec![("private-ipv4-addresses", "10.0.1.10")],
        vec![("internal", "true"), ("private-ipv4-addresses", "10.0.1")],
        vec![("internal", "true"), ("private-ipv4-addresses", "fd00::1")],
        vec![("target-node-labels", "=x")],
    ];
    for ann in bad {
        let r = desired("c", &svc(&ann, &[(80, "TCP", 30080)]), &defaults());
        assert!(
            r.as_ref().is_err_and(|e| e.is_permanent()),
            "{ann:?}: {r:?}"
        );
    }
}

#[test]
fn addresses_pair_with_subnets_in_order() {
    let subnets = vec!["subnet-a".to_string(), "subnet-b".to_string()];
    let eips = vec!["eipalloc-1".to_string(), "eipalloc-2".to_string()];
    assert_eq!(
        subnet_mappings(&subnets, &eips, &[]).expect("one per subnet"),
        vec![
            ("subnet-a".into(), Some("eipalloc-1".into()), None),
            ("subnet-b".into(), Some("eipalloc-2".into()), None),
        ]
    );
    assert_eq!(
        subnet_mappings(&subnets, &[], &[]).expect("none"),
        vec![
            ("subnet-a".into(), None, None),
            ("subnet-b".into(), None, None)
        ]
    );
    let e = subnet_mappings(&subnets, &eips[..1], &[]).expect_err("one short");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("1 values for 2 subnets"), "{e}");
    assert!(subnet_mappings(&subnets[..1], &[], &["10.0.0.1".into(), "10.0.0.2".into()]).is_err());
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
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
        ..Default::default()
    }
}

#[test]
fn target_nodes_carry_every_label() {
    let nodes = vec![
        node("a", &[("pool", "edge"), ("zone", "z1")]),
        node("b", &[("pool", "edge")]),
        node("c", &[("pool", "batch"), ("zone", "z1")]),
        node("d", &[]),
    ];
    // (annotation, target node names)
    for (v, want) in [
        (None, vec!["a", "b", "c", "d"]),
        (Some("pool=edge"), vec!["a", "b"]),
        (Some("pool=edge,zone=z1"), vec!["a"]),
        // A key without a value: the label's presence is enough.
        (Some("zone"), vec!["a", "c"]),
        (Some("zone="), vec!["a", "c"]),
        (Some("pool=none"), vec![]),
    ] {
        let ann: Vec<(&str, &str)> = v.map(|v| ("target-node-labels", v)).into_iter().collect();
        let s = svc(&ann, &[(80, "TCP", 30080)]);
        let got: Vec<String> = target_nodes(&s, &nodes)
            .expect("valid")
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        assert_eq!(got, want, "{v:?}");
    }
}

//! TLS listeners (`ssl-cert`, `ssl-ports`, `ssl-negotiation-policy`): which ports get TLS, and
//! the calls that make, keep and change them; and fixed addresses (`eip-allocations`,
//! `private-ipv4-addresses`) on the create.

use super::super::plan;
use super::*;
use crate::aws::elb::{ElbCall, TgRef};
use crate::aws::spec::Tls;

const CERT: &str = "arn:aws:acm:us-east-1:123456789012:certificate/abc";

fn tls(policy: Option<&str>) -> Option<Tls> {
    Some(Tls {
        certificate: CERT.into(),
        policy: policy.map(str::to_string),
    })
}

#[test]
fn ssl_ports_pick_the_tls_listeners() {
    let ports = [(80, "TCP", 30080), (443, "TCP", 30443), (53, "UDP", 30053)];
    /// (annotations, listener protocols by port 53, 80, 443)
    type Case = (Vec<(&'static str, &'static str)>, [&'static str; 3]);
    let cases: Vec<Case> = vec![
        (vec![], ["UDP", "TCP", "TCP"]),
        // A policy or ports without a certificate change nothing (as upstream).
        (
            vec![("ssl-ports", "443"), ("ssl-negotiation-policy", "p")],
            ["UDP", "TCP", "TCP"],
        ),
        // Every TCP port by default (and with "*"); UDP never.
        (vec![("ssl-cert", CERT)], ["UDP", "TLS", "TLS"]),
        (
            vec![("ssl-cert", CERT), ("ssl-ports", "*")],
            ["UDP", "TLS", "TLS"],
        ),
        (
            vec![("ssl-cert", CERT), ("ssl-ports", "443")],
            ["UDP", "TCP", "TLS"],
        ),
        // Port names count too (the test Service's ports are unnamed: only numbers match).
        (
            vec![("ssl-cert", CERT), ("ssl-ports", "https, 80")],
            ["UDP", "TLS", "TCP"],
        ),
    ];
    for (ann, want) in cases {
        let d = desired(&svc(&ann, &ports));
        let got: Vec<&str> = d.listeners.iter().map(|l| l.protocol.as_str()).collect();
        assert_eq!(got, want, "{ann:?}");
        for l in &d.listeners {
            assert_eq!(l.tls.is_some(), l.protocol == "TLS");
        }
        // Targets stay TCP: the groups (and their names) do not change with TLS.
        assert_eq!(d.target_groups, desired(&svc(&[], &ports)).target_groups);
    }
    let named = {
        let mut s = svc(&[("ssl-cert", CERT), ("ssl-ports", "https")], &ports);
        if let Some(p) = s.spec.as_mut().and_then(|sp| sp.ports.as_mut()) {
            p[1].name = Some("https".into());
        }
        desired(&s)
    };
    assert_eq!(named.listeners[2].protocol, "TLS");
    assert_eq!(
        named.listeners[2].tls,
        tls(None),
        "no policy named: ELBv2's default"
    );
}

#[test]
fn bad_tls_asks_are_permanent() {
    let not_arn = svc(&[("ssl-cert", "my-cert")], &[(443, "TCP", 30443)]);
    let mixed = svc(
        &[("ssl-cert", CERT)],
        &[(53, "TCP", 30053), (53, "UDP", 30053)],
    );
    for s in [not_arn, mixed] {
        let e = spec::desired(CLUSTER, &s, &spec::Defaults::default()).expect_err("refused");
        assert!(e.is_permanent(), "{e}");
    }
}

#[test]
fn tls_listeners_are_created_kept_and_corrected() {
    let plain = svc(&[], &[(443, "TCP", 30443)]);
    let with = |ann: &[(&str, &str)]| svc(ann, &[(443, "TCP", 30443)]);
    let tg = TgRef::Existing(tg_arn(&tg_name(&plain, 443, "TCP", 30443)));
    let n = nodes(&["i-a"]);

    // TCP to TLS: a protocol change, so delete then create (moto cannot ModifyListener to TLS).
    let d = desired(&with(&[
        ("ssl-cert", CERT),
        ("ssl-negotiation-policy", "P1"),
    ]));
    let p = plan(&d, &converged(&desired(&plain), &n), &n).expect("plan");
    assert_eq!(
        p.calls,
        vec![
            ElbCall::DeleteListener {
                arn: listener_arn(443)
            },
            ElbCall::CreateListener {
                lb: crate::aws::elb::LbRef::Existing(LB_ARN.into()),
                port: 443,
                protocol: "TLS".into(),
                tg: tg.clone(),
                tls: tls(Some("P1")),
            },
        ]
    );
    // Converged: nothing.
    assert!(
        plan(&d, &converged(&d, &n), &n)
            .expect("plan")
            .calls
            .is_empty()
    );
    // A certificate or named policy changed in place: ModifyListener with both.
    for ann in [
        vec![
            ("ssl-cert", "arn:aws:acm:us-east-1:1:certificate/new"),
            ("ssl-negotiation-policy", "P1"),
        ],
        vec![("ssl-cert", CERT), ("ssl-negotiation-policy", "P2")],
    ] {
        let now = desired(&with(&ann));
        let p = plan(&now, &converged(&d, &n), &n).expect("plan");
        assert_eq!(
            p.calls,
            vec![ElbCall::ModifyListener {
                arn: listener_arn(443),
                tg: tg.clone(),
                tls: now.listeners[0].tls.clone(),
            }],
            "{ann:?}"
        );
    }
    // No policy named: whatever default the listener has is left alone.
    let default_policy = desired(&with(&[("ssl-cert", CERT)]));
    assert!(
        plan(&default_policy, &converged(&d, &n), &n)
            .expect("plan")
            .calls
            .is_empty()
    );
}

#[test]
fn fixed_addresses_go_with_the_create_one_per_subnet() {
    let s = svc(&[("eip-allocations", "eipalloc-1")], &[(80, "TCP", 30080)]);
    let d = desired(&s);
    let p = plan(&d, &nothing(&d), &nodes(&["i-a"])).expect("one subnet, one EIP");
    assert!(matches!(
        &p.calls[0],
        ElbCall::CreateLoadBalancer { subnets, eip_allocations, private_ipv4_addresses, .. }
            if subnets == &vec!["subnet-1".to_string()]
                && eip_allocations == &vec!["eipalloc-1".to_string()]
                && private_ipv4_addresses.is_empty()
    ));
    // Two EIPs for the one resolved subnet: refused, nothing planned.
    let two = desired(&svc(
        &[("eip-allocations", "eipalloc-1,eipalloc-2")],
        &[(80, "TCP", 30080)],
    ));
    let e = plan(&two, &nothing(&two), &nodes(&["i-a"])).expect_err("count mismatch");
    assert!(e.is_permanent(), "{e}");
    // An existing load balancer is kept as it is (addresses are set only at creation).
    assert!(
        plan(
            &two,
            &converged(&desired(&s), &nodes(&["i-a"])),
            &nodes(&["i-a"])
        )
        .expect("plan")
        .calls
        .is_empty()
    );
}

//! Table tests of address sharing on the pure core (MetalLB's rules).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use scm_allocator::IpFamily;

use super::*;
use crate::local::plan::{Candidate, PoolDef, assign, compile, pool_report};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn terms(key: &str, backend: &str, ports: &[(&str, i32)]) -> Share {
    Share {
        key: key.into(),
        backend: backend.into(),
        ports: ports.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
    }
}

fn cand(uid: &str, req: &[&str], share: Option<Share>) -> Candidate {
    Candidate {
        uid: uid.into(),
        who: format!("ns/{uid}"),
        families: vec![IpFamily::V4],
        requested: req.iter().map(|s| ip(s)).collect(),
        share,
        ..Candidate::default()
    }
}

fn pools() -> Vec<crate::local::plan::Pool> {
    compile(&[PoolDef {
        name: "p".into(),
        cidrs: vec!["10.0.0.0/29".into()],
        ..PoolDef::default()
    }])
}

/// A book where `a` holds 10.0.0.1 with `share`.
fn book_with(share: Option<Share>) -> Book {
    let mut b = Book::default();
    b.take_shared(ip("10.0.0.1"), "a", "ns/a", Some("p".into()), share);
    b
}

/// Name, holder's terms, newcomer's terms, and the outcome (an error names the reason).
type Case = (
    &'static str,
    Option<Share>,
    Option<Share>,
    Result<(), &'static str>,
);

#[test]
fn pins_share_only_on_matching_keys_policies_and_free_ports() {
    let http = terms("k", "", &[("TCP", 80)]);
    let cases: &[Case] = &[
        (
            "same key, other port",
            Some(http.clone()),
            Some(terms("k", "", &[("TCP", 443)])),
            Ok(()),
        ),
        (
            "same port, other protocol (DNS over TCP and UDP)",
            Some(http.clone()),
            Some(terms("k", "", &[("UDP", 80)])),
            Ok(()),
        ),
        (
            "port clash",
            Some(http.clone()),
            Some(terms("k", "", &[("TCP", 8080), ("TCP", 80)])),
            Err("port TCP/80 is already used on it by ns/a"),
        ),
        (
            "other key",
            Some(http.clone()),
            Some(terms("j", "", &[("TCP", 443)])),
            Err("sharing key \"j\" differs from key \"k\" of ns/a"),
        ),
        (
            "Local with another selector",
            Some(terms("k", "Local:app=x", &[("TCP", 80)])),
            Some(terms("k", "Local:app=y", &[("TCP", 443)])),
            Err("externalTrafficPolicy Local"),
        ),
        (
            "Local beside Cluster",
            Some(http.clone()),
            Some(terms("k", "Local:app=x", &[("TCP", 443)])),
            Err("externalTrafficPolicy Local"),
        ),
        (
            "Local with the same selector",
            Some(terms("k", "Local:app=x", &[("TCP", 80)])),
            Some(terms("k", "Local:app=x", &[("TCP", 443)])),
            Ok(()),
        ),
        (
            "the newcomer does not ask to share",
            Some(http.clone()),
            None,
            Err("held"),
        ),
        (
            "the holder does not allow sharing",
            None,
            Some(http.clone()),
            Err("held"),
        ),
    ];
    let pools = pools();
    for (name, holder, newcomer, want) in cases {
        let book = book_with(holder.clone());
        let got = assign(
            &pools,
            &book,
            &BTreeMap::new(),
            &cand("b", &["10.0.0.1"], newcomer.clone()),
        );
        match (want, got) {
            (Ok(()), Ok(a)) => {
                assert_eq!(a.addresses, vec![ip("10.0.0.1")], "{name}");
                assert_eq!(a.taken, vec![(ip("10.0.0.1"), "p".to_string())], "{name}");
            }
            (Err("held"), Err(Refusal::Held(i, who))) => {
                assert_eq!((i, who.as_str()), (ip("10.0.0.1"), "ns/a"), "{name}");
            }
            (Err(msg), Err(Refusal::Unshareable(i, why))) => {
                assert_eq!(i, ip("10.0.0.1"), "{name}");
                assert!(why.contains(msg), "{name}: {why}");
            }
            (w, g) => panic!("{name}: want {w:?}, got {g:?}"),
        }
    }
}

#[test]
fn unpinned_sharers_join_the_keys_address_and_clashing_ones_get_another() {
    let pools = pools();
    let book = book_with(Some(terms("k", "", &[("TCP", 80)])));
    // Compatible: joins 10.0.0.1 rather than taking the free 10.0.0.2.
    let a = assign(
        &pools,
        &book,
        &BTreeMap::new(),
        &cand("b", &[], Some(terms("k", "", &[("TCP", 443)]))),
    )
    .expect("joins");
    assert_eq!(a.addresses, vec![ip("10.0.0.1")]);
    // Clashing port, other key, or no sharing at all: a fresh address.
    for share in [
        Some(terms("k", "", &[("TCP", 80)])),
        Some(terms("j", "", &[("TCP", 443)])),
        None,
    ] {
        let a = assign(
            &pools,
            &book,
            &BTreeMap::new(),
            &cand("b", &[], share.clone()),
        )
        .expect("another address");
        assert_eq!(a.addresses, vec![ip("10.0.0.2")], "{share:?}");
    }
    // A blocked shared address (someone else publishes it too) is not joined.
    let blocked = BTreeMap::from([(ip("10.0.0.1"), "other (spec.externalIPs)".to_string())]);
    let a = assign(
        &pools,
        &book,
        &blocked,
        &cand("b", &[], Some(terms("k", "", &[("TCP", 443)]))),
    )
    .expect("fresh");
    assert_eq!(a.addresses, vec![ip("10.0.0.2")]);
}

#[test]
fn a_shared_address_is_released_only_when_its_last_holder_goes() {
    let pools = pools();
    let mut book = book_with(Some(terms("k", "", &[("TCP", 80)])));
    book.take_shared(
        ip("10.0.0.1"),
        "b",
        "ns/b",
        Some("p".into()),
        Some(terms("k", "", &[("TCP", 443)])),
    );
    assert_eq!(
        pool_report(&pools[0], &book, &BTreeMap::new()).allocated.0,
        1
    );
    assert_eq!(book.release_all("a"), vec![ip("10.0.0.1")]);
    assert!(book.held_by_other(ip("10.0.0.1"), "c"), "b still holds it");
    // An unshared newcomer still cannot have it; the lowest free one is 10.0.0.2.
    let a = assign(&pools, &book, &BTreeMap::new(), &cand("c", &[], None)).expect("c");
    assert_eq!(a.addresses, vec![ip("10.0.0.2")]);
    book.release_all("b");
    assert!(book.holders(ip("10.0.0.1")).is_empty());
    let a = assign(&pools, &book, &BTreeMap::new(), &cand("c", &[], None)).expect("c");
    assert_eq!(a.addresses, vec![ip("10.0.0.1")]);
}

#[test]
fn a_sharer_that_changes_into_a_clash_keeps_its_address_and_is_reported() {
    let mut book = book_with(Some(terms("k", "", &[("TCP", 80)])));
    book.take_shared(
        ip("10.0.0.1"),
        "b",
        "ns/b",
        Some("p".into()),
        Some(terms("k", "", &[("TCP", 443)])),
    );
    assert!(conflicts(&book).is_empty());
    // b now also listens on 80: it keeps the address (never moves), and is reported.
    let changed = terms("k", "", &[("TCP", 443), ("TCP", 80)]);
    book.set_share("b", Some(&changed));
    let a = assign(
        &pools(),
        &book,
        &BTreeMap::new(),
        &cand("b", &[], Some(changed)),
    )
    .expect("kept");
    assert_eq!(a.addresses, vec![ip("10.0.0.1")]);
    let c = conflicts(&book);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].0, c[0].1.who.as_str()), (ip("10.0.0.1"), "ns/b"));
    assert!(c[0].2.contains("port TCP/80"), "{}", c[0].2);
}

#[test]
fn terms_come_from_the_annotation_policy_selector_and_ports() {
    let svc = |ann: Option<&str>, etp: &str| Service {
        metadata: kube::api::ObjectMeta {
            annotations: ann
                .map(|k| [(ALLOW_SHARED_IP_ANNOTATION.to_string(), k.to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            external_traffic_policy: Some(etp.into()),
            selector: Some([("b".into(), "2".into()), ("a".into(), "1".into())].into()),
            ports: Some(vec![
                ServicePort {
                    port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
                ServicePort {
                    port: 53,
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(of(&svc(None, "Cluster")), None);
    assert_eq!(of(&svc(Some(" "), "Cluster")), None);
    assert_eq!(
        of(&svc(Some("dns"), "Cluster")),
        Some(terms("dns", "", &[("UDP", 53), ("TCP", 53)]))
    );
    assert_eq!(
        of(&svc(Some("dns"), "Local")).map(|s| s.backend),
        Some("Local:a=1,b=2".to_string())
    );
}

//! Table tests of the pools' pure core.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

fn def(name: &str, cidrs: &[&str]) -> PoolDef {
    PoolDef {
        name: name.into(),
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        ..PoolDef::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn cand(uid: &str, fams: &[IpFamily], req: &[&str]) -> Candidate {
    Candidate {
        uid: uid.into(),
        who: format!("ns/{uid}"),
        families: fams.to_vec(),
        requested: req.iter().map(|s| ip(s)).collect(),
        ..Candidate::default()
    }
}

#[test]
fn ranges_parse_cidrs_and_dash_ranges() {
    let cases: &[(&str, Option<(&str, &str)>)] = &[
        ("10.0.0.0/30", Some(("10.0.0.1", "10.0.0.2"))),
        ("10.0.0.4/31", Some(("10.0.0.4", "10.0.0.5"))),
        ("10.0.0.9/32", Some(("10.0.0.9", "10.0.0.9"))),
        ("fd00::/126", Some(("fd00::1", "fd00::3"))),
        ("10.0.0.10-10.0.0.20", Some(("10.0.0.10", "10.0.0.20"))),
        (" fd00::5 - fd00::9 ", Some(("fd00::5", "fd00::9"))),
        ("10.0.0.20-10.0.0.10", None),
        ("10.0.0.1-fd00::1", None),
        ("10.0.0.1/30", None),
        ("banana", None),
        ("10.0.0.0/33", None),
    ];
    for (s, want) in cases {
        let got = Range::parse(s).ok().map(|r| (r.first, r.last));
        assert_eq!(got, want.map(|(a, b)| (ip(a), ip(b))), "{s}");
    }
    let r = Range::parse("10.0.0.0-10.0.2.255").expect("range");
    // .0 and .255 of three /24s.
    assert_eq!(r.buggy_count(), 6);
    assert_eq!(
        Range::parse("10.0.0.1-10.0.0.254")
            .expect("r")
            .buggy_count(),
        0
    );
}

#[test]
fn compile_flags_invalid_entries_and_overlaps_but_keeps_the_rest() {
    let pools = compile(&[
        def("a", &["10.0.0.0/29"]),
        def("bad", &["10.1.0.0/29", "nope"]),
        def("overlap", &["10.0.0.4-10.0.0.20"]),
        def("empty", &[]),
        def("b", &["10.2.0.0/29"]),
    ]);
    let by = |n: &str| pools.iter().find(|p| p.def.name == n).expect("pool");
    assert!(by("a").serves() && by("b").serves());
    assert!(!by("bad").serves() && by("bad").invalid[0].contains("nope"));
    assert_eq!(by("overlap").overlaps, vec!["a".to_string()]);
    assert!(!by("empty").serves());
    // An invalid selector operator is a finding too.
    let mut d = def("sel", &["10.3.0.0/29"]);
    d.service_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "k".into(),
            operator: "Sometimes".into(),
            values: None,
        }]),
        ..Default::default()
    });
    assert!(!compile(&[d])[0].serves());
}

#[test]
fn held_addresses_never_move_when_pools_shrink_or_vanish() {
    let mut book = Book::default();
    book.take(ip("10.0.0.5"), "a", "ns/a", Some("p".into()));
    let none = BTreeMap::new();
    for pools in [
        compile(&[def("p", &["10.0.0.0/29"])]),
        compile(&[def("p", &["10.0.0.0/30"])]),
        compile(&[]),
        compile(&[def("p", &["10.9.0.0/30"])]),
    ] {
        let a = assign(&pools, &book, &none, &cand("a", &[IpFamily::V4], &[])).expect("kept");
        assert_eq!(a.addresses, vec![ip("10.0.0.5")]);
        assert!(a.taken.is_empty() && a.released.is_empty());
    }
    // The shrunk pool reports the address outside it; nothing else covers it.
    let shrunk = compile(&[def("p", &["10.0.0.0/30"])]);
    let rep = pool_report(&shrunk[0], &book, &none);
    assert_eq!(rep.outside, vec![(ip("10.0.0.5"), "ns/a".to_string())]);
    assert_eq!(rep.allocated, (0, 0));
    assert_eq!(uncovered(&shrunk, &book).len(), 1);
    // A dual-stack Service gaining an IPv6 pool keeps its IPv4 address and adds one.
    let both = compile(&[def("v6", &["fd00::/126"])]);
    let a = assign(
        &both,
        &book,
        &none,
        &cand("a", &[IpFamily::V4, IpFamily::V6], &[]),
    )
    .expect("v6");
    assert_eq!(a.addresses, vec![ip("10.0.0.5"), ip("fd00::1")]);
}

#[test]
fn allocation_skips_held_blocked_pinned_and_buggy_addresses() {
    let mut p = def("p", &["10.0.0.254-10.0.1.3"]);
    p.avoid_buggy_ips = true;
    let pools = compile(&[p]);
    let mut book = Book::default();
    book.take(ip("10.0.1.1"), "x", "ns/x", Some("p".into()));
    let blocked: BTreeMap<IpAddr, String> =
        [(ip("10.0.0.254"), "other/foreign".to_string())].into();
    // .254 blocked, .255 and .0 buggy, 1.1 held: 1.2 is next.
    let a = assign(&pools, &book, &blocked, &cand("a", &[IpFamily::V4], &[])).expect("one");
    assert_eq!(a.addresses, vec![ip("10.0.1.2")]);
    let rep = pool_report(&pools[0], &book, &blocked);
    // 6 addresses, 2 buggy, 1 held, 1 blocked: 2 left.
    assert_eq!((rep.allocated, rep.available), ((1, 0), (2, 0)));
}

#[test]
fn pins_are_checked_against_pools_holders_and_publishers() {
    let mut sel = def("team", &["10.5.0.0/29"]);
    sel.service_selector = Some(LabelSelector {
        match_labels: Some([("team".to_string(), "a".to_string())].into()),
        ..Default::default()
    });
    let pools = compile(&[def("p", &["10.0.0.0/29"]), sel]);
    let mut book = Book::default();
    book.take(ip("10.0.0.2"), "x", "ns/x", Some("p".into()));
    let blocked: BTreeMap<IpAddr, String> = [(ip("10.0.0.3"), "o/ext".to_string())].into();
    let table: &[(&str, Result<&str, Refusal>)] = &[
        ("10.0.0.1", Ok("10.0.0.1")),
        (
            "10.0.0.2",
            Err(Refusal::Held(ip("10.0.0.2"), "ns/x".into())),
        ),
        (
            "10.0.0.3",
            Err(Refusal::Held(ip("10.0.0.3"), "o/ext".into())),
        ),
        ("10.9.9.9", Err(Refusal::Outside(ip("10.9.9.9")))),
        (
            "10.5.0.1",
            Err(Refusal::NotAdmitted(ip("10.5.0.1"), "team".into())),
        ),
        ("fd00::1", Err(Refusal::WrongFamily(ip("fd00::1")))),
    ];
    for (req, want) in table {
        let got = assign(&pools, &book, &blocked, &cand("a", &[IpFamily::V4], &[req]))
            .map(|a| a.addresses);
        assert_eq!(got, want.clone().map(|w| vec![ip(w)]), "{req}");
    }
    // With the label, the selector admits it.
    let mut c = cand("a", &[IpFamily::V4], &["10.5.0.1"]);
    c.labels = [("team".to_string(), "a".to_string())].into();
    assert!(assign(&pools, &book, &blocked, &c).is_ok());
    // Unpinned, it never lands in the selective pool without the label either.
    let a = assign(&pools, &book, &blocked, &cand("b", &[IpFamily::V4], &[])).expect("one");
    assert_eq!(a.addresses, vec![ip("10.0.0.1")]);
}

#[test]
fn a_changed_pin_moves_only_that_family_and_exhaustion_is_per_family() {
    let pools = compile(&[def("p", &["10.0.0.0/30", "fd00::/127"])]);
    let mut book = Book::default();
    book.take(ip("10.0.0.1"), "a", "ns/a", Some("p".into()));
    book.take(ip("fd00::1"), "a", "ns/a", Some("p".into()));
    let none = BTreeMap::new();
    let a = assign(
        &pools,
        &book,
        &none,
        &cand("a", &[IpFamily::V4, IpFamily::V6], &["10.0.0.2"]),
    )
    .expect("moved");
    assert_eq!(a.addresses, vec![ip("10.0.0.2"), ip("fd00::1")]);
    assert_eq!(a.released, vec![ip("10.0.0.1")]);
    // fd00::/127 has fd00:: and fd00::1; fd00:: is free.
    let b = assign(&pools, &book, &none, &cand("b", &[IpFamily::V6], &[])).expect("v6");
    assert_eq!(b.addresses, vec![ip("fd00::")]);
    book.take(ip("fd00::"), "b", "ns/b", Some("p".into()));
    assert_eq!(
        assign(&pools, &book, &none, &cand("c", &[IpFamily::V6], &[])),
        Err(Refusal::Exhausted(IpFamily::V6))
    );
    assert_eq!(
        assign(
            &compile(&[]),
            &book,
            &none,
            &cand("c", &[IpFamily::V6], &[])
        ),
        Err(Refusal::NoPool(vec![IpFamily::V6]))
    );
}

#[test]
fn disabled_pools_serve_nothing_new_but_keep_covering_what_they_gave() {
    let mut d = def("p", &["10.0.0.0/30"]);
    d.disabled = true;
    let pools = compile(&[d]);
    let mut book = Book::default();
    book.take(ip("10.0.0.1"), "a", "ns/a", Some("p".into()));
    let none = BTreeMap::new();
    assert!(uncovered(&pools, &book).is_empty());
    assert_eq!(
        assign(&pools, &book, &none, &cand("b", &[IpFamily::V4], &[])),
        Err(Refusal::NoPool(vec![IpFamily::V4]))
    );
    let rep = pool_report(&pools[0], &book, &none);
    assert_eq!((rep.allocated, rep.available), ((1, 0), (0, 0)));
}

#[test]
fn namespace_selectors_admit_by_the_namespace_labels_and_unknown_namespaces_match_none() {
    let mut d = def("ns-only", &["10.7.0.0/30"]);
    d.namespace_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "team".into(),
            operator: "In".into(),
            values: Some(vec!["web".into(), "api".into()]),
        }]),
        ..Default::default()
    });
    let pools = compile(&[d]);
    let (book, none) = (Book::default(), BTreeMap::new());
    let with_ns = |labels: Option<&[(&str, &str)]>| {
        let mut c = cand("a", &[IpFamily::V4], &[]);
        c.ns_labels = labels.map(|l| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        assign(&pools, &book, &none, &c).map(|a| a.addresses)
    };
    assert_eq!(with_ns(Some(&[("team", "api")])), Ok(vec![ip("10.7.0.1")]));
    let refused = Err(Refusal::NoPool(vec![IpFamily::V4]));
    assert_eq!(with_ns(Some(&[("team", "db")])), refused);
    assert_eq!(with_ns(Some(&[])), refused);
    assert_eq!(
        with_ns(None),
        refused,
        "a namespace not listed yet matches no selector"
    );
}

//! The decision table of upstream's IPAddress repair loop, per IPAddress and per Service, and
//! capacity counted from IPAddresses.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::networking::v1::{IPAddress, IPAddressSpec, ParentReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use scm_allocator::Report;
use scm_runtime::ObjectKey;

use super::super::{Finding, Mirror, RangeConfig, build_with};
use super::{Grace, IpAddresses};

const T0: i64 = 1_700_000_000;

fn at(age: i64) -> Time {
    Time(Timestamp::from_second(T0 + age).unwrap())
}

fn time(age: i64) -> SystemTime {
    SystemTime::from(at(age).0)
}

fn svc(name: &str, age: i64, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("a".into()),
            name: Some(name.into()),
            creation_timestamp: Some(at(age)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ip_families: Some(vec![if ip.contains(':') { "IPv6" } else { "IPv4" }.into()]),
            ip_family_policy: Some("SingleStack".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// An IPAddress of the API server's allocator (`managed`), created at `age`, for `parent`
/// (`ns/name` of a Service, or `group/resource/ns/name` for anything else).
fn ipa(ip: &str, age: i64, parent: &str, managed: bool) -> IPAddress {
    let parts: Vec<&str> = parent.split('/').collect();
    let parent_ref = match parts.as_slice() {
        [ns, name] => ParentReference {
            group: Some(String::new()),
            resource: "services".into(),
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        },
        [g, r, ns, name] => ParentReference {
            group: Some(g.to_string()),
            resource: r.to_string(),
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        },
        _ => panic!("parent {parent}"),
    };
    let fam = if ip.contains(':') { "IPv6" } else { "IPv4" };
    let mut labels = BTreeMap::from([(super::LABEL_IP_FAMILY.to_string(), fam.to_string())]);
    if managed {
        labels.insert(super::LABEL_MANAGED_BY.into(), super::ALLOCATOR.into());
    }
    IPAddress {
        metadata: ObjectMeta {
            name: Some(ip.into()),
            creation_timestamp: Some(at(age)),
            labels: Some(labels),
            ..Default::default()
        },
        spec: IPAddressSpec { parent_ref },
    }
}

fn build(ranges: &[&str], svcs: &[Service], ips: &[IPAddress]) -> Mirror {
    build_current(ranges, svcs, ips, true)
}

fn build_current(ranges: &[&str], svcs: &[Service], ips: &[IPAddress], current: bool) -> Mirror {
    let cfg = RangeConfig::from_flag(
        &ranges
            .iter()
            .map(|r| r.parse().unwrap())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let s: Vec<&Service> = svcs.iter().collect();
    let o: Vec<&IPAddress> = ips.iter().collect();
    let view = IpAddresses {
        objects: &o,
        grace: Grace::default(),
        current,
    };
    build_with(&cfg, &s, &BTreeMap::new(), Some(&view))
}

fn k(ns: &str, n: &str) -> ObjectKey {
    ObjectKey::new(ns, n)
}

/// (reason, message, metric type, not_before) of the one finding about `key`.
fn one(m: &Mirror, key: &ObjectKey) -> (&'static str, String, &'static str, Option<SystemTime>) {
    let f = m
        .findings
        .get(key)
        .unwrap_or_else(|| panic!("{key}: {m:?}"));
    assert_eq!(f.len(), 1, "{f:?}");
    (
        f[0].reason(),
        f[0].message(),
        f[0].metric_type(),
        f[0].not_before(),
    )
}

fn kube() -> (Service, IPAddress) {
    (
        svc("kubernetes", 0, "10.96.0.1"),
        ipa("10.96.0.1", 0, "a/kubernetes", true),
    )
}

#[test]
fn per_ipaddress_decisions_as_repairip() {
    let (ks, ki) = kube();
    let svcs = vec![
        ks,
        svc("web", 10, "10.96.0.20"),
        svc("old", 10, "10.96.0.30"),
        {
            let mut e = svc("ext", 10, "10.96.0.40");
            let sp = e.spec.as_mut().unwrap();
            sp.type_ = Some("ExternalName".into());
            sp.cluster_ip = None;
            sp.cluster_ips = None;
            e
        },
    ];
    let ips = vec![
        ki,
        ipa("10.96.0.20", 10, "a/web", true),
        ipa("10.96.0.30", 10, "a/old", true),
        // Names a Service that does not exist.
        ipa("10.96.0.50", 20, "a/gone", true),
        // Does not name a Service at all.
        ipa(
            "10.96.0.51",
            20,
            "gateway.networking.k8s.io/gateways/a/gw",
            true,
        ),
        // Names an existing Service that does not hold it: created after it, and before it.
        ipa("10.96.0.52", 20, "a/web", true),
        ipa("10.96.0.53", 5, "a/web", true),
        // Names an ExternalName Service.
        ipa("10.96.0.54", 30, "a/ext", true),
        // Another controller's: never looked at.
        ipa("10.96.0.55", 20, "a/gone", false),
    ];
    let m = build(&["10.96.0.0/16"], &svcs, &ips);
    let ip = |n: &str| k("", n);
    assert_eq!(
        one(&m, &ip("10.96.0.50")),
        (
            "IPAddressNotAllocated",
            "IPAddress: 10.96.0.50 for Service a/gone appears to have leaked: cleaning up".into(),
            "leak",
            Some(time(20) + Duration::from_secs(60)),
        )
    );
    assert_eq!(
        one(&m, &ip("10.96.0.51")),
        (
            "IPAddressNotAllocated",
            "IPAddress 10.96.0.51 appears to have been modified, not referencing a Service &{gateway.networking.k8s.io gateways a gw}: cleaning up".into(),
            "leak",
            None,
        )
    );
    assert_eq!(
        one(&m, &ip("10.96.0.52")),
        (
            "IPAddressWrongReference",
            "IPAddress: 10.96.0.52 for Service a/web has a wrong reference; cleaning up".into(),
            "leak",
            // Newer than its Service: upstream waits 5 s.
            Some(time(20) + Duration::from_secs(5)),
        )
    );
    assert_eq!(one(&m, &ip("10.96.0.53")).3, Some(time(5)));
    assert_eq!(
        one(&m, &ip("10.96.0.54")).3,
        Some(time(30) + Duration::from_secs(60))
    );
    for quiet in ["10.96.0.1", "10.96.0.20", "10.96.0.30", "10.96.0.55"] {
        assert!(!m.findings.contains_key(&ip(quiet)), "{quiet}: {m:?}");
    }
    for s in ["kubernetes", "web", "old", "ext"] {
        assert!(!m.findings.contains_key(&k("a", s)), "{s}: {m:?}");
    }
}

#[test]
fn per_service_decisions_as_repairip() {
    let (ks, ki) = kube();
    let svcs = vec![
        ks,
        svc("missing", 1, "10.96.0.20"),
        svc("not-a-service", 1, "10.96.0.21"),
        svc("names-gone", 1, "10.96.0.22"),
        // Older than "young", but the IPAddress names "young": the API server's word wins.
        svc("older", 1, "10.96.0.23"),
        svc("young", 2, "10.96.0.23"),
        svc("names-other", 1, "10.96.0.24"),
        svc("other", 1, "10.96.0.25"),
        svc("out", 1, "10.97.0.1"),
    ];
    let ips = vec![
        ki,
        ipa("10.96.0.21", 1, "g.example/things/a/x", true),
        ipa("10.96.0.22", 1, "a/gone", true),
        ipa("10.96.0.23", 2, "a/young", true),
        ipa("10.96.0.24", 1, "a/other", true),
        ipa("10.96.0.25", 1, "a/other", true),
        // The API server's IPAddress for an address outside our ranges: still out of range.
        ipa("10.97.0.1", 1, "a/out", true),
    ];
    let m = build(&["10.96.0.0/16"], &svcs, &ips);
    assert_eq!(
        one(&m, &k("a", "missing")),
        (
            "ClusterIPNotAllocated",
            "Cluster IP [IPv4]: 10.96.0.20 is not allocated; repairing".into(),
            "repair",
            None,
        )
    );
    let wrong = |n: &str, ip: &str| {
        (
            "ClusterIPNotAllocated",
            format!(
                "the ClusterIP [IPv4]: {ip} for Service a/{n} has a wrong reference; repairing"
            ),
            "repair",
            None,
        )
    };
    assert_eq!(
        one(&m, &k("a", "not-a-service")),
        wrong("not-a-service", "10.96.0.21")
    );
    assert_eq!(
        one(&m, &k("a", "names-gone")),
        wrong("names-gone", "10.96.0.22")
    );
    assert_eq!(one(&m, &k("a", "older")).0, "ClusterIPAlreadyAllocated");
    assert!(!m.findings.contains_key(&k("a", "young")));
    assert_eq!(m.owners[&"10.96.0.23".parse().unwrap()], k("a", "young"));
    // Names another existing Service that does not hold it: nothing on the Service side (the
    // IPAddress side reports it).
    assert!(!m.findings.contains_key(&k("a", "names-other")));
    assert_eq!(one(&m, &k("", "10.96.0.24")).0, "IPAddressWrongReference");
    // Out of range first, as upstream checks it first.
    assert_eq!(one(&m, &k("a", "out")).0, "ClusterIPOutOfRange");
    // A watch not current: no finding compares the two, the IPAddresses still decide owners.
    let stale = build_current(&["10.96.0.0/16"], &svcs, &ips, false);
    let mut with_findings: Vec<String> = stale.findings.keys().map(|k| k.to_string()).collect();
    with_findings.sort();
    assert_eq!(with_findings, vec!["a/older", "a/out"]);
    assert_eq!(
        stale.owners[&"10.96.0.23".parse().unwrap()],
        k("a", "young")
    );
    // Every IPAddress finding waits to settle; the older ones do not.
    let settle = |key: &ObjectKey| m.findings[key][0].settle();
    assert_eq!(settle(&k("a", "missing")), super::super::SETTLE);
    assert_eq!(settle(&k("a", "out")), Duration::ZERO);
}

#[test]
fn capacity_counts_the_allocators_ipaddresses_per_family_and_cidr() {
    let (ks, ki) = kube();
    let svcs = vec![ks, svc("web", 1, "10.96.0.20"), svc("six", 1, "fd00::20")];
    let mut wrong_family = ipa("10.96.0.99", 1, "a/nobody", true);
    wrong_family
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(super::LABEL_IP_FAMILY.into(), "IPv6".into());
    let ips = vec![
        ki,
        // Leaked, still counted (the API server counts it until its repair deletes it).
        ipa("10.96.0.50", 1, "a/gone", true),
        ipa("fd00::20", 1, "a/six", true),
        // Not the allocator's, or labelled with another family: not counted.
        ipa("10.96.0.60", 1, "a/gone", false),
        wrong_family,
        // Outside every range.
        ipa("10.200.0.1", 1, "a/gone", true),
    ];
    let m = build(&["10.96.0.0/16", "fd00::/64"], &svcs, &ips);
    let cap: BTreeMap<String, (usize, usize)> = m
        .pool
        .capacity()
        .into_iter()
        .map(|(c, u, f)| (c.to_string(), (u, f)))
        .collect();
    // The Service "web" has no IPAddress: the API server does not count it, nor do we.
    assert_eq!(cap["10.96.0.0/16"], (2, 65534 - 2));
    // A /64 has more than i64::MAX addresses: i64::MAX minus allocated, as kube-apiserver.
    assert_eq!(cap["fd00::/64"], (1, (i64::MAX - 1) as usize));
    // Without IPAddresses of the allocator, the Services are the state.
    let m = build(&["10.96.0.0/16"], &svcs[..2], &ips[3..4]);
    assert!(m.pool.counted.is_none());
    assert!(m.findings.is_empty(), "{m:?}");
    assert_eq!(m.pool.capacity()[0].1, 2);
}

#[test]
fn wide_flag_ranges_mirror_without_a_bitmap_of_their_size() {
    let svcs: Vec<Service> = (0..1000)
        .map(|i| {
            svc(
                &format!("s{i}"),
                i,
                &format!("10.{}.{}.7", i % 200 + 1, i / 200),
            )
        })
        .collect();
    let m = build(&["10.0.0.0/8"], &svcs, &[]);
    assert!(m.findings.is_empty());
    // 2^24 - 2 usable; 1000 Services plus the kubernetes reservation.
    assert_eq!(m.pool.capacity()[0].1, 1001);
    assert_eq!(m.pool.capacity()[0].2, (1 << 24) - 2 - 1001);
    assert_eq!(m.pool.ranges[0].alloc.used(), 1001);
    // An IPv6 flag range may be as wide as /64; each address is still tracked exactly.
    let six: Vec<Service> = vec![svc("a", 1, "fd00::1:2:3:4"), svc("b", 2, "fd00::1:2:3:4")];
    let m = build(&["fd00::/64"], &six, &[]);
    assert!(matches!(
        m.findings[&k("a", "b")][..],
        [Finding::Duplicate { .. }]
    ));
}

/// With IPAddress objects the API server's repair loop is repairip.go even when the ranges come
/// from `--service-cluster-ip-range`, so its wording applies: no CIDR in the out-of-range
/// message, `Service` capitalised in the not-valid one, and an address of a family without a
/// range is out of range (repairip.go has no family check).
#[test]
fn flag_ranges_with_ipaddresses_word_findings_as_repairip() {
    let (kube, kube_ip) = kube();
    let mut v6 = svc("v6", 1, "fd00::5");
    v6.spec.as_mut().unwrap().ip_families = Some(vec!["IPv6".into()]);
    let mut bad = svc("bad", 1, "10.96.0.300");
    bad.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.300".into()]);
    let svcs = vec![kube, svc("out", 1, "10.100.0.1"), v6, bad];
    let m = build(&["10.96.0.0/16"], &svcs, &[kube_ip]);
    assert_eq!(
        one(&m, &k("a", "out")).1,
        "Cluster IP [IPv4]: 10.100.0.1 is not within any configured Service CIDR; please recreate service"
    );
    assert_eq!(
        one(&m, &k("a", "v6")),
        (
            "ClusterIPOutOfRange",
            "Cluster IP [IPv6]: fd00::5 is not within any configured Service CIDR; please recreate service".into(),
            "outOfRange",
            None
        )
    );
    assert_eq!(
        one(&m, &k("a", "bad")).1,
        "Cluster IP 10.96.0.300 is not a valid IP; please recreate Service"
    );
}

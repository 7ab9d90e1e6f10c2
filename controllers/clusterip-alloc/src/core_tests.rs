use super::*;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ServiceSpec;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::api::networking::v1::ServiceCIDRSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use scm_allocator::Report;
use scm_allocator::{IpRange, Placement};
use std::collections::{BTreeMap, BTreeSet};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn flag(cidrs: &[&str]) -> RangeConfig {
    RangeConfig::from_flag(&cidrs.iter().map(|c| net(c)).collect::<Vec<_>>()).unwrap()
}

fn svc(ns: &str, name: &str, age: i64, f: impl FnOnce(&mut ServiceSpec)) -> Service {
    let mut spec = ServiceSpec {
        selector: Some([("app".to_string(), "x".to_string())].into()),
        ..Default::default()
    };
    f(&mut spec);
    Service {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
            )),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn with_ip(ip: &str) -> impl FnOnce(&mut ServiceSpec) {
    let ip = ip.to_string();
    move |s| {
        let fam = if ip.contains(':') { "IPv6" } else { "IPv4" };
        s.ip_families = Some(vec![fam.into()]);
        s.ip_family_policy = Some("SingleStack".into());
        s.cluster_ip = Some(ip.clone());
        s.cluster_ips = Some(vec![ip]);
    }
}

fn build(cfg: &RangeConfig, svcs: &[Service]) -> Mirror {
    let refs: Vec<&Service> = svcs.iter().collect();
    super::build(cfg, &refs, &BTreeMap::new())
}

fn k(ns: &str, n: &str) -> ObjectKey {
    ObjectKey::new(ns, n)
}

#[test]
fn flag_validation() {
    assert!(RangeConfig::from_flag(&[]).is_err());
    assert_eq!(
        RangeConfig::from_flag(&[net("10.0.0.0/16"), net("10.1.0.0/16")])
            .unwrap_err()
            .to_string(),
        "--service-cluster-ip-range[0] and --service-cluster-ip-range[1] must be of different IP family"
    );
    // v1.37 (IPAddress allocator only) dropped the bitmap's /12 and /108 limits: any IPv4
    // range, IPv6 /64 or longer.
    assert!(RangeConfig::from_flag(&[net("10.0.0.0/8")]).is_ok());
    assert!(RangeConfig::from_flag(&[net("10.0.0.0/8"), net("fd00::/64")]).is_ok());
    assert_eq!(
        RangeConfig::from_flag(&[net("fd00::/63")])
            .unwrap_err()
            .to_string(),
        "--service-cluster-ip-range: shortest allowed prefix length for service CIDR is 64, got 63"
    );
    let c = flag(&["fd00::/108", "10.0.0.0/16"]);
    assert_eq!(c.default_family, Some(IpFamily::V6));
    assert_eq!(c.kubernetes_service_ip(), Some("fd00::1".parse().unwrap()));
}

#[test]
fn mirror_counts_and_reserves_kubernetes_ip() {
    let cfg = flag(&["10.96.0.0/24"]);
    let svcs = vec![
        svc("a", "one", 1, with_ip("10.96.0.20")),
        svc("a", "headless", 2, with_ip("None")),
        svc("a", "ext", 3, |s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.com".into());
        }),
    ];
    let m = build(&cfg, &svcs);
    assert!(m.findings.is_empty(), "{:?}", m.findings);
    // one Service plus the reserved first IP
    assert_eq!(m.pool.capacity(), vec![(net("10.96.0.0/24"), 2, 252)]);
    assert_eq!(
        m.owners.get(&"10.96.0.1".parse().unwrap()),
        Some(&k("default", "kubernetes"))
    );
    assert!(m.needs_assign.is_empty());
}

#[test]
fn repair_findings_with_upstream_messages() {
    let cfg = flag(&["10.96.0.0/16"]);
    let svcs = vec![
        svc("a", "old", 1, with_ip("10.96.0.20")),
        svc("a", "dup", 2, with_ip("10.96.0.20")),
        svc("a", "out", 3, with_ip("10.100.0.1")),
        svc("a", "bad", 4, with_ip("10.96.0.300")),
        svc("a", "v6", 5, with_ip("fd00::5")),
        svc("a", "bcast", 6, with_ip("10.96.255.255")),
    ];
    let m = build(&cfg, &svcs);
    let msg = |n: &str| {
        let f = &m.findings[&k("a", n)];
        assert_eq!(f.len(), 1);
        (f[0].reason(), f[0].message(), f[0].metric_type())
    };
    assert!(!m.findings.contains_key(&k("a", "old")));
    assert_eq!(
        msg("dup"),
        (
            "ClusterIPAlreadyAllocated",
            "Cluster IP [IPv4]:10.96.0.20 was assigned to multiple services; please recreate service".into(),
            "duplicate"
        )
    );
    assert_eq!(
        msg("out"),
        (
            "ClusterIPOutOfRange",
            "Cluster IP [IPv4]:10.100.0.1 is not within the service CIDR 10.96.0.0/16; please recreate service".into(),
            "outOfRange"
        )
    );
    assert_eq!(msg("bad").0, "ClusterIPNotValid");
    assert_eq!(
        msg("bad").1,
        "Cluster IP 10.96.0.300 is not a valid IP; please recreate service"
    );
    assert_eq!(
        msg("v6").1,
        "Cluster IP fd00::5(IPv6) is of ip family that is no longer configured on cluster; please recreate service"
    );
    assert_eq!(msg("bcast").0, "ClusterIPOutOfRange");
}

#[test]
fn oldest_service_keeps_contested_ip_regardless_of_name() {
    let cfg = flag(&["10.96.0.0/16"]);
    let svcs = vec![
        svc("z", "older", 1, with_ip("10.96.0.9")),
        svc("a", "newer", 2, with_ip("10.96.0.9")),
    ];
    let m = build(&cfg, &svcs);
    assert!(m.findings.contains_key(&k("a", "newer")));
    assert!(!m.findings.contains_key(&k("z", "older")));
}

#[test]
fn service_cidr_mode_messages_and_default_family() {
    let mk = |name: &str, cidrs: &[&str], age: i64| ServiceCIDR {
        metadata: ObjectMeta {
            name: Some(name.into()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
            )),
            ..Default::default()
        },
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
        }),
        status: None,
    };
    let cfg = RangeConfig::from_service_cidrs(&[
        mk("extra", &["fd00::/64"], 0),
        mk("kubernetes", &["10.96.0.0/16"], 5),
    ]);
    assert_eq!(cfg.default_family, Some(IpFamily::V4));
    let m = build(
        &cfg,
        &[
            svc("a", "out", 1, with_ip("10.200.0.1")),
            svc("a", "in6", 1, with_ip("fd00::1:0:0")),
            svc("a", "bad", 1, with_ip("10.96.0.300")),
        ],
    );
    // repairip.go's wording ("Service"); repair.go, for the flag, says "service".
    assert_eq!(
        m.findings[&k("a", "bad")][0].message(),
        "Cluster IP 10.96.0.300 is not a valid IP; please recreate Service"
    );
    assert_eq!(
        m.findings[&k("a", "out")][0].message(),
        "Cluster IP [IPv4]: 10.200.0.1 is not within any configured Service CIDR; please recreate service"
    );
    // Beyond the tracked part of a big IPv6 CIDR: valid, no finding, still counted.
    assert!(!m.findings.contains_key(&k("a", "in6")));
    let cap: BTreeMap<_, _> = m
        .pool
        .capacity()
        .into_iter()
        .map(|(c, u, f)| (c, (u, f)))
        .collect();
    assert_eq!(cap[&net("fd00::/64")].0, 1);
}

#[test]
fn most_specific_service_cidr_tracks_an_ip() {
    let mk = |name: &str, c: &str| ServiceCIDR {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(vec![c.into()]),
        }),
        status: None,
    };
    let cfg = RangeConfig::from_service_cidrs(&[
        mk("kubernetes", "10.96.0.0/16"),
        mk("small", "10.96.1.0/24"),
    ]);
    let m = build(&cfg, &[svc("a", "s", 1, with_ip("10.96.1.7"))]);
    let cap: BTreeMap<_, _> = m
        .pool
        .capacity()
        .into_iter()
        .map(|(c, u, _)| (c, u))
        .collect();
    assert_eq!(cap[&net("10.96.1.0/24")], 1);
    assert_eq!(cap[&net("10.96.0.0/16")], 1); // the kubernetes reservation
}

fn assign(cfg: &RangeConfig, existing: &[Service], s: &Service) -> (Plan, Mirror) {
    let mut all: Vec<Service> = existing.to_vec();
    all.push(s.clone());
    let mut m = build(cfg, &all);
    let mut rng = StdRng::seed_from_u64(1);
    let p = plan(&mut m, s, &mut rng);
    (p, m)
}

#[test]
fn assigns_single_stack_from_default_family_upper_band() {
    let cfg = flag(&["10.96.0.0/16", "fd00::/108"]);
    let s = svc("a", "new", 1, |_| {});
    let (p, m) = assign(&cfg, &[], &s);
    let Plan::Assign {
        cluster_ips,
        ip_families,
        ip_family_policy,
    } = p
    else {
        panic!("{p:?}")
    };
    assert_eq!(ip_families, vec!["IPv4"]);
    assert_eq!(ip_family_policy, "SingleStack");
    let ip: IpAddr = cluster_ips[0].parse().unwrap();
    let r = IpRange::new(net("10.96.0.0/16")).unwrap();
    let Placement::Offset(o) = r.offset_of(ip) else {
        panic!()
    };
    assert!(o >= 256, "dynamic pick {ip} from the static band");
    assert_eq!(m.owners[&ip], k("a", "new"));
}

#[test]
fn dual_stack_policies() {
    let dual = flag(&["10.96.0.0/16", "fd00::/108"]);
    let single = flag(&["10.96.0.0/16"]);
    let pol = |p: &str, fams: &[&str]| {
        let p = p.to_string();
        let fams: Vec<String> = fams.iter().map(|s| s.to_string()).collect();
        move |s: &mut ServiceSpec| {
            s.ip_family_policy = Some(p);
            if !fams.is_empty() {
                s.ip_families = Some(fams);
            }
        }
    };
    // PreferDualStack: two on a dual-stack cluster, one on a single-stack one.
    let (p, _) = assign(&dual, &[], &svc("a", "p", 1, pol("PreferDualStack", &[])));
    assert!(
        matches!(&p, Plan::Assign { cluster_ips, ip_families, .. } if cluster_ips.len() == 2 && ip_families == &["IPv4", "IPv6"])
    );
    let (p, _) = assign(&single, &[], &svc("a", "p", 1, pol("PreferDualStack", &[])));
    assert!(matches!(&p, Plan::Assign { cluster_ips, .. } if cluster_ips.len() == 1));
    // Family order follows ipFamilies.
    let (p, _) = assign(
        &dual,
        &[],
        &svc("a", "p", 1, pol("RequireDualStack", &["IPv6"])),
    );
    let Plan::Assign {
        cluster_ips,
        ip_families,
        ..
    } = p
    else {
        panic!()
    };
    assert_eq!(ip_families, vec!["IPv6", "IPv4"]);
    assert!(cluster_ips[0].contains(':'));
    // RequireDualStack on a single-stack cluster.
    let (p, _) = assign(
        &single,
        &[],
        &svc("a", "r", 1, pol("RequireDualStack", &[])),
    );
    let Plan::Reject(r) = p else { panic!("{p:?}") };
    assert_eq!(
        r.message,
        "Service \"r\" is invalid: spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services"
    );
    // A family the cluster lacks.
    let (p, _) = assign(
        &single,
        &[],
        &svc("a", "f", 1, pol("SingleStack", &["IPv6"])),
    );
    let Plan::Reject(r) = p else { panic!() };
    assert_eq!(
        r.message,
        "Service \"f\" is invalid: spec.ipFamilies[0]: Invalid value: \"IPv6\": not configured on this cluster"
    );
    // SingleStack with two families.
    let (p, _) = assign(
        &dual,
        &[],
        &svc("a", "s", 1, pol("SingleStack", &["IPv4", "IPv6"])),
    );
    let Plan::Reject(r) = p else { panic!() };
    assert!(r.message.contains(
        "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified"
    ));
}

#[test]
fn headless_selectorless_defaults_to_require_dual_stack_even_on_single_stack() {
    let single = flag(&["10.96.0.0/16"]);
    let s = svc("a", "h", 1, |s| {
        s.selector = None;
        s.cluster_ip = Some("None".into());
    });
    let (p, m) = assign(&single, &[], &s);
    assert_eq!(
        p,
        Plan::Assign {
            cluster_ips: vec!["None".into()],
            ip_families: vec!["IPv4".into(), "IPv6".into()],
            ip_family_policy: "RequireDualStack".into()
        }
    );
    assert_eq!(m.owners.len(), 1); // only the kubernetes reservation
    // Headless with a selector defaults to SingleStack.
    let s = svc("a", "h2", 1, |s| s.cluster_ip = Some("None".into()));
    let (p, _) = assign(&single, &[], &s);
    assert!(
        matches!(p, Plan::Assign { ref ip_family_policy, ref ip_families, .. } if ip_family_policy == "SingleStack" && ip_families.len() == 1)
    );
}

#[test]
fn external_name_gets_nothing_and_drops_leftovers() {
    let cfg = flag(&["10.96.0.0/16"]);
    let ext = svc("a", "e", 1, |s| s.type_ = Some("ExternalName".into()));
    assert_eq!(assign(&cfg, &[], &ext).0, Plan::Nothing);
    // ClusterIP -> ExternalName on an API that kept the address: released and cleared.
    let ext = svc("a", "e", 1, |s| {
        s.type_ = Some("ExternalName".into());
        s.cluster_ip = Some("10.96.0.40".into());
    });
    let (p, m) = assign(&cfg, &[], &ext);
    assert_eq!(p, Plan::Clear);
    assert!(!m.owners.contains_key(&"10.96.0.40".parse().unwrap()));
}

#[test]
fn require_dual_stack_upgrade_keeps_primary_and_adds_secondary() {
    let cfg = flag(&["10.96.0.0/16", "fd00::/108"]);
    let s = svc("a", "u", 1, |s| {
        s.cluster_ip = Some("10.96.0.50".into());
        s.cluster_ips = Some(vec!["10.96.0.50".into()]);
        s.ip_families = Some(vec!["IPv4".into()]);
        s.ip_family_policy = Some("RequireDualStack".into());
    });
    let (p, _) = assign(&cfg, &[], &s);
    let Plan::Assign { cluster_ips, .. } = &p else {
        panic!()
    };
    assert_eq!(cluster_ips[0], "10.96.0.50");
    assert!(cluster_ips[1].starts_with("fd00::"));
    assert_eq!(new_ips(&s, &p).len(), 1);
}

#[test]
fn full_range_rejects_with_service_cidr_full() {
    let cfg = flag(&["10.96.0.0/30"]); // two usable addresses, the first reserved
    let existing = vec![svc("a", "x", 1, with_ip("10.96.0.2"))];
    let (p, _) = assign(&cfg, &existing, &svc("a", "y", 2, |_| {}));
    let Plan::Reject(r) = p else { panic!("{p:?}") };
    assert_eq!(r.reason(), "ServiceCIDRFull");
    assert_eq!(
        r.full.unwrap().message(),
        "Service CIDR 10.96.0.0/30 is full; you must widen the CIDR in order to create new services for Cluster IP [IPv4]:"
    );
}

#[test]
fn kubernetes_service_gets_its_reserved_ip_when_assigned() {
    let cfg = flag(&["10.96.0.0/16"]);
    let s = svc("default", "kubernetes", 0, |s| s.selector = None);
    let mut m = build(&cfg, std::slice::from_ref(&s));
    assert_eq!(
        m.owners[&"10.96.0.1".parse().unwrap()],
        k("default", "kubernetes")
    );
    let mut rng = StdRng::seed_from_u64(3);
    let p = plan(&mut m, &s, &mut rng);
    assert!(matches!(p, Plan::Assign { ref cluster_ips, .. } if cluster_ips == &["10.96.0.1"]));
}

#[test]
fn pending_assignments_are_claimed_before_services() {
    let cfg = flag(&["10.96.0.0/16"]);
    let mut pending = BTreeMap::new();
    pending.insert(k("a", "p"), vec!["10.96.3.3".parse().unwrap()]);
    let s = svc("a", "other", 1, with_ip("10.96.3.3"));
    let m = super::build(&cfg, &[&s], &pending);
    assert_eq!(
        m.findings[&k("a", "other")][0].reason(),
        "ClusterIPAlreadyAllocated"
    );
}

proptest! {
    /// Assigning to many Services never hands one address to two of them, and a rebuild from
    /// the result reproduces the same state with no findings.
    #[test]
    fn assignments_unique_and_rebuild_identical(n in 1usize..120, seed: u64, dual: bool) {
        let cfg = if dual { flag(&["10.0.0.0/25", "fd00::/121"]) } else { flag(&["10.0.0.0/25"]) };
        let mut services: Vec<Service> = (0..n).map(|i| svc("ns", &format!("s{i}"), i as i64, |s| {
            if i % 3 == 0 { s.ip_family_policy = Some("PreferDualStack".into()); }
        })).collect();
        let mut m = build(&cfg, &services);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seen = BTreeSet::new();
        for s in services.iter_mut() {
            match plan(&mut m, s, &mut rng) {
                Plan::Assign { cluster_ips, ip_families, ip_family_policy } => {
                    for ip in &cluster_ips { prop_assert!(seen.insert(ip.clone()), "{} twice", ip); }
                    let sp = s.spec.as_mut().unwrap();
                    sp.cluster_ip = Some(cluster_ips[0].clone());
                    sp.cluster_ips = Some(cluster_ips);
                    sp.ip_families = Some(ip_families);
                    sp.ip_family_policy = Some(ip_family_policy);
                }
                Plan::Reject(r) => prop_assert_eq!(r.reason(), "ServiceCIDRFull"),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        let again = build(&cfg, &services);
        prop_assert!(again.findings.is_empty());
        prop_assert_eq!(again.pool.capacity(), m.pool.capacity());
    }
}

#[test]
fn terminating_service_cidr_keeps_ips_valid_but_gives_none() {
    let mk = |name: &str, c: &str, deleting: bool| ServiceCIDR {
        metadata: ObjectMeta {
            name: Some(name.into()),
            deletion_timestamp: deleting
                .then(|| Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())),
            ..Default::default()
        },
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(vec![c.into()]),
        }),
        status: None,
    };
    let cfg = RangeConfig::from_service_cidrs(&[
        mk("kubernetes", "10.96.0.0/28", false),
        mk("going", "10.97.0.0/24", true),
    ]);
    let existing = vec![svc("a", "old", 1, with_ip("10.97.0.9"))];
    let mut m = build(&cfg, &existing);
    assert!(m.findings.is_empty());
    let mut rng = StdRng::seed_from_u64(4);
    for i in 0..13 {
        let s = svc("a", &format!("n{i}"), 10 + i, |_| {});
        let Plan::Assign { cluster_ips, .. } = plan(&mut m, &s, &mut rng) else {
            panic!("no room")
        };
        assert!(cluster_ips[0].starts_with("10.96.0."), "{cluster_ips:?}");
    }
    // 10.96.0.0/28: 14 usable, one reserved for default/kubernetes: full now.
    let s = svc("a", "late", 99, |_| {});
    assert!(
        matches!(plan(&mut m, &s, &mut rng), Plan::Reject(r) if r.reason() == "ServiceCIDRFull")
    );
}

#[test]
fn requested_ip_without_family_fields_is_honoured_or_refused_like_upstream() {
    let cfg = flag(&["10.96.0.0/16"]);
    let req = |name: &str, age: i64, ip: &str| {
        let ip = ip.to_string();
        svc("a", name, age, move |s| s.cluster_ip = Some(ip))
    };
    let first = req("first", 1, "10.96.7.7");
    let second = req("second", 2, "10.96.7.7");
    let outside = req("outside", 3, "10.99.0.1");
    let mut m = build(&cfg, &[first.clone(), second.clone(), outside.clone()]);
    let mut rng = StdRng::seed_from_u64(5);
    assert_eq!(
        plan(&mut m, &first, &mut rng),
        Plan::Assign {
            cluster_ips: vec!["10.96.7.7".into()],
            ip_families: vec!["IPv4".into()],
            ip_family_policy: "SingleStack".into()
        }
    );
    let Plan::Reject(r) = plan(&mut m, &second, &mut rng) else {
        panic!()
    };
    assert_eq!(
        r.message,
        "Service \"second\" is invalid: spec.clusterIPs: Invalid value: []string{\"10.96.7.7\"}: failed to allocate IP 10.96.7.7: provided IP is already allocated"
    );
    let Plan::Reject(r) = plan(&mut m, &outside, &mut rng) else {
        panic!()
    };
    assert!(r.message.ends_with("failed to allocate IP 10.99.0.1: the provided IP (10.99.0.1) is not in the valid range. The range of valid IPs is 10.96.0.0/16"), "{}", r.message);
}

#[test]
fn external_name_to_cluster_ip_allocates() {
    let cfg = flag(&["10.96.0.0/16"]);
    // What a non-allocating API stores after the type change: ClusterIP, no address.
    let s = svc("a", "was-ext", 1, |s| {
        s.type_ = Some("ClusterIP".into());
        s.external_name = None;
    });
    let (p, m) = assign(&cfg, &[], &s);
    let Plan::Assign { cluster_ips, .. } = p else {
        panic!("{p:?}")
    };
    assert_eq!(
        m.owners[&cluster_ips[0].parse::<IpAddr>().unwrap()],
        k("a", "was-ext")
    );
}

#[test]
fn service_cidr_mode_reports_unconfigured_family_as_out_of_range() {
    let cfg = RangeConfig::from_service_cidrs(&[]);
    let m = build(&cfg, &[svc("a", "s", 1, with_ip("fd00::5"))]);
    let f = &m.findings[&k("a", "s")][0];
    assert_eq!(f.reason(), "ClusterIPOutOfRange");
    assert_eq!(
        f.message(),
        "Cluster IP [IPv6]: fd00::5 is not within any configured Service CIDR; please recreate service"
    );
}

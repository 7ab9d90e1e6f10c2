use super::*;
use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::BTreeMap;

fn span() -> PortSpan {
    "30000-32767".parse().unwrap()
}

fn port(p: i32, proto: &str, np: i32) -> ServicePort {
    ServicePort {
        port: p,
        protocol: Some(proto.into()),
        node_port: (np != 0).then_some(np),
        ..Default::default()
    }
}

fn svc(
    name: &str,
    age: i64,
    ty: &str,
    ports: Vec<ServicePort>,
    f: impl FnOnce(&mut ServiceSpec),
) -> Service {
    let mut spec = ServiceSpec {
        type_: Some(ty.into()),
        ports: Some(ports),
        ..Default::default()
    };
    f(&mut spec);
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
            )),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn k(n: &str) -> ObjectKey {
    ObjectKey::new("ns", n)
}

fn build_all(svcs: &[Service]) -> Mirror {
    let refs: Vec<&Service> = svcs.iter().collect();
    super::build(span(), &refs, &BTreeMap::new())
}

#[test]
fn mirror_and_findings() {
    let svcs = vec![
        svc(
            "a",
            1,
            "NodePort",
            vec![port(80, "TCP", 30080), port(80, "UDP", 30080)],
            |_| {},
        ),
        svc("b", 2, "NodePort", vec![port(81, "TCP", 30080)], |_| {}),
        svc("c", 3, "NodePort", vec![port(82, "TCP", 8080)], |_| {}),
        svc("d", 4, "LoadBalancer", vec![port(83, "TCP", 30083)], |s| {
            s.external_traffic_policy = Some("Local".into());
            s.health_check_node_port = Some(30084);
        }),
        svc(
            "e",
            5,
            "NodePort",
            vec![port(84, "TCP", 30090), port(85, "TCP", 30090)],
            |_| {},
        ),
    ];
    let m = build_all(&svcs);
    assert!(
        !m.findings.contains_key(&k("a")),
        "TCP+UDP on one port is one allocation"
    );
    let f = &m.findings[&k("b")][0];
    assert_eq!(
        (f.reason(), f.message().as_str()),
        (
            "PortAlreadyAllocated",
            "Port 30080 was assigned to multiple services; please recreate service"
        )
    );
    let f = &m.findings[&k("c")][0];
    assert_eq!(
        (f.reason(), f.message().as_str(), f.metric_type()),
        (
            "PortOutOfRange",
            "Port 8080 is not within the port range 30000-32767; please recreate service",
            "outOfRange"
        )
    );
    assert_eq!(m.findings[&k("e")][0].reason(), "PortAlreadyAllocated");
    assert_eq!(capacity(&m).0, 4); // 30080, 30083, 30084, 30090
    assert!(m.needs_assign.is_empty());
}

#[test]
fn assigns_one_port_per_entry_sharing_tcp_udp() {
    let s = svc(
        "a",
        1,
        "NodePort",
        vec![port(53, "TCP", 0), port(53, "UDP", 0), port(80, "TCP", 0)],
        |_| {},
    );
    let mut m = build_all(std::slice::from_ref(&s));
    let mut rng = StdRng::seed_from_u64(1);
    let p = plan(&mut m, &s, &mut rng);
    let Plan::Assign {
        node_ports,
        health_check_node_port,
    } = &p
    else {
        panic!("{p:?}")
    };
    assert_eq!(node_ports[0], node_ports[1]);
    assert_ne!(node_ports[0], node_ports[2]);
    assert!(
        node_ports.iter().all(|p| (30000 + 86..=32767).contains(p)),
        "dynamic picks from the upper band"
    );
    assert_eq!(*health_check_node_port, None);
    assert_eq!(new_ports(&s, &p).len(), 2);
    assert_eq!(capacity(&m).0, 2);
}

#[test]
fn requested_port_on_later_entry_is_shared() {
    let s = svc(
        "a",
        1,
        "NodePort",
        vec![port(53, "TCP", 0), port(53, "UDP", 30053)],
        |_| {},
    );
    let mut m = build_all(std::slice::from_ref(&s));
    let p = plan(&mut m, &s, &mut StdRng::seed_from_u64(2));
    assert_eq!(
        p,
        Plan::Assign {
            node_ports: vec![30053, 30053],
            health_check_node_port: None
        }
    );
}

#[test]
fn load_balancer_health_check_and_no_node_ports() {
    let s = svc(
        "lb",
        1,
        "LoadBalancer",
        vec![port(80, "TCP", 0), port(81, "TCP", 30081)],
        |s| {
            s.allocate_load_balancer_node_ports = Some(false);
            s.external_traffic_policy = Some("Local".into());
        },
    );
    let mut m = build_all(std::slice::from_ref(&s));
    assert!(m.pool.has(30081), "explicit ports stay reserved");
    let p = plan(&mut m, &s, &mut StdRng::seed_from_u64(3));
    let Plan::Assign {
        node_ports,
        health_check_node_port,
    } = p
    else {
        panic!()
    };
    assert_eq!(node_ports, vec![0, 30081]);
    assert!(health_check_node_port.is_some_and(|h| h != 30081));
    // Cluster policy: no health check port.
    let s = svc("lb2", 1, "LoadBalancer", vec![port(80, "TCP", 0)], |_| {});
    let mut m = build_all(std::slice::from_ref(&s));
    let p = plan(&mut m, &s, &mut StdRng::seed_from_u64(3));
    assert!(
        matches!(p, Plan::Assign { health_check_node_port: None, ref node_ports } if node_ports[0] != 0)
    );
}

#[test]
fn type_change_releases_and_clears() {
    let s = svc("a", 1, "ClusterIP", vec![port(80, "TCP", 30080)], |_| {});
    let mut m = build_all(std::slice::from_ref(&s));
    assert!(!m.pool.has(30080));
    assert_eq!(plan(&mut m, &s, &mut StdRng::seed_from_u64(0)), Plan::Clear);
    let e = svc("e", 1, "ExternalName", vec![], |s| {
        s.health_check_node_port = Some(30001)
    });
    assert!(needs_assignment(&e));
    let n = svc("n", 1, "ClusterIP", vec![port(80, "TCP", 0)], |_| {});
    assert!(!needs_assignment(&n));
}

#[test]
fn changed_node_port_releases_old_one() {
    let before = svc("a", 1, "NodePort", vec![port(80, "TCP", 30080)], |_| {});
    let after = svc("a", 1, "NodePort", vec![port(80, "TCP", 30081)], |_| {});
    assert!(build_all(&[before]).pool.has(30080));
    let m = build_all(&[after]);
    assert!(!m.pool.has(30080) && m.pool.has(30081));
}

#[test]
fn full_range() {
    let small: PortSpan = "30000-30001".parse().unwrap();
    let a = svc("a", 1, "NodePort", vec![port(80, "TCP", 30000)], |_| {});
    let b = svc(
        "b",
        2,
        "NodePort",
        vec![port(80, "TCP", 0), port(81, "TCP", 0)],
        |_| {},
    );
    let mut m = super::build(small, &[&a, &b], &BTreeMap::new());
    let p = plan(&mut m, &b, &mut StdRng::seed_from_u64(0));
    let Plan::Full(f) = p else { panic!("{p:?}") };
    assert_eq!(
        f.message(),
        "Port range 30000-30001 is full; you must widen the port range in order to create new services"
    );
    assert_eq!(capacity(&m).0, 1, "partial allocation rolled back");
}

#[test]
fn held_ports_are_reused() {
    let s = svc("a", 1, "NodePort", vec![port(80, "TCP", 0)], |_| {});
    let mut pending = BTreeMap::new();
    pending.insert(k("a"), vec![31000]);
    let mut m = super::build(span(), &[&s], &pending);
    assert_eq!(
        plan(&mut m, &s, &mut StdRng::seed_from_u64(0)),
        Plan::Assign {
            node_ports: vec![31000],
            health_check_node_port: None
        }
    );
}

proptest! {
    /// Many Services assigned in turn never share a node port (except TCP/UDP of one port
    /// number within one Service), and a rebuild from the result has no findings.
    #[test]
    fn unique_and_stable(n in 1usize..60, seed: u64) {
        let small: PortSpan = "30000-30099".parse().unwrap();
        let mut services: Vec<Service> = (0..n).map(|i| {
            let ty = if i % 2 == 0 { "NodePort" } else { "LoadBalancer" };
            svc(&format!("s{i}"), i as i64, ty, vec![port(80, "TCP", 0), port(80, "UDP", 0)], |s| {
                if i % 4 == 1 { s.external_traffic_policy = Some("Local".into()); }
            })
        }).collect();
        let refs: Vec<Service> = services.clone();
        let refs: Vec<&Service> = refs.iter().collect();
        let mut m = super::build(small, &refs, &BTreeMap::new());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seen = BTreeSet::new();
        for s in services.iter_mut() {
            match plan(&mut m, s, &mut rng) {
                Plan::Assign { node_ports, health_check_node_port } => {
                    prop_assert_eq!(node_ports[0], node_ports[1]);
                    prop_assert!(seen.insert(node_ports[0]));
                    if let Some(h) = health_check_node_port { prop_assert!(seen.insert(h)); }
                    let sp = s.spec.as_mut().unwrap();
                    for (p, np) in sp.ports.as_mut().unwrap().iter_mut().zip(node_ports) { p.node_port = Some(np); }
                    sp.health_check_node_port = health_check_node_port;
                }
                Plan::Full(_) => prop_assert!(m.pool.free() < 2),
                other => prop_assert!(false, "{:?}", other),
            }
        }
        let refs: Vec<&Service> = services.iter().collect();
        let again = super::build(small, &refs, &BTreeMap::new());
        prop_assert!(again.findings.is_empty());
        prop_assert_eq!(capacity(&again), capacity(&m));
    }
}

#[test]
fn requested_ports_refused_like_upstream_when_taken_or_outside() {
    let a = svc("a", 1, "NodePort", vec![port(80, "TCP", 30080)], |_| {});
    let b = svc(
        "b",
        2,
        "NodePort",
        vec![port(80, "TCP", 30080), port(81, "TCP", 0)],
        |_| {},
    );
    let c = svc(
        "c",
        3,
        "NodePort",
        vec![port(80, "TCP", 80), port(81, "TCP", 0)],
        |_| {},
    );
    let mut m = build_all(&[a, b.clone(), c.clone()]);
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(
        plan(&mut m, &b, &mut rng),
        Plan::Reject("Service \"b\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated".into())
    );
    assert_eq!(
        plan(&mut m, &c, &mut rng),
        Plan::Reject("Service \"c\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767".into())
    );
}

#[test]
fn deleted_service_releases_its_ports() {
    let a = svc("a", 1, "LoadBalancer", vec![port(80, "TCP", 30080)], |s| {
        s.external_traffic_policy = Some("Local".into());
        s.health_check_node_port = Some(30081);
    });
    let with = build_all(std::slice::from_ref(&a));
    assert_eq!(capacity(&with).0, 2);
    let without = build_all(&[]);
    assert_eq!(capacity(&without), (0, 2768));
}

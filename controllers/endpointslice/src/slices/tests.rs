use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use super::*;

fn svc() -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("ns".into()),
            uid: Some("svc-uid".into()),
            labels: Some(
                [("team".to_string(), "blue".to_string())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ip_families: Some(vec!["IPv4".into()]),
            selector: Some(
                [("app".to_string(), "web".to_string())]
                    .into_iter()
                    .collect(),
            ),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod(i: usize, ready: bool, port: i32) -> Pod {
    let ip4 = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    let ip6 = format!("fd00::{:x}", i + 1);
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("p{i}")),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{i}")),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % 3)),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: port,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip4.clone()),
            pod_ips: Some(vec![PodIP { ip: ip4 }, PodIP { ip: ip6 }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn zones(n: &str) -> NodeZone {
    match n {
        "node-0" => Some(Some("zone-a".into())),
        "node-1" => Some(Some("zone-b".into())),
        "node-2" => Some(None),
        _ => None,
    }
}

struct World {
    svc: Service,
    pods: Vec<Pod>,
    slices: Vec<EndpointSlice>,
    max: usize,
    next: usize,
    rv: u64,
    trigger_time: Option<i64>,
}

impl World {
    fn new(svc: Service, pods: Vec<Pod>, max: usize) -> Self {
        World {
            svc,
            pods,
            slices: vec![],
            max,
            next: 0,
            rv: 0,
            trigger_time: None,
        }
    }

    fn plan(&self) -> SlicePlan {
        let ratios = ZoneRatios::default();
        plan(&SliceInput {
            service: &self.svc,
            pods: self.pods.iter().collect(),
            node_zone: &zones,
            existing: self.slices.iter().collect(),
            max_endpoints_per_slice: self.max,
            controller_name: CONTROLLER_NAME,
            zone_ratios: &ratios,
            hints_populated: false,
            trigger_time: self.trigger_time,
        })
    }

    /// Applies a plan the way the API server would.
    fn apply(&mut self, p: SlicePlan) {
        let del: BTreeSet<String> = p
            .delete
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        self.slices
            .retain(|s| !del.contains(s.metadata.name.as_deref().unwrap_or("")));
        for u in p.update {
            let slot = self
                .slices
                .iter_mut()
                .find(|s| s.metadata.name == u.metadata.name);
            assert!(
                slot.is_some(),
                "update of unknown slice {:?}",
                u.metadata.name
            );
            if let Some(s) = slot {
                assert_eq!(s.metadata.resource_version, u.metadata.resource_version);
                self.rv += 1;
                *s = u;
                s.metadata.resource_version = Some(self.rv.to_string());
            }
        }
        for mut c in p.create {
            assert!(c.metadata.name.is_none());
            self.next += 1;
            self.rv += 1;
            c.metadata.name = Some(format!(
                "{}{}",
                c.metadata.generate_name.clone().unwrap_or_default(),
                self.next
            ));
            c.metadata.resource_version = Some(self.rv.to_string());
            self.slices.push(c);
        }
    }

    fn converge(&mut self) -> usize {
        let p = self.plan();
        let w = p.writes();
        self.apply(p);
        w
    }

    fn endpoints(&self, at: &str) -> Vec<Endpoint> {
        self.slices
            .iter()
            .filter(|s| s.address_type == at)
            .flat_map(|s| s.endpoints.clone().unwrap_or_default())
            .collect()
    }
}

fn ep_name(e: &Endpoint) -> String {
    e.target_ref
        .as_ref()
        .and_then(|r| r.name.clone())
        .unwrap_or_default()
}

#[test]
fn creates_one_slice_with_conditions_labels_and_owner() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080), pod(2, false, 8080)], 100);
    let p = w.plan();
    assert_eq!(p.create.len(), 1);
    assert!(p.update.is_empty() && p.delete.is_empty());
    let s = &p.create[0];
    assert_eq!(s.address_type, "IPv4");
    assert_eq!(s.metadata.generate_name.as_deref(), Some("web-"));
    let l = labels_of(&s.metadata.labels);
    assert_eq!(l.get(LABEL_SERVICE_NAME).map(String::as_str), Some("web"));
    assert_eq!(
        l.get(LABEL_MANAGED_BY).map(String::as_str),
        Some(CONTROLLER_NAME)
    );
    assert_eq!(l.get("team").map(String::as_str), Some("blue"));
    assert!(!l.contains_key(LABEL_HEADLESS));
    let owner = s.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner[0].uid, "svc-uid");
    assert_eq!(owner[0].controller, Some(true));
    let ports = s.ports.clone().unwrap_or_default();
    assert_eq!(ports[0].port, Some(8080));
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    let eps = s.endpoints.clone().unwrap_or_default();
    assert_eq!(eps.len(), 2);
    let p1 = eps
        .iter()
        .find(|e| ep_name(e) == "p1")
        .cloned()
        .unwrap_or_default();
    let c = p1.conditions.clone().unwrap_or_default();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(p1.zone.as_deref(), Some("zone-b"));
    assert_eq!(p1.node_name.as_deref(), Some("node-1"));
    let p2 = eps
        .iter()
        .find(|e| ep_name(e) == "p2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(p2.conditions.and_then(|c| c.ready), Some(false));
    assert!(p2.zone.is_none(), "node-2 has no zone label");
    w.apply(p);
    assert_eq!(w.converge(), 0, "second pass must be a no-op");
}

#[test]
fn terminating_pods_kept_not_ready_but_serving() {
    let mut p = pod(1, true, 8080);
    p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let w = World::new(svc(), vec![p], 100);
    let plan = w.plan();
    let e = plan.create[0].endpoints.clone().unwrap_or_default();
    let c = e[0].conditions.clone().unwrap_or_default();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(false), Some(true), Some(true))
    );
}

#[test]
fn terminal_and_ipless_pods_excluded_placeholder_created() {
    let mut done = pod(1, true, 8080);
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".into());
    }
    let mut noip = pod(2, true, 8080);
    if let Some(s) = noip.status.as_mut() {
        s.pod_ip = None;
        s.pod_ips = None;
    }
    let mut w = World::new(svc(), vec![done, noip], 100);
    let p = w.plan();
    assert_eq!(p.create.len(), 1);
    assert!(p.create[0].endpoints.as_ref().is_none_or(Vec::is_empty));
    assert!(p.create[0].ports.as_ref().is_none_or(Vec::is_empty));
    w.apply(p);
    assert_eq!(
        w.converge(),
        0,
        "placeholder is recognised as already right"
    );
}

#[test]
fn publish_not_ready_marks_everything_ready_and_ignores_missing_nodes() {
    let mut s = svc();
    if let Some(spec) = s.spec.as_mut() {
        spec.publish_not_ready_addresses = Some(true);
    }
    let mut orphan = pod(7, false, 8080);
    if let Some(sp) = orphan.spec.as_mut() {
        sp.node_name = Some("ghost".into());
    }
    let w = World::new(s, vec![pod(1, false, 8080), orphan], 100);
    let p = w.plan();
    assert!(p.missing_nodes.is_empty());
    let eps = p.create[0].endpoints.clone().unwrap_or_default();
    assert_eq!(eps.len(), 2);
    assert!(
        eps.iter()
            .all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
    );
    assert!(
        eps.iter()
            .all(|e| e.conditions.as_ref().and_then(|c| c.serving) == Some(false))
    );
}

#[test]
fn pod_on_unknown_node_is_skipped_and_reported() {
    let mut orphan = pod(7, true, 8080);
    if let Some(sp) = orphan.spec.as_mut() {
        sp.node_name = Some("ghost".into());
    }
    let w = World::new(svc(), vec![pod(1, true, 8080), orphan], 100);
    let p = w.plan();
    assert_eq!(p.missing_nodes, vec!["p7".to_string()]);
    assert_eq!(p.create[0].endpoints.as_ref().map_or(0, Vec::len), 1);
}

#[test]
fn differing_named_ports_go_to_different_slices() {
    let pods = vec![pod(1, true, 8080), pod(2, true, 9090), pod(3, true, 8080)];
    let mut w = World::new(svc(), pods, 100);
    w.converge();
    assert_eq!(w.slices.len(), 2);
    for s in &w.slices {
        let port = s.ports.as_ref().and_then(|p| p[0].port);
        for e in s.endpoints.iter().flatten() {
            let expect = if ep_name(e) == "p2" { 9090 } else { 8080 };
            assert_eq!(port, Some(expect));
        }
    }
}

#[test]
fn pod_without_the_named_port_gets_a_portless_slice() {
    let mut p = pod(1, true, 8080);
    if let Some(sp) = p.spec.as_mut() {
        sp.containers[0].ports = None;
    }
    let w = World::new(svc(), vec![p, pod(2, true, 8080)], 100);
    let plan = w.plan();
    assert_eq!(plan.create.len(), 2);
    assert!(
        plan.create
            .iter()
            .any(|s| s.ports.as_ref().is_some_and(Vec::is_empty)
                && s.endpoints.as_ref().map_or(0, Vec::len) == 1)
    );
}

#[test]
fn dual_stack_gets_one_slice_per_family_and_family_removal_deletes() {
    let mut s = svc();
    if let Some(spec) = s.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    }
    let mut w = World::new(s, vec![pod(1, true, 8080), pod(2, true, 8080)], 100);
    w.converge();
    assert_eq!(w.slices.len(), 2);
    assert_eq!(w.endpoints("IPv6").len(), 2);
    assert!(w.endpoints("IPv6")[0].addresses[0].starts_with("fd00::"));
    if let Some(spec) = w.svc.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv4".into()]);
    }
    let p = w.plan();
    assert_eq!(p.delete.len(), 1);
    assert_eq!(p.delete[0].address_type, "IPv6");
    assert_eq!(p.writes(), 1);
}

#[test]
fn headless_label_and_hostnames() {
    let mut s = svc();
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    let mut p = pod(1, true, 8080);
    if let Some(sp) = p.spec.as_mut() {
        sp.hostname = Some("db-0".into());
        sp.subdomain = Some("web".into());
    }
    let mut other = pod(2, true, 8080);
    if let Some(sp) = other.spec.as_mut() {
        sp.hostname = Some("x".into());
        sp.subdomain = Some("elsewhere".into());
    }
    let w = World::new(s, vec![p, other], 100);
    let plan = w.plan();
    let sl = &plan.create[0];
    assert_eq!(
        labels_of(&sl.metadata.labels)
            .get(LABEL_HEADLESS)
            .map(String::as_str),
        Some("")
    );
    let eps = sl.endpoints.clone().unwrap_or_default();
    let h: BTreeMap<String, Option<String>> = eps
        .iter()
        .map(|e| (ep_name(e), e.hostname.clone()))
        .collect();
    assert_eq!(h.get("p1"), Some(&Some("db-0".to_string())));
    assert_eq!(h.get("p2"), Some(&None));
}

mod more;
mod props;
mod trigger;

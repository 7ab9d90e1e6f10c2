//! Packing, recycling, relabelling and topology.

use super::*;

#[test]
fn packs_and_respects_max() {
    let pods: Vec<Pod> = (0..250).map(|i| pod(i, true, 8080)).collect();
    let mut w = World::new(svc(), pods, 100);
    w.converge();
    let mut sizes: Vec<usize> = w
        .slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![50, 100, 100]);
    // One readiness flip touches exactly one slice.
    if let Some(st) = w.pods[17].status.as_mut() {
        st.conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..Default::default()
        }]);
    }
    let p = w.plan();
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (0, 1, 0));
    // Adding 10 pods fills the non-full slice rather than creating one.
    w.apply(p);
    for i in 250..260 {
        w.pods.push(pod(i, true, 8080));
    }
    let p = w.plan();
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (0, 1, 0));
    assert_eq!(p.added, 10);
}

#[test]
fn deleting_all_pods_recycles_into_placeholder() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.converge();
    let name = w.slices[0].metadata.name.clone();
    w.pods.clear();
    let p = w.plan();
    // (Upstream counts no "removed" here: the whole port set vanished, not endpoints in it.)
    // The emptied slice is reused as the placeholder: one update, no create/delete.
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (0, 1, 0));
    assert_eq!(p.update[0].metadata.name, name);
    w.apply(p);
    assert_eq!(w.converge(), 0);
}

#[test]
fn slice_of_recreated_service_is_replaced() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.converge();
    w.svc.metadata.uid = Some("new-uid".into());
    let p = w.plan();
    // Not owned: deleted and a new slice created (never recycled across owners).
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (1, 0, 1));
}

#[test]
fn service_label_change_updates_labels_only() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.converge();
    w.svc.metadata.labels = Some(
        [("team".to_string(), "red".to_string())]
            .into_iter()
            .collect(),
    );
    let p = w.plan();
    assert_eq!(p.update.len(), 1);
    assert_eq!(
        labels_of(&p.update[0].metadata.labels)
            .get("team")
            .map(String::as_str),
        Some("red")
    );
}

#[test]
fn adopted_upstream_slice_is_relabelled_without_losing_endpoints() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080), pod(2, true, 8080)], 100);
    w.converge();
    if let Some(l) = w.slices[0].metadata.labels.as_mut() {
        l.insert(LABEL_MANAGED_BY.into(), UPSTREAM_CONTROLLER_NAME.into());
    }
    let p = w.plan();
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (0, 1, 0));
    assert_eq!(p.update[0].endpoints.as_ref().map_or(0, Vec::len), 2);
    assert_eq!(
        labels_of(&p.update[0].metadata.labels)
            .get(LABEL_MANAGED_BY)
            .map(String::as_str),
        Some(CONTROLLER_NAME)
    );
}

#[test]
fn traffic_distribution_hints_and_removal() {
    let mut s = svc();
    if let Some(spec) = s.spec.as_mut() {
        spec.traffic_distribution = Some("PreferClose".into());
    }
    let mut w = World::new(
        s,
        vec![pod(0, true, 8080), pod(1, true, 8080), pod(2, true, 8080)],
        100,
    );
    w.converge();
    let eps = w.endpoints("IPv4");
    for e in &eps {
        let zones = e.hints.as_ref().and_then(|h| h.for_zones.clone());
        match e.zone.as_deref() {
            Some(z) => assert_eq!(zones.map(|v| v[0].name.clone()), Some(z.to_string())),
            None => assert!(e.hints.is_none()),
        }
    }
    assert_eq!(w.converge(), 0);
    if let Some(spec) = w.svc.spec.as_mut() {
        spec.traffic_distribution = None;
    }
    assert_eq!(w.converge(), 1);
    assert!(w.endpoints("IPv4").iter().all(|e| e.hints.is_none()));
}

#[test]
fn auto_topology_mode_uses_cpu_ratios() {
    let mut s = svc();
    s.metadata.annotations = Some(
        [(
            "service.kubernetes.io/topology-mode".to_string(),
            "Auto".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    let pods: Vec<Pod> = (0..6)
        .filter(|i| i % 3 != 2)
        .map(|i| pod(i, true, 8080))
        .collect();
    let ratios = ZoneRatios(Some(
        [("zone-a".to_string(), 0.5), ("zone-b".to_string(), 0.5)]
            .into_iter()
            .collect(),
    ));
    let p = plan(&SliceInput {
        service: &s,
        pods: pods.iter().collect(),
        node_zone: &zones,
        existing: vec![],
        max_endpoints_per_slice: 100,
        controller_name: CONTROLLER_NAME,
        zone_ratios: &ratios,
        hints_populated: false,
        trigger_time: None,
    });
    assert!(p.hints_populated);
    assert_eq!(p.events.len(), 1);
    assert_eq!(p.events[0].reason, "TopologyAwareHintsEnabled");
    let eps = p.create[0].endpoints.clone().unwrap_or_default();
    assert!(eps.iter().all(|e| e.hints.is_some()));
}

#[test]
fn missing_ip_families_fall_back_like_upstream() {
    let mut s = svc();
    if let Some(spec) = s.spec.as_mut() {
        spec.ip_families = None;
        spec.cluster_ip = Some("fd00::10".into());
    }
    assert_eq!(
        address_types_for_service(&s)
            .into_iter()
            .collect::<Vec<_>>(),
        vec![AddressType::IPv6]
    );
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    assert_eq!(address_types_for_service(&s).len(), 2);
}

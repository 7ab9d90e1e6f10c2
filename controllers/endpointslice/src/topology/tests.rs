use super::*;
use k8s_openapi::api::discovery::v1::EndpointConditions;

fn ep(zone: Option<&str>, node: Option<&str>, is_ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec!["10.0.0.1".into()],
        zone: zone.map(Into::into),
        node_name: node.map(Into::into),
        conditions: Some(EndpointConditions {
            ready: Some(is_ready),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(eps: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        endpoints: Some(eps),
        ..Default::default()
    }
}

#[test]
fn cpu_quantities() {
    assert_eq!(cpu_millis("2"), 2000);
    assert_eq!(cpu_millis("500m"), 500);
    assert_eq!(cpu_millis("1.5"), 1500);
    assert_eq!(cpu_millis("junk"), 0);
}

#[test]
fn zone_ratios_need_two_zones_and_full_info() {
    let a = NodeTopology {
        zone: Some("a".into()),
        ready: true,
        excluded: false,
        cpu_millis: 1000,
    };
    let b = NodeTopology {
        zone: Some("b".into()),
        ..a.clone()
    };
    let nozone = NodeTopology {
        zone: None,
        ..a.clone()
    };
    assert!(ZoneRatios::from_nodes([&a]).0.is_none());
    assert!(ZoneRatios::from_nodes([&a, &b, &nozone]).0.is_none());
    let r = ZoneRatios::from_nodes([&a, &b]).0.unwrap_or_default();
    assert_eq!(r.get("a"), Some(&0.5));
    // Not-ready and control-plane nodes do not count (even without a zone).
    let cp = NodeTopology {
        excluded: true,
        ..nozone.clone()
    };
    assert!(ZoneRatios::from_nodes([&a, &b, &cp]).0.is_some());
}

#[test]
fn prefer_close_hints_ready_endpoints_only() {
    let mut sets = SliceSets {
        create: vec![slice(vec![
            ep(Some("a"), Some("n1"), true),
            ep(Some("b"), Some("n2"), false),
            ep(None, Some("n3"), true),
        ])],
        ..Default::default()
    };
    reconcile_traffic_distribution(Some("PreferClose"), &mut sets);
    let e = sets.create[0].endpoints.clone().unwrap_or_default();
    assert_eq!(
        e[0].hints.as_ref().and_then(|h| h.for_zones.clone()),
        Some(vec![ForZone { name: "a".into() }])
    );
    assert!(e[1].hints.is_none());
    assert!(e[2].hints.is_none());
}

#[test]
fn prefer_same_node_adds_node_hints_and_flags_stale_unchanged() {
    let mut stale = ep(Some("a"), Some("n1"), true);
    stale.hints = Some(EndpointHints {
        for_zones: Some(vec![ForZone { name: "a".into() }]),
        for_nodes: None,
    });
    let mut sets = SliceSets {
        unchanged: vec![slice(vec![stale])],
        ..Default::default()
    };
    reconcile_traffic_distribution(Some("PreferSameNode"), &mut sets);
    assert_eq!(sets.update.len(), 1);
    let h = sets.update[0]
        .endpoints
        .as_ref()
        .and_then(|e| e[0].hints.clone());
    assert_eq!(
        h.and_then(|h| h.for_nodes),
        Some(vec![ForNode { name: "n1".into() }])
    );
    // Running again on the result finds nothing to do.
    let mut again = SliceSets {
        unchanged: std::mem::take(&mut sets.update),
        ..Default::default()
    };
    reconcile_traffic_distribution(Some("PreferSameNode"), &mut again);
    assert!(again.update.is_empty());
}

#[test]
fn auto_hints_redistribute_to_match_cpu() {
    // Zone a has 3/4 of the CPU but only 1 of 4 endpoints: b must give some to a.
    let ratios = ZoneRatios(Some(
        [("a".to_string(), 0.75), ("b".to_string(), 0.25)]
            .into_iter()
            .collect(),
    ));
    let mut sets = SliceSets {
        create: vec![slice(vec![
            ep(Some("a"), None, true),
            ep(Some("b"), None, true),
            ep(Some("b"), None, true),
            ep(Some("b"), None, true),
        ])],
        ..Default::default()
    };
    let mut populated = false;
    let ev = add_auto_hints(&ratios, "IPv4", &mut sets, &mut populated);
    assert!(populated);
    assert_eq!(ev.len(), 1);
    assert!(!ev[0].warning);
    let for_a = sets.create[0]
        .endpoints
        .iter()
        .flatten()
        .filter(|e| {
            e.hints.as_ref().and_then(|h| h.for_zones.clone())
                == Some(vec![ForZone { name: "a".into() }])
        })
        .count();
    assert_eq!(for_a, 3);
}

#[test]
fn auto_hints_disabled_without_zones() {
    let ratios = ZoneRatios(None);
    let mut sets = SliceSets {
        create: vec![slice(vec![ep(Some("a"), None, true)])],
        ..Default::default()
    };
    let mut populated = true;
    let ev = add_auto_hints(&ratios, "IPv4", &mut sets, &mut populated);
    assert!(!populated);
    assert_eq!(ev[0].reason, "TopologyAwareHintsDisabled");
    assert!(ev[0].message.ends_with("addressType: IPv4"));
}

//! The EndpointSlice controller: readiness, ports, packing, families, hostnames, topology,
//! selector changes, hand edits and takeover.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_termination_and_deletion() -> Result<()> {
    let e = env("es-ready").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", true, 8080).await?;
    e.pod(2, "web", false, 8080).await?;
    let s = e
        .wait_slices_settled("web", "three endpoints", |s| endpoints(s).len() == 3)
        .await?;
    assert_eq!(s.len(), 1);
    let eps = endpoints(&s);
    let w0 = &eps["web-0"];
    assert_eq!(
        (w0.ready, w0.serving, w0.terminating),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(w0.zone.as_deref(), Some("zone-a"));
    assert_eq!(w0.node.as_deref(), Some(e.node(0).as_str()));
    assert_eq!(w0.ports, vec![("http".to_string(), 8080)]);
    assert_eq!(eps["web-1"].zone.as_deref(), Some("zone-b"));
    assert_eq!(eps["web-2"].zone, None, "node without zone label");
    assert_eq!(eps["web-2"].ready, Some(false));
    let labels = s[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("scm-test"),
        Some(&e.ns),
        "Service labels carried over"
    );
    let owner = s[0].metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.kind.as_str()), Some("Service"));

    // Readiness flips both ways.
    e.set_ready("web-2", &pod_ip(2), true).await?;
    e.set_ready("web-0", &pod_ip(0), false).await?;
    e.wait_slices("web", "web-2 ready, web-0 not", |s| {
        let eps = endpoints(s);
        eps.get("web-2").is_some_and(|x| x.ready == Some(true))
            && eps
                .get("web-0")
                .is_some_and(|x| x.ready == Some(false) && x.serving == Some(false))
    })
    .await?;

    // Graceful deletion: no kubelet finishes it, so the pod stays terminating.
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &e.ns);
    pods.delete("web-1", &DeleteParams::default()).await?;
    e.wait_slices("web", "web-1 terminating, still serving", |s| {
        endpoints(s).get("web-1").is_some_and(|x| {
            x.ready == Some(false) && x.serving == Some(true) && x.terminating == Some(true)
        })
    })
    .await?;
    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    e.wait_slices("web", "web-1 gone", |s| {
        !endpoints(s).contains_key("web-1") && endpoints(s).len() == 2
    })
    .await?;

    // No pods at all: one placeholder slice with no endpoints and no ports.
    for p in ["web-0", "web-2"] {
        pods.delete(p, &DeleteParams::default().grace_period(0))
            .await?;
    }
    let s = e
        .wait_slices("web", "placeholder", |s| {
            s.len() == 1 && total_endpoints(s) == 0
        })
        .await?;
    assert!(s[0].ports.as_ref().is_none_or(Vec::is_empty));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_not_ready_addresses() -> Result<()> {
    let e = env("es-pnra").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service(
        "web",
        basic_spec(serde_json::json!({"publishNotReadyAddresses": true})),
    )
    .await?;
    e.pod(0, "web", false, 8080).await?;
    let s = e
        .wait_slices("web", "one endpoint", |s| endpoints(s).len() == 1)
        .await?;
    let ep = &endpoints(&s)["web-0"];
    assert_eq!((ep.ready, ep.serving), (Some(true), Some(false)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_ports_with_differing_containers() -> Result<()> {
    let e = env("es-ports").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", true, 9090).await?;
    // A pod without the named port still gets an endpoint, in a slice without ports.
    let mut b = PodBuilder::new(&e.ns, "web-2", &[("app", "web")]);
    b.node_name = Some(e.node(2));
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "web-2", true, &[pod_ip(2).as_str()]).await?;
    let s = e
        .wait_slices("web", "three slices", |s| {
            s.len() == 3 && total_endpoints(s) == 3
        })
        .await?;
    let eps = endpoints(&s);
    assert_eq!(eps["web-0"].ports, vec![("http".to_string(), 8080)]);
    assert_eq!(eps["web-1"].ports, vec![("http".to_string(), 9090)]);
    assert!(eps["web-2"].ports.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_endpoints_are_packed() -> Result<()> {
    let e = env("es-250").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(250, "web", true).await?;
    // Settled: the resourceVersions below are the "before" of one readiness flip.
    let s = e
        .wait_slices_settled("web", "250 endpoints", |s| total_endpoints(s) == 250)
        .await?;
    let mut sizes: Vec<usize> = s
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    sizes.sort();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(sizes.iter().all(|n| *n <= 100), "{sizes:?}");
    assert_eq!(s.len(), 3, "{sizes:?}");
    // One readiness flip rewrites exactly one slice.
    let before: BTreeMap<String, String> = s
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    e.set_ready("web-17", &pod_ip(17), false).await?;
    let after = e
        .wait_slices("web", "web-17 not ready", |s| {
            endpoints(s)
                .get("web-17")
                .is_some_and(|x| x.ready == Some(false))
        })
        .await?;
    let changed = after
        .iter()
        .filter(|s| {
            before.get(s.metadata.name.as_deref().unwrap_or(""))
                != s.metadata.resource_version.as_ref()
        })
        .count();
    assert_eq!(changed, 1);
    let text = c.metrics.encode();
    assert!(
        text.contains("endpoint_slice_controller_changes_total{operation=\"create\"}"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_1000_endpoints_and_legacy_truncation() -> Result<()> {
    let e = env("es-1100").await?;
    let _c = start_slices(
        &e.client,
        &e.ns,
        EndpointSliceConfig {
            max_endpoints_per_slice: 1000,
            ..Default::default()
        },
    );
    let _ep = start_endpoints(&e.client, &e.ns);
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(1100, "web", true).await?;
    let s = e
        .wait_slices_settled("web", "1100 endpoints", |s| total_endpoints(s) == 1100)
        .await?;
    assert_eq!(s.len(), 2);
    assert!(
        s.iter()
            .all(|s| s.endpoints.as_ref().map_or(0, Vec::len) <= 1000)
    );
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep = wait_for("truncated Endpoints", WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("web").await.ok().flatten()?;
            let n: usize = ep
                .subsets
                .iter()
                .flatten()
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum();
            (n == 1000).then_some(ep)
        }
    })
    .await?;
    assert_eq!(
        ep.metadata
            .annotations
            .unwrap_or_default()
            .get("endpoints.kubernetes.io/over-capacity")
            .map(String::as_str),
        Some("truncated")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_services_get_a_slice_per_family() -> Result<()> {
    let cp = ControlPlane::start(ControlPlaneOptions {
        service_cluster_ip_range: "10.96.0.0/16,fd00:10:96::/112".into(),
        ..Default::default()
    })
    .await?;
    let e = env_on(&cp, "es-dual").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]})))
        .await?;
    let mut b = PodBuilder::new(&e.ns, "web-0", &[("app", "web")]);
    b.node_name = Some(e.node(0));
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "web-0", true, &["10.1.0.5", "fd00::5"]).await?;
    let s = e
        .wait_slices("web", "one slice per family", |s| {
            s.len() == 2 && total_endpoints(s) == 2
        })
        .await?;
    let families: BTreeSet<String> = s.iter().map(|s| s.address_type.clone()).collect();
    assert_eq!(
        families,
        ["IPv4".to_string(), "IPv6".to_string()]
            .into_iter()
            .collect()
    );
    for sl in &s {
        let addr = sl
            .endpoints
            .as_ref()
            .and_then(|e| e.first())
            .map(|e| e.addresses[0].clone())
            .unwrap_or_default();
        assert_eq!(
            addr.contains(':'),
            sl.address_type == "IPv6",
            "{addr} in {}",
            sl.address_type
        );
    }
    // Dropping to single-stack removes the IPv6 slice.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    let patch = serde_json::json!({"spec": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"], "clusterIPs": [svcs.get("web").await?.spec.and_then(|s| s.cluster_ip).unwrap_or_default()]}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    e.wait_slices("web", "IPv4 only", |s| {
        s.len() == 1 && s[0].address_type == "IPv4"
    })
    .await?;
    drop(_c);
    cp.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_service_hostnames() -> Result<()> {
    let e = env("es-headless").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("db", serde_json::json!({"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}))
        .await?;
    let mut b = PodBuilder::new(&e.ns, "db-0", &[("app", "db")]);
    b.node_name = Some(e.node(0));
    b.hostname = Some("db-0".into());
    b.subdomain = Some("db".into());
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "db-0", true, &["10.2.0.1"]).await?;
    let s = e
        .wait_slices("db", "hostname set", |s| endpoints(s).len() == 1)
        .await?;
    assert_eq!(endpoints(&s)["db-0"].hostname.as_deref(), Some("db-0"));
    let labels = s[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("service.kubernetes.io/headless")
            .map(String::as_str),
        Some("")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_and_traffic_distribution_hints() -> Result<()> {
    let e = env("es-hints").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service(
        "web",
        basic_spec(serde_json::json!({"trafficDistribution": "PreferClose"})),
    )
    .await?;
    e.pods(3, "web", true).await?;
    let s = e
        .wait_slices("web", "hints", |s| {
            let eps = endpoints(s);
            eps.len() == 3 && eps["web-0"].hint_zones.is_some()
        })
        .await?;
    let eps = endpoints(&s);
    assert_eq!(eps["web-0"].hint_zones, Some(vec!["zone-a".to_string()]));
    assert_eq!(eps["web-1"].hint_zones, Some(vec!["zone-b".to_string()]));
    assert_eq!(eps["web-2"].hint_zones, None, "no zone, no hint");
    // Removing trafficDistribution removes the hints.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"trafficDistribution": null}})),
    )
    .await?;
    e.wait_slices("web", "hints removed", |s| {
        endpoints(s).values().all(|x| x.hint_zones.is_none())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_change_and_service_deletion() -> Result<()> {
    let e = env("es-sel").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(2, "web", true).await?;
    e.pods(3, "api", true).await?;
    e.wait_slices("web", "web pods", |s| endpoints(s).len() == 2)
        .await?;
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"selector": {"app": "api"}}})),
    )
    .await?;
    e.wait_slices("web", "api pods", |s| {
        let eps = endpoints(s);
        eps.len() == 3 && eps.keys().all(|k| k.starts_with("api-"))
    })
    .await?;
    // A pod relabelled into the selector joins.
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &e.ns);
    pods.patch(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"metadata": {"labels": {"app": "api"}}})),
    )
    .await?;
    e.wait_slices("web", "relabelled pod joins", |s| {
        endpoints(s).contains_key("web-0")
    })
    .await?;
    svcs.delete("web", &DeleteParams::default()).await?;
    e.wait_slices("web", "slices removed with the Service", |s| s.is_empty())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_restored_and_foreign_slices_untouched() -> Result<()> {
    let e = env("es-edit").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    let svc = e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(2, "web", true).await?;
    // A foreign slice for the same Service, managed by someone else.
    let foreign: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-foreign", "namespace": e.ns, "labels": {LABEL_SERVICE_NAME: "web", LABEL_MANAGED_BY: "someone-else"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.9.9.9"]}],
    }))?;
    let foreign = e
        .slices_api()
        .create(&PostParams::default(), &foreign)
        .await?;
    let s = e
        .wait_slices("web", "two endpoints", |s| endpoints(s).len() == 2)
        .await?;
    let name = s[0].metadata.name.clone().unwrap_or_default();

    // Edit: drop all endpoints by hand. We put them back.
    let patch = serde_json::json!({"endpoints": [{"addresses": ["10.7.7.7"]}]});
    e.slices_api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    e.wait_slices("web", "edit reverted", |s| {
        endpoints(s).len() == 2 && total_endpoints(s) == 2
    })
    .await?;

    // Delete by hand: recreated.
    e.slices_api()
        .delete(&name, &DeleteParams::default())
        .await?;
    e.wait_slices("web", "slice recreated", |s| endpoints(s).len() == 2)
        .await?;

    // Relabelled away from us: that slice becomes foreign, and we make our own again.
    let s = e.slices("web").await?;
    let name = s[0].metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_MANAGED_BY: "hand"}}});
    e.slices_api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let s = e
        .wait_slices("web", "new slice of ours", |s| endpoints(s).len() == 2)
        .await?;
    assert!(
        s.iter()
            .all(|x| x.metadata.name.as_deref() != Some(name.as_str()))
    );

    // The foreign slices were never touched.
    let f = e.slices_api().get("web-foreign").await?;
    assert_eq!(
        f.metadata.resource_version,
        foreign.metadata.resource_version
    );
    assert!(
        e.slices_api().get_opt(&name).await?.is_some(),
        "relabelled slice left alone"
    );
    let _ = svc;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_matching_nothing_gets_placeholder_and_others_converge() -> Result<()> {
    let e = env("es-bad").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("empty", serde_json::json!({"selector": {"app": "nobody"}, "ports": [{"port": 80, "targetPort": "nope"}]}))
        .await?;
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(1, "web", true).await?;
    e.wait_slices("empty", "placeholder", |s| {
        s.len() == 1 && total_endpoints(s) == 0
    })
    .await?;
    e.wait_slices("web", "web converges", |s| endpoints(s).len() == 1)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_from_upstream_without_losing_ready_endpoints() -> Result<()> {
    // Its own control plane: upstream's controller serves every namespace.
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let e = env_on(&cp, "es-takeover").await?;
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(150, "web", true).await?;
    let mut kcm = test_support::upstream_endpointslice_controller(&cp)?;
    let up = wait_for("upstream slices", Duration::from_secs(120), || {
        let f = e.slices_by("web", UPSTREAM_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| ready_count(s) == 150) }
    })
    .await?;
    assert_eq!(up.len(), 2);
    kcm.kill().await?;
    let _ = kcm.wait().await;

    // Watch the ready endpoint count over all slices of the Service while we take over.
    let min_seen = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = CancellationToken::new();
    let watcher = {
        let (min_seen, stop, api, ns) =
            (min_seen.clone(), stop.clone(), e.slices_api(), e.ns.clone());
        tokio::spawn(async move {
            let _ = ns;
            while !stop.is_cancelled() {
                if let Ok(l) = api
                    .list(&ListParams::default().labels(&format!("{LABEL_SERVICE_NAME}=web")))
                    .await
                {
                    min_seen.fetch_min(ready_count(&l.items), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let c = start_slices(
        &e.client,
        &e.ns,
        EndpointSliceConfig {
            takeover: true,
            ..Default::default()
        },
    );
    let ours = e
        .wait_slices("web", "all slices adopted", |s| ready_count(s) == 150)
        .await?;
    wait_for("no upstream slices left", WAIT, || {
        let f = e.slices_by("web", UPSTREAM_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| s.is_empty()) }
    })
    .await?;
    stop.cancel();
    let _ = watcher.await;
    assert_eq!(
        min_seen.load(Ordering::SeqCst),
        150,
        "ready endpoints dipped during takeover"
    );
    // Adoption relabels in place: the same slice names, no creates.
    let up_names: BTreeSet<_> = up.iter().filter_map(|s| s.metadata.name.clone()).collect();
    let our_names: BTreeSet<_> = ours
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(up_names, our_names);
    assert!(
        !c.metrics
            .encode()
            .contains("endpoint_slice_controller_changes_total{operation=\"create\"}")
    );
    drop(c);
    cp.stop().await;
    Ok(())
}

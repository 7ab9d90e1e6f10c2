//! Mirroring what a stock kube-apiserver allocated: no writes, findings reported once,
//! capacity metrics, and a restart rebuilding identical state.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_every_kind_of_service_without_writes_and_capacity_matches() {
    let cp = ControlPlane::start(ControlPlaneOptions {
        service_cluster_ip_range: "10.96.0.0/16,fd00:10::/108".into(),
        ..Default::default()
    })
    .await
    .expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "mirror")
        .await
        .expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let mut kinds = all_kinds();
    kinds.push(svc("require-dual", |s| {
        s.ip_family_policy = Some("RequireDualStack".into())
    }));
    kinds.push(svc("v6-only", |s| {
        s.ip_families = Some(vec!["IPv6".into()])
    }));
    for s in kinds {
        api.create(&PostParams::default(), &s)
            .await
            .expect("create service");
    }
    let before: BTreeMap<String, String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|s| {
            (
                s.metadata.name.unwrap_or_default(),
                s.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect();
    let (ips, v6, ports) = cluster_usage_by_family(&client).await;
    assert!(v6 >= 3, "dual-stack control plane expected");
    let cip = start_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
    let np = start_nodeport(&client, "30000-32767");
    // 10.96.0.0/16 holds 65534 usable addresses; 30000-32767 holds 2768 ports.
    let want_ip = format!("{ips}");
    wait_for("clusterip capacity gauges", DEADLINE, || {
        let t = cip.metrics.encode();
        async move {
            let used = sample(
                &t,
                "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"}",
            )?;
            let free = sample(
                &t,
                "kube_apiserver_clusterip_allocator_available_ips{cidr=\"10.96.0.0/16\"}",
            )?;
            let used6 = sample(
                &t,
                "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"fd00:10::/108\"}",
            )?;
            let free6 = sample(
                &t,
                "kube_apiserver_clusterip_allocator_available_ips{cidr=\"fd00:10::/108\"}",
            )?;
            // A /108 holds 2^20 - 1 allocatable addresses (only the network address is excluded).
            (used as usize == ips
                && free as usize == 65534 - ips
                && used6 as usize == v6
                && free6 as usize == (1 << 20) - 1 - v6)
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; want {want_ip} allocated:\n{}", cip.metrics.encode()));
    wait_for("nodeport capacity gauges", DEADLINE, || {
        let t = np.metrics.encode();
        async move {
            let used = sample(&t, "kube_apiserver_nodeport_allocator_allocated_ports")?;
            let free = sample(&t, "kube_apiserver_nodeport_allocator_available_ports")?;
            (used as usize == ports && free as usize == 2768 - ports).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; want {ports} ports:\n{}", np.metrics.encode()));
    // Give the workers the queue the rebuild produced, then check nothing was written and
    // nothing reported: a later Service's allocation passing through proves the queue drained.
    api.create(&PostParams::default(), &svc("marker", |_| {}))
        .await
        .expect("marker");
    let want = ips + 1;
    wait_for("marker mirrored", DEADLINE, || {
        let t = cip.metrics.encode();
        async move {
            (sample(
                &t,
                "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"}",
            )? as usize
                == want)
                .then_some(())
        }
    })
    .await
    .expect("marker");
    for s in api.list(&ListParams::default()).await.expect("list").items {
        let name = s.metadata.name.clone().unwrap_or_default();
        if let Some(rv) = before.get(&name) {
            assert_eq!(
                s.metadata.resource_version.as_ref(),
                Some(rv),
                "{name} was written"
            );
        }
    }
    let evs: Api<Event> = Api::namespaced(client.clone(), &ns);
    let ours: Vec<_> = evs
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.reporting_controller
                .as_deref()
                .is_some_and(|r| r.ends_with("allocator"))
        })
        .collect();
    assert!(ours.is_empty(), "unexpected events: {ours:?}");
    let text = cip.metrics.encode();
    assert!(
        !text.contains("apiserver_clusterip_repair_ip_errors_total{"),
        "{text}"
    );
    // Restart after an abrupt stop (no state survives but what the API server holds): the
    // rebuilt gauges are identical.
    let gauges = |t: &str| {
        let mut v = t
            .lines()
            .filter(|l| {
                l.starts_with("kube_apiserver_clusterip_allocator_a")
                    || l.starts_with("kube_apiserver_nodeport_allocator_a")
            })
            .map(str::to_string)
            .collect::<Vec<_>>();
        v.sort();
        v
    };
    let before = gauges(&format!("{}{}", cip.metrics.encode(), np.metrics.encode()));
    assert_eq!(before.len(), 6, "{before:?}");
    cip.kill();
    np.kill();
    let cip = start_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
    let np = start_nodeport(&client, "30000-32767");
    let (cm, nm) = (cip.metrics.clone(), np.metrics.clone());
    let want = before.clone();
    wait_for("identical gauges after restart", DEADLINE, || {
        let got = gauges(&format!("{}{}", cm.encode(), nm.encode()));
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: before {before:?}, after {:?}",
            gauges(&format!("{}{}", cip.metrics.encode(), np.metrics.encode()))
        )
    });
    cip.stop().await;
    np.stop().await;
    // The same through the manager binary: SIGKILL, restart, identical gauges (and the same
    // numbers as the in-process controllers reported).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let args = [
        "--controllers=clusterip-alloc,nodeport-alloc",
        "--service-cluster-ip-range=10.96.0.0/16,fd00:10::/108",
        "--leader-elect=false",
    ];
    let http = format!("--http-address={addr}");
    let scrape = |addr: String| async move {
        let body = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let mut v: Vec<String> = body
            .lines()
            .filter(|l| {
                l.starts_with("kube_apiserver_clusterip_allocator_a")
                    || l.starts_with("kube_apiserver_nodeport_allocator_a")
            })
            .map(str::to_string)
            .collect();
        v.sort();
        Some(v)
    };
    let mut all_args: Vec<&str> = args.to_vec();
    all_args.push(&http);
    let mut m1 = test_support::Manager::start(&cp, &all_args).expect("manager");
    let want = before.clone();
    wait_for("manager gauges", DEADLINE, || {
        let (a, w) = (addr.clone(), want.clone());
        async move { scrape(a).await.filter(|g| *g == w) }
    })
    .await
    .expect("manager mirrors the same state");
    m1.signal(9).expect("SIGKILL");
    let _ = m1.child.wait().await;
    let _m2 = test_support::Manager::start(&cp, &all_args).expect("manager again");
    wait_for("gauges after SIGKILL and restart", DEADLINE, || {
        let (a, w) = (addr.clone(), want.clone());
        async move { scrape(a).await.filter(|g| *g == w) }
    })
    .await
    .expect("identical state after SIGKILL and restart");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_values_are_reported_once_with_upstream_reason_and_metric() {
    // Its own control plane: with ranges that leave out every Service, this clusterip-alloc
    // would put ClusterIPValid conditions on other tests' Services.
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "oor").await.expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let created = api
        .create(
            &PostParams::default(),
            &svc("web", |s| s.type_ = Some("NodePort".into())),
        )
        .await
        .expect("create");
    let ip = created
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("ip");
    let port = created
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p[0].node_port)
        .expect("nodePort");
    // The manager believes in ranges that do not contain what the API server assigned.
    let cip = start_clusterip(&client, &["10.250.0.0/16"]);
    let np = start_nodeport(&client, "20000-20999");
    let ev = wait_for("ClusterIPOutOfRange event", DEADLINE, || {
        let c = client.clone();
        let ns = ns.clone();
        async move {
            let e = events_for(&c, &ns, "web", "ClusterIPOutOfRange").await;
            (!e.is_empty()).then_some(e)
        }
    })
    .await
    .expect("event");
    assert_eq!(
        ev[0].note.as_deref(),
        Some(format!("Cluster IP [IPv4]: {ip} is not within any configured Service CIDR; please recreate service").as_str())
    );
    assert_eq!(ev[0].type_.as_deref(), Some("Warning"));
    wait_for("PortOutOfRange event", DEADLINE, || {
        let c = client.clone();
        let ns = ns.clone();
        async move {
            (!events_for(&c, &ns, "web", "PortOutOfRange")
                .await
                .is_empty())
            .then_some(())
        }
    })
    .await
    .expect("port event");
    let pev = events_for(&client, &ns, "web", "PortOutOfRange").await;
    assert_eq!(
        pev[0].note.as_deref(),
        Some(
            format!(
                "Port {port} is not within the port range 20000-20999; please recreate service"
            )
            .as_str()
        )
    );
    // Resyncs: change the Service a few times, then create a second one and wait for its
    // event, which proves the first one's updates went through the queue.
    for i in 0..3 {
        let p = serde_json::json!({"metadata": {"labels": {"touch": format!("{i}")}}});
        api.patch("web", &PatchParams::default(), &Patch::Merge(&p))
            .await
            .expect("patch");
    }
    api.create(&PostParams::default(), &svc("second", |_| {}))
        .await
        .expect("second");
    wait_for("second event", DEADLINE, || {
        let c = client.clone();
        let ns = ns.clone();
        async move {
            (!events_for(&c, &ns, "second", "ClusterIPOutOfRange")
                .await
                .is_empty())
            .then_some(())
        }
    })
    .await
    .expect("second event");
    let again = events_for(&client, &ns, "web", "ClusterIPOutOfRange").await;
    assert_eq!(again.len(), 1, "reported more than once: {again:?}");
    assert!(
        again[0].series.is_none(),
        "event repeated as a series: {again:?}"
    );
    // The metric counts each Service once (every other Service, default/kubernetes included,
    // is out of range too, so compare against the number of Services with an IP).
    let (ips, _) = cluster_usage(&client).await;
    let t = cip.metrics.encode();
    let n = sample(
        &t,
        "apiserver_clusterip_repair_ip_errors_total{type=\"outOfRange\"}",
    )
    .expect("metric");
    assert!(
        n as usize <= ips && n >= 2.0,
        "outOfRange={n}, services with IPs={ips}\n{t}"
    );
    let t = np.metrics.encode();
    assert!(
        sample(
            &t,
            "apiserver_nodeport_repair_port_errors_total{type=\"outOfRange\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{t}"
    );
    cip.stop().await;
    np.stop().await;
    cp.stop().await;
}

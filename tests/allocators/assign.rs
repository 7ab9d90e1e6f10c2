//! The assign path (`--assign`), against the recording API double (an API that does not
//! allocate); and that without `--assign` nothing is written.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigns_where_the_api_does_not_allocate_with_409_handling_and_duplicate_detection() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    // Two families, so dual-stack policies can be exercised.
    let mk = |name: &str, f: fn(&mut ServiceSpec)| {
        let mut s = svc(name, f);
        s.metadata.namespace = Some("ns".into());
        d.create(s)
    };
    mk("plain", |_| {});
    mk("dual", |s| {
        s.ip_family_policy = Some("RequireDualStack".into())
    });
    mk("headless", |s| {
        s.cluster_ip = Some("None".into());
        s.selector = None;
    });
    mk("np", |s| {
        s.type_ = Some("NodePort".into());
        s.ports = Some(vec![
            ServicePort {
                name: Some("tcp".into()),
                port: 53,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ServicePort {
                name: Some("udp".into()),
                port: 53,
                protocol: Some("UDP".into()),
                ..Default::default()
            },
        ]);
    });
    mk("lb", |s| {
        s.type_ = Some("LoadBalancer".into());
        s.external_traffic_policy = Some("Local".into());
    });
    // A state only such an API can hold: two Services asking for one address and one port.
    mk("first", |s| {
        s.cluster_ip = Some("10.96.7.7".into());
        s.cluster_ips = Some(vec!["10.96.7.7".into()]);
        s.ip_families = Some(vec!["IPv4".into()]);
        s.ip_family_policy = Some("SingleStack".into());
    });
    mk("copycat", |s| {
        s.cluster_ip = Some("10.96.7.7".into());
        s.cluster_ips = Some(vec!["10.96.7.7".into()]);
        s.ip_families = Some(vec!["IPv4".into()]);
        s.ip_family_policy = Some("SingleStack".into());
    });
    // Requested addresses on an API that leaves the family fields empty: honoured when free,
    // refused with kube-apiserver's message when taken.
    mk("asks-free", |s| s.cluster_ip = Some("10.96.8.8".into()));
    mk("asks-taken", |s| s.cluster_ip = Some("10.96.7.7".into()));
    // The first write to "contested" meets a concurrent change: 409, then re-plan.
    d.conflict_next_write("ns", "contested");
    mk("contested", |_| {});

    let cip = assigning_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
    let np = assigning_nodeport(&client, "30000-32767");
    let ready = |name: &'static str, check: fn(&ServiceSpec) -> bool| {
        let d = d.clone();
        move || {
            let d = d.clone();
            async move { d.get("ns", name).filter(|s| check(spec_of(s))) }
        }
    };
    let plain = wait_for(
        "plain assigned",
        DEADLINE,
        ready("plain", |s| s.cluster_ip.is_some()),
    )
    .await
    .expect("plain");
    let sp = spec_of(&plain);
    assert_eq!(sp.ip_families.as_deref(), Some(&["IPv4".to_string()][..]));
    assert_eq!(sp.ip_family_policy.as_deref(), Some("SingleStack"));
    assert!(
        sp.cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.96."))
    );
    let dual = wait_for(
        "dual assigned",
        DEADLINE,
        ready("dual", |s| {
            s.cluster_ips.as_ref().is_some_and(|v| v.len() == 2)
        }),
    )
    .await
    .expect("dual");
    let ips = spec_of(&dual).cluster_ips.clone().unwrap_or_default();
    assert!(
        ips[0].starts_with("10.96.") && ips[1].starts_with("fd00:10::"),
        "{ips:?}"
    );
    let headless = wait_for(
        "headless families",
        DEADLINE,
        ready("headless", |s| s.ip_families.is_some()),
    )
    .await
    .expect("headless");
    assert_eq!(
        spec_of(&headless).ip_family_policy.as_deref(),
        Some("RequireDualStack")
    );
    assert_eq!(spec_of(&headless).cluster_ip.as_deref(), Some("None"));
    let npsvc = wait_for(
        "node ports assigned",
        DEADLINE,
        ready("np", |s| {
            s.ports.iter().flatten().all(|p| p.node_port.is_some())
        }),
    )
    .await
    .expect("np");
    let p = spec_of(&npsvc).ports.clone().unwrap_or_default();
    assert_eq!(
        p[0].node_port, p[1].node_port,
        "TCP and UDP of port 53 share a nodePort"
    );
    let lb = wait_for(
        "lb health check port",
        DEADLINE,
        ready("lb", |s| {
            s.health_check_node_port.is_some()
                && s.ports.iter().flatten().all(|p| p.node_port.is_some())
        }),
    )
    .await
    .expect("lb");
    assert_ne!(
        spec_of(&lb).health_check_node_port,
        spec_of(&lb).ports.as_ref().and_then(|p| p[0].node_port)
    );
    let contested = wait_for(
        "contested assigned after 409",
        DEADLINE,
        ready("contested", |s| s.cluster_ip.is_some()),
    )
    .await
    .expect("contested");
    assert_eq!(
        contested
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("touched"))
            .map(String::as_str),
        Some("yes"),
        "the concurrent change survived the re-planned write"
    );
    assert!(d.stats().1 >= 1, "no conflict was exercised");
    // Duplicate detection on the younger Service, once.
    wait_for("ClusterIPAlreadyAllocated event", DEADLINE, || {
        let d = d.clone();
        async move {
            d.events()
                .iter()
                .any(|e| {
                    e["reason"] == "ClusterIPAlreadyAllocated"
                        && e["regarding"]["name"] == "copycat"
                })
                .then_some(())
        }
    })
    .await
    .expect("duplicate event");
    let dup: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| {
            e["reason"] == "ClusterIPAlreadyAllocated" && e["regarding"]["name"] == "copycat"
        })
        .collect();
    assert_eq!(dup.len(), 1, "{dup:?}");
    assert_eq!(
        dup[0]["note"],
        "Cluster IP [IPv4]:10.96.7.7 was assigned to multiple services; please recreate service"
    );
    // Every address and port handed out is unique.
    let mut seen = BTreeSet::new();
    for name in ["plain", "dual", "contested"] {
        for ip in spec_of(&d.get("ns", name).expect("svc"))
            .cluster_ips
            .clone()
            .unwrap_or_default()
        {
            assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    assert!(!seen.contains("10.96.7.7"));
    let free = wait_for(
        "requested address honoured",
        DEADLINE,
        ready("asks-free", |s| s.ip_families.is_some()),
    )
    .await
    .expect("asks-free");
    assert_eq!(
        spec_of(&free).cluster_ips.as_deref(),
        Some(&["10.96.8.8".to_string()][..])
    );
    wait_for("refusal event", DEADLINE, || {
        let d = d.clone();
        async move {
            d.events()
                .into_iter()
                .find(|e| e["reason"] == "ClusterIPAllocationFailed" && e["regarding"]["name"] == "asks-taken")
        }
    })
    .await
    .map(|e| {
        assert_eq!(
            e["note"],
            "Service \"asks-taken\" is invalid: spec.clusterIPs: Invalid value: []string{\"10.96.7.7\"}: failed to allocate IP 10.96.7.7: provided IP is already allocated"
        )
    })
    .expect("refusal");
    assert!(
        spec_of(&d.get("ns", "asks-taken").expect("svc"))
            .ip_families
            .is_none()
    );
    let t = cip.metrics.encode();
    // copycat and asks-taken both claim 10.96.7.7 after "first".
    assert_eq!(
        sample(
            &t,
            "apiserver_clusterip_repair_ip_errors_total{type=\"duplicate\"}"
        ),
        Some(2.0),
        "{t}"
    );
    assert!(
        sample(&t, "kube_apiserver_clusterip_allocator_allocation_total{cidr=\"10.96.0.0/16\",scope=\"dynamic\"}")
            .is_some_and(|v| v >= 3.0),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "kube_apiserver_clusterip_allocator_allocation_total{cidr=\"10.96.0.0/16\",scope=\"static\"}"
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "kube_apiserver_clusterip_allocator_allocation_errors_total{cidr=\"\",scope=\"static\"}"
        ),
        Some(1.0),
        "{t}"
    );
    let nt = np.metrics.encode();
    assert!(
        sample(
            &nt,
            "kube_apiserver_nodeport_allocator_allocation_total{scope=\"dynamic\"}"
        )
        .is_some_and(|v| v >= 3.0),
        "{nt}"
    );
    assert_eq!(d.event_patches(), 0, "an Event was repeated");
    // Restart: a fresh controller rebuilds the same state and writes nothing more. The gauges
    // follow the mirror's rebuilds, which can trail the last write seen above: first let them
    // account for every address the Services hold (plus default/kubernetes's reserved one).
    let names = [
        "plain",
        "dual",
        "headless",
        "np",
        "lb",
        "first",
        "copycat",
        "asks-free",
        "asks-taken",
        "contested",
    ];
    let held: BTreeSet<String> = names
        .iter()
        .filter_map(|n| d.get("ns", n))
        .flat_map(|s| spec_of(&s).cluster_ips.clone().unwrap_or_default())
        .filter(|ip| ip != "None")
        .collect();
    let v6 = held.iter().filter(|ip| ip.contains(':')).count();
    let want = [
        format!(
            "kube_apiserver_clusterip_allocator_allocated_ips{{cidr=\"10.96.0.0/16\"}} {}",
            held.len() - v6 + 1
        ),
        format!("kube_apiserver_clusterip_allocator_allocated_ips{{cidr=\"fd00:10::/108\"}} {v6}"),
    ];
    let m = cip.metrics.clone();
    let t = wait_for("gauges account for every address", DEADLINE, || {
        let t = m.encode();
        let ok = want.iter().all(|w| t.lines().any(|l| l == w));
        async move { ok.then_some(t) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: want {want:?}\n{}", cip.metrics.encode()));
    let writes = d.stats().0;
    // Label sets of a family come out in hash order: compare sorted.
    let mut before = t
        .lines()
        .filter(|l| l.starts_with("kube_apiserver_clusterip_allocator_allocated_ips"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    before.sort();
    cip.stop().await;
    np.stop().await;
    let cip2 = assigning_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
    let m = cip2.metrics.clone();
    let after = wait_for("rebuilt gauges", DEADLINE, || {
        let t = m.encode();
        let want = before.clone();
        async move {
            let got: Vec<String> = t
                .lines()
                .filter(|l| l.starts_with("kube_apiserver_clusterip_allocator_allocated_ips"))
                .map(str::to_string)
                .collect();
            let mut got = got;
            got.sort();
            (got == want).then_some(got)
        }
    })
    .await
    .unwrap_or_else(|e| {
        let now: Vec<String> = cip2
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("kube_apiserver_clusterip_allocator_allocated_ips"))
            .map(str::to_string)
            .collect();
        panic!("{e}: before {before:?} after {now:?}")
    });
    assert!(!after.is_empty());
    assert_eq!(d.stats().0, writes, "restart wrote again");
    cip2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_mirrors_but_writes_nothing_until_it_leads() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    let mut waiting = svc("waiting", |_| {});
    waiting.metadata.namespace = Some("ns".into());
    d.create(waiting);
    let procs = InProcess::with_leading(client.clone(), false);
    let metrics = procs.base.metrics.clone();
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: vec!["10.96.0.0/16".parse().expect("cidr")],
        concurrent_syncs: 2,
        assign: true,
        ..Default::default()
    };
    procs.start("clusterip-alloc", "clusterip-allocator", |ctx| {
        clusterip_alloc::run(ctx, cfg)
    });
    let gauge = |want: f64| {
        let m = metrics.clone();
        move || {
            let t = m.encode();
            async move {
                (sample(
                    &t,
                    "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"}",
                )? == want)
                    .then_some(())
            }
        }
    };
    // The follower keeps its mirror current: a Service holding an address shows in the gauge
    // (2 = that address plus the one reserved for default/kubernetes).
    let mut held = svc("held", |s| {
        s.cluster_ip = Some("10.96.5.5".into());
        s.cluster_ips = Some(vec!["10.96.5.5".into()]);
        s.ip_families = Some(vec!["IPv4".into()]);
        s.ip_family_policy = Some("SingleStack".into());
    });
    held.metadata.namespace = Some("ns".into());
    d.create(held);
    wait_for("follower mirror", DEADLINE, gauge(2.0))
        .await
        .expect("mirror");
    assert_eq!(d.stats().0, 0, "a follower wrote");
    assert!(
        spec_of(&d.get("ns", "waiting").expect("svc"))
            .cluster_ip
            .is_none()
    );
    // Leading: the queued Service is assigned.
    procs.set_leading(true);
    let s = wait_for("assigned once leading", DEADLINE, || {
        let d = d.clone();
        async move {
            d.get("ns", "waiting")
                .filter(|s| spec_of(s).cluster_ip.is_some())
        }
    })
    .await
    .expect("assigned");
    assert_ne!(spec_of(&s).cluster_ip.as_deref(), Some("10.96.5.5"));
    assert_ne!(spec_of(&s).cluster_ip.as_deref(), Some("10.96.0.1"));
    procs.stop(Duration::from_secs(10)).await.expect("stopped");
}

/// Without `--assign` (the default) a Service the API left without values is never written,
/// while findings are still reported (as Events, and the ClusterIP duplicate as its
/// ClusterIPValid condition, a status apply): the same rebuild that would queue the unassigned
/// Services queues the duplicates, so once both duplicates' Events are out no write can follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_assign_nothing_is_written_but_findings_are_reported() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    let mk = |name: &str, f: fn(&mut ServiceSpec)| {
        let mut s = svc(name, f);
        s.metadata.namespace = Some("ns".into());
        d.create(s)
    };
    mk("plain", |_| {});
    mk("np", |s| s.type_ = Some("NodePort".into()));
    let taken = |s: &mut ServiceSpec| {
        s.type_ = Some("NodePort".into());
        s.cluster_ip = Some("10.96.7.7".into());
        s.cluster_ips = Some(vec!["10.96.7.7".into()]);
        s.ip_families = Some(vec!["IPv4".into()]);
        s.ip_family_policy = Some("SingleStack".into());
        s.ports = Some(vec![ServicePort {
            port: 80,
            node_port: Some(30007),
            ..Default::default()
        }]);
    };
    mk("first", taken);
    mk("copycat", taken);
    let cip = start_clusterip(&client, &["10.96.0.0/16"]);
    let np = start_nodeport(&client, "30000-32767");
    for reason in ["ClusterIPAlreadyAllocated", "PortAlreadyAllocated"] {
        wait_for(reason, DEADLINE, || {
            let d = d.clone();
            async move {
                d.events()
                    .iter()
                    .any(|e| e["reason"] == reason && e["regarding"]["name"] == "copycat")
                    .then_some(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", d.events()));
    }
    // The duplicate's ClusterIPValid condition: a status apply (which the double does not
    // serve; a 404 ends the write), never a write of the spec.
    let status = "/api/v1/namespaces/ns/services/copycat/status";
    let apply = wait_for("copycat's ClusterIPValid apply", DEADLINE, || {
        let d = d.clone();
        async move {
            d.calls()
                .into_iter()
                .find(|c| c.method == "PATCH" && c.uri.starts_with(status))
        }
    })
    .await
    .expect("condition apply");
    assert!(
        apply
            .uri
            .contains("fieldManager=service-controller-manager%2Fclusterip-alloc"),
        "{}",
        apply.uri
    );
    let conditions = &apply.body["status"]["conditions"];
    assert_eq!(conditions.as_array().map(Vec::len), Some(1), "{conditions}");
    assert_eq!(conditions[0]["type"], "ClusterIPValid");
    assert_eq!(conditions[0]["status"], "False");
    assert_eq!(conditions[0]["reason"], "ClusterIPAlreadyAllocated");
    assert_eq!(
        conditions[0]["message"],
        "Cluster IP [IPv4]:10.96.7.7 was assigned to multiple services; please recreate service"
    );
    let writes: Vec<String> = d
        .calls_to("/api/v1/namespaces/ns/services")
        .into_iter()
        .filter(|c| !c.starts_with("GET") && !c.starts_with(&format!("PATCH {status}?")))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert_eq!(d.stats().0, 0);
    assert_eq!(
        spec_of(&d.get("ns", "plain").expect("svc")).cluster_ip,
        None
    );
    assert_eq!(
        spec_of(&d.get("ns", "np").expect("svc"))
            .ports
            .as_ref()
            .expect("ports")[0]
            .node_port,
        None
    );
    cip.stop().await;
    np.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_range_is_reported_once_per_service_across_resyncs() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    let mk = |name: &str, f: fn(&mut ServiceSpec)| {
        let mut s = svc(name, f);
        s.metadata.namespace = Some("ns".into());
        d.create(s)
    };
    mk("gets-it", |s| s.type_ = Some("NodePort".into()));
    mk("too-late", |s| s.type_ = Some("NodePort".into()));
    // Two usable addresses, one of them reserved for default/kubernetes; one node port.
    let cip = assigning_clusterip(&client, &["10.96.0.0/30"]);
    let np = assigning_nodeport(&client, "30000-30000");
    let count = |reason: &'static str| {
        let d = d.clone();
        move || {
            d.events()
                .iter()
                .filter(|e| e["reason"] == reason && e["regarding"]["name"] == "too-late")
                .count()
        }
    };
    let (full_ip, full_port) = (count("ServiceCIDRFull"), count("PortRangeFull"));
    wait_for("both full events", DEADLINE, || {
        let ok = full_ip() == 1 && full_port() == 1;
        async move { ok.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", d.events()));
    let got = d.get("ns", "gets-it").expect("svc");
    assert_eq!(spec_of(&got).cluster_ip.as_deref(), Some("10.96.0.2"));
    let adds = |m: &Metrics, q: &str| {
        sample(
            &m.encode(),
            &format!("workqueue_adds_total{{name=\"{q}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (a0, b0) = (
        adds(&cip.metrics, "clusterip-alloc"),
        adds(&np.metrics, "nodeport-alloc"),
    );
    // Resyncs: every change re-queues the Service that still lacks its values.
    for i in 0..5 {
        mk(["e0", "e1", "e2", "e3", "e4"][i], |s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.com".into());
        });
        let (cm, nm) = (cip.metrics.clone(), np.metrics.clone());
        let want = (a0 + i as f64 + 1.0, b0 + i as f64 + 1.0);
        wait_for("re-queued", DEADLINE, || {
            let ok =
                adds(&cm, "clusterip-alloc") >= want.0 && adds(&nm, "nodeport-alloc") >= want.1;
            async move { ok.then_some(()) }
        })
        .await
        .expect("resync");
    }
    assert_eq!(d.event_patches(), 0, "an Event was repeated");
    assert_eq!(full_ip(), 1, "{:?}", d.events());
    assert_eq!(full_port(), 1, "{:?}", d.events());
    let t = cip.metrics.encode();
    assert_eq!(
        sample(
            &t,
            "kube_apiserver_clusterip_allocator_allocation_errors_total{cidr=\"10.96.0.0/30\",scope=\"dynamic\"}"
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        d.stats().0,
        2,
        "only gets-it was written (once per controller)"
    );
    cip.stop().await;
    np.stop().await;
}

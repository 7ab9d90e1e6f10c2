//! IPAddress objects, the API server's ClusterIP state in v1.37: upstream's IPAddress findings
//! reported (Event, metric) without touching the objects, capacity gauges equal to the count of
//! the allocator's IPAddresses, and a `10.0.0.0/8` + IPv6 `/64` range that starts and mirrors.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{IPAddress, IPAddressSpec, ParentReference};
use test_support::metrics::{Metrics, scrape_manager};

use super::*;

const MANAGED_BY: &str = "ipaddress.kubernetes.io/managed-by";
const FAMILY: &str = "ipaddress.kubernetes.io/ip-family";
const ALLOCATOR: &str = "ipallocator.k8s.io";
/// What our Events name as their reporting controller.
const REPORTER: &str = "clusterip-allocator";

/// An IPAddress as kube-apiserver's allocator labels them, for Service `ns/name`.
fn ip_address(ip: &str, ns: &str, name: &str) -> IPAddress {
    let fam = if ip.contains(':') { "IPv6" } else { "IPv4" };
    IPAddress {
        metadata: ObjectMeta {
            name: Some(ip.into()),
            labels: Some(
                [
                    (MANAGED_BY.to_string(), ALLOCATOR.to_string()),
                    (FAMILY.to_string(), fam.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: IPAddressSpec {
            parent_ref: ParentReference {
                group: Some(String::new()),
                resource: "services".into(),
                namespace: Some(ns.into()),
                name: name.into(),
            },
        },
    }
}

/// Creates an IPAddress for `ns/name` at the first free address of `candidates`.
async fn create_free(
    api: &Api<IPAddress>,
    candidates: &mut impl Iterator<Item = String>,
    ns: &str,
    name: &str,
) -> String {
    for ip in candidates.by_ref() {
        match api
            .create(&PostParams::default(), &ip_address(&ip, ns, name))
            .await
        {
            Ok(_) => return ip,
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => panic!("create IPAddress {ip}: {e}"),
        }
    }
    panic!("no free address among the candidates")
}

/// Our Events (reported as [`REPORTER`]) with `reason` about `name` in `ns`: their notes.
async fn our_notes(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    test_support::events::events_with_reason(client, ns, name, reason)
        .await
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some(REPORTER))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

/// Waits for our Event with `reason` about `name` in `ns`, and checks its note.
async fn expect_event(client: &Client, ns: &str, name: &str, reason: &str, note: &str) {
    let got = wait_for(&format!("{reason} on {name}"), DEADLINE, || {
        let c = client.clone();
        let (ns, name, reason) = (ns.to_string(), name.to_string(), reason.to_string());
        async move {
            let n = our_notes(&c, &ns, &name, &reason).await;
            (!n.is_empty()).then_some(n)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        got.iter().any(|n| n == note),
        "{reason}: {got:?}, want {note:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipaddress_findings_have_upstream_reasons_messages_and_metric() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "ipaddr")
        .await
        .expect("ns");
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let ips: Api<IPAddress> = Api::all(client.clone());
    let holder = svcs
        .create(&PostParams::default(), &svc("holder", |_| {}))
        .await
        .expect("holder");
    let held = holder
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the API server assigned a ClusterIP");
    let other = svcs
        .create(&PostParams::default(), &svc("other", |_| {}))
        .await
        .expect("other");
    // Upstream waits 60 s before reporting a leaked IPAddress, and the API server's own repair
    // deletes it then (a wrong reference after 5 s): report at once so ours comes first.
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: vec![cp.options.service_cluster_ip_range.parse().expect("cidr")],
        concurrent_syncs: 2,
        ip_address_grace: clusterip_alloc::core::Grace {
            leaked: Duration::ZERO,
            young: Duration::ZERO,
        },
        assign: false,
    };
    let cip = Running::start(&client, "clusterip-alloc", REPORTER, |ctx| {
        clusterip_alloc::run(ctx, cfg)
    });
    // The API server's repair waits 5 s before deleting a wrongly referencing IPAddress only if
    // it is newer than its Service, at the second's granularity of creation timestamps: let
    // the clock pass the Service's second (and the controller mirror) first.
    let other_born = other
        .metadata
        .creation_timestamp
        .map(|t| std::time::SystemTime::from(t.0))
        .expect("creationTimestamp");
    let m = cip.metrics.clone();
    wait_for("mirrored, and a second after the Service", DEADLINE, || {
        let t = m.encode();
        async move {
            let later = std::time::SystemTime::now()
                .duration_since(other_born)
                .is_ok_and(|d| d > Duration::from_millis(1100));
            (later && t.contains("kube_apiserver_clusterip_allocator_allocated_ips{")).then_some(())
        }
    })
    .await
    .expect("mirrored");
    // Every version of the holder from now on: its ClusterIPValid comes and goes within moments.
    let seen = watch_valid(&svcs, "holder").await;
    let mut candidates = (1..250).map(|i| format!("10.96.254.{i}"));
    // Names a Service that does not exist.
    let leaked = create_free(&ips, &mut candidates, &ns, "gone").await;
    let leaked_at = std::time::Instant::now();
    // Names a Service that exists but does not hold the address.
    let wrong = create_free(&ips, &mut candidates, &ns, "other").await;
    // A Service whose IPAddress is gone (the API server recreates it only at its next resync).
    ips.delete(&held, &DeleteParams::default())
        .await
        .expect("delete the holder's IPAddress");
    expect_event(
        &client,
        "default",
        &leaked,
        "IPAddressNotAllocated",
        &format!("IPAddress: {leaked} for Service {ns}/gone appears to have leaked: cleaning up"),
    )
    .await;
    expect_event(
        &client,
        "default",
        &wrong,
        "IPAddressWrongReference",
        &format!("IPAddress: {wrong} for Service {ns}/other has a wrong reference; cleaning up"),
    )
    .await;
    expect_event(
        &client,
        &ns,
        "holder",
        "ClusterIPNotAllocated",
        &format!("Cluster IP [IPv4]: {held} is not allocated; repairing"),
    )
    .await;
    let m = Metrics::parse(&cip.metrics.encode()).expect("metrics");
    let errors = |t: &str| m.sum("apiserver_clusterip_repair_ip_errors_total", &[("type", t)]);
    assert!(errors("leak") >= 2.0, "leak: {}", cip.metrics.encode());
    assert!(errors("repair") >= 1.0, "repair: {}", cip.metrics.encode());
    // The holder's ClusterIPValid=False with the Event's reason and message. That status write
    // is a Service event, on which the API server's repair loop recreates the IPAddress; the
    // finding goes, and so does the condition.
    let note = format!("Cluster IP [IPv4]: {held} is not allocated; repairing");
    wait_for(
        "the holder's ClusterIPValid to come and go",
        DEADLINE,
        || {
            let seen = seen.clone();
            let note = note.clone();
            async move {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let came = seen.iter().position(|c| {
                    c.as_ref().is_some_and(|c| {
                        c.status == "False"
                            && c.reason == "ClusterIPNotAllocated"
                            && c.message == note
                    })
                })?;
                seen[came..].iter().any(Option::is_none).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", seen.lock().map(|s| s.clone())));
    // Report only: the holder's IPAddress is back, but the API server made it, not us; the
    // leaked one is still there (we delete nothing; the API server's repair deletes it 60 s
    // after its creation).
    let back = ips.get_opt(&held).await.expect("get").expect("recreated");
    // The API server's own client (the harness's kube-apiserver binary is `controlplane`).
    assert_eq!(
        test_support::field_managers(&back.metadata),
        vec!["controlplane".to_string()]
    );
    // Only while the API server's own 60 s have not run out (a slow machine can get there).
    if leaked_at.elapsed() < Duration::from_secs(50) {
        assert!(ips.get_opt(&leaked).await.expect("get").is_some());
    } else {
        eprintln!(
            "leaked IPAddress not checked: {:?} old",
            leaked_at.elapsed()
        );
    }
    // Put the holder's IPAddress back so the shared control plane stays consistent.
    let _ = ips
        .create(&PostParams::default(), &ip_address(&held, &ns, "holder"))
        .await;
    let _ = ips.delete(&leaked, &DeleteParams::default()).await;
    let _ = ips.delete(&wrong, &DeleteParams::default()).await;
    cip.stop().await;
}

/// Collects `name`'s ClusterIPValid condition from every version of the Service from now on.
async fn watch_valid(
    api: &Api<Service>,
    name: &str,
) -> Arc<std::sync::Mutex<Vec<Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>>> {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let rv = api
        .get(name)
        .await
        .expect("get")
        .metadata
        .resource_version
        .expect("resourceVersion");
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(290);
    let mut stream = api.watch(&wp, &rv).await.expect("watch").boxed();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(WatchEvent::Modified(s))) = stream.next().await {
            let c = s
                .status
                .and_then(|st| st.conditions)
                .and_then(|cs| cs.into_iter().find(|c| c.type_ == "ClusterIPValid"));
            into.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    });
    seen
}

/// The allocator's IPAddresses of `cidr`'s family inside it, as kube-apiserver counts them.
async fn count_ip_addresses(client: &Client, cidr: IpNet) -> usize {
    let api: Api<IPAddress> = Api::all(client.clone());
    let fam = if cidr.addr().is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    api.list(&ListParams::default().labels(&format!("{MANAGED_BY}={ALLOCATOR},{FAMILY}={fam}")))
        .await
        .expect("list IPAddresses")
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name?.parse::<IpAddr>().ok())
        .filter(|ip| cidr.contains(ip))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slash_8_range_starts_mirrors_and_gauges_equal_the_ipaddress_count() {
    // Dual-stack: the widest IPv6 range v1.37 accepts beside the /8.
    let (v4, v6) = ("10.0.0.0/8", "fd00:10::/64");
    let range = format!("{v4},{v6}");
    let cp = ControlPlane::start(ControlPlaneOptions {
        service_cluster_ip_range: range.clone(),
        ..Default::default()
    })
    .await
    .expect("control plane with a /8 and a /64");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "wide").await.expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for s in all_kinds() {
        api.create(&PostParams::default(), &s)
            .await
            .expect("create");
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let http = format!("--http-address={addr}");
    let flag = format!("--service-cluster-ip-range={range}");
    let args = [
        "--controllers=clusterip-alloc",
        "--leader-elect=false",
        flag.as_str(),
        http.as_str(),
    ];
    let mut manager = test_support::Manager::start(&cp, &args).expect("manager");
    // kube-apiserver's available gauge: usable addresses minus allocated, capped at i64::MAX
    // (a /64 has more); compared as the f64 the text carries.
    let usable = |cidr: &str| -> f64 {
        match cidr {
            "10.0.0.0/8" => ((1u64 << 24) - 2) as f64,
            _ => i64::MAX as f64,
        }
    };
    // Gauges equal the IPAddress count, before and after more Services arrive.
    for round in 0..2 {
        if round == 1 {
            for i in 0..5 {
                api.create(
                    &PostParams::default(),
                    &svc(&format!("more-{i}"), |s| {
                        s.ip_family_policy = Some("PreferDualStack".into())
                    }),
                )
                .await
                .expect("create");
            }
        }
        for cidr in [v4, v6] {
            let want = count_ip_addresses(&client, cidr.parse().expect("cidr")).await;
            assert!(want > 5 * round, "{cidr}: IPAddresses: {want}");
            let got = wait_for("gauges equal the IPAddress count", DEADLINE, || {
                let addr = addr.clone();
                async move {
                    let m = scrape_manager(&addr).await?;
                    let l = [("cidr", cidr)];
                    let used = m.get("kube_apiserver_clusterip_allocator_allocated_ips", &l)?;
                    let free = m.get("kube_apiserver_clusterip_allocator_available_ips", &l)?;
                    (used as usize == want && free == usable(cidr) - want as f64)
                        .then_some((used, free))
                }
            })
            .await;
            if let Err(e) = got {
                panic!(
                    "{e}: want {want} allocated in {cidr}; manager: {:?}; log: {:?}",
                    scrape_manager(&addr).await.map(|m| m
                        .matching("kube_apiserver_clusterip_allocator_allocated_ips", &[])
                        .cloned()
                        .collect::<Vec<_>>()),
                    manager.log_lines()
                );
            }
        }
    }
    // Mirrored, not written: no finding about any of these Services.
    let evs: Api<Event> = Api::namespaced(client.clone(), &ns);
    let ours: Vec<Event> = evs
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some(REPORTER))
        .collect();
    assert!(ours.is_empty(), "unexpected events: {ours:?}");
    manager.signal(15).expect("SIGTERM");
    let status = manager
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exit");
    assert!(status.success(), "{status:?}");
    cp.stop().await;
}

/// Creates Service `name` in `api` at the first of `candidates` the API server accepts.
async fn create_at(
    api: &Api<Service>,
    name: &str,
    candidates: impl Iterator<Item = String>,
) -> Service {
    for ip in candidates {
        let s = svc(name, |s| s.cluster_ip = Some(ip.clone()));
        match api.create(&PostParams::default(), &s).await {
            Ok(created) => return created,
            // Taken by someone else on the shared control plane: the next one.
            Err(kube::Error::Api(e)) if e.code == 422 => continue,
            Err(e) => panic!("create {name} at {ip}: {e}"),
        }
    }
    panic!("no free address for {name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ipaddress_finding_while_the_ipaddress_watch_is_down() {
    use test_support::apiproxy::{Action, ApiProxy, Match};
    // Its own control plane: with a range that leaves out half the API server's, this
    // clusterip-alloc would put ClusterIPValid conditions on other tests' Services.
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let admin = cp.client().await.expect("client");
    let ns = test_support::namespace(&admin, "ipoutage")
        .await
        .expect("ns");
    let proxy = ApiProxy::start(admin.clone()).await.expect("proxy");
    let client = Client::try_from(proxy.config().expect("config")).expect("proxied client");
    // Our range is the lower half of the API server's: a Service in the upper half is out of
    // range for us, a finding that compares nothing and so shows during the outage too.
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: vec!["10.96.0.0/17".parse().expect("cidr")],
        concurrent_syncs: 2,
        ip_address_grace: clusterip_alloc::core::Grace {
            leaked: Duration::ZERO,
            young: Duration::ZERO,
        },
        assign: false,
    };
    let cip = Running::start(&client, "clusterip-alloc", REPORTER, |ctx| {
        clusterip_alloc::run(ctx, cfg)
    });
    let m = cip.metrics.clone();
    wait_for("mirrored", DEADLINE, || {
        let t = m.encode();
        async move {
            t.contains("kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/17\"}")
                .then_some(())
        }
    })
    .await
    .expect("mirrored");
    // The IPAddress watch goes down: its open watch ends and every list and watch answers 500
    // (not 503, which the client retries by itself without the informer ever seeing it).
    proxy.fail(
        Match::resource("ipaddresses"),
        Action::Status {
            code: 500,
            retry_after: None,
        },
        1_000_000,
    );
    proxy.end_watches("ipaddresses");
    wait_for("the IPAddress watch failing", DEADLINE, || {
        let n = proxy.injected();
        async move { (n > 0).then_some(()) }
    })
    .await
    .expect("outage");
    // A Service created now has an IPAddress we cannot see.
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let during = create_at(&svcs, "during", (1..250).map(|i| format!("10.96.101.{i}"))).await;
    let born = during
        .metadata
        .creation_timestamp
        .map(|t| std::time::SystemTime::from(t.0))
        .expect("creationTimestamp");
    let marker = create_at(&svcs, "marker", (1..250).map(|i| format!("10.96.201.{i}"))).await;
    let marker_ip = marker.spec.and_then(|s| s.cluster_ip).expect("ip");
    // The marker's finding shows that Services are mirrored and reported meanwhile; three
    // times the 1 s settle after "during" was created, a ClusterIPNotAllocated would be out.
    let (c, n) = (admin.clone(), ns.clone());
    wait_for(
        "the marker's finding, 3 s into the outage",
        DEADLINE,
        || {
            let (c, n) = (c.clone(), n.clone());
            async move {
                let late = std::time::SystemTime::now()
                    .duration_since(born)
                    .is_ok_and(|d| d > Duration::from_secs(3));
                let notes = our_notes(&c, &n, "marker", "ClusterIPOutOfRange").await;
                (late && !notes.is_empty()).then_some(())
            }
        },
    )
    .await
    .expect("marker reported");
    assert_eq!(
        our_notes(&admin, &ns, "marker", "ClusterIPOutOfRange").await,
        vec![format!(
            "Cluster IP [IPv4]: {marker_ip} is not within any configured Service CIDR; please recreate service"
        )]
    );
    let spurious = our_notes(&admin, &ns, "during", "ClusterIPNotAllocated").await;
    assert!(
        spurious.is_empty(),
        "reported while the IPAddress watch was down: {spurious:?}"
    );
    assert!(proxy.injected() > 0);
    cip.stop().await;
    cp.stop().await;
}

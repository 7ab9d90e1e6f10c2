//! ClusterIP, NodePort and ServiceCIDR controllers end to end.
//!
//! Against the real local control plane (a stock kube-apiserver, which allocates by itself):
//! mirroring without writes, out-of-range findings reported once, capacity metrics, the
//! ServiceCIDR finalizer/Ready/deletion blocking, and a restart rebuilding identical state.
//! The assign path needs an API server that leaves ClusterIPs and NodePorts empty; no real one
//! in reach does, so (as issue 4 allows) a small in-process HTTP double serving Services is used
//! for it, including 409 handling and duplicate detection.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, ControllerContext, LeaderGate, Metrics};
use test_support::{ControlPlane, ControlPlaneOptions, wait_for};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// A controller started through its crate's `run()` with a context built here.
struct Running {
    metrics: Metrics,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn context(
    client: &Client,
    name: &str,
    reporter: &str,
    metrics: &Metrics,
) -> (ControllerContext, CancellationToken) {
    let (leader, tx) = LeaderGate::fixed(true);
    // Keep the sender alive for the test's lifetime: a dropped sender reads as "lost".
    std::mem::forget(tx);
    let mut base = ContextBase::new(client.clone(), leader);
    base.metrics = metrics.clone();
    let shutdown = base.shutdown.clone();
    (base.context(name, reporter), shutdown)
}

fn start_clusterip(client: &Client, ranges: &[&str]) -> Running {
    let metrics = Metrics::new();
    let (ctx, shutdown) = context(client, "clusterip-alloc", "clusterip-allocator", &metrics);
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: ranges.iter().map(|r| r.parse().expect("cidr")).collect(),
        concurrent_syncs: 2,
    };
    let task = tokio::spawn(async move {
        if let Err(e) = clusterip_alloc::run(ctx, cfg).await {
            eprintln!("clusterip-alloc: {e}");
        }
    });
    Running {
        metrics,
        shutdown,
        task,
    }
}

fn start_nodeport(client: &Client, range: &str) -> Running {
    let metrics = Metrics::new();
    let (ctx, shutdown) = context(client, "nodeport-alloc", "nodeport-allocator", &metrics);
    let cfg = nodeport_alloc::NodePortAllocConfig {
        service_node_port_range: range.parse().expect("range"),
        concurrent_syncs: 2,
    };
    let task = tokio::spawn(async move {
        if let Err(e) = nodeport_alloc::run(ctx, cfg).await {
            eprintln!("nodeport-alloc: {e}");
        }
    });
    Running {
        metrics,
        shutdown,
        task,
    }
}

fn start_service_cidr(client: &Client) -> Running {
    let metrics = Metrics::new();
    let (ctx, shutdown) = context(client, "service-cidr", "service-cidr-controller", &metrics);
    let task = tokio::spawn(async move {
        let cfg = clusterip_alloc::ServiceCidrConfig {
            concurrent_syncs: 2,
        };
        if let Err(e) = clusterip_alloc::run_service_cidr(ctx, cfg).await {
            eprintln!("service-cidr: {e}");
        }
    });
    Running {
        metrics,
        shutdown,
        task,
    }
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|r| r.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

fn svc(name: &str, f: impl FnOnce(&mut ServiceSpec)) -> Service {
    let mut spec = ServiceSpec {
        selector: Some([("app".to_string(), name.to_string())].into()),
        ports: Some(vec![ServicePort {
            port: 80,
            ..Default::default()
        }]),
        ..Default::default()
    };
    f(&mut spec);
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Every kind of Service a stock API server allocates for.
fn all_kinds() -> Vec<Service> {
    vec![
        svc("plain", |_| {}),
        svc("prefer-dual", |s| {
            s.ip_family_policy = Some("PreferDualStack".into())
        }),
        svc("headless", |s| s.cluster_ip = Some("None".into())),
        svc("headless-selectorless", |s| {
            s.cluster_ip = Some("None".into());
            s.selector = None;
        }),
        svc("nodeport", |s| s.type_ = Some("NodePort".into())),
        svc("lb-local", |s| {
            s.type_ = Some("LoadBalancer".into());
            s.external_traffic_policy = Some("Local".into());
        }),
        svc("lb-no-np", |s| {
            s.type_ = Some("LoadBalancer".into());
            s.allocate_load_balancer_node_ports = Some(false);
        }),
        svc("external", |s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.com".into());
            s.selector = None;
        }),
        svc("dns", |s| {
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
        }),
    ]
}

async fn events_for(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// Counts ClusterIPs and node ports the API server holds across all namespaces.
async fn cluster_usage(client: &Client) -> (usize, usize) {
    let (v4, v6, ports) = cluster_usage_by_family(client).await;
    (v4 + v6, ports)
}

/// Counts IPv4 ClusterIPs, IPv6 ClusterIPs and node ports across all namespaces.
async fn cluster_usage_by_family(client: &Client) -> (usize, usize, usize) {
    let all: Api<Service> = Api::all(client.clone());
    let list = all
        .list(&ListParams::default())
        .await
        .expect("list services");
    let (mut v4, mut v6) = (0, 0);
    let mut ports = BTreeSet::new();
    for s in &list.items {
        let spec = s.spec.as_ref().expect("spec");
        if spec.type_.as_deref() != Some("ExternalName") {
            for ip in spec.cluster_ips.iter().flatten().filter(|i| *i != "None") {
                if ip.contains(':') {
                    v6 += 1;
                } else {
                    v4 += 1;
                }
            }
        }
        for p in spec.ports.iter().flatten() {
            if let Some(np) = p.node_port {
                ports.insert(np);
            }
        }
        if let Some(h) = spec.health_check_node_port {
            ports.insert(h);
        }
    }
    (v4, v6, ports.len())
}

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
    cip.task.abort();
    np.task.abort();
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
    let cp = ControlPlane::shared().await.expect("control plane");
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
        Some(format!("Cluster IP [IPv4]:{ip} is not within the service CIDR 10.250.0.0/16; please recreate service").as_str())
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
    // The metric counts each Service once (every pre-existing Service of the shared control
    // plane is out of range too, so compare against the number of Services with an IP).
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
}

/// Creates ServiceCIDR `name` with one range.
async fn create_service_cidr(cidrs: &Api<ServiceCIDR>, name: &str, cidr: &str) {
    cidrs
        .create(
            &PostParams::default(),
            &ServiceCIDR {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(ServiceCIDRSpec {
                    cidrs: Some(vec![cidr.into()]),
                }),
                status: None,
            },
        )
        .await
        .expect("create servicecidr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cidr_finalizer_ready_and_deletion_blocking() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ctl = start_service_cidr(&client);
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    let name = "scm-test-extra";
    create_service_cidr(&cidrs, name, "10.200.0.0/24").await;
    let ready = |want_status: &'static str, want_reason: &'static str| {
        let cidrs = cidrs.clone();
        move || {
            let cidrs = cidrs.clone();
            async move {
                let o = cidrs.get_opt(name).await.ok()??;
                let has_fin = o
                    .metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .any(|f| f == "networking.k8s.io/service-cidr-finalizer");
                let c = o
                    .status?
                    .conditions?
                    .into_iter()
                    .find(|c| c.type_ == "Ready")?;
                (has_fin && c.status == want_status && c.reason == want_reason).then_some(c.message)
            }
        }
    };
    let msg = wait_for("finalizer and Ready=True", DEADLINE, ready("True", ""))
        .await
        .expect("ready");
    assert_eq!(msg, "Kubernetes Service CIDR is ready");
    // A Service whose address only this ServiceCIDR covers.
    let ns = test_support::namespace(&client, "scidr").await.expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &svc("pinned", |s| s.cluster_ip = Some("10.200.0.10".into())),
    )
    .await
    .expect("service in the new ServiceCIDR");
    cidrs
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    let msg = wait_for(
        "Ready=False Terminating",
        DEADLINE,
        ready("False", "Terminating"),
    )
    .await
    .expect("blocked");
    assert_eq!(
        msg,
        "There are still IPAddresses referencing the ServiceCIDR, please remove them or create a new ServiceCIDR"
    );
    assert!(
        cidrs.get_opt(name).await.expect("get").is_some(),
        "deleted while an IPAddress depends on it"
    );
    api.delete("pinned", &DeleteParams::default())
        .await
        .expect("delete service");
    // Released after the grace period (10 s from the deletion timestamp).
    wait_for("ServiceCIDR gone", Duration::from_secs(60), || {
        let cidrs = cidrs.clone();
        async move { cidrs.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await
    .expect("released");
    let t = ctl.metrics.encode();
    assert!(
        t.contains("service_controller_manager_reconcile_total{controller=\"service-cidr\"}"),
        "{t}"
    );
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_flag_ranges_follow_service_cidr_objects() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ctl = start_service_cidr(&client);
    let cip = start_clusterip(&client, &[]);
    let gauge = |cidr: &'static str, which: &'static str| {
        let m = cip.metrics.clone();
        move || {
            let t = m.encode();
            async move {
                sample(
                    &t,
                    &format!("kube_apiserver_clusterip_allocator_{which}{{cidr=\"{cidr}\"}}"),
                )
            }
        }
    };
    // kube-apiserver's own ServiceCIDR ("kubernetes") from its flag.
    wait_for(
        "default ServiceCIDR tracked",
        DEADLINE,
        gauge("10.96.0.0/16", "allocated_ips"),
    )
    .await
    .expect("default cidr");
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    let name = "scm-test-follow";
    create_service_cidr(&cidrs, name, "10.201.0.0/24").await;
    let free = wait_for(
        "added ServiceCIDR tracked",
        DEADLINE,
        gauge("10.201.0.0/24", "available_ips"),
    )
    .await
    .expect("new cidr");
    assert_eq!(free, 254.0);
    let ns = test_support::namespace(&client, "follow")
        .await
        .expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    // kube-apiserver only allocates from a ServiceCIDR once it is Ready.
    let created = wait_for("service in the new ServiceCIDR", DEADLINE, || {
        let api = api.clone();
        async move {
            api.create(
                &PostParams::default(),
                &svc("in-new", |s| s.cluster_ip = Some("10.201.0.5".into())),
            )
            .await
            .ok()
        }
    })
    .await
    .expect("service");
    assert_eq!(
        created.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.201.0.5")
    );
    let m = cip.metrics.clone();
    wait_for("address counted in the new ServiceCIDR", DEADLINE, || {
        let t = m.encode();
        async move {
            (sample(
                &t,
                "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.201.0.0/24\"}",
            )? == 1.0)
                .then_some(())
        }
    })
    .await
    .expect("counted");
    assert!(
        events_for(&client, &ns, "in-new", "ClusterIPOutOfRange")
            .await
            .is_empty()
    );
    api.delete("in-new", &DeleteParams::default())
        .await
        .expect("delete service");
    cidrs
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete servicecidr");
    cip.stop().await;
    ctl.stop().await;
}

// ---------------------------------------------------------------------------------------
// The assign path, against an API that does not allocate.
// ---------------------------------------------------------------------------------------

mod double {
    //! A minimal Services API (list, watch, get, replace with resourceVersion preconditions)
    //! and an Events sink, enough for kube-rs reflectors and writes. Nothing is allocated.

    use std::collections::{BTreeMap, BTreeSet};
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use axum::body::{Body, Bytes};
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::Response;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tokio::sync::broadcast;

    #[derive(Default)]
    pub struct Inner {
        pub rv: u64,
        pub services: BTreeMap<(String, String), Service>,
        history: Vec<(u64, &'static str, Service)>,
        pub events: Vec<serde_json::Value>,
        /// Repeats of published Events.
        pub event_patches: u64,
        /// Keys whose next replace is refused after a concurrent change.
        pub conflict_once: BTreeSet<(String, String)>,
        pub conflicts: u64,
        pub writes: u64,
        created: i64,
    }

    pub struct Double {
        pub inner: Mutex<Inner>,
        tx: broadcast::Sender<(u64, &'static str, Service)>,
    }

    impl Double {
        pub fn new() -> Arc<Self> {
            let (tx, _) = broadcast::channel(4096);
            Arc::new(Double {
                inner: Mutex::new(Inner::default()),
                tx,
            })
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn commit(&self, g: &mut Inner, kind: &'static str, mut s: Service) -> Service {
            g.rv += 1;
            s.metadata.resource_version = Some(g.rv.to_string());
            let key = (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            g.services.insert(key, s.clone());
            g.history.push((g.rv, kind, s.clone()));
            let _ = self.tx.send((g.rv, kind, s.clone()));
            s
        }

        /// Creates a Service as stored by an API server that allocates nothing.
        pub fn create(&self, mut s: Service) -> Service {
            let mut g = self.lock();
            g.created += 1;
            s.metadata.uid = Some(format!("uid-{}", g.created));
            s.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + g.created)
                    .unwrap_or_default(),
            ));
            self.commit(&mut g, "ADDED", s)
        }

        pub fn get(&self, ns: &str, name: &str) -> Option<Service> {
            self.lock()
                .services
                .get(&(ns.to_string(), name.to_string()))
                .cloned()
        }

        pub fn events(&self) -> Vec<serde_json::Value> {
            self.lock().events.clone()
        }

        pub fn event_patches(&self) -> u64 {
            self.lock().event_patches
        }

        pub fn conflict_next_write(&self, ns: &str, name: &str) {
            self.lock()
                .conflict_once
                .insert((ns.to_string(), name.to_string()));
        }

        pub fn stats(&self) -> (u64, u64) {
            let g = self.lock();
            (g.writes, g.conflicts)
        }
    }

    fn json(code: StatusCode, v: &serde_json::Value) -> Response {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap_or_default()
    }

    fn status(code: u16, reason: &str, message: &str) -> Response {
        json(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "message": message, "code": code}),
        )
    }

    pub async fn handle(State(d): State<Arc<Double>>, req: Request) -> Response {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let body = axum::body::to_bytes(req.into_body(), 16 << 20)
            .await
            .unwrap_or_default();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (Method::GET, ["api", "v1", "services"])
                if query.contains("watch=true") || query.contains("watch=1") =>
            {
                let from: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (backlog, rx) = {
                    let g = d.lock();
                    let rx = d.tx.subscribe();
                    let backlog: Vec<_> = g
                        .history
                        .iter()
                        .filter(|(rv, _, _)| *rv > from)
                        .cloned()
                        .collect();
                    (backlog, rx)
                };
                let last = backlog.last().map(|(rv, _, _)| *rv).unwrap_or(from);
                let live = tokio_stream_from(rx)
                    .filter(move |(rv, _, _)| futures::future::ready(*rv > last));
                let stream = futures::stream::iter(backlog)
                    .chain(live)
                    .map(|(_, kind, s)| {
                        let line =
                            serde_json::json!({"type": kind, "object": s}).to_string() + "\n";
                        Ok::<_, Infallible>(Bytes::from(line))
                    });
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from_stream(stream))
                    .unwrap_or_default()
            }
            (Method::GET, ["api", "v1", "services"]) => {
                let g = d.lock();
                let items: Vec<&Service> = g.services.values().collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"kind": "ServiceList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": g.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, ["api", "v1", "namespaces", ns, "services", name]) => {
                match d.get(ns, name) {
                    Some(s) => json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default()),
                    None => status(404, "NotFound", &format!("services \"{name}\" not found")),
                }
            }
            (Method::PUT, ["api", "v1", "namespaces", ns, "services", name]) => {
                let Ok(new): Result<Service, _> = serde_json::from_slice(&body) else {
                    return status(400, "BadRequest", "bad body");
                };
                let key = (ns.to_string(), name.to_string());
                let mut g = d.lock();
                let Some(cur) = g.services.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("services \"{name}\" not found"));
                };
                if g.conflict_once.remove(&key) {
                    // Someone else writes first.
                    let mut other = cur.clone();
                    other
                        .metadata
                        .labels
                        .get_or_insert_with(Default::default)
                        .insert("touched".into(), "yes".into());
                    d.commit(&mut g, "MODIFIED", other);
                    g.conflicts += 1;
                    return status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on services \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                if new.metadata.resource_version != cur.metadata.resource_version {
                    g.conflicts += 1;
                    return status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on services \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let mut stored = new;
                stored.metadata.uid = cur.metadata.uid.clone();
                stored.metadata.creation_timestamp = cur.metadata.creation_timestamp.clone();
                g.writes += 1;
                let s = d.commit(&mut g, "MODIFIED", stored);
                json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default())
            }
            (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                d.lock().events.push(v.clone());
                json(StatusCode::CREATED, &v)
            }
            (
                Method::PATCH,
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    _ns,
                    "events",
                    _name,
                ],
            ) => {
                // A repeat of a published Event (kube's recorder patches its series).
                d.lock().event_patches += 1;
                json(
                    StatusCode::OK,
                    &serde_json::from_slice(&body).unwrap_or_default(),
                )
            }
            _ => status(404, "NotFound", &format!("no route {path}")),
        }
    }

    fn tokio_stream_from<T: Clone + Send + 'static>(
        rx: broadcast::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(v) => return Some((v, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// Serves the double on a free port; returns a client for it.
    pub async fn serve(d: Arc<Double>) -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().fallback(handle).with_state(d);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url: axum::http::Uri = format!("http://{addr}").parse().expect("url");
        let cfg = kube::Config::new(url);
        kube::Client::try_from(cfg).expect("client")
    }
}

fn spec_of(s: &Service) -> &ServiceSpec {
    s.spec.as_ref().expect("spec")
}

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

    let cip = start_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
    let np = start_nodeport(&client, "30000-32767");
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
    // Restart: a fresh controller rebuilds the same state and writes nothing more.
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
    let cip2 = start_clusterip(&client, &["10.96.0.0/16", "fd00:10::/108"]);
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
    let metrics = Metrics::new();
    let (leader, tx) = LeaderGate::fixed(false);
    let mut base = ContextBase::new(client.clone(), leader);
    base.metrics = metrics.clone();
    let shutdown = base.shutdown.clone();
    let ctx = base.context("clusterip-alloc", "clusterip-allocator");
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: vec!["10.96.0.0/16".parse().expect("cidr")],
        concurrent_syncs: 2,
    };
    let task = tokio::spawn(clusterip_alloc::run(ctx, cfg));
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
    tx.send(true).expect("gate");
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
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
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
    let cip = start_clusterip(&client, &["10.96.0.0/30"]);
    let np = start_nodeport(&client, "30000-30000");
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

//! One watch per resource kind: with every controller on, the manager (and in-process
//! controllers built from one base) hold exactly one API watch per kind.

use super::*;

/// Installs the LoadBalancerIPPool CRD and one pool over `cidr`, and waits until pools can be
/// listed.
async fn install_pool(client: &kube::Client, cidr: &str) {
    use cloud_lb::local::crd::{LoadBalancerIPPool, LoadBalancerIPPoolSpec};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};
    let crd = LoadBalancerIPPool::crd();
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            crd.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::apply("scm-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("install the CRD");
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    wait_for("pools can be listed", Duration::from_secs(60), || async {
        pools.list(&ListParams::default().limit(1)).await.ok()
    })
    .await
    .expect("the CRD is served");
    let pool = LoadBalancerIPPool::new(
        "watch-pool",
        LoadBalancerIPPoolSpec {
            cidrs: vec![cidr.into()],
            ..Default::default()
        },
    );
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create the pool");
}

/// The API server's in-flight WATCHes per resource once the reading has held for 2 s (its own
/// loopback informers re-open their watches now and then).
async fn stable_watches(client: &kube::Client, what: &str) -> BTreeMap<String, i64> {
    wait_stable(
        what,
        Duration::from_secs(60),
        Duration::from_millis(500),
        4,
        || async { apiserver_watches(client).await.ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that `who` added exactly one WATCH of each of [`WATCHED`] and none of any kind
/// twice, between `baseline` and `now`; the failure (and the test's output) shows every kind.
fn assert_one_watch_per_kind(
    who: &str,
    baseline: &BTreeMap<String, i64>,
    now: &BTreeMap<String, i64>,
) {
    let mut delta: BTreeMap<String, i64> = BTreeMap::new();
    for k in baseline.keys().chain(now.keys()) {
        let d = now.get(k).copied().unwrap_or(0) - baseline.get(k).copied().unwrap_or(0);
        if d != 0 {
            delta.insert(k.clone(), d);
        }
    }
    let table = delta
        .iter()
        .map(|(k, d)| {
            format!(
                "{k}={d} (API server {} - its own {})",
                now.get(k).copied().unwrap_or(0),
                baseline.get(k).copied().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("{who}: WATCHes per resource: {table}");
    let not_watched: Vec<&str> = WATCHED
        .iter()
        .copied()
        .filter(|k| delta.get(*k).copied().unwrap_or(0) < 1)
        .collect();
    let twice: Vec<&String> = delta
        .iter()
        .filter(|(_, d)| **d > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        not_watched.is_empty() && twice.is_empty(),
        "want exactly one WATCH of each of {WATCHED:?} and none of any kind twice; \
         not watched: {not_watched:?}, watched more than once: {twice:?}; \
         {who}: WATCHes per resource: {table}"
    );
}

/// The manager's watches with every controller on (cloud-lb with the local provider, its pool an
/// object, and endpoint-aware targets, so that it reads EndpointSlices too), from the
/// API server's own in-flight WATCH gauge. The control plane is this test's own, so no other
/// test's manager is counted; the API server's loopback informers are, so the test takes their
/// count before the manager starts and asserts the difference.
#[tokio::test]
async fn with_every_controller_on_the_manager_holds_one_watch_per_kind() {
    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    install_pool(&client, "192.168.100.0/28").await;
    let baseline = stable_watches(&client, "the API server's own watches").await;

    let addr = free_addr();
    let m = Manager::start(
        &cp,
        &[
            &format!("--http-address={addr}"),
            "--leader-elect-resource-namespace=default",
            "--cloud-provider=local",
            "--endpoint-aware-load-balancer-targets",
        ],
    )
    .expect("start manager");
    let logs = || m.log_lines().join("\n");
    wait_for(
        "/readyz ok and leading",
        Duration::from_secs(60),
        || async {
            (readyz_ok(&addr).await && leader_status(&addr).await == Some(1)).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    // Work for every controller, so that a watch opened only on first use is open too: a
    // Node, and a LoadBalancer Service that gets its address.
    create_node(
        &client,
        NodeSpecBuilder {
            name: "watch-node".into(),
            ..Default::default()
        },
    )
    .await
    .expect("node");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.create(
        &Default::default(),
        &service("watch-lb", Some("LoadBalancer")),
    )
    .await
    .expect("service");
    wait_for(
        "a load-balancer address",
        Duration::from_secs(60),
        || async {
            let s = svcs.get("watch-lb").await.ok()?;
            s.status?.load_balancer?.ingress.filter(|i| !i.is_empty())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));

    let now = stable_watches(&client, "the manager's watches").await;
    assert_one_watch_per_kind("the manager", &baseline, &now);
}

/// Controllers started in-process from one harness base ([`InProcess`]) share its informers as
/// the binary's do: all six controllers (cloud-lb with the local provider over a pool object and
/// endpoint-aware targets, so it watches Services, Nodes, EndpointSlices, Namespaces and pools),
/// still one WATCH per kind.
#[tokio::test]
async fn in_process_controllers_from_one_base_share_one_watch_per_kind() {
    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    install_pool(&client, "192.168.100.0/28").await;
    let baseline = stable_watches(&client, "the API server's own watches").await;
    let c = InProcess::new(client.clone());
    c.start("clusterip-alloc", "ipallocator-repair-controller", |ctx| {
        clusterip_alloc::run(ctx, Default::default())
    });
    c.start("service-cidr", "service-cidr-controller", |ctx| {
        clusterip_alloc::run_service_cidr(ctx, Default::default())
    });
    c.start("nodeport-alloc", "portallocator-repair-controller", |ctx| {
        nodeport_alloc::run(ctx, Default::default())
    });
    c.start("endpointslice", "endpoint-slice-controller", |ctx| {
        endpointslice::run(ctx, Default::default())
    });
    c.start(
        "endpointslice-mirroring",
        "endpoint-slice-mirroring-controller",
        |ctx| endpointslice::run_mirroring(ctx, Default::default()),
    );
    let config = cloud_lb::CloudLbConfig {
        cloud_provider: cloud_lb::ProviderKind::Local,
        endpoint_aware_targets: true,
        ..Default::default()
    };
    let provider: std::sync::Arc<dyn cloud_lb::provider::LoadBalancerProvider> =
        std::sync::Arc::new(
            cloud_lb::local::LocalProvider::new(Default::default()).expect("no file pools"),
        );
    c.start("cloud-lb", "service-controller", move |ctx| {
        cloud_lb::run_with_provider(ctx, config, provider)
    });
    c.wait_ready(Duration::from_secs(60))
        .await
        .expect("controllers synced");
    // The pool informer opens once the CRD answers; its status says it did.
    let pools: Api<cloud_lb::local::crd::LoadBalancerIPPool> = Api::all(client.clone());
    wait_for("the pool's status", Duration::from_secs(60), || async {
        pools.get("watch-pool").await.ok()?.status
    })
    .await
    .expect("the pool's status is written");
    let now = stable_watches(&client, "the controllers' watches").await;
    assert_one_watch_per_kind("the in-process controllers", &baseline, &now);
    let ended = c.stop(Duration::from_secs(10)).await.expect("stopped");
    assert!(ended.iter().all(|(_, r)| r.is_ok()), "{ended:?}");
}
